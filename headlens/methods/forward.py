"""The forward-pass machinery every method runs on: clean runs and runs resumed from a layer.

- :func:`clean_run`: one clean pass that keeps every layer's residual input and head outputs
  (:class:`CleanRun`), so later variants start where they first differ;
- :func:`forward_from`: the logits of prompts resumed at block ``first`` from a given residual stream,
  with hooks; when every hook is on a head output and the model's own transformers modules compute the
  bridge's function (:func:`native_from_ok`), the blocks run natively with memory-efficient attention;
- :func:`prefix_cache` / :func:`forward_suffix`: the clean KV cache of the prompts' first positions,
  and the logits of rows that run only the positions after it, with hooks (what
  :func:`~headlens.methods.run_variants` uses when every variant acts at late positions only);
- :func:`logits_at`: the unembedding applied at chosen positions only;
- :func:`row_bytes` / :func:`clean_run_bytes`: what one sequence of a forward pass, and a cached clean
  run, cost in bytes (what :func:`headlens.runtime.work.chunked` plans chunks with).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import HeadlensError
from ..models import HeadModel, kv_cache_fix
from ..runtime.work import budget, plan
from .generation import _cache_argument, native_forward, shares_context, uses_native
from .hooks import FINAL_SCALE, resid_name, v_name, z_name
from .metrics import Metric, at_positions, metric_positions, position_index

__all__ = ["CleanRun", "clean_run", "forward_from", "native_from_ok", "logits_at", "skip_blocks_before",
           "block_returns_tuple", "row_bytes", "clean_run_bytes", "kv_cache_bytes", "prefix_cache",
           "forward_suffix", "suffix_ok"]


@dataclass
class CleanRun:
    """What a clean forward pass leaves behind for later variants: logits, residuals, head outputs.

    Everything is kept in the model's dtype. ``resid`` and ``z`` live on the model's device, or on
    the CPU when they did not fit the GPU's memory budget (``offloaded``); runs move what they need.
    ``logits`` are ``[batch, pos, vocab]``, or with ``positions`` (sorted indices) only the logits at
    those positions, ``[batch, len(positions), vocab]``: read them with :meth:`logits_at` and :meth:`value`.
    """
    tokens: torch.Tensor
    attention_mask: torch.Tensor | None
    logits: torch.Tensor
    resid: dict[int, torch.Tensor] = field(default_factory=dict)
    z: dict[int, torch.Tensor] = field(default_factory=dict)
    block_returns_tuple: bool = False
    scale: torch.Tensor | None = None  # the final norm's scale ``ln_final.hook_scale``: [batch, pos, 1]
    offloaded: bool = False
    positions: torch.Tensor | None = None  # the positions ``logits`` holds (None: every one)
    v: dict[int, torch.Tensor] = field(default_factory=dict)  # value vectors ``hook_v`` (``keep_v=True``)

    def logits_at(self, index: torch.Tensor) -> torch.Tensor:
        """The clean logits at positions ``index`` (non-negative): a view where they are consecutive."""
        index = index.cpu()
        if self.positions is not None:
            col = torch.searchsorted(self.positions, index).clamp(max=len(self.positions) - 1)
            if not bool((self.positions[col] == index).all()):
                raise HeadlensError(f"the clean run holds logits at positions {self.positions.tolist()} only, "
                                    f"not at {index.tolist()}")
            index = col
        return at_positions(self.logits, index)

    def value(self, metric: Metric) -> torch.Tensor:
        """``metric`` of the clean logits (a metric that declares positions gets them via ``on_positions``)."""
        n_pos = self.tokens.shape[1]
        index = metric_positions(metric, n_pos)
        if index is None:
            return metric(self.logits_at(torch.arange(n_pos)))
        return metric.on_positions(self.logits_at(index))

    def nbytes(self, device_only: bool = True) -> int:
        """Bytes held (on the model's device only, unless ``device_only=False``)."""
        tensors = [self.logits, *self.resid.values(), *self.z.values(), *self.v.values()]
        if device_only and self.offloaded:
            tensors = [self.logits]
        return sum(t.numel() * t.element_size() for t in tensors)


def clean_run(model: HeadModel, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
              keep_z: bool = True, positions=None, keep_v: bool = False) -> CleanRun:
    """One clean forward pass, caching every layer's residual input and head outputs.

    The cache is counted against the runtime's memory budget (:func:`headlens.runtime.work.budget`): on
    a GPU, when it would take more than half of the budget, the residuals and head outputs are kept on
    the CPU.
    ``positions`` (as a metric's, e.g. ``metric.positions``): keep the logits at those positions only
    (the unembedding runs only there); default every position. ``keep_v``: keep the value vectors too
    (what :func:`headlens.methods.patching.uniform_z` needs, so direct effects of uniform attention
    take no second forward pass).
    """
    bridge = model.bridge
    tokens = tokens.to(model.device)
    batch, n_pos = tokens.shape
    index = None if positions is None else position_index(positions, n_pos).unique()
    offload = False
    if model.device.type == "cuda":
        need = clean_run_bytes(model, batch, n_pos, keep_z)
        offload = need > budget(model.device, model.weight_bytes()) // 2
    names = {resid_name(l) for l in range(model.n_layers)} | {FINAL_SCALE}
    if keep_z:
        names |= {z_name(l) for l in range(model.n_layers)}
    if keep_v:
        names |= {v_name(l) for l in range(model.n_layers)}
    seen, kept = {}, {}

    def record_output_type(module, inputs, output):
        seen["tuple"] = isinstance(output, tuple)  # returns None: the output is left alone

    def keeper(name):
        def keep(x, hook):
            kept[name] = x.detach().to("cpu") if offload else x.detach()
        return keep

    handle = bridge.blocks[0].original_component.register_forward_hook(record_output_type)
    try:
        with torch.no_grad(), logits_at(model, index):
            logits = bridge.run_with_hooks(tokens, attention_mask=attention_mask,
                                           fwd_hooks=[(n, keeper(n)) for n in sorted(names)])
    finally:
        handle.remove()
    run = CleanRun(tokens=tokens, attention_mask=attention_mask, logits=logits,
                   block_returns_tuple=seen.get("tuple", False),
                   scale=kept[FINAL_SCALE].to(model.device), offloaded=offload, positions=index)
    for l in range(model.n_layers):
        run.resid[l] = kept[resid_name(l)]
        if keep_z:
            run.z[l] = kept[z_name(l)]
        if keep_v:
            run.v[l] = kept[v_name(l)]
    return run


def block_returns_tuple(model) -> bool:
    """Whether the wrapped decoder block returns a tuple (what :func:`skip_blocks_before` must mimic)."""
    seen = {}

    def record(module, inputs, output):
        seen["tuple"] = isinstance(output, tuple)   # returns None: the output is left alone
    handle = model.bridge.blocks[0].original_component.register_forward_hook(record)
    try:
        with torch.no_grad():
            model.bridge(torch.tensor([[model.start_token_id or 0]], device=model.device))
    finally:
        handle.remove()
    return seen["tuple"]


@contextlib.contextmanager
def skip_blocks_before(model, layer: int, returns_tuple: bool = False):
    """Make blocks ``0..layer-1`` pass their input through untouched (for ``start_at_layer`` runs).

    TransformerBridge's ``start_at_layer`` swaps the given residual in at block ``layer`` but still
    computes (and discards) the blocks before it; this skips that wasted work.
    """
    def identity(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if returns_tuple else hidden

    originals = [model.bridge.blocks[i].original_component for i in range(layer)]
    own = [module.__dict__.get("forward") for module in originals]  # e.g. accelerate's device hooks
    for module in originals:
        module.forward = identity
    try:
        yield
    finally:
        for module, forward in zip(originals, own):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def forward_from(model: HeadModel, resid: Float[Tensor, "batch pos d_model"], first: int,
                 attention_mask: torch.Tensor | None = None, fwd_hooks: Sequence = (),
                 index: torch.Tensor | None = None, returns_tuple: bool = False) -> Float[Tensor, "batch n d_vocab"]:
    """Logits of prompts whose residual stream entering block ``first`` is ``resid``, with ``fwd_hooks``
    (TransformerLens-style ``(name, fn(tensor, hook))`` pairs), at positions ``index`` (all if None).

    When every hook is on a head output (``hook_z``) and the model's own transformers modules compute the
    bridge's function from a given layer (:func:`native_from_ok`, checked once per model), the blocks run
    natively with memory-efficient attention and each hook acts on the input of the attention's output
    projection, viewed ``[batch, pos, head, d_head]`` (that is ``hook_z``): no attention pattern is formed
    and the bridge's wrappers are skipped (faster, and no pattern memory). Otherwise the bridge runs from
    ``start_at_layer`` with its hooks (eager attention, patterns available).
    """
    with torch.no_grad():
        if all(name.endswith(".attn.hook_z") for name, _ in fwd_hooks) and native_from_ok(model):
            return _native_from(model, resid, first, attention_mask, fwd_hooks, index, returns_tuple)
        with skip_blocks_before(model, first, returns_tuple), logits_at(model, index):
            return model.bridge.run_with_hooks(resid, start_at_layer=first, attention_mask=attention_mask,
                                               fwd_hooks=list(fwd_hooks))


def _native_from(model, resid, first, attention_mask, fwd_hooks, index, returns_tuple):
    with native_hooks(model, fwd_hooks, index), skip_blocks_before(model, first, returns_tuple), \
            native_forward(model) as hf:
        return hf(inputs_embeds=resid, attention_mask=attention_mask, use_cache=False).logits


@contextlib.contextmanager
def native_hooks(model, fwd_hooks: Sequence, index: torch.Tensor | None):
    """``hook_z`` hooks ``fwd_hooks`` as forward pre-hooks on the output projections' inputs (viewed
    ``[batch, pos, head, d_head]``), and the unembedding's input cut to positions ``index``, for runs of
    the model's transformers modules (:func:`~headlens.methods.generation.native_forward`)."""
    handles = []

    def on_z(fn):
        def pre(module, args):
            x = args[0]
            z = fn(x.reshape(*x.shape[:-1], model.n_heads, -1), None)
            return (z.reshape(x.shape), *args[1:])
        return pre

    for name, fn in fwd_hooks:
        o_proj = model.bridge.blocks[int(name.split(".")[1])].attn.o.original_component
        handles.append(o_proj.register_forward_pre_hook(on_z(fn)))
    if index is not None:
        def select(module, args):
            return (args[0][:, index.to(args[0].device)], *args[1:])
        handles.append(model.bridge.unembed.original_component.register_forward_pre_hook(select))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def native_from_ok(model) -> bool:
    """Whether :func:`forward_from` may run the model's transformers modules: they compute the bridge's
    function (:func:`headlens.methods.generation.uses_native`), and a run resumed at block 1 from the
    bridge's residual stream, with a head's output changed through the output projection's input,
    gives the bridge's logits with the same head changed at ``hook_z`` (log-probabilities to 1e-4;
    checked once per model, on a few tokens)."""
    if "native_from" not in model.memo:
        ok = False
        if uses_native(model) and model.n_layers > 1 and hasattr(model.bridge.blocks[1].attn, "o"):
            x = torch.arange(1, 9, device=model.device)[None] % model.bridge.cfg.d_vocab
            kept = {}

            def half(z, hook):
                z = z.clone()
                z[:, :, 0] = 0.5 * z[:, :, 0]
                return z
            with torch.no_grad():
                ref = model.bridge.run_with_hooks(x, fwd_hooks=[
                    (resid_name(1), lambda r, hook: kept.update(r=r.detach())), (z_name(1), half)])
            got = _native_from(model, kept["r"], 1, None, [(z_name(1), half)], None, block_returns_tuple(model))
            ref, got = torch.log_softmax(ref.float(), -1), torch.log_softmax(got.float(), -1)
            tol = 1e-4 if model.info.dtype == "float32" else 5e-2
            ok = bool((got - ref).abs().max() <= tol * max(1.0, float(ref.abs().max())))
        model.memo["native_from"] = ok
    return model.memo["native_from"]


KV = list[tuple[Float[Tensor, "batch kv_head p0 d_head"], Float[Tensor, "batch kv_head p0 d_head"]]]


def prefix_cache(model: HeadModel, tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None,
                 p0: int) -> KV:
    """The clean keys and values of every layer at the prompts' first ``p0`` positions, laid out for the
    whole prompts: per layer ``(keys, values)``, each ``[batch, kv_heads, pos, d_head]`` on the model's
    device, zero from ``p0`` on (where :func:`forward_suffix` writes each row's own).

    One bridge forward of ``tokens[:, :p0]`` with its mask and ``use_cache=True`` (in chunks of prompts
    planned from the memory budget); causal attention makes them the full run's keys and values there."""
    tokens = tokens.to(model.device)
    mask = None if attention_mask is None else attention_mask[:, :p0].to(model.device)
    per_chunk = plan(row_bytes(model, p0, 1) + kv_cache_bytes(model, p0), device=model.device,
                     weights=model.weight_bytes(), n_items=tokens.shape[0])
    parts: list[KV] = []
    last = torch.tensor([p0 - 1])
    with torch.no_grad(), kv_cache_fix(model), logits_at(model, last):
        for i in range(0, tokens.shape[0], per_chunk):
            rows = slice(i, i + per_chunk)
            _, cache = model.bridge(tokens[rows, :p0], attention_mask=None if mask is None else mask[rows],
                                    use_cache=True, return_type="logits_and_cache")
            parts.append([(layer.keys, layer.values) for layer in cache.layers])
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, tokens.shape[1] - p0))    # noqa: E731
    return [(pad(torch.cat([p[l][0] for p in parts])), pad(torch.cat([p[l][1] for p in parts])))
            for l in range(len(parts[0]))]


def forward_suffix(model: HeadModel, tokens: Int[Tensor, "rows n_new"], attention_mask: Tensor | None,
                   prefix: KV, prompts: Int[Tensor, " rows"], fwd_hooks: Sequence = (),
                   index: torch.Tensor | None = None) -> Float[Tensor, "rows n vocab"]:
    """Logits of rows that run only their prompts' last ``n_new`` positions (``tokens``), after the clean
    KV cache of the positions before them (``prefix``, of :func:`prefix_cache`; row ``r`` continues
    prompt ``prompts[r]``), with ``fwd_hooks`` in place; ``attention_mask``: the rows' whole mask
    ``[rows, p0 + n_new]`` (the bridge takes the position ids from it, left padding included). Hooked
    activations hold the ``n_new`` positions only (a pattern: ``n_new`` queries, every key);
    ``index``: the logits' positions, counted within the ``n_new``.

    When every hook is on a head output and :func:`native_from_ok`, the model's transformers modules run
    (memory-efficient attention, hooks on the output projections' inputs, as in :func:`forward_from`;
    position ids from the mask, as the bridge takes them); otherwise the bridge (eager attention) under
    :func:`headlens.models.kv_cache_fix`. Each layer's cache rows are copied out of ``prefix`` once, when
    the layer runs (``[rows, kv_heads, pos, d_head]`` per layer, :func:`kv_cache_bytes`), and the suffix's
    keys and values are written into them."""
    from transformers import DynamicCache

    hf = model.bridge.original_model
    cache = DynamicCache(config=hf.config)
    p0 = prefix[0][0].shape[2] - tokens.shape[1]
    cache.layers = [_rows_layer(k, v, prompts.to(k.device), p0) for k, v in prefix]
    with torch.no_grad():
        mask = None if attention_mask is None else attention_mask.to(model.device)
        tokens = tokens.to(model.device)
        if all(name.endswith(".attn.hook_z") for name, _ in fwd_hooks) and native_from_ok(model):
            n = p0 + tokens.shape[1]
            real = torch.ones(1, n, dtype=torch.long, device=model.device) if mask is None else mask.long()
            positions = (real.cumsum(1) - 1).clamp_min(0)[:, p0:].expand(tokens.shape[0], -1)
            with native_hooks(model, fwd_hooks, index), native_forward(model) as hf:
                return hf(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                          **{_cache_argument(hf): cache}).logits
        with kv_cache_fix(model), logits_at(model, index), model.bridge.hooks(fwd_hooks=list(fwd_hooks)):
            return model.bridge(tokens, attention_mask=mask, past_key_values=cache,
                                return_type="logits")


def _rows_layer(keys: Tensor, values: Tensor, rows: Tensor, p0: int):
    """A cache layer holding ``keys``/``values`` ``[batch, kv_heads, pos, d_head]`` (valid before ``p0``)
    for rows ``rows`` of them: it reports ``p0`` cached positions, and its one update copies the rows
    out (one copy) and writes the new keys and values at ``p0`` on."""
    from transformers.cache_utils import DynamicLayer

    class RowsLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            end = p0 + key_states.shape[-2]
            self.keys = keys.index_select(0, rows)[:, :, :end]
            self.values = values.index_select(0, rows)[:, :, :end]
            self.keys[:, :, p0:] = key_states
            self.values[:, :, p0:] = value_states
            return self.keys, self.values

    layer = RowsLayer()
    layer.keys, layer.values = keys[:1, :, :p0], values[:1, :, :p0]     # views: the cached length is p0
    layer.device, layer.is_initialized = keys.device, True
    return layer


def suffix_ok(model) -> bool:
    """Whether :func:`forward_suffix` gives the full run's logits for ``model``: every layer attends to
    the whole sequence (no sliding-window cache), and a run of the last 3 of 8 tokens after the prefix's
    cache matches the full run (log-probabilities to 1e-4; checked once per model)."""
    if "suffix" not in model.memo:
        ok = False
        if shares_context(model.bridge.original_model):
            x = torch.arange(1, 9, device=model.device)[None] % model.bridge.cfg.d_vocab
            try:
                with torch.no_grad():
                    ref = model.bridge(x)[:, 5:]
                got = forward_suffix(model, x[:, 5:], None, prefix_cache(model, x, None, 5),
                                     torch.zeros(1, dtype=torch.long))
                ref, got = torch.log_softmax(ref.float(), -1), torch.log_softmax(got.float(), -1)
                tol = 1e-4 if model.info.dtype == "float32" else 5e-2
                ok = got.shape == ref.shape and bool((got - ref).abs().max() <= tol * max(1.0, float(ref.abs().max())))
            except Exception:   # an architecture whose bridge cannot continue a cache: whole prompts
                ok = False
        model.memo["suffix"] = ok
    return model.memo["suffix"]


@contextlib.contextmanager
def logits_at(model, index: torch.Tensor | None):
    """Within the block, the unembedding sees only positions ``index``.

    A forward pre-hook on ``unembed`` slices its input to ``[batch, len(index), d_model]`` (the final
    norm, a per-position map of ``d_model`` values, still runs everywhere); the model's logits come out
    as ``[batch, len(index), vocab]``. ``None``: every position.
    """
    if index is None:
        yield
        return

    def select(module, args, kwargs):
        if args:
            return (args[0][:, index.to(args[0].device)], *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"][:, index.to(kwargs["hidden_states"].device)]
        return args, kwargs

    handle = model.bridge.unembed.register_forward_pre_hook(select, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()



def _shape(model: HeadModel):
    info, cfg = model.info, model.bridge.cfg
    itemsize = torch.empty(0, dtype=getattr(torch, info.dtype)).element_size()
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * info.d_model
    return info, itemsize, d_mlp, cfg.d_vocab


def row_bytes(model: HeadModel, n_pos: int, n_logit_pos: int | None = None, n_query: int | None = None) -> int:
    """Peak working bytes of one sequence of ``n_pos`` tokens in a forward pass (no gradients).

    The largest of a layer's transients: eager attention's scores and pattern ``[heads, query, pos]``
    (scores in the model's dtype, softmax in float32, the hooked pattern and an ablation's
    replacement), or the MLP's hidden activations; plus the residual stream in and out, the query,
    key and value (keys and values repeated for grouped-query attention), and the logits at
    ``n_logit_pos`` positions (default all) with a float32 working copy for the metric.
    ``n_query``: the positions that run (default all); fewer for a run of the last ``n_query``
    positions after a KV cache of the others, whose cache is :func:`kv_cache_bytes` on top.
    """
    info, item, d_mlp, vocab = _shape(model)
    n_logit_pos = n_pos if n_logit_pos is None else n_logit_pos
    n_query = n_pos if n_query is None else n_query
    heads, d_head = info.n_heads, info.d_head
    attn = heads * n_query * n_pos * (2 * item + 2 * 4)               # scores, pattern (+fp32 softmax)
    qkv = d_head * (n_query * 3 * heads + n_pos * (2 * info.n_kv_heads + 2 * heads)) * item  # q,z,k,v,repeat
    mlp = 3 * n_query * d_mlp * item
    resid = 4 * n_query * info.d_model * item
    logits = n_logit_pos * vocab * (item + 4)
    return int(1.25 * (max(attn + qkv, mlp) + resid + logits))


def kv_cache_bytes(model: HeadModel, n_pos: int) -> int:
    """Bytes of one sequence's KV cache of ``n_pos`` positions at every layer (keys and values of the
    key/value heads, in the model's dtype)."""
    info, item, _, _ = _shape(model)
    return 2 * info.n_layers * info.n_kv_heads * info.d_head * n_pos * item


def clean_run_bytes(model: HeadModel, batch: int, n_pos: int, keep_z: bool = True) -> int:
    """Bytes a cached clean run holds: every layer's residual input (and head outputs) and the logits."""
    info, item, _, vocab = _shape(model)
    per_layer = info.d_model + (info.n_heads * info.d_head if keep_z else 0)
    return batch * n_pos * (info.n_layers * per_layer + vocab) * item


