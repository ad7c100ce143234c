"""The one detector interface.

A detector is a class with a ``name`` (the role, e.g. ``induction``), a one-line ``summary``, the
``paper`` it follows, a ``Params`` dataclass whose defaults are the paper's choices, and a ``run`` method
that returns a :class:`DetectorResult`: per-head columns (``<role>_score`` plus evidence), the heads it
labels, a causal check (top-k heads vs random k heads), and a status. A new head type is one new module
with one such class, added to ``headlens.detectors.REGISTRY``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from ..errors import HeadlensError

OK = "ok"
NOT_APPLICABLE = "not_applicable"


@dataclass
class DetectorResult:
    """What one detector found on one model."""
    role: str
    frame: pd.DataFrame          # one row per (layer, head): layer, head, <role>_score, <role>_<evidence>
    labelled: list[tuple[int, int]]
    status: str = OK             # ok | not_applicable
    reason: str = ""             # why not applicable, or a note on a weak/absent role
    causal: dict[str, Any] = field(default_factory=dict)   # top-k vs random-k ablation figures
    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)     # timings, counts, sampled tokens...

    @property
    def score_column(self) -> str:
        return f"{self.role}_score"

    def top(self, k: int = 10) -> pd.DataFrame:
        """The k highest-scoring heads (scores first, NaN last): layer, head, head_id, score, evidence."""
        top = self.frame.sort_values(self.score_column, ascending=False, na_position="last",
                                     kind="stable").head(k)
        if "head_id" not in top:
            top.insert(2, "head_id", [f"L{l}H{h}" for l, h in zip(top["layer"], top["head"])])
        return top

    def heads(self, k: int | None = None) -> list[tuple[int, int]]:
        """``(layer, head)`` of the top ``k`` heads by score (all if None), NaN scores last."""
        top = self.top(len(self.frame) if k is None else k)
        return [(int(l), int(h)) for l, h in zip(top["layer"], top["head"])]


def head_frame(model, role: str, score: torch.Tensor | np.ndarray,
               evidence: dict[str, torch.Tensor | np.ndarray] | None = None) -> pd.DataFrame:
    """Tidy per-head columns from ``[n_layers, n_heads]`` arrays: layer, head, <role>_score, evidence."""
    L, H = model.n_layers, model.n_heads
    layer, head = np.divmod(np.arange(L * H), H)
    cols: dict[str, Any] = {"layer": layer, "head": head}

    def flat(x, name):
        a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, float)
        if a.shape != (L, H):
            raise ValueError(f"{name}: expected shape {(L, H)}, got {a.shape}")
        return a.reshape(-1)

    cols[f"{role}_score"] = flat(score, "score")
    for name, value in (evidence or {}).items():
        cols[f"{role}_{name}"] = flat(value, name)
    return pd.DataFrame(cols)


class Detector:
    """Base class: subclasses set ``name``, ``summary``, ``paper``, ``Params`` and implement ``run``."""
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    @dataclass
    class Params:
        pass

    def __init__(self, **overrides):
        known = {f.name for f in dataclasses.fields(self.Params)}
        unknown = set(overrides) - known
        if unknown:
            raise HeadlensError(f"detector '{self.name}' has no parameter(s) {', '.join(sorted(unknown))}; "
                                f"it takes {', '.join(sorted(known)) or 'none'}")
        self.params = self.Params(**overrides)

    def run(self, model, seed: int = 0) -> DetectorResult:
        raise NotImplementedError

    def param_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)

    def not_applicable(self, model, reason: str, **info) -> DetectorResult:
        """A result that says the role does not apply to this model, with no invented scores."""
        nan = np.full((model.n_layers, model.n_heads), np.nan)
        return DetectorResult(role=self.name, frame=head_frame(model, self.name, nan), labelled=[],
                              status=NOT_APPLICABLE, reason=reason, params=self.param_dict(), info=info)


def causal_summary(top_heads, top_value: float, random_values: torch.Tensor, clean_value: float,
                   metric: str, random_draws) -> dict[str, Any]:
    """The standard causal-check record: effect of ablating the top-k heads vs random k heads."""
    r = random_values.float()
    return {
        "metric": metric,
        "k": len(top_heads),
        "top_heads": [f"L{l}H{h}" for l, h in top_heads],
        "clean": float(clean_value),
        "top_k_ablated": float(top_value),
        "random_k_ablated_mean": float(r.mean()),
        "random_k_ablated_std": float(r.std()) if len(r) > 1 else 0.0,
        "random_k_ablated": [float(x) for x in r],
        "random_draws": [[f"L{l}H{h}" for l, h in d] for d in random_draws],
    }
