"""Causal methods every detector builds on: the forward-pass machinery, interventions, ablation (batched
over heads), patching, attribution, weight circuits, composition scores and generation. Detectors use
this public API only."""
from . import interventions as interventions
from .ablation import KINDS, ablate_group, random_baseline, random_head_sets, run_variants, sweep_heads
from .attribution import LogitAttribution, attribution_patching, attribution_vs_exact, direct_logit_attribution, pearson
from .composition import COMPOSITION_KINDS, Composition, composition, composition_baseline
from .forward import CleanRun, clean_run, forward_from, logits_at, row_bytes
from .hooks import FINAL_SCALE, Head, mlp_out_name, pattern_name, resid_name, uniform_pattern, v_name, z_name
from .interventions import (
    INTERVENTIONS,
    Intervention,
    MeanAblation,
    Patch,
    PatternIntervention,
    ResampleAblation,
    Scale,
    Site,
    UniformAttention,
    ZeroAblation,
    ablate,
    as_intervention,
)
from .metrics import kl_metric, logit_diff_metric, loss_metric
from .patching import direct_effects, patch_heads, path_patch_logits, target_and_source
from .patterns import pattern_scores
from .prompts import random_token_ids, repeated_tokens, text_chunks
from .steering import Emphasis, Steer, emphasis, steer

__all__ = ["KINDS", "CleanRun", "ablate_group", "clean_run", "forward_from", "logits_at", "row_bytes",
           "random_baseline", "random_head_sets", "run_variants", "sweep_heads", "uniform_pattern",
           "Head", "z_name", "pattern_name", "v_name", "resid_name", "mlp_out_name", "FINAL_SCALE",
           "random_token_ids", "repeated_tokens", "text_chunks",
           "kl_metric", "logit_diff_metric", "loss_metric", "LogitAttribution", "attribution_patching",
           "attribution_vs_exact", "direct_logit_attribution", "pearson",
           "direct_effects", "patch_heads", "path_patch_logits", "target_and_source",
           "COMPOSITION_KINDS", "Composition", "composition", "composition_baseline",
           "INTERVENTIONS", "Intervention", "PatternIntervention", "Site", "ZeroAblation", "MeanAblation",
           "ResampleAblation", "Patch", "Scale", "UniformAttention", "ablate", "as_intervention"]

__all__ += ["pattern_scores"]
__all__ += ["Emphasis", "Steer", "emphasis", "steer"]
from .steering import SteeredText, steer_generate  # noqa: E402

__all__ += ["SteeredText", "steer_generate"]

from .hooks import q_name  # noqa: E402
from .patching import path_patch_to_heads  # noqa: E402

__all__ += ["q_name", "path_patch_to_heads"]
