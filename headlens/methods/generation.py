"""Greedy decoding with the KV cache, optional per-row head ablation, and the top-1 attended position
of every head at every generated token, without materialising attention patterns.

The bridge processes the weights in place (LayerNorm folding and friends) inside the model's own
transformers modules, so the forward pass here runs those modules directly (the bridge's wrappers are
taken out of the module tree for the duration, :func:`native_forward`) with one attention function of
ours, registered with transformers as ``"headlens"``:

- a prompt is prefilled with PyTorch's memory-efficient attention (SDPA); only the last query row of each
  head (the row that predicts the next token) is computed explicitly, from the cached keys after the
  rotary embedding, per query head (grouped-query attention needs nothing special);
- each decoding step computes that one row explicitly;
- a head ablated by uniform attention ("undifferentiated attention") outputs the mean of the values over
  its causal prefix: during prefill a running mean (cumulative sum / count, padding left out), at a
  decoding step the mean of the cached values;
- a steered head (PASTA, :func:`headlens.methods.steering.steer`, which sets :data:`_STEER`) gets
  ``log(alpha)`` added to its scores of the prompt's keys outside the emphasised spans: an additive float
  mask ``[batch, heads, q, key]`` for SDPA in the steered layers only, the same bias on the explicit row
  of a decoding step (:class:`Steering`).

Prompts of different lengths are left-padded; positions are counted over real tokens, so every row is
computed as if it were alone. Runs that share a prefix (the same long context up to a needle, the chat
header) can prefill it once (:func:`prefill`) and start from a copy of its KV cache (``prefix=``).
Positions returned are in each prompt's own coordinates. ``tests/test_retrieval.py`` checks all of this
against the bridge's eager attention with full patterns.

Whether the transformers modules compute the bridge's function is checked once per model
(:func:`uses_native`); where they do not (GPT-2: its bridge keeps the split, processed QKV weights to
itself) decoding goes through the bridge with eager attention and pattern hooks, as before (no prefix
reuse there).
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import HeadlensError
from ..models import kv_cache_fix, left_pad  # noqa: F401  (left_pad: re-exported)
from .hooks import Head, pattern_name, uniform_pattern

PREFILL_CHUNK = 8192   # default tokens prefilled per forward pass: longer prompts go in chunks (bounds activations)
_ACTIVE: contextvars.ContextVar["_State | None"] = contextvars.ContextVar("headlens_attention", default=None)
ATTN_NAME = "headlens"


@dataclass
class _State:
    """What the attention function needs for one forward pass."""
    key_mask: Bool[Tensor, "batch key"]                 # real tokens among all key columns (cache + new)
    ablate: dict[int, Bool[Tensor, "batch head"]] = field(default_factory=dict)
    record: bool = False
    top1: dict[int, Int[Tensor, "batch head"]] = field(default_factory=dict)   # key column, per layer
    cache: object = None                                  # the forward pass's DynamicCache
    bias: dict[int, tuple] = field(default_factory=dict)   # steering, per layer: (heads, [batch, head, 1, key])


@dataclass
class Steering:
    """PASTA steering on the native path: in every forward pass of ``hf`` (the transformers model) inside
    :func:`headlens.methods.steering.steer`, the ``heads`` (per layer a bool ``[n_heads]`` of query heads)
    get ``log_alpha`` added to their scores of each row's prompt keys outside its emphasised tokens.

    Positions are each row's own (real tokens counted from its first, padding left out), so the bias
    follows the row whatever its padding or cache: ``emphasised`` ``[rows, max_len]`` (True on emphasised
    prompt positions, right-padded) and ``lengths`` ``[rows]`` (prompt tokens; keys at and after it, the
    generated tokens, are not scaled). A row with no emphasised token is not steered. One row serves every
    row of a batch."""
    hf: object
    heads: dict[int, Bool[Tensor, " head"]]
    emphasised: Bool[Tensor, "rows pos"]
    lengths: Int[Tensor, " rows"]
    log_alpha: float

    def columns(self, key_mask: Bool[Tensor, "batch key"]) -> Float[Tensor, "batch key"]:
        """``log_alpha`` on the key columns this steering down-weights, 0 elsewhere."""
        b, dev = key_mask.shape[0], key_mask.device
        emph, lengths = self.emphasised.to(dev), self.lengths.to(dev)
        if emph.shape[0] not in (1, b):
            raise HeadlensError(f"steering: the emphasis has {emph.shape[0]} rows, the forward pass {b}")
        pos = key_mask.long().cumsum(1) - 1                                        # key column -> position
        inside = emph.expand(b, -1).gather(1, pos.clamp(0, emph.shape[1] - 1))
        down = key_mask & (pos < lengths.expand(b)[:, None]) & ~inside & emph.any(1, keepdim=True)
        return torch.where(down, self.log_alpha, 0.0)


_STEER: contextvars.ContextVar[tuple[Steering, ...]] = contextvars.ContextVar("headlens_steer", default=())


def _steer_bias(hf, key_mask: Tensor, dtype) -> dict[int, tuple[Tensor, Float[Tensor, "batch head 1 key"]]]:
    """Per steered layer, its steered query heads (an index) and the additive bias of the active
    steerings of ``hf`` over all its heads (summed: nested blocks multiply their scales)."""
    bias: dict[int, Tensor] = {}
    heads: dict[int, Tensor] = {}
    for spec in _STEER.get():
        if spec.hf is not hf:
            continue
        cols = spec.columns(key_mask)[:, None, None, :]                            # [b, 1, 1, key]
        for layer, sel in spec.heads.items():
            sel = sel.to(cols.device)
            b = (sel[None, :, None, None] * cols).to(dtype)                         # [b, head, 1, key]
            bias[layer] = bias[layer] + b if layer in bias else b
            heads[layer] = heads[layer] | sel if layer in heads else sel
    return {l: (heads[l].nonzero()[:, 0], bias[l]) for l in bias}


@contextlib.contextmanager
def steering(spec: Steering):
    """Apply ``spec`` to the native forward passes inside the block (nested blocks add up); what
    :func:`headlens.methods.steering.steer` uses for the native path."""
    token = _STEER.set(_STEER.get() + (spec,))
    try:
        yield
    finally:
        _STEER.reset(token)


def steering_active(model) -> bool:
    """Whether a :func:`~headlens.methods.steering.steer` block steers ``model``'s native forward passes."""
    return any(spec.hf is model.bridge.original_model for spec in _STEER.get())


def _biased_mask(attention_mask: Tensor | None, bias: Tensor, q_len: int, n_key: int, dtype) -> Tensor:
    """The float mask ``[batch, heads, q, n_key]``: the attention mask (bool or float; None: causal, the
    queries the last ``q_len`` of ``n_key`` keys) plus the steering ``bias`` of its last ``n_key`` columns.
    Masked keys get the dtype's lowest value (a fully masked padding row stays finite, as transformers'
    own float masks)."""
    if attention_mask is None:
        q = torch.arange(q_len, device=bias.device)[:, None] + (n_key - q_len)
        attention_mask = (torch.arange(n_key, device=bias.device)[None, :] <= q)[None, None]
    m = attention_mask[..., -q_len:, -n_key:]
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
    return m.to(dtype) + bias[..., -n_key:].to(m.device)


def _mask_scores(scores: Tensor, attention_mask: Tensor | None) -> Tensor:
    if attention_mask is None:
        return scores
    m = attention_mask[..., -scores.shape[-2]:, -scores.shape[-1]:]
    if m.dtype == torch.bool:
        return scores.masked_fill(~m, float("-inf"))
    return scores + m


def _grouped(query: Tensor, n_kv: int) -> Tensor:
    """``[batch, heads, q, d]`` -> ``[batch, kv_heads, groups * q, d]``: the query heads that read one key
    head side by side (query head ``h`` reads key head ``h // groups``), so keys and values are never
    repeated."""
    b, h, q, d = query.shape
    return query.reshape(b, n_kv, (h // n_kv) * q, d)


def _ungrouped(x: Tensor, n_heads: int) -> Tensor:
    """``[batch, kv_heads, groups * q, n]`` -> ``[batch, heads, q, n]`` (inverse of :func:`_grouped`)."""
    b, kv, gq, n = x.shape
    return x.reshape(b, n_heads, gq * kv // n_heads, n)


def _last_row(query, key, attention_mask, scaling, softcap) -> Tensor:
    """Attention weights of the last query row: ``[batch, n_heads, 1, key]`` in the query's dtype."""
    scores = _ungrouped(torch.matmul(_grouped(query[:, :, -1:], key.shape[1]), key.transpose(-1, -2)),
                        query.shape[1]) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = _mask_scores(scores, None if attention_mask is None else attention_mask[..., -1:, :])
    return torch.softmax(scores.float(), dim=-1).to(query.dtype)


def _weighted_values(weights: Tensor, value: Tensor) -> Tensor:
    """``weights [batch, heads, q, k]`` applied to ``value [batch, kv_heads, k, d]``: ``[batch, q, heads, d]``."""
    out = torch.matmul(_grouped(weights, value.shape[1]), value)                  # [b, kv, g * q, d]
    return _ungrouped(out, weights.shape[1]).transpose(1, 2).contiguous()


def _attention(module, query: Float[Tensor, "batch head q d"], key: Float[Tensor, "batch kv k d"],
               value: Float[Tensor, "batch kv k d"], attention_mask: Tensor | None, scaling: float | None = None,
               dropout: float = 0.0, **kwargs) -> tuple[Float[Tensor, "batch q head d"], None]:
    """transformers attention function: SDPA for a prompt, one explicit row per decoding step; the top-1
    key of the last row recorded and uniform-attention ablation applied where the active state asks.
    Rows that continue a shared clean context (:class:`Context`) read its keys and values in place.
    Returns the heads' outputs ``[batch, q, head, d_head]`` (no weights)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    softcap = kwargs.get("softcap")
    q_len = query.shape[2]
    weights = None
    st = _ACTIVE.get()
    layer = int(module.layer_idx)
    shared = st.cache.layers[layer] if st is not None and st.cache is not None else None
    shared = shared if getattr(shared, "context", None) is not None else None
    steered = st.bias.get(layer) if st is not None else None
    eager_path = kwargs.get("s_aux") is not None or (softcap is not None and q_len > 1)
    plain_mask = attention_mask
    if steered is not None:
        if shared is not None:
            raise HeadlensError("steering does not combine with a shared context")
        heads, bias = steered
        n_key = attention_mask.shape[-1] if attention_mask is not None else key.shape[2]
        if q_len == 1 or eager_path:          # one row (or the eager function): every head's mask, biased
            attention_mask = _biased_mask(attention_mask, bias, q_len, n_key, query.dtype)
    if shared is not None:
        out, weights = _context_attention(query, key, value, shared, attention_mask, scaling, softcap)
    elif eager_path:
        # attention sinks, or softcapping in a prompt: the architecture's own eager attention
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        weights = weights[:, :, -1:]
    elif q_len == 1:
        weights = _last_row(query, key, attention_mask, scaling, softcap)
        out = _weighted_values(weights, value)
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, **kwargs)
        if steered is not None:               # the steered heads again, with the biased float mask
            out = _steered_heads(out, query, key, value, heads, _biased_mask(
                attention_mask, bias[:, heads], q_len, n_key, query.dtype), scaling)
            if st.record:                     # the last row's weights, steered, for the top-1 key
                attention_mask = _biased_mask(None if plain_mask is None else plain_mask[..., -1:, :],
                                              bias, 1, n_key, query.dtype)
    if st is None:
        return out, None
    if st.record:
        if weights is None:
            weights = _last_row(query, key, attention_mask, scaling, softcap)
        # the weights' columns are the last ones of the sequence (all of them, or a sliding-window
        # layer's window): key-mask columns from `offset` on
        offset = st.key_mask.shape[1] - weights.shape[-1]
        top = weights[:, :, -1].argmax(-1)
        if layer in st.ablate:      # uniform attention: its first key, as argmax of a uniform row gives
            first = st.key_mask[:, offset:].long().argmax(-1)
            top = torch.where(st.ablate[layer], first[:, None], top)
        st.top1[layer] = top + offset
    if layer in st.ablate:
        out = _uniform(out, value, st.key_mask, st.ablate[layer], q_len, shared)
    return out, None


def _steered_heads(out: Float[Tensor, "batch q head d"], query, key, value, heads: Int[Tensor, " steered"],
                   mask: Float[Tensor, "batch steered q k"], scaling: float) -> Float[Tensor, "batch q head d"]:
    """``out`` with the ``heads``' outputs recomputed by SDPA under their biased float ``mask``: the mask
    is materialised for the steered query heads only (each reads its key/value head), not all heads."""
    kv = heads // (query.shape[1] // key.shape[1])
    steered = torch.nn.functional.scaled_dot_product_attention(
        query[:, heads], key[:, kv], value[:, kv], attn_mask=mask.to(query.dtype), scale=scaling)
    out = out.clone()
    out[:, :, heads] = steered.transpose(1, 2).to(out.dtype)
    return out


def _context_attention(query, key, value, layer, attention_mask, scaling, softcap):
    """Attention of rows over their shared context's keys (read in place, each context row by all the
    rows that continue it) followed by their own ``key``: explicit weights ``[batch, heads, q, n]``
    (columns: context, then own) and outputs ``[batch, q, heads, d]``."""
    ctx_k, ctx_v, index = layer.context
    n_kv, n_heads = key.shape[1], query.shape[1]
    grouped = _grouped(query, n_kv)                                                # [b, kv, g * q, d]
    b, _, gq, d = grouped.shape
    n_ctx = ctx_k.shape[2]
    part = grouped.new_empty(b, n_kv, gq, n_ctx)
    for c, rows in layer.rows_of():                      # every row of one context row in one product
        q = grouped[rows].permute(1, 0, 2, 3).reshape(n_kv, -1, d)                # [kv, rows * g * q, d]
        part[rows] = torch.bmm(q, ctx_k[c].transpose(1, 2)).reshape(n_kv, len(rows), gq, n_ctx).transpose(0, 1)
    scores = _ungrouped(torch.cat([part, torch.matmul(grouped, key.transpose(-1, -2))], -1), n_heads) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    weights = torch.softmax(_mask_scores(scores, attention_mask).float(), dim=-1).to(query.dtype)
    w = _grouped(weights, n_kv)
    out = torch.matmul(w[..., n_ctx:], value)                                     # [b, kv, g * q, d]
    for c, rows in layer.rows_of():
        wc = w[rows, ..., :n_ctx].permute(1, 0, 2, 3).reshape(n_kv, -1, n_ctx)
        out[rows] += torch.bmm(wc, ctx_v[c]).reshape(n_kv, len(rows), gq, d).transpose(0, 1)
    return _ungrouped(out, n_heads).transpose(1, 2).contiguous(), weights


def _uniform(out: Float[Tensor, "batch q head d"], value: Float[Tensor, "batch kv k d"],
             key_mask: Bool[Tensor, "batch k"], ablate: Bool[Tensor, "batch head"], q_len: int,
             shared=None) -> Float[Tensor, "batch q head d"]:
    """Put the mean of the values over each query's causal prefix (real tokens only; a running mean over
    a prompt, a plain mean at a decoding step) in place of the output of the ablated heads: uniform
    attention without a pattern. ``value`` holds the last ``value.shape[2]`` key columns; a shared
    context's values before them enter through their sums (``shared``)."""
    m = key_mask[:, None, -value.shape[2]:, None].to(torch.float32)               # [b, 1, k, 1]
    if q_len == 1:
        total = torch.matmul(m.transpose(-1, -2), value.float())                  # [b, kv, 1, d]
        count = m.sum(2, keepdim=True)
    else:
        total = torch.cumsum(value.float() * m, dim=2)[:, :, -q_len:]
        count = torch.cumsum(m, dim=2)[:, :, -q_len:]
    if shared is not None:
        ctx_total, ctx_count = shared.context_sums()
        total, count = total + ctx_total, count + ctx_count
    mean = (total / count.clamp_min(1)).to(out.dtype)                            # [b, kv, q, d]
    mean = mean.repeat_interleave(out.shape[2] // value.shape[1], dim=1).transpose(1, 2)   # [b, q, head, d]
    return torch.where(ablate[:, None, :, None].to(out.device), mean, out)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, _attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


@contextlib.contextmanager
def native_forward(model):
    """Run the model's transformers modules directly with the ``headlens`` attention function.

    The bridge's wrappers are swapped out of the transformers module tree for the block and put back
    afterwards; the weights are the same tensors (processed by the bridge), so the function is the
    bridge's (tested: same tokens, same top-1 positions as the bridge's eager attention). Bridge hooks
    do not fire inside the block.
    """
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    _register()
    hf = model.bridge.original_model
    swaps = []

    def unwrap(module):
        for name, child in list(module._modules.items()):
            if isinstance(child, GeneralizedComponent) and child.original_component is not None:
                swaps.append((module, name, child))
                module._modules[name] = child.original_component
                unwrap(child.original_component)
            elif child is not None and not isinstance(child, GeneralizedComponent):
                unwrap(child)

    configs = [c for c in {id(m.config): m.config for m in hf.modules() if hasattr(m, "config")
                           and hasattr(m.config, "_attn_implementation")}.values()]
    old = [c._attn_implementation for c in configs]
    try:
        unwrap(hf)
        for c in configs:
            c._attn_implementation = ATTN_NAME
        with torch.no_grad(), warnings.catch_warnings():
            # transformers 5.x renames ``past_key_values`` to ``cache`` and flags the old name on every call
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            yield hf
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o
        for module, name, child in reversed(swaps):
            module._modules[name] = child


@dataclass
class Generation:
    tokens: list[list[int]]           # generated ids per row (up to and without the stop token)
    top1: torch.Tensor | None         # [steps, n_layers, batch, n_heads] top-1 key position (unpadded), -1 = none
    prompt_lengths: list[int]
    logits: torch.Tensor | None = None   # [steps, batch, vocab] the logits each token was chosen from (keep_logits)


@dataclass
class Prefix:
    """A prefilled token sequence: its KV cache for runs that start with it (:func:`prefill`), one row per
    set of heads ablated (uniform attention) while it was prefilled."""
    tokens: list[int]
    keys: list[Tensor]                # per layer [rows, kv_heads, len(tokens), d_head]
    values: list[Tensor]
    variants: tuple[frozenset, ...] = (frozenset(),)   # the heads ablated in each row

    @property
    def heads(self) -> frozenset:
        """The heads ablated in its first (usually only) row."""
        return self.variants[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def rows_for(self, ablate: Sequence[Iterable[Head]]) -> list[int]:
        """The row whose ablated heads each of ``ablate`` matches (an error if one matches none)."""
        where = {v: i for i, v in enumerate(self.variants)}
        try:
            return [where[frozenset(tuple(h) for h in heads)] for heads in ablate]
        except KeyError:
            raise HeadlensError("a prefix is reused only by rows that ablate the same heads as one of "
                                "its rows did while it was prefilled") from None


@dataclass
class Context:
    """Clean KV caches of prompts, left-padded to one length (:func:`prefill_context`), that any number of
    rows continue: every row reads its prompt's keys and values in place (no copy), so the ablation
    variants of a needle run share one prefilled prompt (as Wu et al. mask heads only while decoding)."""
    prompts: list[list[int]]
    keys: list[Tensor]                # per layer [n_prompts, kv_heads, n, d_head]
    values: list[Tensor]
    mask: Tensor                      # [n_prompts, n]: real tokens (left padding is False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def rows_for(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        """For each prompt, the longest context prompt it continues (an error if none: a context row
        must leave at least one token of the prompt to run)."""
        rows = []
        for p in prompts:
            best = max((i for i, c in enumerate(self.prompts) if len(c) < len(p) and list(p[:len(c)]) == c),
                       key=lambda i: len(self.prompts[i]), default=None)
            if best is None:
                raise HeadlensError("a context is continued only by prompts that start with one of its "
                                    "prompts and go on after it")
            rows.append(best)
        return rows


_LAYER: type | None = None


def _layer_class() -> type:
    """:class:`transformers.cache_utils.DynamicLayer` writing into a buffer instead of concatenating."""
    global _LAYER
    if _LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class _Layer(DynamicLayer):
            """One layer's KV cache in a buffer of ``capacity`` tokens (grown by doubling if exceeded):
            new keys and values are written in place, so a decoding step copies only its own token (a
            ``DynamicLayer`` concatenates, copying the whole cache at every step). With ``context``
            (``(keys, values, rows)``: a :class:`Context`'s tensors and each row's context row), the rows
            continue those shared clean prompts, read in place; the buffer holds the rows' own tokens."""

            def __init__(self, capacity: int = 0, context=None, context_mask: Tensor | None = None):
                super().__init__()
                self.capacity, self.context, self.context_mask = capacity, context, context_mask
                self.n, self._k, self._v, self._sums, self._rows = 0, None, None, None, None

            def hold(self, keys: Tensor, values: Tensor) -> None:
                """Start from these tensors (no copy until the first update)."""
                self.lazy_initialization(keys, values)
                self.keys, self.values, self.n = keys, values, keys.shape[-2]

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                new = key_states.shape[-2]
                if self._k is None or self.n + new > self._k.shape[-2]:
                    cap = max(self.capacity, self.n + new, 2 * self.n if self._k is not None else 0)
                    k = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
                    v = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
                    if self.n:
                        k[:, :, :self.n], v[:, :, :self.n] = self.keys, self.values
                    self._k, self._v = k, v
                self._k[:, :, self.n:self.n + new] = key_states
                self._v[:, :, self.n:self.n + new] = value_states
                self.n += new
                self.keys, self.values = self._k[:, :, :self.n], self._v[:, :, :self.n]
                return self.keys, self.values

            def get_seq_length(self) -> int:
                return self.n + (self.context[0].shape[2] if self.context is not None else 0)

            def rows_of(self) -> list[tuple[int, Tensor]]:
                """``(context row, rows that continue it)`` for every context row in use."""
                if self._rows is None:
                    index = self.context[2]
                    self._rows = [(int(c), (index == c).nonzero()[:, 0]) for c in index.unique()]
                return self._rows

            def context_sums(self) -> tuple[Tensor, Tensor]:
                """Per row, the sum of its context's values over real tokens ``[rows, kv, 1, d]`` and
                their count ``[rows, 1, 1, 1]`` (for uniform attention)."""
                if self._sums is None:
                    _, values, index = self.context
                    m = self.context_mask[:, None, None, :].to(torch.float32)       # [ctx rows, 1, 1, n]
                    total = torch.matmul(m, values.float())                        # [ctx rows, kv, 1, d]
                    self._sums = (total[index], m.sum(-1, keepdim=True)[index])
                return self._sums

        _LAYER = _Layer
    return _LAYER


def _pad_id(model) -> int:
    """The tokenizer's padding id (0 when it has none: padded positions are masked anyway)."""
    return model.pad_id()


def row_masks(model, ablate: Sequence[Iterable[Head]], batch: int) -> dict[int, torch.Tensor]:
    """Per touched layer, a bool ``[batch, n_heads]`` mask of the heads each row ablates."""
    if len(ablate) != batch:
        raise HeadlensError(f"ablate has {len(ablate)} rows for {batch} prompts")
    masks: dict[int, torch.Tensor] = {}
    for row, heads in enumerate(ablate):
        for layer, head in heads:
            if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
                raise HeadlensError(f"no head L{layer}H{head} in {model.info.name}")
            masks.setdefault(layer, torch.zeros(batch, model.n_heads, dtype=torch.bool))[row, head] = True
    return masks


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes in one row (all layers, keys and values)."""
    i = model.info
    itemsize = torch.empty(0, dtype=getattr(torch, i.dtype)).element_size()
    return 2 * i.n_layers * i.n_kv_heads * i.d_head * itemsize


def _cache(hf, keys: list[Tensor] | None = None, values: list[Tensor] | None = None, capacity: int = 0,
           context: "Context | None" = None, rows: Tensor | None = None):
    """A DynamicCache whose full-attention layers are buffers of ``capacity`` tokens (:func:`_layer_class`)
    starting from ``keys``/``values`` (held, not copied), or continuing ``context``'s rows ``rows``."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=hf.config)
    if not cache.layers:
        cache.layers = [DynamicLayer() for _ in range(hf.config.get_text_config(decoder=True).num_hidden_layers)]
    layer = _layer_class()
    for i, held in enumerate(cache.layers):
        if type(held) is DynamicLayer:
            shared = None if context is None else (context.keys[i], context.values[i], rows)
            cache.layers[i] = layer(capacity, shared, None if context is None else context.mask)
        elif context is not None:
            raise HeadlensError("a context is shared only by models whose layers all attend to the whole "
                                "sequence")
    for i, (k, v) in enumerate(zip(keys or [], values or [])):
        if isinstance(cache.layers[i], layer):
            cache.layers[i].hold(k, v)
        else:
            cache.update(k, v, i)
    return cache


def shares_context(hf) -> bool:
    """Whether rows can continue a shared :class:`Context` (every layer a full-attention cache)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    return all(type(l) is DynamicLayer for l in DynamicCache(config=hf.config).layers)


def context_supported(model) -> bool:
    """Whether rows of ``model`` can continue a shared :class:`Context` (:func:`prefill_context`): it
    decodes natively and every layer attends to the whole sequence."""
    return uses_native(model) and shares_context(model.bridge.original_model)


def _cache_tensors(cache) -> tuple[list[Tensor], list[Tensor]]:
    return [l.keys for l in cache.layers], [l.values for l in cache.layers]


def _cache_argument(hf) -> str:
    """The name the model's forward takes its KV cache under: ``cache`` in transformers >= 5.x releases
    that renamed it (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "past_key_values"


def _forward(hf, state: _State, tokens: Tensor, cache, keep: int = 1) -> Tensor:
    """One forward pass of new ``tokens`` ``[batch, n]`` after ``cache``; logits of the last ``keep``
    positions ``[batch, keep, vocab]``."""
    mask = state.key_mask
    positions = (mask.long().cumsum(1) - 1).clamp_min(0)[:, -tokens.shape[1]:]
    state.cache = cache
    state.bias = _steer_bias(hf, mask, hf.dtype) if _STEER.get() else {}
    token = _ACTIVE.set(state)
    try:
        out = hf(input_ids=tokens, attention_mask=mask.long(), position_ids=positions, use_cache=True,
                 logits_to_keep=keep, **{_cache_argument(hf): cache})
    finally:
        _ACTIVE.reset(token)
    return out.logits


def prefill(model, tokens: Sequence[int], ablate: Iterable[Head] = (),
            variants: Sequence[Iterable[Head]] | None = None) -> Prefix:
    """Prefill ``tokens`` once and keep the KV cache for runs that start with them: one row with
    ``ablate``'s heads made uniform, or with ``variants`` one row per set of heads (batched).

    >>> shared = prefill(model, haystack, variants=[[], [(17, 3)]])      # doctest: +SKIP
    >>> greedy_generate(model, [haystack + q1, haystack + q2], 32, ablate=[[(17, 3)], []],
    ...                 prefix=shared)                                 # doctest: +SKIP
    """
    tokens = list(tokens)
    if not tokens:
        raise HeadlensError("prefill needs a non-empty token list")
    _no_steering(model, "prefill")
    model.check_length(len(tokens), "prefix")
    rows = [ablate] if variants is None else list(variants)
    heads = tuple(frozenset(tuple(h) for h in v) for v in rows)
    if not uses_native(model):          # decoded through the bridge, which does not reuse a prefix
        return Prefix(tokens, [], [], heads)
    with native_forward(model) as hf:
        x = torch.tensor([tokens], device=model.device).expand(len(rows), -1)
        state = _State(key_mask=torch.ones_like(x, dtype=torch.bool), ablate=row_masks(model, heads, len(rows)))
        state.ablate = {l: m.to(model.device) for l, m in state.ablate.items()}
        cache = _cache(hf, capacity=len(tokens))
        _forward(hf, state, x, cache)
    keys, values = _cache_tensors(cache)
    return Prefix(tokens, keys, values, heads)


def _no_steering(model, what: str) -> None:
    if steering_active(model):
        raise HeadlensError(f"{what} shares prefilled tokens between rows, which steering does not: call it "
                            "outside the steer() block")


def shared_length(prompt: Sequence[int], prefix: Sequence[int]) -> int:
    """Length of the common start of ``prompt`` and ``prefix``, leaving at least one prompt token."""
    n = min(len(prompt) - 1, len(prefix))
    a = torch.as_tensor(list(prompt[:n])) != torch.as_tensor(list(prefix[:n]))
    return int(a.nonzero()[0]) if bool(a.any()) else n


def uses_native(model) -> bool:
    """Whether the model's transformers modules compute the bridge's function (checked once per model on a
    few tokens: next-token log-probabilities agree to 1e-4). True for Llama-like models, whose bridge
    keeps the processed weights in those modules; GPT-2's bridge keeps its split QKV weights to itself, so
    it decodes through the bridge with eager attention instead (full patterns)."""
    if "native" not in model.memo:
        x = torch.arange(1, 9, device=model.device)[None] % model.bridge.cfg.d_vocab
        unsteered = _STEER.set(())
        with torch.no_grad():
            ref = torch.log_softmax(model.bridge(x)[:, -1].float(), -1)
            with native_forward(model) as hf:
                state = _State(key_mask=torch.ones_like(x, dtype=torch.bool))
                got = torch.log_softmax(_forward(hf, state, x, _cache(hf))[:, -1].float(), -1)
        _STEER.reset(unsteered)
        tol = 1e-4 if ref.dtype == torch.float32 and model.info.dtype == "float32" else 5e-2
        model.memo["native"] = bool((got - ref).abs().max() <= tol * max(1.0, ref.abs().max()))
    return model.memo["native"]


def _decode(logits: Tensor, advance, positions, max_new_tokens: int, stops: set[int], batch: int,
            record_top1: bool, kept: list | None = None) -> tuple[list[list[int]], Tensor | None]:
    """The greedy loop: ``advance(next_ids) -> logits``; ``positions() -> [layers, batch, heads]``; each
    step's logits appended to ``kept`` when given."""
    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    top1 = []
    for step in range(max_new_tokens):
        if kept is not None:
            kept.append(logits.detach().float().cpu())
        nxt = logits.argmax(-1)
        if record_top1:
            top1.append(torch.where(done[None, :, None], -1, positions().cpu()))
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                if t in stops:
                    done[i] = True
                else:
                    out[i].append(t)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = advance(nxt)
    return out, (torch.stack(top1) if record_top1 else None)


def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    ablate: Sequence[Iterable[Head]] | None = None, record_top1: bool = False,
                    stop_ids: Iterable[int] = (), prefix: Prefix | None = None,
                    chunk_tokens: int | None = None, ablate_prompt: bool = True,
                    context: Context | None = None, keep_logits: bool = False) -> Generation:
    """Greedy-decode every prompt (a token list, BOS included) for up to ``max_new_tokens``.

    ``ablate[i]`` lists the heads whose attention is made uniform in row ``i``: at every prompt token and
    decoding step, or with ``ablate_prompt=False`` only from the prompt's last token on (the passes that
    produce the answer; Wu et al.'s masking): the prompts are then prefilled clean, once per distinct
    prompt, and every row reads its prompt's cache in place (a :class:`Context`; pass ``context`` from
    :func:`prefill_context` to reuse one across calls). With ``record_top1`` the top-1 key position of
    every head's last query row is kept at each step (the step that produced generated token ``t``), for
    copy-paste scores. With ``prefix`` (from :func:`prefill`), each row starts from the KV cache of the
    prefix's row that ablated the same heads, for the tokens it shares with it. With no ``stop_ids``
    every row decodes ``max_new_tokens`` tokens. ``chunk_tokens`` prefills the prompts that many tokens at
    a time (0: at once; default :data:`PREFILL_CHUNK`), which bounds the activations' memory: a
    32k-token prompt of an 8B model peaks at 1.41x its weights in 8192-token chunks, 1.56x at once
    (``docs/scale.md``). Inside :func:`headlens.steer` the steered heads are steered in the prompt and at
    every decoding step (the prompts must be the emphasised ones; no prefix or context then).

    Returns a :class:`Generation`: generated ids per row, ``top1`` ``[steps, n_layers, batch,
    n_heads]`` (positions in each prompt, -1 after a row stopped) when recorded, and with
    ``keep_logits`` the logits every token was chosen from ``[steps, batch, vocab]`` (float32, on the CPU).

    >>> g = greedy_generate(model, [ids, ids], 32, ablate=[[], [(17, 3)]], ablate_prompt=False)  # doctest: +SKIP
    >>> g.tokens[0], g.tokens[1]          # clean answer, answer with L17H3 uniform while answering  # doctest: +SKIP
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise HeadlensError("greedy_generate needs non-empty prompts")
    lengths = [len(p) for p in prompts]
    batch = len(prompts)
    model.check_length(max(lengths) + max_new_tokens, "prompt plus generated tokens")
    masks = row_masks(model, ablate, batch) if ablate is not None else {}
    stops = set(int(s) for s in stop_ids)
    masks = {l: m.to(model.device) for l, m in masks.items()}
    kept = [] if keep_logits else None
    native = uses_native(model)
    steering = _check_steering(model, lengths) if _STEER.get() else False
    if steering and (prefix is not None or context is not None or (native and not ablate_prompt)):
        raise HeadlensError("steered generation runs each prompt whole: no prefix, context or ablate_prompt=False")
    if not native:
        if context is not None:
            raise HeadlensError(f"{model.info.name} decodes through the bridge, which does not continue a "
                                "shared context")
        tokens, out = _bridge_generate(model, prompts, max_new_tokens, masks, record_top1, stops, _pad_id(model),
                                       ablate_prompt, kept)
        return Generation(tokens=tokens, top1=out, prompt_lengths=lengths, logits=_stacked(kept))
    with native_forward(model) as hf:
        if context is not None and ablate_prompt and masks:
            raise HeadlensError("a context is prefilled clean: rows that continue it ablate heads only "
                                "from their prompt's last token on (ablate_prompt=False)")
        if context is None and not ablate_prompt and min(lengths) > 1 and shares_context(hf):
            distinct = [list(p) for p in dict.fromkeys(tuple(p[:-1]) for p in prompts)]
            context = _prefill_context(model, hf, distinct, prefix, chunk_tokens)
        state, cache, logits = _start(model, hf, prompts, masks, record_top1, prefix, context, ablate,
                                      max_new_tokens, chunk_tokens, ablate_prompt)

        def advance(nxt):
            state.key_mask = torch.cat([state.key_mask, torch.ones_like(state.key_mask[:, :1])], 1)
            state.top1 = {}
            return _forward(hf, state, nxt[:, None], cache)[:, -1]

        def positions():
            position = state.key_mask.long().cumsum(1) - 1                      # key column -> token position
            return torch.stack([position.gather(1, state.top1[l].to(position.device)) for l in range(model.n_layers)])

        out, top1 = _decode(logits[:, -1], advance, positions, max_new_tokens, stops, batch, record_top1, kept)
    return Generation(tokens=out, top1=top1, prompt_lengths=lengths, logits=_stacked(kept))


def _stacked(kept: list | None) -> Tensor | None:
    return None if kept is None else torch.stack(kept)


def _check_steering(model, lengths: list[int]) -> bool:
    """Whether ``model`` is steered here; if so, that the prompts are as long as the emphasised ones (the
    emphasis is laid over each prompt's own positions)."""
    specs = [s for s in _STEER.get() if s.hf is model.bridge.original_model]
    for spec in specs:
        want = spec.lengths.tolist()
        if len(want) not in (1, len(lengths)) or any(a != b for a, b in zip(want * len(lengths), lengths)):
            raise HeadlensError(f"steering: the prompts ({lengths} tokens) are not the emphasised ones ({want})")
    return bool(specs)


def _start(model, hf, prompts, masks, record, prefix, context, ablate, max_new_tokens, chunk_tokens,
           ablate_prompt, keep: int = 1):
    """Prefill the rows' prompts (the part after their prefix's or context's tokens): ``(state, cache,
    logits of the last keep positions)``, ready to decode."""
    batch = len(prompts)
    if context is not None:
        rows = context.rows_for(prompts)
        shared = [len(context.prompts[r]) for r in rows]
        rows = torch.tensor(rows, device=context.mask.device)
        cached_mask = context.mask.index_select(0, rows)
    else:
        shared = [shared_length(p, prefix.tokens) for p in prompts] if prefix is not None else [0] * batch
        cached_mask = torch.arange(max(shared))[None, :] < torch.tensor(shared)[:, None]
    n_cached = cached_mask.shape[1]
    tokens, new_mask = left_pad([p[s:] for p, s in zip(prompts, shared)], _pad_id(model))
    key_mask = torch.cat([cached_mask.cpu(), new_mask.bool()], 1).to(model.device)
    capacity = tokens.shape[1] + max_new_tokens
    if context is not None:
        cache = _cache(hf, capacity=capacity, context=context, rows=rows)
    elif max(shared):
        prefix_rows = prefix.rows_for(ablate if ablate is not None and ablate_prompt else [[]] * batch)
        if len(prefix.variants) == 1:    # one row for all: a view
            pick = lambda t: t[:, :, :n_cached].expand(batch, -1, -1, -1)
        elif prefix_rows == list(range(len(prefix.variants))):   # row i is prefix row i: a view
            pick = lambda t: t[:, :, :n_cached]
        else:                            # each row's own ablated prefix
            index = torch.tensor(prefix_rows, device=prefix.keys[0].device)
            pick = lambda t: t[:, :, :n_cached].index_select(0, index)
        cache = _cache(hf, [pick(k) for k in prefix.keys], [pick(v) for v in prefix.values],
                       capacity=n_cached + capacity)
    else:
        cache = _cache(hf, capacity=capacity)
    state = _State(key_mask=key_mask, ablate=masks, record=record)
    tokens = tokens.to(model.device)
    n_new = tokens.shape[1]
    size = (PREFILL_CHUNK if chunk_tokens is None else chunk_tokens) or n_new
    ends = list(range(size, n_new, size)) + [n_new]   # prompt in chunks: activations for `size` tokens
    if not ablate_prompt and n_new > 1:               # all but the last token clean, the last one alone
        ends = sorted({e for e in ends if e < n_new - 1} | {n_new - 1, n_new})
    start = 0
    for end in ends:
        state.ablate = masks if ablate_prompt or start == n_new - 1 else {}
        state.key_mask = key_mask[:, :n_cached + end]
        logits = _forward(hf, state, tokens[:, start:end], cache, keep)
        start = end
    state.ablate = masks
    return state, cache, logits


def _prefill_context(model, hf, prompts, prefix, chunk_tokens) -> Context:
    state, cache, _ = _start(model, hf, prompts, {}, False, prefix, None, None, 0, chunk_tokens, True)
    keys, values = _cache_tensors(cache)
    return Context([list(p) for p in prompts], keys, values, state.key_mask)


def prefill_context(model, prompts: Sequence[Sequence[int]], prefix: Prefix | None = None,
                    chunk_tokens: int | None = None) -> Context:
    """Prefill ``prompts`` clean (left-padded into one batch, starting from a clean ``prefix``'s cache
    where they share its tokens) and keep their KV caches as a :class:`Context` that any number of rows
    continue in place (:func:`greedy_generate` / :func:`continuation_logits` with ``context=``).

    >>> ctx = prefill_context(model, [run.tokens[:-1] for run in runs])     # doctest: +SKIP
    >>> greedy_generate(model, [runs[0].tokens] * 2, 32, ablate=[[], [(17, 3)]], ablate_prompt=False,
    ...                 context=ctx)                                    # doctest: +SKIP
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise HeadlensError("prefill_context needs non-empty prompts")
    _no_steering(model, "prefill_context")
    if not uses_native(model):
        raise HeadlensError(f"{model.info.name} decodes through the bridge, which does not continue a "
                            "shared context")
    with native_forward(model) as hf:
        if not shares_context(hf):
            raise HeadlensError(f"{model.info.name} has sliding-window layers: a context is shared only by "
                                "models whose layers all attend to the whole sequence")
        return _prefill_context(model, hf, [list(p) for p in prompts], prefix, chunk_tokens)


def continuation_logits(model, prompts: Sequence[Sequence[int]], n: int, ablate: Sequence[Iterable[Head]],
                        context: Context | None = None) -> Float[Tensor, "batch n vocab"]:
    """Teacher-forced logits at the last ``n`` positions of each prompt, with each row's ``ablate`` heads
    uniform at exactly those positions (earlier positions clean): e.g. a prompt's last token and an
    answer but its last token, the heads made uniform while answering. The clean part is prefilled once
    per distinct prompt and read in place by every row (``context``: one from :func:`prefill_context`
    of those parts, to reuse across calls); models that cannot share it run through the bridge.

    >>> continuation_logits(model, [ids + answer[:-1]] * 2, len(answer), [[], [(17, 3)]])  # doctest: +SKIP
    """
    if n < 1 or any(len(p) <= n for p in prompts):
        raise HeadlensError("continuation_logits needs prompts longer than n")
    _no_steering(model, "continuation_logits")
    masks = {l: m.to(model.device) for l, m in row_masks(model, ablate, len(prompts)).items()}
    if uses_native(model):
        with native_forward(model) as hf:
            if shares_context(hf):
                if context is None:
                    distinct = [list(p) for p in dict.fromkeys(tuple(p[:-n]) for p in prompts)]
                    context = _prefill_context(model, hf, distinct, None, None)
                if any(len(context.prompts[r]) != len(p) - n for r, p in zip(context.rows_for(prompts), prompts)):
                    raise HeadlensError("the context must hold each prompt but its last n tokens")
                _, _, logits = _start(model, hf, prompts, masks, False, None, context, ablate, 0, 0, True, keep=n)
                return logits
    if context is not None:
        raise HeadlensError(f"{model.info.name} cannot share a context")
    tokens, mask = left_pad(prompts, _pad_id(model))
    tokens, mask = tokens.to(model.device), mask.to(model.device)

    def hook(pattern, hook):
        return _uniform_rows(pattern, mask, masks[int(hook.name.split(".")[1])], n)

    with torch.no_grad(), model.bridge.hooks(fwd_hooks=[(pattern_name(l), hook) for l in sorted(masks)]):
        return model.bridge(tokens, attention_mask=mask)[:, -n:]


def _uniform_rows(pattern: Float[Tensor, "batch head q k"], key_mask: Tensor, heads: Bool[Tensor, "batch head"],
                  n_rows: int | None = None) -> Tensor:
    """``pattern`` with the ``heads``' last ``n_rows`` query rows (all if None) uniform over their causal
    prefix of real keys (the bridge's pattern hooks)."""
    q = pattern.shape[-2]
    sel = heads[:, :, None, None]
    if n_rows is not None:
        sel = sel & (torch.arange(q, device=pattern.device) >= q - n_rows)[None, None, :, None]
    uni = uniform_pattern(q, pattern.shape[-1], key_mask, pattern.device, pattern.dtype)
    return torch.where(sel, uni, pattern)


def _bridge_generate(model, prompts, max_new_tokens, masks, record_top1, stops, pad, ablate_prompt=True,
                     kept=None):
    """Decoding through the bridge with eager attention (full patterns): for models whose transformers
    modules do not hold the bridge's weights (:func:`uses_native`). A prefix is not reused here; without
    ``ablate_prompt`` the prompt's rows but the last keep their own pattern."""
    tokens, mask = left_pad(prompts, pad)
    tokens, mask = tokens.to(model.device), mask.to(model.device)
    n_pad = tokens.shape[1] - torch.tensor([len(p) for p in prompts])
    state = {"mask": mask}
    rows: dict[int, torch.Tensor] = {}

    def hook(pattern, hook):
        layer = int(hook.name.split(".")[1])
        if layer in masks:
            # without ablate_prompt, queries before the prompt's last token stay as they are
            pattern = _uniform_rows(pattern, state["mask"][:, -pattern.shape[-1]:], masks[layer],
                                    None if ablate_prompt else 1)
        if record_top1:
            rows[layer] = pattern[:, :, -1].argmax(-1)                      # [batch, n_heads]
        return pattern

    layers = set(masks) | (set(range(model.n_layers)) if record_top1 else set())
    bridge = model.bridge
    fwd_hooks = [(pattern_name(l), hook) for l in sorted(layers)]
    with torch.no_grad(), kv_cache_fix(model), bridge.hooks(fwd_hooks=fwd_hooks):
        logits, cache = bridge(tokens, attention_mask=mask, return_type="logits_and_cache", use_cache=True)

        def advance(nxt):
            nonlocal cache
            state["mask"] = torch.cat([state["mask"], torch.ones_like(mask[:, :1])], 1)
            step_logits, cache = bridge(nxt[:, None], attention_mask=state["mask"], past_key_values=cache,
                                        return_type="logits_and_cache")
            return step_logits[:, -1]

        def positions():
            return torch.stack([rows[l].cpu() for l in range(model.n_layers)]) - n_pad[None, :, None]

        return _decode(logits[:, -1], advance, positions, max_new_tokens, stops, len(prompts), record_top1, kept)


def uses_chat(model, chat: bool = True) -> bool:
    """Whether prompts go through the chat template: asked for and the model has one."""
    return bool(chat and model.info.has_chat_template)


def encode_prompt(model, user_text: str, chat: bool = True, marker: str | None = None) -> list[list[int]]:
    """Token ids of a one-turn prompt: ``user_text`` through the chat template (with the generation
    prompt) when :func:`uses_chat`, else the plain text after BOS.

    With ``marker`` (a string inside ``user_text``) the rendered prompt is split there and the pieces
    are tokenised separately, so a caller can put its own token ids (a long context) in between.
    """
    tok = model.tokenizer
    if uses_chat(model, chat):
        text = tok.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                       add_generation_prompt=True)
        bos = []
    else:
        text = user_text
        bos = [model.start_token_id] if model.start_token_id is not None else []
    parts = text.split(marker) if marker else [text]
    if marker and len(parts) != 2:
        raise HeadlensError(f"prompt template must contain the marker {marker!r} exactly once")
    ids = [tok(p, add_special_tokens=False)["input_ids"] if p else [] for p in parts]
    ids[0] = bos + ids[0]
    return ids


def stop_token_ids(model) -> set[int]:
    """Token ids that end a generation: EOS and, for chat models, the end-of-turn token."""
    tok = model.tokenizer
    stops = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    vocab = tok.get_vocab()                   # built anew at every call (slow for a large vocabulary)
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        i = tok.convert_tokens_to_ids(name) if name in vocab else None
        if i is not None:
            stops.add(i)
    return stops
