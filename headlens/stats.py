"""Statistics a reviewer expects: bootstrap intervals over prompts and empirical p-values.

- :func:`bootstrap_means`: the seeded percentile-bootstrap distribution of a mean over items (prompts,
  sequences, runs, tokens), vectorised over everything after the item dimension (e.g. all heads at once):
  the resampling is drawn once as a ``[n_boot, n]`` count matrix, so every head sees the same resamples
  and the cost is one matrix product.
- :func:`bootstrap_ci`: its ``level`` percentile interval (default 95%, 1000 resamples).
- :func:`empirical_p_value`: ``(1 + #null draws at least as extreme) / (1 + n_draws)``.
- :func:`wilson_interval`: the Wilson score interval of a binomial proportion.
"""
from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def bootstrap_means(per_item: Float[Tensor, "n ..."], n_boot: int = 1000, seed: int = 0) -> Float[Tensor, "n_boot ..."]:
    """Means of ``n_boot`` resamples (with replacement, seeded) of the items along dimension 0.

    NaN items are left out of each resample's mean (a resample with none left gives NaN). Returns
    ``[n_boot, ...]`` (float64) with the trailing shape of ``per_item``.
    """
    x = per_item.detach().double().cpu()
    n = x.shape[0]
    if n == 0:
        return torch.full((n_boot, *x.shape[1:]), float("nan"), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=g)
    ones = torch.ones(n_boot, n, dtype=torch.float64)
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, ones)
    flat = x.reshape(n, -1)
    valid = ~flat.isnan()
    total = counts @ torch.where(valid, flat, torch.zeros_like(flat))
    weight = counts @ valid.double()
    means = torch.where(weight > 0, total / weight.clamp_min(1e-300), torch.full_like(total, float("nan")))
    return means.view(n_boot, *x.shape[1:])


def percentile_interval(boot: Float[Tensor, "n_boot ..."], level: float = 0.95) -> tuple[Tensor, Tensor]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of a bootstrap distribution (NaN-aware)."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=boot.dtype)
    lo, hi = torch.nanquantile(boot, q, dim=0)
    return lo.float(), hi.float()


def bootstrap_ci(per_item: Float[Tensor, "n ..."], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[Float[Tensor, "..."], Float[Tensor, "..."]]:
    """Percentile-bootstrap interval of the mean over items (dimension 0): ``(lo, hi)``, each of the
    trailing shape (e.g. ``[n_layers, n_heads]``). Same inputs and seed give the same bytes."""
    return percentile_interval(bootstrap_means(per_item, n_boot, seed), level)


def empirical_p_value(observed: float, null: Tensor | list[float], higher_is_extreme: bool = True) -> float:
    """``(1 + #null values at least as extreme as observed) / (1 + n_null)``; NaN with no null draws or a
    NaN observation (a metric that could not be measured is no evidence); a NaN null draw counts as
    extreme (it can only make p larger)."""
    null = torch.as_tensor(null, dtype=torch.float64)
    if null.numel() == 0 or observed != observed:
        return float("nan")
    extreme = (null >= observed if higher_is_extreme else null <= observed) | null.isnan()
    return float((1 + int(extreme.sum())) / (1 + null.numel()))


def wilson_interval(frac, n: int, z: float = 1.96):
    """The Wilson score interval ``(lo, hi)`` of a proportion ``frac`` out of ``n`` (95% by default),
    clipped to [0, 1]: floats for a number, tensors (elementwise) for a tensor; NaN when ``n`` is 0.

    >>> lo, hi = wilson_interval(7 / 24, 24)
    >>> round(lo, 3), round(hi, 3)
    (0.149, 0.492)
    """
    scalar = not isinstance(frac, torch.Tensor)
    f = torch.as_tensor(frac, dtype=torch.float64) if scalar else frac
    if n == 0:
        nan = torch.full_like(f, float("nan"))
        return (float(nan), float(nan)) if scalar else (nan, nan)
    centre = f + z * z / (2 * n)
    half = z * torch.sqrt(f * (1 - f) / n + z * z / (4 * n * n))
    lo = ((centre - half) / (1 + z * z / n)).clamp(min=0.0)
    hi = ((centre + half) / (1 + z * z / n)).clamp(max=1.0)
    return (float(lo), float(hi)) if scalar else (lo, hi)
