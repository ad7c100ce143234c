"""Plotly figures for exploring heads: layer x head maps of any catalogue column, a head's attention
pattern on a prompt, per-head direct logit attribution, the causal check, two catalogues compared,
and composition scores between heads (writer x reader).

Every function returns a ``plotly.graph_objects.Figure`` (show it in a notebook, or ``fig.write_html``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from .errors import HeadlensError
from .methods.readout import attention_on, head_logit_attribution
from .models import HeadModel
from .results import CausalCheck, DetectorResult, as_causal_check, head_names

_SEQUENTIAL = "Viridis"
_DIVERGING = "RdBu_r"


def _frame(catalogue_or_frame) -> pd.DataFrame:
    frame = getattr(catalogue_or_frame, "frame", catalogue_or_frame)
    if not isinstance(frame, pd.DataFrame) or not {"layer", "head"} <= set(frame.columns):
        raise HeadlensError("expected a Catalogue or a per-head DataFrame with layer and head columns")
    frame = frame.copy()
    if "head_id" not in frame:
        frame["head_id"] = [f"L{l}H{h}" for l, h in zip(frame["layer"], frame["head"])]
    return frame


def _grid(frame: pd.DataFrame, values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``[n_layers, n_heads]`` grids of the values and of the head ids."""
    L, H = int(frame["layer"].max()) + 1, int(frame["head"].max()) + 1
    z = np.full((L, H), np.nan)
    ids = np.full((L, H), "", dtype=object)
    z[frame["layer"].to_numpy(), frame["head"].to_numpy()] = pd.to_numeric(values, errors="coerce")
    ids[frame["layer"].to_numpy(), frame["head"].to_numpy()] = frame["head_id"].to_numpy()
    return z, ids


def head_heatmap(catalogue_or_frame, column: str, title: str | None = None,
                 colorscale: str | None = None, mark_labelled: bool = True) -> go.Figure:
    """Layer x head map of one catalogue column; hovering shows the head id and the value.

    For a ``<role>_score`` column the heads labelled with that role (``<role>_label``) are circled.
    """
    frame = _frame(catalogue_or_frame)
    if column not in frame:
        numeric = [c for c in frame.columns if c not in ("layer", "head") and
                   pd.api.types.is_numeric_dtype(frame[c])]
        raise HeadlensError(f"no column '{column}'; numeric columns: {', '.join(numeric) or 'none'}")
    values = frame[column].astype(float) if frame[column].dtype == bool else frame[column]
    z, ids = _grid(frame, values)
    finite = z[np.isfinite(z)]
    diverging = finite.size and finite.min() < 0 < finite.max()
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    fig = go.Figure(go.Heatmap(
        z=z, customdata=ids, x=list(range(z.shape[1])), y=list(range(z.shape[0])),
        colorscale=colorscale or (_DIVERGING if diverging else _SEQUENTIAL),
        zmid=0 if diverging else None, zmin=-bound if diverging else None,
        zmax=bound if diverging else None, colorbar={"title": {"text": column}},
        hovertemplate="%{customdata}<br>" + column + " = %{z:.4g}<extra></extra>", hoverongaps=False))
    role = column[:-len("_score")] if column.endswith("_score") else None
    if mark_labelled and role and f"{role}_label" in frame:
        lab = frame[frame[f"{role}_label"].astype(str).str.lower() == "true"]
        if len(lab):
            fig.add_trace(go.Scatter(
                x=lab["head"], y=lab["layer"], mode="markers", name=f"labelled {role}",
                customdata=lab["head_id"], hovertemplate="%{customdata}: labelled " + role + "<extra></extra>",
                marker={"symbol": "circle-open", "size": 14, "color": "red", "line": {"width": 2}}))
    if not finite.size:
        fig.add_annotation(text=f"no values for {column} (role not applicable or not run)",
                           showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(title=title or column, xaxis_title="head", yaxis_title="layer",
                      yaxis={"autorange": "reversed", "dtick": 1 if z.shape[0] <= 12 else None},
                      xaxis={"dtick": 1 if z.shape[1] <= 24 else None}, showlegend=False,
                      height=max(320, 16 * z.shape[0] + 120), width=max(420, 34 * z.shape[1] + 220),
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


# --- model-based figures ------------------------------------------------------------------------

def attention_patterns(tokens: Sequence[str], patterns, names: Sequence[str],
                       title: str | None = None) -> go.Figure:
    """Attention patterns as data in, a figure out (as CircuitsVis does): ``patterns`` is
    ``[n_heads, n_query, n_key]`` (numpy or torch), ``tokens`` the ``n_key`` token strings, ``names``
    one name per pattern; one heatmap per head, switched with buttons (queries down, keys across).

    >>> attention_patterns(["<s>", " A", " B"], pattern[None], ["L1H2"])   # doctest: +SKIP
    """
    pats = (patterns.detach().float().cpu().numpy() if isinstance(patterns, torch.Tensor)
            else np.asarray(patterns, float))
    if pats.ndim != 3 or pats.shape[0] != len(names) or pats.shape[2] != len(tokens):
        raise HeadlensError(f"patterns must be [n_heads={len(names)}, n_query, n_key={len(tokens)}], "
                            f"got {list(pats.shape)}")
    labels = [f"{i}:{w!r}"[:40] for i, w in enumerate(tokens)]
    n = len(labels)
    qlabels = labels[n - pats.shape[1]:]
    causal = np.tri(n, dtype=bool)[n - pats.shape[1]:]
    fig = go.Figure()
    for i, name in enumerate(names):
        fig.add_trace(go.Heatmap(
            z=np.where(causal, pats[i], np.nan), x=labels, y=qlabels, colorscale="Blues", zmin=0, zmax=1,
            hoverongaps=False, visible=i == 0, name=name, colorbar={"title": {"text": "attention"}},
            hovertemplate=f"{name}<br>query %{{y}}<br>key %{{x}}<br>attention %{{z:.3f}}<extra></extra>"))
    if len(names) > 1:
        buttons = [{"label": name, "method": "update",
                    "args": [{"visible": [j == i for j in range(len(names))]},
                             {"title": {"text": title or f"{name} attention"}}]}
                   for i, name in enumerate(names)]
        fig.update_layout(updatemenus=[{"buttons": buttons, "direction": "right", "x": 0, "y": 1.12,
                                        "xanchor": "left", "type": "buttons"}])
    side = max(420, min(1100, 22 * n + 220))
    fig.update_layout(title=title or f"{names[0]} attention on the prompt",
                      xaxis={"title": "key (attended) token", "tickangle": -60},
                      yaxis={"title": "query token", "autorange": "reversed"},
                      width=side + 80, height=side, margin={"l": 140, "r": 20, "t": 80, "b": 140})
    return fig


def attention(model: HeadModel, prompt, heads: Sequence[tuple[int, int]], title: str | None = None) -> go.Figure:
    """The attention patterns of ``heads`` (``[(layer, head), ...]``) on ``prompt`` (a string, the start
    token prepended, or token ids): :func:`headlens.methods.readout.attention_on`, then
    :func:`attention_patterns`.

    >>> hl.plot.attention(model, "The cat sat. The cat", heads=cat.heads("induction", 3))  # doctest: +SKIP
    """
    words, pats = attention_on(model, prompt, heads)
    return attention_patterns(words, pats, [f"L{int(h[0])}H{int(h[1])}" for h in heads], title)


def attention_pattern(model: HeadModel, prompt, layer: int, head: int, title: str | None = None) -> go.Figure:
    """The attention pattern of head ``L{layer}H{head}`` on ``prompt`` (queries down, keys across)."""
    return attention(model, prompt, [(layer, head)],
                     title or f"L{layer}H{head} attention on the prompt")


def logit_attribution_bars(model: HeadModel, prompt, target, against=None, position: int = -1,
                           top: int | None = 20, title: str | None = None) -> go.Figure:
    """Bars of per-head direct logit attribution to ``target`` (or ``target - against``) at
    ``position``; ``top`` keeps the heads with the largest absolute values (None: all heads)."""
    dla = head_logit_attribution(model, prompt, target, against, position).numpy()
    L, H = dla.shape
    ids = np.array([f"L{l}H{h}" for l in range(L) for h in range(H)])
    flat = dla.reshape(-1)
    order = np.argsort(-np.abs(flat), kind="stable")[: top or flat.size]
    fig = go.Figure(go.Bar(
        x=ids[order], y=flat[order], marker_color=np.where(flat[order] >= 0, "#2b6cb0", "#c53030"),
        hovertemplate="%{x}<br>direct logit attribution %{y:.3f}<extra></extra>"))
    what = repr(target) if against is None else f"{target!r} - {against!r}"
    fig.update_layout(title=title or f"Direct logit attribution to {what} (position {position})",
                      xaxis_title="head", yaxis_title="logit contribution", height=420,
                      margin={"l": 60, "r": 20, "t": 50, "b": 80})
    return fig


# --- catalogue-level figures --------------------------------------------------------------------

def causal_check(causal: CausalCheck | dict, title: str | None = None) -> go.Figure:
    """The causal check of a detector (a :class:`~headlens.results.CausalCheck` or its sidecar record):
    the metric clean, with its top-k heads ablated together, and with each of the random k-head draws
    ablated (points, with their mean and standard deviation)."""
    causal = as_causal_check(causal).to_dict() if causal else {}
    need = {"clean", "top_k_ablated", "random_k_ablated", "k", "metric"}
    if not causal or not need <= set(causal):
        raise HeadlensError("no causal check recorded (the detector did not run one or was not applicable)")
    k = causal["k"]
    rand = np.asarray(causal["random_k_ablated"], float)
    draws = causal.get("random_draws") or [[] for _ in rand]
    fig = go.Figure()
    fig.add_trace(go.Bar(
        x=["clean", f"top-{k} ablated", f"random {k} ablated"],
        y=[causal["clean"], causal["top_k_ablated"], float(rand.mean()) if rand.size else np.nan],
        error_y={"type": "data", "array": [0, 0, float(rand.std(ddof=1)) if rand.size > 1 else 0]},
        marker_color=["#718096", "#c53030", "#2b6cb0"], name="value",
        customdata=["", ", ".join(causal.get("top_heads", [])), f"mean of {rand.size} draws"],
        hovertemplate="%{x}: %{y:.4g}<br>%{customdata}<extra></extra>"))
    fig.add_trace(go.Scatter(
        x=[f"random {k} ablated"] * rand.size, y=rand, mode="markers", name="random draws",
        marker={"color": "black", "size": 7, "opacity": 0.7},
        customdata=[", ".join(d) for d in draws],
        hovertemplate="draw: %{customdata}<br>%{y:.4g}<extra></extra>"))
    title = title or f"Causal check: top-{k} heads vs random {k} heads"
    if causal.get("p_value") is not None:
        title += f" (p = {causal['p_value']:.3g}, {rand.size} draws)"
    fig.update_layout(title=title,
                      yaxis_title=causal["metric"], showlegend=False, height=420, width=560,
                      margin={"l": 70, "r": 20, "t": 50, "b": 50})
    return fig


def evidence(result: DetectorResult) -> list[go.Figure]:
    """A layer x head map of each evidence column of a :class:`~headlens.results.DetectorResult`
    (none when the role does not apply to the model)."""
    return [head_heatmap(result.frame, c) for c in result.evidence_columns] if result.applies else []


def compare_catalogues(a, b, role: str, labels: Sequence[str] = ("a", "b"),
                       kind: str = "scatter") -> go.Figure:
    """Compare two catalogues (two models with the same layout, or two runs) head by head on
    ``<role>_score``: ``kind="scatter"`` (b against a, one point per head, diagonal = equal) or
    ``kind="difference"`` (layer x head map of b - a)."""
    col = f"{role}_score"
    fa, fb = _frame(a), _frame(b)
    for name, f in zip(labels, (fa, fb)):
        if col not in f:
            raise HeadlensError(f"catalogue {name} has no role '{role}' (no column {col})")
    both = fa[["layer", "head", "head_id", col]].merge(fb[["layer", "head", col]], on=["layer", "head"],
                                                       suffixes=("_a", "_b"))
    if both.empty:
        raise HeadlensError("the two catalogues share no (layer, head)")
    if kind == "difference":
        diff = both[["layer", "head", "head_id"]].assign(**{
            f"{col} ({labels[1]} - {labels[0]})": both[f"{col}_b"] - both[f"{col}_a"]})
        return head_heatmap(diff, diff.columns[-1], title=f"{role}: {labels[1]} - {labels[0]}",
                            mark_labelled=False)
    if kind != "scatter":
        raise HeadlensError(f"unknown comparison kind '{kind}'; use scatter or difference")
    x, y = both[f"{col}_a"].to_numpy(float), both[f"{col}_b"].to_numpy(float)
    finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)]])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    fig = go.Figure([
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dot", "color": "gray"},
                   hoverinfo="skip", name="equal"),
        go.Scatter(x=x, y=y, mode="markers", customdata=both["head_id"], name="heads",
                   marker={"size": 7, "color": both["layer"], "colorscale": _SEQUENTIAL,
                           "colorbar": {"title": {"text": "layer"}}},
                   hovertemplate="%{customdata}<br>" + labels[0] + " %{x:.4g}<br>" + labels[1]
                                 + " %{y:.4g}<extra></extra>")])
    fig.update_layout(title=f"{role} score: {labels[1]} vs {labels[0]}", xaxis_title=f"{col} ({labels[0]})",
                      yaxis_title=f"{col} ({labels[1]})", showlegend=False, height=480, width=560)
    return fig


def composition_heatmap(scores, writers: Sequence | None = None, readers: Sequence | None = None,
                        kind: str | None = None, baseline: float | None = None,
                        title: str | None = None) -> go.Figure:
    """Writer x reader map of composition scores: ``scores`` ``[n_writers, n_readers]`` (numpy or torch;
    NaN cells, e.g. readers not after the writer, stay blank), ``writers`` and ``readers`` the heads of the
    rows and columns (``(layer, head)`` or ``"L0H1"``), ``kind`` ``"q"``, ``"k"`` or ``"v"``, ``baseline``
    the random-matrix score (in the title). A :class:`~headlens.methods.composition.Composition` may be
    given as ``scores``; its heads, kind and baseline are then the defaults.

    >>> comp = hl.composition(model, "k")                                        # doctest: +SKIP
    >>> hl.plot.composition_heatmap(comp.scores, comp.writers, comp.readers, kind="k")   # doctest: +SKIP
    """
    if hasattr(scores, "scores") and hasattr(scores, "writers"):      # a Composition
        comp = scores
        scores = comp.scores
        writers = comp.writers if writers is None else writers
        readers = comp.readers if readers is None else readers
        kind = kind or comp.kind
        baseline = comp.baseline if baseline is None else baseline
    z = scores.detach().float().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, float)
    rows = head_names(list(writers) if writers is not None else [])
    cols = head_names(list(readers) if readers is not None else [])
    if z.ndim != 2 or z.shape != (len(rows), len(cols)):
        raise HeadlensError(f"scores must be [n_writers={len(rows)}, n_readers={len(cols)}], got {list(z.shape)}")
    if kind is None or str(kind).lower() not in ("q", "k", "v"):
        raise HeadlensError(f"composition kind must be 'q', 'k' or 'v', not {kind!r}")
    what = f"{str(kind).upper()}-composition"
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=rows, colorscale=_SEQUENTIAL, zmin=0, hoverongaps=False,
        colorbar={"title": {"text": what}},
        hovertemplate="writer %{y} -> reader %{x}<br>" + what + " %{z:.4g}<extra></extra>"))
    base = f" (random-matrix baseline {baseline:.3g})" if baseline is not None and np.isfinite(baseline) else ""
    fig.update_layout(title=title or what + base, xaxis_title="reader head", yaxis_title="writer head",
                      yaxis={"autorange": "reversed"}, xaxis={"tickangle": -60},
                      height=max(320, 16 * len(rows) + 140), width=max(420, 16 * len(cols) + 260),
                      margin={"l": 70, "r": 20, "t": 50, "b": 70})
    return fig


__all__ = ["attention", "attention_pattern", "causal_check", "compare_catalogues", "composition_heatmap", "evidence",
           "head_heatmap", "head_logit_attribution", "logit_attribution_bars"]
