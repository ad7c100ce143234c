"""headlens: find and score attention-head roles (induction, retrieval, successor, safety,
copy suppression) in pretrained transformers, with causal evidence, into one per-head catalogue.

>>> import headlens as hl
>>> model = hl.load_model("smollm2-135m")                      # doctest: +SKIP
>>> cat = hl.scan(model, ["induction", "copy_suppression"])    # doctest: +SKIP
>>> cat["induction"].top(5)                                    # doctest: +SKIP
>>> hl.plot.attention(model, "The cat sat. The cat", heads=cat.heads("induction", 3))  # doctest: +SKIP

The layers, from the bottom (each imports only those below it; ``docs/architecture.md``):
``errors`` -> ``runtime`` -> ``data``, ``stats``, ``models`` -> ``results`` -> ``methods`` ->
``detectors`` -> ``catalogue`` -> ``plots`` -> ``report`` -> ``cli``.
"""
from . import detectors, methods, plots, runtime
from . import plots as plot
from ._version import __version__
from .catalogue import Catalogue, read_catalogue, scan
from .data import data_path
from .detectors import REGISTRY, Detector, get_detector
from .errors import HeadlensError
from .methods import (
    CleanRun,
    Composition,
    Emphasis,
    Intervention,
    MeanAblation,
    Patch,
    PatternIntervention,
    ResampleAblation,
    Scale,
    Steer,
    UniformAttention,
    ZeroAblation,
    ablate,
    ablate_group,
    as_intervention,
    attribution_patching,
    clean_run,
    composition,
    direct_logit_attribution,
    emphasis,
    interventions,
    kl_metric,
    logit_diff_metric,
    loss_metric,
    patch_heads,
    path_patch_logits,
    random_baseline,
    run_variants,
    steer,
    sweep_heads,
)
from .models import HeadModel, ModelInfo, load_model
from .results import CausalCheck, DetectorResult, format_causal
from .runtime import Runtime

__all__ = ["__version__", "data_path", "HeadlensError", "HeadModel", "ModelInfo", "load_model",
           "scan", "Catalogue", "read_catalogue", "get_detector", "Detector", "DetectorResult", "REGISTRY",
           "CausalCheck", "format_causal", "Runtime", "runtime",
           "run_variants", "sweep_heads", "ablate_group", "random_baseline", "clean_run", "CleanRun",
           "patch_heads", "path_patch_logits", "direct_logit_attribution", "attribution_patching",
           "loss_metric", "kl_metric", "logit_diff_metric", "ablate", "Intervention", "PatternIntervention",
           "ZeroAblation", "MeanAblation", "ResampleAblation", "Patch", "Scale", "UniformAttention",
           "as_intervention", "interventions", "composition", "Composition", "plot", "plots", "methods",
           "detectors", "Emphasis", "Steer", "emphasis", "steer"]
from .methods import SteeredText, steer_generate  # noqa: E402

__all__ += ["SteeredText", "steer_generate"]
