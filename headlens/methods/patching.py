"""Activation patching and path patching of head outputs between a clean and a corrupted prompt set.

- :func:`patch_heads`: the metric after replacing one head's output ``z`` by its value on the other
  prompt set, for every head (and, with ``per_position=True``, at one query position at a time).
  ``direction="denoise"`` runs the corrupted prompts with a clean head patched in (does the head
  *restore* the behaviour?); ``direction="noise"`` runs the clean prompts with a corrupted head patched
  in (does the behaviour *need* the head?). Batched through :func:`run_variants` (kind ``patch``).
- :func:`path_patch_logits`: the same swap, but only along the head's *direct* path to the logits: the
  head's change in output goes through ``W_O`` straight to the unembedding, divided by the target run's
  final norm scale; every later layer still sees the unpatched head. Computed from cached ``z`` with no
  extra forward pass.

Clean and corrupted prompts are paired row by row and must have the same shape.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import HeadlensError
from .ablation import Ablation, CleanRun, Head, clean_run, per_variant, run_variants
from .metrics import Metric

DIRECTIONS = ("denoise", "noise")


def _check_pair(clean: torch.Tensor, corrupted: torch.Tensor, direction: str) -> None:
    if direction not in DIRECTIONS:
        raise HeadlensError(f"unknown patching direction '{direction}'; choose denoise or noise")
    if clean.shape != corrupted.shape:
        raise HeadlensError(f"clean and corrupted prompts must have the same shape, got "
                            f"{tuple(clean.shape)} and {tuple(corrupted.shape)}")


def target_and_source(model, clean: torch.Tensor, corrupted: torch.Tensor, direction: str,
                      attention_mask: torch.Tensor | None = None) -> tuple[CleanRun, CleanRun]:
    """The run that gets patched and the run patched from: (corrupted, clean) to denoise, else reversed."""
    _check_pair(clean, corrupted, direction)
    target, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    return clean_run(model, target, attention_mask), clean_run(model, source, attention_mask)


def _head_entries(model, heads: Sequence[Head] | None, per_position: bool, n_pos: int) -> list[tuple]:
    heads = [tuple(h) for h in (heads if heads is not None else model.heads())]
    if per_position:
        return [(l, h, p) for l, h in heads for p in range(n_pos)]
    return heads


def _scatter(model, entries: list[tuple], values: torch.Tensor, per_position: bool, n_pos: int):
    """``[n_layers, n_heads, (pos,) ...]`` with NaN where a head was not asked for."""
    shape = (model.n_layers, model.n_heads) + ((n_pos,) if per_position else ())
    out = torch.full(shape + tuple(values.shape[1:]), float("nan"))
    for e, v in zip(entries, values):
        out[e] = v.float().cpu()
    return out


def patch_heads(model, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
                direction: str = "denoise", heads: Sequence[Head] | None = None,
                per_position: bool = False, attention_mask: torch.Tensor | None = None,
                max_rows: int = 64) -> torch.Tensor:
    """The metric with each head's output patched from the other prompt set, one head at a time.

    Returns ``[n_layers, n_heads, ...]``, or ``[n_layers, n_heads, pos, ...]`` with ``per_position``
    (the head patched at that query position only). The unpatched target run's metric is
    ``metric(target.logits)``; see :func:`target_and_source`.
    """
    target, source = target_and_source(model, clean, corrupted, direction, attention_mask)
    n_pos = target.tokens.shape[1]
    entries = _head_entries(model, heads, per_position, n_pos)
    values = run_variants(model, target.tokens, [[e] for e in entries], metric,
                          Ablation(kind="patch", source=source.z), attention_mask, max_rows, target,
                          description="patching heads")
    return _scatter(model, entries, values, per_position, n_pos)


def _final_norm_centres(model) -> bool:
    """LayerNorm subtracts the mean before scaling; RMSNorm does not."""
    return str(getattr(model.bridge.cfg, "normalization_type", "LN")).upper().startswith("LN")


def path_patch_logits(model, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
                      direction: str = "noise", heads: Sequence[Head] | None = None,
                      per_position: bool = False, attention_mask: torch.Tensor | None = None,
                      max_rows: int = 64) -> torch.Tensor:
    """The metric when only a head's direct path to the logits carries the patched value.

    logits' = target logits + norm(delta) @ W_U, with delta = (z_source - z_target)[h] @ W_O[l, h],
    normalised by the *target* run's final norm scale (the mean removed first under LayerNorm). The
    default direction is ``noise`` (clean run, corrupted head on the direct path). Same shapes as
    :func:`patch_heads`.
    """
    target, source = target_and_source(model, clean, corrupted, direction, attention_mask)
    batch, n_pos = target.tokens.shape
    entries = _head_entries(model, heads, per_position, n_pos)
    W_U = model.bridge.W_U
    centre = _final_norm_centres(model)
    per_chunk = max(1, max_rows // batch)
    results = []
    for start in range(0, len(entries), per_chunk):
        chunk = entries[start:start + per_chunk]
        deltas = []
        for e in chunk:
            l, h = e[:2]
            dz = (source.z[l][:, :, h] - target.z[l][:, :, h])  # [batch, pos, d_head]
            d = dz @ model.bridge.W_O[l, h].to(dz.dtype)          # [batch, pos, d_model]
            if len(e) == 3:
                keep = torch.zeros(n_pos, dtype=d.dtype, device=d.device)
                keep[e[2]] = 1
                d = d * keep[None, :, None]
            deltas.append(d)
        delta = torch.stack(deltas)
        if centre:
            delta = delta - delta.mean(-1, keepdim=True)
        logits = target.logits[None] + (delta / target.scale[None]) @ W_U
        results.append(per_variant(metric, logits.flatten(0, 1), len(chunk), batch))
    return _scatter(model, entries, torch.cat(results), per_position, n_pos)
