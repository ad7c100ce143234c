"""Bootstrap intervals, empirical p-values and the CausalCheck record (no model needed)."""
import math

import pytest
import torch

from headlens.detectors.base import self_repair, top_heads
from headlens.results import CausalCheck, format_causal
from headlens.stats import bootstrap_ci, empirical_p_value


def _items(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, generator=g)          # n prompts x [3 layers, 4 heads]


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    x = _items(20)
    lo, hi = bootstrap_ci(x, n_boot=500, seed=3)
    mean = x.mean(0)
    assert lo.shape == hi.shape == (3, 4)
    assert bool((lo <= mean).all() and (mean <= hi).all() and (lo < hi).all())
    lo2, hi2 = bootstrap_ci(x, n_boot=500, seed=3)
    assert lo.numpy().tobytes() == lo2.numpy().tobytes() and hi.numpy().tobytes() == hi2.numpy().tobytes()
    lo3, _ = bootstrap_ci(x, n_boot=500, seed=4)
    assert not torch.equal(lo, lo3)


def test_bootstrap_interval_shrinks_with_more_prompts():
    # Same distribution, 16x the items: the standard error falls 4x, so the width must fall well below half.
    small, large = _items(25, seed=1), _items(400, seed=2)
    w_small = torch.sub(*bootstrap_ci(small, 1000, 0)[::-1])
    w_large = torch.sub(*bootstrap_ci(large, 1000, 0)[::-1])
    assert bool((w_large < 0.5 * w_small).all())
    # And for uniform(0, 1) items its width is close to 2 * 1.96 * sqrt(1/12 / n).
    expected = 2 * 1.96 * math.sqrt(1 / 12 / 400)
    assert w_large.mean().item() == pytest.approx(expected, rel=0.15)


def test_bootstrap_matches_a_plain_loop():
    x = _items(12)[:, 0, 0]
    lo, hi = bootstrap_ci(x[:, None], n_boot=200, seed=0)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(12, (200, 12), generator=g)
    means = torch.stack([x[i].double().mean() for i in idx])
    ref = torch.nanquantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert lo.item() == pytest.approx(ref[0].item(), abs=1e-6) and hi.item() == pytest.approx(ref[1].item(), abs=1e-6)


def test_bootstrap_skips_nan_items():
    x = torch.tensor([[1.0], [float("nan")], [3.0]])
    lo, hi = bootstrap_ci(x, 300, 0)
    assert 1.0 <= lo.item() <= hi.item() <= 3.0


def test_empirical_p_value():
    assert empirical_p_value(5.0, [1, 2, 3, 4]) == pytest.approx(1 / 5)
    # a metric that could not be measured (NaN, e.g. no position to read) is no evidence: never p = 1/21
    assert math.isnan(empirical_p_value(float("nan"), [1, 2, 3, 4]))
    assert empirical_p_value(5.0, [1, float("nan"), 3, 4]) == pytest.approx(2 / 5)   # a NaN draw counts
    assert empirical_p_value(0.0, [1, 2, 3, 4]) == pytest.approx(5 / 5)
    assert empirical_p_value(2.0, [1, 2, 3, 4]) == pytest.approx(4 / 5)          # ties count
    assert empirical_p_value(0.5, [1, 2, 3, 4], higher_is_extreme=False) == pytest.approx(1 / 5)


def test_causal_check_record_round_trips_and_reads_old_records():
    c = CausalCheck(metric="loss", top_heads=["L1H2"], clean=1.0, top_k_ablated=3.0,
                    random_k_ablated=[1.0, 1.1, 3.0, 0.9], random_draws=[["L0H0"]] * 4, worse="higher",
                    ablation="mean", extra={"note": 1})
    assert c.p_value == pytest.approx(2 / 5) and c.n_as_extreme == 1
    d = c.to_dict()
    for key in ("metric", "k", "top_heads", "clean", "top_k_ablated", "random_k_ablated_mean",
                "random_k_ablated_std", "random_k_ablated", "random_draws", "p_value", "worse", "note"):
        assert key in d
    back = CausalCheck.from_dict(d)
    assert back.to_dict() == d
    old = {k: d[k] for k in ("metric", "k", "top_heads", "clean", "top_k_ablated", "random_k_ablated_mean",
                             "random_k_ablated_std", "random_k_ablated", "random_draws")}
    line = format_causal(old)
    assert "p = 0.4" in line and "top-1 ablated 3" in line
    lower = CausalCheck.from_dict({**d, "worse": "lower", "top_k_ablated": 0.5})
    assert lower.p_value == pytest.approx(1 / 5)


def test_top_heads_ranks_nan_last():
    s = torch.tensor([[0.1, float("nan")], [0.3, 0.2]])
    assert top_heads(s, 4) == [(1, 0), (1, 1), (0, 0), (0, 1)]


def test_self_repair_definition_and_guard():
    direct = torch.tensor([[2.0, 1.0, 0.01, -2.0]])
    total = torch.tensor([[1.0, 1.5, 0.5, -2.0]])
    sr = self_repair(direct, total)
    assert sr[0, 0].item() == pytest.approx(0.5)       # half repaired
    assert sr[0, 1].item() == pytest.approx(-0.5)      # amplified downstream
    assert math.isnan(sr[0, 2].item())                 # |direct| < 10% of the largest: no ratio
    assert sr[0, 3].item() == pytest.approx(0.0)
