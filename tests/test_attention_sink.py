"""Attention-sink detector: planted dormant and active sink heads, batched statistics against a plain
per-head loop, a failed confirmation, a model with no dormant head, and the check's "matter less" claim
through its records and checkpoints."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from headlens.detectors import get_detector
from headlens.results import CausalCheck, DetectorResult

from planted import SINK_ACTIVE_HEAD, SINK_DORMANT_HEAD, attention_sink_model, sink_text

SMALL = dict(seq_len=24, n_seqs=6, confirm_seqs=3, n_boot=200)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("sink_text") / "text.txt"
    path.write_text(sink_text(400))
    return str(path)


@pytest.fixture(scope="module")
def planted_sink(tmp_path_factory):
    from headlens import load_model

    return load_model(str(attention_sink_model(tmp_path_factory.mktemp("planted_sink") / "model")))


@pytest.fixture(scope="module")
def planted_result(planted_sink, corpus):
    return get_detector("attention_sink", corpus=corpus, n_random=99, **SMALL).run(planted_sink, seed=0)


def test_the_dormant_head_is_labelled_and_the_active_sink_is_not(planted_result):
    res = planted_result
    f = res.frame.set_index(["layer", "head"])
    dormant, active = f.loc[SINK_DORMANT_HEAD], f.loc[SINK_ACTIVE_HEAD]
    assert res.labelled == [SINK_DORMANT_HEAD] and res.reason == ""
    # the dormant head: all its attention on the sink, and a write far under its layer's average
    assert dormant.attention_sink_score > 0.99 and dormant.attention_sink_output_norm < 1e-3
    assert bool(dormant.attention_sink_dormant) and dormant.attention_sink_stability == 1.0
    # the active sink head: half its attention on the sink (a sink by Gu et al.'s 0.3) but it writes a lot
    assert 0.4 < active.attention_sink_score < 0.6 and active.attention_sink_output_norm > 1
    assert not bool(active.attention_sink_dormant) and active.attention_sink_stability == 0.0
    assert f.attention_sink_dormant.sum() == 1
    assert (f.attention_sink_score_lo <= f.attention_sink_score + 1e-6).all()
    assert (f.attention_sink_score <= f.attention_sink_score_hi + 1e-6).all()
    # layer 1 is all zero: uniform attention (mean 1/(q+1) over q = 1..24: no sink) and no output at all
    layer1 = f.loc[1]
    expected = float(np.mean([1 / (q + 1) for q in range(1, 25)]))
    assert np.allclose(layer1.attention_sink_score, expected, atol=1e-5)
    assert layer1.attention_sink_output_norm.isna().all() and not layer1.attention_sink_dormant.any()
    info = res.info
    assert info["n_sink_heads"] == 2 and info["sink_rate"] == 2 / 8 and info["n_dormant_heads"] == 1
    assert info["claimed"] == ["L0H0"] and set(info["delimiter_tokens"].values()) == {",", "."}
    assert info["interval_unit"] == "sequence" and info["interval_units"] == 6


def test_the_check_says_the_dormant_head_matters_less(planted_result):
    c = planted_result.causal
    assert c.tested == "claimed" and c.top_heads == ["L0H0"] and c.matched and c.n_units == 3
    assert c.worse == "lower" and c.claim == "less" and c.significant
    assert c.p_value == pytest.approx(1 / 100)                  # every draw changes the loss more
    assert all(d[0].startswith("L0H") for d in c.random_draws)  # layer-matched: layer 0, like L0H0
    assert c.clean == 0 and c.top_k_ablated < 1e-4 < min(c.random_k_ablated)
    assert c.z > 0 and "the heads matter less" in str(c) and "lower = the heads matter less" in c._repr_html_()
    assert math.isnan(c.effect)                                  # no floor for a loss change
    loss = planted_result.info["causal_loss_change"]
    assert abs(loss["tested_change"]) < 1e-4 and loss["clean_loss"] > 0


def test_batched_statistics_equal_a_plain_per_head_loop(planted_sink, planted_result, corpus):
    """Every column against run_with_cache and one head at a time; the check's tested value against a
    plain mean ablation with run_with_hooks (the dormant head, and the first random draw)."""
    from headlens.detectors.attention_sink import delimiter_ids
    from headlens.methods import text_chunks

    m, p = planted_sink, get_detector("attention_sink", **SMALL).params
    chunks = text_chunks(m, corpus, p.seq_len, p.n_seqs + p.confirm_seqs)
    tokens, confirm = chunks[:p.n_seqs], chunks[p.n_seqs:]
    delims = delimiter_ids(m.tokenizer, tokens)
    assert [m.tokenizer.decode([t]) for t in delims] == [",", "."]
    marks = torch.isin(tokens, torch.tensor(delims))
    marks[:, 0] = False
    _, cache = m.bridge.run_with_cache(tokens)
    f = planted_result.frame.set_index(["layer", "head"])
    norms = torch.zeros(m.n_layers, m.n_heads)
    for layer, head in m.heads():
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, head, 1:]              # [b, q, k]
        sink = pattern[:, :, 0].mean()
        delim = (pattern * marks[:, None, :]).sum(-1).mean()
        z = cache[f"blocks.{layer}.attn.hook_z"][:, 1:, head]                           # [b, q, d_head]
        norms[layer, head] = (z @ m.bridge.W_O[layer, head]).norm(dim=-1).mean()
        row = f.loc[(layer, head)]
        assert row.attention_sink_score == pytest.approx(float(sink), abs=1e-5)
        assert row.attention_sink_delimiter == pytest.approx(float(delim), abs=1e-5)
    for layer, head in m.heads():
        layer_mean = norms[layer].mean()
        expected = float(norms[layer, head] / layer_mean) if layer_mean > 0 else float("nan")
        got = f.loc[(layer, head)].attention_sink_output_norm
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # the confirmation's variants (the tested head, and the first random draw): each mean-ablated (start
    # position kept) on the held-out chunks with plain run_with_hooks
    clean = torch.log_softmax(m.bridge(confirm).float(), -1)
    _, zc = m.bridge.run_with_cache(confirm, names_filter=lambda n: n.endswith("hook_z"))
    targets = confirm[:, 2:, None]
    c = planted_result.causal
    for heads, value in ((c.top_heads, c.top_k_ablated), (c.random_draws[0], c.random_k_ablated[0])):
        hooks = []
        for name in heads:
            layer, head = map(int, name[1:].split("H"))
            mean = zc[f"blocks.{layer}.attn.hook_z"][:, 1:, head].mean((0, 1))

            def hook(z, hook, head=head, mean=mean):
                z[:, 1:, head] = mean
                return z
            hooks.append((f"blocks.{layer}.attn.hook_z", hook))
        ablated = torch.log_softmax(m.bridge.run_with_hooks(confirm, fwd_hooks=hooks).float(), -1)
        change = (clean[:, 1:-1].gather(-1, targets) - ablated[:, 1:-1].gather(-1, targets))[..., 0]
        assert value == pytest.approx(float(change.abs().mean(1).mean()), rel=1e-4, abs=1e-5)


def test_a_failed_confirmation_labels_nothing(planted_sink, corpus):
    """The dormant head passes the rule, but 6 random draws cannot reach alpha (p >= 1/7): nothing is
    labelled, the reason says why, and the candidates still show."""
    res = get_detector("attention_sink", corpus=corpus, n_random=6, **SMALL).run(planted_sink, seed=0)
    assert res.labelled == [] and "not significant" in res.reason
    assert res.info["claimed"] == ["L0H0"] and res.causal.tested == "claimed"
    assert res.causal.p_value == pytest.approx(1 / 7) and not res.causal.significant
    assert bool(res.frame.set_index(["layer", "head"]).loc[SINK_DORMANT_HEAD].attention_sink_dormant)
    assert res.heads(1) == [SINK_DORMANT_HEAD]                   # the strongest sink is the top row


def test_a_model_without_a_dormant_head_labels_nothing(tmp_path, corpus):
    from headlens import load_model

    model = load_model(str(attention_sink_model(tmp_path / "no_dormant", dormant=False)))
    res = get_detector("attention_sink", corpus=corpus, n_random=19, top_k=1, **SMALL).run(model, seed=0)
    f = res.frame.set_index(["layer", "head"])
    assert res.labelled == [] and res.info["n_dormant_heads"] == 0 and res.info["claimed"] == []
    assert "no head is dormant" in res.reason and not f.attention_sink_dormant.any()
    # the active sink head is still a sink, and the best candidate the check tests for the evidence
    assert res.info["n_sink_heads"] == 1 and f.loc[SINK_ACTIVE_HEAD].attention_sink_score > 0.4
    assert res.causal.tested == "best candidates" and res.causal.top_heads[0] == "L0H1"
    assert not res.causal.significant                             # it matters more than random heads, not less
    assert res.heads(1) == [SINK_ACTIVE_HEAD]


def test_a_claim_less_check_round_trips(tmp_path):
    """``claim`` is kept by the sidecar record and by a checkpoint; an older record without it reads as
    ``more``."""
    check = CausalCheck("mean |loss change|", ["L0H0"], 0.0, 1e-6, [0.2, 0.3, 0.1], [["L0H1"], ["L0H2"], ["L0H3"]],
                        worse="lower", ablation="mean", tested="claimed", matched=True, alpha=0.01, n_units=3,
                        claim="less", raw=torch.rand(5, 3, 2))
    assert "(lower = the heads matter less)" in str(check) and check.p_value == pytest.approx(1 / 4)
    record = check.to_dict()
    assert record["claim"] == "less" and CausalCheck.from_dict(record) == check
    old = {k: v for k, v in record.items() if k != "claim"}
    assert CausalCheck.from_dict(old).claim == "more" and "matter more" in str(CausalCheck.from_dict(old))
    frame = pd.DataFrame({"layer": [0], "head": [0], "x_score": [1.0], "x_dormant": [True]})
    result = DetectorResult("x", frame, [(0, 0)], causal=check)
    path = tmp_path / "x.pt"
    torch.save(result.to_state(), path)
    back = DetectorResult.from_state(torch.load(path, weights_only=True))
    assert str(back.causal) == str(check) and back.causal.claim == "less" and "matter less" in str(back.causal)
    assert torch.equal(back.causal.raw, check.raw) and back.causal.to_dict().keys() == record.keys()
    pd.testing.assert_frame_equal(back.frame, frame, check_exact=True)
    assert CausalCheck("m", [], 0.0, 1.0, [], []).claim == "more"


def test_the_catalogue_keeps_the_dormant_column(planted_sink, corpus, tmp_path):
    """Through a scan, the CSV and back: the bool column, the label and the sidecar's claim."""
    import headlens as hl
    from headlens.catalogue import read_catalogue

    det = get_detector("attention_sink", corpus=corpus, n_random=99, **SMALL)
    cat = hl.scan(planted_sink, [det], seed=0, progress=False)
    assert cat.frame.attention_sink_dormant.dtype == bool
    assert cat.heads("attention_sink", labelled=True) == [SINK_DORMANT_HEAD]
    cat.to_csv(tmp_path / "cat.csv")
    back = read_catalogue(tmp_path / "cat.csv")
    assert back.frame.attention_sink_dormant.tolist() == cat.frame.attention_sink_dormant.tolist()
    assert back["attention_sink"].causal.claim == "less"


def test_planted_llama_dormant_head(tmp_path, corpus):
    """The same roles in a Llama-style model (RMSNorm, rotary, grouped-query attention: the dormant and the
    active sink head share one key/value head)."""
    from headlens import load_model

    from planted import llama_attention_sink_model

    model = load_model(str(llama_attention_sink_model(tmp_path / "llama_sink")))
    res = get_detector("attention_sink", corpus=corpus, n_random=99, **SMALL).run(model, seed=0)
    f = res.frame.set_index(["layer", "head"])
    dormant, active = f.loc[SINK_DORMANT_HEAD], f.loc[SINK_ACTIVE_HEAD]
    assert res.labelled == [SINK_DORMANT_HEAD] and res.causal.significant and res.causal.claim == "less"
    assert dormant.attention_sink_score > 0.99 and dormant.attention_sink_output_norm < 1e-3
    assert active.attention_sink_score > 0.3 and active.attention_sink_output_norm > 1
    assert not bool(active.attention_sink_dormant) and res.info["n_dormant_heads"] == 1


def test_bad_settings_are_one_line_errors(planted_sink, corpus, tmp_path):
    from headlens.errors import HeadlensError

    with pytest.raises(HeadlensError, match="n_seqs >= 2"):
        get_detector("attention_sink", corpus=corpus, n_seqs=1).run(planted_sink)
    with pytest.raises(HeadlensError, match="context of"):
        get_detector("attention_sink", corpus=corpus, seq_len=40).run(planted_sink)     # 32 positions
    short = tmp_path / "short.txt"
    short.write_text(sink_text(60))
    with pytest.raises(HeadlensError, match="none is left for confirmation"):
        get_detector("attention_sink", corpus=str(short), **SMALL).run(planted_sink)
