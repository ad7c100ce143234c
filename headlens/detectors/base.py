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
from ..stats import bootstrap_means, bootstrap_t_ci, empirical_p_value, percentile_interval

__all__ = ["Detector", "CausalParams", "ReviewParams", "top_heads", "effect_heads", "self_repair", "compensation"]

REPAIR_MIN_SHARE = 0.1     # self-repair's relative floor: share of the role's largest |direct|
REPAIR_MIN_DIRECT = 0.01   # self-repair's absolute floor on |direct|, in the metric's units (nats here)


class Detector:
    """Base class: subclasses set ``name``, ``summary``, ``paper``, ``Params``, ``key_columns`` and
    implement ``run``."""
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    default_batch_size: ClassVar[int] = 64   # runtime, not science: sequences per batched forward pass
    # The one or two evidence columns (names without the ``<role>_`` prefix) a reader needs beside the score
    # and the label to judge a head: what the terminal table of ``headlens scan`` / ``show`` prints. The
    # rest stays in the CSV, the sidecar and the report.
    key_columns: ClassVar[tuple[str, ...]] = ()
    # Its usual share of a scan's time, relative (induction 1.0; from the 8B scan of docs/scale.md): how a
    # distributed scan spreads detectors over ranks (headlens.runtime.distributed.plan). Speed only.
    cost: ClassVar[float] = 0.5
    # An opt-in role is left out of a scan that names no roles (``headlens scan`` without ``-d``, ``hl.scan(model)``)
    # because its task costs more than the default scan should; ``-d NAME`` or ``-d all`` runs it.
    opt_in: ClassVar[bool] = False

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

    def confirm(self, model: HeadModel, claimed: list[tuple[int, int]], score: torch.Tensor | None, seed: int,
                metric_name: str, worse: str = "higher", floor: float = float("nan"), extra_variants=(),
                **context) -> CausalCheck:
        """The confirmation check: the ``claimed`` heads (those passing the role's score rule: the set a
        label would claim, at most ``max_k``; when there are none, the ``top_k`` best by ``score``, for the
        evidence only) ablated together vs ``n_random`` draws of as many random heads (other than those;
        from the same layers when ``matched``; when nothing is claimed, at most ``candidate_draws``: that
        check decides no label and is shown as evidence only), all variants batched by :meth:`causal_values` on the
        confirmation prompts the detector hands it in ``context`` (never the prompts the heads were chosen
        on).

        :meth:`causal_values` returns one value per variant and confirmation unit (``[n_variants, n_units]``,
        or ``[n_variants, n_units, n_columns]``, the first column checked); the check reads the mean over
        the units. ``floor`` is the metric's level without the behaviour: ``effect`` = the fraction of the
        clean behaviour the ablation removes, with a bootstrap interval over the units. ``extra_variants``
        are run in the same batch; every variant's unit values are in ``check.raw``.
        """
        cp = self.causal_params
        if worse not in ("higher", "lower"):
            raise ValueError(f"worse must be 'higher' or 'lower', not {worse!r}")
        tested = list(claimed)[:cp.max_k] if claimed else top_heads(score, cp.top_k)
        n_draws = cp.n_random if claimed else min(cp.n_random, cp.candidate_draws)
        draws = random_head_sets(model, len(tested), n_draws, seed, exclude=tested,
                                 layers=[l for l, _ in tested] if cp.matched else None)
        # Two stages: the first ``candidate_draws`` draws, then the rest only if the check can still be
        # significant (p over the first stage <= alpha): a check that fails stops early. Conservative: it
        # rejects only where the one-stage test on all the draws would.
        stage = draws[:cp.candidate_draws] if len(draws) > cp.candidate_draws else draws
        extra = [list(v) for v in extra_variants]
        units = self._units(model, [[], tested] + stage + extra, context)
        if len(stage) < len(draws):
            means = self._means(units)
            if empirical_p_value(float(means[1]), means[2:2 + len(stage)].tolist(), worse == "higher") <= cp.alpha:
                rest = self._units(model, draws[len(stage):], context)
                units = torch.cat([units[:2 + len(stage)], rest, units[2 + len(stage):]])
            else:
                draws = stage
        first = self._means(units)
        effect, lo, hi = self._effect(units if units.dim() == 2 else units[..., 0], floor, seed)
        return CausalCheck(metric=metric_name, top_heads=head_names(tested), clean=float(first[0]),
                           top_k_ablated=float(first[1]),
                           random_k_ablated=[float(x) for x in first[2:2 + len(draws)]],
                           random_draws=[head_names(d) for d in draws], worse=worse, ablation=cp.ablation,
                           tested="claimed" if claimed else "best candidates", matched=cp.matched,
                           alpha=cp.alpha, n_units=int(units.shape[1]), floor=float(floor), effect=effect,
                           effect_lo=lo, effect_hi=hi, raw=units)

    def _units(self, model, variants, context) -> torch.Tensor:
        """:meth:`causal_values` of ``variants`` as a float CPU tensor ``[n_variants, n_units, ...]``."""
        units = torch.as_tensor(self.causal_values(model, variants, **context)).float().cpu()
        return units[:, None] if units.dim() == 1 else units

    @staticmethod
    def _means(units: torch.Tensor) -> torch.Tensor:
        """Each variant's metric: the mean over the units (of the first column)."""
        return units.nanmean(1) if units.dim() == 2 else units[..., 0].nanmean(1)

    def _effect(self, units: torch.Tensor, floor: float, seed: int) -> tuple[float, float, float]:
        """The fraction of the clean behaviour removed by the tested heads' ablation, ``(tested - clean) /
        (floor - clean)`` of the means over the units, and its percentile-bootstrap interval (units
        resampled, clean and tested together)."""
        nan = float("nan")
        if floor != floor:
            return nan, nan, nan
        pair = units[:2].T.double()                                           # [n_units, 2]
        frac = lambda m: (m[..., 1] - m[..., 0]) / (floor - m[..., 0])    # noqa: E731
        point = float(frac(pair.nanmean(0)))
        if pair.shape[0] < 2:
            return point, nan, nan
        p = self.params
        boots = bootstrap_means(pair, getattr(p, "n_boot", 1000), seed)
        lo, hi = percentile_interval(frac(boots)[:, None], getattr(p, "ci_level", 0.95))
        return point, float(lo[0]), float(hi[0])

    def decide(self, claimed: list[tuple[int, int]], check: CausalCheck) -> tuple[list[tuple[int, int]], str]:
        """The labels and the reason when there are none: the claimed heads if their confirmation check is
        significant at ``alpha`` (:attr:`CausalCheck.significant`), else none."""
        if not claimed:
            return [], ""
        if check.significant:
            return list(claimed), ""
        return [], (f"{len(claimed)} head(s) pass the score rule but their confirmation check is not "
                    f"significant (p = {check.p_value:.3g} > alpha = {check.alpha}, {check.n_random} "
                    f"{'layer-matched ' if check.matched else ''}random draws, on held-out prompts): no head "
                    "is labelled; the top rows are the candidates")

    def stability(self, per_item: torch.Tensor, rule, seed: int) -> torch.Tensor:
        """``[L, H]``: the share of bootstrap resamples of the items (dimension 0 of ``per_item`` ``[n, L,
        H]``) whose mean passes ``rule`` (a function of an ``[n_boot, L, H]`` tensor of means to booleans):
        how stable a head's place under the score rule is."""
        boots = bootstrap_means(per_item.float(), getattr(self.params, "n_boot", 1000), seed)
        return rule(boots).float().mean(0)

    def causal_values(self, model, variants: list[list[tuple[int, int]]], run=None, metric=None,
                      **_) -> torch.Tensor:
        """The metric with each variant's heads ablated together (variant 0 ablates none): ``[n, ...]``.

        Default: one batched :func:`headlens.methods.run_variants` over a clean ``run`` with a forward
        ``metric``. Detectors whose check needs generation (retrieval, safety) override this one method.
        """
        return run_variants(model, run.tokens, variants, metric, self.causal_params.ablation,
                            run.attention_mask, self.batch_size, run,
                            description=f"{self.name} causal check")

    def interval(self, per_item: torch.Tensor, seed: int, name: str = "score", groups=None, strata=None,
                 bounds: tuple[float | None, float | None] | None = None) -> dict[str, torch.Tensor]:
        """``{"<name>_lo": [L, H], "<name>_hi": [L, H]}``: the seeded studentised bootstrap interval
        (:func:`headlens.stats.bootstrap_t_ci`; ``n_boot`` resamples, level ``ci_level``) of the mean over
        the items (dimension 0) of ``per_item`` ``[n, L, H]``.

        ``groups`` (one id per item) names the resampling unit when it is not the item (all runs of one
        needle, all spellings of one task word); ``strata`` resamples units within each stratum for a score
        that is a mean over strata; ``bounds`` is the range the score can take (clipped to it). The detector
        records the unit in its result's ``info["interval_unit"]``."""
        p = self.params
        lo, hi = bootstrap_t_ci(per_item, getattr(p, "n_boot", 1000), seed, getattr(p, "ci_level", 0.95),
                                groups=groups, strata=strata, bounds=bounds)
        return {f"{name}_lo": lo, f"{name}_hi": hi}

    def direct_and_self_repair(self, model, run, metric, total: torch.Tensor, worse: str = "higher",
                               clean: float | None = None, heads=None, batch_size: int | None = None,
                               positions: slice = slice(None)) -> dict[str, torch.Tensor]:
        """Per head, the direct effect of its ablation (its path straight to the logits only, everything
        else frozen; :func:`headlens.methods.direct_effects`) beside the ``total`` effect (the ordinary
        single-head ablation, ``[L, H]``, signed the same way), with :meth:`repair_columns` of the two.

        Effects are signed so that positive = the metric moves the ``worse`` way. Returns
        ``{"direct", "compensation", "self_repair"}``, each ``[L, H]`` (NaN for heads outside ``heads``,
        default all).
        """
        values = direct_effects(model, run, metric, self.causal_params.ablation, heads=heads,
                                batch_size=batch_size or self.batch_size, positions=positions)
        values = values if values.dim() == 2 else values[..., 0]
        if clean is None:
            clean = float(run.value(metric).flatten()[0])
        direct = (values - clean) * (1 if worse == "higher" else -1)
        return {"direct": direct, **self.repair_columns(direct, total)}

    def repair_columns(self, direct: torch.Tensor, total: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"compensation": direct - total, "self_repair": ...}`` for ``[L, H]`` effects signed so that
        positive = the head matters; :func:`self_repair` with the floors of the detector's parameters
        (``repair_min_share``, ``repair_min_direct``; :class:`ReviewParams`)."""
        p = self.params
        return {"compensation": compensation(direct, total),
                "self_repair": self_repair(direct, total, getattr(p, "repair_min_share", REPAIR_MIN_SHARE),
                                           getattr(p, "repair_min_direct", REPAIR_MIN_DIRECT))}

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
    """The confirmation check's parameters, shared by every detector's ``Params`` (which may change
    defaults)."""
    ablation: str = "mean"     # how the heads are ablated in the check (and the per-head sweeps)
    top_k: int = 5             # heads tested when none passes the score rule (the best candidates)
    max_k: int = 20            # the claimed heads tested together, at most this many
    n_random: int = 999        # random draws of as many heads (the p-value's resolution is 1 / (n_random + 1))
    candidate_draws: int = 99  # draws when no head is claimed: the best candidates' check labels nothing
    matched: bool = True       # random heads from the tested heads' layers (False: from every layer)
    alpha: float = 0.01        # a label needs the check's p-value (and a per-head null's q-value) at most this


@dataclass
class ReviewParams(CausalParams):
    """:class:`CausalParams` plus the bootstrap interval of the score (``<role>_score_lo/_hi``) and the
    floors under which ``<role>_self_repair`` is NaN (:func:`self_repair`)."""
    n_boot: int = 1000         # bootstrap-t resamples of the score's units (sequences, needles, task words, ...)
    ci_level: float = 0.95     # interval level
    # self-repair (<role>_self_repair) is reported only where |direct| is at least this share of the
    # role's largest |direct| AND at least this much in the metric's units (nats for every role here)
    repair_min_share: float = REPAIR_MIN_SHARE
    repair_min_direct: float = REPAIR_MIN_DIRECT


def compensation(direct: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``direct - total`` per head, in the metric's own units: how much of the head's direct effect the
    rest of the model makes up for when the head is ablated (positive: compensated; larger than ``direct``:
    over-compensated, the total effect has the other sign; negative: amplified). Defined wherever both
    effects are (NaN only where one of them is); nothing is clipped."""
    return direct.float() - total.float()


def self_repair(direct: torch.Tensor, total: torch.Tensor, min_share: float = REPAIR_MIN_SHARE,
                min_direct: float = REPAIR_MIN_DIRECT) -> torch.Tensor:
    """The share of a head's direct effect that the rest of the model repairs, ``1 - total / direct``,
    only where that share means something; NaN elsewhere. Nothing is clipped.

    Both effects are signed so that positive = the head matters (ablating it moves the metric the worse
    way). The value is reported only where

    - ``total`` is 0 or has the sign of ``direct`` (a total effect of the other sign is over-compensation:
      the ratio would exceed 1 by an amount that measures the overshoot, not a share; read
      :func:`compensation` there), and
    - ``|direct| >= min_share * max|direct|`` over the role's heads (default 10%) and
      ``|direct| >= min_direct`` in the metric's units (default 0.01 nats): below either floor the ratio
      divides by noise.

    With the signs shared, ``total / direct > 0``, so the value is below 1 and reads:
    1 = fully repaired (``total`` = 0); in (0, 1) = that share of the direct effect is made up for by later
    components; 0 = no repair (``total == direct``); < 0 = amplified: the total effect exceeds the direct
    one by ``-value`` times it (the head acts mostly through later components, e.g. a previous-token
    head feeding induction heads). Heads whose two effects are both negative (ablating them *helps* the
    metric, by both routes) read the same way for that helping effect.
    """
    d, t = direct.float(), total.float()
    floor = max(min_share * float(torch.nan_to_num(d.abs(), nan=0.0).max()), min_direct)
    shared_sign = (d != 0) & (d * t >= 0)                     # False where either is NaN
    defined = shared_sign & (d.abs() >= floor)
    return torch.where(defined, 1 - t / d, torch.full_like(d, float("nan")))
