"""Head ablation, batched.

One generic routine, :func:`run_variants`, runs many *variants* of a forward pass at once: each variant
ablates its own set of heads. Variants are stacked along the batch dimension (chunked to fit memory),
and each chunk resumes from the clean run's residual stream at the first layer it touches, so the layers
before it are never recomputed. Everything else here is a thin wrapper:

- :func:`sweep_heads`: every head ablated alone -> ``[n_layers, n_heads]``;
- :func:`ablate_group`: one set of heads ablated together;
- :func:`random_baseline`: several random sets of k heads (the control every causal check uses);
- :func:`ablate` (alias ``ablated``): a context manager that ablates heads in any run (generation included).

What replaces an ablated head is an intervention object (:mod:`headlens.methods.interventions`:
``ZeroAblation``, ``MeanAblation``, ``ResampleAblation``, ``Patch``, ``Scale``, ``UniformAttention``, or
your own subclass), or its name (``"mean"``...); the batched sweeps and :func:`ablate` use the same ones.

A variant lists heads as ``(layer, head)`` (every position) or ``(layer, head, position)`` (that query
position only; negative positions count from the end), so per-position patching batches the same way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .. import distributed
from ..checkpoint import digest
from ..errors import HeadlensError
from .interventions import INTERVENTIONS, Ablation, Intervention, Site, ablate, as_intervention, hooks
from .metrics import Metric, at_positions, metric_positions, position_index

KINDS = tuple(INTERVENTIONS)
Head = tuple[int, int]  # (layer, head), or (layer, head, position) to act at one position only


def z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def pattern_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def resid_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


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


def clean_run(model, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
              keep_z: bool = True, max_memory: str | int | None = None, positions=None,
              keep_v: bool = False) -> CleanRun:
    """One clean forward pass, caching every layer's residual input and head outputs.

    The cache is counted against the memory budget (see :mod:`headlens.memory`): on a GPU, when it
    would take more than half of the budget, the residuals and head outputs are kept on the CPU.
    ``positions`` (as a metric's, e.g. ``metric.positions``): keep the logits at those positions only
    (the unembedding runs only there); default every position. ``keep_v``: keep the value vectors too
    (what :func:`headlens.methods.patching.uniform_z` needs, so direct effects of uniform attention
    take no second forward pass).
    """
    from ..memory import clean_run_bytes, resolve_budget

    bridge = model.bridge
    tokens = tokens.to(model.device)
    batch, n_pos = tokens.shape
    index = None if positions is None else position_index(positions, n_pos).unique()
    offload = False
    if model.device.type == "cuda":
        need = clean_run_bytes(model, batch, n_pos, keep_z)
        offload = need > resolve_budget(max_memory, model.device, model) // 2
    names = {resid_name(l) for l in range(model.n_layers)} | {"ln_final.hook_scale"}
    if keep_z:
        names |= {z_name(l) for l in range(model.n_layers)}
    if keep_v:
        names |= {f"blocks.{l}.attn.hook_v" for l in range(model.n_layers)}
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
                   scale=kept["ln_final.hook_scale"].to(model.device), offloaded=offload, positions=index)
    for l in range(model.n_layers):
        run.resid[l] = kept[resid_name(l)]
        if keep_z:
            run.z[l] = kept[z_name(l)]
        if keep_v:
            run.v[l] = kept[f"blocks.{l}.attn.hook_v"]
    return run


def block_returns_tuple(model) -> bool:
    """Whether the wrapped decoder block returns a tuple (what :func:`skip_blocks_before` must mimic)."""
    seen = {}

    def record(module, inputs, output):
        seen["tuple"] = isinstance(output, tuple)   # returns None: the output is left alone
    handle = model.bridge.blocks[0].original_component.register_forward_hook(record)
    try:
        with torch.no_grad():
            model.bridge(torch.tensor([[model.bos_token_id or 0]], device=model.device))
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


def uniform_pattern(n_query: int, n_key: int, key_mask: torch.Tensor | None, device, dtype) -> torch.Tensor:
    """Attention spread evenly over the causal prefix: ``[batch|1, 1, n_query, n_key]``.

    Queries are the last ``n_query`` positions of ``n_key`` (so a KV-cached decoding step works too).
    """
    q = torch.arange(n_query, device=device)[:, None] + (n_key - n_query)
    k = torch.arange(n_key, device=device)[None, :]
    allowed = (k <= q).to(dtype)[None, None]
    if key_mask is not None:
        allowed = allowed * key_mask[:, None, None, :].to(dtype)
    return allowed / allowed.sum(-1, keepdim=True).clamp_min(1)


def mean_weights(tokens_shape: tuple[int, int], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, pos]`` weights of the positions a mean ablation averages over: every real token except
    each prompt's first one (the start token, an attention sink whose output is unlike any other
    position's), never padding. A prompt of one real token keeps it (there is nothing else)."""
    b, n = tokens_shape
    real = torch.ones(b, n) if attention_mask is None else attention_mask.detach().float().cpu()
    first = (real.cumsum(1) == 1) & (real > 0)
    w = real.masked_fill(first, 0.0)
    single = w.sum(1) == 0
    w[single] = real[single]
    return w


def position_mean(z: Float[Tensor, "batch pos head d_head"],
                  attention_mask: torch.Tensor | None = None) -> Float[Tensor, "1 1 head d_head"]:
    """The mean of ``z`` over prompts and positions weighted by :func:`mean_weights` (no start token,
    no padding)."""
    w = mean_weights(z.shape[:2], attention_mask).to(z.device, z.dtype)[:, :, None, None]
    return ((z * w).sum((0, 1)) / w.sum((0, 1)).clamp_min(1e-12))[None, None]


def _check_head(model, entry: tuple, n_pos: int) -> None:
    if len(entry) not in (2, 3):
        raise HeadlensError(f"a head is (layer, head) or (layer, head, position), not {entry}")
    layer, head = entry[:2]
    if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
        raise HeadlensError(f"no head L{layer}H{head} in {model.info.name} "
                            f"({model.n_layers} layers x {model.n_heads} heads)")
    if len(entry) == 3 and not -n_pos <= entry[2] < n_pos:
        raise HeadlensError(f"position {entry[2]} is outside the {n_pos}-token prompts")


def _layer_masks(model, variants: Sequence[Iterable[Head]], n_pos: int) -> dict[int, torch.Tensor]:
    """Per touched layer, a bool mask ``[n_variants, pos|1, n_heads]`` of what each variant ablates."""
    per_position = any(len(e) == 3 for heads in variants for e in heads)
    width = n_pos if per_position else 1
    masks: dict[int, torch.Tensor] = {}
    for v, heads in enumerate(variants):
        for entry in heads:
            _check_head(model, entry, n_pos)
            layer, head = entry[:2]
            if layer not in masks:
                masks[layer] = torch.zeros(len(variants), width, model.n_heads, dtype=torch.bool)
            if len(entry) == 3:
                masks[layer][v, entry[2] % n_pos, head] = True
            else:
                masks[layer][v, :, head] = True
    return masks


def run_variants(model, tokens: torch.Tensor, variants: Sequence[Iterable[Head]], metric: Metric,
                 ablation: str | Intervention = "mean", attention_mask: torch.Tensor | None = None,
                 max_rows: int | None = 64, run: CleanRun | None = None,
                 description: str = "ablating heads", max_memory: str | int | None = None,
                 stats: dict | None = None) -> torch.Tensor:
    """Run every variant (a set of heads to ablate) and return ``metric`` for each: ``[n_variants, ...]``.

    ``metric(logits)`` is TransformerLens-shaped: it gets one variant's logits ``[batch, pos, vocab]``
    (the prompts in order) and returns a scalar or any per-run shape; the result stacks them. A metric
    that declares ``positions`` (see :mod:`headlens.methods.metrics`) gets, through its
    ``on_positions``, the logits at those positions only, ``[batch, n_positions, vocab]``: the final
    norm and the unembedding run only there. One that is a sum over prompts (``share``, see
    :func:`headlens.methods.metrics.summed`) gets each chunk's rows of a variant and its shares are added,
    so a variant's logits are never held whole.

    Rows (one prompt of one variant) are run in chunks sized by :func:`headlens.memory.plan_rows` to
    fit ``max_memory`` (default: the device's free memory, or the ``headlens.memory.limit`` in force),
    at most ``max_rows`` rows each (``None``: no cap); a variant may straddle two chunks. Each chunk
    starts at the first layer any of its rows touches, reusing the clean residual stream below it.
    ``stats``, if given, receives ``rows_per_chunk`` and ``chunks``.
    """
    from ..memory import plan_rows, resolve_budget, row_bytes

    ablation = as_intervention(ablation)
    variants = [sorted(set(map(tuple, v))) for v in variants]
    if run is None:
        run = clean_run(model, tokens, attention_mask, max_memory=max_memory)
    ablation.prepare(model)
    batch, n_pos = run.tokens.shape
    index = metric_positions(metric, n_pos)
    share = getattr(metric, "share", None) if index is not None else None
    n_logit = n_pos if index is None else len(index)
    budget = resolve_budget(max_memory, model.device, model, need=row_bytes(model, n_pos, n_logit))
    if max_memory is not None or _limit_set():  # an explicit budget also holds the cached clean run
        budget -= run.nbytes()
    rows_per_chunk = plan_rows(model, n_pos, n_logit, budget, description)
    if max_rows is not None:
        rows_per_chunk = min(rows_per_chunk, max_rows)
    start = [min((e[0] for e in v), default=model.n_layers) for v in variants]
    order = sorted(range(len(variants)), key=lambda i: start[i])
    results: list[torch.Tensor | None] = [None] * len(variants)
    # Variants with nothing ablated are the clean run itself.
    for i in order:
        if start[i] >= model.n_layers:
            results[i] = run.value(metric)
    # One chunk plan on every rank; whole variants per chunk when one fits, so that a rank assembles
    # each variant from the same rows, in the same batches, as a one-process run.
    rows_per_chunk = distributed.agree_min(rows_per_chunk)
    if rows_per_chunk >= batch:
        rows_per_chunk -= rows_per_chunk % batch
    rows = [(v, p) for v in order if start[v] < model.n_layers for p in range(batch)]
    chunks = [rows[i:i + rows_per_chunk] for i in range(0, len(rows), rows_per_chunk)]
    groups = distributed.segments(chunks, key=lambda row: row[0])  # a variant never spans two groups
    if stats is not None:
        stats.update(rows_per_chunk=rows_per_chunk, chunks=len(chunks))

    def run_group(group: list[list[tuple[int, int]]]) -> dict[int, torch.Tensor]:
        """The metric of every variant whose rows are in ``group`` (consecutive chunks)."""
        pending: dict[int, tuple[torch.Tensor, int]] = {}   # variant -> (its logits or value so far, rows)
        done: dict[int, torch.Tensor] = {}
        for chunk in group:
            chunk_vars = sorted({v for v, _ in chunk}, key=order.index)
            local = {v: j for j, v in enumerate(chunk_vars)}
            variant_of_row = torch.tensor([local[v] for v, _ in chunk])
            prompt_of_row = torch.tensor([p for _, p in chunk])
            first = min(start[v] for v in chunk_vars)
            masks = _layer_masks(model, [variants[v] for v in chunk_vars], n_pos)
            resid = run.resid[first][prompt_of_row.to(run.resid[first].device)].to(model.device)
            mask = None
            if run.attention_mask is not None:
                mask = run.attention_mask[prompt_of_row.to(run.attention_mask.device)].to(model.device)
            fwd = hooks(ablation, {l: m[variant_of_row] for l, m in masks.items()},
                        lambda layer: Site(model, layer, run, prompt_of_row, mask,
                                           torch.tensor([v for v, _ in chunk])))
            logits = forward_from(model, resid, first, mask, fwd, index, run.block_returns_tuple)
            del resid
            j = 0
            for v in chunk_vars:
                n = sum(1 for vv, _ in chunk if vv == v)
                rows, j = slice(j, j + n), j + n
                if share is not None:   # a sum over prompts: add this chunk's share, keep no logits
                    value, filled = pending.pop(v, (0, 0))
                    value = value + share(logits[rows], prompt_of_row[rows])
                elif n < batch:         # a variant split over chunks: its rows go into one buffer (no cat)
                    value, filled = pending.pop(v, None) or (logits.new_empty((batch, *logits.shape[1:])), 0)
                    value[filled:filled + n] = logits[rows]
                else:
                    value, filled = logits[rows], 0
                filled += n
                if filled < batch:
                    pending[v] = (value, filled)
                elif share is not None:
                    done[v] = value
                else:
                    done[v] = metric.on_positions(value) if index is not None else metric(value)
            del logits
        return done

    # Data parallel and resumable: with several ranks each computes its share of the groups (the same
    # groups as one process) and all results are gathered; finished groups are checkpointed in a scan.
    key = digest(description, variants, *ablation.key(), run.tokens, chunks)
    for done in distributed.map(run_group, groups, description, key=key, resumable=True):
        for v, value in done.items():
            results[v] = value.to(run.logits.device)
    return torch.stack(results)


def forward_from(model, resid: Float[Tensor, "batch pos d_model"], first: int,
                 attention_mask: torch.Tensor | None = None, fwd_hooks: Sequence = (),
                 index: torch.Tensor | None = None, returns_tuple: bool = False) -> Float[Tensor, "batch n d_vocab"]:
    """Logits of prompts whose residual stream entering block ``first`` is ``resid``, with ``fwd_hooks``
    (TransformerLens-style ``(name, fn(tensor, hook))`` pairs), at positions ``index`` (all if None).

    When every hook is on a head output (``hook_z``) and the model's own transformers modules compute the
    bridge's function from a given layer (:func:`native_from_ok`, checked once per model), the blocks run
    natively with memory-efficient attention and each hook acts on the input of the attention's output
    projection, viewed ``[batch, pos, head, d_head]`` (that is ``hook_z``): no attention pattern is formed
    and the bridge's wrappers are skipped (about 1.7x faster on a CPU). Otherwise the bridge runs from
    ``start_at_layer`` with its hooks (eager attention, patterns available).
    """
    with torch.no_grad():
        if all(name.endswith(".attn.hook_z") for name, _ in fwd_hooks) and native_from_ok(model):
            return _native_from(model, resid, first, attention_mask, fwd_hooks, index, returns_tuple)
        with skip_blocks_before(model, first, returns_tuple), logits_at(model, index):
            return model.bridge.run_with_hooks(resid, start_at_layer=first, attention_mask=attention_mask,
                                               fwd_hooks=list(fwd_hooks))


def _native_from(model, resid, first, attention_mask, fwd_hooks, index, returns_tuple):
    from .generation import native_forward

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
        with skip_blocks_before(model, first, returns_tuple), native_forward(model) as hf:
            return hf(inputs_embeds=resid, attention_mask=attention_mask, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def native_from_ok(model) -> bool:
    """Whether :func:`forward_from` may run the model's transformers modules: they compute the bridge's
    function (:func:`headlens.methods.generation.uses_native`), and a run resumed at block 1 from the
    bridge's residual stream, with a head's output changed through the output projection's input,
    gives the bridge's logits with the same head changed at ``hook_z`` (log-probabilities to 1e-4;
    checked once per model, on a few tokens)."""
    if "_headlens_native_from" not in model.__dict__:
        from .generation import uses_native

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
        model.__dict__["_headlens_native_from"] = ok
    return model.__dict__["_headlens_native_from"]


def _limit_set() -> bool:
    from ..memory import _LIMIT
    return _LIMIT.get() is not None


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


def per_variant(metric: Metric, logits: torch.Tensor, n: int, batch: int) -> torch.Tensor:
    """``metric`` applied to each of ``n`` variants stacked along the batch (``[n * batch, pos, vocab]``):
    ``[n, ...]``."""
    return torch.stack([metric(logits[j * batch:(j + 1) * batch]) for j in range(n)])


def sweep_heads(model, tokens: torch.Tensor, metric: Metric, ablation: str | Intervention = "mean",
                heads: Sequence[Head] | None = None, attention_mask: torch.Tensor | None = None,
                max_rows: int | None = 64, run: CleanRun | None = None,
                max_memory: str | int | None = None) -> torch.Tensor:
    """The metric with each head ablated alone: ``[n_layers, n_heads, ...]`` (NaN for heads not asked)."""
    heads = list(heads) if heads is not None else model.heads()
    values = run_variants(model, tokens, [[h] for h in heads], metric, ablation, attention_mask,
                          max_rows, run, description="single-head ablations", max_memory=max_memory)
    out = torch.full((model.n_layers, model.n_heads, *values.shape[1:]), float("nan"))
    for (l, h), v in zip(heads, values):
        out[l, h] = v.float().cpu()
    return out


def ablate_group(model, tokens: torch.Tensor, heads: Sequence[Head], metric: Metric,
                 ablation: str | Intervention = "mean", attention_mask: torch.Tensor | None = None,
                 run: CleanRun | None = None, max_memory: str | int | None = None) -> torch.Tensor:
    """The metric with all ``heads`` ablated together."""
    return run_variants(model, tokens, [list(heads)], metric, ablation, attention_mask, run=run,
                        max_memory=max_memory)[0]


def random_head_sets(model, k: int, n_draws: int, seed: int = 0,
                     exclude: Iterable[Head] = ()) -> list[list[Head]]:
    """``n_draws`` random sets of ``k`` distinct heads (from a seeded generator)."""
    pool = [h for h in model.heads() if h not in set(map(tuple, exclude))]
    g = torch.Generator().manual_seed(seed)
    return [[pool[i] for i in torch.randperm(len(pool), generator=g)[:k].tolist()]
            for _ in range(n_draws)]


def random_baseline(model, tokens: torch.Tensor, k: int, metric: Metric, n_draws: int = 10,
                    seed: int = 0, ablation: str | Intervention = "mean", exclude: Iterable[Head] = (),
                    attention_mask: torch.Tensor | None = None, max_rows: int | None = 64,
                    run: CleanRun | None = None, max_memory: str | int | None = None
                    ) -> tuple[torch.Tensor, list[list[Head]]]:
    """The metric under ``n_draws`` random k-head ablations (all draws batched): (values, draws)."""
    draws = random_head_sets(model, k, n_draws, seed, exclude)
    values = run_variants(model, tokens, draws, metric, ablation, attention_mask, max_rows, run,
                          description="random-head baselines", max_memory=max_memory)
    return values, draws


ablated = ablate   # the earlier name
