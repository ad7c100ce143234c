"""Metrics, TransformerLens-shaped: each maps one run's logits ``[batch, pos, d_vocab]`` to a scalar
(or ``[batch]``, or any per-run shape). :func:`headlens.methods.run_variants` calls a metric once per
variant, so a metric written for TransformerLens's patching works unchanged.

>>> metric = loss_metric(tokens)          # doctest: +SKIP
>>> metric(model.bridge(tokens))          # doctest: +SKIP
tensor(2.0761)
"""
from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

Metric = Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor]


def loss_metric(tokens: torch.Tensor, positions: torch.Tensor | None = None) -> Metric:
    """Mean next-token cross-entropy over ``positions`` (a bool mask over ``tokens[:, 1:]``, default all)."""
    targets = tokens[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.bool) if positions is None else positions

    def metric(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, targets.to(logp.device)[..., None])[..., 0]
        m = mask.to(nll.device).float()
        return (nll * m).sum() / m.sum()
    return metric


def kl_metric(clean_logits: torch.Tensor, position: int = -1) -> Metric:
    """Mean KL(clean || ablated) of the next-token distribution at ``position``."""
    clean = torch.log_softmax(clean_logits[:, position].float(), dim=-1)

    def metric(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        abl = torch.log_softmax(logits[:, position].float(), dim=-1)
        c = clean.to(abl.device)
        return (c.exp() * (c - abl)).sum(-1).mean()
    return metric


def logit_diff_metric(correct: torch.Tensor, wrong: torch.Tensor, position: int = -1) -> Metric:
    """Mean logit(correct) - logit(wrong) at ``position``; ``correct``/``wrong`` are ``[batch]`` ids."""
    def metric(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        last = logits[:, position].float()
        c = last.gather(-1, correct.to(last.device)[:, None])
        w = last.gather(-1, wrong.to(last.device)[:, None])
        return (c - w)[:, 0].mean()
    return metric
