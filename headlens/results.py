"""What detectors return, and what the catalogue, the checkpoints, the plots and the report read.

- :class:`DetectorResult`: one role on one model: a tidy per-head frame (``<role>_score`` plus evidence),
  the labelled heads, a status, the causal check, parameters and run information;
- :class:`CausalCheck`: the top-k heads ablated together vs random draws of k heads, with its p-value;
- :func:`head_frame`: per-head columns from ``[n_layers, n_heads]`` arrays;
- ``OK`` / ``NOT_APPLICABLE``: the statuses.

Plain data only (pandas, numpy, torch tensors): nothing here runs a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .stats import empirical_p_value

__all__ = ["OK", "NOT_APPLICABLE", "DetectorResult", "CausalCheck", "head_frame", "format_causal",
           "as_causal_check", "head_names"]

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
    causal: "CausalCheck | None" = None   # top-k vs random-k ablation (a sidecar dict is read into one)
    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)     # timings, counts, sampled tokens...

    def __post_init__(self):
        if isinstance(self.causal, dict):
            self.causal = CausalCheck.from_dict(self.causal) if self.causal else None

    @property
    def applies(self) -> bool:
        """False when the role does not apply to the model (``status`` not_applicable, no scores)."""
        return self.status == OK

    @property
    def evidence_columns(self) -> list[str]:
        """The numeric per-head columns other than the score (``<role>_<evidence>``)."""
        return [c for c in self.frame.columns if c.startswith(f"{self.role}_") and c != self.score_column
                and self.frame[c].dtype.kind == "f"]

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

    @property
    def causal_check(self) -> "CausalCheck | None":
        """The causal check (the same as ``causal``): readable ``print``, ``.p_value``; plot it with
        ``hl.plot.causal_check``."""
        return self.causal

    def heads(self, k: int | None = None) -> list[tuple[int, int]]:
        """``(layer, head)`` of the top ``k`` heads by score (all if None), NaN scores last."""
        top = self.top(len(self.frame) if k is None else k)
        return [(int(l), int(h)) for l, h in zip(top["layer"], top["head"])]

    def summary(self) -> str:
        """Status, labelled heads, time and causal check, one per line."""
        lines = [f"{self.role}: {self.status}" + (f" ({self.reason})" if self.reason else ""),
                 "labelled: " + (", ".join(head_names(self.labelled)) or "none")]
        if "seconds" in self.info:
            lines.append(f"ran in {self.info['seconds']} s")
        if self.causal:
            lines.append(f"causal check: {self.causal}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"DetectorResult({self.summary()})"

    def to_state(self) -> dict[str, Any]:
        """This result as tensors and plain data (dict, list, tuple, str, int, float, bool, None), which
        ``torch.load(..., weights_only=True)`` reads back: what a checkpoint holds (:meth:`from_state`).
        The frame's columns keep their order and dtypes exactly; numpy scalars in ``params``/``info``
        become Python ones, and other objects their text (as the JSON sidecar writes them)."""
        c = self.causal
        return {"role": self.role, "frame": _frame_state(self.frame), "labelled": _plain(list(self.labelled)),
                "status": self.status, "reason": self.reason, "causal": None if c is None else _plain(c.to_dict()),
                "causal_raw": None if c is None else _plain(c.raw), "params": _plain(self.params),
                "info": _plain(self.info)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "DetectorResult":
        """The result that :meth:`to_state` gave ``state``."""
        causal = CausalCheck.from_dict(state["causal"]) if state["causal"] is not None else None
        if causal is not None:
            causal.raw = state["causal_raw"]
        return cls(role=state["role"], frame=_frame_from_state(state["frame"]), labelled=list(state["labelled"]),
                   status=state["status"], reason=state["reason"], causal=causal, params=dict(state["params"]),
                   info=dict(state["info"]))

    def _repr_html_(self) -> str:
        import html
        lines = "".join(f"<br>{html.escape(line)}" for line in self.summary().splitlines()[1:])
        head = f"<b>{html.escape(self.role)}</b>: {html.escape(self.status)}"
        reason = f" <i>{html.escape(self.reason)}</i>" if self.reason else ""
        table = self.top(5).to_html(index=False, float_format=lambda x: f"{x:.4g}") if self.applies else ""
        return f"<div>{head}{reason}{lines}{table}</div>"


_TENSOR_DTYPES = {np.dtype(t) for t in ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32",
                                          "float64")}


def _plain(x: Any) -> Any:
    """``x`` as tensors and plain data (see :meth:`DetectorResult.to_state`)."""
    if x is None or type(x) in (bool, int, float, str):
        return x
    if x is pd.NA:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (np.generic, np.ndarray)):
        return _plain(x.tolist())
    if isinstance(x, dict):
        return {_plain(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return (tuple if isinstance(x, tuple) else list)(_plain(v) for v in x)
    for kind in (bool, int, float, str):     # subclasses (IntEnum, np.float64...)
        if isinstance(x, kind):
            return kind(x)
    return str(x)


def _frame_state(frame: pd.DataFrame) -> dict[str, Any]:
    """A frame as plain data: numeric and bool columns as tensors (bit for bit, NaN kept), others as
    lists, each with its dtype's name; the index only when it is not 0..n-1."""
    cols = []
    for _, col in frame.items():
        values = (torch.from_numpy(col.to_numpy(copy=True)) if col.dtype in _TENSOR_DTYPES
                  else _plain(col.tolist()))
        cols.append((str(col.dtype), values))
    index = None if frame.index.equals(pd.RangeIndex(len(frame))) else _plain(frame.index.tolist())
    return {"columns": _plain(list(frame.columns)), "values": cols, "rows": len(frame), "index": index}


def _frame_from_state(state: dict[str, Any]) -> pd.DataFrame:
    cols = {i: pd.Series(v.numpy() if isinstance(v, torch.Tensor) else v, dtype=dtype)
            for i, (dtype, v) in enumerate(state["values"])}
    frame = pd.DataFrame(cols, index=pd.RangeIndex(state["rows"]))
    frame.columns = state["columns"]
    if state["index"] is not None:
        frame.index = state["index"]
    return frame


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


def head_names(heads) -> list[str]:
    return [h if isinstance(h, str) else f"L{h[0]}H{h[1]}" for h in heads]



@dataclass
class CausalCheck:
    """A role's confirmation check: the tested heads ablated together vs ``n_random`` draws of as many
    random heads (other than those; from the same layers when ``matched``), on confirmation prompts that
    were not used to choose the heads.

    ``worse`` says which way the metric moves when the ablated heads matter more (``higher``: e.g. a loss;
    ``lower``: e.g. an accuracy). ``p_value`` = (1 + #random draws at least as extreme as the tested
    heads' ablation, in that direction) / (1 + n_draws): its minimum is 1 / (n_draws + 1). ``tested`` says
    which heads were tested: ``"claimed"`` (the heads that pass the role's score rule, the set a label
    would claim) or ``"best candidates"`` (none passes: the top-k by score, for the evidence only).
    ``effect``: the fraction of the clean behaviour the ablation removes, ``(tested - clean) / (floor -
    clean)`` where ``floor`` is the metric's level without the behaviour (NaN where a role has none), with
    its bootstrap interval over the confirmation units (``effect_lo``, ``effect_hi``). ``z``: the tested
    heads' ablation in standard deviations of the random draws, signed so that positive = the check's
    claim holds (a scale shared by every role).

    ``claim``: what the check claims of the tested heads, ``"more"`` (the default, every role that labels
    heads that do something: ablating them moves the metric the ``worse`` way more than random heads do) or
    ``"less"`` (dormant heads: they matter *less* than random heads; ``worse`` is then the direction of
    mattering less, e.g. ``lower`` for an absolute loss change, and the p-value counts the draws at
    least as low). Records without it read as ``"more"``.
    """
    metric: str
    top_heads: list[str]
    clean: float
    top_k_ablated: float
    random_k_ablated: list[float]
    random_draws: list[list[str]]
    worse: str = "higher"
    ablation: str = ""
    tested: str = "top-k"          # "claimed" | "best candidates" ("top-k": records of older versions)
    matched: bool = False          # random heads drawn from the tested heads' layers
    alpha: float = float("nan")    # the level a label needs the p-value to reach
    n_units: int = 0               # confirmation units (prompts, sequences, runs) the metric averages
    floor: float = float("nan")    # the metric without the behaviour (for the effect's fraction)
    effect: float = float("nan")
    effect_lo: float = float("nan")
    effect_hi: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)     # detector-specific figures, kept in to_dict
    claim: str = "more"            # "more" | "less": the tested heads matter more (less) than random ones
    raw: Any = field(default=None, repr=False, compare=False)  # every variant's full metric (not saved)

    @property
    def k(self) -> int:
        return len(self.top_heads)

    @property
    def n_random(self) -> int:
        return len(self.random_k_ablated)

    @property
    def random_mean(self) -> float:
        return float(np.mean(self.random_k_ablated)) if self.random_k_ablated else float("nan")

    @property
    def random_std(self) -> float:
        r = self.random_k_ablated
        return float(np.std(r, ddof=1)) if len(r) > 1 else 0.0

    @property
    def n_as_extreme(self) -> int:
        r = np.asarray(self.random_k_ablated, float)
        extreme = (r >= self.top_k_ablated) if self.worse == "higher" else (r <= self.top_k_ablated)
        return int((extreme | np.isnan(r)).sum())            # as in the p-value: NaN draws count

    @property
    def p_value(self) -> float:
        return empirical_p_value(self.top_k_ablated, self.random_k_ablated, self.worse == "higher")

    @property
    def significant(self) -> bool:
        """Whether ``p_value <= alpha`` (False when either is NaN)."""
        return bool(self.p_value <= self.alpha)

    @property
    def z(self) -> float:
        """(tested - random mean) / random sd, positive = the tested heads differ from random ones the way the
        check claims (``claim``: they matter more, or less)."""
        sd = self.random_std
        diff = (self.top_k_ablated - self.random_mean) * (1 if self.worse == "higher" else -1)
        return float(diff / sd) if sd > 0 else float("nan")

    def format(self) -> str:
        """One line for the CLI, the report and the notebooks."""
        effect = (f"; removes {self.effect:.0%} of the behaviour [{self.effect_lo:.0%}, {self.effect_hi:.0%}]"
                  if self.effect == self.effect else "")
        control = "layer-matched " if self.matched else ""
        tested = f"top-{self.k}" if self.tested == "top-k" else f"{self.tested} {self.k}"   # older records
        return (f"{self.metric}: clean {self.clean:.4g}; {tested} ablated "
                f"{self.top_k_ablated:.4g}; {control}random {self.k} ablated {self.random_mean:.4g} "
                f"± {self.random_std:.2g} ({self.n_random} draws; {self.n_as_extreme} as extreme); "
                f"p = {self.p_value:.3g}{effect} ({self.worse} = the heads matter {self.claim})")

    __str__ = format

    def __repr__(self) -> str:
        return f"CausalCheck({self.format()})"

    def _repr_html_(self) -> str:
        import html
        rows = [("clean", self.clean), (f"top-{self.k} ablated ({', '.join(self.top_heads)})", self.top_k_ablated),
                (f"random {self.k} ablated, mean ± sd of {self.n_random}",
                 f"{self.random_mean:.4g} ± {self.random_std:.2g}"), ("p-value", self.p_value)]
        cells = "".join(f"<tr><td>{html.escape(a)}</td><td>{b:.4g}</td></tr>" if isinstance(b, float)
                        else f"<tr><td>{html.escape(a)}</td><td>{b}</td></tr>" for a, b in rows)
        return (f"<div><b>causal check</b>: {html.escape(self.metric)} ({self.worse} = the heads matter "
                f"{html.escape(self.claim)})<table>{cells}</table></div>")

    def to_dict(self) -> dict[str, Any]:
        """The sidecar record: the keys of earlier catalogues plus ``p_value``, ``worse``, ``ablation``..."""
        return {"metric": self.metric, "k": self.k, "top_heads": list(self.top_heads),
                "clean": float(self.clean), "top_k_ablated": float(self.top_k_ablated),
                "random_k_ablated_mean": self.random_mean, "random_k_ablated_std": self.random_std,
                "random_k_ablated": [float(x) for x in self.random_k_ablated],
                "random_draws": [list(d) for d in self.random_draws],
                "n_random": self.n_random, "worse": self.worse, "ablation": self.ablation,
                "n_as_extreme": self.n_as_extreme, "p_value": self.p_value, "tested": self.tested,
                "matched": self.matched, "alpha": self.alpha, "significant": self.significant,
                "z": self.z, "n_units": self.n_units, "floor": self.floor, "effect": self.effect,
                "effect_lo": self.effect_lo, "effect_hi": self.effect_hi, "claim": self.claim, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CausalCheck":
        """Read a sidecar record (older ones lack ``worse``: then ``higher`` is assumed; and ``claim``: then
        ``more``)."""
        own = {"metric", "k", "top_heads", "clean", "top_k_ablated", "random_k_ablated_mean",
               "random_k_ablated_std", "random_k_ablated", "random_draws", "n_random", "worse",
               "ablation", "n_as_extreme", "p_value", "tested", "matched", "alpha", "significant", "z",
               "n_units", "floor", "effect", "effect_lo", "effect_hi", "claim"}
        nan = float("nan")
        return cls(metric=d["metric"], top_heads=list(d.get("top_heads", [])), clean=d["clean"],
                   top_k_ablated=d["top_k_ablated"], random_k_ablated=list(d.get("random_k_ablated", [])),
                   random_draws=[list(x) for x in d.get("random_draws", [])],
                   worse=d.get("worse", "higher"), ablation=d.get("ablation", ""),
                   tested=d.get("tested", "top-k"), matched=bool(d.get("matched", False)),
                   alpha=_num(d.get("alpha", nan)), n_units=int(d.get("n_units", 0)),
                   floor=_num(d.get("floor", nan)), effect=_num(d.get("effect", nan)),
                   effect_lo=_num(d.get("effect_lo", nan)), effect_hi=_num(d.get("effect_hi", nan)),
                   claim=str(d.get("claim", "more")), extra={k: v for k, v in d.items() if k not in own})


def _num(x) -> float:
    """A sidecar number (JSON writes NaN as NaN, or null from other writers) as a float."""
    return float("nan") if x is None else float(x)


def format_causal(causal: dict[str, Any] | CausalCheck) -> str:
    """The one-line causal check of a sidecar record (or a CausalCheck)."""
    return str(as_causal_check(causal))


def as_causal_check(causal: dict[str, Any] | CausalCheck | None) -> CausalCheck | None:
    """A CausalCheck from a sidecar record (None for an empty one)."""
    return causal if isinstance(causal, CausalCheck) or not causal else CausalCheck.from_dict(causal)
