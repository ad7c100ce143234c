"""Token vs concept induction heads (Feucht, Wallace, Bau, Todd 2025, "The dual-route model of induction").

Token induction heads copy arbitrary token sequences token by token; concept induction heads copy a
multi-token word as a whole (they attend to the end of the earlier copy of the word and carry the word,
not one token of it). The paper tells them apart by two *causal copying scores*, the same measurement on
two kinds of copied item. Per unit ``i`` (seeded), with ``X`` the item of ``m`` tokens (2..``max_word_tokens``):

- clean prompt: ``[start] pre ctx X [sep] ctx X[0]`` (the second copy of the context, then the item's
  first token; the model should go on with ``X[1]``);
- corrupted prompt: ``[start] other [sep] ctx X[0]`` (the first part replaced by another chunk of the
  same length: nothing to copy).

Each head's output ``z`` is patched from the clean into the corrupted prompt at the position *before*
``X[0]`` (index -2, the one that predicts ``X[0]``), one head at a time (batched: one
``(layer, head, -2)`` variant per head, :func:`headlens.methods.run_variants` with
:class:`~headlens.methods.Patch`); the score is the rise of the probability of the item's *next* token
``X[1]`` at the last position: ``P_patched(X[1]) - P_corrupted(X[1])``, averaged over the units. A head
scores when, one position before the item starts, it already carries what comes after the item's first
token: the whole word (concept route) or a look-ahead copy of the sequence (token route).

- ``concept_induction_score``: the concept copying score, ``X`` = a multi-token word of
  ``data/multitoken_words.txt`` (read with a leading space; only the words of 2..``max_word_tokens`` tokens
  for the loaded tokenizer are used, their count in ``info["n_words"]``);
- ``concept_induction_token_score``: the token copying score, ``X`` = ``m`` random tokens (the paired
  unit's word length, the same contexts);
- ``_score_lo/_hi``, ``_token_score_lo/_hi``: bootstrap-t intervals over the units;
- ``_q`` / ``_token_q``: Benjamini-Hochberg q-values (over the heads) of a one-sided sign test per head
  (the rise positive in more units than chance 1/2);
- ``_contrast``: concept minus token score (paired units);
- ``_kind``: ``concept``, ``token``, ``both`` or ``""``: the confirmed sets the head belongs to.

Rule: a head is *claimed* for a route when its score is at least ``threshold`` (a prior on the effect
size: the head alone restores 5 points of the next token's probability) and its q-value at most
``alpha``. Each route's claimed heads (at most ``max_k``) are confirmed separately by
:meth:`Detector.confirm` on held-out units (other words, other contexts, another seed): mean-ablated
together, they must raise the clean loss of ``X[1]`` at the last position (multi-token-word copying for
the concept route, random-token copying for the token route) more than ``n_random`` draws of as many random
heads from the same layers, at ``p <= alpha``; floor: the same loss on the corrupted prompts. The
concept check is the result's ``causal`` (its labels are the role's labels); the token check is in
``info["token_causal"]``. A route whose check fails labels no head (its best candidates are shown).

Deviations from the paper (its code: ``sfeucht/dual-route-induction``): contexts are chunks of the
public-domain ``data/prose.txt`` (the paper: the Pile), ``n_prompts`` units (the paper: 1024 per score,
as many for each item length 2..5), the words are this project's list (the paper: CounterFact subjects),
the random items are the model's random token ids (the paper: tokens of a shuffled Pile document) and
the first part is padded so that every prompt has the same length. The label rule (threshold, sign test,
held-out confirmation) is this project's; the paper ranks heads by each score and takes the top ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..data import file_or_data
from ..errors import HeadlensError
from ..methods import Patch, clean_run, loss_metric, random_token_ids, run_variants, text_chunks
from ..methods.metrics import positioned
from ..results import DetectorResult, head_frame, head_names
from ..stats import bh_qvalues, binomial_sf, bootstrap_ci, wilson_interval
from .base import Detector, ReviewParams, top_heads

CONFIRM_SEED = 7919   # the confirmation units' seed offset (as the induction detector's)
KINDS = ("concept", "token")


def read_words(model, name: str, max_tokens: int) -> list[list[int]]:
    """The words of file ``name`` (a path or a file of ``data/``; ``#`` comments and blank lines skipped)
    as token ids of ``" " + word``, keeping those of 2..``max_tokens`` tokens for ``model``'s tokenizer."""
    lines = file_or_data(name).read_text(encoding="utf-8").splitlines()
    words = [w.strip() for w in lines if w.strip() and not w.lstrip().startswith("#")]
    out = []
    for w in words:
        ids = model.tokenizer.encode(" " + w, add_special_tokens=False)
        if 2 <= len(ids) <= max_tokens:
            out.append(list(ids))
    return out


@dataclass
class CopyingPrompts:
    """Paired clean / corrupted copying prompts ``[n, pos]`` of one kind and the item's first two tokens."""
    clean: Int[Tensor, "n pos"]
    corrupted: Int[Tensor, "n pos"]
    first: Int[Tensor, " n"]     # X[0]: the last token of every prompt
    target: Int[Tensor, " n"]    # X[1]: the token whose probability the scores read


def copying_prompts(items: list[list[int]], contexts: Int[Tensor, "n width"], others: Int[Tensor, "n width"],
                    context_len: int, max_tokens: int, sep: int, start: int | None) -> CopyingPrompts:
    """Clean ``[start] pre ctx X [sep] ctx X[0]`` and corrupted ``[start] other [sep] ctx X[0]`` prompts,
    one per item; ``contexts`` / ``others`` rows have ``context_len + max_tokens`` tokens (``pre ctx`` is
    the first ``width - len(X)`` of them, ``ctx`` its last ``context_len``), so every prompt has
    ``(start) + 2 * context_len + max_tokens + 2`` tokens.

    >>> p = copying_prompts([[7, 8]], torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 5, 5, 5]]), 2, 2, 9, 0)
    >>> p.clean.tolist(), p.corrupted.tolist(), p.target.tolist()
    ([[0, 1, 2, 7, 8, 9, 1, 2, 7]], [[0, 5, 5, 5, 5, 9, 1, 2, 7]], [8])
    """
    width = context_len + max_tokens
    head = [] if start is None else [int(start)]
    clean, corrupted = [], []
    for x, c, o in zip(items, contexts.tolist(), others.tolist()):
        first = c[:width - len(x)]
        ctx = first[-context_len:]
        clean.append(head + first + list(x) + [sep] + ctx + [x[0]])
        corrupted.append(head + o[:width] + [sep] + ctx + [x[0]])
    t = lambda rows: torch.tensor(rows, dtype=torch.long)      # noqa: E731
    return CopyingPrompts(t(clean), t(corrupted), t([x[0] for x in items]), t([x[1] for x in items]))


def next_token_prob(target: Int[Tensor, " n"]):
    """A per-prompt metric ``[n]``: the probability of ``target`` at the last position (reads only there)."""
    def fn(logits: Float[Tensor, "n 1 vocab"]) -> Tensor:
        lp = logits[:, -1].float().log_softmax(-1)
        return lp.gather(-1, target[:len(lp)].to(lp.device)[:, None])[:, 0].exp()
    return positioned(fn, [-1])


def copying_rises(model, prompts: CopyingPrompts, heads: list[tuple[int, int]], batch_size: int | None,
                  description: str = "copying scores") -> tuple[Float[Tensor, "n_heads n"], dict[str, Tensor]]:
    """Per head in ``heads`` and prompt, ``P(target)`` at the last position of the corrupted prompt with
    that head's output patched from the clean prompt at position -2, minus the unpatched corrupted value:
    ``[n_heads, n]``; and the clean behaviour per prompt ``[n]``: ``clean_prob``, ``clean_top1`` (the
    target is the clean prompt's top token) and ``corrupted_prob``. All heads in one batched
    :func:`~headlens.methods.run_variants` (one ``(layer, head, -2)`` variant each)."""
    metric = next_token_prob(prompts.target)
    source = clean_run(model, prompts.clean, positions=metric.positions)
    target = clean_run(model, prompts.corrupted, positions=metric.positions)
    n_pos = prompts.clean.shape[1]
    values = run_variants(model, target.tokens, [[]] + [[(l, h, n_pos - 2)] for l, h in heads], metric,
                          Patch(source=source), None, batch_size, target, description=description)
    values = values.float().cpu()
    top1 = positioned(lambda lg: (lg[:, -1].argmax(-1).cpu() == prompts.target[:len(lg)]).float(), [-1])
    clean = {"clean_prob": source.value(metric).float().cpu(), "clean_top1": source.value(top1).float().cpu(),
             "corrupted_prob": values[0]}
    return values[1:] - values[0], clean


def sign_q(rises: Float[Tensor, "n L H"]) -> Float[Tensor, "L H"]:
    """BH q-values over the heads of a one-sided sign test per head: the rise positive in more of the
    ``n`` units than chance 1/2 (a zero rise counts as not positive)."""
    n = rises.shape[0]
    return bh_qvalues(binomial_sf((rises > 0).sum(0), n, 0.5)).float()


class DualRouteDetector(Detector):
    name = "concept_induction"
    cost = 1.0   # share of a scan (relative; headlens.runtime.distributed.plan)
    summary = ("copies a multi-token word as a whole (concept route) vs copies any token sequence "
               "(token route): causal copying scores of both, and which route each induction head serves")
    paper = "Feucht et al. 2025, The dual-route model of induction"
    key_columns = ("token_score", "kind")
    # every head patched on every prompt of both kinds: too slow for the default scan on a CPU
    # (docs/detectors/concept_induction.md has the measured cost); run it with -d concept_induction
    opt_in = True

    @dataclass
    class Params(ReviewParams):
        words: str = "multitoken_words.txt"   # words file (data/ or a path), read with a leading space
        context: str = "prose.txt"            # corpus of the contexts (data/ or a path), or "random" tokens
        separator: str = "\n"                 # one token between the two copies (the paper: a newline)
        n_prompts: int = 16        # discovery units (the paper: 1024 per score)
        context_len: int = 16      # context tokens repeated before the item (the paper: 30 - item length)
        max_word_tokens: int = 5   # items of 2..this many tokens (the paper: 2..5)
        threshold: float = 0.05    # a claimed head's mean rise of P(X[1]) (a prior on the effect size)
        confirm_prompts: int = 8   # held-out units of each kind for the confirmation checks

    def run(self, model, seed: int = 0) -> DetectorResult:
        p = self.params
        if p.n_prompts < 2 or p.confirm_prompts < 1:
            raise HeadlensError(f"concept_induction needs n_prompts >= 2 and confirm_prompts >= 1, not "
                                f"{p.n_prompts} and {p.confirm_prompts}")
        if p.max_word_tokens < 2 or p.context_len < 1:
            raise HeadlensError(f"concept_induction needs max_word_tokens >= 2 and context_len >= 1, not "
                                f"{p.max_word_tokens} and {p.context_len}")
        words = read_words(model, p.words, p.max_word_tokens)
        if len(words) < 2:
            return self.not_applicable(model, f"only {len(words)} word(s) of {p.words} are 2..{p.max_word_tokens} "
                                       "tokens for this tokenizer: no multi-token words to copy",
                                       n_words=len(words))
        sep = model.tokenizer.encode(p.separator, add_special_tokens=False)
        if len(sep) != 1:
            raise HeadlensError(f"the separator {p.separator!r} is {len(sep)} tokens for this tokenizer; "
                                "pass one that is one token (separator=...)")
        n, nc = p.n_prompts, p.confirm_prompts
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(words), generator=g).tolist()
        half = max(1, len(words) // 2)                       # discovery words | held-out words
        disc_words = [words[order[i % half]] for i in range(n)]
        held = order[half:] or order[:half]
        conf_words = [words[held[i % len(held)]] for i in range(nc)]
        contexts = self._contexts(model, 2 * (n + nc), g)     # own and other chunk per unit, disjoint sets
        start = model.start_token_id
        model.check_length(2 * p.context_len + p.max_word_tokens + 2 + (start is not None),
                           "copying prompt (2 * context_len + max_word_tokens + 2)")

        def build(items, rows, others):
            randoms = [random_token_ids(model, 1, len(x), g)[0].tolist() for x in items]
            return (copying_prompts(items, contexts[rows], contexts[others], p.context_len, p.max_word_tokens,
                                    sep[0], start),
                    copying_prompts(randoms, contexts[rows], contexts[others], p.context_len,
                                    p.max_word_tokens, sep[0], start))
        concept, token = build(disc_words, torch.arange(n), torch.arange(n, 2 * n))
        conf = build(conf_words, torch.arange(2 * n, 2 * n + nc), torch.arange(2 * n + nc, 2 * n + 2 * nc))

        # both kinds in one batch of 2n prompts: every head patched at -2, one variant per head
        both = CopyingPrompts(*(torch.cat([getattr(concept, f), getattr(token, f)])
                                for f in ("clean", "corrupted", "first", "target")))
        heads = model.heads()
        rises, clean = copying_rises(model, both, heads, self.batch_size)
        L, H = model.n_layers, model.n_heads
        per_unit = {"concept": rises[:, :n].T.reshape(n, L, H), "token": rises[:, n:].T.reshape(n, L, H)}
        score = {k: v.mean(0) for k, v in per_unit.items()}
        q = {k: sign_q(v) for k, v in per_unit.items()}
        claimed = {k: [(l, h) for l, h in top_heads(score[k], L * H)
                       if score[k][l, h] >= p.threshold and q[k][l, h] <= p.alpha] for k in KINDS}

        checks = {k: self._confirm(model, claimed[k], score[k], seed, k, prompts)
                  for k, prompts in zip(KINDS, conf)}
        decided = {k: self.decide(claimed[k], checks[k]) for k in KINDS}
        confirmed = {k: set(decided[k][0]) for k in KINDS}
        kind = [("both" if (l, h) in confirmed["concept"] and (l, h) in confirmed["token"] else
                 "concept" if (l, h) in confirmed["concept"] else "token" if (l, h) in confirmed["token"] else "")
                for l in range(L) for h in range(H)]
        labelled = decided["concept"][0]
        reason = self._reason(claimed, decided)
        frame = head_frame(model, self.name, score["concept"], {
            **self.interval(per_unit["concept"], seed, bounds=(-1, 1)), "q": q["concept"],
            "token_score": score["token"], **self.interval(per_unit["token"], seed, "token_score", bounds=(-1, 1)),
            "token_q": q["token"], "contrast": score["concept"] - score["token"]})
        frame[f"{self.name}_kind"] = kind
        info = {"clean_behaviour": self._behaviour(clean, n, seed),
                "n_words": len(words), "n_units": n, "context": p.context,
                "claimed_concept": head_names(claimed["concept"]), "claimed_token": head_names(claimed["token"]),
                "token_heads": head_names(decided["token"][0]), "concept_heads": head_names(labelled),
                "token_causal": checks["token"].to_dict(), "start_token": model.info.start_token,
                "interval_unit": "copying unit (one word or random item in one context)", "interval_units": n}
        return DetectorResult(role=self.name, frame=frame, labelled=labelled, reason=reason,
                              causal=checks["concept"], params=self.param_dict(), info=info)

    def _contexts(self, model, count: int, g: torch.Generator) -> Int[Tensor, "count width"]:
        """``count`` context rows of ``context_len + max_word_tokens`` tokens: consecutive chunks of the
        corpus (no start token), or random tokens when ``context`` is ``"random"``."""
        p = self.params
        width = p.context_len + p.max_word_tokens
        if p.context == "random":
            return random_token_ids(model, count, width, g)
        chunks = text_chunks(model, p.context, width, count, "copying context")
        chunks = chunks[:, 1:] if model.start_token_id is not None else chunks[:, :width]
        if len(chunks) < count:
            raise HeadlensError(f"corpus {p.context} holds {len(chunks)} chunks of {width} tokens; the copying "
                                f"prompts need {count} (2 * (n_prompts + confirm_prompts)): lower them or "
                                "pass a longer corpus (context=...)")
        return chunks

    def _confirm(self, model, claimed, score, seed, kind: str, prompts: CopyingPrompts):
        """One route's confirmation check on held-out units: per unit, the loss of ``X[1]`` at the last
        position of the clean prompt; floor: the same on the corrupted prompt."""
        p = self.params
        tokens = torch.cat([prompts.clean, prompts.target[:, None]], 1)
        last = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
        last[:, -1] = True
        metric = loss_metric(tokens, last, per_prompt=True)
        run = clean_run(model, tokens, positions=metric.positions)
        corrupted = torch.cat([prompts.corrupted, prompts.target[:, None]], 1)
        floor = float(clean_run(model, corrupted, positions=metric.positions).value(metric).mean())
        item = "a multi-token word" if kind == "concept" else "random tokens"
        return self.confirm(model, claimed, score, seed + (kind == "token"),
                            f"loss of the second token of {item} being copied, on held-out prompts "
                            f"({p.ablation} ablation)", "higher", floor=floor, run=run, metric=metric)

    def _behaviour(self, clean: dict[str, Tensor], n: int, seed: int) -> dict:
        """The task's clean behaviour per kind (the first ``n`` prompts are the words, the rest the random
        items): the mean P(X[1]) on the clean and the corrupted prompts with percentile-bootstrap intervals
        over the units (a bootstrap-t interval degenerates on probabilities stuck near 0 or 1), and the
        clean top-1 copying accuracy with its Wilson interval."""
        out = {}
        p = self.params
        for k, rows in (("concept", slice(0, n)), ("token", slice(n, 2 * n))):
            for name in ("clean_prob", "corrupted_prob"):
                v = clean[name][rows]
                lo, hi = bootstrap_ci(v[:, None], p.n_boot, seed, p.ci_level)
                out[f"{k}_{name}"] = round(float(v.mean()), 4)
                out[f"{k}_{name}_ci"] = [round(float(lo[0]), 4), round(float(hi[0]), 4)]
            acc = float(clean["clean_top1"][rows].mean())
            out[f"{k}_clean_accuracy"] = round(acc, 4)
            out[f"{k}_clean_accuracy_ci"] = [round(float(x), 4) for x in wilson_interval(acc, n)]
        return out

    def _reason(self, claimed, decided) -> str:
        p = self.params
        parts = []
        for k in KINDS:
            if not claimed[k]:
                parts.append(f"{k} route: no head raises P(X[1]) by {p.threshold} with q <= {p.alpha}")
            elif decided[k][1]:
                parts.append(f"{k} route: {decided[k][1]}")
        return "; ".join(parts)
