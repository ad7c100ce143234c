"""Induction detector: planted ground truth, and SmolLM2-135M with its causal check."""
import math

import pytest
import torch

from headlens.catalogue import scan
from headlens.detectors import get_detector
from headlens.detectors.induction import induction_masks

from planted import INDUCTION_HEAD, PREV_TOKEN_HEAD


def test_masks_on_a_small_example():
    tokens = torch.tensor([[0, 5, 6, 7, 5, 6, 7]])
    after_copy, copy, queries = induction_masks(tokens, 4)
    # position 4 (token 5) should attend to position 2 (just after the earlier 5 at 1)
    assert after_copy[0, 4].nonzero().flatten().tolist() == [2]
    assert copy[0, 4].nonzero().flatten().tolist() == [1]
    assert queries.tolist() == [False] * 4 + [True] * 3


@pytest.fixture(scope="module")
def planted_result(planted_induction):
    det = get_detector("induction", seq_len=10, top_k=1, n_random=99)
    return scan(planted_induction, [det]).frame, det


def test_planted_heads_are_found(planted_result, planted_induction):
    frame, _ = planted_result
    ranked = frame.sort_values("induction_score", ascending=False)
    assert tuple(ranked.iloc[0][["layer", "head"]]) == INDUCTION_HEAD
    prev = frame.sort_values("induction_prev_token", ascending=False)
    assert tuple(prev.iloc[0][["layer", "head"]]) == PREV_TOKEN_HEAD
    labelled = frame[frame.induction_label]
    assert [tuple(x) for x in labelled[["layer", "head"]].values] == [INDUCTION_HEAD]
    row = frame[(frame.layer == 1) & (frame["head"] == 2)].iloc[0]
    assert row.induction_score > 0.8 and row.induction_copying > 0.5 and row.induction_ov_eigen > 0.9
    # Both heads of the circuit matter causally; the switched-off heads do not.
    assert row.induction_loss_rise > 0.3
    off = frame[~frame.head_id.isin(["L1H2", "L0H1"])]
    assert off.induction_loss_rise.abs().max() < 1e-5
    # Direct vs total. The induction head (last layer) acts through its own path: direct ~ total, little
    # repair. The previous-token head has no direct path at all (it acts through the induction head's
    # keys): no self-repair share (|direct| under the floors), and its compensation (direct - total) is
    # minus its whole loss rise: amplified downstream, never a NaN.
    assert row.induction_direct > 0.3 and abs(row.induction_self_repair) < 0.2
    assert row.induction_self_repair == pytest.approx(1 - row.induction_loss_rise / row.induction_direct)
    prev_row = frame[frame.head_id == "L0H1"].iloc[0]
    assert abs(prev_row.induction_direct) < 1e-4 and math.isnan(prev_row.induction_self_repair)
    assert prev_row.induction_compensation == pytest.approx(-prev_row.induction_loss_rise, abs=1e-4)
    assert prev_row.induction_compensation < -0.3
    assert (frame.induction_compensation - (frame.induction_direct - frame.induction_loss_rise)).abs().max() < 1e-5


def test_batched_loss_rise_equals_one_head_at_a_time(planted_induction, planted_result):
    """The detector's batched per-head sweep against plain run_with_hooks, one head per pass."""
    from headlens.detectors.induction import repeated_tokens
    from headlens.methods import loss_metric

    frame, det = planted_result
    p = det.params
    m = planted_induction
    tokens = repeated_tokens(m, p.n_seqs, p.seq_len, p.n_repeats, seed=0)[:p.causal_seqs, :1 + 2 * p.seq_len]
    mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
    mask[:, p.seq_len:] = True
    metric = loss_metric(tokens, mask)
    clean = metric(m.bridge(tokens))
    _, cache = m.bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    for layer, head in m.heads():
        mean = cache[f"blocks.{layer}.attn.hook_z"][:, 1:, head].mean((0, 1))   # start token left out

        def hook(z, hook, head=head, mean=mean):
            z[:, 1:, head] = mean                                                # the start keeps its own
            return z
        logits = m.bridge.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)])
        naive = float(metric(logits) - clean)
        row = frame[(frame.layer == layer) & (frame["head"] == head)].iloc[0]
        assert abs(row.induction_loss_rise - naive) < 1e-4


@pytest.fixture(scope="module")
def smollm_induction(smollm):
    return scan(smollm, [get_detector("induction")], seed=0)


@pytest.mark.real
def test_smollm2_top_induction_heads_matter_causally(smollm_induction):
    """The confirmation check tests the claimed set (every head passing the score rule, at most max_k)
    against 999 layer-matched random draws of as many heads, on held-out sequences; the labels are that
    set exactly when the check is significant at alpha."""
    cat = smollm_induction
    d = cat.meta["detectors"]["induction"]
    causal, params = d["causal"], d["params"]
    assert causal["n_random"] == params["n_random"] == 999 and len(causal["random_k_ablated"]) == 999
    assert causal["matched"] and causal["tested"] == "claimed" and causal["worse"] == "higher"
    assert causal["top_heads"] == d["info"]["claimed"][:params["max_k"]] and causal["k"] == len(causal["top_heads"])
    layers = {int(h[1:].split("H")[0]) for h in causal["top_heads"]}
    assert all({int(h[1:].split("H")[0]) for h in draw} <= layers for draw in causal["random_draws"])
    rise_top = causal["top_k_ablated"] - causal["clean"]
    rise_random = causal["random_k_ablated_mean"] - causal["clean"]
    # Ablating the claimed induction heads raises the held-out repeated-part loss far more than random heads
    # of the same layers, a decisive result at 999 draws: labels follow.
    assert rise_top > 1.0 and rise_top > 5 * max(rise_random, 0.05)
    assert causal["p_value"] <= params["alpha"] and causal["significant"]
    assert d["labelled"] == causal["top_heads"]
    # The effect on one scale: the share of the gap to the first-occurrence loss that the ablation removes.
    assert 0 < causal["effect_lo"] <= causal["effect"] <= causal["effect_hi"] <= 1.2


@pytest.mark.real
def test_smollm2_top_induction_heads_direct_and_total_effects(smollm_induction):
    """Direct vs total effect on the repeated-part loss. The strongest induction head hurts the loss
    both through its own path to the logits and in total; but the prefix-matching heads act mostly
    through later components (their total effect is far larger than their direct one), so the direct
    path alone would badly understate them. Self-repair is 1 - total / direct where the two effects share
    a sign and the direct effect is not negligible (>= 10% of the largest and >= 0.01 nats), NaN
    elsewhere; compensation (direct - total) wherever the direct effect was measured; each score has a
    bootstrap interval."""
    f = smollm_induction.frame
    top = f.sort_values("induction_score", ascending=False).head(5)
    best = top.iloc[0]
    assert best.induction_direct > 0 and best.induction_loss_rise > 0
    assert top.induction_loss_rise.sum() > 2 * top.induction_direct.sum()
    p = smollm_induction.meta["detectors"]["induction"]["params"]
    floor = max(p["repair_min_share"] * f.induction_direct.abs().max(), p["repair_min_direct"])
    defined = (f.induction_direct.abs() >= floor) & (f.induction_direct * f.induction_loss_rise >= 0)
    assert f.induction_self_repair[defined].notna().all() and f.induction_self_repair[~defined].isna().all()
    d = f[defined]
    assert ((1 - d.induction_loss_rise / d.induction_direct - d.induction_self_repair).abs() < 1e-3).all()
    assert (d.induction_self_repair <= 1).all()
    measured = f.induction_direct.notna()
    assert f.induction_compensation[measured].notna().all() and f.induction_compensation[~measured].isna().all()
    assert ((top.induction_score_lo <= top.induction_score) & (top.induction_score <= top.induction_score_hi)).all()
    assert (top.induction_score_hi - top.induction_score_lo < 0.3).all()


@pytest.mark.real
def test_smollm2_has_labelled_induction_heads_with_evidence(smollm_induction):
    f = smollm_induction.frame
    top = f.sort_values("induction_score", ascending=False).head(5)
    assert top.induction_score.min() > 0.4
    labelled = f[f.induction_label]
    assert len(labelled) >= 1
    assert (labelled.induction_score >= 0.4).all()
    # Induction heads sit in the middle/late layers, never in layer 0 (they need a previous-token head).
    assert labelled.layer.min() > 0
    # The sparse role: most heads are not induction heads.
    assert len(labelled) < 0.1 * len(f)
    # The single-head causal evidence agrees on average: top heads raise the loss more than the rest.
    assert top.induction_loss_rise.mean() > f.induction_loss_rise.median() + 0.1
    # Copying, rank-based (chance 0.5): every labelled head copies better than chance (its q-value), and a
    # head that matches prefixes but copies at chance is not labelled: the label claims both.
    info = smollm_induction.meta["detectors"]["induction"]["info"]
    alpha = smollm_induction.meta["detectors"]["induction"]["params"]["alpha"]
    assert info["copying_chance"] == 0.5 and f.induction_copying.between(0, 1).all()
    assert (labelled.induction_copying > 0.5).all() and (labelled.induction_copying_q <= alpha).all()
    assert not f[f.induction_copying_q > alpha].induction_label.any()


@pytest.fixture(scope="module")
def planted_llama(tmp_path_factory):
    from headlens import load_model

    from planted import llama_induction_model

    model = load_model(str(llama_induction_model(tmp_path_factory.mktemp("llama_induction"))))
    return model, get_detector("induction", seq_len=10, top_k=1, n_random=99).run(model, seed=0)


def test_planted_llama_induction_head_ranked_first(planted_llama):
    """RMSNorm, rotary, grouped-query attention and an MLP0: the planted head still comes first."""
    from planted import LLAMA_INDUCTION_HEAD, LLAMA_PREV_TOKEN_HEAD

    model, res = planted_llama
    assert model.info.architecture == "LlamaForCausalLM" and model.info.n_kv_heads == 2
    top = res.top(2)
    assert tuple(top.iloc[0][["layer", "head"]]) == LLAMA_INDUCTION_HEAD
    assert res.labelled == [LLAMA_INDUCTION_HEAD]
    f = res.frame.set_index(["layer", "head"])
    row = f.loc[LLAMA_INDUCTION_HEAD]
    assert row.induction_score > 0.9 and row.induction_ov_eigen > 0.9 and row.induction_loss_rise > 0.3
    # The head shares its key/value head with L1H3, whose query and output are zero: nothing there.
    assert f.loc[(1, 3)].induction_score < 0.2 and f.loc[(1, 3)].induction_copying < 0.1
    assert f.induction_prev_token.idxmax() == LLAMA_PREV_TOKEN_HEAD


def test_copying_column_against_its_chance_level(planted_result, planted_llama):
    """Rank-based copying: near 1 for a pure copying head, with a q-value far below alpha; heads that copy
    nothing (planted zero heads: every logit ties, and ties count against the token) sit at the bottom,
    never significant; chance is 0.5 (a random token's median rank is half the vocabulary)."""
    for frame, info in ((planted_result[0], None), (planted_llama[1].frame, planted_llama[1].info)):
        f = frame.set_index(["layer", "head"])
        assert f.loc[(1, 2)].induction_copying > 0.9 and f.loc[(1, 2)].induction_copying_q < 1e-6
        assert f.loc[(1, 2)].induction_copying_top1pct > 0.5 or len(f) < 200
        off = f.drop([(1, 2)])
        assert off.induction_copying.max() < 0.5 and off.induction_copying_q.min() > 0.01
        if info is not None:
            assert info["copying_chance"] == 0.5 and info["copying_top1pct_chance"] == 0.01


def test_a_failed_confirmation_labels_nothing(planted_induction):
    """The planted head passes the score rule, but a confirmation check that cannot reach alpha (6 random
    draws: p >= 1/7) labels nothing and says why; the candidates still show."""
    res = get_detector("induction", seq_len=10, top_k=1, n_random=6).run(planted_induction, seed=0)
    assert res.labelled == [] and "not significant" in res.reason
    assert res.info["claimed"] == ["L1H2"] and res.causal.tested == "claimed"
    assert res.causal.p_value == pytest.approx(1 / 7) and not res.causal.significant
    assert res.heads(1) == [(1, 2)]


def test_a_decoy_with_the_same_score_and_no_causal_role_is_not_labelled(tmp_path):
    """L1H3 attends exactly as the planted induction head (the same prefix score) but writes nothing: the
    planted head is labelled, the decoy is not (it copies nothing; ablating it changes no loss)."""
    from headlens import load_model

    from planted import DECOY_HEAD, induction_model

    model = load_model(str(induction_model(tmp_path / "decoy", decoy=True)))
    res = get_detector("induction", seq_len=10, top_k=1, n_random=99).run(model, seed=0)
    f = res.frame.set_index(["layer", "head"])
    assert f.loc[DECOY_HEAD].induction_score == pytest.approx(f.loc[INDUCTION_HEAD].induction_score, abs=1e-5)
    assert res.labelled == [INDUCTION_HEAD] and res.causal.significant
    assert f.loc[DECOY_HEAD].induction_copying_q > 0.01 and abs(f.loc[DECOY_HEAD].induction_loss_rise) < 1e-4


def test_confirmation_runs_on_held_out_sequences(planted_induction):
    """The confirmation check's sequences are not the discovery ones; its random heads come from the
    claimed heads' layers; the effect is a fraction of the first-occurrence loss gap, with an interval."""
    res = get_detector("induction", seq_len=10, top_k=1, n_random=99).run(planted_induction, seed=0)
    c = res.causal
    assert c.matched and all(d[0].startswith("L1H") for d in c.random_draws)   # layer 1, like L1H2
    assert c.n_units == 4 and c.clean < c.top_k_ablated and c.significant
    assert 0.3 < c.effect <= 1.2 and c.effect_lo <= c.effect <= c.effect_hi
    from headlens.detectors.induction import repeated_tokens
    p = get_detector("induction", seq_len=10).params
    discovery = repeated_tokens(planted_induction, p.n_seqs, 10, p.n_repeats, 0)[:, 1:11]
    confirm = repeated_tokens(planted_induction, p.confirm_seqs, 10, p.confirm_repeats, 7919)[:, 1:11]
    assert not any(torch.equal(a, b) for a in discovery for b in confirm)


def test_eigenvalues_in_threads_equal_one_matrix_at_a_time(monkeypatch):
    """The OV eigenvalues spread over threads (one LAPACK thread each) equal each matrix's alone, and the
    process keeps its thread count."""
    from headlens.detectors.induction import eigvals_cpu

    m = torch.randn(7, 12, 12, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(3)), raising=False)   # 3 workers
    got = eigvals_cpu(m)
    assert torch.get_num_threads() == threads
    for i in range(len(m)):
        assert torch.equal(got[i], torch.linalg.eigvals(m[i:i + 1])[0])


def test_draws_in_two_stages(planted_induction):
    """The first ``candidate_draws`` draws decide whether the rest are run: a set that cannot reach alpha
    over them stops there (6 draws: p >= 1/7); one that can gets all ``n_random`` (the same first draws)."""
    stop = get_detector("induction", seq_len=10, top_k=1, n_random=999, candidate_draws=6).run(planted_induction)
    assert stop.causal.n_random == 6 and stop.causal.p_value == pytest.approx(1 / 7) and stop.labelled == []
    go = get_detector("induction", seq_len=10, top_k=1, n_random=50, candidate_draws=20,
                      alpha=0.05).run(planted_induction)
    assert go.causal.n_random == 50 and go.causal.p_value == pytest.approx(1 / 51) and go.labelled == [(1, 2)]
    assert go.causal.random_draws[:6] == stop.causal.random_draws
    assert go.causal.random_k_ablated[:6] == pytest.approx(stop.causal.random_k_ablated)
