"""Memory budgets in bytes: what a run may use for its working memory, and how to give memory back.

- :func:`resolve_budget` turns ``max_memory`` (``"8GB"``, ``"512MiB"``, a number of bytes, or ``None``)
  into the bytes a run may use for its working memory. ``None``: what the device has free right now
  (``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` of ``/proc/meminfo`` on the CPU) minus a
  margin; on the CPU at most ``CPU_DEFAULT`` (a CPU is compute-bound long before that, and a scan then
  stays close to its weights in memory). An explicit ``max_memory`` is the most the model may take on
  the device, *weights included*, so the weights' bytes are subtracted from it.
- :func:`release` gives freed memory back between detectors.

How many items of a computation fit a budget is planned by :func:`headlens.runtime.work.chunked`; what
one item (a sequence in a forward pass) costs is the methods' business
(:func:`headlens.methods.forward.row_bytes`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re

import torch

from ..errors import HeadlensError

__all__ = ["parse_bytes", "fmt_bytes", "free_bytes", "resolve_budget", "release"]

MARGIN = 0.10            # of the free memory, kept back for the allocator and everything else
MIN_MARGIN = 256 << 20   # bytes kept back at least
CPU_DEFAULT = 256 << 20  # default working memory on the CPU: larger passes are no faster there
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: str | int | float) -> int:
    """``"8GB"`` -> 8e9, ``"512MiB"`` -> 2**29, ``1e9`` -> 1e9 (bytes).

    >>> parse_bytes("512MiB")
    536870912
    """
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(value).upper())
    if not m or m.group(2) not in _UNITS:
        raise HeadlensError(f"bad memory size '{value}'; write e.g. 8GB, 512MB or 16GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def free_bytes(device: torch.device | str) -> int:
    """Memory free on ``device`` now: the GPU's free memory, or the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil
    return int(psutil.virtual_memory().available)


def resolve_budget(max_memory: str | int | None, device, weights: int = 0, need: int = 0) -> int:
    """Working-memory bytes for a run on ``device`` (see the module docstring).

    ``weights``: the bytes of the model's weights (subtracted from an explicit ``max_memory``).
    ``need``: the bytes one item of the run needs; the CPU's default cap rises to it (while the
    machine has that much free), so a long prompt runs one sequence at a time instead of failing."""
    if max_memory is None:
        free = free_bytes(device)
        budget = max(0, free - max(MIN_MARGIN, int(MARGIN * free)))
        return budget if torch.device(device).type == "cuda" else min(budget, max(CPU_DEFAULT, need))
    total = parse_bytes(max_memory)
    if total <= weights:
        raise HeadlensError(f"--max-memory {fmt_bytes(total)} is less than the model's weights "
                            f"({fmt_bytes(weights)}); raise it")
    return total - weights


def release() -> None:
    """Give freed host memory back to the system (between detectors): Python's garbage, and the C
    allocator's free pages (glibc keeps freed blocks below its mmap threshold in its heaps, so a long
    scan's resident memory would otherwise keep the sum of several detectors' peaks). CUDA's cache is
    emptied too. A no-op where ``malloc_trim`` does not exist."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim()


_LIBC: list = []


def trim() -> None:
    """Give the C allocator's free pages back to the system, without collecting garbage: cheap enough
    (about a millisecond) to run after every chunk of a batched computation. glibc serves the mid-sized
    tensors of a forward pass (a few MB) from its heaps, and their reuse by differently sized chunks
    fragments them: without this, a long batched run's resident memory climbs to the heap's high-water
    mark instead of staying near the memory actually in use. A no-op where ``malloc_trim`` does not exist."""
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)
