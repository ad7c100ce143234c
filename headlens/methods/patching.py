"""Activation patching and path patching of head outputs between a clean and a corrupted prompt set.

- :func:`patch_heads`: the metric after replacing one head's output ``z`` by its value on the other
  prompt set, for every head (and, with ``per_position=True``, at one query position at a time).
  ``direction="denoise"`` runs the corrupted prompts with a clean head patched in (does the head
  *restore* the behaviour?); ``direction="noise"`` runs the clean prompts with a corrupted head patched
  in (does the behaviour *need* the head?). Batched through :func:`run_variants` (:class:`Patch`).
- :func:`path_patch_logits`: the same swap, but only along the head's *direct* path to the logits: the
  head's change in output goes through ``W_O`` straight to the unembedding, divided by the target run's
  final norm scale; every later layer still sees the unpatched head. Computed from cached ``z`` with no
  extra forward pass.
- :func:`path_patch_to_heads`: a sender head's corrupted output along the path sender -> receiver
  heads' queries only (Wang et al. 2023's path patching to the name movers' queries), every sender one
  at a time, batched over senders.
- :func:`direct_effects`: a head *ablated* (any intervention) along its direct path only, every head
  one at a time: the direct effect beside the total effect of :func:`sweep_heads` (self-repair).

Clean and corrupted prompts are paired row by row and must have the same shape.
"""
from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import HeadlensError
from ..models import HeadModel
from ..runtime.work import chunked
from .ablation import per_variant, run_variants
from .forward import CleanRun, clean_run, forward_from, row_bytes
from .hooks import Head, check_head, q_name, v_name
from .interventions import Intervention, Patch, Site, UniformAttention, as_intervention
from .metrics import Metric, metric_positions

__all__ = ["DIRECTIONS", "target_and_source", "patch_heads", "path_patch_logits", "direct_effects",
           "uniform_z", "final_norm_centres", "check_pair", "path_patch_to_heads", "receiver_queries",
           "RECEIVER_INPUTS"]

DIRECTIONS = ("denoise", "noise")


def check_pair(clean: torch.Tensor, corrupted: torch.Tensor, direction: str) -> None:
    if direction not in DIRECTIONS:
        raise HeadlensError(f"unknown patching direction '{direction}'; choose denoise or noise")
    if clean.shape != corrupted.shape:
        raise HeadlensError(f"clean and corrupted prompts must have the same shape, got "
                            f"{tuple(clean.shape)} and {tuple(corrupted.shape)}")


def target_and_source(model: HeadModel, clean: torch.Tensor, corrupted: torch.Tensor, direction: str,
                      attention_mask: torch.Tensor | None = None) -> tuple[CleanRun, CleanRun]:
    """The run that gets patched and the run patched from: (corrupted, clean) to denoise, else reversed."""
    check_pair(clean, corrupted, direction)
    target, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    return clean_run(model, target, attention_mask), clean_run(model, source, attention_mask)


def _head_entries(model, heads: Sequence[Head] | None, per_position: bool, n_pos: int) -> list[tuple]:
    heads = [tuple(h) for h in (heads if heads is not None else model.heads())]
    if per_position:
        return [(l, h, p) for l, h in heads for p in range(n_pos)]
    return heads


def _scatter(model, entries: list[tuple], values: torch.Tensor, per_position: bool, n_pos: int):
    """``[n_layers, n_heads, (pos,) ...]`` with NaN where a head was not asked for."""
    shape = (model.n_layers, model.n_heads) + ((n_pos,) if per_position else ())
    out = torch.full(shape + tuple(values.shape[1:]), float("nan"))
    for e, v in zip(entries, values):
        out[e] = v.float().cpu()
    return out


def patch_heads(model: HeadModel, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
                direction: str = "denoise", heads: Sequence[Head] | None = None,
                per_position: bool = False, attention_mask: torch.Tensor | None = None,
                batch_size: int | None = 64) -> torch.Tensor:
    """The metric with each head's output patched from the other prompt set, one head at a time.

    Returns ``[n_layers, n_heads, ...]``, or ``[n_layers, n_heads, pos, ...]`` with ``per_position``
    (the head patched at that query position only). The unpatched target run's metric is
    ``metric(target.logits)``; see :func:`target_and_source`.
    """
    target, source = target_and_source(model, clean, corrupted, direction, attention_mask)
    n_pos = target.tokens.shape[1]
    entries = _head_entries(model, heads, per_position, n_pos)
    values = run_variants(model, target.tokens, [[e] for e in entries], metric,
                          Patch(source=source), attention_mask, batch_size, target,
                          description="patching heads")
    return _scatter(model, entries, values, per_position, n_pos)


def final_norm_centres(model) -> bool:
    """LayerNorm subtracts the mean before scaling; RMSNorm does not."""
    return str(getattr(model.bridge.cfg, "normalization_type", "LN")).upper().startswith("LN")


def path_patch_logits(model: HeadModel, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric,
                      direction: str = "noise", heads: Sequence[Head] | None = None,
                      per_position: bool = False, attention_mask: torch.Tensor | None = None,
                      batch_size: int | None = 64) -> torch.Tensor:
    """The metric when only a head's direct path to the logits carries the patched value.

    logits' = target logits + norm(delta) @ W_U, with delta = (z_source - z_target)[h] @ W_O[l, h],
    normalised by the *target* run's final norm scale (the mean removed first under LayerNorm). The
    default direction is ``noise`` (clean run, corrupted head on the direct path). Same shapes as
    :func:`patch_heads`.
    """
    target, source = target_and_source(model, clean, corrupted, direction, attention_mask)
    n_pos = target.tokens.shape[1]
    entries = _head_entries(model, heads, per_position, n_pos)

    def dz(entry):
        l, h = entry[:2]
        d = source.z[l][:, :, h] - target.z[l][:, :, h]                  # [batch, pos, d_head]
        if len(entry) == 3:
            keep = torch.zeros(n_pos, dtype=d.dtype, device=d.device)
            keep[entry[2]] = 1
            d = d * keep[None, :, None]
        return d
    values = _direct_path_values(model, target, entries, dz, metric, batch_size, key=(direction,),
                                 description="path patching")
    return _scatter(model, entries, values, per_position, n_pos)


def _direct_path_values(model, target: CleanRun, entries: list[tuple], dz, metric: Metric,
                        batch_size: int | None, positions: slice = slice(None), key: tuple = (),
                        description: str = "direct effects") -> torch.Tensor:
    """``metric`` of the target logits plus, per entry, only the direct-path change
    ``norm(dz(entry) @ W_O[l, h]) @ W_U`` (the target run's final norm scale frozen): ``[n_entries, ...]``.

    Only the logits the metric reads are formed: at its declared ``positions`` (then it gets them
    through ``on_positions``), else at the ``positions`` slice. Entries go through
    :func:`headlens.runtime.work.chunked` (chunks planned in bytes, at most ``batch_size`` rows, shared
    over ranks, resumable; ``key``: what else, beside the entries and tokens, identifies the values, e.g.
    the ablation)."""
    batch, n_pos = target.tokens.shape
    W_U, W_O = model.bridge.W_U, model.bridge.W_O   # the bridge re-stacks weights on each access: read once
    centre = final_norm_centres(model)
    where = metric_positions(metric, n_pos)
    where, apply = (torch.arange(n_pos)[positions], metric) if where is None else (where, metric.on_positions)
    base = target.logits_at(where)
    scale = target.scale[:, where.to(target.scale.device)].to(W_U.device)
    # per entry: the head's write [batch, n, d_model], its shifted logits (model dtype; a second copy
    # where the unembedding's device or dtype differs), and the metric's float32 working copy
    item = base.element_size()
    per_entry = batch * len(where) * (2 * model.info.d_model * 4 + W_U.shape[-1] * (2 * item + 4))

    def write(entry):   # the head's change of the residual stream, on the unembedding's device
        d = dz(entry)
        d = d[:, where.to(d.device)].to(W_U.device)
        return d @ W_O[entry[0], entry[1]].to(d.device, d.dtype)

    def one(chunk: list[tuple]) -> torch.Tensor:
        # layers may sit on several GPUs: every head's write meets on the unembedding's device
        delta = torch.stack([write(e) for e in chunk])
        if centre:
            delta = delta - delta.mean(-1, keepdim=True)
        logits = ((delta / scale[None]).to(W_U.dtype) @ W_U).to(base.device, base.dtype)
        del delta
        logits += base[None]   # the shifted logits, in place
        return per_variant(apply, logits.flatten(0, 1), len(chunk), batch)

    results = chunked(one, entries, item_bytes=per_entry, device=W_U.device, weights=model.weight_bytes(),
                      cap=max(1, batch_size // batch) if batch_size else None, description=description,
                      key=(entries, target.tokens, where, *key), resumable=True)
    home = target.logits.device
    return torch.cat([r.to(home) for r in results])


def uniform_z(model: HeadModel, run: CleanRun) -> dict[int, torch.Tensor]:
    """Per layer, every head's output ``z`` if its attention were uniform over the causal prefix (and
    over the run's unpadded keys): the running mean of its value vectors, ``[batch, pos, n_heads, d_head]``
    (from the run's kept values, ``clean_run(..., keep_v=True)``, else one more forward pass)."""
    if run.v:
        cache = {v_name(l): run.v[l] for l in range(model.n_layers)}
    else:
        names = {v_name(l) for l in range(model.n_layers)}
        with torch.no_grad():
            _, cache = model.bridge.run_with_cache(run.tokens, attention_mask=run.attention_mask,
                                                   names_filter=lambda n: n in names)
    kv = torch.tensor([model.kv_head(h) for h in range(model.n_heads)])
    out = {}
    for l in range(model.n_layers):
        v = cache[v_name(l)].float().to(model.device)        # [b, pos, kv, dh]
        w = (torch.ones(v.shape[:2], device=v.device) if run.attention_mask is None
             else run.attention_mask.to(v.device).float())[..., None, None]
        z = (v * w).cumsum(1) / w.cumsum(1).clamp_min(1)
        out[l] = z[:, :, kv.to(v.device)]
    return out


def direct_effects(model: HeadModel, run: CleanRun, metric: Metric, ablation: str | Intervention = "mean",
                   heads: Sequence[Head] | None = None, batch_size: int | None = 64,
                   positions: slice = slice(None)) -> torch.Tensor:
    """The metric when a head is ablated along its *direct* path to the logits only, every head one at a
    time: ``[n_layers, n_heads, ...]`` (NaN for heads not asked).

    The head's output change ``(z_ablated - z_clean) @ W_O`` is added to the clean final residual stream
    and read through the clean run's final norm scale and ``W_U``; later layers and the norm scale are
    frozen (they still see the clean head). This is the direct effect of the Hydra-effect literature
    (McGrath et al. 2023); the ordinary ablation (:func:`sweep_heads`) is the total effect. Any head-output
    intervention works, and :class:`UniformAttention` (a forward pass for the value vectors).
    ``positions`` limits the logits formed (and passed to ``metric``) to a slice, e.g.
    ``slice(-1, None)`` for a last-position metric. Checked against a one-head-at-a-time version in
    ``tests/test_self_repair.py``.
    """
    ablation = as_intervention(ablation)
    entries = [tuple(h) for h in (heads if heads is not None else model.heads())]
    layers = {e[0] for e in entries}
    written: dict[int, torch.Tensor | None] = {l: None for l in layers}   # positions it writes (None: all)
    if isinstance(ablation, UniformAttention):
        ablated_z = uniform_z(model, run)
    elif ablation.hook != "attn.hook_z":
        raise HeadlensError(f"direct effects of {ablation!r} are not available (it does not replace z)")
    else:
        ablation.prepare(model)
        ablated_z, written = {}, {}
        for l in layers:
            site = Site(model, l, run)
            ablated_z[l] = ablation.forward(run.z[l], site)
            written[l] = ablation.positions(site, *run.z[l].shape[:2])

    def dz(entry):
        l, h = entry
        z = run.z[l][:, :, h]
        d = ablated_z[l][..., h, :].to(z.device, z.dtype).expand_as(z) - z
        return d if written[l] is None else d * written[l].to(d.device, d.dtype)[..., None]
    values = _direct_path_values(model, run, entries, dz, metric, batch_size, positions,
                                 key=(ablation,))
    return _scatter(model, entries, values, False, run.tokens.shape[1])


RECEIVER_INPUTS = ("q",)


def receiver_queries(model: HeadModel, layer: int,
                     resid: Float[Tensor, "rows pos d_model"]) -> Float[Tensor, "rows pos head d_head"]:
    """The queries ``hook_q`` that block ``layer``'s attention would form from the residual stream
    ``resid`` entering the block: the model's own input norm and query projection (its bridge modules,
    so LayerNorm/RMSNorm and folded or unfolded weights are handled as the forward pass handles them)."""
    block = model.bridge.blocks[layer]
    q = block.attn.q(block.ln1(resid))
    return q.reshape(*resid.shape[:2], model.n_heads, -1)


def path_patch_to_heads(model: HeadModel, clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"],
                        receivers: Sequence[Head], metric: Metric, senders: Sequence[Head] | None = None,
                        receiver_input: str = "q", position: int | None = None,
                        attention_mask: Int[Tensor, "batch pos"] | None = None,
                        batch_size: int | None = 64) -> Float[Tensor, "layer head ..."]:
    """Path patching from each sender head into the ``receivers``' queries (Wang et al. 2023): the metric
    of the clean run when only the path *sender -> receivers' query input* carries the sender's output
    from the corrupted run, one sender at a time: ``[n_layers, n_heads, ...]`` (NaN for heads not sent).

    The receivers' query input is the clean residual stream entering their block plus the sender's change
    of output ``(z_corrupted - z_clean) @ W_O`` (every other head and every MLP in between frozen at its
    clean value: the direct path only), put through the block's own norm and query projection; every
    other part of the model (the receivers' keys and values, every other head's query, the senders'
    other paths) sees the clean run. ``position`` limits the patched queries to one position (e.g. -1,
    the end; default every position). A sender in a layer at or after a receiver's layer has no path to
    it. Senders default to every head below the last receiver's layer.

    Batched as :func:`run_variants` batches ablations: senders are stacked along the batch (each chunk
    of senders one forward pass from the first receiver layer, its rows' queries replaced through
    ``hook_q``), chunked by memory through :func:`headlens.runtime.work.chunked`. Checked against a
    plain two-pass computation (the sender patched with everything else frozen, the receivers' queries
    cached, then a clean run with those queries) in ``tests/test_ioi.py``.

    >>> drop = path_patch_to_heads(model, ioi, abc, [(9, 9), (10, 0)], logit_diff)   # doctest: +SKIP
    >>> drop.shape                                                                  # doctest: +SKIP
    torch.Size([12, 12])
    """
    if receiver_input not in RECEIVER_INPUTS:
        raise HeadlensError(f"path_patch_to_heads patches the receivers' {' / '.join(RECEIVER_INPUTS)} "
                            f"input only, not {receiver_input!r}")
    check_pair(clean, corrupted, "noise")
    receivers = sorted({tuple(r)[:2] for r in receivers})
    if not receivers:
        raise HeadlensError("path_patch_to_heads needs at least one receiver head")
    for r in receivers:
        check_head(model, r)
    layers = sorted({l for l, _ in receivers})
    last = layers[-1]
    senders = [tuple(s) for s in (senders if senders is not None else
                                  [h for h in model.heads() if h[0] < last])]
    for s in senders:
        check_head(model, s)
    target, source = target_and_source(model, clean, corrupted, "noise", attention_mask)
    batch, n_pos = target.tokens.shape
    if position is not None and not -n_pos <= position < n_pos:
        raise HeadlensError(f"position {position} is outside the {n_pos}-token prompts")
    where = metric_positions(metric, n_pos)
    apply = metric if where is None else metric.on_positions
    live = [s for s in senders if s[0] < last]
    W_O = model.bridge.W_O          # the bridge re-stacks weights on each access: read once
    first = layers[0]
    pos = slice(None) if position is None else slice(position % n_pos, position % n_pos + 1)

    def write(sender, layer):      # the sender's change of the residual stream entering ``layer``
        l, h = sender
        d = source.z[l][:, :, h].to(model.device) - target.z[l][:, :, h].to(model.device)
        w = d @ W_O[l, h].to(d.device, d.dtype)
        return w if l < layer else torch.zeros_like(w)

    def one(chunk: list[tuple]) -> torch.Tensor:
        n = len(chunk)
        fwd = []
        for layer in layers:
            resid = target.resid[layer].to(model.device)
            patched = (resid[None] + torch.stack([write(s, layer) for s in chunk])).flatten(0, 1)
            with torch.no_grad():
                q = receiver_queries(model, layer, patched)               # [n * batch, pos, H, dh]
            heads = torch.tensor([h for l, h in receivers if l == layer])

            def put(x, hook, q=q, heads=heads):
                x = x.clone()
                x[:, pos, heads.to(x.device)] = q[:, pos, heads.to(q.device)].to(x.device, x.dtype)
                return x
            fwd.append((q_name(layer), put))
        resid = target.resid[first].to(model.device).repeat(n, 1, 1)
        mask = None if target.attention_mask is None else target.attention_mask.to(model.device).repeat(n, 1)
        logits = forward_from(model, resid, first, mask, fwd, where, target.block_returns_tuple)
        return per_variant(apply, logits, n, batch)

    n_logit = n_pos if where is None else len(where)
    per_sender = batch * (row_bytes(model, n_pos, n_logit)
                          + len(layers) * n_pos * (model.info.d_model + 2 * model.n_heads * model.info.d_head) * 4)
    values = chunked(one, live, item_bytes=per_sender, device=model.device, weights=model.weight_bytes(),
                     reserve=target.nbytes() + source.nbytes(),
                     cap=max(1, batch_size // batch) if batch_size else None,
                     description="path patching to heads",
                     key=(live, receivers, target.tokens, source.tokens, position), resumable=True) if live else []
    home = target.logits.device
    flat = torch.cat([v.to(home) for v in values]) if values else torch.empty(0)
    clean_value = target.value(metric).float().cpu()
    out = torch.full((model.n_layers, model.n_heads, *clean_value.shape), float("nan"))
    for s in senders:               # no path: the clean value
        if s[0] >= last:
            out[s] = clean_value
    for s, v in zip(live, flat):
        out[s] = v.float().cpu()
    return out
