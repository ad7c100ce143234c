"""The runtime: how work is carried out, never what it computes. Memory budgets, ranks sharing the work,
checkpoints for ``--resume``, progress bars, and :func:`chunked`, the one call every chunked computation
goes through. This layer imports nothing of the science (models, methods, detectors) above it.

>>> import headlens as hl
>>> with hl.runtime.use(batch_size=8, max_memory="4GB"):     # doctest: +SKIP
...     hl.sweep_heads(model, tokens, metric)
"""
from . import checkpoint, distributed, memory, progress, work
from .context import Runtime, current, use
from .work import chunked, digest, each

__all__ = ["Runtime", "current", "use", "chunked", "each", "digest", "checkpoint", "distributed", "memory", "progress",
           "work"]
