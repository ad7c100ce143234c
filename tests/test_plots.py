"""Plot functions: figures carry the right numbers, on the planted induction model (known heads) and on
the embedded SmolLM2 (direct logit attribution checked against the bridge's own attention output)."""
import math

import numpy as np
import pytest
import torch

from headlens.catalogue import scan
from headlens.detectors import get_detector
from headlens.errors import HeadlensError
from headlens.plots import (
    attention_pattern,
    causal_check,
    compare_catalogues,
    head_heatmap,
    head_logit_attribution,
    logit_attribution_bars,
)

# BOS t3 t7 t5 t9 | t3 t7 t5 t9: the second copy's tokens sit 4 positions after the first.
REPEATED = "t3 t7 t5 t9 t3 t7 t5 t9"


def small_induction(**kw):
    return get_detector("induction", seq_len=8, n_repeats=3, n_seqs=4, copy_positions=3, causal_seqs=4,
                        top_k=1, n_random=99, **kw)


@pytest.fixture(scope="module")
def planted_cat(planted_induction):
    return scan(planted_induction, [small_induction()], seed=0)


def test_head_heatmap_places_every_head(planted_cat):
    frame = planted_cat.frame
    fig = head_heatmap(planted_cat, "induction_score")
    z, ids = np.asarray(fig.data[0].z, float), np.asarray(fig.data[0].customdata)
    assert z.shape == (2, 4)
    for row in frame.itertuples():
        assert z[row.layer, row.head] == pytest.approx(row.induction_score)
        assert ids[row.layer, row.head] == row.head_id
    assert "%{customdata}" in fig.data[0].hovertemplate
    # The labelled head (planted L1H2) is circled, and it is the hottest cell.
    assert list(fig.data[1].customdata) == ["L1H2"]
    assert np.unravel_index(np.nanargmax(z), z.shape) == (1, 2)
    # Any numeric column works, from a frame as well as a catalogue.
    prev = head_heatmap(frame, "induction_prev_token")
    assert np.nanargmax(np.asarray(prev.data[0].z, float)) == 1          # L0H1: the previous-token head


def test_head_heatmap_errors_and_empty(planted_cat):
    with pytest.raises(HeadlensError, match="no column 'nope'"):
        head_heatmap(planted_cat, "nope")
    with pytest.raises(HeadlensError, match="Catalogue or a per-head DataFrame"):
        head_heatmap([1, 2], "x")
    frame = planted_cat.frame.assign(empty_score=np.nan)
    fig = head_heatmap(frame, "empty_score")
    assert "no values" in fig.layout.annotations[0].text


def test_attention_pattern_shows_the_planted_induction(planted_induction):
    fig = attention_pattern(planted_induction, REPEATED, 1, 2)
    z = np.asarray(fig.data[0].z, float)
    x, y = list(fig.data[0].x), list(fig.data[0].y)
    assert x == y and len(x) == 9 and x[0].startswith("0:") and "t7" in x[2]
    assert np.isnan(z[np.triu_indices(9, 1)]).all()                     # future keys masked
    assert np.allclose(np.nansum(z, 1), 1, atol=1e-4)                   # each query's attention sums to 1
    for q in range(5, 9):                                               # second copy: after the first copy
        assert int(np.nanargmax(z[q])) == q - 3
    prev = np.asarray(attention_pattern(planted_induction, [0, 3, 7, 5], 0, 1).data[0].z, float)
    assert [int(np.nanargmax(prev[q])) for q in range(1, 4)] == [0, 1, 2]
    with pytest.raises(HeadlensError, match="no head L2H0 in"):
        attention_pattern(planted_induction, REPEATED, 2, 0)
    with pytest.raises(HeadlensError, match="context of 64 tokens"):
        attention_pattern(planted_induction, " ".join(["t3"] * 80), 1, 2)
    with pytest.raises(HeadlensError, match="empty"):
        attention_pattern(planted_induction, "", 1, 2)


def test_dla_finds_the_planted_copying_head(planted_induction):
    prompt = "t3 t7 t5 t9 t3 t7"                                         # next token should be t5
    dla = head_logit_attribution(planted_induction, prompt, "t5")
    assert dla.shape == (2, 4)
    assert tuple(np.unravel_index(int(dla.abs().argmax()), dla.shape)) == (1, 2) and dla[1, 2] > 1
    diff = head_logit_attribution(planted_induction, prompt, "t5", against="t9")
    assert diff[1, 2] > 1
    fig = logit_attribution_bars(planted_induction, prompt, "t5", top=3)
    assert list(fig.data[0].x)[0] == "L1H2" and len(fig.data[0].x) == 3
    assert fig.data[0].y[0] == pytest.approx(float(dla[1, 2]), rel=1e-5)
    with pytest.raises(HeadlensError, match="2 tokens"):
        head_logit_attribution(planted_induction, prompt, "t5 t9")
    with pytest.raises(HeadlensError, match="outside the vocabulary"):
        head_logit_attribution(planted_induction, prompt, 10_000)
    with pytest.raises(HeadlensError, match="outside the prompt"):
        head_logit_attribution(planted_induction, prompt, "t5", position=7)
    # Any position: at the first t3 (position 1) nothing has been seen twice, the induction head is idle.
    assert head_logit_attribution(planted_induction, prompt, "t7", position=1)[1, 2] < 0.5


def _layer_sums_match_attn_out(model, prompt, target_id):
    """Per-head DLA (batched over heads and layers) summed over a layer's heads (+ b_O) equals the
    layer's attention output from the bridge, projected the same way (the plain, unsplit version)."""
    b = model.bridge
    dla = head_logit_attribution(model, prompt, target_id)
    tokens = model.to_tokens(prompt)
    names = {f"blocks.{l}.hook_attn_out" for l in range(model.n_layers)} | {"ln_final.hook_scale"}
    _, cache = b.run_with_cache(tokens, names_filter=lambda n: n in names)
    scale = cache["ln_final.hook_scale"][0, -1].float()
    w = b.W_U[:, target_id].float()
    b_o = getattr(b, "b_O", None)
    for l in range(model.n_layers):
        expected = float((cache[f"blocks.{l}.hook_attn_out"][0, -1].float() / scale) @ w)
        got = float(dla[l].sum()) + (float((b_o[l].float() / scale) @ w) if b_o is not None else 0.0)
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-3), l
    return dla


def test_dla_matches_attention_output_planted(planted_induction):
    _layer_sums_match_attn_out(planted_induction, "t3 t7 t5 t9 t3 t7", 5)


@pytest.mark.real
def test_plots_on_smollm(smollm):
    prompt = "The capital of France is"
    paris = smollm.tokenizer.encode(" Paris", add_special_tokens=False)
    assert len(paris) == 1
    dla = _layer_sums_match_attn_out(smollm, prompt, paris[0])
    assert dla.shape == (30, 9) and torch.isfinite(dla).all()
    fig = logit_attribution_bars(smollm, prompt, " Paris", top=None)
    assert len(fig.data[0].x) == 270
    assert fig.data[0].y[0] == pytest.approx(float(dla.flatten()[dla.abs().flatten().argmax()]), rel=1e-4)
    att = attention_pattern(smollm, prompt, 5, 3)
    tokens = smollm.to_tokens(prompt)[0]
    assert len(att.data[0].x) == len(tokens)
    assert all(repr(smollm.tokenizer.decode([int(t)]))[:10] in lab for t, lab in zip(tokens, att.data[0].x))
    assert np.allclose(np.nansum(np.asarray(att.data[0].z, float), 1), 1, atol=1e-3)


def test_causal_check_figure(planted_cat):
    c = planted_cat.meta["detectors"]["induction"]["causal"]
    fig = causal_check(c)
    bars, points = fig.data
    assert list(bars.y[:2]) == pytest.approx([c["clean"], c["top_k_ablated"]])
    assert bars.y[2] == pytest.approx(np.mean(c["random_k_ablated"]))
    assert list(points.y) == pytest.approx(c["random_k_ablated"])
    assert list(points.customdata) == [", ".join(d) for d in c["random_draws"]]
    assert fig.layout.yaxis.title.text == c["metric"]
    # The planted induction head matters more than a random head for the repeated-part loss.
    assert c["top_heads"] == ["L1H2"] and c["top_k_ablated"] > max(c["random_k_ablated"]) - 1e-6
    with pytest.raises(HeadlensError, match="no causal check"):
        causal_check({})


def test_compare_catalogues(planted_induction, planted_cat):
    other = scan(planted_induction, [small_induction()], seed=1)
    fig = compare_catalogues(planted_cat, other, "induction", labels=("seed 0", "seed 1"))
    pts = fig.data[1]
    assert len(pts.x) == 8 and "L1H2" in list(pts.customdata)
    i = list(pts.customdata).index("L1H2")
    a = planted_cat.frame.set_index("head_id")["induction_score"]
    b = other.frame.set_index("head_id")["induction_score"]
    assert (pts.x[i], pts.y[i]) == pytest.approx((a["L1H2"], b["L1H2"]))
    assert not math.isclose(a["L0H0"], b["L0H0"]) or not math.isclose(a["L1H2"], b["L1H2"])
    diff = compare_catalogues(planted_cat, other, "induction", kind="difference")
    z = np.asarray(diff.data[0].z, float)
    assert z[1, 2] == pytest.approx(b["L1H2"] - a["L1H2"])
    same = np.asarray(compare_catalogues(planted_cat, planted_cat, "induction", kind="difference").data[0].z)
    assert np.allclose(same.astype(float), 0)
    with pytest.raises(HeadlensError, match="no role 'successor'"):
        compare_catalogues(planted_cat, other, "successor")
    with pytest.raises(HeadlensError, match="unknown comparison kind"):
        compare_catalogues(planted_cat, other, "induction", kind="pie")


def test_composition_heatmap(planted_induction):
    from headlens import composition
    from headlens.plots import composition_heatmap

    scores = np.array([[0.1, np.nan, 0.25], [0.3, 0.2, np.nan]])
    fig = composition_heatmap(scores, [(0, 1), "L1H0"], ["L1H2", (2, 0), (2, 3)], kind="k", baseline=0.05)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z, float), scores)        # NaN cells stay blank
    assert list(fig.data[0].y) == ["L0H1", "L1H0"] and list(fig.data[0].x) == ["L1H2", "L2H0", "L2H3"]
    assert fig.layout.xaxis.title.text == "reader head" and fig.layout.yaxis.title.text == "writer head"
    assert fig.layout.title.text == "K-composition (random-matrix baseline 0.05)"
    with pytest.raises(HeadlensError, match=r"scores must be \[n_writers=2, n_readers=2\]"):
        composition_heatmap(scores, ["L0H1", "L1H0"], ["L1H2", "L2H0"], kind="k")
    with pytest.raises(HeadlensError, match="kind must be 'q', 'k' or 'v'"):
        composition_heatmap(scores, ["L0H1", "L1H0"], ["L1H2", "L2H0", "L2H3"], kind="x")
    # from a Composition: its scores, heads, kind and baseline
    comp = composition(planted_induction, "q", readers=[(1, 2)], n_samples=4)
    fig = composition_heatmap(comp)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z, float), comp.scores.numpy())
    assert list(fig.data[0].y) == [f"L{l}H{h}" for l, h in comp.writers] and list(fig.data[0].x) == ["L1H2"]
    assert fig.layout.title.text.startswith("Q-composition (random-matrix baseline")
