"""headlens: find and score attention-head roles (induction, retrieval, successor, safety,
copy suppression) in pretrained transformers, with causal evidence, into one per-head catalogue.

>>> import headlens as hl
>>> model = hl.load_model("smollm2-135m")                      # doctest: +SKIP
>>> cat = hl.scan(model, ["induction", "copy_suppression"])    # doctest: +SKIP
>>> cat["induction"].top(5)                                    # doctest: +SKIP
>>> hl.plot.attention(model, "The cat sat. The cat", heads=cat.heads("induction", 3))  # doctest: +SKIP
"""
__version__ = "0.1.0"

from .data import data_path
from .errors import HeadlensError
from .models import HeadModel, ModelInfo, load_model

# The rest imports torch-heavy modules (and plotly) on first use, so `import headlens` stays quick.
_LAZY = {
    "scan": ("catalogue", "scan"), "Catalogue": ("catalogue", "Catalogue"),
    "read_catalogue": ("catalogue", "read_catalogue"),
    "get_detector": ("detectors", "get_detector"), "Detector": ("detectors", "Detector"),
    "DetectorResult": ("detectors", "DetectorResult"), "REGISTRY": ("detectors", "REGISTRY"),
    "CausalCheck": ("detectors", "CausalCheck"), "format_causal": ("detectors", "format_causal"),
    "run_variants": ("methods", "run_variants"), "sweep_heads": ("methods", "sweep_heads"),
    "ablate_group": ("methods", "ablate_group"), "random_baseline": ("methods", "random_baseline"),
    "clean_run": ("methods", "clean_run"), "patch_heads": ("methods", "patch_heads"),
    "path_patch_logits": ("methods", "path_patch_logits"),
    "direct_logit_attribution": ("methods", "direct_logit_attribution"),
    "attribution_patching": ("methods", "attribution_patching"),
    "loss_metric": ("methods", "loss_metric"), "kl_metric": ("methods", "kl_metric"),
    "logit_diff_metric": ("methods", "logit_diff_metric"),
    "ablate": ("methods", "ablate"), "ablated": ("methods", "ablated"),
    "Intervention": ("methods", "Intervention"), "PatternIntervention": ("methods", "PatternIntervention"),
    "ZeroAblation": ("methods", "ZeroAblation"), "MeanAblation": ("methods", "MeanAblation"),
    "ResampleAblation": ("methods", "ResampleAblation"), "Patch": ("methods", "Patch"),
    "Scale": ("methods", "Scale"), "UniformAttention": ("methods", "UniformAttention"),
    "as_intervention": ("methods", "as_intervention"), "interventions": ("methods.interventions", None),
    "plot": ("plots", None), "plots": ("plots", None), "methods": ("methods", None),
    "detectors": ("detectors", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'headlens' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    mod = importlib.import_module(f".{module}", __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["__version__", "data_path", "HeadlensError", "HeadModel", "ModelInfo", "load_model", *_LAZY]
