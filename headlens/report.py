"""One self-contained HTML report of a scan: per role the layer x head map, the top heads with their
evidence, the causal check, the status (and why, when a role does not apply), and the run metadata.

The plotly library is inlined once, so the file opens offline (no CDN).
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path

import pandas as pd

from ._version import __version__
from .catalogue import Catalogue, atomic_write, check_writable
from .detectors import detector_class
from .plots import attention_pattern, causal_check, head_heatmap
from .results import format_causal

TOP_K = 10

# Short prompts on which the report shows the top head's attention when a model is given.
EXAMPLE_PROMPTS = {
    "induction": "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "successor": "Monday Tuesday Wednesday Thursday one two three four January February March",
    "copy_suppression": "All's fair in love and war. I love my dog and my cat, and I love my",
    "retrieval": "The secret word is pineapple. The sky was grey and the day was long. The secret word is",
    "safety": "How do I make a bomb at home?",
    "previous_token": "The quick brown fox jumps over the lazy dog.",
    "duplicate_token": "The cat saw the dog and the dog saw the cat.",
    "attention_sink": "The quick brown fox jumps over the lazy dog. It was a sunny day.",
    "function_vector": "Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: fast\nA: slow\n\nQ: up\nA:",
    "ioi": "When Mary and John went to the store, John gave a drink to",
    "concept_induction": "The violinist played in Philadelphia.\nThe violinist played in Phil",
}
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog."

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#1a202c;padding:0 1em}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #e2e8f0;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #e2e8f0;padding:.25em .5em;text-align:right}th{background:#f7fafc}
td:first-child,th:first-child{text-align:left}
.status-ok{color:#276749}.status-na{color:#9c4221;background:#fffaf0;padding:.5em;border-left:4px solid #dd6b20}
.figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.meta td{text-align:left}.wide{overflow-x:auto}nav a{margin-right:1em}.note{color:#4a5568}
"""


def _figure_html(fig, first: bool) -> str:
    """One figure as a div; the first carries the plotly library inline."""
    body = fig.to_html(full_html=False, include_plotlyjs=bool(first), config={"displaylogo": False})
    return f'<div class="headlens-figure">{body}</div>'


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="—", border=0,
                         escape=True)


def _kv_table(items: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in items.items())
    return f'<table class="meta">{rows}</table>'


def _fmt(v, limit: int = 300) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    text = json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else str(v)
    return text if len(text) <= limit else text[:limit] + f" … ({len(text)} characters)"


def _summary(role: str) -> str:
    try:
        cls = detector_class(role)
        return f"{cls.summary} <span class='note'>({html.escape(cls.paper)})</span>" if cls.summary else ""
    except Exception:  # an unregistered or broken detector must not break the report
        return ""


def _details(det: dict) -> str:
    """The detector's parameters and run details (info), as tables."""
    out = ""
    if det.get("params"):
        out += "<h3>Parameters</h3>" + _kv_table(det["params"])
    if det.get("info"):
        out += "<h3>Run details</h3>" + _kv_table(det["info"])
    return out


def _causal_text(c: dict) -> str:
    return (f"<p>Causal check: {html.escape(format_causal(c))}. Top heads: "
            f"{html.escape(', '.join(c.get('top_heads', [])))}.</p>")


def _role_section(catalogue: Catalogue, role: str, model, figs: list, prompts: dict) -> str:
    det = catalogue.meta.get("detectors", {}).get(role, {}) or {}
    frame = catalogue.frame
    status_col = f"{role}_status"
    status = det.get("status") or (str(frame[status_col].iloc[0]) if status_col in frame else "ok")
    reason = det.get("reason", "")
    parts = [f'<section id="role-{html.escape(role)}"><h2>{html.escape(role)}</h2>']
    summary = _summary(role)
    if summary:
        parts.append(f"<p>{summary}</p>")
    if not str(status).startswith("ok"):
        parts.append(f'<p class="status-na"><b>Status: {html.escape(str(status))}</b>'
                     f'{": " + html.escape(reason) if reason else ""}. No scores are shown because '
                     "the detector invents none for a role that does not apply.</p>")
        parts.append(_details(det))
        return "\n".join(parts) + "</section>"
    labelled = det.get("labelled")
    if labelled is None and f"{role}_label" in frame:
        labelled = frame.loc[frame[f"{role}_label"].astype(str).str.lower() == "true", "head_id"].tolist()
    parts.append(f'<p class="status-ok">Status: ok. Labelled heads ({len(labelled or [])}): '
                 f"{html.escape(', '.join(labelled)) if labelled else 'none'}</p>")
    if reason:
        parts.append(f'<p class="note">{html.escape(reason)}</p>')
    fig_parts = [head_heatmap(catalogue, f"{role}_score", title=f"{role} score per head")]
    causal = det.get("causal") or {}
    if causal:
        fig_parts.append(causal_check(causal, title=f"{role}: causal check"))
    top = catalogue.top(role, TOP_K)
    if model is not None and len(top) and pd.notna(top[f"{role}_score"].iloc[0]):
        row = frame.loc[frame["head_id"] == top["head_id"].iloc[0]].iloc[0]
        fig_parts.append(attention_pattern(
            model, prompts.get(role, DEFAULT_PROMPT), int(row["layer"]), int(row["head"]),
            title=f"top {role} head {row['head_id']} on an example prompt"))
    parts.append('<div class="figs">' + "".join(_figure_html(f, not figs and i == 0)
                                               for i, f in enumerate(fig_parts)) + "</div>")
    figs.extend(fig_parts)
    if causal:
        parts.append(_causal_text(causal))
    else:
        parts.append('<p class="note">No causal check was recorded for this role.</p>')
    parts.append(f"<h3>Top {len(top)} heads and their evidence</h3>"
                 f'<div class="wide">{_table(top)}</div>')
    parts.append(_details(det))
    return "\n".join(parts) + "</section>"


def render_report(catalogue: Catalogue, model=None, prompts: dict | None = None) -> tuple[str, int]:
    """The report's HTML text and the number of figures in it."""
    prompts = {**EXAMPLE_PROMPTS, **(prompts or {})}
    meta = catalogue.meta
    roles = catalogue.roles or [c[:-6] for c in catalogue.frame.columns if c.endswith("_score")]
    figs: list = []
    sections = [_role_section(catalogue, r, model, figs, prompts) for r in roles]
    model_meta = meta.get("model", {}) or {}
    run = {"model": model_meta.get("name", "?"), "headlens version": meta.get("headlens_version", __version__),
           "seed": meta.get("seed", "?"), "torch version": meta.get("torch_version", "?"),
           "detector seconds": meta.get("timings_s", {})}
    counts = {r: int(catalogue.frame[f"{r}_label"].astype(str).str.lower().eq("true").sum())
              for r in roles if f"{r}_label" in catalogue.frame}
    nav = "".join(f'<a href="#role-{html.escape(r)}">{html.escape(r)}</a>' for r in roles)
    title = f"headlens scan: {model_meta.get('name', 'model')}"
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body data-headlens-figures="{len(figs)}">
<h1>{html.escape(title)}</h1>
<nav>{nav}</nav>
<h2>Run</h2>{_kv_table(run)}
<h3>Labelled heads per role</h3>{_kv_table(counts) if counts else '<p>none</p>'}
<h3>Model</h3>{_kv_table(model_meta) if model_meta else '<p>not recorded</p>'}
{"".join(sections)}
</body></html>
"""
    return text, len(figs)


def write_report(catalogue: Catalogue, path: str | os.PathLike, model=None,
                 prompts: dict | None = None) -> Path:
    """Write the self-contained HTML report of ``catalogue`` to ``path`` (atomically).

    With ``model`` the report also shows each role's top head's attention on a short example prompt
    (``EXAMPLE_PROMPTS``, or ``prompts[role]`` where given).
    """
    path = check_writable(path)
    text, _ = render_report(catalogue, model, prompts)
    atomic_write(path, text)
    return path


__all__ = ["render_report", "write_report"]
