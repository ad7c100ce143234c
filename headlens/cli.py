"""The ``headlens`` command line: ``scan``, ``show``, ``detectors``, ``steer``, ``profile-steering`` and
``evaluate-steering``."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
import typer
from rich.console import Console
from rich.table import Table

from .catalogue import Catalogue, check_writable, read_catalogue, sidecar_path
from .catalogue import scan as run_scan
from .detectors import REGISTRY, detector_class, get_detector, parse_detectors
from .errors import HeadlensError
from .models import load_model
from .report import write_report
from .results import format_causal
from .runtime import distributed, progress
from .runtime.checkpoint import Checkpoint, checkpoint_dir
from .runtime.memory import parse_bytes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find and score attention-head roles into a per-head catalogue.")
# In a log (not a terminal) rich would squeeze tables into 80 columns: give them room unless COLUMNS says.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
out = Console(width=_WIDTH)
err = Console(stderr=True, width=_WIDTH)


def _params(values: list[str]) -> dict[str, dict]:
    """``--param induction.seq_len=20`` -> {"induction": {"seq_len": 20}} (values parsed as JSON when possible)."""
    result: dict[str, dict] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        role, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise HeadlensError(f"bad --param '{item}'; write ROLE.NAME=VALUE, e.g. induction.seq_len=20")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        result.setdefault(role, {})[name] = value
    return result


def _cell(value) -> str:
    """One table cell: numbers to 3 significant digits (trailing zeros kept, so columns line up), NaN as
    NaN, booleans as yes / no."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return "NaN" if math.isnan(value) else f"{value:#.3g}"
    return str(value)


def key_columns(catalogue: Catalogue, role: str) -> list[str]:
    """The role's key evidence columns for the terminal table: the detector's ``key_columns`` that the
    catalogue has (none for a role that is not registered: score and label only)."""
    try:
        keys = detector_class(role).key_columns
    except HeadlensError:
        keys = ()
    return [f"{role}_{c}" for c in keys if f"{role}_{c}" in catalogue.frame]


def top_table(catalogue: Catalogue, role: str, k: int) -> Table | str:
    """The role's top heads as a short table: head, score with its interval, the role's key evidence
    columns, the label (yes / no), and ``<role>_stability`` where the catalogue has it; everything else
    stays in the CSV, the sidecar and the report. One line instead when the role could not be scored."""
    status = catalogue.frame[f"{role}_status"].iloc[0] if f"{role}_status" in catalogue.frame else "ok"
    if status != "ok":
        kind, _, reason = str(status).partition(": ")
        return f"[yellow]{role}: {kind.replace('_', ' ')}: {reason}[/yellow]"
    frame = catalogue.top(role, k)
    score, lo, hi = f"{role}_score", f"{role}_score_lo", f"{role}_score_hi"
    interval = lo in frame and hi in frame
    level = ((catalogue.meta.get("detectors") or {}).get(role) or {}).get("params", {}).get("ci_level")
    header = "score" + ((f" [{level:.0%} interval]" if level else " [interval]") if interval else "")
    # (header, column, cell reader) in the table's order
    columns = [("head", "head_id", str), (header, score, None)]
    columns += [(c.removeprefix(f"{role}_"), c, _cell) for c in key_columns(catalogue, role)]
    columns += [("label", c, lambda v: _cell(_as_bool(v))) for c in [f"{role}_label"] if c in frame]
    columns += [("stability", c, _cell) for c in [f"{role}_stability"] if c in frame]
    table = Table(title=f"{role}: top {k} heads")
    for name, col, _ in columns:
        table.add_column(name, justify="left" if col == "head_id" else "right")
    for _, row in frame.iterrows():
        cells = []
        for _, col, read in columns:
            if col != score:
                cells.append(read(row[col]))
            elif interval and not (pd.isna(row[lo]) and pd.isna(row[hi])):
                cells.append(f"{_cell(row[score])} [{_cell(row[lo])}, {_cell(row[hi])}]")
            else:
                cells.append(_cell(row[score]))
        table.add_row(*cells)
    return table


def _as_bool(value) -> bool | str:
    """A label cell as read from a frame or a CSV (bool, or a 'True' / 'False' string)."""
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower(), value)
    return value if pd.isna(value) else bool(value)


@app.command()
def scan(
    model: str = typer.Argument("smollm2-135m", help="built-in name, local HF folder, .gguf file or hub id"),
    detectors: str = typer.Option("default", "--detectors", "-d", help="comma-separated roles; 'default' (every "
                                   "role but the opt-in ones), 'all' (opt-in ones too), e.g. 'default,ioi'"),
    out_path: str = typer.Option("catalogue.csv", "--out", "-o", help="where to write the catalogue CSV"),
    seed: int = typer.Option(0, help="random seed (same seed, same catalogue)"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    start_token: Optional[str] = typer.Option(
        None, "--start-token", help="token (or id) that starts plain-text prompts; "
        "default: the document start the model was trained with"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="most sequences in one batched forward "
                                             "pass (default: each detector's own: 64, 512 for short prompts)"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="most memory on the device, weights "
                                             "included, e.g. 8GB (default: what is free)"),
    param: list[str] = typer.Option([], "--param", "-p", help="detector parameter, ROLE.NAME=VALUE (repeatable); "
                                "all.NAME=VALUE: every detector run that has NAME, e.g. all.n_random=99"),
    report: Optional[str] = typer.Option(None, help="also write a self-contained HTML report here"),
    top: int = typer.Option(10, help="heads per role in the summary table"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed scan from its checkpoint <out>.ckpt"),
    gpus: int = typer.Option(1, "--gpus", help="data parallel: run N processes (torchrun); one GPU each "
                             "with --device cuda, an equal group of GPUs each with --device auto"),
    split: str = typer.Option("auto", "--split", help="how N processes share the scan: detectors (each runs "
                              "whole detectors), sweeps (all share every sweep) or auto (the faster by "
                              "estimate)"),
    checkpoint_every: float = typer.Option(300.0, "--checkpoint-every",
                                           help="save a running detector's finished chunks every S seconds "
                                                "(0: every chunk; -1: finished detectors only)"),
):
    """Scan MODEL's attention heads with the chosen detectors and write the catalogue CSV."""
    if gpus < 1:
        raise HeadlensError(f"--gpus must be at least 1, not {gpus}")
    if split not in distributed.SPLITS:
        raise HeadlensError(f"unknown --split '{split}'; choose one of {', '.join(distributed.SPLITS)}")
    device = distributed.init(device)
    if not distributed.is_main():  # rank 0 alone prints and writes
        out.quiet = err.quiet = True

    names = parse_detectors(detectors)
    if max_memory is not None:
        parse_bytes(max_memory)  # a bad size fails before the model loads
    overrides = _params(param)
    shared = overrides.pop("all", {})      # -p all.NAME=VALUE: every detector run that has NAME
    for role in overrides:
        if role not in names:
            raise HeadlensError(f"--param for '{role}', which is not among the detectors run ({', '.join(names)})")
    fields = {n: {f.name for f in dataclasses.fields(detector_class(n).Params)} for n in names}
    for key in shared:
        if not any(key in known for known in fields.values()):
            raise HeadlensError(f"--param all.{key}: none of the detectors run ({', '.join(names)}) has it")
    dets = [get_detector(n, **{**{k: v for k, v in shared.items() if k in fields[n]}, **overrides.get(n, {})})
            for n in names]
    if distributed.is_main():
        check_writable(out_path)
        if report:
            check_writable(report)
    if gpus > 1 and not distributed.launched():  # checked what can be checked here: now start N ranks
        raise typer.Exit(_launch(gpus, device))
    t0 = time.perf_counter()
    with err.status(f"loading {model}"):
        m = load_model(model, device=device, dtype=dtype, start_token=start_token)
    load_s = time.perf_counter() - t0
    err.print(f"loaded {m.info.name}: {m.n_layers} layers x {m.n_heads} heads "
              f"({m.info.n_kv_heads} kv heads), {m.info.dtype} on {m.info.device} in {load_s:.1f} s")
    _interrupted["hint"] = f"finished work is checkpointed in {checkpoint_dir(out_path)}; rerun with --resume"
    with progress.bars() if distributed.is_main() else contextlib.nullcontext():
        ckpt = Checkpoint.open(out_path, m, seed, resume=resume,
                               every_s=None if checkpoint_every < 0 else checkpoint_every)
        cat = run_scan(m, dets, seed=seed, checkpoint=ckpt, split=split, batch_size=batch_size,
                       max_memory=max_memory, progress=distributed.is_main())
    cat.meta["timings_s"]["model_load"] = round(load_s, 2)
    if not distributed.is_main():
        ckpt.finish()
        distributed.finish()
        return
    for role in names:
        out.print(top_table(cat, role, top))
        d = cat.meta["detectors"][role]
        if d["status"] == "ok" and not d["labelled"]:
            out.print(f"[yellow]{role}: no head labelled. {d['reason']}[/yellow]")
        c = d.get("causal") or {}
        if c:
            out.print(f"  causal check: {format_causal(c)}", highlight=False)
    cat.to_csv(out_path)
    out.print(f"wrote {out_path} ({len(cat.frame)} heads) and its metadata {_sidecar(out_path)}")
    if report:
        write_report(cat, report, model=m)
        out.print(f"wrote {report}")
    ckpt.finish()
    _interrupted.pop("hint", None)
    distributed.finish()
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in cat.meta["timings_s"].items())
    err.print(f"timings: {timings}")


_interrupted: dict[str, str] = {}


def _launch(n: int, device: str) -> int:
    """``headlens scan ... --gpus N``: rerun this command as N torchrun processes; their exit code."""
    distributed.check_device(device)
    if device.startswith("cuda") or device == "auto":
        if torch.cuda.device_count() < n:
            raise HeadlensError(f"--gpus {n} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    else:
        err.print(f"--gpus {n} with --device {device}: {n} CPU processes (gloo); add --device cuda for GPUs")
    if "scan" not in sys.argv:
        raise HeadlensError("--gpus works from the command line (headlens scan ... --gpus N)")
    argv, skip = [], False
    for a in sys.argv[sys.argv.index("scan"):]:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            argv.append(a)
    return distributed.launch(n, argv)


def _sidecar(path: str) -> str:
    return str(sidecar_path(Path(path)))


@app.command()
def show(
    path: str = typer.Argument(..., help="a catalogue CSV written by headlens scan"),
    role: Optional[str] = typer.Option(None, help="only this role"),
    top: int = typer.Option(10, help="heads per role"),
):
    """Print the top heads of a saved catalogue."""
    cat = read_catalogue(path)
    roles = [role] if role else cat.roles
    model = cat.meta.get("model", {}).get("name", "?")
    out.print(f"{path}: model {model}, seed {cat.meta.get('seed', '?')}, {len(cat.frame)} heads")
    for r in roles:
        out.print(top_table(cat, r, top))


@app.command("detectors")
def list_detectors():
    """List the available detectors."""
    for name in REGISTRY:
        cls = detector_class(name)
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Params))
        out.print(f"[bold]{name}[/bold]{' (opt-in: -d ' + name + ')' if cls.opt_in else ''}: {cls.summary}")
        out.print(f"    paper: {cls.paper}")
        out.print(f"    params: {params}", highlight=False)

def _write_csv(frame: pd.DataFrame, path: str) -> None:
    """Write ``frame`` to ``path`` through a temporary file and a rename (no half-written CSV)."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    frame.to_csv(tmp, index=False, float_format="%.6g")
    os.replace(tmp, path)


def _steering_setup(task: str, alpha: float, n_train: int, seed: int, out_path: str, max_memory: str | None):
    """Check what can be checked before the model loads (task, split, alpha, output path, memory)."""
    from .steering import load_task

    if not 0 < alpha <= 1:
        raise HeadlensError(f"--alpha must be in (0, 1], not {alpha}")
    if max_memory is not None:
        parse_bytes(max_memory)
    load_task(task, "train", n_train, seed)
    check_writable(out_path)


@app.command("profile-steering")
def profile_steering(
    model: str = typer.Argument("smollm2-135m", help="built-in name, local HF folder, .gguf file or hub id"),
    task: str = typer.Option("json_format", "--task", help="json_format, pronouns, counterfact, biasbios, or "
                             "PATH.json[:NAME] (a file of the same format)"),
    alpha: float = typer.Option(0.01, "--alpha", help="attention kept on non-emphasised keys (PASTA: 0.01)"),
    out_path: str = typer.Option("steering_heads.csv", "--out", "-o", help="where to write the ranked heads"),
    coarse_to_fine: bool = typer.Option(False, "--coarse-to-fine", help="steer each layer's heads together "
                                        "first, then each head of the --top-layers best layers"),
    top_layers: int = typer.Option(3, "--top-layers", help="layers kept by --coarse-to-fine"),
    n_train: int = typer.Option(20, "--n-train", help="examples in the training split (the rest are held out)"),
    seed: int = typer.Option(0, help="seed of the train/test split and of the intervals"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="prompts through the chat template, if any"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="most sequences in one forward pass"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="most memory on the device, e.g. 8GB"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed run from its checkpoint <out>.ckpt"),
    top: int = typer.Option(10, help="heads in the summary table"),
):
    """Rank MODEL's heads for PASTA steering on a task (each head steered alone on the training split)."""
    from .runtime.context import use
    from .steering import profile_heads

    _steering_setup(task, alpha, n_train, seed, out_path, max_memory)
    m = load_model(model, device=device, dtype=dtype)
    _interrupted["hint"] = f"finished work is checkpointed in {checkpoint_dir(out_path)}; rerun with --resume"
    with progress.bars(), use(batch_size=batch_size, max_memory=max_memory):
        ckpt = Checkpoint.open(out_path, m, seed, resume=resume, every_s=0)
        with ckpt.detector("steering_profile"):
            frame = profile_heads(m, task, alpha, "train", coarse_to_fine=coarse_to_fine, top_layers=top_layers,
                                  n_train=n_train, seed=seed, chat=chat, batch_size=batch_size or 64)
    _write_csv(frame, out_path)
    ckpt.finish()
    _interrupted.pop("hint", None)
    table = Table(title=f"{frame.attrs['task']}: top {top} heads to steer (unsteered score "
                        f"{frame.attrs['unsteered_score']:.3g})")
    for name in ("rank", "head", "score", "gain [95% interval]"):
        table.add_column(name, justify="left" if name == "head" else "right")
    for _, r in frame.head(top).iterrows():
        table.add_row(str(r["rank"]), r["head_id"], _cell(r["score"]),
                      f"{_cell(r['gain'])} [{_cell(r['gain_lo'])}, {_cell(r['gain_hi'])}]")
    out.print(table)
    out.print(f"wrote {out_path} ({len(frame)} heads)")


@app.command("evaluate-steering")
def evaluate_steering(
    model: str = typer.Argument("smollm2-135m", help="built-in name, local HF folder, .gguf file or hub id"),
    task: str = typer.Option("json_format", "--task", help="a task name or PATH.json[:NAME]"),
    heads: Optional[str] = typer.Option(None, "--heads", help="heads to steer, e.g. L12H3,L14H0"),
    profile: Optional[str] = typer.Option(None, "--profile", help="a CSV of profile-steering: its top --k heads"),
    k: int = typer.Option(8, "--k", help="heads taken from --profile (those whose gain interval is above 0)"),
    catalogue: Optional[str] = typer.Option(None, "--catalogue", help="a catalogue CSV: --role's labelled heads"),
    role: str = typer.Option("retrieval", "--role", help="the catalogue role to steer"),
    alpha: float = typer.Option(0.01, "--alpha"),
    out_path: str = typer.Option("steering_eval.csv", "--out", "-o", help="where to write the table"),
    n_train: int = typer.Option(20, "--n-train", help="examples held back for profiling (not evaluated)"),
    n_random: int = typer.Option(5, "--n-random", help="draws of random heads"),
    seed: int = typer.Option(0),
    chat: bool = typer.Option(True, "--chat/--no-chat"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
):
    """Evaluate steering on the task's held-out split: none, the given head sets, random heads, all heads."""
    from .methods.steering import parse_heads
    from .steering import catalogue_heads, evaluate, select_heads

    _steering_setup(task, alpha, n_train, seed, out_path, None)
    sets = {}
    if heads:
        sets["heads"] = parse_heads(heads)
    if profile:
        try:
            frame = pd.read_csv(profile)
        except (OSError, pd.errors.ParserError) as exc:
            raise HeadlensError(f"cannot read the profile {profile}: {exc}") from None
        if not {"layer", "head", "rank", "gain_lo"} <= set(frame.columns):
            raise HeadlensError(f"{profile} is not a profile-steering CSV")
        sets["profiled"] = select_heads(frame, k=k)
    if catalogue:
        sets["catalogue"] = catalogue_heads(catalogue, role)
    if not any(sets.values()):
        raise HeadlensError("no heads to steer: give --heads, --profile (with a head above 0) or --catalogue")
    sets = {name: h for name, h in sets.items() if h}
    m = load_model(model, device=device, dtype=dtype)
    with progress.bars():
        table = evaluate(m, task, sets, alpha, "test", n_train=n_train, n_random=n_random, seed=seed, chat=chat,
                         batch_size=batch_size or 64)
    _write_csv(table, out_path)
    grid = Table(title=f"{table.attrs['task']}: steering on {int(table['n_examples'].iloc[0])} held-out examples")
    for name in ("condition", "heads", "score [95%]", "gain [95%]", "accuracy", "fluency [95%]"):
        grid.add_column(name, justify="left" if name == "condition" else "right")
    for _, r in table.iterrows():
        grid.add_row(r["condition"], str(r["n_heads"]), f"{_cell(r['score'])} [{_cell(r['score_lo'])}, "
                     f"{_cell(r['score_hi'])}]", f"{_cell(r['gain'])} [{_cell(r['gain_lo'])}, {_cell(r['gain_hi'])}]",
                     _cell(r["accuracy"]), f"{_cell(r['fluency'])} [{_cell(r['fluency_lo'])}, "
                     f"{_cell(r['fluency_hi'])}]")
    out.print(grid)
    out.print(f"wrote {out_path}")


def steer_heads(spec: str) -> list[tuple[int, int]]:
    """``--heads`` of ``headlens steer``: ``L12H3,L14H0`` (or ``12.3,14.0``), or ``CATALOGUE.csv:ROLE:K``,
    the top K heads of ROLE by ``<role>_score`` in a catalogue."""
    from .methods.steering import parse_heads

    if spec.count(":") < 2:
        return parse_heads(spec)
    path, role, k = spec.rsplit(":", 2)
    if not k.isdigit() or int(k) < 1:
        raise HeadlensError(f"bad --heads '{spec}': write CATALOGUE.csv:ROLE:K with K a positive number")
    return read_catalogue(path).heads(role, int(k))


@app.command("steer")
def steer_command(
    model: str = typer.Argument("smollm2-135m", help="built-in name, local HF folder, .gguf file or hub id"),
    heads: str = typer.Option(..., "--heads", help="heads to steer: L12H3,L14H0 or CATALOGUE.csv:ROLE:K "
                              "(the top K heads of ROLE by score)"),
    prompt: str = typer.Option(..., "--prompt", help="the prompt, with the text to attend to marked **like this**"),
    alpha: float = typer.Option(0.01, help="scale of the steered heads' attention to the other prompt tokens"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="tokens to generate"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="put the prompt in the chat template (when the "
                              "model has one)"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
):
    """Greedy continuations of PROMPT without and with HEADS steered to its **emphasised** text (PASTA)."""
    from .methods.steering import MARKER, Steer, steer_generate, strip_markers

    if not strip_markers(prompt)[1]:
        raise HeadlensError(f"the prompt has no emphasised span: mark the text to attend to as "
                            f"{MARKER}like this{MARKER}")
    Steer(torch.zeros(1, 1, dtype=torch.bool), alpha)          # a bad alpha fails before the model loads
    if max_new_tokens < 1:
        raise HeadlensError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    chosen = steer_heads(heads)
    if not chosen:
        raise HeadlensError(f"--heads '{heads}' names no head")
    with err.status(f"loading {model}"):
        m = load_model(model, device=device, dtype=dtype)
    names = ", ".join(f"L{l}H{h}" for l, h in chosen)
    res = steer_generate(m, prompt, chosen, alpha=alpha, max_new_tokens=max_new_tokens, chat=chat)
    out.print(f"steering {names} with alpha {alpha:g} towards: "
              + " | ".join(res.texts[0][a:b] for a, b in res.emphasis.spans[0]), highlight=False)
    out.print(f"unsteered: {res.unsteered[0]}", highlight=False, soft_wrap=True)
    out.print(f"steered: {res.steered[0]}", highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point: user mistakes print one line and exit 1; no tracebacks for them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
    except HeadlensError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print(f"interrupted; {_interrupted.get('hint', 'nothing was written')}")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # click's usage errors (typer vendors click, so match by shape, not by class)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            if not exc.format_message():  # bare `headlens`: the help was printed
                sys.exit(0)
            err.print(f"[red]error:[/red] {exc.format_message()}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code or 2)
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
