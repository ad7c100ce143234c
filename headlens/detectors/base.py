"""The one detector interface.

A detector is a class with a ``name`` (the role, e.g. ``induction``), a one-line ``summary``, the
``paper`` it follows, a ``Params`` dataclass whose defaults are the paper's choices, and a ``run`` method
that returns a :class:`~headlens.results.DetectorResult`: per-head columns (``<role>_score`` plus
evidence), the heads it labels, a causal check (top-k heads vs random k heads), and a status. A new head
type is one new module with one such class, added to ``headlens.detectors.REGISTRY``; it uses the public
API of :mod:`headlens.methods` (and of :mod:`headlens.runtime` for chunked work), never another detector.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import HeadlensError
from ..methods import direct_effects, random_head_sets, run_variants
from ..models import HeadModel
from ..results import NOT_APPLICABLE, CausalCheck, DetectorResult, head_frame, head_names
from ..runtime import current
from ..stats import bootstrap_ci

__all__ = ["Detector", "CausalParams", "ReviewParams", "top_heads", "effect_heads", "self_repair"]


class Detector:
    """Base class: subclasses set ``name``, ``summary``, ``paper``, ``Params`` and implement ``run``."""
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    default_batch_size: ClassVar[int] = 64   # runtime, not science: sequences per batched forward pass
    # Its usual share of a scan's time, relative (induction 1.0; from the 8B scan of docs/scale.md): how a
    # distributed scan spreads detectors over ranks (headlens.runtime.distributed.plan). Speed only.
    cost: ClassVar[float] = 0.5

    @dataclass
    class Params:
        pass

    def __init__(self, **overrides):
        known = {f.name for f in dataclasses.fields(self.Params)}
        unknown = set(overrides) - known
        runtime = sorted({"max_rows", "batch_size", "max_memory"} & unknown)
        if runtime:
            raise HeadlensError(f"{', '.join(runtime)} is a runtime setting, not a detector parameter: use "
                                "--batch-size / --max-memory (CLI) or hl.scan(model, ..., batch_size=N, "
                                "max_memory=...)")
        if unknown:
            raise HeadlensError(f"detector '{self.name}' has no parameter(s) {', '.join(sorted(unknown))}; "
                                f"it takes {', '.join(sorted(known)) or 'none'}")
        self.params = self.Params(**overrides)

    def run(self, model: HeadModel, seed: int = 0) -> DetectorResult:
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        """Sequences per batched forward pass: the runtime's batch size (``scan(batch_size=...)``,
        ``--batch-size``) if set, else the detector's default; the memory budget may lower it further."""
        value = current().batch_size
        return self.default_batch_size if value is None else int(value)

    @property
    def causal_params(self) -> CausalParams:
        p = self.params
        return CausalParams(**{f.name: getattr(p, f.name) for f in dataclasses.fields(CausalParams)
                               if hasattr(p, f.name)})

    def causal_check(self, model, score: torch.Tensor | None, seed: int, metric_name: str, worse: str = "higher",
                     top: list[tuple[int, int]] | None = None, extra_variants=(), **context) -> CausalCheck:
        """The top-k heads by ``score`` (or the given ``top``) ablated together vs ``n_random`` draws of
        as many random heads (other than those), all variants batched by :meth:`causal_values`.

        ``metric_name`` names the metric; ``context`` goes to :meth:`causal_values`. ``extra_variants`` are
        decoded in the same batch; the full per-variant values (clean, top, draws, extras) are in
        ``check.raw``. A metric with several columns is checked on its first.
        """
        cp = self.causal_params
        if worse not in ("higher", "lower"):
            raise ValueError(f"worse must be 'higher' or 'lower', not {worse!r}")
        top = list(top) if top is not None else top_heads(score, cp.top_k)
        draws = random_head_sets(model, len(top), cp.n_random, seed, exclude=top)
        values = self.causal_values(model, [[], top] + draws + [list(v) for v in extra_variants], **context)
        values = torch.as_tensor(values).float().cpu()
        first = values if values.dim() == 1 else values[:, 0]
        return CausalCheck(metric=metric_name, top_heads=head_names(top), clean=float(first[0]),
                           top_k_ablated=float(first[1]),
                           random_k_ablated=[float(x) for x in first[2:2 + len(draws)]],
                           random_draws=[head_names(d) for d in draws], worse=worse, ablation=cp.ablation,
                           raw=values)

    def causal_values(self, model, variants: list[list[tuple[int, int]]], run=None, metric=None,
                      **_) -> torch.Tensor:
        """The metric with each variant's heads ablated together (variant 0 ablates none): ``[n, ...]``.

        Default: one batched :func:`headlens.methods.run_variants` over a clean ``run`` with a forward
        ``metric``. Detectors whose check needs generation (retrieval, safety) override this one method.
        """
        return run_variants(model, run.tokens, variants, metric, self.causal_params.ablation,
                            run.attention_mask, self.batch_size, run,
                            description=f"{self.name} causal check")

    def interval(self, per_item: torch.Tensor, seed: int, name: str = "score") -> dict[str, torch.Tensor]:
        """``{"<name>_lo": [L, H], "<name>_hi": [L, H]}``: the seeded percentile-bootstrap interval of the
        mean over the items (dimension 0) of ``per_item`` ``[n, L, H]``."""
        p = self.params
        lo, hi = bootstrap_ci(per_item, getattr(p, "n_boot", 1000), seed, getattr(p, "ci_level", 0.95))
        return {f"{name}_lo": lo, f"{name}_hi": hi}

    def direct_and_self_repair(self, model, run, metric, total: torch.Tensor, worse: str = "higher",
                               clean: float | None = None, heads=None, batch_size: int | None = None,
                               positions: slice = slice(None)) -> dict[str, torch.Tensor]:
        """Per head, the direct effect of its ablation (its path straight to the logits only, everything
        else frozen; :func:`headlens.methods.direct_effects`) beside the ``total`` effect (the ordinary
        single-head ablation, ``[L, H]``, signed the same way), and ``self_repair = 1 - total / direct``.

        Effects are signed so that positive = the metric moves the ``worse`` way. Returns
        ``{"direct": [L, H], "self_repair": [L, H]}`` (NaN for heads outside ``heads``, default all).
        """
        values = direct_effects(model, run, metric, self.causal_params.ablation, heads=heads,
                                batch_size=batch_size or self.batch_size, positions=positions)
        values = values if values.dim() == 2 else values[..., 0]
        if clean is None:
            clean = float(run.value(metric).flatten()[0])
        direct = (values - clean) * (1 if worse == "higher" else -1)
        return {"direct": direct, "self_repair": self_repair(direct, total)}

    def __repr__(self) -> str:
        return f"{self.name}: {self.summary}\npaper: {self.paper}\n{self.params}"

    def param_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)

    def estimate(self, model) -> float:
        """This detector's expected share of a scan of ``model``, relative to induction's 1.0: how a
        distributed scan spreads detectors over ranks (:func:`headlens.runtime.distributed.plan`). Default: the
        class's ``cost``; a detector whose work depends on the model (safety: the Ships sweeps run only
        when the model refuses) overrides it. Speed only, never results."""
        return self.cost

    def not_applicable(self, model, reason: str, **info) -> DetectorResult:
        """A result that says the role does not apply to this model, with no invented scores."""
        nan = np.full((model.n_layers, model.n_heads), np.nan)
        return DetectorResult(role=self.name, frame=head_frame(model, self.name, nan), labelled=[],
                              status=NOT_APPLICABLE, reason=reason, params=self.param_dict(), info=info)


def top_heads(score: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest-scoring heads of an ``[n_layers, n_heads]`` score, best first (ties: lower
    layer, then lower head). NaN scores rank last, so an unscored head is picked only if nothing else is."""
    s = torch.as_tensor(score).detach().float().cpu()
    flat = torch.nan_to_num(s.flatten(), nan=float("-inf"))
    return [divmod(int(i), s.shape[1]) for i in flat.argsort(descending=True, stable=True)[:k]]


def effect_heads(score: torch.Tensor, total: torch.Tensor, k: int) -> list[tuple[int, int]] | None:
    """The heads that get direct effects: the ``k`` top heads by ``score`` and the ``k`` with the largest
    ``|total|`` effect (where self-repair or a large direct path is worth knowing), best first; None
    (every head) when ``k`` is 0."""
    if not k:
        return None
    heads = top_heads(score, k)
    return heads + [h for h in top_heads(torch.as_tensor(total).abs(), k) if h not in heads]


@dataclass
class CausalParams:
    """The causal check's parameters, shared by every detector's ``Params`` (which may change defaults)."""
    ablation: str = "mean"     # how the heads are ablated in the causal check (and the per-head sweeps)
    top_k: int = 5             # causal check: the top-k heads ablated together vs k random heads
    n_random: int = 20         # random k-head draws (the p-value's resolution is 1 / (n_random + 1))


@dataclass
class ReviewParams(CausalParams):
    """:class:`CausalParams` plus the bootstrap interval of the score (``<role>_score_lo/_hi``)."""
    n_boot: int = 1000         # bootstrap resamples over prompts/sequences/runs/tokens
    ci_level: float = 0.95     # interval level


def self_repair(direct: torch.Tensor, total: torch.Tensor, min_share: float = 0.1) -> torch.Tensor:
    """``1 - total / direct`` per head (both effects signed so that positive = the head matters): 0 = no
    repair, 1 = the rest of the model fully makes up for the head, > 1 over-compensation, < 0 the head
    matters more than its direct path (its effect is amplified downstream or mostly indirect). NaN where
    ``|direct|`` is below ``min_share`` of the largest ``|direct|`` of the role (a ratio of noise)."""
    d, t = direct.float(), total.float()
    floor = min_share * torch.nan_to_num(d.abs(), nan=0.0).max()
    out = 1 - t / d
    return torch.where((d.abs() >= floor) & (d.abs() > 0), out, torch.full_like(out, float("nan")))
