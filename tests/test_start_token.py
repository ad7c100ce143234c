"""The start token of plain-text prompts: chosen the way the model was trained, recorded, overridable."""
import copy

import pytest

from headlens.errors import HeadlensError
from headlens.models import choose_start_token


def test_smollm_uses_its_document_token_not_the_chat_marker(smollm):
    tok = smollm.tokenizer
    assert tok.bos_token == "<|im_start|>"                     # what the tokenizer reports as BOS
    assert smollm.start_token_id == smollm.info.start_token_id == 0
    assert smollm.info.start_token.startswith("<|endoftext|> (id 0") and "chat marker" in smollm.info.start_token
    assert choose_start_token(tok, "<|im_start|>")[0] == 1 and choose_start_token(tok, "7")[0] == 7
    with pytest.raises(HeadlensError, match="not a token"):
        choose_start_token(tok, "<|no such token|>")
    with pytest.raises(HeadlensError, match="outside the vocabulary"):
        choose_start_token(tok, 10 ** 7)


def test_a_bos_used_once_per_conversation_is_kept(smollm):
    """Llama/Gemma templates open the conversation with BOS once: that BOS is a document start."""
    tok = copy.deepcopy(smollm.tokenizer)
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tid, why = choose_start_token(tok)
    assert tid == 0 and "BOS" in why


def test_planted_word_level_model_keeps_its_bos(planted_induction):
    assert planted_induction.start_token_id == 0 and "BOS" in planted_induction.info.start_token


def test_document_start_helps_smollm_continue_sequences(smollm):
    """The motivating measurement: SmolLM2 continues ordinal sequences far better after <|endoftext|>,
    the token it was trained to see at a document start, than after its chat marker."""
    from headlens.detectors.successor import load_tasks, ordinal_prompts, task_groups

    groups = task_groups(smollm.tokenizer, load_tasks())
    tokens, target, _, cand = ordinal_prompts(smollm, groups, 3, 200, seed=0)
    acc = {}
    for start in (0, 1):
        t = tokens.clone()
        t[:, 0] = start
        last = smollm.bridge(t)[:, -1].masked_fill(~cand, float("-inf"))
        acc[start] = float((last.argmax(-1) == target).float().mean())
    assert acc[0] > acc[1] + 0.1
