"""Retrieval heads: the copy-paste score on a planted retriever and on SmolLM2-135M; the fast decoding path
(SDPA prefill, explicit last rows, uniform attention as a running mean, prefix KV reuse, batches) checked
against the bridge's eager attention re-running the whole context per token; presets; the causal check."""
import json

import pandas as pd
import pytest
import torch

from headlens import HeadlensError, data_path, load_model
from headlens.detectors import get_detector
from headlens.detectors.retrieval import (
    NeedleRun,
    copy_scores,
    decode_runs,
    grid,
    load_needles,
    needle_prompts,
    rouge1_recall,
)
from headlens.methods import ablate
from headlens.methods.generation import (
    continuation_logits,
    encode_prompt,
    greedy_generate,
    prefill,
    prefill_context,
    stop_token_ids,
    uses_native,
)

from planted import RETRIEVAL_HEAD, retrieval_model
from test_cli import headlens

NEEDLE = "t20 t21 t22 t23 t24"
HELD_OUT = "t25 t26 t27 t28 t29"     # a second needle: one is held out for the confirmation check


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted_retrieval")
    model = load_model(str(retrieval_model(folder / "model")))
    (folder / "needles.json").write_text(json.dumps([{"needle": NEEDLE, "question": "t20"},
                                                     {"needle": HELD_OUT, "question": "t25"}]))
    (folder / "hay.txt").write_text(" ".join(f"t{1 + (i * 7) % 15}" for i in range(60)))
    return model, folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random-weight tiny Llama (grouped-query attention, rotary): decoded by the fast path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from planted import make_tokenizer, save

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0))
    folder = tmp_path_factory.mktemp("tiny_llama")
    save(hf.eval(), make_tokenizer(32, folder), folder)
    return load_model(str(folder))


def test_fast_path_is_used_where_it_is_exact(tiny_llama):
    assert uses_native(tiny_llama)            # Llama: the transformers modules hold the bridge's weights
    # GPT-2 takes the fast path only if its parity check (next-token log-probs vs the bridge) passes;
    # either way the tests below compare its generations with the eager bridge path.


def planted_detector(folder, **kw):
    settings = dict(needles=str(folder / "needles.json"), haystack=str(folder / "hay.txt"),
                    context_lengths=[30, 50], depths=[0.0, 0.5, 1.0], plain_template="{context} {question}",
                    max_new_tokens=4, top_k=1, n_random=5)
    return get_detector("retrieval", **{**settings, **kw})


def test_rouge1_recall():
    assert rouge1_recall("The code is purple walrus.", "the CODE is: purple walrus") == 1.0
    assert rouge1_recall("a b c d", "a b x") == 0.5
    assert rouge1_recall("a a b", "a b") == pytest.approx(2 / 3)


def test_copy_scores_match_the_papers_loop():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (20,), generator=g).tolist()
    run = NeedleRun("x", 20, 0.5, tokens, (8, 14))
    generated = torch.randint(0, 6, (7,), generator=g).tolist()
    top1 = torch.randint(0, 20, (7, 3, 4), generator=g)
    expected = torch.zeros(3, 4)
    for s, t in enumerate(generated):           # Wu et al.'s retrieval_calculate, head by head
        for l in range(3):
            for h in range(4):
                i = int(top1[s, l, h])
                if 8 <= i < 14 and tokens[i] == t:
                    expected[l, h] += 1 / 6
    assert expected.sum() > 0
    assert torch.allclose(copy_scores(run, generated, top1), expected)


def test_needle_prompts_place_the_needle(planted):
    model, folder = planted
    det = planted_detector(folder)
    from headlens.detectors.retrieval import load_needles
    runs = needle_prompts(model, load_needles(str(folder / "needles.json"))[:1], (folder / "hay.txt").read_text(),
                          [30, 50], [0.0, 0.5, 1.0], False, det.params.plain_template)
    assert len(runs) == 6
    for run in runs:
        s, e = run.span
        assert model.tokenizer.decode(run.tokens[s:e]) == NEEDLE
        assert len(run.tokens) == 1 + run.length + 1            # BOS + context + question
    assert [r.span[0] for r in runs[:3]] == [1, 1 + 12, 1 + 25]  # depths 0, 0.5, 1 of 25 filler tokens


def test_planted_retrieval_head_found_and_causal(planted):
    model, folder = planted
    res = planted_detector(folder, n_random=99, matched=False).run(model, seed=0)
    assert res.status == "ok" and res.info["n_retrieved"] == res.info["n_runs"] == 12
    assert res.info["n_discovery_runs"] == res.info["n_confirmation_runs"] == 6   # one needle each
    assert len(res.info["confirmation_needles"]) == 1
    assert res.labelled == [RETRIEVAL_HEAD]
    top = res.top(2)
    assert (top["layer"].iloc[0], top["head"].iloc[0]) == RETRIEVAL_HEAD
    assert top.retrieval_score.iloc[0] == pytest.approx(4 / 5)   # copies t21..t24 of the 5-token needle
    assert top.retrieval_score.iloc[1] == 0
    c = res.causal.to_dict()
    assert c["clean"] == pytest.approx(0.8) and c["top_k_ablated"] < 0.3
    assert c["random_k_ablated_mean"] > c["top_k_ablated"] + 0.4
    # Heads uniform while answering (Wu et al.): no random draw breaks retrieval, not even one with the
    # circuit's previous-token head (L0H1), whose work is in the needle's keys, prefilled clean.
    with_prev = sum("L0H1" in d for d in c["random_draws"])
    assert with_prev and c["worse"] == "lower" and c["n_as_extreme"] == 0
    assert c["p_value"] == pytest.approx(1 / 100) and c["significant"] and c["effect"] > 0.6
    # Uniform over the prompt too: the draws with L0H1 break it as much, and p counts them.
    c2 = planted_detector(folder, ablate_prompt=True, n_random=99, matched=False).run(model, seed=0)
    assert c2.labelled == []            # the same heads, but the check is not significant: no label
    c2 = c2.causal.to_dict()
    assert c2["top_k_ablated"] == c["top_k_ablated"] and c2["random_draws"] == c["random_draws"]
    assert c2["n_as_extreme"] == with_prev and c2["p_value"] == pytest.approx((1 + with_prev) / 100)
    row = top.iloc[0]
    # The interval's unit is the needle (its runs at every length and depth drawn together): one needle
    # gives no spread to measure, so no interval (resampling its 6 runs would claim one).
    assert res.info["interval_unit"] == "needle" and res.info["interval_units"] == 1
    assert res.frame.retrieval_score_lo.isna().all() and res.frame.retrieval_score_hi.isna().all()
    # Direct vs total effect on the answer's log-prob: the planted head matters through its own path
    # (it sits in the last layer: nothing downstream can repair it); heads outside the top-k are NaN.
    assert row.retrieval_direct > 0.5 and row.retrieval_total > 0.5
    assert abs(row.retrieval_self_repair) < 0.2
    assert row.retrieval_compensation == pytest.approx(row.retrieval_direct - row.retrieval_total)
    for col in ("direct", "total", "compensation", "self_repair"):       # measured for the top-k (1) only
        assert res.frame[f"retrieval_{col}"].isna().sum() == len(res.frame) - 1
    assert res.frame.equals(planted_detector(folder).run(model, seed=0).frame)   # deterministic


def test_bad_settings_raise(planted):
    model, folder = planted
    with pytest.raises(HeadlensError, match="outside"):
        planted_detector(folder, depths=[1.5]).run(model)
    with pytest.raises(HeadlensError, match="context of 64 tokens"):
        get_detector("retrieval", needles=str(folder / "needles.json"), haystack=str(folder / "hay.txt"),
                     context_lengths=[100]).run(model)
    with pytest.raises(HeadlensError, match="unknown preset 'huge'; choose one of default, paper"):
        planted_detector(folder, preset="huge").run(model)
    with pytest.raises(HeadlensError, match="paper's grid starts at 1000 tokens"):   # 64-token model
        planted_detector(folder, preset="paper", context_lengths=[]).run(model)


def test_unknown_preset_is_a_one_line_error(planted):
    folder = planted[1]
    r = headlens("scan", str(folder / "model"), "-d", "retrieval", "-p", "retrieval.preset=huge",
                 "-o", str(folder / "x.csv"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: retrieval: unknown preset 'huge'")


@pytest.mark.real
def test_paper_preset_fits_the_context(smollm):
    """The paper's lengths that fit SmolLM2's 8192 tokens, plus the longest that fits; its 10 depths."""
    det = get_detector("retrieval", preset="paper")
    p = det.params
    needles = load_needles(p.needles)
    lengths, depths = grid(smollm, p, needles, p.template, True)
    assert lengths[:3] == [1000, 3579, 6158] and 6158 < lengths[-1] <= 8192 - p.max_new_tokens
    runs = needle_prompts(smollm, needles, "A b c. " * 10, lengths[-1:], [1.0], True, p.template)
    assert max(len(r.tokens) for r in runs) + p.max_new_tokens <= smollm.info.n_ctx
    assert depths == pytest.approx([0, .11, .22, .33, .44, .56, .67, .78, .89, 1])
    assert grid(smollm, get_detector("retrieval", preset="paper", context_lengths=[700]).params,
                needles, p.template, True)[0] == [700]

def uniform_from(model, heads, start):
    """Reference hooks: the ``heads``' pattern rows from position ``start`` on made uniform over their
    causal prefix (earlier rows untouched), one ``(name, fn)`` pair per touched layer."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)]

    def hook(pattern, hook):
        q = pattern.shape[-2]
        uniform = torch.tril(torch.ones(q, q)) / torch.arange(1, q + 1)[:, None]
        for l, h in heads:
            if hook.name == names[l]:
                pattern[:, h, start:] = uniform[start:].to(pattern.dtype)
        return pattern
    return [(names[l], hook) for l in sorted({l for l, _ in heads})]


def plain_decode(model, ids, n, heads=(), start=None):
    """Reference: re-run the whole sequence for every token, reading the full attention pattern. With
    ``start``, the heads' pattern rows from position ``start`` on are uniform over their causal prefix
    (earlier rows untouched); else the heads are uniform everywhere."""
    x = torch.tensor([ids])
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)]
    top1 = []
    hooks = [] if start is None else uniform_from(model, heads, start)
    with ablate(model, heads if start is None else (), "uniform"), model.bridge.hooks(fwd_hooks=hooks):
        for _ in range(n):
            logits, cache = model.bridge.run_with_cache(x, names_filter=lambda name: name in names)
            top1.append(torch.stack([cache[name][0, :, -1].argmax(-1) for name in names]))
            x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x[0, len(ids):].tolist(), torch.stack(top1)


def decoding_case(which, planted, request):
    """A model, two prompts of different lengths and two heads to ablate."""
    if which == "planted":
        model = planted[0]
        return model, [encode_prompt(model, "t3 t20 t21 t22 t4 t5 t20", False)[0],
                       encode_prompt(model, "t9 t8 t20 t21 t7 t20", False)[0]], [RETRIEVAL_HEAD, (0, 1)]
    if which == "llama":
        return request.getfixturevalue("tiny_llama"), [[0, 5, 9, 3, 17, 5, 9, 3, 22, 4, 5], [0, 7, 7, 2, 30, 11]], \
            [(1, 0), (2, 3)]
    model = request.getfixturevalue("smollm")
    return model, [encode_prompt(model, "The secret code is 4412. What is the secret code?")[0],
                   encode_prompt(model, "Name a colour.")[0]], [(17, 3), (18, 7)]


@pytest.mark.parametrize("which", ["planted", "llama", pytest.param("smollm", marks=pytest.mark.real)])
def test_kv_cached_decoding_matches_full_reruns(which, planted, request):
    model, prompts, heads = decoding_case(which, planted, request)
    heads = heads[:1] if which == "planted" else heads
    n = 5
    gen = greedy_generate(model, prompts, n, record_top1=True)
    abl = greedy_generate(model, prompts, n, ablate=[heads, heads[:1]], record_top1=True)
    for i, ids in enumerate(prompts):     # batched and left-padded, cached, SDPA: same as one by one, eager
        tokens, top1 = plain_decode(model, ids, n)
        assert gen.tokens[i] == tokens
        assert torch.equal(gen.top1[:, :, i], top1)
        tokens, top1 = plain_decode(model, ids, n, [heads, heads[:1]][i])   # uniform attention (running mean)
        assert abl.tokens[i] == tokens
        assert torch.equal(abl.top1[:, :, i], top1)
    assert abl.tokens[0] != gen.tokens[0] or which != "planted"     # the planted head matters


@pytest.mark.parametrize("which", ["planted", "llama", pytest.param("smollm", marks=pytest.mark.real)])
def test_ablation_while_answering_matches_full_reruns(which, planted, request):
    """``ablate_prompt=False`` (Wu et al. mask heads only in the decoding passes): each distinct prompt is
    prefilled clean once and every variant's row reads that cache in place (a Context); the tokens and
    top-1 positions equal re-running the whole sequence per token with the heads' pattern rows uniform
    from the prompt's last token on. So does a context passed in (prefilled from a prefix, or ending
    earlier, the rows then prefilling the rest clean)."""
    model, prompts, heads = decoding_case(which, planted, request)
    variants = [heads, heads[:1], []]
    rows = [(i, v) for i in range(len(prompts)) for v in range(len(variants))]
    n = 5
    args = dict(ablate=[variants[v] for _, v in rows], record_top1=True, ablate_prompt=False)
    gen = greedy_generate(model, [prompts[i] for i, _ in rows], n, **args)
    for r, (i, v) in enumerate(rows):
        tokens, top1 = plain_decode(model, prompts[i], n, variants[v], start=len(prompts[i]) - 1)
        assert gen.tokens[r] == tokens
        assert torch.equal(gen.top1[:, :, r], top1)
    if which == "planted":   # while answering, only the retrieval head matters: the previous-token head's
        assert variants[1] == [RETRIEVAL_HEAD]       # work is in the prompt's keys, computed clean
        assert gen.tokens[0] == gen.tokens[1] != gen.tokens[2]
        return
    assert uses_native(model)
    for context in (prefill_context(model, [p[:-1] for p in prompts], prefix=prefill(model, prompts[0][:3])),
                    prefill_context(model, [p[:-3] for p in prompts])):
        again = greedy_generate(model, [prompts[i] for i, _ in rows], n, context=context, **args)
        assert again.tokens == gen.tokens
        assert torch.equal(again.top1, gen.top1)
    with pytest.raises(HeadlensError, match="prefilled clean"):
        greedy_generate(model, prompts, n, ablate=[heads, []], context=context)


@pytest.mark.parametrize("which", ["planted", "llama", pytest.param("smollm", marks=pytest.mark.real)])
def test_continuation_logits_match_the_bridge(which, planted, request):
    """Teacher-forced logits of rows continuing a clean context, heads uniform from the context's end on,
    equal the bridge's eager run of the whole sequence with those pattern rows uniform (the planted
    GPT-2 runs through the bridge with the same rows made uniform, batched)."""
    model, prompts, heads = decoding_case(which, planted, request)
    ids, answer = prompts[0], prompts[1][1:5]
    variants = [heads, heads[1:], []]
    context = prefill_context(model, [ids[:-1]]) if uses_native(model) else None
    got = continuation_logits(model, [ids + answer] * 3, len(answer) + 1, variants, context)
    if context is not None:
        assert torch.equal(got, continuation_logits(model, [ids + answer] * 3, len(answer) + 1, variants))
    start = len(ids) - 1
    for row, hs in enumerate(variants):
        with torch.no_grad():
            ref = model.bridge.run_with_hooks(torch.tensor([ids + answer]), fwd_hooks=uniform_from(model, hs, start))
        ref = torch.log_softmax(ref[0, start:].float(), -1)
        assert torch.allclose(torch.log_softmax(got[row].float(), -1), ref, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """A random-weight tiny Gemma 3 whose first layer attends to a sliding window of 4 tokens."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from planted import make_tokenizer, save

    torch.manual_seed(0)
    hf = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=0, eos_token_id=0, pad_token_id=0))
    folder = tmp_path_factory.mktemp("tiny_gemma3")
    save(hf.eval(), make_tokenizer(32, folder), folder)
    return load_model(str(folder))


def test_sliding_window_layers_record_positions(tiny_gemma3):
    """A sliding-window layer's cache holds only its window: the top-1 key is mapped back to its position
    in the prompt (it was read as a column of the window), clean and with a full-attention layer's head
    made uniform, over the prompt or only while answering."""
    model = tiny_gemma3
    prompts = [[0, 5, 9, 3, 17, 5, 9, 3, 22, 4, 5], [0, 7, 7, 2, 30, 11]]
    n = 5
    for heads, ablate_prompt in (([], True), ([(1, 3)], True), ([(1, 3)], False)):
        gen = greedy_generate(model, prompts, n, ablate=[heads] * 2, record_top1=True, ablate_prompt=ablate_prompt)
        for i, ids in enumerate(prompts):
            tokens, top1 = plain_decode(model, ids, n, heads, start=None if ablate_prompt else len(ids) - 1)
            assert gen.tokens[i] == tokens
            assert torch.equal(gen.top1[:, :, i], top1)
        assert bool((gen.top1[1:, 0] > 4).any())     # decoding steps attend past the first window


def test_cache_buffer_writes_in_place_and_grows():
    """The KV-cache layer writes new tokens into a buffer (grown when full): the same tensors as
    concatenating them, and a held start (a prefix) is not changed."""
    from headlens.methods.generation import _layer_class

    layer = _layer_class()(capacity=3)
    start = torch.randn(2, 3, 2, 4)
    layer.hold(start, -start)
    kept = start.clone()
    parts = [torch.randn(2, 3, n, 4) for n in (1, 2, 1, 3)]
    for p in parts:
        keys, values = layer.update(p, -p)
    assert torch.equal(keys, torch.cat([start] + parts, 2)) and torch.equal(values, -keys)
    assert layer.get_seq_length() == 9 and torch.equal(start, kept)


@pytest.mark.parametrize("which", ["planted", "llama", pytest.param("smollm", marks=pytest.mark.real)])
def test_prefix_reuse_matches_independent_runs(which, planted, request):
    """Rows that start from a prefilled prefix's KV cache (cut at different points, batched) decode the
    same tokens with the same top-1 positions as each prompt alone; also with heads ablated."""
    if which == "planted":
        model = planted[0]
        base = encode_prompt(model, "t3 t9 t4 t8 t5 t7 t6 t20 t21 t22 t1 t2 t20", False)[0]
        prompts = [base, base[:4] + base[7:], base[:6] + [9] + base[6:]]
        heads = [RETRIEVAL_HEAD]
    elif which == "llama":
        model = request.getfixturevalue("tiny_llama")
        base = [0, 5, 9, 3, 17, 5, 9, 3, 22, 4, 5, 8, 1, 30, 9, 3]
        prompts = [base, base[:4] + base[7:], base[:6] + [9] + base[6:]]
        heads = [(1, 0), (2, 3)]
    else:
        model = request.getfixturevalue("smollm")
        text = "The secret code is 4412. Alice was beginning to get very tired. What is the secret code?"
        base = encode_prompt(model, text)[0]
        prompts = [base, base[:12] + base[15:], base[:9] + base[3:9] + base[9:]]
        heads = [(17, 3), (18, 7)]
    n = 4
    alone = {}
    for h in ([], heads):
        prefix = prefill(model, base[:-2], ablate=h)
        shared = greedy_generate(model, prompts, n, ablate=[h] * 3, record_top1=True, prefix=prefix)
        for i, ids in enumerate(prompts):
            alone[i, bool(h)] = greedy_generate(model, [ids], n, ablate=[h], record_top1=True)
            assert shared.tokens[i] == alone[i, bool(h)].tokens[0]
            assert torch.equal(shared.top1[:, :, i], alone[i, bool(h)].top1[:, :, 0])
    # one prefix prefilled for several variants (a row each), rows picking theirs by their heads
    prefix = prefill(model, base[:-2], variants=[heads, []])
    assert prefix.keys[0].shape[0] == 2
    rows = [(i, h) for h in (True, False) for i in range(3)]
    shared = greedy_generate(model, [prompts[i] for i, _ in rows], n, ablate=[heads if h else [] for _, h in rows],
                             record_top1=True, prefix=prefix)
    for row, key in enumerate(rows):
        assert shared.tokens[row] == alone[key].tokens[0]
        assert torch.equal(shared.top1[:, :, row], alone[key].top1[:, :, 0])
    # rows in the prefix's own order take its tensors without a copy; decoding leaves them unchanged
    before = [k.clone() for k in prefix.keys]
    shared = greedy_generate(model, [prompts[1], prompts[2]], n, ablate=[heads, []], record_top1=True,
                             prefix=prefix)
    for row, key in enumerate([(1, True), (2, False)]):
        assert shared.tokens[row] == alone[key].tokens[0]
        assert torch.equal(shared.top1[:, :, row], alone[key].top1[:, :, 0])
    assert all(torch.equal(a, b) for a, b in zip(before, prefix.keys))
    with pytest.raises(HeadlensError, match="same heads"):
        greedy_generate(model, prompts, n, prefix=prefill(model, base[:5], ablate=heads))


@pytest.mark.parametrize("which", ["planted", "llama"])
def test_chunked_prefill_matches_prefill_at_once(which, planted, request):
    """Prompts prefilled a few tokens at a time (the default for prompts over PREFILL_CHUNK tokens)
    decode the same tokens with the same top-1 positions as prefilled at once, batched, left-padded
    and with heads made uniform."""
    from headlens.methods.generation import PREFILL_CHUNK

    assert PREFILL_CHUNK == 8192
    if which == "planted":
        model = planted[0]
        base = encode_prompt(model, "t3 t9 t4 t8 t5 t7 t6 t20 t21 t22 t1 t2 t20", False)[0]
        heads = [RETRIEVAL_HEAD]
    else:
        model = request.getfixturevalue("tiny_llama")
        base = [0, 5, 9, 3, 17, 5, 9, 3, 22, 4, 5, 8, 1, 30, 9, 3]
        heads = [(1, 0), (2, 3)]
    prompts = [base, base[:4] + base[7:]]
    for h in ([], heads):
        whole = greedy_generate(model, prompts, 4, ablate=[h] * 2, record_top1=True, chunk_tokens=0)
        for size in (3, 5):
            chunked = greedy_generate(model, prompts, 4, ablate=[h] * 2, record_top1=True, chunk_tokens=size)
            assert chunked.tokens == whole.tokens
            assert torch.equal(chunked.top1, whole.top1)


@pytest.mark.parametrize("which", ["planted", "llama"])
def test_batched_runs_match_one_at_a_time(which, planted, request):
    """decode_runs (shared filler prefilled once, runs of a length and depth batched) gives each run the
    same answer and top-1 positions as decoding it alone without a prefix."""
    folder = planted[1]
    model = planted[0] if which == "planted" else request.getfixturevalue("tiny_llama")
    det = planted_detector(folder)
    runs = needle_prompts(model, load_needles(str(folder / "needles.json")) * 3, (folder / "hay.txt").read_text(),
                          [30, 50], [0.0, 0.5, 1.0], False, det.params.plain_template)
    fast = decode_runs(model, runs, 4, stop_token_ids(model), 1 << 30)
    for run, tokens, top1 in fast:
        alone = greedy_generate(model, [run.tokens], 4, record_top1=True, stop_ids=stop_token_ids(model))
        assert tokens == alone.tokens[0]
        assert torch.equal(top1, alone.top1[:, :, 0])
    assert [r for r, _, _ in fast] == runs


@pytest.mark.real
def test_smollm_retrieval_heads_via_cli(tmp_path):
    """SmolLM2-135M-Instruct retrieves needles from ~250-token contexts; a few heads copy them, and
    making those heads' attention uniform breaks retrieval far more than random heads."""
    out = tmp_path / "cat.csv"
    r = headlens("scan", "smollm2-135m", "-d", "retrieval", "-o", str(out),
                 "-p", "retrieval.context_lengths=[250]", "-p", "retrieval.depths=[0.3, 0.7]",
                 "-p", "retrieval.n_needles=3", "-p", "retrieval.max_new_tokens=24",
                 "-p", "retrieval.top_k=5", "-p", "retrieval.n_random=3", "-p", "retrieval.causal_runs=2")
    assert r.returncode == 0, r.stderr
    assert "retrieval: top 10 heads" in r.stdout
    frame = pd.read_csv(out)
    meta = json.loads(out.with_suffix(".json").read_text())["detectors"]["retrieval"]
    assert meta["status"] == "ok" and meta["info"]["n_retrieved"] >= 3
    scores = frame.retrieval_score
    # Wu et al.: retrieval heads are sparse, under 5% of heads above 0.1 (llama-2-7b-80k: 33 of 1024).
    # A head earns 1/|needle| per copied token, so 0.1 needs real copying at any context length.
    assert scores.max() >= 0.1 and (scores >= 0.1).mean() < 0.05
    assert set(meta["info"]["claimed"]) == set(frame.head_id[scores >= 0.1])
    # The claimed heads are tested on the held-out needles (not those they were scored on) against random
    # heads of their layers: breaking retrieval far more than those. With 3 draws p cannot reach alpha, so
    # nothing is labelled, and the reason says so.
    c = meta["causal"]
    assert meta["info"]["confirmation_needles"] and c["tested"] == "claimed" and c["matched"]
    assert c["clean"] > 0.8
    assert c["top_k_ablated"] < c["random_k_ablated_mean"] - 0.2
    assert c["p_value"] >= 1 / 4 and not c["significant"]                 # 3 draws: p >= 1/4
    assert meta["labelled"] == [] and not frame.retrieval_label.any() and "not significant" in meta["reason"]


@pytest.mark.real
def test_causal_check_chunks_equal_one_batch(smollm):
    """The causal check's decoding in small pieces (one run per group, one variant per chunk, each group's
    prompts still prefilled once) gives each variant the same recall as all in one batch."""
    det = get_detector("retrieval", context_lengths=[200], depths=[0.5, 1.0], n_needles=1, max_new_tokens=16)
    p = det.params
    runs = needle_prompts(smollm, load_needles(p.needles)[:1], data_path(p.haystack).read_text(), [200],
                          [0.5, 1.0], True, p.template)
    variants = [[(17, 3), (18, 7), (18, 6)], [(2, 1), (9, 4), (25, 0)], [(23, 2)]]
    stops = stop_token_ids(smollm)
    whole = det.causal_values(smollm, variants, runs=runs, stops=stops)
    small = get_detector("retrieval", context_lengths=[200], depths=[0.5, 1.0], n_needles=1, max_new_tokens=16,
                         max_bytes=1).causal_values(smollm, variants, runs=runs, stops=stops)
    assert torch.equal(whole, small)
    assert whole.shape[0] == len(variants)                # [variant, run]: each run's recall
    assert len(whole.reshape(len(variants), -1).unique(dim=0)) > 1   # the ablations change the answers
