"""The one call every chunked computation goes through: :func:`chunked`.

It plans how many items one chunk may hold from their bytes and the runtime's memory budget, makes
every rank of the group agree on that plan, cuts the items into chunks, keys the work for resume,
shares the chunks over the ranks, saves finished chunks in a checkpointed scan, shows a progress bar,
and returns every chunk's result, in order, on every rank. A method or detector that calls it gets
memory planning, ``--resume`` and multi-GPU sharing, and the results are byte-identical whatever the
number of ranks (each chunk is computed exactly as one process computes it).

>>> import torch
>>> from headlens.runtime.work import chunked
>>> chunked(lambda chunk: torch.tensor(chunk).sum(), list(range(10)), per_chunk=4)
[tensor(6), tensor(22), tensor(17)]
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence, TypeVar

import torch

from ..errors import HeadlensError
from . import distributed
from .context import current
from .memory import fmt_bytes, resolve_budget, trim
from .progress import progress

__all__ = ["chunked", "each", "plan", "budget", "agreed_budget", "digest"]

T = TypeVar("T")
R = TypeVar("R")


def digest(*parts: Any) -> str:
    """A short hex digest of ``parts`` (tensors by their bytes, everything else by its repr)."""
    h = hashlib.sha1()
    for p in parts:
        if p is None:
            h.update(b"None")
        elif isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            h.update(repr((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def budget(device, weights: int = 0, need: int = 0, reserve: int = 0) -> int:
    """The working-memory bytes a computation on ``device`` may use under the runtime's ``max_memory``
    (:func:`headlens.runtime.memory.resolve_budget`; ``weights``: the model's weight bytes, counted
    against an explicit ``max_memory``; ``need``: one item's bytes). ``reserve``: bytes the computation
    already holds (e.g. a cached clean run), taken off an explicit ``max_memory`` (what is free already
    excludes them)."""
    max_memory = current().max_memory
    total = resolve_budget(max_memory, device, weights, need)
    return total - reserve if max_memory is not None else total


def agreed_budget(device, weights: int = 0, need: int = 0) -> int:
    """:func:`budget`, the smallest over the ranks of the group: for plans of several steps that every
    rank must make alike (e.g. batches of needle runs packed by their bytes)."""
    return distributed.agree_min(budget(device, weights, need))


def plan(item_bytes: int, *, device=None, weights: int = 0, reserve: int = 0, cap: int | None = None,
         n_items: int | None = None, strict: str | None = None, unit: str = "item",
         room: int | None = None) -> int:
    """How many items of ``item_bytes`` one chunk may hold within :func:`budget` (or ``room`` bytes), the
    same on every rank of the group (the smallest rank's plan): at least 1, at most ``cap`` and ``n_items``
    (None: no cap).

    ``strict``: what the work is (``"single-head ablations"``); when not even one item fits, raise a
    one-line :class:`HeadlensError` saying so, naming the item as ``unit`` (``"41-token sequence on
    SmolLM2"``); without it one item per chunk is planned."""
    if room is None:
        room = budget(device, weights, item_bytes, reserve)
    n = int(room // max(1, item_bytes))
    if n < 1 and strict:
        raise HeadlensError(f"{strict} needs {fmt_bytes(item_bytes)} of working memory for one {unit}, but "
                            f"only {fmt_bytes(max(room, 0))} is available; free memory, raise --max-memory, "
                            "or use shorter prompts")
    n = max(1, n)
    for limit in (cap, n_items):
        if limit is not None:
            n = min(n, max(1, int(limit)))
    return distributed.agree_min(n)


def chunked(fn: Callable[[Any], R], items: Sequence[T], *, per_chunk: int | None = None,
            item_bytes: int | None = None, device=None, weights: int = 0, reserve: int = 0,
            cap: int | None = None, strict: str | None = None, unit: str = "item", align: int = 1,
            together: Callable[[T], Any] | None = None, description: str = "", key: Sequence[Any] = (),
            resumable: bool = False, stats: dict | None = None) -> list[R]:
    """``fn`` over consecutive chunks of ``items``; every chunk's result, in order, on every rank.

    Chunk size: ``per_chunk`` when given (then agreed over the ranks), else :func:`plan` from
    ``item_bytes`` on ``device`` (``weights``, ``reserve``, ``cap``, ``strict``, ``unit`` as there). ``align``: when a
    chunk holds at least ``align`` items, a multiple of ``align`` (e.g. whole variants of ``align``
    prompts each).

    ``together``: a key of an item; consecutive chunks whose boundary splits items of one key are given
    to ``fn`` together, as a list of chunks, and ``fn`` returns one result for the list (so one rank
    assembles each key's items from the same chunks as one process). Without it ``fn`` gets one chunk.

    ``description`` names the progress bar. ``resumable``: in a checkpointed scan, finished chunks are
    saved and reused on ``--resume``; ``key`` (with ``description``, the items' plan) identifies the work,
    so a stale result is never reused. ``stats``, if given, receives ``per_chunk`` and ``chunks``.
    """
    if per_chunk is None:
        if item_bytes is None:
            raise ValueError("chunked needs per_chunk or item_bytes")
        per_chunk = plan(item_bytes, device=device, weights=weights, reserve=reserve, cap=cap,
                         strict=strict, unit=unit)
    else:
        per_chunk = distributed.agree_min(max(1, int(per_chunk)))
    if align > 1 and per_chunk >= align:
        per_chunk -= per_chunk % align
    chunks = [items[i:i + per_chunk] for i in range(0, len(items), per_chunk)]
    units: Sequence = distributed.segments(chunks, together) if together is not None else chunks
    if stats is not None:
        stats.update(per_chunk=per_chunk, chunks=len(chunks))
    work = digest(description, len(items), per_chunk, *key)
    store = current().chunks
    call = store.call(work) if resumable and store is not None else None
    mine = distributed.shard(len(units))
    local: dict[int, Any] = {}
    for i in progress(mine, description, total=len(mine)):
        if call is not None and i in call.done:
            local[i] = call.done[i]
            continue
        local[i] = fn(units[i])
        trim()                        # the chunk's freed buffers go back to the system (memory.trim)
        if call is not None:
            call.add(i, local[i])
    return distributed.gather(local, len(units), work)


def each(fn: Callable[[T], R], items: Sequence[T], description: str = "", key: Sequence[Any] = (),
         resumable: bool = False) -> list[R]:
    """``[fn(item) for item in items]`` through :func:`chunked`, one item per chunk: shared over the ranks
    (e.g. one layer's weight circuit each), every result on every rank (``resumable``, ``key``: as there).

    >>> each(lambda x: x * x, [1, 2, 3])
    [1, 4, 9]
    """
    return chunked(lambda chunk: fn(chunk[0]), items, per_chunk=1, description=description, key=key,
                   resumable=resumable)
