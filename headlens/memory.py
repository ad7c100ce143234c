"""Memory planning: how many sequences go into one batched forward pass, sized in bytes.

Two separate steps, so that several processes (one per GPU) can agree on one plan:

- :func:`resolve_budget` turns ``max_memory`` (``"8GB"``, ``"512MiB"``, a number of bytes, or ``None``)
  into the bytes a run may use for its working memory. ``None``: what the device has free right now
  (``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` of ``/proc/meminfo`` on the CPU) minus a
  margin; on the CPU at most 256 MiB (a CPU is compute-bound long before that, and a scan then stays
  close to its weights in memory). An explicit ``max_memory`` is the most the model may take on the device, *weights included*,
  so the weights' bytes are subtracted from it.
- :func:`plan_rows` is a pure function of (model shape, prompt length, logit positions, budget): the
  most sequences whose forward pass fits the budget. It raises a one-line :class:`HeadlensError` when
  not even one sequence fits, saying how much one needs.

:func:`limit` sets a default ``max_memory`` for every run inside a ``with`` block (the CLI's
``--max-memory``), and :func:`batch` the most sequences per batched pass (``--batch-size``), so detectors
need no extra argument: these are runtime settings, never detector parameters (:func:`runtime_settings`
says what is in force; the catalogue's sidecar keeps them under ``runtime``).
"""
from __future__ import annotations

import contextlib
import contextvars
import re

import torch

from .errors import HeadlensError

MARGIN = 0.10            # of the free memory, kept back for the allocator and everything else
MIN_MARGIN = 256 << 20   # bytes kept back at least
CPU_DEFAULT = 256 << 20  # default working memory on the CPU: larger passes are no faster there
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_LIMIT: contextvars.ContextVar = contextvars.ContextVar("headlens_max_memory", default=None)
_BATCH: contextvars.ContextVar = contextvars.ContextVar("headlens_batch_size", default=None)


def parse_bytes(value: str | int | float) -> int:
    """``"8GB"`` -> 8e9, ``"512MiB"`` -> 2**29, ``1e9`` -> 1e9 (bytes)."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(value).upper())
    if not m or m.group(2) not in _UNITS:
        raise HeadlensError(f"bad memory size '{value}'; write e.g. 8GB, 512MB or 16GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@contextlib.contextmanager
def limit(max_memory: str | int | None):
    """Within the block, runs that get no ``max_memory`` of their own use this one."""
    token = _LIMIT.set(max_memory)
    try:
        yield
    finally:
        _LIMIT.reset(token)


@contextlib.contextmanager
def batch(batch_size: int | None):
    """Within the block, detectors run at most ``batch_size`` sequences per batched forward pass
    (None: each detector's default)."""
    if batch_size is not None and int(batch_size) < 1:
        raise HeadlensError(f"batch size must be at least 1, not {batch_size}")
    token = _BATCH.set(batch_size)
    try:
        yield
    finally:
        _BATCH.reset(token)


def batch_size(default: int) -> int:
    """The batch-size cap in force (:func:`batch`), else ``default``."""
    value = _BATCH.get()
    return default if value is None else int(value)


def runtime_settings() -> dict:
    """The runtime settings in force: ``{"batch_size": ..., "max_memory": ...}`` (None: defaults)."""
    return {"batch_size": _BATCH.get(), "max_memory": _LIMIT.get()}


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


def weight_bytes(model) -> int:
    """Bytes of the model's parameters (buffers excluded)."""
    return sum(p.numel() * p.element_size() for p in model.bridge.original_model.parameters())


def resolve_budget(max_memory: str | int | None, device, model=None, need: int = 0) -> int:
    """Working-memory bytes for a run on ``device`` (see the module docstring).

    ``need``: the bytes one sequence of the run needs; the CPU's default cap rises to it (while the
    machine has that much free), so a long prompt runs one sequence at a time instead of failing."""
    if max_memory is None:
        max_memory = _LIMIT.get()
    if max_memory is None:
        free = free_bytes(device)
        budget = max(0, free - max(MIN_MARGIN, int(MARGIN * free)))
        return budget if torch.device(device).type == "cuda" else min(budget, max(CPU_DEFAULT, need))
    total = parse_bytes(max_memory)
    weights = weight_bytes(model) if model is not None else 0
    if total <= weights:
        raise HeadlensError(f"--max-memory {fmt_bytes(total)} is less than the model's weights "
                            f"({fmt_bytes(weights)}); raise it")
    return total - weights


def _shape(model):
    info, cfg = model.info, model.bridge.cfg
    itemsize = torch.empty(0, dtype=getattr(torch, info.dtype)).element_size()
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * info.d_model
    return info, itemsize, d_mlp, cfg.d_vocab


def row_bytes(model, n_pos: int, n_logit_pos: int | None = None) -> int:
    """Peak working bytes of one sequence of ``n_pos`` tokens in a forward pass (no gradients).

    The largest of a layer's transients: eager attention's scores and pattern ``[heads, pos, pos]``
    (scores in the model's dtype, softmax in float32, the hooked pattern and an ablation's
    replacement), or the MLP's hidden activations; plus the residual stream in and out, the query,
    key and value (keys and values repeated for grouped-query attention), and the logits at
    ``n_logit_pos`` positions (default all) with a float32 working copy for the metric.
    """
    info, item, d_mlp, vocab = _shape(model)
    n_logit_pos = n_pos if n_logit_pos is None else n_logit_pos
    heads, d_head = info.n_heads, info.d_head
    attn = heads * n_pos * n_pos * (2 * item + 2 * 4)                 # scores, pattern (+fp32 softmax)
    qkv = n_pos * d_head * (heads + 2 * info.n_kv_heads + 2 * heads + 2 * heads) * item  # q,k,v,repeat,z
    mlp = 3 * n_pos * d_mlp * item
    resid = 4 * n_pos * info.d_model * item
    logits = n_logit_pos * vocab * (item + 4)
    return int(1.25 * (max(attn + qkv, mlp) + resid + logits))


def clean_run_bytes(model, batch: int, n_pos: int, keep_z: bool = True) -> int:
    """Bytes a cached clean run holds: every layer's residual input (and head outputs) and the logits."""
    info, item, _, vocab = _shape(model)
    per_layer = info.d_model + (info.n_heads * info.d_head if keep_z else 0)
    return batch * n_pos * (info.n_layers * per_layer + vocab) * item


def plan_rows(model, n_pos: int, n_logit_pos: int | None, budget_bytes: int, what: str = "a run") -> int:
    """The most sequences of ``n_pos`` tokens one batched forward pass may hold within ``budget_bytes``.

    Deterministic in its arguments. Raises a one-line :class:`HeadlensError` when one does not fit.
    """
    one = row_bytes(model, n_pos, n_logit_pos)
    if one > budget_bytes:
        raise HeadlensError(f"{what} needs {fmt_bytes(one)} of working memory for one {n_pos}-token "
                            f"sequence on {model.info.name}, but only {fmt_bytes(max(budget_bytes, 0))} "
                            "is available; free memory, raise --max-memory, or use shorter prompts")
    return int(budget_bytes // one)


def plan_items(item_bytes: int, budget_bytes: int, cap: int | None = None) -> int:
    """How many items of ``item_bytes`` each one chunk may hold within ``budget_bytes`` (at least one,
    at most ``cap``): for loops whose unit is not a sequence (a head's direct path, a needle run)."""
    n = max(1, int(budget_bytes // max(1, item_bytes)))
    return min(n, cap) if cap else n


def plan_pieces(n_items: int, item_bytes: int, device, model=None, max_memory: str | int | None = None) -> int:
    """How many of ``n_items`` (each needing ``item_bytes`` of working memory) one piece of a computation
    may take so that it fits the working-memory budget (:func:`resolve_budget`): between 1 and
    ``n_items``. Used to split weight circuits (e.g. layers of ``W_U^T W_OV``) that would otherwise be
    formed in one piece. In a distributed run every rank gets the smallest rank's plan."""
    from . import distributed

    budget = resolve_budget(max_memory, device, model, need=item_bytes)
    return distributed.agree_min(max(1, min(n_items, budget // max(1, item_bytes))))


def release() -> None:
    """Give freed host memory back to the system (between detectors): Python's garbage, and the C
    allocator's free pages (glibc keeps freed blocks below its mmap threshold in its heaps, so a long
    scan's resident memory would otherwise keep the sum of several detectors' peaks). CUDA's cache is
    emptied too. A no-op where ``malloc_trim`` does not exist."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
