"""Hook names, head addresses and the uniform pattern: what every method refers to.

TransformerLens names each activation by a hook point; the methods, detectors and plots name them
through these functions only (never inline strings):

>>> z_name(3), pattern_name(3), v_name(3)
('blocks.3.attn.hook_z', 'blocks.3.attn.hook_pattern', 'blocks.3.attn.hook_v')
>>> resid_name(3), mlp_out_name(3)
('blocks.3.hook_resid_pre', 'blocks.3.hook_mlp_out')
"""
from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import HeadlensError

__all__ = ["Head", "z_name", "pattern_name", "v_name", "q_name", "resid_name", "mlp_out_name", "FINAL_SCALE",
           "check_head", "uniform_pattern"]

Head = tuple[int, int]  # (layer, head), or (layer, head, position) to act at one position only
FINAL_SCALE = "ln_final.hook_scale"   # the final norm's scale, [batch, pos, 1]


def z_name(layer: int) -> str:
    """A layer's head outputs ``[batch, pos, head, d_head]`` (before the output projection)."""
    return f"blocks.{layer}.attn.hook_z"


def pattern_name(layer: int) -> str:
    """A layer's attention pattern ``[batch, head, query, key]``."""
    return f"blocks.{layer}.attn.hook_pattern"


def v_name(layer: int) -> str:
    """A layer's value vectors ``[batch, pos, kv_head, d_head]``."""
    return f"blocks.{layer}.attn.hook_v"


def q_name(layer: int) -> str:
    """A layer's queries ``[batch, pos, head, d_head]`` (before any rotary embedding).

    >>> q_name(3)
    'blocks.3.attn.hook_q'
    """
    return f"blocks.{layer}.attn.hook_q"


def resid_name(layer: int) -> str:
    """The residual stream entering block ``layer`` ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_resid_pre"


def mlp_out_name(layer: int) -> str:
    """A layer's MLP output ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_mlp_out"


def check_head(model, entry: tuple, n_pos: int | None = None) -> None:
    """Raise a one-line error unless ``entry`` is ``(layer, head)`` of ``model`` or, with ``n_pos``,
    ``(layer, head, position)`` with a position inside ``n_pos``-token prompts."""
    if len(entry) not in ((2, 3) if n_pos is not None else (2,)):
        shape = "(layer, head) or (layer, head, position)" if n_pos is not None else "(layer, head)"
        raise HeadlensError(f"a head is {shape}, not {entry}")
    layer, head = entry[:2]
    if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
        raise HeadlensError(f"no head L{layer}H{head} in {model.info.name} "
                            f"({model.n_layers} layers x {model.n_heads} heads)")
    if len(entry) == 3 and not -n_pos <= entry[2] < n_pos:
        raise HeadlensError(f"position {entry[2]} is outside the {n_pos}-token prompts")


def uniform_pattern(n_query: int, n_key: int, key_mask: torch.Tensor | None, device,
                    dtype) -> Float[Tensor, "batch 1 query key"]:
    """Attention spread evenly over the causal prefix: ``[batch|1, 1, n_query, n_key]``.

    Queries are the last ``n_query`` positions of ``n_key`` (so a KV-cached decoding step works too).
    """
    q = torch.arange(n_query, device=device)[:, None] + (n_key - n_query)
    k = torch.arange(n_key, device=device)[None, :]
    allowed = (k <= q).to(dtype)[None, None]
    if key_mask is not None:
        allowed = allowed * key_mask[:, None, None, :].to(dtype)
    return allowed / allowed.sum(-1, keepdim=True).clamp_min(1)
