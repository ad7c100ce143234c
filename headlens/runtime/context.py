"""The one runtime object: how a run is carried out, never what it computes.

A :class:`Runtime` holds every setting that changes speed and memory but not results: the batch-size
cap, the memory budget, the ranks sharing the work now, the running detector's chunk store (for
``--resume``) and the progress display. :func:`headlens.scan` (and through it the CLI) makes one and
enters it with :func:`use` in one place; everything below reads it with :func:`current`. The names are
the CLI's: ``--batch-size`` is ``batch_size`` here and in every method, ``--max-memory`` is
``max_memory``.

>>> from headlens.runtime import Runtime, current, use
>>> with use(Runtime(batch_size=8)):
...     current().batch_size
8
>>> current().batch_size is None
True
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import HeadlensError
from .memory import parse_bytes


@dataclass(frozen=True)
class Runtime:
    """How work runs (see the module docstring). Every field's default means "the library's default".

    ``batch_size``: the most sequences in one batched forward pass (None: each caller's default).
    ``max_memory``: the most memory the model may take on its device, weights included (``"8GB"``, bytes;
    None: what is free). ``ranks``: the global numbers of the ranks sharing the work now (None: every
    rank of the run; one process: rank 0 alone). ``chunks``: the running detector's chunk store
    (:class:`headlens.runtime.checkpoint.ChunkStore`), or None when nothing is checkpointed. ``bars``:
    the progress display (a rich ``Progress`` or a tqdm stand-in), or None: silent. ``stage``: the name
    steps are filed under (the running detector). ``steps``: ``{stage: {step: {"seconds", "chunks"}}}``,
    the time each step took (filled as steps run).
    """
    batch_size: int | None = None
    max_memory: str | int | None = None
    ranks: tuple[int, ...] | None = None
    chunks: Any = None
    bars: Any = None
    stage: str = ""
    steps: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise HeadlensError(f"batch size must be at least 1, not {self.batch_size}")
        if self.max_memory is not None:
            parse_bytes(self.max_memory)          # a bad size fails here, before any work

    def replace(self, **changes) -> "Runtime":
        """A copy with ``changes`` (the record of step times is shared)."""
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict:
        """The settings a catalogue's sidecar keeps under ``runtime``."""
        return {"batch_size": self.batch_size, "max_memory": self.max_memory}


_DEFAULT = Runtime()    # frozen; its record of step times is the only state it shares
_CURRENT: contextvars.ContextVar[Runtime] = contextvars.ContextVar("headlens_runtime", default=_DEFAULT)  # noqa: B039


def current() -> Runtime:
    """The runtime in force (the defaults outside any :func:`use` block)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(runtime: Runtime | None = None, **changes) -> Iterator[Runtime]:
    """Within the block, :func:`current` is ``runtime`` (default: the current one) with ``changes``."""
    rt = (runtime or current()).replace(**changes) if changes else (runtime or current())
    token = _CURRENT.set(rt)
    try:
        yield rt
    finally:
        _CURRENT.reset(token)
