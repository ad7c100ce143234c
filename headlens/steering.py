"""Which heads to steer, and whether steering them helps: PASTA's head profiling and its evaluation.

PASTA (Zhang et al. 2023, "Tell your model where to attend") steers a few heads towards an emphasised
span (:class:`~headlens.methods.Steer`). Which heads is found by *profiling*: steer each head alone on a
small training split of a task and rank heads by the task metric (or, coarse to fine, each layer's heads
together first, then the heads of the best layers); then steer the top heads on held-out examples.

- :func:`load_task`: the written tasks of ``data/steering_tasks.json`` (``json_format``, ``pronouns``,
  ``counterfact``, ``biasbios``; or your own file), with a seeded train / test split.
- :func:`encode_task`: prompts through the chat template (when the model has one), the emphasised tokens,
  the scored answer tokens and the tokens fluency is measured on.
- :func:`task_metric`: the task score, ``log p(target) - log p(distractor)`` for the reply's first token,
  and (optionally) fluency, the loss of the prompt's non-emphasised tokens; both per example, from one
  teacher-forced forward pass, so every condition batches through :func:`~headlens.methods.run_variants`.
- :func:`profile_heads`: one row per head, its gain over no steering with a bootstrap interval, and rank.
- :func:`select_heads` (top heads of one or several profiles, intersected or pooled) and
  :func:`catalogue_heads` (a role's heads from a catalogue).
- :func:`evaluate`: the table: no steering, each head set, random heads of the same number, all heads.

Every variant (a head, a layer, a head set) runs in :func:`~headlens.methods.run_variants`: memory
planning, ``--resume`` and sharing over ranks come from the engine; nothing here loops over heads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .catalogue import Catalogue, read_catalogue
from .data import data_path
from .errors import HeadlensError
from .methods import Emphasis, Steer, emphasis, random_head_sets, run_variants
from .methods.generation import uses_chat
from .methods.metrics import summed
from .methods.steering import strip_markers
from .models import HeadModel
from .stats import bootstrap_ci

__all__ = ["TASKS", "SteeringTask", "TaskBatch", "load_task", "encode_task", "task_metric", "profile_heads",
           "select_heads", "catalogue_heads", "evaluate", "head_id"]

TASKS = ("json_format", "pronouns", "counterfact", "biasbios")
TASK_FILE = "steering_tasks.json"


def head_id(head: Sequence[int]) -> str:
    """``(12, 3)`` -> ``"L12H3"``."""
    return f"L{int(head[0])}H{int(head[1])}"


@dataclass
class SteeringTask:
    """A steering task: user prompts with ``**emphasised**`` spans and, per prompt, the answer the
    emphasis asks for (``targets``) and the one the model would give without it (``distractors``)."""
    name: str
    prompts: list[str]
    targets: list[str]
    distractors: list[str]
    description: str = ""
    split: str = "all"

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: Sequence[int], split: str) -> "SteeringTask":
        """The examples at ``index``, in that order."""
        return replace(self, prompts=[self.prompts[i] for i in index], targets=[self.targets[i] for i in index],
                       distractors=[self.distractors[i] for i in index], split=split)


def _read_tasks(path: Path) -> dict:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HeadlensError(f"cannot read steering tasks from {path}: {exc}") from None
    tasks = raw.get("tasks", raw) if isinstance(raw, dict) else None
    if not isinstance(tasks, dict) or not all(isinstance(t, dict) and "examples" in t for t in tasks.values()):
        raise HeadlensError(f"{path} is not a steering-task file: expected {{'tasks': {{NAME: {{'examples': "
                            "[{'prompt', 'target', 'distractor'}, ...]}}}}}")
    return tasks


def load_task(task: str | SteeringTask, split: str = "all", n_train: int = 20, seed: int = 0) -> SteeringTask:
    """A steering task by name (one of :data:`TASKS`, from ``data/steering_tasks.json``), or
    ``PATH:NAME`` / ``PATH`` (a file of the same format; ``PATH`` alone when it holds one task), and its
    ``split``: ``"train"`` (``n_train`` examples drawn with ``seed``, for profiling), ``"test"`` (the
    rest, held out for evaluation) or ``"all"``. The same seed always gives the same split.

    >>> train = load_task("json_format", "train")
    >>> len(train), train.split
    (20, 'train')
    """
    if isinstance(task, SteeringTask):
        full = task
    else:
        path, _, name = str(task).rpartition(":") if ":" in str(task) else ("", "", str(task))
        if not path and Path(name).suffix == ".json":
            path, name = name, ""
        tasks = _read_tasks(Path(path) if path else data_path(TASK_FILE))
        if not name:
            if len(tasks) != 1:
                raise HeadlensError(f"{path} holds {len(tasks)} tasks ({', '.join(tasks)}); name one: {path}:NAME")
            name = next(iter(tasks))
        if name not in tasks:
            raise HeadlensError(f"unknown steering task '{name}'; choose one of {', '.join(tasks)}")
        spec = tasks[name]
        try:
            ex = [(str(e["prompt"]), str(e["target"]), str(e["distractor"])) for e in spec["examples"]]
        except (KeyError, TypeError) as exc:
            raise HeadlensError(f"steering task '{name}': every example needs prompt, target and distractor "
                                f"({exc})") from None
        if not ex:
            raise HeadlensError(f"steering task '{name}' has no examples")
        full = SteeringTask(name, [p for p, _, _ in ex], [t for _, t, _ in ex], [d for _, _, d in ex],
                            str(spec.get("description", "")))
    if split == "all":
        return full
    if split not in ("train", "test"):
        raise HeadlensError(f"unknown split '{split}'; choose train, test or all")
    if not 0 < n_train < len(full):
        raise HeadlensError(f"n_train must be between 1 and {len(full) - 1} for task '{full.name}' "
                            f"({len(full)} examples), not {n_train}")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    index = sorted(order[:n_train]) if split == "train" else sorted(order[n_train:])
    return full.subset(index, split)


@dataclass
class TaskBatch:
    """A task's prompts as the model sees them (:class:`~headlens.methods.Emphasis`: tokens, attention
    mask, emphasised tokens), the scored answer tokens ``target`` / ``distractor`` ``[batch]``, and
    ``fluency`` ``[batch, pos - 1]``: True where the token at ``pos + 1`` counts for fluency (a token of
    the user's text, not emphasised, predicted from the one before it)."""
    task: SteeringTask
    emphasis: Emphasis
    target: Int[Tensor, "batch"]  # noqa: F821
    distractor: Int[Tensor, "batch"]  # noqa: F821
    fluency: Bool[Tensor, "batch pos_1"]
    chat: bool


def _answer_id(model: HeadModel, answer: str, chat: bool) -> int:
    """The first token of the reply ``answer``: at the start of the assistant's turn (chat; its first
    letter capitalised, as a reply starts) or after a space (a plain-text prompt)."""
    text = answer[:1].upper() + answer[1:] if chat else " " + answer
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise HeadlensError(f"the answer {answer!r} has no tokens")
    return int(ids[0])


def encode_task(model: HeadModel, task: SteeringTask, chat: bool = True) -> TaskBatch:
    """Tokenise ``task`` for ``model``: through its chat template when it has one and ``chat`` (see
    :func:`~headlens.methods.generation.uses_chat`), else as plain text after the start token.

    >>> batch = encode_task(model, load_task("counterfact", "train"))     # doctest: +SKIP
    >>> batch.emphasis.tokens.shape, batch.target.shape                    # doctest: +SKIP
    """
    templated = uses_chat(model, chat)
    e = emphasis(model, task.prompts, chat=templated)
    plain = [strip_markers(p)[0] for p in task.prompts]
    content = emphasis(model, plain, spans=[[(0, len(p))] for p in plain], chat=templated).mask
    fluency = (content & ~e.mask & e.attention_mask.bool())[:, 1:].cpu()
    target = torch.tensor([_answer_id(model, t, templated) for t in task.targets])
    distractor = torch.tensor([_answer_id(model, d, templated) for d in task.distractors])
    same = (target == distractor).nonzero()[:, 0].tolist()
    if same:
        i = same[0]
        raise HeadlensError(f"task '{task.name}': target {task.targets[i]!r} and distractor "
                            f"{task.distractors[i]!r} start with the same token; the score cannot tell them apart")
    return TaskBatch(task, e, target, distractor, fluency, templated)


def task_metric(batch: TaskBatch, fluency: bool = True):
    """The metric of one run, per example: ``[batch]``, the task score ``log p(target) - log p(distractor)``
    at the prompt's last position (the reply's first token), or with ``fluency`` ``[2, batch]``: the score
    and the mean next-token loss (nats) of the non-emphasised user tokens (:attr:`TaskBatch.fluency`).

    It reads only the positions it needs and is a sum over prompts (each prompt fills its own column), so
    :func:`~headlens.methods.run_variants` takes its rows a few at a time.
    """
    tokens = batch.emphasis.tokens.cpu()
    n, n_pos = tokens.shape
    target, distractor = batch.target, batch.distractor
    mask = batch.fluency if fluency else torch.zeros(n, n_pos - 1, dtype=torch.bool)
    read = sorted(set(mask.any(0).nonzero()[:, 0].tolist()) | {n_pos - 1})
    index = torch.tensor(read)
    last = len(read) - 1
    pred = index[:-1]                                        # positions read for fluency (all before the last)
    fl_targets, fl_weight = tokens[:, pred + 1], mask[:, pred].float()

    def share(logits: Float[Tensor, "rows n_read d_vocab"], prompts: Int[Tensor, "rows"]) -> Tensor:  # noqa: F821
        prompts = prompts.cpu()
        x = logits[:, last].float()
        score = (x.gather(-1, target[prompts].to(x.device)[:, None])
                 - x.gather(-1, distractor[prompts].to(x.device)[:, None]))[:, 0]
        out = torch.zeros((2, n) if fluency else (n,), device=x.device)
        if not fluency:
            out[prompts.to(x.device)] = score
            return out
        nll = torch.zeros(len(prompts), len(pred), device=x.device)
        for j in range(len(pred)):                           # one position at a time: no float copy of all
            lp = logits[:, j].float().log_softmax(-1)
            nll[:, j] = -lp.gather(-1, fl_targets[prompts, j].to(x.device)[:, None])[:, 0]
        w = fl_weight[prompts].to(x.device)
        out[0, prompts.to(x.device)] = score
        out[1, prompts.to(x.device)] = (nll * w).sum(1) / w.sum(1).clamp_min(1)
        return out
    return summed(share, read)


def _run(model: HeadModel, batch: TaskBatch, variants: list[list[tuple[int, int]]], alpha: float,
         fluency: bool, batch_size: int | None, description: str) -> Tensor:
    e = batch.emphasis
    return run_variants(model, e.tokens, variants, task_metric(batch, fluency), Steer(e.mask, alpha),
                        e.attention_mask, batch_size, description=description).float().cpu()


def _interval(per_item: Tensor, n_boot: int, seed: int, level: float) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and percentile-bootstrap interval over examples (dimension 0)."""
    lo, hi = bootstrap_ci(per_item, n_boot=n_boot, seed=seed, level=level)
    return per_item.double().mean(0).float(), lo, hi


def profile_heads(model: HeadModel, task: str | SteeringTask, alpha: float = 0.01, split: str = "train",
                  coarse_to_fine: bool = False, top_layers: int = 3, n_train: int = 20, seed: int = 0,
                  chat: bool = True, batch_size: int | None = 64, n_boot: int = 1000, level: float = 0.95,
                  heads: Sequence[tuple[int, int]] | None = None) -> pd.DataFrame:
    """Steer each head alone on ``task``'s ``split`` and rank the heads by the task score (every head, or
    only ``heads``).

    Returns one row per profiled head: ``layer``, ``head``, ``head_id``, ``score`` (the mean task score
    with the head steered) and ``gain`` (its mean paired difference from no steering) with a bootstrap
    interval over examples (``gain_lo``, ``gain_hi``), ``rank`` (1 = largest gain; ties by layer, head),
    and ``n_examples``. ``coarse_to_fine``: steer each layer's heads together first (columns
    ``layer_gain``), then each head of the ``top_layers`` layers with the largest gain alone (only those
    heads get rows). The frame's ``attrs`` keep the unsteered score and the settings.

    >>> frame = profile_heads(model, "json_format", alpha=0.01)      # doctest: +SKIP
    >>> frame.head(3)[["head_id", "gain", "gain_lo", "gain_hi"]]     # doctest: +SKIP
    """
    t = load_task(task, split, n_train, seed)
    batch = encode_task(model, t, chat)
    if heads is not None and coarse_to_fine:
        raise HeadlensError("profile_heads: give heads or coarse_to_fine, not both")
    heads = model.heads() if heads is None else sorted(set(map(tuple, heads)))
    if not heads:
        raise HeadlensError("profile_heads: no heads to profile")
    layer_gain = {}
    if coarse_to_fine:
        layers = list(range(model.n_layers))
        values = _run(model, batch, [[]] + [[h for h in heads if h[0] == l] for l in layers], alpha, False,
                      batch_size, "steering each layer")
        gains = (values[1:] - values[0]).double().mean(1)
        layer_gain = {l: float(g) for l, g in zip(layers, gains)}
        best = sorted(layers, key=lambda l: (-layer_gain[l], l))[:max(1, top_layers)]
        heads = [h for h in heads if h[0] in best]
    values = _run(model, batch, [[]] + [[h] for h in heads], alpha, False, batch_size, "steering each head")
    clean, steered = values[0], values[1:]
    gain, lo, hi = _interval((steered - clean).T, n_boot, seed, level)
    frame = pd.DataFrame({"layer": [h[0] for h in heads], "head": [h[1] for h in heads],
                          "head_id": [head_id(h) for h in heads],
                          "score": steered.double().mean(1).float().numpy(), "gain": gain.numpy(),
                          "gain_lo": lo.numpy(), "gain_hi": hi.numpy()})
    if coarse_to_fine:
        frame["layer_gain"] = frame["layer"].map(layer_gain).astype("float32")
    frame = frame.sort_values(["gain", "layer", "head"], ascending=[False, True, True], kind="stable")
    frame.insert(3, "rank", range(1, len(frame) + 1))
    frame["n_examples"] = len(t)
    frame = frame.reset_index(drop=True)
    frame.attrs.update(task=t.name, split=t.split, alpha=alpha, unsteered_score=float(clean.double().mean()),
                       coarse_to_fine=coarse_to_fine, chat=batch.chat, seed=seed, layer_gain=layer_gain,
                       n_pos=int(batch.emphasis.tokens.shape[1]))
    return frame


def select_heads(profiles: pd.DataFrame | Sequence[pd.DataFrame], k: int = 8, how: str = "union",
                 positive: bool = True) -> list[tuple[int, int]]:
    """Heads to steer from one or several :func:`profile_heads` frames: each frame's top ``k`` by rank
    (with ``positive``, only heads whose gain interval lies above 0), then ``how="union"`` (every head in
    any frame's top ``k``, ordered by its best rank) or ``"intersect"`` (heads in every frame's top ``k``,
    ordered by their summed rank).

    >>> select_heads([json_profile, pronoun_profile], k=10, how="intersect")   # doctest: +SKIP
    """
    frames = [profiles] if isinstance(profiles, pd.DataFrame) else list(profiles)
    if not frames:
        raise HeadlensError("select_heads needs at least one profile")
    if how not in ("union", "intersect"):
        raise HeadlensError(f"unknown how='{how}'; choose union or intersect")
    tops = []
    for f in frames:
        f = f.sort_values("rank")
        if positive:
            f = f[f["gain_lo"] > 0]
        tops.append({(int(l), int(h)): int(r) for l, h, r in zip(f["layer"], f["head"], f["rank"]) if r <= k})
    if how == "union":
        best: dict[tuple[int, int], int] = {}
        for top in tops:
            for h, r in top.items():
                best[h] = min(r, best.get(h, r))
        return sorted(best, key=lambda h: (best[h], h))
    common = set(tops[0]).intersection(*tops[1:])
    return sorted(common, key=lambda h: (sum(top[h] for top in tops), h))


def catalogue_heads(catalogue: str | os.PathLike | Catalogue, role: str, k: int | None = None,
                    labelled: bool = True) -> list[tuple[int, int]]:
    """A role's heads from a catalogue (a :class:`~headlens.catalogue.Catalogue` or its CSV): the
    labelled ones (``labelled``), else the top ``k`` by score.

    >>> catalogue_heads("catalogue.csv", "retrieval")      # doctest: +SKIP
    """
    cat = catalogue if isinstance(catalogue, Catalogue) else read_catalogue(catalogue)
    if role not in cat.roles:
        raise HeadlensError(f"the catalogue has no role '{role}' (it has {', '.join(cat.roles)})")
    heads = cat.heads(role, k, labelled=labelled)
    return heads[:k] if k is not None else heads


def evaluate(model: HeadModel, task: str | SteeringTask, head_sets: Mapping[str, Sequence[tuple[int, int]]],
             alpha: float = 0.01, split: str = "test", n_train: int = 20, n_random: int = 5,
             random_k: int | None = None, seed: int = 0, chat: bool = True, batch_size: int | None = 64,
             n_boot: int = 1000, level: float = 0.95) -> pd.DataFrame:
    """The evaluation table of steering on ``task``'s held-out ``split``: one row per condition, ``none``
    (no steering), each named head set of ``head_sets`` (e.g. ``{"profiled": ..., "catalogue": ...}``),
    ``random`` (``n_random`` seeded draws of ``random_k`` heads, default the size of the first head set,
    none of them in any head set; each example's values averaged over the draws) and ``all`` (every head,
    the paper's strong baseline).

    Columns: ``condition``, ``n_heads``, ``score`` (mean task score) with ``score_lo`` / ``score_hi``,
    ``gain`` (paired difference from ``none``) with ``gain_lo`` / ``gain_hi``, ``accuracy`` (fraction of
    examples whose target beats the distractor), ``fluency`` (mean loss, nats, of the non-emphasised user
    tokens; higher is worse) with ``fluency_lo`` / ``fluency_hi``, ``fluency_rise`` (paired difference from
    ``none``) with its interval, ``n_examples``, ``heads``. Intervals: percentile bootstrap over examples.

    >>> evaluate(model, "json_format", {"profiled": select_heads(profile, k=8)})   # doctest: +SKIP
    """
    t = load_task(task, split, n_train, seed)
    if any(name in ("none", "random", "all") for name in head_sets):
        raise HeadlensError("head sets may not be named none, random or all (those conditions are built in)")
    sets = {name: sorted(set(map(tuple, heads))) for name, heads in head_sets.items()}
    if random_k is None:
        random_k = len(next(iter(sets.values()))) if sets else 0
    batch = encode_task(model, t, chat)
    used = {h for heads in sets.values() for h in heads}
    draws = random_head_sets(model, random_k, n_random, seed, exclude=used) if random_k and n_random else []
    variants = [[]] + list(sets.values()) + draws + [model.heads()]
    values = _run(model, batch, variants, alpha, True, batch_size, "steering conditions")   # [v, 2, batch]
    per = {"none": values[0]}
    per.update({name: values[1 + i] for i, name in enumerate(sets)})
    if draws:
        per["random"] = values[1 + len(sets):1 + len(sets) + len(draws)].mean(0)
    per["all"] = values[-1]
    sizes = {"none": 0, **{n: len(h) for n, h in sets.items()}, "random": random_k, "all": len(model.heads())}
    heads_of = {"none": "", **{n: " ".join(map(head_id, h)) for n, h in sets.items()},
                "random": f"{len(draws)} draws of {random_k}", "all": "every head"}
    rows = []
    for name, v in per.items():
        score, s_lo, s_hi = _interval(v[0], n_boot, seed, level)
        gain, g_lo, g_hi = _interval(v[0] - per["none"][0], n_boot, seed, level)
        flu, f_lo, f_hi = _interval(v[1], n_boot, seed, level)
        rise, r_lo, r_hi = _interval(v[1] - per["none"][1], n_boot, seed, level)
        acc = (values[1 + len(sets):1 + len(sets) + len(draws), 0] > 0).float().mean().item() if name == "random" \
            else (v[0] > 0).float().mean().item()
        rows.append({"condition": name, "n_heads": sizes[name], "score": score.item(), "score_lo": s_lo.item(),
                     "score_hi": s_hi.item(), "gain": gain.item(), "gain_lo": g_lo.item(), "gain_hi": g_hi.item(),
                     "accuracy": acc, "fluency": flu.item(), "fluency_lo": f_lo.item(), "fluency_hi": f_hi.item(),
                     "fluency_rise": rise.item(), "fluency_rise_lo": r_lo.item(), "fluency_rise_hi": r_hi.item(),
                     "n_examples": len(t), "heads": heads_of[name]})
    frame = pd.DataFrame(rows)
    frame.attrs.update(task=t.name, split=t.split, alpha=alpha, chat=batch.chat, seed=seed, level=level)
    return frame
