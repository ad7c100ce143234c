"""Progress reporting: silent by default; while bars are shown (the CLI; ``hl.scan(..., progress=True)``,
the default in a notebook), every long step (a detector, a batched
sweep's chunks) gets a bar with done/total, elapsed time and an ETA. In a log (stderr not a terminal,
where no bar is drawn) the same figures are printed as one line at most every ``HEADLENS_PROGRESS_EVERY``
seconds (default 30) per step. Steps run inside :func:`stage` are prefixed with the detector's name and
their time is recorded (:func:`step_times`), so the JSON sidecar says where a scan's time went. In a
distributed run only rank 0 turns bars on, so only rank 0 prints. Bars are rich's in a terminal and
tqdm's in a notebook (widgets when ipywidgets is installed, text otherwise). The display, the stage
and the step times are the runtime's (:class:`headlens.runtime.Runtime`).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterable, Iterator, TypeVar

from .context import current, use

__all__ = ["in_notebook", "active", "bars", "stage", "step_times", "progress", "note"]

T = TypeVar("T")


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return type(get_ipython()).__name__ == "ZMQInteractiveShell"


def active() -> bool:
    """Whether bars are shown now."""
    return current().bars is not None


class _Tqdm:
    """The part of rich's ``Progress`` that :func:`progress` uses, drawn by tqdm (for notebooks)."""
    is_terminal = True   # bars are drawn, so no periodic log lines

    def __init__(self):
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm
        except ImportError:
            from tqdm.std import tqdm
        self.tqdm, self.console = tqdm, self

    def add_task(self, description: str, total: int | None = None):
        return self.tqdm(total=total, desc=description, leave=False)

    def advance(self, task) -> None:
        task.update(1)

    def remove_task(self, task) -> None:
        task.close()

    def print(self, message: str, **_options) -> None:   # rich's styling options mean nothing here
        self.tqdm.write(message)


@contextlib.contextmanager
def bars(kind: str | None = "rich"):
    """Show a progress bar for every long step run inside this block: ``"rich"`` (a terminal),
    ``"tqdm"`` (a notebook), or None (none: silent, even inside another ``bars`` block)."""
    if kind != "rich":
        with use(bars=_Tqdm() if kind == "tqdm" else None) as rt:
            yield rt.bars
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as p, use(bars=p):
        yield p


@contextlib.contextmanager
def stage(name: str):
    """Name the steps run inside the block after ``name`` (a detector) and record their times."""
    with use(stage=name) as rt:
        rt.steps.setdefault(name, {})
        yield


def step_times(name: str) -> dict[str, dict[str, float]]:
    """``{step: {"seconds": s, "chunks": n}}`` of the steps run inside ``stage(name)`` so far."""
    return {k: dict(v) for k, v in current().steps.get(name, {}).items()}


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items``, advancing a progress bar when one is active (and timing the step)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    rt = current()
    name = rt.stage
    label = f"{name}: {description}" if name and description != "detectors" else description
    record = rt.steps.get(name, {}).setdefault(description, {"seconds": 0.0, "chunks": 0}) if name else None
    p = rt.bars
    task = p.add_task(label, total=total) if p is not None else None
    to_log = p is not None and not p.console.is_terminal
    every = float(os.environ.get("HEADLENS_PROGRESS_EVERY", "30"))
    t0 = last = time.perf_counter()
    done = 0
    try:
        for item in items:
            yield item
            done += 1
            if p is not None:
                p.advance(task)
            now = time.perf_counter()
            if to_log and now - last >= every:
                last = now
                eta = f", ETA {_clock((now - t0) / done * (total - done))}" if total else ""
                note(f"{label}: {done}/{total if total is not None else '?'} done, "
                     f"{_clock(now - t0)} elapsed{eta}")
    finally:
        if record is not None:
            record["seconds"] = round(record["seconds"] + time.perf_counter() - t0, 3)
            record["chunks"] += done
        if p is not None:
            p.remove_task(task)


def note(message: str) -> None:
    """Print one line above the bars (and in logs, where bars are not drawn) while bars are shown: never
    wrapped by rich (a terminal folds a long one itself) nor read as markup."""
    p = current().bars
    if p is not None and message:
        p.console.print(message, highlight=False, markup=False, soft_wrap=True)
