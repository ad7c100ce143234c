"""Data parallelism with ``torch.distributed``: N processes, each with a replica of the model, share the work.

Started by ``torchrun --nproc-per-node N -m headlens scan ...`` (or ``headlens scan --gpus N``, which runs
that for you); multi-node runs use torchrun's own rendezvous (``--nnodes``, ``--rdzv-endpoint``). Every
rank runs the same code with the same seed; only the batched sweeps split their work:

- :func:`map` runs ``fn`` on this rank's share of ``items`` (round-robin: item ``i`` goes to rank
  ``i % world``) and returns every result, in order, on every rank (``all_gather_object``). The items are
  whole chunks planned identically on every rank, so each chunk is computed exactly as a one-process run
  computes it, and the gathered results (hence the catalogue) are byte-identical to one process.
- :func:`shard` / :func:`gather` are the two halves of :func:`map` for loops that want them apart.

A one-process run (``WORLD_SIZE`` unset or 1) never touches ``torch.distributed``: :func:`map` is then a
plain loop. Backends: NCCL when the model is on a GPU, gloo on the CPU. Only rank 0 prints and writes
(:func:`is_main`).
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
from typing import Any, Callable, Sequence, TypeVar

import torch

from .errors import HeadlensError

T = TypeVar("T")
R = TypeVar("R")


def _dist():
    import torch.distributed as dist
    return dist


def active() -> bool:
    """True inside an initialised multi-process group (never in a plain one-process run)."""
    if not torch.distributed.is_available():
        return False
    dist = _dist()
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (and in every one-process run): the rank that prints and writes files."""
    return rank() == 0


def launched() -> bool:
    """True when torchrun (or another launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | None) -> str | None:
    """Join the process group torchrun set up (no-op without it); return this rank's device.

    ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per rank). ``auto`` (data x model parallel) gives each
    rank an equal group of this machine's GPUs (:func:`gpu_group`, through ``CUDA_VISIBLE_DEVICES``, so it
    must run before CUDA starts) to spread its replica over. ``cuda:N`` (every rank on one GPU) is refused.
    """
    if not launched():
        return device
    check_device(device)
    dist = _dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device is not None and device.startswith("cuda")
    if device == "auto" and torch.cuda.device_count() > 0:
        # Data x model parallel: this rank sees only its group of GPUs and spreads its replica over them.
        if torch.cuda.is_initialized():
            raise RuntimeError("distributed.init must run before CUDA is initialised (for --device auto)")
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        visible = env.split(",") if env else [str(i) for i in range(torch.cuda.device_count())]
        mine = gpu_group(local, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), visible)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
        torch.cuda.set_device(0)
        if not dist.is_initialized():
            dist.init_process_group("nccl", timeout=_timeout(), device_id=torch.device("cuda:0"))
        return device
    if on_gpu:
        if local >= torch.cuda.device_count():
            raise HeadlensError(f"process {local} has no GPU: torch sees {torch.cuda.device_count()}")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        kwargs = {"device_id": torch.device(device)} if on_gpu else {}
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=_timeout(), **kwargs)
    return device


def _timeout() -> datetime.timedelta:
    """How long a rank waits for the others at a collective (HEADLENS_DIST_TIMEOUT_MIN, default 120)."""
    return datetime.timedelta(minutes=float(os.environ.get("HEADLENS_DIST_TIMEOUT_MIN", "120")))


def gpu_group(local_rank: int, local_world: int, visible: Sequence[str]) -> list[str]:
    """The GPUs (of ``visible``) that rank ``local_rank`` of ``local_world`` on this machine places its
    replica on with ``--device auto``: an equal, contiguous share."""
    per = len(visible) // local_world
    if per < 1:
        raise HeadlensError(f"{local_world} processes per machine but only {len(visible)} GPU(s): "
                            "with --device auto each process needs at least one")
    return list(visible[local_rank * per:(local_rank + 1) * per])


def check_device(device: str | None) -> None:
    """Refuse a device that does not combine with data parallelism (``cuda:N``: every rank on one GPU)."""
    if device is not None and device.startswith("cuda") and device != "cuda":
        raise HeadlensError(f"--device {device} pins every process to one GPU; with torchrun or --gpus N "
                            "use --device cuda (process i takes GPU i)")


def finish() -> None:
    """Leave the process group (end of a distributed scan)."""
    if torch.distributed.is_available() and _dist().is_initialized():
        _dist().destroy_process_group()


def barrier() -> None:
    if active():
        _dist().barrier()


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (e.g. a chunk plan sized from rank 0's free memory)."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def agree_min(value: T) -> T:
    """The smallest of every rank's ``value`` (e.g. rows per chunk planned from each GPU's free memory:
    the plan every rank can afford), on every rank."""
    if not active():
        return value
    parts: list = [None] * world_size()
    _dist().all_gather_object(parts, value)
    return min(parts)


def segments(chunks: Sequence[Sequence[T]], key: Callable[[T], Any]) -> list[list[Sequence[T]]]:
    """Consecutive ``chunks`` grouped so that no group boundary splits items of the same ``key``.

    For a chunk plan where one variant's rows may straddle two chunks: a rank computes whole groups, so
    every variant is assembled on one rank from the same chunks as in a one-process run.
    """
    groups: list[list[Sequence[T]]] = []
    for chunk in chunks:
        if groups and groups[-1][-1] and chunk and key(groups[-1][-1][-1]) == key(chunk[0]):
            groups[-1].append(chunk)
        else:
            groups.append([chunk])
    return groups


def _to_cpu(obj):
    """Tensors moved to the CPU (so pickles from one GPU never land on another rank's GPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def shard(n: int) -> range:
    """The indices of ``n`` items this rank computes: ``rank, rank + world, ...`` (all of them on one rank)."""
    return range(rank(), n, world_size())


def gather(local: dict[int, Any], n: int, key: str = "") -> list:
    """Every rank's ``{index: result}`` merged into the list of all ``n`` results, on every rank.

    ``key`` (a digest of the work plan) must be the same on every rank; a mismatch means the ranks
    planned different chunks, and the merged results would be wrong, so it raises instead.
    """
    if not active():
        return [local[i] for i in range(n)]
    parts: list = [None] * world_size()
    _dist().all_gather_object(parts, (key, n, _to_cpu(local)))
    if any((k, m) != (key, n) for k, m, _ in parts):
        raise RuntimeError("the ranks planned different work (chunk plans differ); every rank must use "
                           "the same plan, e.g. rank 0's broadcast with headlens.distributed.broadcast")
    merged: dict[int, Any] = {}
    for _, _, res in parts:
        merged.update(res)
    return [merged[i] for i in range(n)]


def map(fn: Callable[[T], R], items: Sequence[T], description: str = "", key: str = "",
        resumable: bool = False) -> list[R]:
    """``[fn(item) for item in items]``, each rank computing its share; all results on every rank.

    ``description`` names the progress bar (chunks done/total, ETA; rank 0 only). With ``resumable``
    and a chunk checkpoint active (:func:`headlens.checkpoint.chunk_call`), finished items are saved
    as the scan goes and skipped when a killed scan is resumed; ``key`` identifies the call's work
    (same key, same items) so stale results are never reused.
    """
    from .checkpoint import chunk_call
    from .progress import progress

    call = chunk_call(key) if resumable else None
    mine = shard(len(items))
    local: dict[int, R] = {}
    for i in progress(mine, description, total=len(mine)):
        if call is not None and i in call.done:
            local[i] = call.done[i]
            continue
        local[i] = fn(items[i])
        if call is not None:
            call.add(i, local[i])
    return gather(local, len(items), key)


def launch(n: int, argv: Sequence[str]) -> int:
    """Run ``headlens`` with ``argv`` as ``n`` processes on this machine (torchrun) and return its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "headlens", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    return subprocess.run(cmd, env=env).returncode
