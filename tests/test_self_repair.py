"""Direct vs total effect (self-repair) and the causal check's p-value, on planted models and SmolLM2."""
import math

import pytest
import torch

from headlens.detectors import get_detector
from headlens.detectors.base import compensation, self_repair
from headlens.detectors.induction import repeated_tokens
from headlens.methods import ablate, clean_run, direct_effects, direct_logit_attribution, loss_metric, z_name
from headlens.methods.metrics import logit_diff_metric
from headlens.methods.patching import uniform_z

from planted import INDUCTION_HEAD

NAN = float("nan")


def test_self_repair_only_where_the_effects_share_a_sign_and_direct_passes_both_floors():
    """Hand-made effects (positive = the head matters), one head per case; the largest |direct| is 2."""
    direct = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.5, -1.0],
                           [1.0, -1.0, 0.15, 0.005, 0.0, NAN]])
    total = torch.tensor([[0.5, 1.5, 0.0, -0.4, -0.1, -0.25],
                          [NAN, 0.3, 0.15, 0.005, 0.2, 1.0]])
    sr = self_repair(direct, total)                            # floors: 10% of 2 = 0.2, and 0.01
    expected = [[0.75,            # same sign: three quarters repaired
                 -0.5,            # same sign, |total| > |direct|: amplified downstream (kept, not clipped)
                 1.0,             # total 0: fully repaired
                 NAN,             # opposite signs: over-compensation, no share
                 NAN,             # opposite signs again
                 0.75],           # both negative (ablating helps, by both routes): same reading
                [NAN,             # total unknown
                 NAN,             # opposite signs
                 NAN,             # |direct| 0.15 < 10% of the largest
                 NAN,             # |direct| 0.005 < both floors
                 NAN,             # direct 0
                 NAN]]            # direct unknown
    torch.testing.assert_close(sr, torch.tensor(expected), equal_nan=True)
    assert (sr[~sr.isnan()] <= 1).all()                   # shared signs: never above 1
    # The absolute floor alone: with a tiny largest |direct| the relative floor passes everything.
    small_d, small_t = torch.tensor([[0.008, 0.004]]), torch.tensor([[0.004, 0.002]])
    assert self_repair(small_d, small_t).isnan().all()         # under 0.01 (nats)
    torch.testing.assert_close(self_repair(small_d, small_t, min_direct=0.001), torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(self_repair(direct, total, min_share=0.0, min_direct=0.0)[1, 2:4],
                               torch.tensor([0.0, 0.0]))
    # Compensation is direct - total in the metric's units wherever both exist, whatever the signs.
    comp = compensation(direct, total)
    both = ~(direct.isnan() | total.isnan())
    torch.testing.assert_close(comp[both], (direct - total)[both])
    assert comp[~both].isnan().all()
    assert comp[0, 3].item() == pytest.approx(1.4)            # over-compensated: more than direct itself
    assert comp[0, 1].item() == pytest.approx(-0.5)           # amplified: negative


def test_detector_repair_columns_use_the_parameters_floors():
    direct, total = torch.tensor([[1.0, 0.05, 0.02]]), torch.tensor([[0.5, 0.01, 0.01]])
    default = get_detector("induction").repair_columns(direct, total)
    assert set(default) == {"compensation", "self_repair"}
    assert math.isnan(default["self_repair"][0, 1].item())                  # 0.05 < 10% of 1.0
    torch.testing.assert_close(default["compensation"], direct - total)
    loose = get_detector("induction", repair_min_share=0.0, repair_min_direct=0.03).repair_columns(direct, total)
    torch.testing.assert_close(loose["self_repair"], torch.tensor([[0.5, 0.8, NAN]]), equal_nan=True)


@pytest.fixture(scope="module")
def planted_run(planted_induction):
    m = planted_induction
    tokens = repeated_tokens(m, 4, 10, 4, seed=0)
    mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
    mask[:, 10:] = True
    metric = loss_metric(tokens, mask)
    return clean_run(m, tokens), metric


def test_planted_causal_check_has_the_minimum_p_value(planted_induction, planted_run):
    run, metric = planted_run
    det = get_detector("induction", top_k=1, n_random=20)
    score = torch.zeros(planted_induction.n_layers, planted_induction.n_heads)
    score[INDUCTION_HEAD] = 1.0
    check = det.confirm(planted_induction, [INDUCTION_HEAD], score, 0, "loss", "higher", run=run, metric=metric)
    assert check.top_heads == ["L1H2"] and check.n_random == 20 and check.tested == "claimed"
    assert check.top_k_ablated > max(check.random_k_ablated)
    assert check.p_value == pytest.approx(1 / 21)
    assert "p = 0.0476" in check.format()


def test_planted_causal_check_of_a_switched_off_head_is_not_significant(planted_induction, planted_run):
    run, metric = planted_run
    det = get_detector("induction", top_k=1, n_random=20)
    score = torch.zeros(planted_induction.n_layers, planted_induction.n_heads)
    score[1, 0] = 1.0                                   # a head whose weights are all zero
    check = det.confirm(planted_induction, [], score, 0, "loss", "higher", run=run, metric=metric)
    assert check.tested == "best candidates" and check.top_heads == ["L1H0"]
    assert abs(check.top_k_ablated - check.clean) < 1e-5
    assert check.p_value > 0.5


def test_last_layer_direct_effect_equals_total_with_the_final_norm_frozen(planted_induction, planted_run):
    """In the planted model nothing follows layer 1 but the final LayerNorm (MLPs are zero): with its
    scale frozen at the clean value, a last-layer head's total ablation effect IS its direct effect."""
    m = planted_induction
    run, metric = planted_run
    direct = direct_effects(m, run, metric, "mean", batch_size=8)
    last = m.n_layers - 1
    for head in range(m.n_heads):
        mean = run.z[last][:, 1:, head].mean((0, 1))    # mean ablation leaves the start position out

        def ablate(z, hook, head=head, mean=mean):
            z = z.clone()
            z[:, 1:, head] = mean                       # ...of the mean and of what it replaces
            return z
        hooks = [(f"blocks.{last}.attn.hook_z", ablate),
                 ("ln_final.hook_scale", lambda s, hook: run.scale.to(s.dtype))]
        total = metric(m.bridge.run_with_hooks(run.tokens, fwd_hooks=hooks))
        assert float(direct[last, head]) == pytest.approx(float(total), abs=1e-4)
    # ...and only the induction head has a direct effect worth the name there.
    clean = float(metric(run.logits))
    assert float(direct[INDUCTION_HEAD]) - clean > 0.3


@pytest.mark.real
def test_zero_ablation_direct_effect_is_minus_the_heads_logit_attribution(smollm):
    """Batched direct effects (chunked, all heads) against the head-by-head DLA, an independent route:
    on a linear metric, zeroing a head on its direct path removes exactly its direct logit attribution."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1000, 5000, (3, 12), generator=g)
    correct, wrong = torch.tensor([11, 22, 33]) + 1000, torch.tensor([44, 55, 66]) + 1000
    run = clean_run(smollm, tokens)
    metric = logit_diff_metric(correct, wrong)
    direct = direct_effects(smollm, run, metric, "zero", batch_size=40, positions=slice(-1, None))
    dla = direct_logit_attribution(smollm, tokens, correct, wrong).heads[..., -1].mean(-1)   # [L, H]
    clean = float(metric(run.logits))
    torch.testing.assert_close(direct - clean, -dla.float().cpu(), atol=2e-3, rtol=1e-3)


@pytest.mark.real
def test_uniform_z_matches_the_ablated_forward_pass(smollm):
    """The uniform-attention output used for direct effects equals the head's z in a real forward pass
    with that head's attention made uniform (grouped-query attention: per query head)."""
    tokens = torch.randint(1000, 5000, (2, 9), generator=torch.Generator().manual_seed(1))
    run = clean_run(smollm, tokens)
    uz = uniform_z(smollm, run)
    kept = uniform_z(smollm, clean_run(smollm, tokens, keep_v=True))    # from the run's own values
    assert all(torch.equal(kept[l], uz[l]) for l in uz)
    for layer, head in [(3, 4), (17, 8)]:
        seen = {}
        with ablate(smollm, [(layer, head)], "uniform"):
            keep = lambda z, hook, seen=seen: seen.setdefault("z", z.clone())   # noqa: E731
            smollm.bridge.run_with_hooks(tokens, fwd_hooks=[(z_name(layer), keep)])
        torch.testing.assert_close(uz[layer][:, :, head].float(), seen["z"][:, :, head].float(),
                                   atol=1e-4, rtol=1e-4)
