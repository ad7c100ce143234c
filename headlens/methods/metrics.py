"""Metrics for :func:`headlens.methods.run_variants`: each maps logits ``[n, batch, pos, vocab]`` to ``[n]``."""
from __future__ import annotations

import torch


def loss_metric(tokens: torch.Tensor, positions: torch.Tensor | None = None):
    """Mean next-token cross-entropy over ``positions`` (a bool mask over ``tokens[:, 1:]``, default all)."""
    targets = tokens[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.bool) if positions is None else positions

    def metric(logits: torch.Tensor, rows=None) -> torch.Tensor:
        logp = torch.log_softmax(logits[:, :, :-1].float(), dim=-1)
        nll = -logp.gather(-1, targets.to(logp.device)[None].expand(logp.shape[0], -1, -1)[..., None])[..., 0]
        m = mask.to(nll.device)[None].float()
        return (nll * m).sum((1, 2)) / m.sum((1, 2))
    return metric


def kl_metric(clean_logits: torch.Tensor, position: int = -1):
    """Mean KL(clean || ablated) of the next-token distribution at ``position``."""
    clean = torch.log_softmax(clean_logits[:, position].float(), dim=-1)

    def metric(logits: torch.Tensor, rows=None) -> torch.Tensor:
        abl = torch.log_softmax(logits[:, :, position].float(), dim=-1)
        c = clean.to(abl.device)[None]
        return (c.exp() * (c - abl)).sum(-1).mean(-1)
    return metric


def logit_diff_metric(correct: torch.Tensor, wrong: torch.Tensor, position: int = -1):
    """Mean logit(correct) - logit(wrong) at ``position``; ``correct``/``wrong`` are ``[batch]`` ids."""
    def metric(logits: torch.Tensor, rows=None) -> torch.Tensor:
        last = logits[:, :, position].float()
        c = last.gather(-1, correct.to(last.device)[None, :, None].expand(last.shape[0], -1, 1))
        w = last.gather(-1, wrong.to(last.device)[None, :, None].expand(last.shape[0], -1, 1))
        return (c - w)[..., 0].mean(-1)
    return metric
