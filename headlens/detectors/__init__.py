"""Detector registry: role name -> detector class. A new head type is one module plus one line here."""
from __future__ import annotations

import importlib

from ..errors import HeadlensError
from ..results import NOT_APPLICABLE, OK, CausalCheck, DetectorResult, format_causal, head_frame
from .base import CausalParams, Detector, top_heads

# role name -> "module:Class" (imported on first use, so one broken detector cannot break the others)
REGISTRY = {
    "induction": "headlens.detectors.induction:InductionDetector",
    "successor": "headlens.detectors.successor:SuccessorDetector",
    "copy_suppression": "headlens.detectors.copy_suppression:CopySuppressionDetector",
    "retrieval": "headlens.detectors.retrieval:RetrievalDetector",
    "safety": "headlens.detectors.safety:SafetyDetector",
    "previous_token": "headlens.detectors.previous_token:PreviousTokenDetector",
    "duplicate_token": "headlens.detectors.duplicate_token:DuplicateTokenDetector",
    "attention_sink": "headlens.detectors.attention_sink:AttentionSinkDetector",
    "concept_induction": "headlens.detectors.dual_route:DualRouteDetector",
    "function_vector": "headlens.detectors.function_vector:FunctionVectorDetector",
    "ioi": "headlens.detectors.ioi:IOIDetector",
}


def detector_class(name: str) -> type[Detector]:
    if name not in REGISTRY:
        raise HeadlensError(f"unknown detector '{name}'; available: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_detector(name: str, **params) -> Detector:
    """An instance of the detector for role ``name`` with ``params`` overriding the paper's defaults."""
    return detector_class(name)(**params)


def default_detectors() -> list[str]:
    """The roles a scan runs when none are named: every registered one but the opt-in ones (a class with
    ``opt_in = True``, whose task costs more than a default scan should; named with ``-d NAME``)."""
    return [n for n in REGISTRY if not detector_class(n).opt_in]


def parse_detectors(spec: str | None) -> list[str]:
    """``"induction,successor"`` -> names, checked; ``None`` / ``"default"`` -> :func:`default_detectors`;
    ``"all"`` -> every registered detector, the opt-in ones included. ``"default,ioi"`` adds roles to the
    default set."""
    if spec is None or spec.strip() in ("", "default"):
        return default_detectors()
    names: list[str] = []
    for s in (s.strip() for s in spec.split(",")):
        group = list(REGISTRY) if s == "all" else default_detectors() if s == "default" else [s] if s else []
        for n in group:
            detector_class(n)
            if n not in names:
                names.append(n)
    return names


def as_detectors(detectors) -> list[Detector]:
    """Detector objects from names, objects, a comma-separated string, or None (all of them)."""
    if detectors is None or isinstance(detectors, str):   # None: the default roles (no opt-in ones)
        return [get_detector(n) for n in parse_detectors(detectors)]
    out = []
    for d in detectors:
        if isinstance(d, str):
            out.extend(get_detector(n) for n in parse_detectors(d))
        elif isinstance(d, Detector):
            out.append(d)
        elif isinstance(d, type) and issubclass(d, Detector):
            out.append(d())
        else:
            raise HeadlensError(f"not a detector: {d!r}; pass a role name like 'induction' or a Detector")
    return out


__all__ = ["as_detectors", "REGISTRY", "Detector", "DetectorResult", "NOT_APPLICABLE", "OK", "CausalCheck",
           "CausalParams", "format_causal", "top_heads", "detector_class", "get_detector", "head_frame",
           "parse_detectors", "default_detectors"]
