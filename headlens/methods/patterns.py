"""Per-head statistics of attention patterns, batched over heads and chunked over sequences.

A pattern-based role (previous-token heads, duplicate-token heads) reads each layer's attention pattern
``[batch, head, query, key]`` and reduces it to a few numbers per sequence and head. :func:`pattern_scores`
runs the forward passes for that: a hook on every layer's pattern applies the role's ``score`` to all
heads of the layer at once, so no layer's pattern outlives its own hook and the cache of a whole pass is
never held; the sequences go in chunks planned by :func:`headlens.runtime.chunked` from the bytes of one
sequence's forward pass (memory budget, ``--resume``, ranks).

>>> from headlens.methods import pattern_scores
>>> prev = lambda pattern, rows: pattern.diagonal(-1, -2, -1).float().mean(-1)   # [b, H]
>>> scores = pattern_scores(model, tokens, prev, "previous-token attention")    # doctest: +SKIP
>>> scores.shape                                                                  # doctest: +SKIP
torch.Size([8, 30, 9])
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..models import HeadModel
from ..runtime.work import chunked
from .forward import logits_at, row_bytes
from .hooks import pattern_name

__all__ = ["pattern_scores"]

PatternScore = Callable[[Tensor, Tensor], Tensor]


def pattern_scores(model: HeadModel, tokens: torch.Tensor, score: PatternScore, description: str,
                   batch_size: int | None = None, key: Sequence = ()) -> Float[Tensor, "batch layer head ..."]:
    """``score`` of every layer's attention pattern on ``tokens`` ``[batch, pos]``: ``[batch, n_layers,
    n_heads, ...]`` in float32 on the CPU.

    ``score(pattern, rows)`` gets one layer's pattern ``[b, n_heads, query, key]`` (the model's dtype, on
    that layer's device) for the sequences ``rows`` ``[b]`` (indices into ``tokens``, so a score can read
    per-sequence masks) and returns ``[b, n_heads, ...]``: all heads at once. The sequences run in chunks
    of at most ``batch_size`` (None: as many as the memory budget allows); the unembedding runs at the
    last position only (no logits are read). ``description`` names the progress bar and, with ``key``
    (e.g. the score's parameters), identifies the work for ``--resume``: give each score its own.
    """
    tokens = tokens.cpu()
    n_pos = tokens.shape[1]
    last = torch.tensor([n_pos - 1])

    def run(rows: Sequence[int]) -> torch.Tensor:
        index = torch.as_tensor(list(rows), dtype=torch.long)
        out: dict[int, torch.Tensor] = {}

        def record(pattern: torch.Tensor, layer: int) -> None:    # None: the pattern is left alone
            out[layer] = score(pattern, index).float().cpu()

        fwd = [(pattern_name(l), lambda x, hook, l=l: record(x, l)) for l in range(model.n_layers)]
        with torch.no_grad(), logits_at(model, last):
            model.bridge.run_with_hooks(tokens[index].to(model.device), fwd_hooks=fwd)
        return torch.stack([out[l] for l in range(model.n_layers)], 1)

    parts = chunked(run, list(range(len(tokens))), item_bytes=row_bytes(model, n_pos, 1), device=model.device,
                    weights=model.weight_bytes(), cap=batch_size, strict=description,
                    unit=f"{n_pos}-token sequence on {model.info.name}", description=description,
                    key=(tokens, *key), resumable=True)
    return torch.cat(parts) if len(parts) > 1 else parts[0]
