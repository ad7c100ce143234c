"""The per-head catalogue: one row per (layer, head), a score and evidence per role, and run metadata.

Columns (see docs/catalogue.md): ``layer``, ``head``, ``head_id`` (``L18H6``), then for each detector
that ran ``<role>_score``, its evidence columns ``<role>_<name>``, ``<role>_label`` (True where the head is
labelled with that role) and ``<role>_status`` (``ok`` or ``not_applicable: <reason>``), and last ``roles``
(the roles a head is labelled with, ``;``-separated). When both ``induction`` and ``previous_token`` ran,
``induction_k_partner`` and ``induction_k_partner_score`` follow the induction columns
(:func:`induction_k_partners`). Run metadata (model, headlens version, seed, parameters, causal checks,
timings) goes in a JSON sidecar ``<name>.json`` beside the CSV.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch

from ._version import __version__
from .detectors import Detector, as_detectors
from .detectors.base import CausalParams
from .errors import HeadlensError
from .methods.composition import N_SAMPLES, composition
from .models import HeadModel
from .results import DetectorResult
from .runtime import Runtime, current, distributed, use
from .runtime.checkpoint import Checkpoint
from .runtime.memory import release
from .runtime.progress import active, bars, in_notebook, note, progress, stage, step_times

__all__ = ["Catalogue", "scan", "read_catalogue", "build_catalogue", "atomic_write", "check_writable",
           "sidecar_path", "FLOAT_FORMAT", "induction_k_partners"]

FLOAT_FORMAT = "%.6g"


@dataclass
class Catalogue:
    """A scan's result: the per-head frame (one row per head, the CSV), the run metadata (the JSON
    sidecar), and each detector's typed :class:`~headlens.results.DetectorResult` by role.

    >>> cat = hl.scan(model, ["induction"])          # doctest: +SKIP
    >>> cat["induction"].top(3)                      # doctest: +SKIP
    >>> cat.heads("induction", k=3)                  # doctest: +SKIP
    [(18, 6), (17, 4), (17, 5)]
    """
    frame: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)   # role -> DetectorResult

    @property
    def roles(self) -> list[str]:
        return [r for r in self.meta.get("detectors", {})]

    def __getitem__(self, role: str):
        """The role's :class:`~headlens.results.DetectorResult` (scores, labels, status, causal check)."""
        if role not in self.results:
            raise HeadlensError(f"the catalogue has no role '{role}'; it has: {', '.join(self.roles) or 'none'}")
        return self.results[role]

    def __contains__(self, role: str) -> bool:
        return role in self.results

    def top(self, role: str, k: int = 10) -> pd.DataFrame:
        """The k highest-scoring heads for ``role``: layer, head, head_id and the role's columns."""
        col = f"{role}_score"
        if col not in self.frame:
            raise HeadlensError(f"the catalogue has no role '{role}'; it has: {', '.join(self.roles) or 'none'}")
        cols = ["layer", "head", "head_id"] + [c for c in self.frame.columns if c.startswith(f"{role}_")]
        return self.frame.sort_values(col, ascending=False, na_position="last", kind="stable")[cols].head(k)

    def heads(self, role: str, k: int | None = None, labelled: bool = False) -> list[tuple[int, int]]:
        """``(layer, head)`` pairs of the role's top ``k`` heads by score (all heads if ``k`` is None,
        NaN scores last), or only the labelled ones with ``labelled=True``."""
        if labelled:
            return list(self[role].labelled) if role in self.results else [
                (int(l), int(h)) for l, h in self.frame.loc[self.frame[f"{role}_label"], ["layer", "head"]].values]
        top = self.top(role, len(self.frame) if k is None else k)
        return [(int(l), int(h)) for l, h in zip(top["layer"], top["head"])]

    def long(self) -> pd.DataFrame:
        """Long form: one row per (layer, head, role) with score and label."""
        rows = []
        for role in self.roles:
            part = self.frame[["layer", "head", "head_id", f"{role}_score", f"{role}_label"]].copy()
            part.columns = ["layer", "head", "head_id", "score", "label"]
            part.insert(3, "role", role)
            rows.append(part)
        return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the CSV and its JSON sidecar atomically (temporary file, then rename)."""
        path = Path(path)
        text = self.frame.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
        meta = json.dumps(self.meta, indent=2, sort_keys=True, default=str) + "\n"
        atomic_write(path, text)
        atomic_write(sidecar_path(path), meta)
        return path

    def _repr_html_(self) -> str:
        model = self.meta.get("model", {}).get("name", "?")
        parts = [f"<b>headlens catalogue</b>: {model}, {len(self.frame)} heads, seed {self.meta.get('seed', '?')}"]
        for role in self.roles:
            det = self.meta["detectors"][role]
            parts.append(f"<br>{role}: {det.get('status', '?')}, labelled "
                         f"{', '.join(det.get('labelled', [])) or 'none'}")
        return "".join(parts)


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json") if path.suffix == ".csv" else path.with_name(path.name + ".json")


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before a long scan) if ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise HeadlensError(f"output path {path} is a directory; give a file name like {path}/catalogue.csv")
    if not parent.is_dir():
        raise HeadlensError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise HeadlensError(f"cannot write {path}: permission denied")
    return path


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    check_writable(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_catalogue(path: str | os.PathLike) -> Catalogue:
    """Load a catalogue CSV (and its JSON sidecar, when present)."""
    path = Path(path)
    if not path.is_file():
        raise HeadlensError(f"no catalogue at {path}")
    try:
        frame = pd.read_csv(path)
    except Exception as exc:
        raise HeadlensError(f"{path} is not a readable CSV: {exc}".splitlines()[0]) from exc
    if not {"layer", "head", "head_id"} <= set(frame.columns):
        raise HeadlensError(f"{path} is not a headlens catalogue (no layer/head/head_id columns)")
    meta = {}
    side = sidecar_path(path)
    if side.is_file():
        meta = json.loads(side.read_text())
    else:
        roles = [c[:-6] for c in frame.columns if c.endswith("_score")]
        meta = {"detectors": {r: {} for r in roles}}
    results = {role: _result_from(frame, role, meta["detectors"].get(role) or {}) for role in meta["detectors"]}
    return Catalogue(frame=frame, meta=meta, results=results)


def _result_from(frame: pd.DataFrame, role: str, det: dict) -> DetectorResult:
    """A saved role's DetectorResult, rebuilt from its CSV columns and its sidecar record."""
    prefix = f"{role}_"
    own = [c for c in frame.columns if c.startswith(prefix) and c not in (f"{role}_label", f"{role}_status")]
    part = frame[["layer", "head"] + own].copy()
    if "labelled" in det:
        labelled = [_parse_head(h) for h in det["labelled"]]
    elif f"{role}_label" in frame:
        labelled = [(int(l), int(h)) for l, h in frame.loc[frame[f"{role}_label"].astype(bool),
                                                            ["layer", "head"]].values]
    else:
        labelled = []
    return DetectorResult(role=role, frame=part, labelled=labelled, status=det.get("status", "ok"),
                          reason=det.get("reason", ""), causal=det.get("causal") or {},
                          params=det.get("params") or {}, info=det.get("info") or {})


def _parse_head(head_id: str) -> tuple[int, int]:
    layer, _, head = head_id[1:].partition("H")
    return int(layer), int(head)


def _chosen(res: DetectorResult) -> tuple[list[tuple[int, int]], str]:
    """A role's heads for the composition columns: the labelled ones, else its ``top_k`` (the causal
    check's number of candidates, :class:`~headlens.detectors.base.CausalParams`) by score, finite scores
    only; with a sentence saying which."""
    if res.labelled:
        return sorted((int(l), int(h)) for l, h in res.labelled), f"labelled {res.role} heads"
    k = int(res.params.get("top_k", CausalParams.top_k))
    scored = res.frame[res.frame[res.score_column].notna()]
    top = scored.sort_values(res.score_column, ascending=False, kind="stable").head(k)
    return sorted((int(l), int(h)) for l, h in zip(top["layer"], top["head"])), f"top {k} by {res.score_column}"


def induction_k_partners(model: HeadModel, results: dict[str, DetectorResult], seed: int,
                         n_samples: int = N_SAMPLES) -> tuple[pd.DataFrame, dict] | None:
    """Each induction head's strongest K-composition partner among the previous-token heads (Elhage et al.
    2021; Olsson et al. 2022: an induction head's key reads what a previous-token head wrote), when both
    roles ran and apply; None otherwise.

    Readers: the labelled induction heads, else the induction detector's ``top_k`` candidates by score;
    writers: the labelled previous-token heads, else the top ``top_k`` by ``previous_token_score``. Only
    those pairs are scored (:func:`headlens.methods.composition`, kind ``"k"``, baseline from ``seed``).
    Returns a frame (``layer``, ``head``, ``induction_k_partner``: the writer's id in an earlier layer
    with the highest score, ``induction_k_partner_score``: that score; one row per reader) and the sidecar
    record (which heads, the random-matrix baseline)."""
    ind, prev = results.get("induction"), results.get("previous_token")
    if ind is None or prev is None or not (ind.applies and prev.applies):
        return None
    readers, readers_from = _chosen(ind)
    writers, writers_from = _chosen(prev)
    if readers and writers:    # only pairs where the reader comes later can compose
        writers = [w for w in writers if w[0] < max(r[0] for r in readers)]
        readers = [r for r in readers if writers and r[0] > min(w[0] for w in writers)]
    record: dict[str, Any] = {"kind": "k", "readers": [f"L{l}H{h}" for l, h in readers], "readers_from": readers_from,
                              "writers": [f"L{l}H{h}" for l, h in writers], "writers_from": writers_from,
                              "baseline": None, "baseline_std": None, "n_samples": n_samples, "seed": seed,
                              "source": "Elhage et al. (2021), A mathematical framework for transformer circuits"}
    rows = {"layer": [], "head": [], "induction_k_partner": [], "induction_k_partner_score": []}
    if readers and writers:
        comp = composition(model, "k", writers=writers, readers=readers, n_samples=n_samples, seed=seed)
        record.update(baseline=comp.baseline, baseline_std=comp.baseline_std)
        best = torch.nan_to_num(comp.scores, nan=float("-inf"))
        for j, (l, h) in enumerate(comp.readers):        # a handful of readers: their best writer each
            i = int(best[:, j].argmax())                 # ties: the first writer (lower layer, then head)
            found = bool(torch.isfinite(best[i, j]))
            rows["layer"].append(l)
            rows["head"].append(h)
            rows["induction_k_partner"].append("L%dH%d" % comp.writers[i] if found else "")
            rows["induction_k_partner_score"].append(float(comp.scores[i, j]) if found else float("nan"))
    return pd.DataFrame(rows).astype({"layer": "int64", "head": "int64", "induction_k_partner": object,
                                      "induction_k_partner_score": "float64"}), record


def build_catalogue(model: HeadModel, results: Iterable, seed: int, extra_meta: dict | None = None) -> Catalogue:
    """Join detector results into one frame with labels, statuses and the ``roles`` column."""
    L, H = model.n_layers, model.n_heads
    base = pd.DataFrame({"layer": [l for l in range(L) for _ in range(H)],
                         "head": [h for _ in range(L) for h in range(H)]})
    base["head_id"] = [f"L{l}H{h}" for l, h in zip(base["layer"], base["head"])]
    results = list(results)
    roles_of: dict[tuple[int, int], list[str]] = {}
    detectors_meta = {}
    frame = base
    for res in results:
        part = res.frame.copy()
        label = pd.Series(False, index=part.index)
        for l, h in res.labelled:
            label[(part["layer"] == l) & (part["head"] == h)] = True
            roles_of.setdefault((l, h), []).append(res.role)
        part[f"{res.role}_label"] = label.values
        part[f"{res.role}_status"] = res.status if res.status == "ok" else f"{res.status}: {res.reason}"
        frame = frame.merge(part, on=["layer", "head"], how="left", validate="one_to_one")
        detectors_meta[res.role] = {"status": res.status, "reason": res.reason, "params": res.params,
                                    "labelled": [f"L{l}H{h}" for l, h in res.labelled],
                                    "causal": res.causal.to_dict() if res.causal else {}, "info": res.info}
    partners = induction_k_partners(model, {r.role: r for r in results}, seed)
    if partners is not None:      # beside the induction columns; empty/NaN on the heads that are no reader
        at = max(i for i, c in enumerate(frame.columns) if c.startswith("induction_")) + 1
        frame = frame.merge(partners[0], on=["layer", "head"], how="left", validate="one_to_one")
        frame["induction_k_partner"] = frame["induction_k_partner"].fillna("")
        cols = [c for c in frame.columns if c not in ("induction_k_partner", "induction_k_partner_score")]
        frame = frame[cols[:at] + ["induction_k_partner", "induction_k_partner_score"] + cols[at:]]
    frame["roles"] = [";".join(roles_of.get((l, h), [])) for l, h in zip(frame["layer"], frame["head"])]
    meta = {"headlens_version": __version__, "model": model.info.as_dict(), "seed": seed,
            "torch_version": torch.__version__, "detectors": detectors_meta}
    if partners is not None:
        meta["composition"] = {"induction_k_partner": partners[1]}
    meta.update(extra_meta or {})
    return Catalogue(frame=frame, meta=meta, results={r.role: r for r in results})


def scan(model: HeadModel, detectors: Iterable | str | None = None, seed: int = 0,
         checkpoint: Checkpoint | None = None, batch_size: int | None = None,
         max_memory: str | int | None = None, progress: bool | None = None, split: str = "auto") -> Catalogue:
    """Run each detector on ``model`` (seeded) and build the catalogue.

    ``detectors``: role names (``"induction"``), configured detector objects
    (``get_detector("induction", n_seqs=4)``), a mix, a comma-separated string, or None for all.
    ``checkpoint`` (a :class:`headlens.runtime.checkpoint.Checkpoint`): save each finished detector (and
    finished chunks of the running one) there, and take the detectors it already holds instead of
    running them. In a distributed run (torchrun) every rank calls this and gets the same catalogue.

    Runtime settings (they change speed and memory, never the science; the sidecar keeps them under
    ``runtime``, apart from each detector's parameters) make the scan's one
    :class:`~headlens.runtime.Runtime`: ``batch_size``, the most sequences per batched forward pass
    (default: each detector's own); ``max_memory``, the device memory budget, weights included
    (``"8GB"``; default: what is free; see :mod:`headlens.runtime.memory`); ``progress``, bars for each
    long step (default: on in a notebook, off elsewhere; False: silent); ``split``, how the ranks of a
    distributed run share the scan (``auto``, ``detectors``, ``sweeps``:
    :func:`headlens.runtime.distributed.plan`).

    >>> cat = scan(model, ["induction"], seed=0, batch_size=16, max_memory="8GB")   # doctest: +SKIP
    """
    show = in_notebook() if progress is None else progress
    outer = current()      # settings of an enclosing ``hl.runtime.use(...)`` hold where these are None
    runtime = Runtime(batch_size=outer.batch_size if batch_size is None else batch_size,
                      max_memory=outer.max_memory if max_memory is None else max_memory, bars=outer.bars)
    with contextlib.ExitStack() as stack:
        stack.enter_context(use(runtime))
        if progress is False or (show and not active()):
            stack.enter_context(bars(("tqdm" if in_notebook() else "rich") if show else None))
        settings = {**runtime.settings(), "device": str(model.device), "progress": active()}
        return _scan(model, detectors, seed, checkpoint, settings, split)


def _plan(model: HeadModel, todo: list[Detector], split: str):
    """Which ranks run each detector of ``todo`` (all of them, one process: rank 0), the estimates the plan
    used and the seconds each estimate took (work its detector's owner then skips, e.g. safety's refusal
    check). Every rank plans the same: rank 0's estimates."""
    costs, spent = [det.cost for det in todo], {}
    if distributed.active() and split != "sweeps":
        with torch.no_grad():
            for i, det in enumerate(todo):
                t0 = time.perf_counter()
                costs[i] = float(det.estimate(model))
                spent[det.name] = time.perf_counter() - t0
        costs = distributed.broadcast(costs)
    owners = distributed.plan(costs, distributed.world_size(), model.n_layers * model.n_heads, split)
    if distributed.active():
        distributed.make_groups(owners)
        note("data parallel: " + "; ".join(
            f"{', '.join(d.name for d, o in zip(todo, owners) if o == ranks)} on rank{'s' * (len(ranks) > 1)} "
            f"{ranks[0]}{f'-{ranks[-1]}' if len(ranks) > 1 else ''}" for ranks in dict.fromkeys(owners)))
    return owners, costs, spent


def _scan(model: HeadModel, detectors, seed: int, checkpoint: Checkpoint | None, runtime: dict,
          split: str = "auto") -> Catalogue:
    t_scan = time.perf_counter()
    detectors = as_detectors(detectors)
    done: dict[str, tuple] = {}          # role -> (result, seconds, steps)
    resumed = []
    for det in detectors:
        res = (checkpoint.load(det.name, det.param_dict(), DetectorResult.from_state)
               if checkpoint is not None else None)
        if res is not None:
            resumed.append(det.name)
            note(f"{det.name}: taken from the checkpoint (it ran in {res.info.get('seconds')} s)")
            done[det.name] = (res, res.info.get("seconds"), None)
    todo = [det for det in detectors if det.name not in done]
    owners, costs, spent = _plan(model, todo, split)
    mine = {}
    for det, ranks in progress([(d, o) for d, o in zip(todo, owners) if distributed.global_rank() in o],
                               "detectors"):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with distributed.group(ranks), torch.no_grad(), stage(det.name), \
                (checkpoint.detector(det.name) if checkpoint is not None else contextlib.nullcontext()):
            res = det.run(model, seed=seed)
            seconds = round(time.perf_counter() - t0 + spent.get(det.name, 0.0), 2)
            res.info.setdefault("seconds", seconds)
            note(f"{det.name}: done in {seconds:.1f} s")
            release()               # the next detector starts from the weights, not from this one's peak
            if checkpoint is not None:
                checkpoint.save(res)
            if distributed.rank() == 0:     # the first rank of the group hands the result to the others
                mine[det.name] = (res, seconds, step_times(det.name))
    done.update(distributed.exchange(mine))     # every rank gets every detector's result
    for det, ranks in zip(todo, owners):
        if distributed.global_rank() not in ranks:
            note(f"{det.name}: done in {done[det.name][1]:.1f} s (rank {ranks[0]})")
    results = [done[det.name][0] for det in detectors]
    timings = {det.name: done[det.name][1] for det in detectors}
    steps = {det.name: done[det.name][2] for det in todo}
    # Timings differ run to run, so they stay out of the CSV; the sidecar keeps them.
    extra = {"timings_s": timings, "steps_s": steps, "scan_s": round(time.perf_counter() - t_scan, 2),
             "world_size": distributed.world_size(),
             "ranks": {det.name: list(ranks) for det, ranks in zip(todo, owners)},
             "plan_costs": {det.name: round(c, 3) for det, c in zip(todo, costs)},
             "runtime": {**runtime, "world_size": distributed.world_size(), "split": split}}
    if resumed:
        extra["resumed"] = resumed
    return build_catalogue(model, results, seed, extra)
