"""Data parallelism with ``torch.distributed``: N processes, each with a replica of the model, share the work.

Started by ``torchrun --nproc-per-node N -m headlens scan ...`` (or ``headlens scan --gpus N``, which runs
that for you); multi-node runs use torchrun's own rendezvous (``--nnodes``, ``--rdzv-endpoint``). Work is
shared at two levels, both computing every piece exactly as one process does:

- **Detectors.** :func:`plan` gives each detector of a scan a group of ranks (a contiguous range): with
  few ranks each runs whole detectors (nothing a detector does is then repeated on another rank: its
  clean runs, caches and weight products included); with more ranks, or a model whose sweeps dwarf the
  rest (70B), a group of several ranks shares a detector. :func:`group` makes the collectives below work
  within one group; :func:`exchange` gives every rank every detector's result at the end.
- **Sweeps.** Within a group, every rank runs the detector's code with the same seed and the batched
  sweeps split their work:

  :func:`shard` gives this rank its share of ``n`` items (round-robin: item ``i`` goes to rank
  ``i % world``) and :func:`gather` returns every result, in order, on every rank (``all_gather_object``).
  :func:`headlens.runtime.work.chunked` uses both: the items are whole chunks planned identically on
  every rank, so each chunk is computed exactly as a one-process run computes it, and the gathered
  results (hence the catalogue) are byte-identical to one process.

The ranks sharing the work now are the runtime's (:attr:`headlens.runtime.Runtime.ranks`). A
one-process run (``WORLD_SIZE`` unset or 1) never touches ``torch.distributed``. Backends: NCCL when the
model is on a GPU, gloo on the CPU. Only rank 0 prints and writes
(:func:`is_main`).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
from typing import Any, Callable, Sequence, TypeVar

import torch

from ..errors import HeadlensError
from .context import current, use

T = TypeVar("T")
# The process group of each group of ranks (global numbers) made by make_groups.
_PROCESS_GROUPS: dict[tuple[int, ...], Any] = {}


def _dist():
    import torch.distributed as dist
    return dist


def _world() -> bool:
    """True inside an initialised process group of several ranks."""
    return torch.distributed.is_available() and _dist().is_initialized() and _dist().get_world_size() > 1


def global_rank() -> int:
    """This process's number among all ranks (0 in a one-process run)."""
    return _dist().get_rank() if _world() else 0


def active() -> bool:
    """True when several ranks share the work now (never in a plain one-process run, nor inside a group
    of one rank)."""
    ranks = current().ranks
    return _world() if ranks is None else len(ranks) > 1


def rank() -> int:
    """This process's number among the ranks sharing the work now (the group's, inside :func:`group`)."""
    ranks = current().ranks
    return global_rank() if ranks is None else ranks.index(global_rank())


def world_size() -> int:
    """How many ranks share the work now (the group's size inside :func:`group`)."""
    ranks = current().ranks
    if ranks is None:
        return _dist().get_world_size() if _world() else 1
    return len(ranks)


def is_main() -> bool:
    """True on global rank 0 (and in every one-process run): the rank that prints and writes files."""
    return global_rank() == 0


def _pg():
    """The process group of the ranks sharing the work now (None: the default, every rank)."""
    ranks = current().ranks
    return None if ranks is None else _PROCESS_GROUPS[ranks]


def _src() -> int:
    """The global number of the first rank sharing the work now."""
    ranks = current().ranks
    return 0 if ranks is None else ranks[0]


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
        _dist().barrier(group=_pg())


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (e.g. a chunk plan sized from rank 0's free memory)."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=_src(), group=_pg())
    return box[0]


def agree_min(value: T) -> T:
    """The smallest of every rank's ``value`` (e.g. rows per chunk planned from each GPU's free memory:
    the plan every rank can afford), on every rank."""
    if not active():
        return value
    parts: list = [None] * world_size()
    _dist().all_gather_object(parts, value, group=_pg())
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
    _dist().all_gather_object(parts, (key, n, _to_cpu(local)), group=_pg())
    if any((k, m) != (key, n) for k, m, _ in parts):
        raise RuntimeError("the ranks planned different work (chunk plans differ); every rank must use "
                           "the same plan, as headlens.runtime.work.chunked plans them")
    merged: dict[int, Any] = {}
    for _, _, res in parts:
        merged.update(res)
    return [merged[i] for i in range(n)]


# Work a detector repeats on every rank of its group (clean runs, caches, weight products, prompt building,
# its refusal decoding), in head-sweep equivalents: the share of an 8B scan the sweeps did not share,
# measured in docs/scale.md, as a number of heads' sweeps.
LOCAL_HEADS = 170
SPLITS = ("auto", "detectors", "sweeps")


def _seconds(cost: float, ranks: int, local: float) -> float:
    """Estimated time of work ``cost`` on ``ranks`` ranks when a share ``local`` of it is repeated by each."""
    return cost * ((1 - local) / ranks + local)


def plan(costs: Sequence[float], world: int, n_heads: int, split: str = "auto") -> list[tuple[int, ...]]:
    """The ranks (global numbers, a contiguous range) that run each of the detectors with these relative
    ``costs``, on ``world`` ranks, for a model of ``n_heads`` heads.

    ``"sweeps"``: every detector on all ranks (they share its sweeps). ``"detectors"``: the detectors
    spread over ``min(world, len(costs))`` groups (longest first, each to the least loaded group), the
    ranks left over going one at a time to the group estimated slowest. ``"auto"``: of those two and
    every group count in between, the plan with the shortest estimated time, where each detector repeats
    the work of ``LOCAL_HEADS`` heads on every rank of its group (small models: detectors apart; 70B:
    sweeps shared). Any plan gives the same catalogue bytes; it only changes the time.

    >>> plan([1.0, 0.6, 0.55, 0.5, 0.15], world=2, n_heads=1024)   # Llama-3.1-8B, five roles
    [(0,), (1,), (1,), (0,), (1,)]
    >>> plan([1.0, 0.6], world=2, n_heads=1024, split="sweeps")
    [(0, 1), (0, 1)]
    """
    if split not in SPLITS:
        raise HeadlensError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    if not costs:
        return []
    local = min(1.0, LOCAL_HEADS / max(1, n_heads))
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    counts = {"sweeps": [1], "detectors": [min(world, len(costs))]}.get(split, range(1, min(world, len(costs)) + 1))
    best = None
    for k in counts:
        bins: list[list[int]] = [[] for _ in range(k)]
        load = [0.0] * k
        for i in order:                      # longest detector first, to the least loaded group
            b = min(range(k), key=lambda j: (load[j], j))
            bins[b].append(i)
            load[b] += costs[i]
        ranks = [1] * k
        for _ in range(world - k):          # the ranks left over, one at a time to the slowest group
            b = max(range(k), key=lambda j: (_seconds(load[j], ranks[j], local), -j))
            ranks[b] += 1
        span = max(_seconds(load[j], ranks[j], local) for j in range(k))
        if best is None or span < best[0] - 1e-9:
            best = (span, bins, ranks)
    _, bins, ranks = best
    owners: list[tuple[int, ...]] = [()] * len(costs)
    first = 0
    for members, n in zip(bins, ranks):
        for i in members:
            owners[i] = tuple(range(first, first + n))
        first += n
    return owners


def make_groups(owners: Sequence[tuple[int, ...]]) -> None:
    """Create the process group of every group of several ranks in ``owners`` (every rank must call this
    with the same ``owners``: creating a group is a collective of all ranks)."""
    for ranks in sorted(set(owners)):
        if len(ranks) > 1 and ranks not in _PROCESS_GROUPS:
            _PROCESS_GROUPS[ranks] = (_dist().new_group(list(ranks)) if len(ranks) < _dist().get_world_size()
                                      else _dist().group.WORLD)


@contextlib.contextmanager
def group(ranks: Sequence[int]):
    """Inside the block, the ranks ``ranks`` (global numbers; this rank among them) share the work:
    :func:`rank`, :func:`world_size`, the chunked work and the collectives are theirs (one rank: plain loops)."""
    ranks = tuple(ranks)
    if global_rank() not in ranks:
        raise RuntimeError(f"rank {global_rank()} is not in the group {ranks}")
    with use(ranks=ranks):
        yield


_EXCHANGES = [0]


def _wait_for_everyone() -> None:
    """Block until every rank has reached this point, without a deadline: ranks that ran different
    detectors may finish hours apart, longer than a collective's timeout (HEADLENS_DIST_TIMEOUT_MIN).
    Through torchrun's key-value store: each rank counts itself in, the last one sets a key that the
    others wait for (woken at once, a day at a time)."""
    from torch.distributed import distributed_c10d

    _EXCHANGES[0] += 1
    try:
        store = distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return                                    # no store: the collective's own timeout applies
    key = f"headlens/exchange/{_EXCHANGES[0]}"
    if store.add(key, 1) == _dist().get_world_size():
        store.set(f"{key}/all", "1")
    while True:
        try:
            store.wait([f"{key}/all"], datetime.timedelta(days=1))
            return
        except _dist().DistStoreError:
            continue


def exchange(mine: dict[str, Any]) -> dict[str, Any]:
    """Every rank's ``{name: result}`` (e.g. the detectors it ran) merged, on every rank; ranks that
    finish early wait for the others without a deadline."""
    if not _world():
        return dict(mine)
    _wait_for_everyone()
    parts: list = [None] * _dist().get_world_size()
    _dist().all_gather_object(parts, _to_cpu(mine))
    merged: dict[str, Any] = {}
    for part in parts:
        for name, value in part.items():
            merged.setdefault(name, value)
    return merged


def launch(n: int, argv: Sequence[str]) -> int:
    """Run ``headlens`` with ``argv`` as ``n`` processes on this machine (torchrun) and return its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "headlens", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    return subprocess.run(cmd, env=env).returncode
