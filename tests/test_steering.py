"""PASTA attention steering (headlens.methods.steering): emphasis from markup, and the steered heads
against a plain reference computation on tiny random GPT-2 and Llama (grouped-query attention) models,
through the bridge, on the native SDPA path and across KV-cached decoding; a planted copying head; the
batched sweep against one head at a time; the ``headlens steer`` command.

The reference is the original transformers model (weights as saved, not the bridge's processed ones)
with an attention function of its own: eager attention one query head at a time, ``log(alpha)`` added to
the steered heads' scores of the keys the test itself marks (each row's prompt tokens outside its
emphasised ones), the whole sequence recomputed with no cache."""
import math

import pytest
import torch

import headlens as hl
from headlens import HeadlensError, load_model
from headlens.methods.generation import greedy_generate, uses_native
from headlens.methods.steering import Steer, parse_heads, steer_scale, strip_markers

from planted import STEER_COPY_HEAD, STEER_SPAN_TOKEN, make_tokenizer, save, steering_model
from test_cli import headlens

ALPHA = 0.01
REF_NAME = "headlens_steer_reference"
_REF: dict = {}          # what the reference attention steers in the current forward pass


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention, one query head at a time, over ``_REF["allowed"]`` ``[batch, q, k]`` (causal and
    padding), with ``log(alpha)`` on the columns ``_REF["down"]`` ``[batch, k]`` for the steered heads."""
    b, n_heads, q, d = query.shape
    group = n_heads // key.shape[1]
    scaling = d ** -0.5 if scaling is None else scaling
    layer = int(module.layer_idx)
    outs = []
    for h in range(n_heads):
        scores = torch.matmul(query[:, h], key[:, h // group].transpose(-1, -2)) * scaling      # [b, q, k]
        scores = scores.masked_fill(~_REF["allowed"], float("-inf"))
        if (layer, h) in _REF["heads"]:
            scores = scores + torch.where(_REF["down"][:, None, :], math.log(_REF["alpha"]), 0.0)
        weights = torch.softmax(scores, -1).nan_to_num(0.0)          # a padding query row attends nowhere
        outs.append(torch.matmul(weights, value[:, h // group]))
    return torch.stack(outs, 2), None                                # [b, q, head, d]


def _reference_model(folder):
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(REF_NAME, _reference_attention)
    AttentionMaskInterface.register(REF_NAME, sdpa_mask)
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=REF_NAME).eval()


def reference_logprobs(ref, rows: list[list[int]], prompt_lengths: list[int], emphasised: list[list[bool]],
                       heads, alpha: float = ALPHA) -> torch.Tensor:
    """Next-token log-probabilities ``[batch, pos, vocab]`` of ``rows`` (token lists, left-padded here),
    ``heads`` steered towards each row's ``emphasised`` prompt positions (generated tokens, the positions
    from ``prompt_lengths`` on, never down-weighted; a row with nothing emphasised is not steered)."""
    n = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), n, dtype=torch.long)
    real = torch.zeros(len(rows), n, dtype=torch.bool)
    down = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, (row, length, emph) in enumerate(zip(rows, prompt_lengths, emphasised)):
        pad = n - len(row)
        tokens[i, pad:] = torch.tensor(row)
        real[i, pad:] = True
        for p in range(length):
            down[i, pad + p] = any(emph) and not emph[p]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    _REF.update(allowed=causal[None] & real[:, None, :], down=down, heads=set(map(tuple, heads)), alpha=alpha)
    positions = (real.long().cumsum(1) - 1).clamp_min(0)
    logits = ref(input_ids=tokens, attention_mask=real.long(), position_ids=positions).logits
    return torch.log_softmax(logits.float(), -1)


def _own(e, i) -> tuple[list[int], list[bool]]:
    """Row ``i`` of an Emphasis without its padding: tokens and emphasised flags."""
    real = e.attention_mask[i].bool()
    return e.tokens[i][real].tolist(), e.mask[i][real].tolist()


# ---------------------------------------------------------------------------------------------------
# tiny random models
# ---------------------------------------------------------------------------------------------------

VOCAB = 48


def _tiny(folder, kind):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.3))
    else:
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                          pad_token_id=0, initializer_range=0.3))
    # weights 15x the usual initialisation's (initializer_range): attention and its steering show in the
    # logits; norm gains and biases away from 1 and 0, so the bridge's weight processing does something
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or "norm" in name or name.endswith("bias"):
                p.copy_(0.5 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.3 * torch.randn(p.shape, generator=g))
    save(hf.eval(), make_tokenizer(VOCAB, folder), folder)
    return folder


_FOLDERS: dict = {}


@pytest.fixture(scope="module", params=["gpt2-native", "gpt2-bridge", "llama-native", "llama-bridge"])
def tiny(request, tmp_path_factory):
    """(kind, model, reference) for a tiny random model on each decoding path: its own check decides
    (``uses_native``: both decode natively), or the bridge's KV-cached eager path, forced (the fallback
    every model can take)."""
    kind, path = request.param.split("-")
    if kind not in _FOLDERS:
        folder = _tiny(tmp_path_factory.mktemp(f"steer_{kind}"), kind)
        _FOLDERS[kind] = (folder, _reference_model(folder))
    folder, ref = _FOLDERS[kind]
    model = load_model(str(folder))
    if path == "bridge":
        model.memo["native"] = False
    else:
        assert uses_native(model)
    return kind, model, ref


PROMPTS = ["t3 t7 **t9 t11** t4 t6 t2 t8 t5 t1",                 # one span
           "**t20** t21 t22 **t23 t24** t25",                     # two spans, shorter: left-padded
           "t30 t31 t32 t33 t34 t35 t36 t37"]                     # no span: not steered
HEADS = [(0, 1), (1, 2), (1, 3)]   # L1H2 and L1H3 share a key/value head under GQA; L1H3's neighbour L1H2 too


def test_bridge_forward_equals_reference(tiny):
    kind, model, ref = tiny
    assert model.info.n_kv_heads == (4 if kind == "gpt2" else 2)        # Llama: grouped-query attention
    e = hl.emphasis(model, PROMPTS)
    rows = [_own(e, i) for i in range(len(PROMPTS))]
    want = reference_logprobs(ref, [t for t, _ in rows], [len(t) for t, _ in rows], [f for _, f in rows], HEADS)
    with hl.steer(model, HEADS, e, alpha=ALPHA):
        got = torch.log_softmax(model(e.tokens, attention_mask=e.attention_mask).float(), -1)
    clean = torch.log_softmax(model(e.tokens, attention_mask=e.attention_mask).float(), -1)
    real = e.attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    # steering changed the steered rows and left the row without emphasis alone
    assert (got[0] - clean[0]).abs().max() > 1e-2 and (got[1] - clean[1]).abs().max() > 1e-2
    torch.testing.assert_close(got[2][real[2]], clean[2][real[2]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [0, 3])
def test_cached_decoding_equals_reference(tiny, chunk):
    """Every decoded step's logits (the native path's SDPA prefill, in chunks of 3 tokens too, then one
    explicit row per step; GPT-2: the bridge with its KV cache) equal a full no-cache forward pass of the
    prompt and the tokens generated so far, steered by the reference."""
    _, model, ref = tiny
    e = hl.emphasis(model, PROMPTS)
    rows = [_own(e, i) for i in range(len(PROMPTS))]
    prompts = [t for t, _ in rows]
    n_new = 6
    with hl.steer(model, HEADS, e, alpha=ALPHA):
        g = greedy_generate(model, prompts, n_new, keep_logits=True, chunk_tokens=chunk)
    clean = greedy_generate(model, prompts, n_new, keep_logits=True)
    assert g.logits.shape == (n_new, len(prompts), VOCAB)
    for step in range(n_new):
        seqs = [p + out[:step] for p, out in zip(prompts, g.tokens)]
        want = reference_logprobs(ref, seqs, [len(p) for p in prompts], [f for _, f in rows], HEADS)[:, -1]
        torch.testing.assert_close(torch.log_softmax(g.logits[step], -1), want, atol=1e-4, rtol=0)
    assert (g.logits[:, :2] - clean.logits[:, :2]).abs().max() > 1e-2
    torch.testing.assert_close(g.logits[:, 2], clean.logits[:, 2], atol=1e-4, rtol=0)


def test_bridge_generate_stays_steered(tiny):
    """``model.generate`` (the bridge's KV-cached generation) under steering gives the reference's greedy
    tokens: each decoding step's pattern holds every key column, so the emphasis lines up."""
    _, model, ref = tiny
    prompt = PROMPTS[0]
    e = hl.emphasis(model, prompt)
    tokens, flags = _own(e, 0)
    seq = list(tokens)
    for _ in range(6):
        seq.append(int(reference_logprobs(ref, [seq], [len(tokens)], [flags], HEADS)[0, -1].argmax()))
    with hl.steer(model, HEADS, e, alpha=ALPHA):
        text = model.generate(e.tokens, max_new_tokens=6)
    assert text.split() == model.tokenizer.decode(seq[1:]).split()


def test_batched_sweep_equals_one_head_at_a_time(tiny):
    """run_variants with Steer, one head per variant, equals each head steered alone with hl.steer."""
    _, model, _ = tiny
    e = hl.emphasis(model, PROMPTS[:2])
    heads = model.heads()

    def metric(logits):
        return torch.log_softmax(logits[:, -1].float(), -1)

    swept = hl.run_variants(model, e.tokens, [[h] for h in heads], metric, Steer(e.mask, ALPHA),
                            attention_mask=e.attention_mask, batch_size=5)
    for i, head in enumerate(heads):
        with hl.steer(model, [head], e, alpha=ALPHA):
            alone = metric(model(e.tokens, attention_mask=e.attention_mask))
        torch.testing.assert_close(swept[i], alone, atol=1e-5, rtol=0)


def test_steer_generate(tiny):
    """The unsteered and steered continuations of steer_generate (one batch) are those of greedy decoding
    outside and inside hl.steer."""
    _, model, _ = tiny
    out = hl.steer_generate(model, PROMPTS[:2], HEADS, alpha=ALPHA, max_new_tokens=5, stop=False)
    e = hl.emphasis(model, PROMPTS[:2])
    prompts = [_own(e, i)[0] for i in range(2)]
    with hl.steer(model, HEADS, e, alpha=ALPHA):
        steered = greedy_generate(model, prompts, 5).tokens
    plain = greedy_generate(model, prompts, 5).tokens
    assert out.steered == [model.tokenizer.decode(t) for t in steered]
    assert out.unsteered == [model.tokenizer.decode(t) for t in plain]
    assert out.texts == e.texts
    with pytest.raises(HeadlensError, match="no emphasised span"):
        hl.steer_generate(model, [PROMPTS[0], PROMPTS[2]], HEADS)


def test_steering_misuse(tiny):
    _, model, _ = tiny
    e = hl.emphasis(model, PROMPTS[:2])
    with hl.steer(model, HEADS, e):
        with pytest.raises(HeadlensError, match="not the emphasised ones"):
            greedy_generate(model, [[0, 1, 2]], 2)
    with pytest.raises(HeadlensError, match="no head L9H0"):
        with hl.steer(model, [(9, 0)], e):
            pass
    with pytest.raises(HeadlensError, match="alpha"):
        Steer(e.mask, alpha=0.0)


# ---------------------------------------------------------------------------------------------------
# emphasis from text
# ---------------------------------------------------------------------------------------------------

def test_strip_markers():
    assert strip_markers("a **b c** d **e**") == ("a b c d e", [(2, 5), (8, 9)])
    assert strip_markers("plain") == ("plain", [])
    with pytest.raises(HeadlensError, match="unpaired"):
        strip_markers("a **b c d")


def test_emphasis_tokens(tiny):
    _, model, _ = tiny
    e = hl.emphasis(model, ["t1 **t2 t3** t4 **t5**", "t6 **t7**"])
    assert e.texts == ["t1 t2 t3 t4 t5", "t6 t7"]
    assert e.spans == [[(3, 8), (12, 14)], [(3, 5)]]
    assert e.tokens.tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 6, 7]]           # left padding
    assert e.attention_mask.tolist() == [[1] * 6, [0, 0, 0, 1, 1, 1]]
    assert e.mask.tolist() == [[False, False, True, True, False, True], [False] * 5 + [True]]
    # character ranges instead of markup; a token is emphasised if any of its characters is
    r = hl.emphasis(model, ["t1 t22 t3"], spans=[[(4, 5)]])
    assert r.texts == ["t1 t22 t3"] and r.mask.tolist() == [[False, False, True, False]]
    with pytest.raises(HeadlensError, match="unpaired"):
        hl.emphasis(model, ["t1 t2", "t1 **t2"])
    with pytest.raises(HeadlensError, match="outside"):
        hl.emphasis(model, ["t1 t2"], spans=[[(3, 9)]])
    with pytest.raises(HeadlensError, match="span lists"):
        hl.emphasis(model, ["t1 t2"], spans=[[(0, 2)], [(0, 1)]])
    with pytest.raises(HeadlensError, match="at least one prompt"):
        hl.emphasis(model, [])


def test_parse_heads_and_scale():
    assert parse_heads("L12H3, 14.0") == [(12, 3), (14, 0)]
    with pytest.raises(HeadlensError, match="cannot read head"):
        parse_heads("L12-3")
    emph = torch.tensor([[False, True, False], [False, False, False]])
    scale = steer_scale(emph, 5, 0.5)
    assert scale.tolist() == [[0.5, 1, 0.5, 1, 1], [1] * 5]      # keys after the prompt, rows without span: 1


# ---------------------------------------------------------------------------------------------------
# planted: a head that copies the token it attends to
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted_steer(tmp_path_factory):
    return load_model(str(steering_model(tmp_path_factory.mktemp("planted_steer"))))


PLANTED_PROMPT = f"t3 t5 **t{STEER_SPAN_TOKEN}** t4 t6 t2 t8 t1"


def test_planted_copy_head_follows_the_emphasis(planted_steer):
    """Steering the copying head to the marked span makes the model predict the span's token; steering
    any other head, alone or the seven together, leaves the prediction where it was (the last token)."""
    model = planted_steer
    e = hl.emphasis(model, PLANTED_PROMPT)
    last = int(e.tokens[0, -1])

    def predicted(heads):
        with hl.steer(model, heads, e, alpha=ALPHA):
            bridge = int(model(e.tokens)[0, -1].argmax())
            decoded = greedy_generate(model, [e.tokens[0].tolist()], 1).tokens[0][0]
        assert bridge == decoded
        return bridge

    assert predicted([]) == last
    assert predicted([STEER_COPY_HEAD]) == STEER_SPAN_TOKEN
    others = [h for h in model.heads() if h != STEER_COPY_HEAD]
    assert [predicted([h]) for h in others] == [last] * len(others)
    assert predicted(others) == last
    # the copy head's top-1 key as greedy_generate records it: the marked token (position 3) when steered
    with hl.steer(model, [STEER_COPY_HEAD], e, alpha=ALPHA):
        top1 = greedy_generate(model, [e.tokens[0].tolist()], 1, record_top1=True).top1
    assert int(top1[0, STEER_COPY_HEAD[0], 0, STEER_COPY_HEAD[1]]) == 3
    # moved by the emphasis, not by steering as such: another span, another token
    e2 = hl.emphasis(model, "t3 t5 t11 t4 **t6** t2 t8 t1")
    with hl.steer(model, [STEER_COPY_HEAD], e2, alpha=ALPHA):
        assert int(model(e2.tokens)[0, -1].argmax()) == 6


# ---------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------

def test_cli_steer(planted_steer, tmp_path):
    folder = str(steering_model(tmp_path / "m"))
    layer, head = STEER_COPY_HEAD
    r = headlens("steer", folder, "--heads", f"L{layer}H{head}", "--prompt", PLANTED_PROMPT,
                 "--max-new-tokens", "1", "--no-chat")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    unsteered = next(l for l in lines if l.startswith("unsteered"))
    steered = next(l for l in lines if l.startswith("steered:"))
    assert unsteered.split()[-1] == "t1" and steered.split()[-1] == f"t{STEER_SPAN_TOKEN}"
    # heads from a catalogue: the top K of a role by score
    cat = tmp_path / "cat.csv"
    rows = ["layer,head,head_id,copy_score"] + [f"{l},{h},L{l}H{h},{1.0 if (l, h) == STEER_COPY_HEAD else 0.1}"
                                                 for l, h in planted_steer.heads()]
    cat.write_text("\n".join(rows) + "\n")
    r = headlens("steer", folder, "--heads", f"{cat}:copy:1", "--prompt", PLANTED_PROMPT,
                 "--max-new-tokens", "1", "--no-chat")
    assert r.returncode == 0, r.stderr
    steered = next(l for l in r.stdout.splitlines() if l.startswith("steered:"))
    assert f"steering L{layer}H{head} " in r.stdout and steered.split()[-1] == f"t{STEER_SPAN_TOKEN}", r.stdout
    for args, match in [(["--heads", "L1H2", "--prompt", "t1 t2"], "no emphasised span"),
                        (["--heads", f"{cat}:induction:2", "--prompt", PLANTED_PROMPT], "no role 'induction'"),
                        (["--heads", "L7H0", "--prompt", PLANTED_PROMPT], "no head L7H0"),
                        (["--heads", "L1-2", "--prompt", PLANTED_PROMPT], "cannot read head"),
                        (["--heads", "L1H2", "--prompt", PLANTED_PROMPT, "--alpha", "2"], "alpha")]:
        r = headlens("steer", folder, *args, "--no-chat")
        assert r.returncode != 0 and match in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# SmolLM2 (grouped-query attention, 9 query heads on 3 key/value heads)
# ---------------------------------------------------------------------------------------------------

def test_smollm2_native_decoding_equals_bridge(smollm):
    """On the real model, KV-cached native decoding (SDPA prefill with the bias, explicit rows) under
    steering gives at every step the logits of a full steered forward pass through the bridge's pattern
    hooks (no cache); three of the steered heads share key/value head 0 of layer 17."""
    model = smollm
    prompts = ["Alice lives in Paris. **Bob lives in Rome.** Carol lives in Oslo. Bob lives in",
               "**The code word is apple.** The code word is not pear. The code word is"]
    heads = [(17, 0), (17, 1), (17, 2), (17, 3), (18, 7), (23, 2)]
    e = hl.emphasis(model, prompts)
    rows = [_own(e, i)[0] for i in range(len(prompts))]
    with hl.steer(model, heads, e, alpha=ALPHA):
        g = greedy_generate(model, rows, 4, keep_logits=True)
    clean = greedy_generate(model, rows, 4, keep_logits=True)
    assert (g.logits - clean.logits).abs().max() > 0.1
    for step in range(4):
        # every row has generated `step` tokens: the prompts' left padding stays, the new columns follow
        new = torch.tensor([out[:step] for out in g.tokens], dtype=torch.long).reshape(len(rows), step)
        tokens = torch.cat([e.tokens, new], 1)
        mask = torch.cat([e.attention_mask, torch.ones_like(new)], 1)
        with hl.steer(model, heads, e, alpha=ALPHA):       # keys after the emphasis' columns: not scaled
            want = torch.log_softmax(model(tokens, attention_mask=mask)[:, -1].float(), -1)
        torch.testing.assert_close(torch.log_softmax(g.logits[step], -1), want, atol=2e-3, rtol=0)


def test_emphasis_through_the_chat_template(tmp_path):
    """With chat=True the prompt is the user turn of the chat template (no start token of ours): the
    spans move with the text, and steer_generate's texts are the rendered prompts."""
    from transformers import AutoTokenizer

    folder = _tiny(tmp_path / "chat", "llama")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = ("{% for m in messages %}t40 {{ m['content'] }} t41{% endfor %}"
                         "{% if add_generation_prompt %} t42{% endif %}")
    tok.save_pretrained(folder)
    model = load_model(str(folder))
    assert model.info.has_chat_template
    e = hl.emphasis(model, ["t1 **t2** t3"], chat=True)
    assert e.texts == ["t40 t1 t2 t3 t41 t42"] and e.spans == [[(7, 9)]]
    assert e.tokens.tolist() == [[40, 1, 2, 3, 41, 42]]
    assert e.mask.tolist() == [[False, False, True, False, False, False]]
    assert hl.emphasis(model, ["t1 **t2** t3"]).tokens.tolist() == [[0, 1, 2, 3]]     # chat=False: as written
    out = hl.steer_generate(model, "t1 **t2** t3", [(1, 0)], max_new_tokens=2, chat=True, stop=False)
    assert out.texts == e.texts and len(out.steered) == len(out.unsteered) == 1
