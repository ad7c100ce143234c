"""Bootstrap intervals, empirical p-values and the CausalCheck record (no model needed)."""
import math

import pytest
import torch

from headlens.detectors.base import self_repair, top_heads
from headlens.results import CausalCheck, format_causal
from headlens.stats import bootstrap_ci, bootstrap_t_ci, empirical_p_value


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


# Coverage by simulation: the simulated data sets are the trailing ("heads") dimension, so one call
# computes all their intervals with one shared resample matrix. The smallest default numbers of units:
# retrieval 6 needles (6 x 1 length x 3 depths), induction 10 sequences, safety up to 16 requests.
N_SETS = 2000


def _draw(kind: str, n: int, seed: int = 1) -> tuple[torch.Tensor, float]:
    """``[n, N_SETS]`` items of a skewed distribution and its true mean."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, N_SETS, generator=g, dtype=torch.float64)
    if kind == "cube":        # a skewed fraction in [0, 1]: U^3 = Beta(1/3, 1), mean 1/4
        return u ** 3, 0.25
    if kind == "exponential":
        return -torch.log(u), 1.0
    if kind == "lognormal":   # sigma 0.5
        z = torch.randn(n, N_SETS, generator=g, dtype=torch.float64)
        return torch.exp(0.5 * z), math.exp(0.125)
    if kind == "bernoulli":   # 0/1 scores (hits), p = 0.3
        return (u < 0.3).double(), 0.3
    raise ValueError(kind)


def _coverage(lo, hi, mu) -> float:
    return float(((lo <= mu) & (mu <= hi)).double().mean())


@pytest.mark.parametrize("kind,n", [("cube", 6), ("cube", 10), ("exponential", 10), ("lognormal", 10),
                                    ("bernoulli", 10)])
def test_bootstrap_t_covers_at_small_n(kind, n):
    x, mu = _draw(kind, n)
    lo, hi = bootstrap_t_ci(x, 1000, 0)
    assert _coverage(lo, hi, mu) >= 0.93


def test_percentile_undercovers_where_bootstrap_t_does_not():
    # 6 units of a skewed fraction (retrieval's 6 needles): the percentile interval is too narrow.
    x, mu = _draw("cube", 6)
    assert _coverage(*bootstrap_ci(x, 1000, 0), mu) < 0.88
    assert _coverage(*bootstrap_t_ci(x, 1000, 0), mu) >= 0.93


def test_clustered_items_need_cluster_resampling():
    # Retrieval's shape: 6 needles x 3 runs (depths) whose scores share most of their value (the needle's
    # skewed score plus a little run noise). Resampling the 18 runs as if independent undercovers badly;
    # resampling whole needles covers. 4000 data sets: the coverage is measured to +-0.004.
    n_sets = 2 * N_SETS
    g = torch.Generator().manual_seed(5)
    needle = torch.rand(6, 1, n_sets, generator=g, dtype=torch.float64) ** 3
    x = (needle + 0.05 * torch.randn(6, 3, n_sets, generator=g, dtype=torch.float64)).reshape(18, n_sets)
    groups = [i // 3 for i in range(18)]
    assert _coverage(*bootstrap_t_ci(x, 1000, 0), 0.25) < 0.8
    assert _coverage(*bootstrap_ci(x, 1000, 0), 0.25) < 0.7
    assert _coverage(*bootstrap_t_ci(x, 1000, 0, groups=groups), 0.25) >= 0.93


def test_stratified_clusters_cover():
    # Successor's shape: the score is the mean over tasks (strata) of the fraction of pairs that hit; the
    # unit is the task word with its spellings (1-3 pairs of one word, correlated). 3 tasks of 7 words.
    g = torch.Generator().manual_seed(7)
    strata, groups, rows = [], [], []
    truth = 0.0
    for task, p_word in enumerate((0.3, 0.6, 0.8)):
        for word in range(7):
            spellings = 1 + (word % 3)
            hit = torch.rand(1, N_SETS, generator=g, dtype=torch.float64) < p_word      # the word's outcome
            flip = torch.rand(spellings, N_SETS, generator=g, dtype=torch.float64) < 0.1  # a spelling differs
            rows.append((hit ^ flip).double())
            strata += [task] * spellings
            groups += [(task, word)] * spellings
        truth += (p_word * 0.9 + (1 - p_word) * 0.1) / 3
    x = torch.cat(rows)
    lo, hi = bootstrap_t_ci(x, 1000, 0, groups=groups, strata=strata, bounds=(0, 1))
    assert _coverage(lo, hi, truth) >= 0.93
    assert bool(((lo >= 0) & (hi <= 1)).all())


def test_bootstrap_t_shape_seed_nan_and_degenerate_units():
    x = _items(10)
    lo, hi = bootstrap_t_ci(x, 500, 3)
    mean = x.mean(0)
    assert lo.shape == hi.shape == (3, 4) and bool(((lo < mean) & (mean < hi)).all())
    lo2, hi2 = bootstrap_t_ci(x, 500, 3)
    assert lo.numpy().tobytes() == lo2.numpy().tobytes() and hi.numpy().tobytes() == hi2.numpy().tobytes()
    assert not torch.equal(lo, bootstrap_t_ci(x, 500, 4)[0])
    # a NaN item is left out of every resample's mean (its unit has no items)
    nan_row = torch.full((1, 3, 4), float("nan"))
    lo3, hi3 = bootstrap_t_ci(torch.cat([x[:5], nan_row, x[5:]]), 500, 3)
    assert bool(((lo3 <= mean) & (mean <= hi3)).all())
    # identical units: the point; one unit with items: no interval; a fraction clipped to [0, 1]
    flat = torch.tensor([[1.0, 0.0, float("nan"), 0.0], [1.0, 0.0, float("nan"), 1.0]]).repeat(3, 1)
    lo4, hi4 = bootstrap_t_ci(flat, 500, 0, bounds=(0, 1))
    assert lo4[:2].tolist() == [1.0, 0.0] and hi4[:2].tolist() == [1.0, 0.0]
    assert math.isnan(lo4[2]) and 0 <= lo4[3] < 0.5 < hi4[3] <= 1
    one_unit = bootstrap_t_ci(flat[:, :2], 500, 0, groups=[0] * 6)
    assert torch.isnan(one_unit[0]).all()
    # a group cannot span strata
    with pytest.raises(ValueError):
        bootstrap_t_ci(flat, 10, 0, groups=[0, 0, 1, 1, 2, 2], strata=[0, 1, 1, 1, 2, 2])


def test_bootstrap_t_clusters_match_a_plain_loop():
    # One head: unequal clusters, the statistic is the mean over items; t* from a loop over resamples.
    g = torch.Generator().manual_seed(2)
    x = torch.rand(9, generator=g, dtype=torch.float64) ** 2
    groups = [0, 0, 0, 1, 2, 2, 3, 4, 4]
    lo, hi = bootstrap_t_ci(x[:, None], 400, 11, groups=groups)

    def mean_se(w):                       # w: weight per cluster
        c = torch.tensor(groups)
        tot = torch.zeros(5, dtype=torch.float64).index_add_(0, c, x)
        cnt = torch.zeros(5, dtype=torch.float64).index_add_(0, c, torch.ones(9, dtype=torch.float64))
        m = (w * tot).sum() / (w * cnt).sum()
        k = w.sum()
        var = k / (k - 1) * (w * (tot - m * cnt) ** 2).sum() / (w * cnt).sum() ** 2
        return m, var.sqrt()

    m, se = mean_se(torch.ones(5, dtype=torch.float64))
    gen = torch.Generator().manual_seed(11)
    idx = torch.randint(5, (400, 5), generator=gen)
    ts = []
    for row in idx:
        mb, sb = mean_se(torch.bincount(row, minlength=5).double())
        ts.append(((mb - m) / sb).item() if sb > 0 else math.copysign(math.inf, (mb - m).item()))
    ts = sorted(ts)
    t_lo, t_hi = ts[math.ceil(0.025 * 400) - 1], ts[math.ceil(0.975 * 400) - 1]
    assert lo.item() == pytest.approx((m - t_hi * se).item(), abs=1e-6)
    assert hi.item() == pytest.approx((m - t_lo * se).item(), abs=1e-6)


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
    direct = torch.tensor([[2.0, 1.0, 0.01, -2.0, 1.0]])
    total = torch.tensor([[1.0, 1.5, 0.5, -2.0, -0.5]])
    sr = self_repair(direct, total)
    assert sr[0, 0].item() == pytest.approx(0.5)       # half repaired
    assert sr[0, 1].item() == pytest.approx(-0.5)      # amplified downstream
    assert math.isnan(sr[0, 2].item())                 # |direct| < 10% of the largest (and < 0.01): no ratio
    assert sr[0, 3].item() == pytest.approx(0.0)
    assert math.isnan(sr[0, 4].item())                 # opposite signs: over-compensation, not a share
