"""Checkpoints of a running scan, so that ``headlens scan ... --resume`` continues a killed scan.

Layout, next to the output ``<out>`` (e.g. ``cat.csv.ckpt/``)::

    manifest.json          model (name, source, shape, dtype), seed, headlens and torch versions
    <role>.pt              a finished detector's DetectorResult (torch.save, written atomically)
    <role>.chunks/         finished chunks of the detector running now (see below); removed when it ends
        call<n>.rank<r>.pt   {"key": ..., "results": {chunk index: result}} of its n-th batched sweep

A resumed scan loads each finished detector instead of running it and, inside the detector that was
running, reuses the saved chunks of each batched sweep (:func:`headlens.runtime.work.chunked` with
``resumable=True``; :func:`headlens.methods.run_variants` uses it). A sweep's ``key`` digests its work
plan (variants, tokens, ablation, chunking), so a chunk is reused only for the very same work, and the
catalogue comes out byte-identical to an uninterrupted run. The manifest and each detector's parameters
must match the resumed run; otherwise it is refused with one ``error:`` line. Runtime settings (batch size,
memory budget) are not detector parameters, so they do not refuse a resume: a different chunk plan only
means the running sweep's saved chunks do not match its key and are recomputed. The first rank of the
ranks that ran a detector writes its file (rank 0 reads them when resuming); every rank writes its own
chunk files (on several nodes, files reach the next run only where the output folder is shared; the rest
are recomputed). On success the folder is removed.

Test hook: ``HEADLENS_TEST_DIE_AFTER=<role>`` ends the process (``os._exit(75)``) right after ``<role>``'s
checkpoint is written, and ``HEADLENS_TEST_DIE_AFTER=chunks:<k>`` after the k-th chunk-file write: a
deterministic stand-in for a kill, used by tests/test_resume.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .._version import __version__
from ..errors import HeadlensError
from . import distributed
from .context import use
from .progress import note

_chunk_writes = 0                    # chunk-file writes so far (for the test hook)


def checkpoint_dir(out_path: str | os.PathLike) -> Path:
    out = Path(out_path)
    return out.with_name(out.name + ".ckpt")


def manifest(model, seed: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it (``model``: anything with a
    ``fingerprint()``, e.g. a :class:`headlens.HeadModel`)."""
    return {"model": model.fingerprint(), "seed": seed, "headlens_version": __version__,
            "torch_version": torch.__version__}


def _save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename (never a half-written file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)  # our own files only


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=repr)


def _die_if(event: str) -> None:
    """The test hook: exit hard (no cleanup, like a kill) when HEADLENS_TEST_DIE_AFTER names ``event``."""
    if os.environ.get("HEADLENS_TEST_DIE_AFTER") == event:
        os._exit(75)


class Checkpoint:
    """A scan's checkpoint folder: load finished detectors, save each as it finishes, keep chunks."""

    def __init__(self, folder: Path, meta: dict, resume: bool, every_s: float | None = 300.0):
        self.folder, self.meta, self.resume, self.every_s = folder, meta, resume, every_s

    @classmethod
    def open(cls, out_path: str | os.PathLike, model, seed: int, resume: bool = False,
             every_s: float | None = 300.0) -> "Checkpoint":
        """The checkpoint beside ``out_path``: checked against this run (``resume``) or started afresh.

        ``every_s``: save finished chunks of a running detector at most every this many seconds
        (0: after every chunk; None: only whole detectors are checkpointed).
        """
        folder = checkpoint_dir(out_path)
        meta = manifest(model, seed)
        answer = None
        if distributed.is_main():  # rank 0 decides; every rank follows (they may not share a disk)
            try:
                answer = _prepare(folder, meta, resume)
            except HeadlensError as exc:
                answer = exc
        answer = distributed.broadcast(answer)
        if isinstance(answer, HeadlensError):
            raise HeadlensError(str(answer))
        note(answer)
        return cls(folder, meta, resume, every_s)

    def path(self, role: str) -> Path:
        return self.folder / f"{role}.pt"

    def load(self, role: str, params: dict, build: Callable[..., Any]) -> Any | None:
        """The checkpointed result of ``role`` (None if not finished), made by ``build(**saved)``;
        refused if params differ.

        Rank 0 reads the file and every rank gets its answer, so all ranks skip or run it together.
        """
        answer = None
        if distributed.is_main() and self.resume and self.path(role).is_file():
            path = self.path(role)
            saved = _load(path)
            if _canonical(saved["params"]) != _canonical(params):
                changed = sorted(k for k in set(saved["params"]) | set(params)
                                 if _canonical(saved["params"].get(k)) != _canonical(params.get(k)))
                answer = (f"checkpoint {path} was made with other {role} parameters "
                          f"({', '.join(changed)}); rerun without --resume to start afresh")
            else:
                answer = saved
        answer = distributed.broadcast(answer)
        if isinstance(answer, str):
            raise HeadlensError(answer)
        return None if answer is None else build(**answer)

    def save(self, result) -> None:
        """Write a finished detector's result (the first rank of the ranks that ran it) and drop its chunk
        files."""
        distributed.barrier()   # every rank is done with its chunk files
        if distributed.rank() == 0:
            fields = ("role", "frame", "labelled", "status", "reason", "causal", "params", "info")
            _save({f: getattr(result, f) for f in fields}, self.path(result.role))
            shutil.rmtree(self.folder / f"{result.role}.chunks", ignore_errors=True)
        distributed.barrier()

    @contextlib.contextmanager
    def detector(self, role: str):
        """Keep finished chunks of ``role``'s batched sweeps while the block runs."""
        if self.every_s is None:
            yield
            return
        with use(chunks=ChunkStore(self.folder / f"{role}.chunks", self.every_s, load=self.resume)):
            yield

    def finish(self) -> None:
        """The scan succeeded and its catalogue is written: remove the checkpoint folder."""
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)


def _prepare(folder: Path, meta: dict, resume: bool) -> str:
    """Check the checkpoint to resume, or start a fresh one (rank 0); return the line to print."""
    if resume and (folder / "manifest.json").is_file():
        _check(json.loads((folder / "manifest.json").read_text()), meta, folder)
        done = sorted(p.stem for p in folder.glob("*.pt"))
        return f"resuming from {folder}: finished detectors {', '.join(done) or 'none'}"
    if folder.exists():
        line = f"ignoring the old checkpoint {folder} (pass --resume to continue it); starting afresh"
    elif resume:
        line = f"no checkpoint in {folder}; starting from the beginning"
    else:
        line = f"checkpoints go to {folder} (removed when the scan succeeds)"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tmp = folder / ".manifest.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / "manifest.json")
    return line


def _check(saved: dict, meta: dict, folder: Path) -> None:
    for key in ("seed", "headlens_version", "torch_version"):
        if saved.get(key) != meta[key]:
            raise HeadlensError(f"checkpoint {folder} was made with {key.replace('_', ' ')} {saved.get(key)}, "
                                f"not {meta[key]}; rerun without --resume to start afresh")
    old, new = saved.get("model", {}), meta["model"]
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        k = diff[0]
        raise HeadlensError(f"checkpoint {folder} is for another model ({k} {old.get(k)!r}, not "
                            f"{new.get(k)!r}); rerun without --resume to start afresh")


class ChunkStore:
    """One detector's finished chunks, saved every ``every_s`` seconds; its n-th call is ``call<n>``."""

    def __init__(self, folder: Path, every_s: float, load: bool):
        self.folder, self.every_s, self.load = folder, every_s, load
        self.calls: list[ChunkCall] = []
        self.last = time.monotonic()

    def call(self, key: str) -> "ChunkCall":
        n = len(self.calls) + 1
        done: dict[int, Any] = {}
        if self.load:
            for path in sorted(self.folder.glob(f"call{n}.rank*.pt")):
                saved = _load(path)
                if saved["key"] == key:
                    done.update(saved["results"])
        if done:
            note(f"reusing {len(done)} finished chunks from {self.folder}")
        call = ChunkCall(self, n, key, done)
        self.calls.append(call)
        return call

    def tick(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            for call in self.calls:
                call.flush()
            self.last = time.monotonic()


class ChunkCall:
    """The saved and new results of one resumable :func:`headlens.runtime.work.chunked` call."""

    def __init__(self, store: ChunkStore, n: int, key: str, done: dict[int, Any]):
        self.store, self.n, self.key, self.done = store, n, key, done
        self.results = dict(done)
        self.dirty = False

    def add(self, i: int, result: Any) -> None:
        self.results[i] = distributed._to_cpu(result)
        self.dirty = True
        self.store.tick()

    def flush(self) -> None:
        global _chunk_writes
        if not self.dirty:
            return
        self.store.folder.mkdir(parents=True, exist_ok=True)
        _save({"key": self.key, "results": self.results},
              self.store.folder / f"call{self.n}.rank{distributed.rank()}.pt")
        self.dirty = False
        _chunk_writes += 1
        _die_if(f"chunks:{_chunk_writes}")


def die_after(role: str) -> None:
    """The test hook after a detector's checkpoint (see the module docstring)."""
    _die_if(role)
