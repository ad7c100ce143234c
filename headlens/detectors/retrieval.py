"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality").

Needle-in-a-haystack: a needle sentence (``data/needles.json``) is put into filler text
(``data/haystack.txt``) at several depths of contexts of several lengths (in tokens), followed by a
question about it; the model answers greedily (through the chat template when it has one). Grids:
``preset='default'`` (fast, the same top heads as the larger grids on SmolLM2, see
docs/detectors/retrieval.md) or ``preset='paper'`` (Wu et al.'s lengths from 1k to 50k tokens in 20 steps,
those that fit the model's context plus the longest that fits, and their 10 depths); ``context_lengths``
and ``depths`` override either. Prompts are prefilled with memory-efficient attention; the filler every
run starts with (chat header + haystack up to the deepest needle) is prefilled once and its KV cache
reused; runs of one length and depth are decoded together, as many as ``max_bytes`` allows. At every
generated token only the last query row of each head's attention is computed. Columns:

- ``retrieval_score`` = copy-paste score: at each generated token, a head counts when its top-1 attended
  position lies inside the needle span and holds the generated token; it then earns
  1 / (needle length in tokens). Summed over a run's tokens, averaged over the runs where the model
  retrieved the needle (ROUGE-1 recall of the needle's words in the answer > ``recall_threshold``).
  Attention is per query head, so grouped-query attention needs nothing special.
- ``retrieval_active_runs``: share of those runs in which the head copied at least one token.

Discovery and confirmation: the needles are split (seeded): ``confirm_needles`` are held out; the scores
come from the runs of the other needles, the confirmation check decodes the held-out needles' runs.

Label rule: the claimed heads have ``retrieval_score >= threshold`` (0.1, the paper's cut; it finds under
5% of heads above it); they are labelled only if their confirmation check is significant: needle recall
(ROUGE-1) on up to ``causal_runs`` retrieved runs of the held-out needles with the claimed heads'
attention made uniform while the answer is produced, vs ``n_random`` draws of as many random heads from
the same layers (99 by default: every draw is decoded), all variants of a prompt decoded together, at
``p <= alpha``; the effect's floor is recall 0. If the model never retrieves a needle, the role is not
applicable; if it retrieves no held-out needle, nothing is labelled (no confirmation).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import file_or_data
from ..errors import HeadlensError
from ..methods import clean_run
from ..methods.generation import (
    PREFILL_CHUNK,
    context_supported,
    continuation_logits,
    encode_prompt,
    greedy_generate,
    kv_bytes_per_token,
    prefill,
    prefill_context,
    shared_length,
    stop_token_ids,
)
from ..methods.metrics import positioned, token_logprobs
from ..results import DetectorResult, head_frame
from ..runtime import each
from ..runtime.work import agreed_budget, plan
from .base import Detector, ReviewParams, top_heads

MARKER = "\x00CONTEXT\x00"
PAPER_LENGTHS = [round(1000 + i * (50000 - 1000) / 19) for i in range(20)]   # Wu et al.: 1k..50k, 20 steps
PAPER_DEPTHS = [round(i * 100 / 9) / 100 for i in range(10)]                 # 0, 0.11, ..., 1 (10 steps)
PRESETS = {
    # name: (context lengths or None for the paper's, depths)
    "default": ((1000,), (0.0, 0.5, 1.0)),
    "paper": (None, tuple(PAPER_DEPTHS)),
}


def rouge1_recall(reference: str, answer: str) -> float:
    """Share of the reference's words (lower-cased, multiset) that the answer contains."""
    ref = Counter(re.findall(r"\w+", reference.lower()))
    ans = Counter(re.findall(r"\w+", answer.lower()))
    return sum(min(n, ans[w]) for w, n in ref.items()) / max(1, sum(ref.values()))


@dataclass
class NeedleRun:
    needle: str
    length: int
    depth: float
    tokens: list[int]
    span: tuple[int, int]      # needle token positions [start, end) in tokens


def _resolve(name: str) -> Path:
    return file_or_data(name)


def load_needles(name: str) -> list[dict]:
    needles = json.loads(_resolve(name).read_text(encoding="utf-8"))
    if not needles or not all({"needle", "question"} <= set(n) for n in needles):
        raise HeadlensError(f"{name}: expected a list of {{'needle': ..., 'question': ...}} objects")
    return needles


def needle_prompts(model, needles: list[dict], haystack: str, lengths, depths, chat: bool,
                   template: str) -> list[NeedleRun]:
    """One prompt per (needle, context length, depth): the needle put after the last sentence end
    before ``depth`` of a context of ``length`` tokens (haystack repeated if short)."""
    tok = model.tokenizer
    hay = tok(haystack, add_special_tokens=False)["input_ids"]
    if not hay:
        raise HeadlensError("the haystack text is empty")
    ends = {i for i, t in enumerate(hay) if tok.decode([t]).rstrip().endswith((".", "!", "?"))}
    runs = []
    for item in needles:
        pre, post = encode_prompt(model, template.format(context=MARKER, question=item["question"]),
                                  chat, marker=MARKER)
        needle = tok(" " + item["needle"].strip(), add_special_tokens=False)["input_ids"]
        for length in lengths:
            n_hay = length - len(needle)
            if n_hay < 0:
                raise HeadlensError(f"context length {length} is shorter than the needle ({len(needle)} tokens)")
            filler = (hay * (n_hay // len(hay) + 1))[:n_hay]
            for depth in depths:
                if not 0 <= depth <= 1:
                    raise HeadlensError(f"needle depth {depth} is outside [0, 1]")
                cut = round(depth * n_hay)
                at_end = [i + 1 for i in range(cut) if i % len(hay) in ends]
                cut = at_end[-1] if at_end and depth < 1 else cut
                tokens = pre + filler[:cut] + needle + filler[cut:] + post
                model.check_length(len(tokens), f"needle prompt (context length {length})")
                start = len(pre) + cut
                runs.append(NeedleRun(item["needle"], length, depth, tokens, (start, start + len(needle))))
    return runs


def copy_scores(run: NeedleRun, generated: list[int], top1: torch.Tensor) -> torch.Tensor:
    """Copy-paste score of every head on one run: ``[n_layers, n_heads]``.

    ``top1[s, l, h]`` is head (l, h)'s top-1 key position at the step that produced ``generated[s]``.
    """
    start, end = run.span
    prompt = torch.tensor(run.tokens)
    steps = top1[:len(generated)]
    gen = torch.tensor(generated)[:, None, None]
    inside = (steps >= start) & (steps < end)
    same = prompt[steps.clamp(0, len(run.tokens) - 1)] == gen
    return (inside & same).float().sum(0) / (end - start)


def grid(model, p, needles: list[dict], template: str, chat: bool) -> tuple[list[int], list[float]]:
    """Context lengths and depths: the explicit ones, else the preset's. The paper's lengths are those of
    Wu et al.'s grid that fit the model's context with the longest needle prompt and the answer, plus the
    longest length that fits when it is beyond them."""
    if p.preset not in PRESETS:
        raise HeadlensError(f"retrieval: unknown preset '{p.preset}'; choose one of {', '.join(PRESETS)}")
    lengths, depths = PRESETS[p.preset]
    if lengths is None and not p.context_lengths:
        overhead = max(sum(len(x) for x in encode_prompt(model, template.format(context=MARKER,
                       question=n["question"]), chat, marker=MARKER)) for n in needles) + p.max_new_tokens
        room = model.info.n_ctx - overhead
        lengths = [n for n in PAPER_LENGTHS if n <= room]
        if room >= 1000 and (not lengths or room > lengths[-1]):
            lengths.append(room if room < PAPER_LENGTHS[-1] else PAPER_LENGTHS[-1])
        if not lengths:
            raise HeadlensError(f"retrieval: the paper's grid starts at 1000 tokens of context but "
                                f"{model.info.name} has room for {room}; set retrieval.context_lengths")
        lengths = sorted(set(lengths))
    return list(p.context_lengths or lengths), list(p.depths or depths)


def budget(model, max_bytes: int = 0, need: int = 0) -> int:
    """Bytes a batch of needle runs may take (KV caches and activations), the same on every rank:
    ``max_bytes``, else the scan's working-memory budget (:func:`headlens.runtime.work.agreed_budget`:
    ``--max-memory``, or what the device has free; on the CPU 256 MiB unless one run (``need``) takes
    more)."""
    return int(max_bytes) if max_bytes else agreed_budget(model.device, model.weight_bytes(), need)


def needle_run_bytes(model, n_context: int, n_new: int, n_fill: int) -> int:
    """Memory of one needle run in a batch: its KV cache for ``n_context + n_new`` tokens, activations
    for the tokens it prefills in one forward pass (``n_fill``, at most :data:`PREFILL_CHUNK`), and
    their attention mask."""
    n_fill = min(n_fill, PREFILL_CHUNK)
    cfg = model.bridge.cfg
    itemsize = kv_bytes_per_token(model) // (2 * model.n_layers * model.info.n_kv_heads * model.info.d_head)
    per_token = itemsize * (6 * cfg.d_model + 3 * (getattr(cfg, "d_mlp", None) or 4 * cfg.d_model))
    return kv_bytes_per_token(model) * (n_context + n_new) + n_fill * (per_token + n_context + n_new)


def decode_runs(model, runs: list[NeedleRun], max_new_tokens: int, stops, max_bytes: int):
    """Greedy answers with top-1 positions for every run: ``[(run, generated ids, top1 [steps, L, H])]``
    in the order of ``runs``.

    The longest filler start shared by the runs (chat header + haystack up to the deepest needle) is
    prefilled once, kept within half of ``max_bytes``; runs of the same length and depth are decoded
    as one batch, as many as fit in the rest.
    """
    start = max(runs, key=lambda r: r.span[0])
    n_prefix = min(start.span[0], max_bytes // 2 // kv_bytes_per_token(model))
    prefix = prefill(model, start.tokens[:n_prefix]) if n_prefix > 1 else None
    rest = max_bytes - (prefix.nbytes if prefix is not None else 0)
    order = sorted(range(len(runs)), key=lambda i: (runs[i].length, runs[i].depth, i))
    batches: list[list[int]] = []
    i = 0
    while i < len(order):
        batch = [order[i]]
        while i + len(batch) < len(order):
            nxt = runs[order[i + len(batch)]]
            if (nxt.length, nxt.depth) != (runs[batch[0]].length, runs[batch[0]].depth):
                break
            rows = batch + [order[i + len(batch)]]
            n = max(len(runs[j].tokens) for j in rows)
            if len(rows) * needle_run_bytes(model, n, max_new_tokens, n - nxt.span[0]) > rest:
                break
            batch = rows
        batches.append(batch)
        i += len(batch)

    def decode(batch: list[int]) -> list[tuple[list[int], torch.Tensor]]:
        gen = greedy_generate(model, [runs[j].tokens for j in batch], max_new_tokens, record_top1=True,
                              stop_ids=stops, prefix=prefix)
        return [(gen.tokens[row], gen.top1[:, :, row].clone()) for row in range(len(batch))]

    # Each batch is one item of the same plan on every rank (the budget is agreed by the caller), so a
    # distributed run decodes each batch exactly as one process does; finished batches are checkpointed.
    key = ([r.tokens for r in runs], max_new_tokens, sorted(stops), batches, n_prefix)
    out: list = [None] * len(runs)
    for batch, decoded in zip(batches, each(decode, batches, "needle runs", key=key, resumable=True)):
        for j, (tokens, top1) in zip(batch, decoded):
            out[j] = (runs[j], tokens, top1)
    return out


class RetrievalDetector(Detector):
    name = "retrieval"
    cost = 0.55   # share of a scan (relative; headlens.runtime.distributed.plan)
    summary = "copies the needle from a long context into the answer (needle-in-a-haystack copy-paste score)"
    paper = "Wu et al. 2024, Retrieval Head Mechanistically Explains Long-Context Factuality"
    key_columns = ("active_runs",)   # a high mean from one run vs a head that copies in most runs

    @dataclass
    class Params(ReviewParams):
        needles: str = "needles.json"
        haystack: str = "haystack.txt"
        preset: str = "default"         # grid: 'default' (fast) or 'paper' (Wu et al.'s lengths and depths)
        context_lengths: tuple[int, ...] = ()   # tokens of context (haystack + needle); () = the preset's
        depths: tuple[float, ...] = ()          # needle depths in [0, 1]; () = the preset's
        n_needles: int = 0              # needles used (0 = all)
        chat: bool = True               # chat template when the model has one
        template: str = "{context}\n\nBased on the text above, answer the question in one sentence: {question}"
        plain_template: str = "{context}\n\nQuestion: {question}\nAnswer:"  # models without a chat template
        max_new_tokens: int = 32
        recall_threshold: float = 0.5   # ROUGE-1 recall for a run to count (paper: 0.5)
        threshold: float = 0.1          # label rule (paper: 0.1)
        ablation: str = "uniform"       # the causal check makes attention uniform (the only kind here)
        ablate_prompt: bool = False     # causal check: heads uniform while prefilling the prompt too, not only
                                        # while answering (Wu et al.'s masking); much costlier
        top_k: int = 10                 # confirmation check: the best candidates tested when none is claimed
        n_random: int = 99              # random draws: decoding is costly; p's resolution 0.01 (= alpha)
        confirm_needles: int = 2        # needles held out for the confirmation check (the rest: discovery)
        causal_runs: int = 6            # retrieved confirmation runs decoded by the confirmation check
        effect_runs: int = 2            # retrieved runs for the top-k heads' direct vs total effect (0 = none)
        max_bytes: int = 0              # memory for KV caches and activations of a batch (0 = auto)

    def run(self, model, seed: int = 0) -> DetectorResult:
        p = self.params
        needles = load_needles(p.needles)[:p.n_needles or None]
        haystack = _resolve(p.haystack).read_text(encoding="utf-8")
        chat = p.chat and model.info.has_chat_template
        template = p.template if chat else p.plain_template
        lengths, depths = grid(model, p, needles, template, chat)
        runs = needle_prompts(model, needles, haystack, lengths, depths, chat, template)
        stops = stop_token_ids(model)
        # every rank plans the same batches: the smallest rank's budget
        longest = max(len(r.tokens) for r in runs)
        need = needle_run_bytes(model, longest, p.max_new_tokens, longest)
        results = decode_runs(model, runs, p.max_new_tokens, stops, budget(model, p.max_bytes, need))
        scores, recalls, retrieved, answers, retrieved_recall = [], [], [], [], []
        for run, generated, top1 in results:
            answer = model.tokenizer.decode(generated, skip_special_tokens=True)
            recalls.append(rouge1_recall(run.needle, answer))
            if recalls[-1] > p.recall_threshold:
                retrieved.append(run)
                retrieved_recall.append(recalls[-1])
                answers.append([int(t) for t in generated])
                scores.append(copy_scores(run, generated, top1))
        info = {"n_runs": len(runs), "n_retrieved": len(retrieved),
                "needle_recall": sum(recalls) / len(recalls), "context_lengths": list(lengths),
                "depths": list(depths),
                "retrieved_by_length": {str(n): sum(r.length == n for r in retrieved) for n in lengths}}
        if not retrieved:
            return self.not_applicable(model, f"the model retrieved the needle in none of {len(runs)} runs "
                                       f"(ROUGE-1 recall > {p.recall_threshold}); nothing to score", **info)
        held_out = self._confirmation_needles([r.needle for r in runs], seed)
        found = [i for i, r in enumerate(retrieved) if r.needle not in held_out]
        confirm = [i for i, r in enumerate(retrieved) if r.needle in held_out][:p.causal_runs]
        info.update({"confirmation_needles": sorted(held_out), "n_discovery_runs": len(found),
                     "n_confirmation_runs": len(confirm)})
        if not found:
            n_found = len({r.needle for r in runs}) - len(held_out)
            return self.not_applicable(model, f"the model retrieved none of the {n_found} discovery needles; "
                                       "nothing to score", **info)
        per_run = torch.stack([scores[i] for i in found])
        score = per_run.mean(0)
        claimed = [(l, h) for l, h in top_heads(score, score.numel()) if score[l, h] >= p.threshold]
        if p.ablation != "uniform":
            raise HeadlensError("the retrieval causal check decodes with uniform attention; "
                                f"ablation '{p.ablation}' is not available here")
        if not confirm:
            causal, labelled = None, []
            reason = (f"the model retrieved none of the held-out needles ({', '.join(sorted(held_out))[:80]}): "
                      "no confirmation check, so no head is labelled")
        else:
            causal = self.confirm(model, claimed, score, seed, "needle recall on held-out needles (ROUGE-1, "
                                  "uniform attention)", "lower", floor=0.0, runs=[retrieved[i] for i in confirm],
                                  stops=stops, clean_recall=[retrieved_recall[i] for i in confirm])
            labelled, reason = self.decide(claimed, causal)
        if not claimed:
            reason = (f"no head reaches copy-paste score {p.threshold}; the top rows are the best candidates")
        info["claimed"] = [f"L{l}H{h}" for l, h in claimed]
        retrieved, answers = [retrieved[i] for i in found], [answers[i] for i in found]
        effects = self._effects(model, score, retrieved[:p.effect_runs], answers[:p.effect_runs])
        # the unit is the needle: its runs (lengths x depths) share the needle's text and are resampled together
        needle_of = [r.needle for r in retrieved]
        info.update({"interval_unit": "needle", "interval_units": len(set(needle_of))})
        frame = head_frame(model, self.name, score, {**self.interval(per_run, seed, groups=needle_of,
                                                                     bounds=(0, None)),
                                                     "active_runs": (per_run > 0).float().mean(0), **effects})
        return DetectorResult(role=self.name, frame=frame, labelled=labelled, reason=reason,
                              causal=causal, params=self.param_dict(), info=info)

    def _confirmation_needles(self, needles: list[str], seed: int) -> set[str]:
        """The needles held out for the confirmation check: ``confirm_needles`` of them, seeded (at most all
        but one: the rest are the discovery needles the heads are scored on)."""
        distinct = list(dict.fromkeys(needles))
        n = min(self.params.confirm_needles, len(distinct) - 1)
        order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed + 2)).tolist()
        return {distinct[i] for i in order[:max(n, 0)]}

    def _effects(self, model, score, runs, answers) -> dict[str, torch.Tensor]:
        """Direct vs total effect of the top-k heads (attention made uniform one head at a time while the
        answer is produced, as the causal check does) on the teacher-forced log-prob of the model's own
        answer, mean over ``runs``; NaN for the other heads. Total drop: every later layer reacts; direct
        drop: only the head's path to the logits carries it."""
        nan = torch.full((model.n_layers, model.n_heads), float("nan"))
        if not runs:
            return {"total": nan, "direct": nan, "compensation": nan, "self_repair": nan}
        heads = top_heads(score, self.params.top_k)
        layer, head = torch.tensor(heads).T
        total, direct = nan.clone(), torch.zeros_like(nan)
        total[layer, head] = 0.0                  # measured for the top-k only: NaN elsewhere, never 0
        for run, answer in zip(runs, answers):
            n = len(answer)
            target = torch.tensor([answer])
            # the prompt's last token and the answer but its last token predict the answer; heads uniform
            # there only, one head per row after a clean row; the prompt before is prefilled once
            logits = continuation_logits(model, [run.tokens + answer[:-1]] * (1 + len(heads)), n,
                                         [[]] + [[h] for h in heads])
            logprob = token_logprobs(logits, target.to(logits.device).expand(len(logits), -1)).mean(-1).cpu()
            total[layer, head] += (logprob[0] - logprob[1:]) / len(runs)
            tokens = torch.tensor([run.tokens + answer], device=model.device)
            metric = positioned(lambda logits, target=tokens[:, -n:]: token_logprobs(logits, target).mean(),
                                torch.arange(-(n + 1), -1))
            clean = clean_run(model, tokens, positions=metric.positions, keep_v=True)
            d = self.direct_and_self_repair(model, clean, metric, nan, "lower", float(clean.value(metric)),
                                            heads=heads, batch_size=4)["direct"]
            direct += d / len(runs)
        return {"total": total, "direct": direct, **self.repair_columns(direct, total)}

    def causal_values(self, model, variants, runs=(), stops=(), clean_recall=None, **_) -> torch.Tensor:
        """Needle recall of each run with each variant's heads' attention uniform: ``[n_variants, n_runs]``.

        By default (Wu et al.'s masking) the heads are uniform while the answer is produced: from each
        prompt's last token on. Each run's prompt is then prefilled clean once (the filler start the runs
        share once for all) and every variant's row reads that cache in place; runs go in groups whose
        caches fit half the memory budget, all variants of a group decoded together as far as the rest
        allows. With ``ablate_prompt`` the heads are uniform over the prompt too: the shared filler start
        is prefilled once per variant with its heads ablated, then each run's rest. A variant that
        ablates nothing takes the run's recall from its detection decoding (``clean_recall``), when
        given, instead of decoding it again."""
        p = self.params
        decode = [i for i, v in enumerate(variants) if v or clean_recall is None]
        clean = [i for i in range(len(variants)) if i not in decode]      # taken from clean_recall
        deepest = max(runs, key=lambda r: r.span[0])
        kv = kv_bytes_per_token(model)
        total = budget(model, p.max_bytes)   # every rank plans the same items
        n_prefix = min(deepest.span[0], total // 2 // kv)
        shared = [shared_length(run.tokens, deepest.tokens[:n_prefix]) if n_prefix > 1 else 0 for run in runs]
        recall = torch.zeros(len(variants), len(runs))
        if clean:
            recall[clean] = torch.tensor([float(r) for r in clean_recall[:len(runs)]])
        if not decode:
            return recall
        if p.ablate_prompt:
            one = kv * n_prefix + max(needle_run_bytes(model, len(r.tokens), p.max_new_tokens, len(r.tokens) - n)
                                      for r, n in zip(runs, shared))
            n = plan(one, room=budget(model, p.max_bytes, one))  # same plan everywhere
            items = [(list(range(len(runs))), decode[i:i + n]) for i in range(0, len(decode), n)]
        else:
            # groups of runs whose clean caches fit half the budget (runs of similar length after the
            # shared start together: little padding); each group's variants in chunks
            groups: list[list[int]] = [[]]
            for r in sorted(range(len(runs)), key=lambda r: (len(runs[r].tokens) - shared[r], r)):
                if groups[-1] and kv * sum(len(runs[j].tokens) for j in groups[-1] + [r]) > total // 2:
                    groups.append([])
                groups[-1].append(r)
            n = plan(needle_run_bytes(model, p.max_new_tokens + 1, p.max_new_tokens, 1), room=total // 2)
            items = [(g, decode) for g in groups]       # each group's variants in chunks of n rows

        clean_prefix = prefill(model, deepest.tokens[:n_prefix]) if n_prefix > 1 and not p.ablate_prompt else None

        def one_item(item) -> torch.Tensor:        # [runs of the item, its variants]; ranks share items
            group, batch = item
            ablate = [variants[i] for i in batch]
            if p.ablate_prompt:
                prefix = prefill(model, deepest.tokens[:n_prefix], variants=ablate) if n_prefix > 1 else None
                got = torch.zeros(len(group), len(batch))
                for r, j in enumerate(group):
                    gen = greedy_generate(model, [runs[j].tokens] * len(batch), p.max_new_tokens, ablate=ablate,
                                          stop_ids=stops, prefix=prefix)
                    got[r] = self._recall(model, [runs[j]] * len(batch), gen.tokens)
                return got
            # the group's prompts prefilled clean once, read by every chunk of its variants
            context = (prefill_context(model, [runs[j].tokens[:-1] for j in group], prefix=clean_prefix)
                       if context_supported(model) else None)
            got = torch.zeros(len(group), len(batch))
            per = max(1, n // len(group))
            for i in range(0, len(batch), per):
                rows = [(j, v) for j in group for v in range(i, min(i + per, len(batch)))]
                gen = greedy_generate(model, [runs[j].tokens for j, _ in rows], p.max_new_tokens,
                                      ablate=[ablate[v] for _, v in rows], stop_ids=stops, ablate_prompt=False,
                                      context=context, prefix=clean_prefix if context is None else None)
                got[:, i:i + per] = self._recall(model, [runs[j] for j, _ in rows], gen.tokens).reshape(len(group), -1)
            return got

        for (group, batch), got in zip(items, each(one_item, items, "retrieval causal check")):
            recall[torch.tensor(batch)[:, None], torch.tensor(group)[None, :]] = got.T
        return recall

    @staticmethod
    def _recall(model, runs, generated) -> torch.Tensor:
        answers = model.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return torch.tensor([rouge1_recall(run.needle, a) for run, a in zip(runs, answers)])
