"""Successor heads (Gould, Ong, Ogden, Conmy, ICLR 2024, "Successor Heads: Recurring, Interpretable
Attention Heads In The Wild").

A successor head's OV circuit maps a token of an ordinal sequence to its successor (1 -> 2,
Monday -> Tuesday, first -> second, A -> B). Task sets live in ``data/ordinal_tasks.json``; each item gets
leading-space and capitalised variants, and per tokenizer only the variants that are one token are kept.

Columns:

- ``successor_score``: weight-based succession score through the effective OV circuit
  ``W_U^T . W_OV . norm(W_EE)`` (``W_EE`` = embedding through block 0 with its attention ablated, normalised
  as the layer's own norm would): for each pair (token, successor) of a task variant, does the successor get
  the highest logit among that variant's tokens? Per task = fraction of successful pairs; the score is the
  mean over the tasks that have pairs (so the 200 numbers do not outweigh the 7 days).
- ``successor_<task>``: the per-task fraction (NaN where the tokenizer leaves a task no pair).
- ``successor_dla``: behavioural evidence: on in-context prompts (BOS + 3 consecutive items, e.g.
  `` Monday Tuesday Wednesday``), the head's direct logit attribution to the successor minus to the
  current token at the last position, averaged over prompts.

Label rule: ``successor_score >= threshold`` (0.5: most pairs of the average task map to the successor)
and ``successor_dla > 0`` (in context the head pushes towards the successor, not the current item).
Causal check: the top-k heads by score, mean-ablated together, vs k random heads (other than those), on
the model's next-item accuracy on the ordinal prompts, counted like the score: is the next item the
argmax among that task variant's tokens? (Full-vocabulary accuracy and log-prob are recorded too.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from einops import einsum

from ..data import data_path
from ..errors import HeadlensError
from ..methods import clean_run, run_variants
from ..methods.ablation import random_head_sets
from ..methods.circuits import effective_embedding, head_dla, normalise, ov_out
from .base import Detector, DetectorResult, causal_summary, head_frame


@dataclass
class Group:
    """One variant of one task (e.g. days, leading space, capitalised) as token ids."""
    task: str
    prefix: str
    ids: list[int | None]   # per item: the token id, or None when the variant is not one token
    cyclic: bool
    spaced: bool = False    # the leading-space variant gives these ids (word-level tokenizers: both do)

    @property
    def candidates(self) -> list[int]:
        return [i for i in self.ids if i is not None]

    def pairs(self) -> list[tuple[int, int]]:
        n = len(self.ids)
        stop = n if self.cyclic else n - 1
        return [(self.ids[i], self.ids[(i + 1) % n]) for i in range(stop)
                if self.ids[i] is not None and self.ids[(i + 1) % n] is not None]

    def windows(self, length: int) -> list[list[int]]:
        """Runs of ``length`` consecutive single-token items (wrapping round for cyclic tasks)."""
        n = len(self.ids)
        starts = range(n) if self.cyclic else range(n - length + 1)
        out = []
        for s in starts:
            w = [self.ids[(s + j) % n] for j in range(length)]
            if None not in w and len(set(w)) == length:
                out.append(w)
        return out


def single_token(tokenizer, text: str) -> int | None:
    """The id of ``text`` if the tokenizer makes exactly one (non-special) token of it that decodes back."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1 or ids[0] in set(tokenizer.all_special_ids):
        return None
    return ids[0] if tokenizer.decode(ids).strip() == text.strip() else None


def load_tasks(name: str = "ordinal_tasks.json") -> dict[str, dict]:
    try:
        return json.loads(data_path(name).read_text())["tasks"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise HeadlensError(f"{name} is not a valid ordinal task file: {exc}") from exc


def task_groups(tokenizer, tasks: dict[str, dict]) -> list[Group]:
    """Every (task, leading space?, capitalised?) variant with at least one single-token pair, deduplicated."""
    groups: dict[tuple, Group] = {}
    for task, spec in tasks.items():
        for prefix in ("", " "):
            for case in (str.lower, str.capitalize):
                ids = [single_token(tokenizer, prefix + case(item)) for item in spec["items"]]
                g = groups.setdefault((task, tuple(ids)), Group(task, prefix, ids, bool(spec.get("cyclic"))))
                g.spaced |= prefix == " "
    return [g for g in groups.values() if g.pairs()]


def succession_hits(model, groups: list[Group]) -> dict[str, torch.Tensor]:
    """Per task, ``[L, H, n_pairs]`` booleans: does the successor get the strictly highest logit among the
    group's tokens?

    All heads at once: one effective-OV product for every source token, then one small unembedding
    product per task variant.
    """
    b = model.bridge
    sources = torch.tensor([s for g in groups for s, _ in g.pairs()])
    x = normalise(model, effective_embedding(model, sources))
    out = ov_out(model, x)                                                     # [L, H, n, d]
    w_u = b.W_U.float()
    hits: dict[str, list[torch.Tensor]] = {}
    start = 0
    for g in groups:
        pairs = g.pairs()
        cand = g.candidates
        logits = einsum(out[:, :, start:start + len(pairs)], w_u[:, cand], "l h n d, d c -> l h n c")
        target = torch.tensor([cand.index(t) for _, t in pairs], device=logits.device)
        mine = logits.gather(-1, target[None, None, :, None].expand(*logits.shape[:3], 1))
        others = logits.scatter(-1, target[None, None, :, None].expand(*logits.shape[:3], 1), float("-inf"))
        hits.setdefault(g.task, []).append((mine[..., 0] > others.amax(-1)).cpu())   # strict: ties fail
        start += len(pairs)
    return {task: torch.cat(h, dim=-1) for task, h in hits.items()}


def ordinal_prompts(model, groups: list[Group], n_items: int, max_prompts: int, seed: int):
    """BOS + ``n_items`` consecutive leading-space items.

    Returns (tokens ``[b, 1 + n_items]``, next item ``[b]``, current item ``[b]``, the ids of each prompt's
    task variant ``[b, vocab]`` as a mask), or None when no variant has such a run of single tokens.
    """
    rows = [(w, g.candidates) for g in groups if g.spaced for w in g.windows(n_items + 1)]
    if not rows:
        return None
    g = torch.Generator().manual_seed(seed)
    if len(rows) > max_prompts:
        rows = [rows[i] for i in sorted(torch.randperm(len(rows), generator=g)[:max_prompts].tolist())]
    seq = torch.tensor([w for w, _ in rows])
    bos = torch.full((len(rows), 1), model.bos_token_id, dtype=torch.long)
    cands = torch.zeros(len(rows), model.bridge.cfg.d_vocab, dtype=torch.bool)
    for i, (_, c) in enumerate(rows):
        cands[i, c] = True
    return torch.cat([bos, seq[:, :-1]], 1), seq[:, -1], seq[:, -2], cands


def next_item_metric(target: torch.Tensor, candidates: torch.Tensor):
    """``[3]`` at the last position: accuracy among the prompt's task tokens (the succession score's
    own criterion), accuracy over the full vocabulary, and mean log-prob of the next item."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = torch.log_softmax(logits[:, -1].float(), -1)                    # [b, vocab]
        t = target.to(last.device)
        in_task = last.masked_fill(~candidates.to(last.device), float("-inf"))
        acc_task = (in_task.argmax(-1) == t).float().mean()
        acc = (last.argmax(-1) == t).float().mean()
        lp = last.gather(-1, t[:, None])[:, 0].mean()
        return torch.stack([acc_task, acc, lp])
    return metric


class SuccessorDetector(Detector):
    name = "successor"
    summary = "OV circuit maps an ordinal token to its successor (Monday -> Tuesday, 3 -> 4, B -> C)"
    paper = "Gould, Ong, Ogden, Conmy 2024, Successor Heads: Recurring, Interpretable Attention Heads In The Wild"

    @dataclass
    class Params:
        tasks_file: str = "ordinal_tasks.json"   # in data/
        threshold: float = 0.5       # succession score for the label
        prompt_items: int = 3        # items shown before the one to predict ("Monday Tuesday Wednesday")
        max_prompts: int = 200       # in-context prompts for the attribution (seeded sample if more)
        causal_prompts: int = 64     # of those, prompts used by the causal check
        ablation: str = "mean"       # how heads are ablated in the causal check
        top_k: int = 5               # causal check: top-k heads vs k random heads
        n_random: int = 10           # random draws for the causal check
        max_rows: int = 512          # sequences per batched forward pass

    def run(self, model, seed: int = 0) -> DetectorResult:
        p = self.params
        tasks = load_tasks(p.tasks_file)
        groups = task_groups(model.tokenizer, tasks)
        if not groups:
            return self.not_applicable(model, "the tokenizer makes no ordinal item and its successor "
                                       "single tokens, so no succession pair can be scored")
        hits = succession_hits(model, groups)
        per_task = {t: hits[t].float().mean(-1) if t in hits
                    else torch.full((model.n_layers, model.n_heads), float("nan")) for t in tasks}
        score = torch.stack([per_task[t] for t in hits]).mean(0)

        prompts = ordinal_prompts(model, groups, p.prompt_items, p.max_prompts, seed)
        nan = torch.full_like(score, float("nan"))
        dla, causal, info = nan, {}, {}
        if prompts is not None:
            dla, causal, info = self._behaviour(model, score, *prompts, seed)
        labelled = [(l, h) for l, h in model.heads() if score[l, h] >= p.threshold and dla[l, h] > 0]
        frame = head_frame(model, self.name, score, {**per_task, "dla": dla})
        reason = "" if labelled else (
            f"no head reaches succession score {p.threshold} with a positive in-context successor "
            "attribution; the top rows are the best candidates")
        info.update({"pairs_per_task": {t: int(h.shape[-1]) for t, h in hits.items()},
                     "tasks_without_pairs": [t for t in tasks if t not in hits],
                     "variants": [f"{g.task}:{'space' if g.spaced else 'nospace'}" for g in groups]})
        return DetectorResult(role=self.name, frame=frame, labelled=labelled, reason=reason,
                              causal=causal, params=self.param_dict(), info=info)

    def _behaviour(self, model, score, tokens, target, current, candidates, seed):
        """In-context successor-vs-current attribution per head, and the top-k vs random-k causal check."""
        p = self.params
        tokens = tokens.to(model.device)
        names = {f"blocks.{l}.attn.hook_z" for l in range(model.n_layers)} | {"ln_final.hook_scale"}
        logits, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
        w_u = model.bridge.W_U.float()
        direction = (w_u[:, target.to(w_u.device)] - w_u[:, current.to(w_u.device)]).T   # [b, d]
        last = torch.full((len(tokens),), tokens.shape[1] - 1)
        dla = head_dla(model, cache, torch.arange(len(tokens)), last, direction).mean(-1)

        flat = torch.nan_to_num(score, nan=-1.0).flatten()
        top = [divmod(int(i), model.n_heads) for i in flat.argsort(descending=True, stable=True)[:p.top_k]]
        draws = random_head_sets(model, p.top_k, p.n_random, seed, exclude=top)
        sub = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed + 1))
        sub = sub[:p.causal_prompts].sort().values
        metric = next_item_metric(target[sub], candidates[sub])
        run = clean_run(model, tokens[sub])
        clean = metric(run.logits)
        values = run_variants(model, run.tokens, [top] + draws, metric, p.ablation, max_rows=p.max_rows,
                              run=run, description="successor causal check")
        causal = causal_summary(top, float(values[0, 0]), values[1:, 0], float(clean[0]),
                                f"next-item accuracy among the task's tokens ({p.ablation} ablation)", draws)
        for j, name in ((1, "full_vocab_accuracy"), (2, "logprob")):
            causal.update({f"clean_{name}": float(clean[j]), f"top_k_ablated_{name}": float(values[0, j]),
                           f"random_k_ablated_{name}_mean": float(values[1:, j].mean())})
        return dla, causal, {"n_prompts": int(len(tokens)), "n_causal_prompts": int(len(sub))}
