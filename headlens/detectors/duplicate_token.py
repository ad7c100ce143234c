"""Duplicate-token heads (Wang, Variengien, Conmy, Shlegeris, Steinhardt 2023, "Interpretability in the
Wild: a circuit for indirect object identification in GPT-2 small"; TransformerLens ``head_detector``'s
``duplicate_token_head``).

A duplicate-token head attends from a token to the earlier occurrences of the same token, and so tells
later heads that the current token is a repeat and where its first copy was (in IOI: the repeated subject,
read by the S-inhibition heads). Columns, on ``n_seqs`` sequences of ``seq_len`` random tokens (the
model's start token first) in which ``n_dups`` positions per sequence repeat an earlier token at a seeded
random offset of at least ``min_gap`` (so the copy is never the previous token; :func:`duplicate_sequences`):

- ``duplicate_token_score``: mean, over the query positions whose token occurred earlier in the sequence
  (every repeat, planted or by chance), of the attention paid to all earlier copies of that token
  (TransformerLens's duplicate pattern: every earlier copy, the current position and the start token left
  out; :func:`duplicate_token_score`), averaged over the sequences.
- ``duplicate_token_after_copy``: on the same queries, the attention paid to the positions right after the
  earlier copies (an induction head's target): high there and low on the score = an induction head, not a
  duplicate-token head.
- ``duplicate_token_score_lo`` / ``_hi``: the bootstrap-t interval over the sequences; the chance level of
  uniform attention (its share on the earlier copies, ``copies / (q + 1)`` per query) is ``info["chance"]``.
- ``duplicate_token_stability``: the share of bootstrap resamples of the sequences in which the head's
  score passes ``threshold``.

TransformerLens's ``detect_head(model, text, "duplicate_token_head")`` (``error_measure="mul"``) divides the
same sum by the sum of the whole pattern, every query's row included, so on one sequence of ``n`` tokens
of which ``m`` repeat an earlier one it is ``score * m / n``.

Label rule: the claimed heads have ``duplicate_token_score >= threshold`` (0.4: the same prior as the
induction detector's prefix-matching threshold); they are labelled only if their confirmation check is
significant. Confirmation (held-out sequences, another seed; :func:`bigram_sequences`): ``confirm_seqs``
sequences of ``confirm_len`` random tokens in which ``confirm_pairs`` bigrams ``(a, b)`` each appear twice
at random offsets; the metric is the loss of predicting ``b`` at the second ``a`` (the position right
after the repeated token, where the model can use the repeat), per sequence. The claimed heads (at most
``max_k``) mean-ablated together must raise it more than ``n_random`` draws of as many random heads from
the same layers, at ``p <= alpha``. The effect's floor is the loss of predicting ``b`` at the first ``a``
(nothing to repeat there). Duplicate-token heads act on this metric only through later heads that use
the repeat signal (induction heads by Q-composition, the position of the earlier copy); a model whose
duplicate-token heads feed only other computations (IOI's S-inhibition) fails this check and gets no
label: the top rows are then the candidates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import HeadlensError
from ..methods import clean_run, loss_metric, pattern_scores, random_token_ids
from ..results import DetectorResult, head_frame, head_names
from .base import Detector, ReviewParams, top_heads

CONFIRM_SEED = 7919   # the confirmation sequences' seed offset (as the induction detector's)


def duplicate_masks(tokens: Int[Tensor, "batch pos"]) -> tuple[Bool[Tensor, "batch query key"],
                                                             Bool[Tensor, "batch query key"],
                                                             Bool[Tensor, "batch query"]]:
    """Boolean masks for sequences whose position 0 is the start token (never counted as content):
    ``copy`` ``[b, q, k]`` (``k < q`` holds the token of ``q``), ``after_copy`` ``[b, q, k]`` (``k - 1`` is
    such a copy and ``k <= q``), and ``queries`` ``[b, q]`` (the positions with at least one earlier copy).

    >>> copy, after, queries = duplicate_masks(torch.tensor([[0, 5, 6, 5, 5]]))
    >>> copy[0, 4].nonzero().flatten().tolist(), after[0, 4].nonzero().flatten().tolist()
    ([1, 3], [2, 4])
    >>> queries[0].tolist()
    [False, False, False, True, True]
    """
    tokens = tokens.cpu()
    n = tokens.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)
    copy = (tokens[:, :, None] == tokens[:, None, :]) & earlier
    copy[:, :, 0] = False
    copy[:, 0, :] = False
    after = torch.zeros_like(copy)
    after[:, :, 1:] = copy[:, :, :-1] & (torch.arange(1, n)[None, :] <= torch.arange(n)[:, None])
    return copy, after, copy.any(-1)


def duplicate_token_score(pattern: Float[Tensor, "batch head query key"], copy: Bool[Tensor, "batch query key"],
                          queries: Bool[Tensor, "batch query"]) -> Float[Tensor, "batch head"]:
    """Per sequence and head (all heads at once), the mean over the ``queries`` of the attention paid to
    the keys of ``copy`` (:func:`duplicate_masks`), in float32; NaN for a sequence without queries.

    >>> pattern = torch.tensor([[[[1.0, 0, 0], [0.5, 0.5, 0], [0.1, 0.7, 0.2]]]])    # [1, 1, 3, 3]
    >>> copy, _, queries = duplicate_masks(torch.tensor([[0, 4, 4]]))
    >>> round(float(duplicate_token_score(pattern, copy, queries)), 4)            # query 2 -> key 1
    0.7
    """
    dev = pattern.device
    per_query = einsum(pattern.float(), copy.to(dev, torch.float32), "b h q k, b q k -> b h q")
    w = queries.to(dev, torch.float32)
    return (per_query * w[:, None]).sum(-1) / w.sum(-1)[:, None]


def duplicate_chance(copy: Bool[Tensor, "batch query key"], queries: Bool[Tensor, "batch query"]) -> float:
    """Uniform attention's score (a query ``q`` spreads over its ``q + 1`` causal keys, so it puts
    ``copies / (q + 1)`` on the earlier copies), averaged as :func:`duplicate_token_score` averages."""
    n = copy.shape[1]
    share = copy.sum(-1).double() / torch.arange(1, n + 1, dtype=torch.float64)        # [b, q]
    w = queries.double()
    return float(((share * w).sum(-1) / w.sum(-1)).mean())


def duplicate_sequences(model, n_seqs: int, seq_len: int, n_dups: int, min_gap: int,
                        seed: int) -> Int[Tensor, "n_seqs pos"]:
    """``[n_seqs, 1 + seq_len]``: the start token, then random tokens of which ``n_dups`` positions per
    sequence (seeded, distinct, at least ``min_gap`` into the sequence) repeat the token of a random earlier
    position at least ``min_gap`` back."""
    if min_gap < 1 or not 1 <= n_dups <= seq_len - min_gap:
        raise HeadlensError(f"duplicate_token needs min_gap >= 1 and 1 <= n_dups <= seq_len - min_gap "
                            f"(seq_len={seq_len}, n_dups={n_dups}, min_gap={min_gap})")
    g = torch.Generator().manual_seed(seed)
    seq = random_token_ids(model, n_seqs, seq_len, g)
    for i in range(n_seqs):
        for q in sorted((min_gap + torch.randperm(seq_len - min_gap, generator=g)[:n_dups]).tolist()):
            src = int(torch.randint(0, q - min_gap + 1, (1,), generator=g))
            seq[i, q] = seq[i, src]
    start = torch.full((n_seqs, 1), model.start_token_id, dtype=torch.long)
    return torch.cat([start, seq], 1)


def bigram_sequences(model, n_seqs: int, seq_len: int, n_pairs: int,
                     seed: int) -> tuple[Int[Tensor, "n_seqs pos"], Int[Tensor, "n_seqs n_pairs"],
                                         Int[Tensor, "n_seqs n_pairs"]]:
    """The confirmation sequences: ``tokens`` ``[n_seqs, 1 + seq_len]`` (the start token, then random
    tokens) in which ``n_pairs`` bigrams ``(a, b)`` each appear twice, and the positions of each first and
    second ``a`` (``[n_seqs, n_pairs]``, indices into ``tokens``). The first half of the random part holds
    the first occurrences, one per block of ``seq_len // 2 // n_pairs`` tokens, the second half the second
    ones in a seeded order, each at a seeded offset inside its block."""
    half = seq_len // 2
    width = half // max(n_pairs, 1)
    if n_pairs < 1 or width < 3:
        raise HeadlensError(f"duplicate_token confirmation needs confirm_pairs >= 1 and confirm_len >= "
                            f"6 * confirm_pairs (confirm_len={seq_len}, confirm_pairs={n_pairs})")
    g = torch.Generator().manual_seed(seed)
    seq = random_token_ids(model, n_seqs, seq_len, g)
    first = torch.empty(n_seqs, n_pairs, dtype=torch.long)
    second = torch.empty_like(first)
    for i in range(n_seqs):
        order = torch.randperm(n_pairs, generator=g)
        for j in range(n_pairs):
            a = j * width + int(torch.randint(0, width - 1, (1,), generator=g))
            b = half + int(order[j]) * width + int(torch.randint(0, width - 1, (1,), generator=g))
            seq[i, b:b + 2] = seq[i, a:a + 2]
            first[i, j], second[i, j] = a + 1, b + 1          # + 1: the start token comes first
    start = torch.full((n_seqs, 1), model.start_token_id, dtype=torch.long)
    return torch.cat([start, seq], 1), first, second


class DuplicateTokenDetector(Detector):
    name = "duplicate_token"
    cost = 0.4   # share of a scan (relative; headlens.runtime.distributed.plan)
    summary = "attends from a token to the earlier occurrences of the same token"
    paper = ("Wang et al. 2023, Interpretability in the Wild: a circuit for indirect object identification "
             "in GPT-2 small")
    # an induction head attends just after the copies: the column that tells the two apart
    key_columns = ("after_copy",)

    @dataclass
    class Params(ReviewParams):
        seq_len: int = 64          # random tokens per discovery sequence
        n_seqs: int = 10           # discovery sequences
        n_dups: int = 8            # positions per sequence that repeat an earlier token
        min_gap: int = 2           # a planted copy lies at least this far back (never the previous token)
        threshold: float = 0.4     # mean attention to the earlier copies for the label (induction's prior)
        confirm_seqs: int = 4      # confirmation: held-out bigram sequences (another seed)
        confirm_len: int = 48      # random tokens per confirmation sequence
        confirm_pairs: int = 4     # bigrams (a, b) per confirmation sequence, each appearing twice

    def run(self, model, seed: int = 0) -> DetectorResult:
        p = self.params
        if p.n_seqs < 1:
            raise HeadlensError(f"duplicate_token n_seqs must be at least 1, not {p.n_seqs}")
        model.check_length(1 + p.seq_len, "duplicate-token sequence (1 + seq_len)")
        tokens = duplicate_sequences(model, p.n_seqs, p.seq_len, p.n_dups, p.min_gap, seed)
        copy, after, queries = duplicate_masks(tokens)

        def scorer(pattern, rows):                               # [b, H, 2]: copies, just after them
            return torch.stack([duplicate_token_score(pattern, copy[rows], queries[rows]),
                                duplicate_token_score(pattern, after[rows], queries[rows])], -1)
        both = pattern_scores(model, tokens, scorer, "duplicate-token attention", self.batch_size,
                              key=(p.min_gap,))                  # [n, L, H, 2]
        per_seq = both[..., 0]
        score, after_copy = per_seq.mean(0), both[..., 1].mean(0)

        claimed = [(l, h) for l, h in top_heads(score, score.numel()) if score[l, h] >= p.threshold]
        causal = self._confirm(model, claimed, score, seed)
        labelled, reason = self.decide(claimed, causal)
        if not claimed:
            reason = (f"no head puts {p.threshold} of its attention on the earlier copies of a repeated token "
                      "on average; the top rows are the best candidates")
        stability = self.stability(per_seq, lambda boots: boots >= p.threshold, seed)
        frame = head_frame(model, self.name, score, {
            **self.interval(per_seq, seed, bounds=(0, 1)), "stability": stability, "after_copy": after_copy})
        info = {"chance": duplicate_chance(copy, queries), "n_tokens": int(tokens.shape[1]),
                "n_queries": int(queries.sum()), "claimed": head_names(claimed),
                "start_token": model.info.start_token, "interval_unit": "sequence",
                "interval_units": int(len(tokens))}
        return DetectorResult(role=self.name, frame=frame, labelled=labelled, reason=reason, causal=causal,
                              params=self.param_dict(), info=info)

    def _confirm(self, model, claimed, score, seed):
        """The confirmation check on ``confirm_seqs`` held-out bigram sequences (another seed): per sequence,
        the mean loss of predicting ``b`` at the second ``a``; floor: the same at the first ``a``."""
        p = self.params
        model.check_length(1 + p.confirm_len, "duplicate-token confirmation sequence (1 + confirm_len)")
        tokens, first, second = bigram_sequences(model, p.confirm_seqs, p.confirm_len, p.confirm_pairs,
                                                 seed + CONFIRM_SEED)
        tokens = tokens.to(model.device)
        rows = torch.arange(len(tokens))[:, None]
        at_second = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
        at_second[rows, second] = True                     # the position of the second a predicts b
        at_first = torch.zeros_like(at_second)
        at_first[rows, first] = True
        metric = loss_metric(tokens, at_second, per_prompt=True)
        run = clean_run(model, tokens, positions=metric.positions)
        floor_metric = loss_metric(tokens, at_first)
        floor = float(clean_run(model, tokens, positions=floor_metric.positions).value(floor_metric))
        return self.confirm(model, claimed, score, seed, "loss of the token after a repeated token (b at the "
                            f"second a of a repeated bigram) on held-out sequences ({p.ablation} ablation)",
                            "higher", floor=floor, run=run, metric=metric)
