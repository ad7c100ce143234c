"""Head ablation, batched.

One generic routine, :func:`run_variants`, runs many *variants* of a forward pass at once: each variant
ablates its own set of heads. Variants are stacked along the batch dimension (chunked to fit memory),
and each chunk resumes from the clean run's residual stream at the first layer it touches, so the layers
before it are never recomputed. Everything else here is a thin wrapper:

- :func:`sweep_heads`: every head ablated alone -> ``[n_layers, n_heads]``;
- :func:`ablate_group`: one set of heads ablated together;
- :func:`random_baseline`: several random sets of k heads (the control every causal check uses);
- :func:`~headlens.methods.interventions.ablate`: a context manager that ablates heads in any run
  (generation included).

What replaces an ablated head is an intervention object (:mod:`headlens.methods.interventions`:
``ZeroAblation``, ``MeanAblation``, ``ResampleAblation``, ``Patch``, ``Scale``, ``UniformAttention``, or
your own subclass), or its name (``"mean"``...); the batched sweeps and :func:`ablate` use the same ones.

A variant lists heads as ``(layer, head)`` (every position) or ``(layer, head, position)`` (that query
position only; negative positions count from the end), so per-position patching batches the same way.

**Suffix runs.** When every variant of a call acts at late positions only (all its heads are
``(layer, head, position)`` with positions ``>= p0``) and the metric reads positions ``>= p0`` only,
nothing before ``p0`` can change (causal attention): :func:`run_variants` then computes the clean KV
cache of positions ``[0, p0)`` once and runs each row on positions ``[p0, n)`` alone, through every layer
(see :func:`suffix_start` for when exactly). Patching at the prompts' last one or two positions (function
vectors, concept induction) costs a few positions per layer instead of the whole prompt.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..models import HeadModel
from ..runtime.work import chunked
from .forward import (
    CleanRun,
    clean_run,
    forward_from,
    forward_suffix,
    kv_cache_bytes,
    prefix_cache,
    row_bytes,
    suffix_ok,
)
from .hooks import Head, check_head
from .interventions import INTERVENTIONS, Intervention, Site, as_intervention, hooks
from .metrics import Metric, metric_positions

__all__ = ["KINDS", "run_variants", "sweep_heads", "ablate_group", "random_head_sets", "random_baseline",
           "per_variant", "suffix_start", "SUFFIX_FRACTION"]

KINDS = tuple(INTERVENTIONS)

SUFFIX_FRACTION = 0.5   # suffix runs only when the suffix is at most this fraction of the prompt


def suffix_start(model: HeadModel, variants: Sequence[Sequence[tuple]], index: Tensor | None, n_pos: int,
                 intervention: Intervention) -> int | None:
    """The first position ``p0`` of :func:`run_variants`'s suffix runs, or None for whole-prompt runs.

    ``p0`` is the smallest position any variant acts at or the metric reads (``-2`` in ``n``-token prompts:
    ``n - 2``). Suffix runs are taken when every head of every variant is ``(layer, head, position)`` (a
    head at every position changes them all), the metric declares the positions it reads (``index``,
    non-negative; a metric of the full logits reads every position), the suffix is at most
    :data:`SUFFIX_FRACTION` of the prompt (``n - p0 <= n / 2``), the intervention is
    :attr:`~headlens.methods.interventions.Intervention.offset_aware`, and the model's bridge continues a
    KV cache exactly (:func:`~headlens.methods.forward.suffix_ok`)."""
    entries = [e for v in variants for e in v]
    if not entries or index is None or not intervention.offset_aware or any(len(e) != 3 for e in entries):
        return None
    for e in entries:
        check_head(model, e, n_pos)
    p0 = min(min(e[2] % n_pos for e in entries), int(index.min()))
    if p0 < 1 or n_pos - p0 > SUFFIX_FRACTION * n_pos:
        return None
    return p0 if suffix_ok(model) else None


def _layer_masks(model, variants: Sequence[Iterable[Head]], n_pos: int) -> dict[int, torch.Tensor]:
    """Per touched layer, a bool mask ``[n_variants, pos|1, n_heads]`` of what each variant ablates."""
    per_position = any(len(e) == 3 for heads in variants for e in heads)
    width = n_pos if per_position else 1
    masks: dict[int, torch.Tensor] = {}
    for v, heads in enumerate(variants):
        for entry in heads:
            check_head(model, entry, n_pos)
            layer, head = entry[:2]
            if layer not in masks:
                masks[layer] = torch.zeros(len(variants), width, model.n_heads, dtype=torch.bool)
            if len(entry) == 3:
                masks[layer][v, entry[2] % n_pos, head] = True
            else:
                masks[layer][v, :, head] = True
    return masks


def run_variants(model: HeadModel, tokens: torch.Tensor, variants: Sequence[Iterable[Head]], metric: Metric,
                 ablation: str | Intervention = "mean", attention_mask: torch.Tensor | None = None,
                 batch_size: int | None = 64, run: CleanRun | None = None,
                 description: str = "ablating heads", stats: dict | None = None,
                 suffix: bool = True) -> torch.Tensor:
    """Run every variant (a set of heads to ablate) and return ``metric`` for each: ``[n_variants, ...]``.

    ``metric(logits)`` is TransformerLens-shaped: it gets one variant's logits ``[batch, pos, vocab]``
    (the prompts in order) and returns a scalar or any per-run shape; the result stacks them. A metric
    that declares ``positions`` (see :mod:`headlens.methods.metrics`) gets, through its
    ``on_positions``, the logits at those positions only, ``[batch, n_positions, vocab]``: the final
    norm and the unembedding run only there. One that is a sum over prompts (``share``, see
    :func:`headlens.methods.metrics.summed`) gets each chunk's rows of a variant and its shares are added,
    so a variant's logits are never held whole.

    Rows (one prompt of one variant) run in chunks planned by :func:`headlens.runtime.work.chunked` from
    :func:`~headlens.methods.forward.row_bytes` and the runtime's memory budget (``max_memory``), at most
    ``batch_size`` rows each (``None``: no cap); a variant may straddle two chunks. Each chunk starts at
    the first layer any of its rows touches, reusing the clean residual stream below it. ``stats``, if
    given, receives ``per_chunk``, ``chunks`` and ``suffix`` (``p0``, or None for whole-prompt runs).

    Suffix runs (``suffix=True``, the default; ``False`` always runs whole prompts): when every variant
    acts at positions ``>= p0`` only and the metric reads positions ``>= p0`` only (:func:`suffix_start`
    says exactly when), the clean keys and values of positions ``[0, p0)`` are computed once per prompt
    (:func:`~headlens.methods.forward.prefix_cache`) and each chunk runs every layer on its rows'
    positions ``[p0, n)`` only, after its prompts' cache (:func:`~headlens.methods.forward.forward_suffix`).
    Interventions then see those positions only, with ``Site.offset = p0``. The values are the
    whole-prompt runs' to float precision.

    >>> losses = run_variants(model, tokens, [[(0, 1)], [(0, 1), (2, 3)]], loss_metric)  # doctest: +SKIP
    >>> losses.shape                                                                        # doctest: +SKIP
    torch.Size([2])
    """
    ablation = as_intervention(ablation)
    variants = [sorted(set(map(tuple, v))) for v in variants]
    if run is None:
        run = clean_run(model, tokens, attention_mask)
    ablation.prepare(model)
    batch, n_pos = run.tokens.shape
    index = metric_positions(metric, n_pos)
    share = getattr(metric, "share", None) if index is not None else None
    n_logit = n_pos if index is None else len(index)
    p0 = suffix_start(model, variants, index, n_pos, ablation) if suffix else None
    start = [min((e[0] for e in v), default=model.n_layers) for v in variants]
    order = sorted(range(len(variants)), key=lambda i: start[i])
    results: list[torch.Tensor | None] = [None] * len(variants)
    # Variants with nothing ablated are the clean run itself.
    for i in order:
        if start[i] >= model.n_layers:
            results[i] = run.value(metric)
    rows = [(v, p) for v in order if start[v] < model.n_layers for p in range(batch)]
    prefix = prefix_cache(model, run.tokens, run.attention_mask, p0) if p0 is not None and rows else None
    offset = p0 or 0

    def run_group(group: list[list[tuple[int, int]]]) -> dict[int, torch.Tensor]:
        """The metric of every variant whose rows are in ``group`` (consecutive chunks)."""
        pending: dict[int, tuple[torch.Tensor, int]] = {}   # variant -> (its logits or value so far, rows)
        done: dict[int, torch.Tensor] = {}
        for chunk in group:
            chunk_vars = sorted({v for v, _ in chunk}, key=order.index)
            local = {v: j for j, v in enumerate(chunk_vars)}
            variant_of_row = torch.tensor([local[v] for v, _ in chunk])
            prompt_of_row = torch.tensor([p for _, p in chunk])
            first = min(start[v] for v in chunk_vars)
            masks = _layer_masks(model, [variants[v] for v in chunk_vars], n_pos)
            mask = None
            if run.attention_mask is not None:
                mask = run.attention_mask[prompt_of_row.to(run.attention_mask.device)].to(model.device)
            ids = torch.tensor([v for v, _ in chunk])
            fwd = hooks(ablation, {l: m[variant_of_row][:, offset:] for l, m in masks.items()},
                        lambda layer, rows=prompt_of_row, mask=mask, ids=ids:
                        Site(model, layer, run, rows, mask, ids, offset))
            if prefix is not None:      # suffix runs: positions [p0, n) after the clean cache of [0, p0)
                tokens_row = run.tokens[prompt_of_row.to(run.tokens.device), p0:]
                logits = forward_suffix(model, tokens_row, mask, prefix, prompt_of_row, fwd, index - p0)
            else:
                resid = run.resid[first][prompt_of_row.to(run.resid[first].device)].to(model.device)
                logits = forward_from(model, resid, first, mask, fwd, index, run.block_returns_tuple)
                del resid
            j = 0
            for v in chunk_vars:
                n = sum(1 for vv, _ in chunk if vv == v)
                rows, j = slice(j, j + n), j + n
                if share is not None:   # a sum over prompts: add this chunk's share, keep no logits
                    value, filled = pending.pop(v, (0, 0))
                    value = value + share(logits[rows], prompt_of_row[rows])
                elif n < batch:         # a variant split over chunks: its rows go into one buffer (no cat)
                    value, filled = pending.pop(v, None) or (logits.new_empty((batch, *logits.shape[1:])), 0)
                    value[filled:filled + n] = logits[rows]
                else:
                    value, filled = logits[rows], 0
                filled += n
                if filled < batch:
                    pending[v] = (value, filled)
                elif share is not None:
                    done[v] = value
                else:
                    done[v] = metric.on_positions(value) if index is not None else metric(value)
            del logits
        return done

    # Whole variants per chunk when one fits (align), and a variant never split between two ranks
    # (together): a rank assembles each variant from the same rows, in the same batches, as one process.
    # An explicit budget also holds the cached clean run (reserve), and the prefix cache of suffix runs.
    # A suffix run's row holds its cache rows at every layer (copied out of the prefix once).
    if prefix is None:
        item_bytes, reserve, key = row_bytes(model, n_pos, n_logit), run.nbytes(), ()
    else:
        item_bytes = row_bytes(model, n_pos, n_logit, n_query=n_pos - p0) + kv_cache_bytes(model, n_pos)
        reserve, key = run.nbytes() + batch * kv_cache_bytes(model, n_pos), ("suffix", p0)
    if stats is not None:
        stats["suffix"] = p0 if prefix is not None else None
    groups = chunked(run_group, rows, item_bytes=item_bytes, device=model.device,
                     weights=model.weight_bytes(), reserve=reserve, cap=batch_size,
                     strict=description, unit=f"{n_pos}-token sequence on {model.info.name}", align=batch,
                     together=lambda row: row[0], description=description,
                     key=(variants, *ablation.key(), run.tokens, *key), resumable=True, stats=stats)
    for done in groups:
        for v, value in done.items():
            results[v] = value.to(run.logits.device)
    return torch.stack(results)


def per_variant(metric: Metric, logits: torch.Tensor, n: int, batch: int) -> torch.Tensor:
    """``metric`` applied to each of ``n`` variants stacked along the batch (``[n * batch, pos, vocab]``):
    ``[n, ...]``."""
    return torch.stack([metric(logits[j * batch:(j + 1) * batch]) for j in range(n)])


def sweep_heads(model: HeadModel, tokens: torch.Tensor, metric: Metric, ablation: str | Intervention = "mean",
                heads: Sequence[Head] | None = None, attention_mask: torch.Tensor | None = None,
                batch_size: int | None = 64, run: CleanRun | None = None) -> Float[Tensor, "layer head ..."]:
    """The metric with each head ablated alone: ``[n_layers, n_heads, ...]`` (NaN for heads not asked).

    >>> losses = sweep_heads(model, tokens, loss_metric(tokens), "mean")   # doctest: +SKIP
    >>> losses.shape                                                        # doctest: +SKIP
    torch.Size([30, 9])
    """
    heads = list(heads) if heads is not None else model.heads()
    values = run_variants(model, tokens, [[h] for h in heads], metric, ablation, attention_mask,
                          batch_size, run, description="single-head ablations")
    out = torch.full((model.n_layers, model.n_heads, *values.shape[1:]), float("nan"))
    for (l, h), v in zip(heads, values):
        out[l, h] = v.float().cpu()
    return out


def ablate_group(model: HeadModel, tokens: torch.Tensor, heads: Sequence[Head], metric: Metric,
                 ablation: str | Intervention = "mean", attention_mask: torch.Tensor | None = None,
                 run: CleanRun | None = None) -> torch.Tensor:
    """The metric with all ``heads`` ablated together (the metric's own shape)."""
    return run_variants(model, tokens, [list(heads)], metric, ablation, attention_mask, run=run)[0]


def random_head_sets(model: HeadModel, k: int, n_draws: int, seed: int = 0, exclude: Iterable[Head] = (),
                     layers: Sequence[int] | None = None) -> list[list[Head]]:
    """``n_draws`` random sets of ``k`` distinct heads (from a seeded generator), none in ``exclude``.

    ``layers`` (one layer per head of the set, e.g. the tested heads' layers): each draw takes as many
    heads from each of those layers as the list names (layer-matched controls: late heads matter more
    than early ones on average); a layer with too few heads left lends the rest from any layer.

    >>> random_head_sets(model, 2, 3, layers=[17, 23])          # doctest: +SKIP
    [[(17, 4), (23, 0)], [(17, 8), (23, 5)], [(17, 1), (23, 7)]]
    """
    excluded = set(map(tuple, exclude))
    pool = [h for h in model.heads() if h not in excluded]
    g = torch.Generator().manual_seed(seed)
    if layers is None:
        return [[pool[i] for i in torch.randperm(len(pool), generator=g)[:k].tolist()]
                for _ in range(n_draws)]
    need: dict[int, int] = {}
    for layer in layers:
        need[layer] = need.get(layer, 0) + 1
    by_layer = {layer: [h for h in pool if h[0] == layer] for layer in need}
    draws = []
    for _ in range(n_draws):
        draw: list[Head] = []
        for layer in sorted(need):
            own = by_layer[layer]
            draw += [own[i] for i in torch.randperm(len(own), generator=g)[:need[layer]].tolist()]
        rest = [h for h in pool if h not in set(draw)]
        short = k - len(draw)
        if short > 0:
            draw += [rest[i] for i in torch.randperm(len(rest), generator=g)[:short].tolist()]
        draws.append(draw)
    return draws


def random_baseline(model: HeadModel, tokens: torch.Tensor, k: int, metric: Metric, n_draws: int = 10,
                    seed: int = 0, ablation: str | Intervention = "mean", exclude: Iterable[Head] = (),
                    attention_mask: torch.Tensor | None = None, batch_size: int | None = 64,
                    run: CleanRun | None = None) -> tuple[torch.Tensor, list[list[Head]]]:
    """The metric under ``n_draws`` random k-head ablations (all draws batched): (values ``[n_draws,
    ...]``, draws)."""
    draws = random_head_sets(model, k, n_draws, seed, exclude)
    values = run_variants(model, tokens, draws, metric, ablation, attention_mask, batch_size, run,
                          description="random-head baselines")
    return values, draws

