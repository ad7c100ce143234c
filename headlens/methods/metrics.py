"""Metrics, TransformerLens-shaped: each maps one run's logits ``[batch, pos, d_vocab]`` to a scalar
(or ``[batch]``, or any per-run shape). :func:`headlens.methods.run_variants` calls a metric once per
variant, so a metric written for TransformerLens's patching works unchanged.

>>> metric = loss_metric(tokens)          # doctest: +SKIP
>>> metric(model.bridge(tokens))          # doctest: +SKIP
tensor(2.0761)

**Positions.** A metric may say which positions it reads: an attribute ``positions`` (an int, a slice,
a list of ints or a 1-D index tensor over the prompt's positions; negatives count from the end) and a
method ``on_positions(logits)`` that takes the logits at just those positions,
``[batch, n_positions, d_vocab]``, in the order given. ``run_variants`` then applies the final norm
and the unembedding only at those positions (for a 262k vocabulary the unembedding costs more than
the rest of a small model) and calls ``on_positions``. :func:`positioned` builds such a metric from a
function of the selected logits; calling it on full logits selects the positions first, so both
routes give the same value. The built-in metrics all declare their positions, and compute
log-probabilities a few positions at a time (never a float copy of the whole logits tensor). A plain
metric without ``positions`` gets the full logits.
"""
from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import HeadlensError

Metric = Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor]
_CHUNK = 1 << 24  # float32 elements per working chunk (64 MB)


def position_index(positions, n_pos: int) -> Tensor:
    """``positions`` (an int, a slice, a list of ints or a 1-D index tensor; negatives count from the
    end) as a sorted-as-given 1-D tensor of non-negative indices into ``n_pos`` positions."""
    if isinstance(positions, slice):
        return torch.arange(n_pos)[positions]
    index = torch.as_tensor(positions, dtype=torch.long).reshape(-1).cpu()
    if ((index < -n_pos) | (index >= n_pos)).any():
        raise HeadlensError(f"metric positions {index.tolist()} are outside the {n_pos}-token prompts")
    return index % n_pos


def metric_positions(metric, n_pos: int) -> Tensor | None:
    """The positions ``metric`` declares it reads, as indices into ``n_pos`` positions; None when it
    declares none (it gets the full logits)."""
    if getattr(metric, "positions", None) is not None and hasattr(metric, "on_positions"):
        return position_index(metric.positions, n_pos)
    return None


def at_positions(logits: Tensor, index: Tensor) -> Tensor:
    """``logits[:, index]``: a view, not a copy of ``[batch, n, d_vocab]``, where ``index`` (non-negative)
    is a run of consecutive positions."""
    index = index.cpu()
    if len(index) and bool((index.diff() == 1).all()):
        return logits[:, int(index[0]):int(index[-1]) + 1]
    return logits[:, index.to(logits.device)]


class PositionMetric:
    """A metric that reads the logits only at ``positions`` (see the module docstring).

    ``fn(logits[batch, n_positions, d_vocab])`` computes the value from the logits at those positions,
    in the order given. Calling the metric on full logits ``[batch, pos, d_vocab]`` selects the
    positions first; :func:`~headlens.methods.run_variants` instead computes the logits only there and
    calls :meth:`on_positions` with them. Both give the same value.

    ``share`` (see :func:`summed`), if given, makes the value a sum over the prompts:
    ``share(logits, prompts)`` is the part of the prompts ``prompts`` (a 1-D index into the batch), from
    their logits at the positions. ``run_variants`` then adds up the shares of each chunk of rows and
    never holds a variant's logits whole.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], positions, share: Callable | None = None):
        self.fn = fn
        self.positions = positions
        self.share = share

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        return self.fn(at_positions(logits, position_index(self.positions, logits.shape[1])))

    def on_positions(self, logits: Float[Tensor, "batch n_positions d_vocab"]) -> Tensor:
        return self.fn(logits)


def positioned(fn: Callable[[Tensor], Tensor], positions) -> PositionMetric:
    """A metric reading only ``positions``, from ``fn`` of the logits there (``[batch, n, d_vocab]``)."""
    return PositionMetric(fn, positions)


def summed(share: Callable[[Tensor, Tensor], Tensor], positions) -> PositionMetric:
    """A metric reading only ``positions`` whose value is the sum over the prompts of
    ``share(logits[n, n_positions, d_vocab], prompts[n])``, the part of those prompts (e.g. their summed
    loss over the whole batch's count): the batched sweeps may then take a few prompts at a time."""
    return PositionMetric(lambda logits: share(logits, torch.arange(len(logits))), positions, share)


def _chunks(n_rows: int, row_elems: int):
    step = max(1, _CHUNK // max(1, row_elems))
    return range(0, n_rows, step), step


def token_logprobs(logits: Float[Tensor, "batch pos d_vocab"], targets: Tensor) -> Float[Tensor, "batch pos"]:
    """``log_softmax(logits)[..., target]`` at each position, in float32, a few positions at a time
    (never a float copy of the whole ``[batch, pos, d_vocab]`` tensor)."""
    b, n, v = logits.shape
    if n == 0:                                       # no positions: nothing to read
        return logits.new_zeros((b, 0), dtype=torch.float32)
    starts, step = _chunks(n, b * v)
    out = []
    for i in starts:
        x = logits[:, i:i + step].float()
        t = targets[:, i:i + step].to(x.device)
        out.append(x.gather(-1, t[..., None])[..., 0] - x.logsumexp(-1))
    return torch.cat(out, 1)


def loss_metric(tokens: torch.Tensor, positions: torch.Tensor | None = None,
                per_prompt: bool = False) -> PositionMetric:
    """Mean next-token cross-entropy over ``positions`` (a bool mask over ``tokens[:, 1:]``, default all).

    It reads the logits only at the positions that predict a masked target (``.positions``), and is a
    sum over prompts (:func:`summed`). With ``per_prompt``: ``[batch]``, each prompt's mean over its
    masked positions (then not a sum: a variant's rows are gathered before the metric reads them).
    """
    targets = tokens[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.bool) if positions is None else positions.bool()
    read = mask.any(0).nonzero()[:, 0]                        # positions whose prediction counts
    targets, weight = targets[:, read], mask[:, read].float()
    total = weight.sum()
    if per_prompt:
        def each(logits: Float[Tensor, "batch len_read d_vocab"]) -> Tensor:
            nll = -token_logprobs(logits, targets[:len(logits)])
            w = weight[:len(logits)].to(nll.device)
            return (nll * w).sum(1) / w.sum(1).clamp_min(1)
        return positioned(each, read)

    def share(logits: Float[Tensor, "n len_read d_vocab"], prompts: Tensor) -> Float[Tensor, ""]:
        nll = -token_logprobs(logits, targets[prompts])
        return (nll * weight[prompts].to(nll.device)).sum() / total.to(nll.device)
    return summed(share, read)


def kl_metric(clean_logits: torch.Tensor, position: int = -1, per_prompt: bool = False) -> PositionMetric:
    """Mean KL(clean || ablated) of the next-token distribution at ``position`` (reads only there;
    ``[batch]``, one per prompt, with ``per_prompt``)."""
    clean = torch.log_softmax(clean_logits[:, position].float(), dim=-1)

    def metric(logits: Float[Tensor, "batch 1 d_vocab"]) -> Float[Tensor, ""]:
        abl = torch.log_softmax(logits[:, 0].float(), dim=-1)
        c = clean.to(abl.device)
        kl = (c.exp() * (c - abl)).sum(-1)
        return kl if per_prompt else kl.mean()
    return positioned(metric, [position])


def logit_diff_metric(correct: torch.Tensor, wrong: torch.Tensor, position: int = -1,
                      per_prompt: bool = False) -> PositionMetric:
    """Mean logit(correct) - logit(wrong) at ``position``; ``correct``/``wrong`` are ``[batch]`` ids
    (``[batch]``, one per prompt, with ``per_prompt``)."""
    def metric(logits: Float[Tensor, "batch 1 d_vocab"]) -> Float[Tensor, ""]:
        last = logits[:, 0].float()
        c = last.gather(-1, correct.to(last.device)[:, None])
        w = last.gather(-1, wrong.to(last.device)[:, None])
        diff = (c - w)[:, 0]
        return diff if per_prompt else diff.mean()
    return positioned(metric, [position])
