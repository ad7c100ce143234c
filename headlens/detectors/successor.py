"""Successor heads (Gould, Ong, Ogden, Conmy, ICLR 2024, "Successor Heads: Recurring, Interpretable
Attention Heads In The Wild").

A successor head's OV circuit maps a token of an ordinal sequence to its successor (1 -> 2,
Monday -> Tuesday, first -> second, A -> B). Task sets live in ``data/ordinal_tasks.json``; each item gets
leading-space and capitalised variants, and per tokenizer only the variants that are one token are kept.

Columns:

- ``successor_score``: weight-based succession score through the effective OV circuit
  ``W_U^T . W_OV . norm(x)``: for each pair (token, successor) of a task variant, does the successor get
  the highest logit among that variant's tokens? ``x`` is ``W_E + MLP0(W_E)`` (block 0 with its attention
  ablated; parameter ``embedding="w_e_mlp0"``) or the reference's ``MLP0(W_E)`` (``embedding="mlp0"``).
  Per task = fraction of successful pairs; the score is the mean over the tasks that have pairs
  (``averaging="task"``, so the 100 letter pairs do not outweigh the 14 day pairs) or the fraction over
  all pairs (``averaging="pooled"``).
- ``successor_null_mean``, ``successor_z``, ``successor_p``: the same head's score with the successors
  shuffled within each task variant (``n_null`` seeded draws): its mean, the raw score's z-score against
  it, and the empirical p-value (1 + #draws >= score) / (1 + n_null). ``successor_q``: the
  Benjamini-Hochberg q-value over all heads of the normal tail of ``successor_z`` (the empirical p-value
  cannot go below 1 / (n_null + 1), too coarse for a correction over hundreds of heads).
- ``successor_stability``: the share of bootstrap resamples (pairs within each task) in which the head's
  score passes the threshold.
- ``successor_<task>``: the per-task fraction (NaN where the tokenizer leaves a task no pair).
- ``successor_dla``: behavioural evidence: on in-context prompts (start token + 3 consecutive items, e.g.
  `` Monday Tuesday Wednesday``), the head's direct logit attribution to the successor minus to the
  current token at the last position, averaged over prompts.

Discovery and confirmation: the in-context prompts are split (seeded): ``confirm_prompts`` are held out
for the confirmation check, the rest give ``successor_dla`` and the per-head effects.

Label rule: the claimed heads have ``successor_score >= threshold`` (0.5: most pairs of the average task
map to the successor), ``successor_q <= alpha`` (0.01: above the shuffled null, corrected over all heads)
and ``successor_dla > 0`` (in context the head pushes towards the successor, not the current item); they
are labelled only if their confirmation check is significant: the claimed heads (at most ``max_k``)
mean-ablated together lower the model's next-item accuracy on the held-out prompts, counted like the
score (is the next item the argmax among that task variant's tokens?), more than ``n_random`` draws of as
many random heads from the same layers, at ``p <= alpha``. The effect's floor is chance among the task's
tokens. (Full-vocabulary accuracy and log-prob are recorded too.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from einops import einsum

from ..data import data_path
from ..errors import HeadlensError
from ..methods import FINAL_SCALE, clean_run, logits_at, sweep_heads, z_name
from ..methods.circuits import effective_embedding, head_dla, normalise, ov_out
from ..methods.metrics import PositionMetric, positioned
from ..results import DetectorResult, head_frame
from ..runtime import chunked
from ..stats import bh_qvalues, bootstrap_means
from .base import Detector, ReviewParams, effect_heads, top_heads


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
        return [(self.ids[i], self.ids[(i + 1) % len(self.ids)]) for i in self.pair_items()]

    def pair_items(self) -> list[int]:
        """Per pair of :meth:`pairs`, the index of its source item in the task's list: the task word the pair
        starts from, the same in every spelling variant (" Monday", "Monday", "monday" -> 0 in days)."""
        n = len(self.ids)
        stop = n if self.cyclic else n - 1
        return [i for i in range(stop) if self.ids[i] is not None and self.ids[(i + 1) % n] is not None]

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


def source_embedding(model, ids: torch.Tensor, embedding: str = "w_e_mlp0") -> torch.Tensor:
    """``[n, d_model]`` normalised residual the OV circuit reads for each token.

    ``w_e_mlp0``: ``W_E + MLP0(W_E)``, the residual after block 0 with its attention ablated (``W_EE``, as
    copy suppression uses). ``mlp0``: ``MLP0(W_E)`` alone, the reference implementation's choice
    (the embedding itself subtracted from that residual).
    """
    if embedding not in ("w_e_mlp0", "mlp0"):
        raise HeadlensError(f"successor embedding must be 'w_e_mlp0' or 'mlp0', not '{embedding}'")
    x = effective_embedding(model, ids)
    if embedding == "mlp0":
        x = x - model.bridge.W_E.float()[ids.to(model.bridge.W_E.device)].to(x.device)
    return normalise(model, x)


def succession_logits(model, groups: list[Group], embedding: str = "w_e_mlp0"):
    """Per group: (``[L, H, n_pairs, n_candidates]`` OV logits of each source over the group's tokens,
    ``[n_pairs]`` index of each successor among the candidates). All heads of a piece of the layers at
    once: one effective-OV product for every source token, then one small unembedding product per task
    variant. The pieces are as many layers as fit the working-memory budget
    (:func:`headlens.runtime.chunked`; ``[layers, H, n_sources, d_model]`` in float32 is tens of GiB at
    70B), all layers in one piece when they fit."""
    b = model.bridge
    sources = torch.tensor([s for g in groups for s, _ in g.pairs()])
    x = source_embedding(model, sources, embedding)                            # [n, d]
    w_u = b.W_U.float()
    H, (n, d), dh = model.n_heads, x.shape, model.info.d_head
    # per layer: W_V (repeated per query head) and W_O in float32 and the model's dtype, v, and the OV image
    itemsize = b.W_U.element_size()
    per_layer = H * (2 * d * dh * (4 + itemsize) + 4 * n * (dh + d))

    def piece(layers: range) -> list[torch.Tensor]:   # per group: [len(layers), H, n_pairs, n_candidates]
        out = ov_out(model, x, layers)                 # [l, H, n, d]
        logits, start = [], 0
        for g in groups:
            pairs, cand = g.pairs(), g.candidates
            logits.append(einsum(out[:, :, start:start + len(pairs)], w_u[:, cand],
                                 "l h n d, d c -> l h n c").cpu())
            start += len(pairs)
        return logits
    pieces = chunked(piece, range(model.n_layers), item_bytes=per_layer, device=x.device,
                     weights=model.weight_bytes(), description="successor OV logits",
                     key=(embedding, sources))
    parts = [[p[k] for p in pieces] for k in range(len(groups))]
    return [(torch.cat(parts[k]) if len(parts[k]) > 1 else parts[k][0],
             torch.tensor([g.candidates.index(t) for _, t in g.pairs()])) for k, g in enumerate(groups)]


def hits_for(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[L, H, n]``: does ``target[i]`` get the strictly highest logit of row i? (ties fail)"""
    idx = target[None, None, :, None].expand(*logits.shape[:3], 1)
    mine = logits.gather(-1, idx)[..., 0]
    return mine > logits.scatter(-1, idx, float("-inf")).amax(-1)


def succession_hits(model, groups: list[Group], embedding: str = "w_e_mlp0") -> dict[str, torch.Tensor]:
    """Per task, ``[L, H, n_pairs]`` booleans: does the successor get the strictly highest logit among the
    group's tokens?"""
    hits: dict[str, list[torch.Tensor]] = {}
    for g, (logits, target) in zip(groups, succession_logits(model, groups, embedding)):
        hits.setdefault(g.task, []).append(hits_for(logits, target))
    return {task: torch.cat(h, dim=-1) for task, h in hits.items()}


def aggregate(hits: dict[str, torch.Tensor], averaging: str) -> torch.Tensor:
    """``[L, H]`` succession score: mean of per-task fractions (``task``) or over all pairs (``pooled``)."""
    if averaging == "task":
        return torch.stack([h.float().mean(-1) for h in hits.values()]).mean(0)
    if averaging == "pooled":
        return torch.cat(list(hits.values()), -1).float().mean(-1)
    raise HeadlensError(f"successor averaging must be 'task' or 'pooled', not '{averaging}'")


def null_scores(groups: list[Group], logits, n_draws: int, averaging: str, seed: int) -> torch.Tensor:
    """``[n_draws, L, H]`` succession scores with the successors shuffled within each task variant.

    Each draw relabels every group's tokens by a random permutation and asks whether the *relabelled*
    successor wins: a head scores as well only if its OV map prefers that arbitrary mapping as much as
    the real order, so this is the chance level of the same head with the same logits.
    """
    g = torch.Generator().manual_seed(seed + 7)
    hits: dict[str, list[torch.Tensor]] = {}
    for grp, (lg, target) in zip(groups, logits):
        top2 = lg.topk(min(2, lg.shape[-1]), dim=-1)
        winner = top2.indices[..., 0]                                          # [L, H, n]
        unique = (top2.values[..., 0] > top2.values[..., 1] if lg.shape[-1] > 1
                  else torch.ones_like(winner, dtype=torch.bool))
        perms = torch.stack([torch.randperm(lg.shape[-1], generator=g) for _ in range(n_draws)])
        shuffled = perms[:, target]                                            # [D, n]
        hits.setdefault(grp.task, []).append((winner[None] == shuffled[:, None, None, :]) & unique[None])
    hits = {t: torch.cat(h, -1) for t, h in hits.items()}                      # [D, L, H, n]
    return torch.stack([aggregate({t: h[d] for t, h in hits.items()}, averaging) for d in range(n_draws)])


def ordinal_prompts(model, groups: list[Group], n_items: int, max_prompts: int, seed: int):
    """Start token (``model.start_token_id``, the document start) + ``n_items`` consecutive leading-space items.

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
    bos = torch.full((len(rows), 1), model.start_token_id, dtype=torch.long)
    cands = torch.zeros(len(rows), model.bridge.cfg.d_vocab, dtype=torch.bool)
    for i, (_, c) in enumerate(rows):
        cands[i, c] = True
    return torch.cat([bos, seq[:, :-1]], 1), seq[:, -1], seq[:, -2], cands


def next_item_metric(target: torch.Tensor, candidates: torch.Tensor, per_prompt: bool = False) -> PositionMetric:
    """``[3]`` at the last position (the only one it reads): accuracy among the prompt's task tokens (the
    succession score's own criterion), accuracy over the full vocabulary, and mean log-prob of the next
    item; ``[batch, 3]``, one row per prompt, with ``per_prompt``."""
    def metric(logits: torch.Tensor) -> torch.Tensor:   # [batch, 1, vocab]
        last = torch.log_softmax(logits[:, -1].float(), -1)                    # [b, vocab]
        t = target.to(last.device)
        in_task = last.masked_fill(~candidates.to(last.device), float("-inf"))
        rows = torch.stack([(in_task.argmax(-1) == t).float(), (last.argmax(-1) == t).float(),
                            last.gather(-1, t[:, None])[:, 0]], -1)           # [b, 3]
        return rows if per_prompt else rows.mean(0)
    return positioned(metric, [-1])


class SuccessorDetector(Detector):
    name = "successor"
    cost = 0.7   # share of a scan (relative; headlens.runtime.distributed.plan)
    summary = "OV circuit maps an ordinal token to its successor (Monday -> Tuesday, 3 -> 4, B -> C)"
    paper = "Gould, Ong, Ogden, Conmy 2024, Successor Heads: Recurring, Interpretable Attention Heads In The Wild"
    key_columns = ("q", "dla")   # the label's other two conditions: above the null, and pushes the successor

    default_batch_size = 512   # runtime: sequences per batched forward pass (short prompts)

    @dataclass
    class Params(ReviewParams):
        tasks_file: str = "ordinal_tasks.json"   # in data/
        threshold: float = 0.5       # succession score for the label
        prompt_items: int = 3        # items shown before the one to predict ("Monday Tuesday Wednesday")
        max_prompts: int = 200       # in-context prompts (seeded sample if more)
        confirm_prompts: int = 32    # of those, held out for the confirmation check (the rest: discovery)
        causal_prompts: int = 64     # discovery prompts for the per-head ablation sweep (total/direct effects)
        effect_heads: int = 20       # top heads by score and by |total effect| given direct effects (0 = all)
        embedding: str = "w_e_mlp0"  # OV input: W_E + MLP0(W_E) (w_e_mlp0) or MLP0(W_E) alone (mlp0, the reference's)
        averaging: str = "task"      # score = mean of per-task fractions (task) or over all pairs (pooled)
        n_null: int = 200            # draws of the shuffled-successor null per head
        alpha: float = 0.01          # label: q-value against the null and the confirmation p at most this

    def run(self, model, seed: int = 0) -> DetectorResult:
        p = self.params
        tasks = load_tasks(p.tasks_file)
        groups = task_groups(model.tokenizer, tasks)
        if not groups:
            return self.not_applicable(model, "the tokenizer makes no ordinal item and its successor "
                                       "single tokens, so no succession pair can be scored")
        logits = succession_logits(model, groups, p.embedding)
        hits: dict[str, list[torch.Tensor]] = {}
        words: dict[str, list[int]] = {}   # per task, per pair (in the order of hits): its source word's index
        for g, (lg, target) in zip(groups, logits):
            hits.setdefault(g.task, []).append(hits_for(lg, target))
            words.setdefault(g.task, []).extend(g.pair_items())
        hits = {t: torch.cat(h, -1) for t, h in hits.items()}
        per_task = {t: hits[t].float().mean(-1) if t in hits
                    else torch.full((model.n_layers, model.n_heads), float("nan")) for t in tasks}
        score = aggregate(hits, p.averaging)
        ci = self._interval(hits, words, seed)
        null = null_scores(groups, logits, p.n_null, p.averaging, seed)          # [n_null, L, H]
        null_mean, null_std = null.mean(0), null.std(0)
        z = (score - null_mean) / null_std.clamp_min(1e-6)
        p_value = (1 + (null >= score[None]).sum(0)) / (1 + p.n_null)

        # q-values over all heads need p-values finer than the empirical null's 1 / (n_null + 1) (with 270
        # heads the smallest empirical q would be 270 / 201): the normal tail of z against the null
        q_value = bh_qvalues(0.5 * torch.erfc(z.double() / 2 ** 0.5)).float()
        prompts = ordinal_prompts(model, groups, p.prompt_items, p.max_prompts, seed)
        nan = torch.full_like(score, float("nan"))
        dla, causal, info, labelled, claimed = nan, {}, {}, [], []
        effects = {"total": nan, "direct": nan, "compensation": nan, "self_repair": nan}
        reason = ""
        if prompts is not None:
            split = self._split(*prompts, seed)
            dla, effects, info = self._discovery(model, score, split["discovery"])
            claimed = [(l, h) for l, h in top_heads(score, score.numel()) if score[l, h] >= p.threshold
                       and dla[l, h] > 0 and q_value[l, h] <= p.alpha]
            causal = self._confirm(model, claimed, score, split["confirmation"], seed)
            labelled, reason = self.decide(claimed, causal)
            info.update({"n_discovery_prompts": int(len(split["discovery"][0])),
                         "n_confirmation_prompts": int(len(split["confirmation"][0])),
                         "claimed": [f"L{l}H{h}" for l, h in claimed]})
        if not claimed:
            reason = (f"no head reaches succession score {p.threshold} with a positive in-context successor "
                      f"attribution and q <= {p.alpha} against the shuffled-successor null; the top rows are "
                      "the best candidates")
        stability = self._stability(hits, seed)
        frame = head_frame(model, self.name, score, {
            **ci, "stability": stability, "null_mean": null_mean, "z": z, "p": p_value, "q": q_value,
            **per_task, "dla": dla, **effects})
        info.update({"start_token": model.info.start_token,
                     "null_score_median": float(null_mean.median()),
                     "null_best_of_heads_mean": float(null.flatten(1).amax(1).mean()),
                     "pairs_per_task": {t: int(h.shape[-1]) for t, h in hits.items()},
                     "interval_unit": "task word (all its spellings)" + (
                         ", within its task" if p.averaging == "task" else ""),
                     "interval_units": {t: len(set(w)) for t, w in words.items()},
                     "tasks_without_pairs": [t for t in tasks if t not in hits],
                     "variants": [f"{g.task}:{'space' if g.spaced else 'nospace'}" for g in groups]})
        return DetectorResult(role=self.name, frame=frame, labelled=labelled, reason=reason,
                              causal=causal, params=self.param_dict(), info=info)

    def _split(self, tokens, target, current, candidates, seed) -> dict[str, tuple]:
        """The in-context prompts split, seeded, into confirmation (``confirm_prompts``, at most half of
        them) and discovery (the rest): heads are chosen on the discovery prompts, tested on the others."""
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed + 1))
        n = min(self.params.confirm_prompts, len(tokens) // 2)
        parts = (tokens, target, current, candidates)
        return {"confirmation": tuple(x[order[:n].sort().values] for x in parts),
                "discovery": tuple(x[order[n:].sort().values] for x in parts)}

    def _discovery(self, model, score, prompts):
        """On the discovery prompts: each head's in-context successor-vs-current attribution, and its total
        and direct effect on the next item's log-prob (``causal_prompts`` of them)."""
        p = self.params
        tokens, target, current, candidates = prompts
        tokens = tokens.to(model.device)
        names = {z_name(l) for l in range(model.n_layers)} | {FINAL_SCALE}
        with logits_at(model, torch.tensor([tokens.shape[1] - 1])):  # the logits are not read: unembed one position
            _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
        w_u = model.bridge.W_U.float()
        direction = (w_u[:, target.to(w_u.device)] - w_u[:, current.to(w_u.device)]).T   # [b, d]
        last = torch.full((len(tokens),), tokens.shape[1] - 1)
        dla = head_dla(model, cache, torch.arange(len(tokens)), last, direction).mean(-1)
        del cache
        n = min(p.causal_prompts, len(tokens))
        metric = next_item_metric(target[:n], candidates[:n])
        run = clean_run(model, tokens[:n], positions=metric.positions)    # the last position's logits
        # Direct vs total effect per head on the next item's log-prob (accuracy is too coarse for one head).
        logprob = positioned(lambda logits: metric.on_positions(logits)[2], metric.positions)
        clean_lp = float(run.value(metric)[2])
        total = clean_lp - sweep_heads(model, run.tokens, logprob, p.ablation, batch_size=self.batch_size, run=run)
        heads = effect_heads(score, total, p.effect_heads)
        effects = {"total": total, **self.direct_and_self_repair(model, run, logprob, total, "lower", clean_lp,
                                                                     heads=heads)}
        return dla, effects, {"n_prompts": int(len(tokens)), "n_effect_prompts": int(n)}

    def _confirm(self, model, claimed, score, prompts, seed):
        """The confirmation check on the held-out prompts: next-item accuracy among the task's tokens per
        prompt (full-vocabulary accuracy and log-prob recorded too); floor: chance among the candidates."""
        p = self.params
        tokens, target, _, candidates = prompts
        metric = next_item_metric(target, candidates, per_prompt=True)
        run = clean_run(model, tokens.to(model.device), positions=metric.positions)
        chance = float((1 / candidates.sum(-1).float()).mean())
        check = self.confirm(model, claimed, score, seed, "next-item accuracy among the task's tokens on "
                             f"held-out prompts ({p.ablation} ablation)", "lower", floor=chance, run=run,
                             metric=metric)
        values = check.raw.nanmean(1)                                      # [variants, 3]
        for j, name in ((1, "full_vocab_accuracy"), (2, "logprob")):
            check.extra.update({f"clean_{name}": float(values[0, j]), f"top_k_ablated_{name}": float(values[1, j]),
                                f"random_k_ablated_{name}_mean": float(values[2:, j].mean())})
        return check

    def _stability(self, hits: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        """The share of bootstrap resamples (pairs within each task) in which the head's score passes the
        threshold."""
        p = self.params
        if p.averaging == "pooled":
            pooled = torch.cat(list(hits.values()), -1).permute(2, 0, 1).float()
            boots = bootstrap_means(pooled, p.n_boot, seed)
        else:
            boots = torch.stack([bootstrap_means(h.permute(2, 0, 1).float(), p.n_boot, seed + i)
                                 for i, h in enumerate(hits.values())]).mean(0)
        return (boots >= p.threshold).float().mean(0)

    def _interval(self, hits: dict[str, torch.Tensor], words: dict[str, list[int]],
                  seed: int) -> dict[str, torch.Tensor]:
        """Interval of the score whose resampling unit is the task word: all spellings of a pair (" Monday"
        -> " Tuesday", "Monday" -> "Tuesday", ...) are near-duplicates, so they are drawn together. With
        ``averaging="task"`` the words are resampled within their task (the score is a mean over a fixed set
        of tasks, each a mean over its pairs); with ``pooled``, across all tasks."""
        per_pair = torch.cat(list(hits.values()), -1).permute(2, 0, 1).float()       # [n_pairs, L, H]
        task_of = [t for t, h in hits.items() for _ in range(h.shape[-1])]
        word_of = [(t, w) for t in hits for w in words[t]]
        strata = task_of if self.params.averaging == "task" else None
        return self.interval(per_pair, seed, groups=word_of, strata=strata, bounds=(0, 1))
