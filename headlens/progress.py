"""Progress reporting: silent by default, rich progress bars when the CLI turns them on."""
from __future__ import annotations

import contextlib
from typing import Iterable, TypeVar

T = TypeVar("T")
_active = None  # a rich.progress.Progress while the CLI shows bars


@contextlib.contextmanager
def bars():
    """Show a rich progress bar for every long step run inside this block."""
    global _active
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as p:
        _active = p
        try:
            yield p
        finally:
            _active = None


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """Iterate over ``items``, advancing a progress bar when one is active."""
    if _active is None:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    task = _active.add_task(description, total=total)
    try:
        for item in items:
            yield item
            _active.advance(task)
    finally:
        _active.remove_task(task)


def note(message: str) -> None:
    """Print one line above the bars (and in logs, where bars are not drawn) while bars are shown."""
    if _active is not None:
        _active.console.print(message, highlight=False)
