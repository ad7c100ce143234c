"""Checkpoints of a running scan, so that ``headlens scan ... --resume`` continues a killed scan.

Layout, next to the output ``<out>`` (e.g. ``cat.csv.ckpt/``)::

    manifest.json          model (name, source, shape, dtype), seed, headlens and torch versions
    <role>.pt              a finished detector's result, as plain data (torch.save, written atomically)
    <role>.chunks/         finished chunks of the detector running now (see below); removed when it ends
        call<n>.rank<r>.pt   {"format", "key": ..., "results": {chunk index: result}} of its n-th batched sweep

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

Files hold tensors and plain data only (dict, list, tuple, str, int, float, bool, None: a detector's
result goes in through its ``to_state()`` and comes out through the caller's ``from_state``) and are read
with ``torch.load(..., weights_only=True)``, so a file planted in a shared folder cannot run code. A file
that is damaged (a kill mid-copy, a full disk), foreign or holds anything else is never loaded: one line
says so and that part is recomputed (a damaged manifest: the scan starts afresh).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .._version import __version__
from ..errors import HeadlensError
from . import distributed
from .context import use
from .progress import note

FORMAT = "headlens checkpoint 1"     # in every .pt file: anything else is not ours


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


class Damaged(Exception):
    """A checkpoint file that cannot be used (damaged, foreign, or holding more than plain data)."""


def _load(path: Path) -> dict:
    """A checkpoint file's content: tensors and plain data only (``weights_only=True``), else Damaged."""
    try:
        with warnings.catch_warnings():      # the unpickler warns about files of other pickle protocols
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise Damaged(_why(exc)) from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise Damaged("not a headlens checkpoint file")
    return saved


def _why(exc: Exception) -> str:
    """A short reason for a file torch.load refused (its messages run to several lines)."""
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"GLOBAL (\S+)", str(exc))
        return f"it holds {found.group(1) if found else 'objects'}, not only tensors and plain data"
    text = str(exc).strip().split("\n")[0].split(". ")[0]
    return text[:200] or type(exc).__name__


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=repr)


class Checkpoint:
    """A scan's checkpoint folder: load finished detectors, save each as it finishes, keep chunks.

    ``on_write(event)``, if given, is called after each write: ``event`` is the detector's role after its
    file, ``chunks:<k>`` after the scan's k-th chunk-file write (tests end the process there, as a kill)."""

    def __init__(self, folder: Path, meta: dict, resume: bool, every_s: float | None = 300.0,
                 on_write: Callable[[str], Any] | None = None):
        self.folder, self.meta, self.resume, self.every_s = folder, meta, resume, every_s
        self.on_write, self.chunk_writes = on_write, 0

    @classmethod
    def open(cls, out_path: str | os.PathLike, model, seed: int, resume: bool = False,
             every_s: float | None = 300.0, on_write: Callable[[str], Any] | None = None) -> "Checkpoint":
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
        return cls(folder, meta, resume, every_s, on_write)

    def path(self, role: str) -> Path:
        return self.folder / f"{role}.pt"

    def load(self, role: str, params: dict, from_state: Callable[[dict], Any]) -> Any | None:
        """``role``'s finished result, ``from_state(state)`` of the state its ``to_state()`` saved (None if
        not finished, or if its file is damaged or foreign: then it runs again); refused if params differ.

        Rank 0 reads the file and every rank gets its answer, so all ranks skip or run it together.
        """
        answer = None
        if distributed.is_main() and self.resume and self.path(role).is_file():
            path = self.path(role)
            try:
                saved = _load(path)
                state = saved.get("state")
                if saved.get("role") != role or not isinstance(state, dict):
                    raise Damaged(f"it holds the result of {saved.get('role')!r}")
                if _canonical(state["params"]) != _canonical(params):
                    changed = sorted(k for k in set(state["params"]) | set(params)
                                     if _canonical(state["params"].get(k)) != _canonical(params.get(k)))
                    answer = (f"checkpoint {path} was made with other {role} parameters "
                              f"({', '.join(changed)}); rerun without --resume to start afresh")
                else:
                    answer = from_state(state)
            except Exception as exc:    # damaged, foreign, or a state from_state cannot read
                why = str(exc) if isinstance(exc, Damaged) else f"{type(exc).__name__}: {exc}"
                note(f"{path} is damaged or foreign, not loaded ({why}); running {role} again")
                answer = None
        answer = distributed.broadcast(answer)
        if isinstance(answer, str):
            raise HeadlensError(answer)
        return answer

    def save(self, result) -> None:
        """Write a finished detector's result (any object with ``role`` and ``to_state()``: the first rank of
        the ranks that ran it) and drop its chunk files."""
        distributed.barrier()   # every rank is done with its chunk files
        if distributed.rank() == 0:
            _save({"format": FORMAT, "role": result.role, "state": result.to_state()}, self.path(result.role))
            shutil.rmtree(self.folder / f"{result.role}.chunks", ignore_errors=True)
        distributed.barrier()
        if self.on_write is not None:
            self.on_write(result.role)

    @contextlib.contextmanager
    def detector(self, role: str):
        """Keep finished chunks of ``role``'s batched sweeps while the block runs."""
        if self.every_s is None:
            yield
            return
        store = ChunkStore(self.folder / f"{role}.chunks", self.every_s, load=self.resume,
                           wrote=self._chunks_written)
        with use(chunks=store):
            yield

    def _chunks_written(self) -> None:
        self.chunk_writes += 1
        if self.on_write is not None:
            self.on_write(f"chunks:{self.chunk_writes}")

    def finish(self) -> None:
        """The scan succeeded and its catalogue is written: remove the checkpoint folder."""
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)


def _prepare(folder: Path, meta: dict, resume: bool) -> str:
    """Check the checkpoint to resume, or start a fresh one (rank 0); return the line to print."""
    damaged = None
    if resume and (folder / "manifest.json").is_file():
        try:
            saved = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
            if not (isinstance(saved, dict) and isinstance(saved.get("model"), dict)
                    and {"seed", "headlens_version", "torch_version"} <= set(saved)):
                raise ValueError("not a headlens manifest")
        except (OSError, ValueError) as exc:      # JSONDecodeError and UnicodeDecodeError are ValueErrors
            damaged = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        else:
            _check(saved, meta, folder)
            done = sorted(p.stem for p in folder.glob("*.pt"))
            return f"resuming from {folder}: finished detectors {', '.join(done) or 'none'}"
    if damaged:
        line = f"the checkpoint {folder} is damaged (manifest.json: {damaged}); starting afresh"
    elif folder.exists():
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

    def __init__(self, folder: Path, every_s: float, load: bool, wrote: Callable[[], None] | None = None):
        self.folder, self.every_s, self.load, self.wrote = folder, every_s, load, wrote
        self.calls: list[ChunkCall] = []
        self.last = time.monotonic()

    def call(self, key: str) -> "ChunkCall":
        n = len(self.calls) + 1
        done: dict[int, Any] = {}
        if self.load:
            for path in sorted(self.folder.glob(f"call{n}.rank*.pt")):
                try:
                    saved = _load(path)
                    results = saved.get("results")
                    if not (isinstance(results, dict) and all(type(i) is int for i in results)):
                        raise Damaged("not a headlens chunk file")
                except Damaged as exc:
                    note(f"{path} is damaged or foreign, not loaded ({exc}); recomputing its chunks")
                    continue
                if saved.get("key") == key:
                    done.update(results)
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
        if not self.dirty:
            return
        self.store.folder.mkdir(parents=True, exist_ok=True)
        _save({"format": FORMAT, "key": self.key, "results": self.results},
              self.store.folder / f"call{self.n}.rank{distributed.rank()}.pt")
        self.dirty = False
        if self.store.wrote is not None:
            self.store.wrote()
