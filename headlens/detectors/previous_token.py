"""Previous-token heads (Olsson et al. 2022, "In-context learning and induction heads"; Elhage et al. 2021,
"A mathematical framework for transformer circuits"; TransformerLens ``head_detector``'s
``previous_token_head``).

A previous-token head attends from each token to the one just before it and writes that token into the
residual stream, where induction heads read it through K-composition (their keys match "the token before
this one"). Columns:

- ``previous_token_score``: mean attention from each position to the one before it, on ``n_seqs`` chunks
  of natural text (``corpus``, ``data/prose.txt``; the model's start token first, then ``seq_len`` tokens
  of the corpus), the first position (the start token) left out as a query:
  ``mean over sequences and q = 1..n-1 of pattern[q, q-1]`` (:func:`previous_token_score`).
- ``previous_token_random``: the same on ``n_seqs`` sequences of random tokens (start token first): a
  previous-token head attends by position, whatever the content.
- ``previous_token_score_lo`` / ``_hi``: the bootstrap-t interval over the text chunks; the chance level
  of uniform attention (each query's attention spread over itself and every earlier position) is
  ``info["chance"]``.
- ``previous_token_stability``: the share of bootstrap resamples of the text chunks in which the head's
  score passes ``threshold``.

TransformerLens's ``detect_head(model, text, "previous_token_head")`` (``error_measure="mul"``) divides the
same sum of attentions by the sum of the whole pattern, the start token's row included, so on one sequence
of ``n`` tokens it is ``score * (n - 1) / n``.

Label rule: the claimed heads have ``previous_token_score >= threshold`` (0.4: the same prior as the
induction detector's prefix-matching threshold, a plurality of the head's attention on one designated key,
far above uniform attention's ``info["chance"]``); they are labelled only if their confirmation check is
significant: the claimed heads (at most ``max_k``) mean-ablated together raise the loss on the repeated
half of ``confirm_seqs`` held-out sequences of ``confirm_len`` random tokens repeated twice (another
seed; the induction heads these sequences exercise need the previous token) more than ``n_random`` draws
of as many random heads from the same layers, at ``p <= alpha``. The effect's floor is the loss on the
first occurrence (what the repeated half falls back to without induction). ``info["text_loss"]``: the
same tested heads' ablation on ``text_seqs`` held-out chunks of the corpus (the chunks after the discovery
ones), clean vs ablated next-token loss, beside ``text_draws`` of the check's random draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import HeadlensError
from ..methods import (
    clean_run,
    loss_metric,
    pattern_scores,
    random_token_ids,
    repeated_tokens,
    run_variants,
    text_chunks,
)
from ..results import DetectorResult, head_frame, head_names
from .base import Detector, ReviewParams, top_heads

CONFIRM_SEED = 7919   # the confirmation sequences' seed offset (as the induction detector's)


def previous_token_score(pattern: Float[Tensor, "... query key"]) -> Float[Tensor, "..."]:
    """Per pattern (any leading dims, e.g. ``[batch, n_heads]``: all heads at once), the mean attention
    from each query ``q = 1..n-1`` to key ``q - 1`` (the first query, which can only attend to itself, is
    left out), in float32.

    >>> pattern = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.2, 0.6, 0.2]])
    >>> round(float(previous_token_score(pattern)), 4)       # (0.9 + 0.6) / 2
    0.75
    """
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).float().mean(-1)


def previous_token_chance(n_pos: int) -> float:
    """The score of uniform attention over the causal prefix on ``n_pos``-token sequences: the mean over
    ``q = 1..n_pos-1`` of ``1 / (q + 1)``.

    >>> round(previous_token_chance(3), 4)                   # (1/2 + 1/3) / 2
    0.4167
    """
    return float((1.0 / torch.arange(2, n_pos + 1, dtype=torch.float64)).mean())


class PreviousTokenDetector(Detector):
    name = "previous_token"
    cost = 0.4   # share of a scan (relative; headlens.runtime.distributed.plan)
    summary = "attends from each token to the token just before it (feeds induction heads)"
    paper = ("Olsson et al. 2022, In-context learning and induction heads; Elhage et al. 2021, "
             "A mathematical framework for transformer circuits")
    # attention by position whatever the content: the score on random tokens beside the one on text
    key_columns = ("random",)

    @dataclass
    class Params(ReviewParams):
        corpus: str = "prose.txt"  # natural text (a file in data/ or a path)
        seq_len: int = 128         # corpus tokens per chunk (and random tokens per random sequence)
        n_seqs: int = 8            # discovery: text chunks (and random-token sequences)
        threshold: float = 0.4     # mean attention to the previous token for the label (induction's prior)
        confirm_seqs: int = 4      # confirmation: repeated random sequences (another seed)
        confirm_len: int = 25      # random tokens per repeat of a confirmation sequence (induction's 25)
        confirm_repeats: int = 2   # the loss is read on repeats 2..R
        text_seqs: int = 2         # held-out text chunks for the plain-text loss effect (info; 0 = none)
        text_draws: int = 10       # of the check's random draws, how many are also scored on that text

    def run(self, model, seed: int = 0) -> DetectorResult:
        p = self.params
        if p.n_seqs < 1:
            raise HeadlensError(f"previous_token n_seqs must be at least 1, not {p.n_seqs}")
        if p.seq_len < 2:
            raise HeadlensError(f"previous_token seq_len must be at least 2, not {p.seq_len}")
        chunks = text_chunks(model, p.corpus, p.seq_len, p.n_seqs + p.text_seqs, "previous-token text chunk")
        if len(chunks) < p.n_seqs + min(p.text_seqs, 1):
            raise HeadlensError(f"corpus {p.corpus} has room for {len(chunks)} chunks of {p.seq_len} tokens: "
                                f"none is left for the plain-text loss after the {p.n_seqs} discovery chunks "
                                "(lower n_seqs or seq_len, or set text_seqs=0)")
        text, held = chunks[:p.n_seqs], chunks[p.n_seqs:]
        scorer = lambda pattern, rows: previous_token_score(pattern)              # noqa: E731
        per_seq = pattern_scores(model, text, scorer, "previous-token attention (text)", self.batch_size,
                                 key=(p.corpus,))                                  # [n, L, H]
        start = torch.full((p.n_seqs, 1), model.start_token_id, dtype=torch.long)
        random = torch.cat([start, random_token_ids(model, p.n_seqs, p.seq_len,
                                                    torch.Generator().manual_seed(seed))], 1)
        random_score = pattern_scores(model, random, scorer, "previous-token attention (random tokens)",
                                      self.batch_size).mean(0)
        score = per_seq.mean(0)

        claimed = [(l, h) for l, h in top_heads(score, score.numel()) if score[l, h] >= p.threshold]
        causal = self._confirm(model, claimed, score, seed)
        labelled, reason = self.decide(claimed, causal)
        if not claimed:
            reason = (f"no head puts {p.threshold} of its attention on the previous token of natural text on "
                      "average; the top rows are the best candidates")
        tested = claimed[:p.max_k] if claimed else top_heads(score, p.top_k)
        text_loss = self._text_loss(model, held, tested, causal.random_draws[:p.text_draws])
        stability = self.stability(per_seq, lambda boots: boots >= p.threshold, seed)
        frame = head_frame(model, self.name, score, {
            **self.interval(per_seq, seed, bounds=(0, 1)), "stability": stability, "random": random_score})
        info = {"chance": previous_token_chance(text.shape[1]), "n_tokens": int(text.shape[1]),
                "n_text_tokens": int(text.numel()), "claimed": head_names(claimed), "text_loss": text_loss,
                "start_token": model.info.start_token, "interval_unit": "text chunk",
                "interval_units": int(len(text))}
        return DetectorResult(role=self.name, frame=frame, labelled=labelled, reason=reason, causal=causal,
                              params=self.param_dict(), info=info)

    def _confirm(self, model, claimed, score, seed):
        """The confirmation check on ``confirm_seqs`` fresh random sequences (another seed) of
        ``confirm_repeats`` repeats: the loss on the repeated part, per sequence; floor: the loss on the
        first occurrence (but its first token)."""
        p = self.params
        model.check_length(1 + p.confirm_len * p.confirm_repeats,
                           "previous-token confirmation sequence (1 + confirm_len * confirm_repeats)")
        tokens = repeated_tokens(model, p.confirm_seqs, p.confirm_len, p.confirm_repeats,
                                 seed + CONFIRM_SEED).to(model.device)
        repeated = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
        repeated[:, p.confirm_len:] = True                 # targets inside repeats 2..R
        first = torch.zeros_like(repeated)
        first[:, 1:p.confirm_len] = True                   # targets inside the first occurrence (but its first)
        metric = loss_metric(tokens, repeated, per_prompt=True)
        run = clean_run(model, tokens, positions=metric.positions)
        floor_metric = loss_metric(tokens, first)
        floor = float(clean_run(model, tokens, positions=floor_metric.positions).value(floor_metric))
        return self.confirm(model, claimed, score, seed, "repeated-half loss on held-out repeated random "
                            f"tokens ({p.ablation} ablation; induction reads the previous token)", "higher",
                            floor=floor, run=run, metric=metric)

    def _text_loss(self, model, held, tested, draws) -> dict:
        """The plain-text next-token loss on the held-out chunks: clean, with the ``tested`` heads ablated
        together, and with each of ``draws`` (random head sets of the confirmation check) ablated, in one
        batched :func:`~headlens.methods.run_variants`. Empty without held-out chunks."""
        if not len(held):
            return {}
        p = self.params
        metric = loss_metric(held)
        values = run_variants(model, held, [[], tested] + [[_head(n) for n in d] for d in draws], metric,
                              p.ablation, batch_size=self.batch_size,
                              description="previous-token plain-text loss").float().cpu()
        clean, ablated, rand = float(values[0]), float(values[1]), values[2:]
        return {"metric": f"mean next-token loss on {len(held)} held-out text chunks ({p.ablation} ablation)",
                "heads": head_names(tested), "clean": clean, "ablated": ablated, "rise": ablated - clean,
                "random_rise_mean": float(rand.mean() - clean) if len(rand) else float("nan"),
                "n_random": int(len(rand)), "n_chunks": int(len(held))}


def _head(name: str) -> tuple[int, int]:
    """``"L3H7"`` -> ``(3, 7)``."""
    layer, head = name[1:].split("H")
    return int(layer), int(head)
