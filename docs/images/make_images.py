"""Static PNG images of headlens's key views on SmolLM2-135M-Instruct, for README.md and docs/detectors/.

The notebooks are committed without outputs, so these pictures are what a visitor sees before installing
anything. They come from a real scan, made by this script (never edited by hand):

- ``<role>_heads.png``: the layer x head map of ``<role>_score``, labelled heads circled
  (``hl.plot.head_heatmap``), one per role in the catalogue;
- ``<role>_causal.png``: the causal check, top-k heads ablated vs random k-head draws
  (``hl.plot.causal_check``), for each role that has one;
- ``induction_attention.png``: the attention pattern of the top induction head on a prompt that repeats
  (``hl.plot.attention``).

Run it from the repository root (quiet 2-core CPU: about 5 minutes with the scan, under a minute without):

    python3 -m pip install -e '.[docs]'                  # kaleido, plotly's PNG export
    apt-get install -y chromium                          # the browser kaleido renders with
    python3 docs/images/make_images.py                   # scans smollm2-135m (all roles, seed 0) first
    python3 docs/images/make_images.py --catalogue catalogue.csv   # or from a finished scan (+ its .json)

kaleido (>= 1) drives a Chrome or Chromium that is already installed; if it does not find one, point it
at the browser with ``BROWSER_PATH=/usr/bin/chromium``. Images are written to this script's folder
(``--out`` to change it), ``--scale`` 1.5 by default (sharp on high-density screens, each under 300 KB).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
# A prompt that repeats a phrase, so an induction head at the second copy attends to the token after
# the first copy's occurrence of the current token (the diagonal stripe in the picture).
REPEATED_PROMPT = ("The old lighthouse keeper polished brass lamps every stormy night. "
                   "The old lighthouse keeper polished brass lamps every stormy night.")
ROLE_TITLES = {"induction": "Induction", "successor": "Successor", "copy_suppression": "Copy suppression",
               "retrieval": "Retrieval", "safety": "Safety", "previous_token": "Previous-token",
               "duplicate_token": "Duplicate-token", "attention_sink": "Attention-sink"}


def _find_browser() -> None:
    """Let kaleido use the system Chromium/Chrome when ``BROWSER_PATH`` is unset."""
    if os.environ.get("BROWSER_PATH"):
        return
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            os.environ["BROWSER_PATH"] = path
            return


def _wrap(text: str, width: int) -> str:
    return "<br>".join(textwrap.wrap(text, width)) or text


def _save(fig, path: Path, scale: float) -> None:
    fig.update_layout(template="plotly_white", paper_bgcolor="white", font={"size": 13})
    fig.write_image(str(path), scale=scale)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


def heads_figure(hl, cat, role: str, model_name: str, seed):
    result = cat[role]
    labelled = [f"L{l}H{h}" for l, h in result.labelled]
    if result.status != "ok":
        what = result.status.replace("_", " ")
    elif labelled:
        what = f"{len(labelled)} head{'s' * (len(labelled) != 1)} labelled (circled)"
    else:
        what = "no head passes the labelling rule"
    fig = hl.plot.head_heatmap(cat, f"{role}_score",
                               title=f"{ROLE_TITLES.get(role, role)} score per head<br>"
                                     f"<sup>{model_name}, seed {seed}: {what}</sup>")
    n_layers, n_heads = int(cat.frame["layer"].max()) + 1, int(cat.frame["head"].max()) + 1
    fig.update_traces(colorbar_title_text="score", selector={"type": "heatmap"})
    fig.update_layout(width=520, height=640, margin={"l": 60, "r": 20, "t": 80, "b": 50},
                      xaxis={"dtick": 1, "range": [-0.5, n_heads - 0.5]},   # the whole grid, even if empty
                      yaxis={"dtick": 2, "autorange": False, "range": [n_layers - 0.5, -0.5]})
    if result.status != "ok":
        fig.update_layout(plot_bgcolor="#eeeeee")
        if result.reason:
            fig.add_annotation(text=_wrap(result.reason, 44), showarrow=False, xref="paper", yref="paper",
                               x=0.5, y=0.35, font={"size": 12})
    return fig


def causal_figure(hl, cat, role: str, model_name: str):
    import plotly.graph_objects as go

    check = cat[role].causal
    fig = hl.plot.causal_check(check)
    values = [check.clean, check.top_k_ablated, *check.random_k_ablated]
    span, size = max(values) - min(values), max(abs(v) for v in values)
    if size and span < 0.3 * size:
        # Bars from zero would hide differences small against the values (e.g. log-probs near -1.2):
        # the same three values as points on a zoomed axis.
        bars = fig.data[0]
        fig = go.Figure([go.Scatter(x=bars.x, y=bars.y, error_y=bars.error_y.to_plotly_json(), mode="markers",
                                    marker={"color": bars.marker.color, "size": 18, "symbol": "diamond"},
                                    customdata=bars.customdata, hovertemplate=bars.hovertemplate),
                         *fig.data[1:]], layout=fig.layout)
    fig.add_hline(y=check.clean, line={"dash": "dot", "color": "#718096", "width": 1})
    heads = ", ".join(check.top_heads)
    fig.update_layout(
        title=f"{ROLE_TITLES.get(role, role)}: causal check on {model_name}<br>"
              f"<sup>top {check.k} heads ablated together vs {check.n_random} draws of {check.k} random "
              f"heads ({check.ablation or 'ablation'}); p = {check.p_value:.3g}<br>"
              f"top heads: {_wrap(heads, 90)}</sup>",
        yaxis_title={"text": _wrap(f"{check.metric} ({check.worse} = the heads matter more)", 48),
                     "font": {"size": 12}},
        width=760, height=540, margin={"l": 110, "r": 20, "t": 110, "b": 50})
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", type=Path, help="a finished scan's CSV (its .json sidecar beside it); "
                                                        "default: scan the model now (all roles)")
    parser.add_argument("--model", default="smollm2-135m", help="model for the scan and the attention pattern")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scan made when --catalogue is not given")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the PNG files (default: docs/images)")
    parser.add_argument("--scale", type=float, default=1.5, help="pixel scale of the PNG export")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE.parent.parent))          # this checkout's headlens
    import headlens as hl

    try:
        import kaleido  # noqa: F401
    except ImportError:
        parser.error("PNG export needs kaleido: python3 -m pip install -e '.[docs]' (and a Chromium)")
    _find_browser()

    model = hl.load_model(args.model)
    if args.catalogue:
        cat = hl.read_catalogue(args.catalogue)
    else:
        cat = hl.scan(model, seed=args.seed)
    model_name = {"smollm2-135m": "SmolLM2-135M-Instruct"}.get(cat.meta.get("model", {}).get("name"),
                                                                 cat.meta.get("model", {}).get("name", args.model))
    seed = cat.meta.get("seed", args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    for role in cat.roles:
        _save(heads_figure(hl, cat, role, model_name, seed), args.out / f"{role}_heads.png", args.scale)
        if cat[role].causal is not None:
            _save(causal_figure(hl, cat, role, model_name), args.out / f"{role}_causal.png", args.scale)

    if "induction" in cat:
        (layer, head), = cat.heads("induction", k=1)
        # Token ids with the model's start token first, as the detectors prompt it (a string would get
        # the tokenizer's BOS, which for SmolLM2 is the chat marker <|im_start|>).
        ids = [model.start_token_id] if model.start_token_id is not None else []
        ids += model.tokenizer.encode(REPEATED_PROMPT, add_special_tokens=False)
        fig = hl.plot.attention(model, ids, heads=[(layer, head)],
                                title=f"L{layer}H{head}, the top induction head of {model_name}, "
                                      "on a repeated sentence<br><sup>at each token of the second copy it "
                                      "attends to the token after that token's first occurrence</sup>")
        fig.update_layout(width=900, height=820, margin={"l": 150, "r": 20, "t": 90, "b": 150})
        _save(fig, args.out / "induction_attention.png", args.scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
