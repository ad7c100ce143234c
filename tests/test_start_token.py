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


# ---- every public path prepends the chosen start token -------------------------------------------------

@pytest.mark.real
def test_smollm_public_paths_start_with_endoftext(smollm):
    """``to_tokens``, ``to_str_tokens``, the plots' prompts: <|endoftext|> (id 0), never the chat marker."""
    from headlens import plot

    tokens = smollm.to_tokens("The cat")
    assert tokens[0, 0] == smollm.start_token_id == 0 and 1 not in tokens.tolist()[0]
    assert tokens[0, 1:].tolist() == smollm.tokenizer("The cat", add_special_tokens=False)["input_ids"]
    assert smollm.to_str_tokens("The cat")[0] == "<|endoftext|>"
    fig = plot.attention(smollm, "The cat sat", [(0, 0)])
    assert fig.data[0].x[0] == "0:'<|endoftext|>'" and "<|im_start|>" not in "".join(fig.data[0].x)


@pytest.fixture(scope="module")
def t5_start(tmp_path_factory):
    """The planted induction model with its start token overridden to 't5' (id 5): a start token that is
    not the tokenizer's BOS (id 0), as on SmolLM2."""
    from headlens import load_model

    from planted import induction_model

    return load_model(str(induction_model(tmp_path_factory.mktemp("t5_start"))), start_token="t5")


def test_public_paths_use_the_chosen_start_token(t5_start, monkeypatch):
    from headlens.methods.readout import attention_on, prompt_tokens

    m = t5_start
    assert m.start_token_id == 5 and m.tokenizer.bos_token_id == 0
    assert m.to_tokens("t1 t2").tolist() == [[5, 1, 2]]
    assert m.to_str_tokens("t1 t2") == ["t5", "t1", "t2"] and m.to_str_tokens([5, 1]) == ["t5", "t1"]
    assert prompt_tokens(m, "t1 t2").tolist() == [[5, 1, 2]]
    assert prompt_tokens(m, [0, 1]).tolist() == [[0, 1]]                   # token ids: used as they are
    assert attention_on(m, "t1 t2", [(1, 2)])[0] == ["t5", "t1", "t2"]
    # a batch: left-padded (as every batch headlens builds), the mask says where each prompt starts
    tokens, mask = m.to_tokens(["t1 t2 t3", "t1"], return_mask=True)
    assert tokens.tolist() == [[5, 1, 2, 3], [m.pad_id()] * 2 + [5, 1]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    # generate: the prompt it decodes from starts with the chosen token
    seen = []
    original = m.bridge.generate
    monkeypatch.setattr(m.bridge, "generate", lambda tokens, **kw: (seen.append(tokens), original(tokens, **kw))[1])
    assert m.generate("t1 t2 t3 t1", max_new_tokens=2) == "t1 t2 t3 t1 t2 t3"
    assert seen[0].tolist() == [[5, 1, 2, 3, 1]]


def test_a_model_without_start_token_prepends_nothing(t5_start):
    import dataclasses

    from headlens.models import HeadModel

    m = HeadModel(t5_start.bridge, t5_start.tokenizer, dataclasses.replace(t5_start.info, start_token_id=None))
    assert m.start_token_id is None
    assert m.to_tokens("t1 t2").tolist() == [[1, 2]] and m.to_str_tokens("t1 t2") == ["t1", "t2"]


def test_generate_uses_the_kv_cache_correctly(planted_induction):
    """Cached decoding (the bridge's KV cache, made to work with transformers 5 by ``kv_cache_fix``) gives
    what decoding without the cache gives: the planted induction head continues the repeated sequence."""
    m = planted_induction
    plain = m.bridge.generate(m.to_tokens("t1 t2 t3 t1"), max_new_tokens=4, use_past_kv_cache=False,
                              do_sample=False, verbose=False, return_type="str")
    assert m.generate("t1 t2 t3 t1", max_new_tokens=4) == plain == "t1 t2 t3 t1 t2 t3 t1 t2"
