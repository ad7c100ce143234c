"""Interventions: what replaces an attention head's output, one small class each (as pyvene does).

An intervention's :meth:`~Intervention.forward` gets the hooked activation ``x`` of a layer and a
:class:`Site` (the layer, the model, and the clean run the rows come from, when there is one) and
returns what the *selected* heads get instead, broadcastable to ``x``; the engine puts it in place for
the selected heads (and positions) only. The same objects serve the batched sweeps
(:func:`~headlens.methods.run_variants`, every row its own heads) and the :func:`ablate` context
manager (any forward pass, generation included).

- :class:`ZeroAblation`: the head's output ``z`` set to 0.
- :class:`MeanAblation`: ``z`` set to its mean over ``over`` (tokens), or over the run's own prompts,
  leaving out each prompt's first position (the start-token sink) and padding; by default each prompt's
  own start position keeps its output (``keep_start=False`` writes the mean there too).
- :class:`ResampleAblation`: ``z`` taken from another prompt of the batch (a seeded derangement).
- :class:`Patch`: ``z`` taken from a source run (activation patching).
- :class:`Scale`: ``z`` multiplied by ``s`` (0 removes the head).
- :class:`UniformAttention`: the head's *pattern* spread evenly over the causal prefix
  ("undifferentiated attention", Zhou et al. 2025).

With grouped-query attention every intervention acts on one *query* head: ``z`` (= pattern @ v) is per
query head, so a shared key/value head is left alone for the other heads of its group. Strings name the
built-in ones (``"zero"``, ``"mean"``, ``"resample"``, ``"patch"``, ``"scale"``, ``"uniform"``; see
:func:`as_intervention`). Write your own by subclassing::

    class Noise(hl.Intervention):
        name = "noise"
        def __init__(self, sigma=1.0):
            self.sigma = sigma
        def forward(self, z, site):
            return z + self.sigma * torch.randn_like(z)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import HeadlensError
from ..models import HeadModel
from .forward import clean_run
from .hooks import check_head, pattern_name, uniform_pattern


@dataclass
class Site:
    """Where an intervention acts and what it may read.

    ``run``: the clean run of the prompts (:class:`~headlens.methods.ablation.CleanRun`), or None inside
    :func:`ablate`, where the forward pass is the user's. ``prompts``: ``[rows]``, which prompt of ``run``
    each row of ``x`` runs (None: the rows are the prompts, in order). ``attention_mask``: the rows' mask
    ``[rows, pos]``, when given. ``variants``: ``[rows]``, which variant of a batched sweep each row is.
    ``offset``: the position in the sequence of ``x``'s first position (0, but for a run with a KV cache,
    which runs its new positions only: a decoding step, where :func:`ablate` reads it off the layer's
    pattern, or :func:`~headlens.methods.run_variants`'s suffix runs, which give it).
    """
    model: Any
    layer: int
    run: Any = None
    prompts: Int[Tensor, "rows"] | None = None
    attention_mask: Int[Tensor, "rows pos"] | None = None
    variants: Int[Tensor, "rows"] | None = None
    offset: int = 0

    def rows(self, per_prompt: Tensor) -> Tensor:
        """A per-prompt tensor ``[batch, ...]`` of the run, indexed to the rows of ``x``."""
        if self.prompts is None or per_prompt.shape[0] == 1:
            return per_prompt
        return per_prompt[self.prompts.to(per_prompt.device)]

    def columns(self, per_position: Tensor, n: int) -> Tensor:
        """A per-position tensor of the whole sequence ``[rows, offset + n, ...]`` cut to ``x``'s ``n``
        positions (from :attr:`offset` on). Anything else (one position, a broadcast; no offset; another
        length) is returned as it is, for the caller's own shape check."""
        if self.offset == 0 or per_position.shape[1] != self.offset + n:
            return per_position
        return per_position[:, self.offset:]

    def row_mask(self) -> Tensor | None:
        """The rows' attention mask: the one given, else the clean run's (indexed to the rows), else None."""
        if self.attention_mask is not None:
            return self.attention_mask
        mask = getattr(self.run, "attention_mask", None) if self.run is not None else None
        return None if mask is None else self.rows(mask)


class Intervention:
    """What the selected heads' output ``z`` ``[rows, pos, head, d_head]`` (``blocks.L.attn.hook_z``)
    is replaced by. Subclasses set ``name`` and implement :meth:`forward`.

    ``offset_aware``: whether :meth:`forward` and :meth:`positions` are right when ``x`` holds only the
    sequence's last positions (from :attr:`Site.offset` on; for a pattern, its queries): they read what is
    per position through :meth:`Site.columns` or ``site.offset``. Only then may
    :func:`~headlens.methods.run_variants` run the suffix of the prompts alone; a subclass that leaves it
    False always gets whole prompts."""
    name: ClassVar[str] = ""
    hook: ClassVar[str] = "attn.hook_z"
    offset_aware: ClassVar[bool] = False

    def forward(self, x: Float[Tensor, "rows pos head d_head"], site: Site) -> Tensor:
        raise NotImplementedError

    def prepare(self, model) -> None:
        """Called before the hooked forward passes: compute what needs a run of its own (no hooks yet)."""

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.hook}"

    def positions(self, site: Site, rows: int, n_pos: int) -> Bool[Tensor, "rows pos"] | None:
        """The positions this intervention writes, ``[rows, pos]`` (None: every position). The engine
        replaces the selected heads there only; elsewhere they keep their own output."""
        return None

    def select(self, mask: Bool[Tensor, "rows pos head"], x: Tensor) -> Tensor:
        """The head mask laid out to broadcast against ``x``."""
        return mask.to(x.device)[..., None]

    def rows_and_positions(self, x: Tensor) -> tuple[int, int]:
        """``(rows, query positions)`` of the hooked activation."""
        return x.shape[0], x.shape[1]

    def apply(self, x: Tensor, mask: Bool[Tensor, "rows pos head"], site: Site) -> Tensor:
        """``x`` with the masked heads (and positions) replaced by :meth:`forward`."""
        new = self.forward(x, site)
        where = self.positions(site, *self.rows_and_positions(x))
        if where is not None:
            mask = mask.to(x.device) & where.to(x.device)[:, :, None]
        return torch.where(self.select(mask, x), new.to(x.device, x.dtype), x)

    def key(self) -> tuple:
        """What tells two interventions apart (checkpoint keys): the name and the public attributes."""
        return (self.name or type(self).__qualname__,
                *(v for k, v in sorted(vars(self).items()) if not k.startswith("_")))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if not k.startswith("_") and not isinstance(v, (Tensor, dict)))
        return f"{type(self).__name__}({args})"


class PatternIntervention(Intervention):
    """What the selected heads' attention pattern ``[rows, head, query, key]``
    (``blocks.L.attn.hook_pattern``) is replaced by."""
    hook: ClassVar[str] = "attn.hook_pattern"

    def select(self, mask, x):
        return mask.to(x.device).transpose(1, 2)[..., None]       # [rows, head, query|1, 1]

    def rows_and_positions(self, x):
        return x.shape[0], x.shape[2]


class ZeroAblation(Intervention):
    name = "zero"
    offset_aware = True

    def forward(self, z, site):
        return torch.zeros_like(z[:1, :1])


class Scale(Intervention):
    name = "scale"
    offset_aware = True

    def __init__(self, s: float = 0.0):
        self.s = s

    def forward(self, z, site):
        return z * self.s


class MeanAblation(Intervention):
    """The head's mean output: over ``over`` (tokens ``[batch, pos]``), or over the run's own prompts
    (``over=None``; inside :func:`ablate`, which sees no run, ``over`` is needed). The mean leaves out
    each prompt's start position and padding (:func:`position_mean`).

    ``keep_start`` (default True): each prompt's start position (its first real token: position 0, or
    the first unpadded one) keeps the head's own output, so the attention sink every later position
    reads is the clean one and only the positions the mean was taken over are ablated. ``False`` writes
    the mean at every position, the start included (the older definition)."""
    name = "mean"
    offset_aware = True

    def __init__(self, over: Int[Tensor, "batch pos"] | None = None, keep_start: bool = True):
        self.over = over
        self.keep_start = keep_start
        self._means: tuple[int, dict[int, Tensor]] | None = None

    def positions(self, site, rows, n_pos):
        if not self.keep_start:
            return None
        return ~start_positions((rows, n_pos), site.row_mask(), site.offset)

    def prepare(self, model):
        if self.over is not None and (self._means is None or self._means[0] != id(model)):
            ref = clean_run(model, self.over)
            self._means = (id(model), {l: position_mean(x) for l, x in ref.z.items()})

    def forward(self, z, site):
        if self.over is not None:
            return self._means[1][site.layer]
        if site.run is None:
            raise HeadlensError("MeanAblation() inside ablate() needs the tokens to average over: "
                                "MeanAblation(over=tokens)")
        return position_mean(site.run.z[site.layer], site.run.attention_mask)


class ResampleAblation(Intervention):
    """The head's output on another prompt of the batch (a seeded derangement per layer). Inside
    :func:`ablate` the other prompt's output is the one of the same forward pass."""
    name = "resample"
    offset_aware = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    def forward(self, z, site):
        source = site.run.z[site.layer] if site.run is not None else z
        n = source.shape[0]
        if n < 2:
            raise HeadlensError("resample ablation needs at least two prompts in the batch")
        g = torch.Generator().manual_seed(self.seed + site.layer)
        perm = (torch.arange(n) + torch.randint(1, n, (1,), generator=g)) % n   # no prompt keeps its own
        resampled = source[perm.to(source.device)]
        return site.columns(site.rows(resampled), z.shape[1]) if site.run is not None else resampled


class Patch(Intervention):
    """The head's output from a source run: a :class:`~headlens.methods.ablation.CleanRun`, per-layer
    ``z`` ``{layer: [batch, pos, head, d_head]}``, or tokens (run once, on first use)."""
    name = "patch"
    offset_aware = True

    def __init__(self, source=None):
        if source is None:
            raise HeadlensError("Patch needs a source run: Patch(source=tokens, a clean_run or its z)")
        self.source = source

    def prepare(self, model):
        if isinstance(self.source, Tensor):
            self.source = clean_run(model, self.source)

    def forward(self, z, site):
        source = self.source if isinstance(self.source, dict) else self.source.z
        src = site.columns(site.rows(source[site.layer]), z.shape[1])
        if src.shape[1:] != z.shape[1:]:
            raise HeadlensError(f"Patch: the source has {src.shape[1]} positions, the run {z.shape[1]}")
        return src

    def key(self):
        z = self.source if isinstance(self.source, (dict, Tensor)) else self.source.z
        return ("patch", z) if isinstance(z, Tensor) else ("patch", *(z[l] for l in sorted(z)))


class UniformAttention(PatternIntervention):
    """Attention spread evenly over the causal prefix (and over unpadded keys, given a mask)."""
    name = "uniform"
    offset_aware = True

    def forward(self, pattern, site):
        mask, n_key = site.attention_mask, pattern.shape[-1]
        key_mask = None
        if mask is not None and mask.shape[0] == pattern.shape[0] and mask.shape[1] >= n_key:
            key_mask = mask[:, -n_key:].to(pattern.device)
        return uniform_pattern(pattern.shape[-2], n_key, key_mask, pattern.device, pattern.dtype)


def start_positions(shape: tuple[int, int], attention_mask: torch.Tensor | None = None,
                    offset: int = 0) -> Bool[Tensor, "batch pos"]:
    """``[batch, pos]``: True at each prompt's start position, its first real token (position 0 without
    a mask; with left padding the first unpadded one). ``offset``: the sequence position of the first
    column (a cached decoding step holds only its new positions, none of them a start). A mask of one
    row serves every row."""
    b, n = shape
    if attention_mask is None:
        first = torch.zeros(b, dtype=torch.long)
    else:
        real = attention_mask.detach().cpu() > 0
        if real.shape[0] not in (1, b):
            raise HeadlensError(f"the attention mask has {real.shape[0]} rows, the activation {b}")
        first = real.long().argmax(1).expand(b)          # the first real token (0 for an all-padding row)
    return torch.arange(n)[None, :] == (first - offset)[:, None]


def mean_weights(tokens_shape: tuple[int, int], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, pos]`` weights of the positions a mean ablation averages over: every real token except
    each prompt's first one (the start token, an attention sink whose output is unlike any other
    position's), never padding. A prompt of one real token keeps it (there is nothing else)."""
    b, n = tokens_shape
    real = torch.ones(b, n) if attention_mask is None else attention_mask.detach().float().cpu()
    w = real.masked_fill(start_positions((b, n), attention_mask), 0.0)
    single = w.sum(1) == 0
    w[single] = real[single]
    return w


def position_mean(z: Float[Tensor, "batch pos head d_head"],
                  attention_mask: torch.Tensor | None = None) -> Float[Tensor, "1 1 head d_head"]:
    """The mean of ``z`` over prompts and positions weighted by :func:`mean_weights` (no start token,
    no padding)."""
    w = mean_weights(z.shape[:2], attention_mask).to(z.device, z.dtype)[:, :, None, None]
    return ((z * w).sum((0, 1)) / w.sum((0, 1)).clamp_min(1e-12))[None, None]



INTERVENTIONS: dict[str, type[Intervention]] = {
    c.name: c for c in (ZeroAblation, MeanAblation, ResampleAblation, Patch, Scale, UniformAttention)}


def as_intervention(intervention: str | Intervention) -> Intervention:
    """An intervention object from a name in :data:`INTERVENTIONS` (``"mean"``...) or the object itself."""
    if isinstance(intervention, Intervention):
        return intervention
    if intervention not in INTERVENTIONS:
        raise HeadlensError(f"unknown ablation '{intervention}'; choose one of {', '.join(INTERVENTIONS)} "
                            "or pass an Intervention")
    return INTERVENTIONS[intervention]()


def head_masks(model, heads: Sequence[tuple[int, int]]) -> dict[int, Bool[Tensor, "1 1 head"]]:
    """Per layer, the mask ``[1, 1, n_heads]`` of the ``(layer, head)`` pairs in ``heads``."""
    masks: dict[int, Tensor] = {}
    for entry in heads:
        if len(entry) != 2:
            raise HeadlensError(f"ablate() takes (layer, head) pairs, not {entry}; "
                                "use run_variants for one position")
        check_head(model, entry)
        layer, head = entry
        masks.setdefault(layer, torch.zeros(1, 1, model.n_heads, dtype=torch.bool))[0, 0, head] = True
    return masks


def hooks(intervention: Intervention, masks: dict[int, Tensor], site_of) -> list:
    """Forward hooks putting ``intervention`` in place for ``masks[layer]`` (``[rows|1, pos|1, head]``);
    ``site_of(layer)`` gives each layer's :class:`Site`."""
    def hook_for(mask, site):
        return lambda x, hook: intervention.apply(x, mask, site)
    return [(intervention.hook_name(layer), hook_for(mask, site_of(layer))) for layer, mask in masks.items()]


@contextlib.contextmanager
def ablate(model: HeadModel, heads: Sequence[tuple[int, int]], intervention: str | Intervention = "zero",
           attention_mask: Int[Tensor, "batch pos"] | None = None):
    """Put ``intervention`` in place for ``heads`` in every forward pass inside the block (generation
    included)::

        with hl.ablate(model, [(18, 6)], hl.MeanAblation(over=tokens)):
            model.generate("...")

    Interventions that read the clean run see none here: :class:`MeanAblation` needs ``over=tokens``,
    :class:`ResampleAblation` takes another prompt of the same forward pass, :class:`Patch` needs a source
    of the run's shape. For left-padded batches pass their ``attention_mask``: :class:`UniformAttention`
    then gives padding no weight, and :class:`MeanAblation` finds each prompt's start position. A decoding
    step with a KV cache runs its new positions only: each touched layer's attention pattern (keys minus
    queries) gives their offset in the sequence (:attr:`Site.offset`).
    """
    intervention = as_intervention(intervention)
    intervention.prepare(model)
    masks = head_masks(model, [tuple(h) for h in heads])
    sites = {layer: Site(model, layer, attention_mask=attention_mask) for layer in masks}

    def record_offset(pattern, hook):
        sites[int(hook.name.split(".")[1])].offset = pattern.shape[-1] - pattern.shape[-2]
        return pattern
    fwd = [(pattern_name(layer), record_offset) for layer in masks] + hooks(intervention, masks, sites.__getitem__)
    with model.bridge.hooks(fwd_hooks=fwd):
        yield


__all__ = ["Site", "Intervention", "PatternIntervention", "ZeroAblation", "MeanAblation",
           "ResampleAblation", "Patch", "Scale", "UniformAttention", "INTERVENTIONS", "as_intervention",
           "ablate", "mean_weights", "position_mean", "start_positions"]
