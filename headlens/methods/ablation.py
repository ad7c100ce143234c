"""Head ablation, batched.

One generic routine, :func:`run_variants`, runs many *variants* of a forward pass at once: each variant
ablates its own set of heads. Variants are stacked along the batch dimension (chunked to fit memory),
and each chunk resumes from the clean run's residual stream at the first layer it touches, so the layers
before it are never recomputed. Everything else here is a thin wrapper:

- :func:`sweep_heads`: every head ablated alone -> ``[n_layers, n_heads]``;
- :func:`ablate_group`: one set of heads ablated together;
- :func:`random_baseline`: several random sets of k heads (the control every causal check uses);
- :func:`ablated`: a context manager that ablates heads in any run (generation included).

Ablation kinds (``kind=``): ``zero``, ``mean`` (over a reference batch or the run's own prompts, leaving out
each prompt's first position, the start-token sink, and padding), ``resample`` (the head's output
on another prompt of the batch), ``patch`` (the head's output from a given source run: activation
patching), ``scale`` (multiply the head's values by ``scale``; 0 removes it), and ``uniform`` (the
"undifferentiated attention" of Zhou et al. 2025: attention spread evenly over the causal prefix).
With grouped-query attention every kind acts on one *query* head: its output ``z`` (= pattern @ v) is
per query head, so a shared key/value head is left alone for the other heads of its group.

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

from ..errors import HeadlensError
from ..progress import progress
from .metrics import Metric

KINDS = ("zero", "mean", "resample", "patch", "scale", "uniform")
Head = tuple[int, int]  # (layer, head), or (layer, head, position) to act at one position only


def z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def pattern_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def resid_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


@dataclass
class Ablation:
    """What to put in place of an ablated head's output."""
    kind: str = "mean"
    scale: float = 0.0
    reference: torch.Tensor | None = None       # tokens to average over for 'mean' (default: the run's)
    source: dict[int, torch.Tensor] | None = None  # per-layer z [batch, pos, head, d_head] for 'patch'
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise HeadlensError(f"unknown ablation '{self.kind}'; choose one of {', '.join(KINDS)}")
        if self.kind == "patch" and self.source is None:
            raise HeadlensError("ablation 'patch' needs a source run (Ablation(kind='patch', source=...))")


def as_ablation(ablation: str | Ablation) -> Ablation:
    return ablation if isinstance(ablation, Ablation) else Ablation(kind=ablation)


@dataclass
class CleanRun:
    """What a clean forward pass leaves behind for later variants: logits, residuals, head outputs."""
    tokens: torch.Tensor
    attention_mask: torch.Tensor | None
    logits: torch.Tensor
    resid: dict[int, torch.Tensor] = field(default_factory=dict)
    z: dict[int, torch.Tensor] = field(default_factory=dict)
    block_returns_tuple: bool = False
    scale: torch.Tensor | None = None  # the final norm's scale ``ln_final.hook_scale``: [batch, pos, 1]


def clean_run(model, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
              keep_z: bool = True) -> CleanRun:
    """One clean forward pass, caching every layer's residual input and head outputs."""
    bridge = model.bridge
    tokens = tokens.to(model.device)
    names = {resid_name(l) for l in range(model.n_layers)} | {"ln_final.hook_scale"}
    if keep_z:
        names |= {z_name(l) for l in range(model.n_layers)}
    seen = {}

    def record_output_type(module, inputs, output):
        seen["tuple"] = isinstance(output, tuple)  # returns None: the output is left alone

    handle = bridge.blocks[0].original_component.register_forward_hook(record_output_type)
    try:
        with torch.no_grad():
            logits, cache = bridge.run_with_cache(tokens, attention_mask=attention_mask,
                                                  names_filter=lambda n: n in names)
    finally:
        handle.remove()
    run = CleanRun(tokens=tokens, attention_mask=attention_mask, logits=logits,
                   block_returns_tuple=seen.get("tuple", False), scale=cache["ln_final.hook_scale"])
    for l in range(model.n_layers):
        run.resid[l] = cache[resid_name(l)]
        if keep_z:
            run.z[l] = cache[z_name(l)]
    return run


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
    for module in originals:
        module.forward = identity
    try:
        yield
    finally:
        for module in originals:
            del module.forward


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


def _replacement(ablation: Ablation, run: CleanRun, layer: int,
                 ref_means: dict[int, torch.Tensor] | None) -> torch.Tensor | None:
    """The z that an ablated head gets at ``layer``, broadcastable to ``[batch, pos, head, d_head]``."""
    z = run.z[layer]
    if ablation.kind == "zero":
        return torch.zeros_like(z[:1, :1])
    if ablation.kind == "mean":
        if ref_means is not None:
            return ref_means[layer]
        return position_mean(z, run.attention_mask)
    if ablation.kind == "resample":
        g = torch.Generator().manual_seed(ablation.seed + layer)
        n = z.shape[0]
        if n < 2:
            raise HeadlensError("resample ablation needs at least two prompts in the batch")
        # A derangement: every prompt takes the head's output from a different prompt.
        perm = (torch.arange(n) + torch.randint(1, n, (1,), generator=g)) % n
        return z[perm.to(z.device)]
    if ablation.kind == "patch":
        return ablation.source[layer].to(z.device, z.dtype)
    return None  # scale and uniform act on the live run


def reference_means(model, ablation: Ablation) -> dict[int, torch.Tensor] | None:
    """Per-layer mean head outputs over ``ablation.reference`` (for 'mean' with a reference batch)."""
    if ablation.kind != "mean" or ablation.reference is None:
        return None
    ref = clean_run(model, ablation.reference)
    return {l: position_mean(z) for l, z in ref.z.items()}


def _hooks_for(ablation: Ablation, run: CleanRun, masks: dict[int, torch.Tensor],
               ref_means: dict[int, torch.Tensor] | None) -> list:
    """Forward hooks that ablate, in variant v, the heads set in ``masks[layer][v]``."""
    hooks = []
    batch = run.tokens.shape[0]
    for layer, mask in masks.items():
        if ablation.kind == "uniform":
            def hook(pattern, hook, mask=mask):
                v = mask.shape[0]
                p = pattern.view(v, -1, *pattern.shape[1:])
                key_mask = None if run.attention_mask is None else run.attention_mask[:, -p.shape[-1]:]
                uni = uniform_pattern(p.shape[-2], p.shape[-1], key_mask, p.device, p.dtype)
                sel = mask.to(p.device).transpose(1, 2)[:, None, :, :, None]  # [v, 1, head, q, 1]
                return torch.where(sel, uni[None], p).view_as(pattern)
            hooks.append((pattern_name(layer), hook))
            continue
        repl = _replacement(ablation, run, layer, ref_means)

        def hook(z, hook, mask=mask, repl=repl):
            v = mask.shape[0]
            zz = z.view(v, batch, *z.shape[1:])
            sel = mask.to(z.device)[:, None, :, :, None]  # [v, 1, pos|1, head, 1]
            new = zz * ablation.scale if repl is None else repl[None].expand_as(zz)
            return torch.where(sel, new, zz).view_as(z)
        hooks.append((z_name(layer), hook))
    return hooks


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
                 ablation: str | Ablation = "mean", attention_mask: torch.Tensor | None = None,
                 max_rows: int = 64, run: CleanRun | None = None,
                 description: str = "ablating heads") -> torch.Tensor:
    """Run every variant (a set of heads to ablate) and return ``metric`` for each: ``[n_variants, ...]``.

    ``metric(logits)`` is TransformerLens-shaped: it gets one variant's logits ``[batch, pos, vocab]``
    (the prompts in order) and returns a scalar or any per-run shape; the result stacks them.
    Variants are grouped into chunks of at most ``max_rows`` sequences; each chunk starts at the first
    layer any of its variants touches, reusing the clean residual stream below it.
    """
    ablation = as_ablation(ablation)
    variants = [sorted(set(map(tuple, v))) for v in variants]
    if run is None:
        run = clean_run(model, tokens, attention_mask)
    ref_means = reference_means(model, ablation)
    batch = run.tokens.shape[0]
    per_chunk = max(1, max_rows // batch)
    start = [min((e[0] for e in v), default=model.n_layers) for v in variants]
    order = sorted(range(len(variants)), key=lambda i: start[i])
    results: list[torch.Tensor | None] = [None] * len(variants)
    chunks = [order[i:i + per_chunk] for i in range(0, len(order), per_chunk)]
    for chunk in progress(chunks, description):
        chunk_variants = [variants[i] for i in chunk]
        first = min(start[i] for i in chunk)
        n = len(chunk)
        if first >= model.n_layers:  # nothing ablated: the clean logits
            out = per_variant(metric, run.logits, n, batch, repeat=True)
        else:
            masks = _layer_masks(model, chunk_variants, run.tokens.shape[1])
            resid = run.resid[first].repeat(n, 1, 1)
            mask = None if run.attention_mask is None else run.attention_mask.repeat(n, 1)
            hooks = _hooks_for(ablation, run, masks, ref_means)
            with torch.no_grad(), skip_blocks_before(model, first, run.block_returns_tuple):
                logits = model.bridge.run_with_hooks(resid, start_at_layer=first,
                                                     attention_mask=mask, fwd_hooks=hooks)
            out = per_variant(metric, logits, n, batch)
        for j, i in enumerate(chunk):
            results[i] = out[j]
    return torch.stack(results)


def per_variant(metric: Metric, logits: torch.Tensor, n: int, batch: int, repeat: bool = False) -> torch.Tensor:
    """``metric`` applied to each of ``n`` variants stacked along the batch (``[n * batch, pos, vocab]``;
    with ``repeat``, one ``[batch, pos, vocab]`` run that every variant shares): ``[n, ...]``."""
    if repeat:
        value = metric(logits)
        return value[None].expand(n, *value.shape)
    return torch.stack([metric(logits[j * batch:(j + 1) * batch]) for j in range(n)])


def sweep_heads(model, tokens: torch.Tensor, metric: Metric, ablation: str | Ablation = "mean",
                heads: Sequence[Head] | None = None, attention_mask: torch.Tensor | None = None,
                max_rows: int = 64, run: CleanRun | None = None) -> torch.Tensor:
    """The metric with each head ablated alone: ``[n_layers, n_heads, ...]`` (NaN for heads not asked)."""
    heads = list(heads) if heads is not None else model.heads()
    values = run_variants(model, tokens, [[h] for h in heads], metric, ablation, attention_mask,
                          max_rows, run, description="single-head ablations")
    out = torch.full((model.n_layers, model.n_heads, *values.shape[1:]), float("nan"))
    for (l, h), v in zip(heads, values):
        out[l, h] = v.float().cpu()
    return out


def ablate_group(model, tokens: torch.Tensor, heads: Sequence[Head], metric: Metric,
                 ablation: str | Ablation = "mean", attention_mask: torch.Tensor | None = None,
                 run: CleanRun | None = None) -> torch.Tensor:
    """The metric with all ``heads`` ablated together."""
    return run_variants(model, tokens, [list(heads)], metric, ablation, attention_mask, run=run)[0]


def random_head_sets(model, k: int, n_draws: int, seed: int = 0,
                     exclude: Iterable[Head] = ()) -> list[list[Head]]:
    """``n_draws`` random sets of ``k`` distinct heads (from a seeded generator)."""
    pool = [h for h in model.heads() if h not in set(map(tuple, exclude))]
    g = torch.Generator().manual_seed(seed)
    return [[pool[i] for i in torch.randperm(len(pool), generator=g)[:k].tolist()]
            for _ in range(n_draws)]


def random_baseline(model, tokens: torch.Tensor, k: int, metric: Metric, n_draws: int = 10,
                    seed: int = 0, ablation: str | Ablation = "mean", exclude: Iterable[Head] = (),
                    attention_mask: torch.Tensor | None = None, max_rows: int = 64,
                    run: CleanRun | None = None) -> tuple[torch.Tensor, list[list[Head]]]:
    """The metric under ``n_draws`` random k-head ablations (all draws batched): (values, draws)."""
    draws = random_head_sets(model, k, n_draws, seed, exclude)
    values = run_variants(model, tokens, draws, metric, ablation, attention_mask, max_rows, run,
                          description="random-head baselines")
    return values, draws


@contextlib.contextmanager
def ablated(model, heads: Sequence[Head], ablation: str | Ablation = "zero",
            mean_over: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None):
    """Ablate ``heads`` in every forward pass inside the block (generation included).

    Kinds that need no data of the run itself work here: ``zero``, ``scale``, ``uniform``, and ``mean``
    given ``mean_over`` (tokens whose mean head output is used, start token excluded). For left-padded
    batches pass their ``attention_mask``: ``uniform`` then gives padding no weight.
    """
    ablation = as_ablation(ablation)
    if ablation.kind in ("resample", "patch"):
        raise HeadlensError(f"ablation '{ablation.kind}' needs a paired run; use run_variants")
    heads = [tuple(h) for h in heads]
    means = None
    if ablation.kind == "mean":
        if mean_over is None:
            raise HeadlensError("mean ablation inside ablated() needs mean_over=tokens")
        means = {l: position_mean(z)[0, 0] for l, z in clean_run(model, mean_over).z.items()}
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    hooks = []
    for layer, hs in by_layer.items():
        idx = torch.tensor(hs)
        if ablation.kind == "uniform":
            def hook(p, hook, idx=idx):
                key_mask = None
                if attention_mask is not None and attention_mask.shape[0] == p.shape[0] \
                        and attention_mask.shape[1] >= p.shape[-1]:
                    key_mask = attention_mask[:, -p.shape[-1]:].to(p.device)
                uni = uniform_pattern(p.shape[-2], p.shape[-1], key_mask, p.device, p.dtype)
                p = p.clone()
                p[:, idx.to(p.device)] = uni[:, 0:1].expand(p.shape[0], len(idx), -1, -1).to(p.dtype)
                return p
            hooks.append((pattern_name(layer), hook))
        else:
            def hook(z, hook, idx=idx, layer=layer):
                z = z.clone()
                i = idx.to(z.device)
                if ablation.kind == "zero":
                    z[:, :, i] = 0
                elif ablation.kind == "scale":
                    z[:, :, i] = z[:, :, i] * ablation.scale
                else:
                    z[:, :, i] = means[layer][i].to(z.dtype)
                return z
            hooks.append((z_name(layer), hook))
    with model.bridge.hooks(fwd_hooks=hooks):
        yield
