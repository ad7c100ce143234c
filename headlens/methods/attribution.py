"""Logit attribution: direct logit attribution (exact, linear) and attribution patching (first order).

- :func:`direct_logit_attribution`: split a logit (or a logit difference) at each position into what
  every component writes to the residual stream, projected on the unembedding direction and divided by
  the run's final norm scale: token (+ positional) embeddings, each head (``z @ W_O[l, h]``), each
  attention output bias, each MLP, and the unembedding bias. The parts sum to the real logit exactly
  (the only nonlinearity, the final norm scale, is taken from the run).
- :func:`attribution_patching`: the first-order estimate of :func:`~headlens.methods.patch_heads` for
  every head from one forward and one backward pass: ``(z_source - z_target) . d metric / d z`` at the
  target run. It is exact for a linear model and known to fail where attention saturates, so
  :func:`attribution_vs_exact` reports its Pearson correlation against exact patching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import HeadlensError
from ..models import HeadModel
from .hooks import FINAL_SCALE, Head, mlp_out_name, z_name
from .metrics import Metric
from .patching import check_pair, final_norm_centres, patch_heads


@dataclass
class LogitAttribution:
    """Direct contributions to a logit (difference), each ``[..., batch, pos]``."""
    heads: torch.Tensor    # [n_layers, n_heads, batch, pos]
    mlps: torch.Tensor     # [n_layers, batch, pos]
    embed: torch.Tensor    # [batch, pos]: token (+ positional) embeddings
    bias: torch.Tensor     # [batch, pos]: attention output biases (all layers) + unembedding bias
    logits: torch.Tensor   # [batch, pos]: the real logit (difference) of the run

    def total(self) -> torch.Tensor:
        """The sum over all components: equals ``logits``."""
        return self.heads.sum((0, 1)) + self.mlps.sum(0) + self.embed + self.bias


def _per_position(ids: torch.Tensor, batch: int, n_pos: int, what: str) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[:, None].expand(-1, n_pos)
    if tuple(ids.shape) != (batch, n_pos):
        raise HeadlensError(f"{what} token ids must be [batch] or [batch, pos] = "
                            f"[{batch}, {n_pos}], got {tuple(ids.shape)}")
    return ids


def direct_logit_attribution(model: HeadModel, tokens: torch.Tensor, target: torch.Tensor,
                             wrong: torch.Tensor | None = None,
                             attention_mask: torch.Tensor | None = None) -> LogitAttribution:
    """Direct logit attribution of ``logit(target) [- logit(wrong)]`` at every position.

    ``target`` / ``wrong`` are token ids ``[batch]`` (the same token at every position) or
    ``[batch, pos]``; e.g. ``target=tokens[:, 1:]`` attributes each next-token prediction. Each part is
    ``component . (W_U[:, target] - W_U[:, wrong]) / scale`` with the run's final norm scale (and the
    component's mean over ``d_model`` removed first under LayerNorm).
    """
    bridge = model.bridge
    tokens = tokens.to(model.device)
    batch, n_pos = tokens.shape
    L = model.n_layers
    names = ({z_name(l) for l in range(L)} | {mlp_out_name(l) for l in range(L)}
             | {"hook_embed", "hook_pos_embed", FINAL_SCALE})
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens, attention_mask=attention_mask,
                                              names_filter=lambda n: n in names)
        t = _per_position(target, batch, n_pos, "target").to(tokens.device)
        W_U = bridge.W_U
        direction = W_U.T[t]                                        # [batch, pos, d_model]
        real = logits.gather(-1, t[..., None])[..., 0]
        b_U = getattr(bridge, "b_U", None)
        bias = b_U[t] if b_U is not None else torch.zeros_like(real)
        if wrong is not None:
            w = _per_position(wrong, batch, n_pos, "wrong").to(tokens.device)
            direction = direction - W_U.T[w]
            real = real - logits.gather(-1, w[..., None])[..., 0]
            if b_U is not None:
                bias = bias - b_U[w]
        if final_norm_centres(model):  # (x - mean x) . d == x . (d - mean d)
            direction = direction - direction.mean(-1, keepdim=True)
        direction = direction / cache[FINAL_SCALE]

        def project(x: torch.Tensor) -> torch.Tensor:
            return (x * direction).sum(-1)

        embed = project(cache["hook_embed"])
        if "hook_pos_embed" in cache:
            embed = embed + project(cache["hook_pos_embed"])
        W_O = bridge.W_O  # the bridge re-stacks all layers on every access: read it once
        heads = torch.stack([
            torch.einsum("bphd,hdm,bpm->hbp", cache[z_name(l)], W_O[l], direction)
            for l in range(L)])
        mlps = torch.stack([project(cache[mlp_out_name(l)]) for l in range(L)])
        for l in range(L):
            b_O = getattr(bridge.blocks[l].attn, "b_O", None)
            if b_O is not None:
                bias = bias + project(b_O.expand_as(direction))
    return LogitAttribution(heads=heads, mlps=mlps, embed=embed, bias=bias, logits=real)


def attribution_patching(model: HeadModel, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
                         direction: str = "denoise", per_position: bool = False,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """First-order estimate of the change in ``metric`` from patching each head (one fwd + one bwd).

    ``direction`` as in :func:`~headlens.methods.patch_heads`: the gradient is taken on the target run
    (corrupted to denoise, clean to noise). Returns the estimated *change* from the target run's metric,
    ``[n_layers, n_heads]`` (summed over positions) or ``[n_layers, n_heads, pos]``. ``metric`` must be
    differentiable and return one value per variant (the built-in metrics do).
    """
    check_pair(clean, corrupted, direction)
    target, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    z_target, grads = _z_and_grads(model, target.to(model.device), metric, attention_mask)
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(source.to(model.device), attention_mask=attention_mask,
                                               names_filter=lambda n: n.endswith("attn.hook_z"))
        est = torch.stack([((cache[z_name(l)] - z_target[l]) * grads[l]).sum(-1).sum(0)
                           for l in range(model.n_layers)])          # [layer, pos, head]
    est = est.transpose(1, 2).float().cpu()
    return est if per_position else est.sum(-1)


def _z_and_grads(model: HeadModel, tokens: torch.Tensor, metric: Metric, attention_mask=None):
    """Head outputs of a run and the gradient of ``metric`` with respect to each (one backward pass).

    Each ``hook_z`` gets a zero tensor that requires grad added to it; its gradient is the gradient
    with respect to ``z``, through every later layer (the bridge's own weights stay frozen).
    """
    L = model.n_layers
    zs, probes = {}, {}

    def hook(z, hook):
        layer = int(hook.name.split(".")[1])
        zs[layer] = z.detach()
        probes[layer] = torch.zeros_like(z, requires_grad=True)
        return z + probes[layer]

    with torch.enable_grad():
        logits = model.bridge.run_with_hooks(tokens, attention_mask=attention_mask,
                                             fwd_hooks=[(z_name(l), hook) for l in range(L)])
        value = metric(logits)
        if value.numel() != 1:
            raise HeadlensError("attribution patching needs a metric that returns one value per run")
        grads = torch.autograd.grad(value.sum(), [probes[l] for l in range(L)])
    return zs, dict(enumerate(grads))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors over their finite entries."""
    a, b = a.flatten().double(), b.flatten().double()
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    denom = (a.norm() * b.norm()).item()
    return float((a @ b).item() / denom) if denom > 0 else float("nan")


def attribution_vs_exact(model: HeadModel, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
                         direction: str = "denoise", heads: Sequence[Head] | None = None,
                         attention_mask: torch.Tensor | None = None, batch_size: int | None = 64) -> dict:
    """Attribution patching next to exact patching: both as changes from the target run's metric.

    Returns ``{"attribution": [L, H], "exact": [L, H] (NaN for heads not asked), "pearson": r}``.
    """
    approx = attribution_patching(model, clean, corrupted, metric, direction,
                                  attention_mask=attention_mask)
    exact = patch_heads(model, clean, corrupted, metric, direction, heads,
                        attention_mask=attention_mask, batch_size=batch_size)
    target = (corrupted if direction == "denoise" else clean).to(model.device)
    with torch.no_grad():
        base = metric(model.bridge(target, attention_mask=attention_mask))
    base = base.float().cpu()
    exact = exact - base
    return {"attribution": approx, "exact": exact, "pearson": pearson(approx, exact)}
