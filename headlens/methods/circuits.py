"""Weight circuits and direct logit attribution shared by the OV-defined roles (successor, copy suppression).

- :func:`effective_embedding`: ``W_EE``, the residual after block 0 with its attention ablated
  (embedding + MLP0 output), computed by running the architecture's own block 0 with ``hook_attn_out``
  zeroed and positional embeddings removed, so GPT-2 (sequential), Llama (gated MLP, RMSNorm) and
  parallel-attention blocks are all handled by the model's own code.
- :func:`unembed_times_embedding`: ``W_U W_EE`` (normalised), a chunk of the vocabulary at a time.
- :func:`normalise`: what a (folded) LayerNorm/RMSNorm does before ``W_Q/W_K/W_V``: centre (LN only)
  and divide by the RMS; the gains are folded into the weights by the bridge's compatibility mode.
- :func:`ov_out`: every head's OV output ``x . W_V . W_O`` for a batch of residual vectors, all
  ``[n_layers, n_heads]`` at once (or the heads of some layers), grouped-query attention aware.
- :func:`layer_weights`: ``W_Q/W_K/W_V/W_O`` of some layers only, so that a weight circuit can go a
  piece of the model at a time instead of stacking (and upcasting) every layer's weights at once.
- :func:`head_dla`: every head's direct logit attribution at chosen positions, from cached ``hook_z``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from einops import einsum

from ..models import HeadModel
from .hooks import FINAL_SCALE, z_name


def effective_embedding(model: HeadModel, token_ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``[n, d_model]``: each token's residual after block 0 with block 0's attention ablated."""
    bridge = model.bridge

    def zero(x, hook):
        return torch.zeros_like(x)

    hooks = [("blocks.0.hook_attn_out", zero)]
    if "hook_pos_embed" in bridge.hook_dict:
        hooks.append(("hook_pos_embed", zero))
    ids = token_ids.reshape(-1, 1).to(model.device)
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), chunk):
            out.append(bridge.run_with_hooks(ids[i:i + chunk], stop_at_layer=1, fwd_hooks=hooks)[:, 0])
    return torch.cat(out).float()


def unembed_times_embedding(model: HeadModel, chunk: int = 4096) -> torch.Tensor:
    """``W_U @ normalise(W_EE)``, ``[d_model, d_model]`` in float32 on the unembedding's device: summed over
    the vocabulary ``chunk`` tokens at a time, so neither the effective embedding (``vocab x d_model``:
    0.67 GB in float32 for a 262k vocabulary) nor a float copy of ``W_U`` is ever held whole."""
    w_u = model.bridge.W_U
    vocab = model.bridge.cfg.d_vocab
    out = torch.zeros(w_u.shape[0], w_u.shape[0], dtype=torch.float32, device=w_u.device)
    for i in range(0, vocab, chunk):
        ids = torch.arange(i, min(i + chunk, vocab))
        out += w_u[:, i:i + chunk].float() @ normalise(model, effective_embedding(model, ids)).to(w_u.device)
    return out


def normalise(model: HeadModel, x: torch.Tensor) -> torch.Tensor:
    """``x`` as a folded LayerNorm/RMSNorm leaves it (centred for LN, divided by its RMS)."""
    x = x.float()
    if "LN" in str(getattr(model.bridge.cfg, "normalization_type", "LN")):
        x = x - x.mean(-1, keepdim=True)
    eps = float(getattr(model.bridge.cfg, "eps", 1e-5))
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def per_query_head(model: HeadModel, w: torch.Tensor) -> torch.Tensor:
    """Expand a ``[L, n_kv_heads, ...]`` key/value weight to ``[L, n_heads, ...]`` (GQA)."""
    rep = model.n_heads // model.info.n_kv_heads
    return w.repeat_interleave(rep, dim=1) if rep > 1 else w


def layer_weights(model: HeadModel, name: str, layers: Sequence[int], device=None) -> torch.Tensor:
    """``W_Q``, ``W_K``, ``W_V`` or ``W_O`` of ``layers`` only, ``[len(layers), heads, ...]`` in the model's
    dtype on ``device`` (default the model's): what ``model.bridge.<name>[layers]`` holds, without the
    bridge stacking every layer (tens of GiB at 70B) or moving every layer to one GPU."""
    device = model.device if device is None else device
    return torch.stack([getattr(model.bridge.blocks[l].attn, name).to(device) for l in layers])


def ov_out(model: HeadModel, x: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
    """``[L, H, n, d_model]``: every head's OV image ``x . W_V . W_O`` of the rows of ``x`` (already
    normalised); with ``layers``, the heads of those layers only (``[len(layers), H, n, d_model]``)."""
    layers = range(model.n_layers) if layers is None else layers
    w_v = per_query_head(model, layer_weights(model, "W_V", layers, x.device).float())  # [L, H, d, dh]
    v = einsum(x.float(), w_v, "n d, l h d e -> l h n e")
    del w_v
    return einsum(v, layer_weights(model, "W_O", layers, x.device).float(), "l h n e, l h e d -> l h n d")


def head_dla(model: HeadModel, cache, rows: torch.Tensor, positions: torch.Tensor,
             directions: torch.Tensor) -> torch.Tensor:
    """``[L, H, n]``: each head's direct effect at ``(rows[i], positions[i])`` along ``directions[i]`` (d_model).

    The head's output ``z . W_O`` through the final norm's scale (from ``ln_final.hook_scale``), dotted
    with the direction (e.g. ``W_U[:, a] - W_U[:, b]``). Exact with folded norms.
    """
    w_o = model.bridge.W_O.float()      # the bridge re-stacks W_O on every access: read it once
    home = model.device   # layers may sit on several GPUs: meet where the stacked weights are
    scale = cache[FINAL_SCALE][rows, positions].float().reshape(-1).to(home)  # [n]
    d = directions.float().to(scale.device)
    out = torch.zeros(model.n_layers, model.n_heads, len(positions))
    for l in range(model.n_layers):  # one layer at a time keeps memory small; all heads at once
        z = cache[z_name(l)][rows, positions].float().to(home)          # [n, H, dh]
        wd = einsum(w_o[l], d, "h e d, n d -> n h e")
        out[l] = (einsum(z, wd, "n h e, n h e -> h n") / scale).cpu()
    return out
