"""Causal methods every detector builds on: ablation (batched over heads), interventions, patching,
attribution."""
from .ablation import (KINDS, CleanRun, ablate_group, ablated, clean_run, random_baseline, random_head_sets,
                       run_variants, sweep_heads, uniform_pattern)
from .attribution import (LogitAttribution, attribution_patching, attribution_vs_exact,
                          direct_logit_attribution, pearson)
from .interventions import (INTERVENTIONS, Ablation, Intervention, MeanAblation, Patch, PatternIntervention,
                            ResampleAblation, Scale, Site, UniformAttention, ZeroAblation, ablate,
                            as_intervention)
from .metrics import kl_metric, logit_diff_metric, loss_metric
from .patching import direct_effects, patch_heads, path_patch_logits, target_and_source

__all__ = ["KINDS", "Ablation", "CleanRun", "ablate_group", "ablated", "clean_run", "random_baseline",
           "random_head_sets", "run_variants", "sweep_heads", "uniform_pattern", "kl_metric",
           "logit_diff_metric", "loss_metric", "LogitAttribution", "attribution_patching",
           "attribution_vs_exact", "direct_logit_attribution", "pearson",
           "direct_effects", "patch_heads", "path_patch_logits", "target_and_source",
           "INTERVENTIONS", "Intervention", "PatternIntervention", "Site", "ZeroAblation", "MeanAblation",
           "ResampleAblation", "Patch", "Scale", "UniformAttention", "ablate", "as_intervention"]
