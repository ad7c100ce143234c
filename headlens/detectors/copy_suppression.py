"""Copy-suppression heads (McDougall, Conmy, Rushing, McGrath, Nanda 2023, "Copy Suppression:
Comprehensively Understanding an Attention Head"; GPT-2 small L10H7, L11H10).

When a token the model is about to predict already appeared earlier in the context, a copy-suppression
head attends to that earlier token and LOWERS its logit. Columns (``W_EE`` = embedding through block 0
with its attention ablated, normalised as the layer's norm would; tokens = a seeded sample of the
vocabulary, ``n_tokens`` of them, listed in the metadata):

- ``copy_suppression_score``: the signed OV score ``ov_suppress - ov_copy`` in [-1, 1]: positive for
  suppressing heads, negative for copying heads (induction copying, name movers), ~0 otherwise.
- ``copy_suppression_ov_suppress``: in ``W_U^T . W_OV . W_EE``, the fraction of sampled tokens whose own
  logit is among the ``k`` (10) lowest of the whole vocabulary (paper, L10H7: 84.7%);
  ``copy_suppression_ov_copy``: the fraction whose own logit is among the ``k`` highest.
- ``copy_suppression_qk``: in ``W_U^T . W_QK . W_EE`` over the sampled tokens (query = the unembedding of
  the predicted token, key = the effective embedding), the fraction of rows whose diagonal is the row's
  strict maximum (paper, L10H7: 95.7%, over its token set). Positional rotation is ignored.
- Rank columns, on the same rows (the sampled tokens) and the same competitors (the whole vocabulary) for
  OV and QK, so they are comparable and do not hinge on a top-10 cut: ``ov_median_rank`` (median 1-based
  rank of the own logit from the bottom), ``ov_bottom1pct`` (fraction of tokens whose own logit is in the
  lowest ``rank_band`` = 1% of the vocabulary), ``qk_median_rank`` (median rank of the own key from the
  top among every token's key for that query), ``qk_top1pct`` (fraction in the top 1%).
- Behaviour on ``data/prose.txt`` (public-domain prose), at positions where the model's top prediction
  already appears earlier in the context: ``attn_seen`` (the head's attention to those earlier copies),
  ``dla_seen`` (its direct logit attribution to that predicted token; negative = suppression),
  ``neg_share`` (of the head's negative direct effect on the model's top prediction over all positions,
  the share at those positions), and ``cspa`` for the top ``cspa_heads`` heads: the share of the head's
  effect (KL to the clean model, as the paper's CSPA) kept when its output is replaced by its mean plus
  only the copy-suppression part: for each attended source token, the negative component of the head's
  output from it along that token's unembedding. Simplification: the clean attention pattern is kept
  (the paper also restricts the QK side to predicted tokens), so ``cspa`` is an OV-only CSPA.

Label rule (the paper's definition, "for most tokens the own token is among the extreme entries", made
robust to sampling): the 95% Wilson lower bound of ``ov_bottom1pct`` AND of ``qk_top1pct`` above 0.5
(most tokens, with a margin for the sample of ``n_tokens``), and ``dla_seen < 0``. A copying head cannot
pass (its own logit is high). Those are the claimed heads; they are labelled only if their confirmation
check is significant: the claimed heads (at most ``max_k``; none claimed: the top-k by score, for the
evidence) mean-ablated together vs ``n_random`` draws of as many random heads from the same layers, on
``confirm_seqs`` held-out chunks of the corpus (the chunks after the ``n_seqs`` discovery ones), on the
mean log-prob of the model's own top prediction at positions where it repeats an earlier token: ablating
real copy-suppression heads RAISES it (overconfidence), at ``p <= alpha``. Specificity control (in
``info["causal_specificity"]``): the same ablations scored at positions whose prediction is not in the
context, where copy suppression has nothing to suppress. ``copy_suppression_stability``: the share of
bootstrap resamples of the sampled tokens in which both Wilson bounds pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import einsum

from ..errors import HeadlensError
from ..methods import (
    FINAL_SCALE,
    Intervention,
    clean_run,
    pattern_name,
    random_token_ids,
    row_bytes,
    run_variants,
    sweep_heads,
    text_chunks,
    v_name,
    z_name,
)
from ..methods.circuits import effective_embedding, head_dla, layer_weights, normalise, per_query_head
from ..methods.metrics import positioned, summed, token_logprobs
from ..results import DetectorResult, head_frame
from ..runtime import each
from ..runtime.memory import release
from ..runtime.work import plan
from ..stats import wilson_interval
from .base import Detector, ReviewParams, top_heads

PIECE = 1 << 23   # float32 elements of one piece of the weight circuits' logits or scores (32 MB)


def ov_own_ranks(model, tokens: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, H, n]`` ranks of each token's own logit in ``W_U^T W_OV norm(W_EE)`` over the whole vocabulary:
    (from the bottom, from the top), 0 = the extreme; ties count against the token.

    With more tokens than ``d_head``, ``W_O W_U`` (``[H, d_head, vocab]``) is formed once per layer, so
    each token costs a d_head-sized product per head instead of a d_model-sized one. One layer's
    weights at a time are read and upcast (never every layer's: tens of GiB at 70B); ``chunk`` tokens at
    a time (default: about 32 MB of float32 logits, whose comparisons' counts take twice that in int64),
    so the extra memory is a few per-layer matrices.
    Layers are shared among the ranks of a distributed run (:func:`headlens.runtime.each`).
    """
    b = model.bridge
    x = normalise(model, effective_embedding(model, tokens))
    w_u = b.W_U.float()
    chunk = chunk or max(1, min(128, PIECE // (model.n_heads * b.cfg.d_vocab)))
    own = tokens.to(w_u.device)
    factor = len(tokens) > b.cfg.d_head

    buf = torch.empty(model.n_heads * min(chunk, len(tokens)) * b.cfg.d_vocab, device=w_u.device)

    def layer(l: int) -> tuple[torch.Tensor, torch.Tensor]:
        lower = torch.empty(model.n_heads, len(tokens), dtype=torch.long)
        higher = torch.empty_like(lower)
        w_ol = layer_weights(model, "W_O", [l])[0].float()
        ou = einsum(w_ol, w_u, "h e d, d v -> h e v") if factor else None
        v = einsum(x, per_query_head(model, layer_weights(model, "W_V", [l]))[0].float(), "n d, h d e -> h n e")
        for i in range(0, len(tokens), chunk):
            vi = v[:, i:i + chunk]
            logits = _scratch(buf, vi.shape[0], vi.shape[1], w_u.shape[1])
            torch.matmul(vi, ou, out=logits) if factor else torch.matmul(vi @ w_ol, w_u, out=logits)
            mine = logits.gather(-1, own[i:i + chunk].expand(model.n_heads, -1)[..., None])
            above, below = _count_vs(logits, mine)
            lower[:, i:i + chunk] = (logits.shape[-1] - above - 1).cpu()   # others at or below its own
            higher[:, i:i + chunk] = (logits.shape[-1] - below - 1).cpu()
        return lower, higher
    per_layer = each(layer, range(model.n_layers), "OV ranks")
    return torch.stack([lo for lo, _ in per_layer]), torch.stack([hi for _, hi in per_layer])


def _scratch(buf: torch.Tensor, *shape: int) -> torch.Tensor:
    """The start of a flat reusable buffer viewed as ``shape`` (contiguous, no allocation)."""
    return buf[:math.prod(shape)].view(shape)


def _count_vs(x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` ``[..., m]``, how many entries are above and below ``ref`` ``[..., 1]`` (int64),
    computed in place (``x`` is overwritten): the signs of ``x - ref`` summed, and their absolute values
    (float sums of -1/0/1, exact below 2^24 entries). No comparison tensor, no int64 copy of one."""
    signs = x.sub_(ref).sign_()                  # exact: a - b rounds to 0 only when a == b
    net = signs.sum(-1)                          # above - below
    both = signs.abs_().sum(-1)                  # above + below
    return ((both + net) / 2).long(), ((both - net) / 2).long()


def ov_ranks(model, tokens: torch.Tensor, k: int, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, H]`` fractions of ``tokens`` whose own OV logit is among the ``k`` lowest (suppress) / ``k``
    highest (copy) of the whole vocabulary (the paper's OV score)."""
    lower, higher = ov_own_ranks(model, tokens, chunk)
    return (lower < k).float().mean(-1), (higher < k).float().mean(-1)


def _qk_layer(model, query: torch.Tensor, key: torch.Tensor, l: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``l``'s queries ``[H, n, d_head]`` of the (normalised) rows of ``query`` and its keys
    ``[H, m, d_head]`` of the rows of ``key``: one layer's ``W_Q``/``W_K`` read and upcast at a time."""
    q = einsum(query, layer_weights(model, "W_Q", [l])[0].float(), "n d, h d e -> h n e")
    k = einsum(key, per_query_head(model, layer_weights(model, "W_K", [l]))[0].float(), "n d, h d e -> h n e")
    return q, k


def qk_own_ranks(model, tokens: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``[L, H, n]``: for the query ``norm(W_U[:, t])`` of each token t, the rank of t's own key
    ``norm(W_EE[t])`` in ``W_U^T W_QK W_EE`` among the keys of the **whole** vocabulary (0 = the top;
    ties count against the token). Same rows and same competitor set as :func:`ov_own_ranks`.

    The vocabulary's keys go ``chunk`` tokens at a time; they are computed once and kept (float32,
    ``vocab x d_model``) when that fits the working-memory budget, else recomputed for every layer.
    Layers are shared among the ranks of a distributed run."""
    b = model.bridge
    vocab = b.cfg.d_vocab
    w_u = b.W_U
    query = normalise(model, w_u[:, tokens.to(w_u.device)].float().T)
    keys_own = normalise(model, effective_embedding(model, tokens))
    ids = tokens.cpu()
    starts = list(range(0, vocab, chunk))
    keep = plan(vocab * b.cfg.d_model * 4, device=model.device, weights=model.weight_bytes(),
                n_items=2) == 2                                           # keys + room to spare
    kept: dict[int, torch.Tensor] = {}

    def keys(i: int) -> torch.Tensor:
        if i in kept:
            return kept[i]
        k = normalise(model, effective_embedding(model, torch.arange(i, min(i + chunk, vocab))))
        if keep:
            kept[i] = k
        return k

    def layer(l: int) -> torch.Tensor:
        q, k_own = _qk_layer(model, query, keys_own, l)
        own = einsum(q, k_own, "h n e, h n e -> h n")
        w_k = per_query_head(model, layer_weights(model, "W_K", [l]))[0].float()
        above = torch.zeros(model.n_heads, len(tokens), dtype=torch.long)
        step = max(1, PIECE // (model.n_heads * chunk))                   # queries per [H, step, chunk] piece
        buf = torch.empty(model.n_heads * min(step, len(tokens)) * chunk, device=q.device)
        for i in starts:
            stop = min(i + chunk, vocab)
            k = einsum(keys(i), w_k, "m d, h d e -> h m e").transpose(1, 2)   # [H, d_head, m]
            for j in range(0, len(tokens), step):
                sub = ids[j:j + step]
                rows = ((sub >= i) & (sub < stop)).nonzero()[:, 0]        # tokens whose own key is in this chunk
                qj = q[:, j:j + step]
                scores = _scratch(buf, qj.shape[0], qj.shape[1], k.shape[2])
                torch.matmul(qj, k, out=scores)
                scores[:, rows, sub[rows] - i] = float("-inf")               # the own key is not a rival
                higher, lower = _count_vs(scores, own[:, j:j + step, None])
                above[:, j:j + step] += (scores.shape[-1] - lower).cpu()     # rivals at or above its own
        return above
    return torch.stack(each(layer, range(model.n_layers), "QK ranks"))


def qk_diagonal(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[L, H]``: fraction of rows of ``W_U^T W_QK W_EE`` (over ``tokens``) whose diagonal is the strict max."""
    b = model.bridge
    w_u = b.W_U
    query = normalise(model, w_u[:, tokens.to(w_u.device)].float().T)
    key = normalise(model, effective_embedding(model, tokens))
    qk = [_qk_layer(model, query, key, l) for l in range(model.n_layers)]   # one layer's weights at a time
    q, kk = torch.stack([q for q, _ in qk]), torch.stack([k for _, k in qk])
    scores = einsum(q, kk, "l h n e, l h m e -> l h n m")
    diag = scores.diagonal(dim1=-2, dim2=-1)
    others = scores.masked_fill(torch.eye(len(tokens), dtype=torch.bool, device=scores.device), float("-inf"))
    return (diag > others.amax(-1)).float().mean(-1).cpu()


def _attention_to(pattern: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``[H]``: mean over the ``queries`` ``[b, q]`` of each head's attention on ``keys`` ``[b, q, k]``,
    computed where the pattern ``[b, H, q, k]`` is (a layer's GPU, in float32)."""
    got = einsum(pattern.float(), keys.to(pattern.device, torch.float32), "b h q k, b q k -> b q h")
    return got[queries.to(pattern.device)].mean(0).cpu()


def wilson_lower(frac: torch.Tensor, n: int, z: float = 1.96) -> torch.Tensor:
    """Lower end of the Wilson score interval (:func:`headlens.stats.wilson_interval`) of ``frac`` out of ``n``."""
    return wilson_interval(frac, n, z)[0]


def full_logit_rows(model, n_pos: int) -> int:
    """How many prompts of ``n_pos`` tokens one pass may take with their logits at every position, within
    the working-memory budget (the same on every rank): ``[8, 129, 262144]`` in float32 is 1.1 GB."""
    return plan(row_bytes(model, n_pos), device=model.device, weights=model.weight_bytes(),
                strict="copy-suppression text chunks", unit=f"{n_pos}-token sequence on {model.info.name}")


def cached_predictions(model, tokens: torch.Tensor, names: set[str]) -> tuple[torch.Tensor, dict]:
    """One clean pass over ``tokens``: the model's top prediction at every position ``[b, pos]`` and the
    activations ``names``, :func:`full_logit_rows` prompts at a time; only the argmax of the logits is kept."""
    step = full_logit_rows(model, tokens.shape[1])
    preds, caches = [], []
    for i in range(0, len(tokens), step):
        logits, cache = model.bridge.run_with_cache(tokens[i:i + step], names_filter=lambda n: n in names)
        preds.append(logits.argmax(-1).cpu())
        caches.append(cache)
        del logits
    return torch.cat(preds), {n: caches[0][n] if len(caches) == 1 else torch.cat([c[n] for c in caches])
                              for n in names}


def repeated_predictions(tokens: torch.Tensor, pred: torch.Tensor):
    """Where the model's top prediction ``pred`` ``[b, pos]`` already appears earlier (BOS excluded).

    Returns (seen ``[b, pos]`` bool, earlier ``[b, q, k]`` bool: key k holds pred[q]).
    """
    n = tokens.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    causal[:, 0] = False
    earlier = (tokens.cpu()[:, None, :] == pred[:, :, None]) & causal
    return earlier.any(-1), earlier


def repeat_logprob_metric(pred: torch.Tensor, *where: torch.Tensor, per_prompt: bool = False):
    """Mean log-prob of the model's own clean top prediction ``pred`` over the (prompt, position) pairs of
    each bool mask ``[b, pos]`` in ``where`` (e.g. where it repeats an earlier token): a scalar for one
    mask, ``[n]`` for n; with ``per_prompt``, ``[b, n]``: each prompt's mean over its own positions (NaN
    where it has none; then not a sum over prompts).

    It reads the logits only at the positions that some mask counts (``.positions``), so the batched
    sweeps unembed only there; it is a sum over prompts (the batched sweeps may take a few at a time),
    and forms log-probs a few positions at a time (never a float copy of the logits)."""
    read = torch.stack(where).any(0).any(0).nonzero()[:, 0]    # positions any mask counts in any prompt
    target, masks = pred[:, read], [w[:, read] for w in where]
    counts = [m.sum() for m in masks]
    if per_prompt:
        def each(logits: torch.Tensor) -> torch.Tensor:                      # [b, len(read), vocab]
            lp = token_logprobs(logits, target[:len(logits)])                # [b, len(read)]
            return torch.stack([(lp * m.to(lp.device)).sum(1) / m.sum(1).to(lp.device)
                                for m in masks], -1)                          # [b, n] (NaN: 0 / 0)
        return positioned(each, read)

    def share(logits: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:   # [n, len(read), vocab]
        lp = token_logprobs(logits, target[prompts])                          # [n, len(read)]
        values = torch.stack([lp[m[prompts].to(lp.device)].sum() / c for m, c in zip(masks, counts)])
        return values if len(masks) > 1 else values[0]
    return summed(share, read)


def mean_kl(clean_logits: torch.Tensor, count: int | None = None):
    """Metric: KL(clean || ablated) summed over every prompt and position and divided by ``count`` (default
    their number: the mean), a few positions at a time (never a float copy of the whole logits)."""
    step = max(1, (1 << 24) // clean_logits[:, 0].numel())   # positions per float32 chunk (64 MB)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for i in range(0, logits.shape[1], step):
            c = torch.log_softmax(clean_logits[:, i:i + step].float(), -1).to(logits.device)
            a = torch.log_softmax(logits[:, i:i + step].float(), -1)
            total += float((c.exp() * (c - a)).sum())
        return total / (count or logits.shape[:2].numel())
    return metric


class AddToAttnOut(Intervention):
    """Adds ``deltas[layer][variant * n_prompts + prompt]`` to the layer's attention output in the rows
    whose variant touches a head of that layer (the CSPA's mean-ablated and suppression-only outputs)."""
    name = "add_to_attn_out"
    hook = "hook_attn_out"

    def __init__(self, deltas: dict[int, torch.Tensor], n_prompts: int):
        self.deltas, self.n_prompts = deltas, n_prompts

    def select(self, mask, x):
        return mask.to(x.device).any(-1, keepdim=True)

    def forward(self, x, site):
        return x + self.deltas[site.layer][site.variants * self.n_prompts + site.prompts].to(x.device, x.dtype)

    def key(self):
        return (self.name, self.n_prompts, *(self.deltas[l] for l in sorted(self.deltas)))


class CopySuppressionDetector(Detector):
    name = "copy_suppression"
    cost = 0.6   # share of a scan (relative; headlens.runtime.distributed.plan)
    summary = "attends to an earlier token the model is about to predict and lowers its logit"
    paper = "McDougall, Conmy, Rushing, McGrath, Nanda 2023, Copy Suppression"
    key_columns = ("ov_bottom1pct", "qk_top1pct")   # the two fractions the label rule bounds

    @dataclass
    class Params(ReviewParams):
        k: int = 10                  # own logit among the k most suppressed (paper: 10)
        n_tokens: int = 200          # sampled tokens for the OV and QK circuits
        rank_band: float = 0.01      # rank columns: share of the vocabulary counted as extreme (1%)
        majority: float = 0.5        # label: the Wilson lower bound of both band fractions exceeds this
        z: float = 1.96              # Wilson interval's normal quantile (95%)
        corpus: str = "prose.txt"    # natural text (file in data/ or a path)
        seq_len: int = 128           # tokens per text chunk
        n_seqs: int = 8              # text chunks for the behavioural evidence
        cspa_heads: int = 3          # top heads that get the CSPA-like ablation
        cspa_seqs: int = 4           # text chunks used by the CSPA-like ablation
        top_k: int = 3               # causal check: top-k heads vs k random heads
        effect_heads: int = 10       # top heads that get direct vs total effect (NaN elsewhere)
        causal_seqs: int = 3         # discovery chunks for the per-head total/direct effects
        confirm_seqs: int = 3        # confirmation: the corpus's next chunks, after the discovery ones

    def run(self, model, seed: int = 0) -> DetectorResult:
        p = self.params
        chunks = text_chunks(model, p.corpus, p.seq_len, p.n_seqs + p.confirm_seqs,
                             "copy-suppression text chunk").to(model.device)
        if len(chunks) <= p.n_seqs:
            raise HeadlensError(f"corpus {p.corpus} has room for {len(chunks)} chunks of {p.seq_len} tokens: "
                                f"none is left for confirmation after the {p.n_seqs} discovery chunks")
        tokens, confirm = chunks[:p.n_seqs], chunks[p.n_seqs:]
        sample = random_token_ids(model, 1, p.n_tokens, torch.Generator().manual_seed(seed))[0].unique()
        lower, higher = ov_own_ranks(model, sample)                            # [L, H, n_tokens]
        suppress_tok, copy_tok = (lower < p.k).float(), (higher < p.k).float()
        suppress, copy = suppress_tok.mean(-1), copy_tok.mean(-1)
        qk = qk_diagonal(model, sample)
        qk_rank = qk_own_ranks(model, sample)
        band = p.rank_band * model.bridge.cfg.d_vocab                  # the extreme 1% of the vocabulary
        ov_band, qk_band = (lower < band).float().mean(-1), (qk_rank < band).float().mean(-1)
        ov_median = lower.float().median(-1).values + 1                  # 1-based ranks
        qk_median = qk_rank.float().median(-1).values + 1
        score = suppress - copy

        names = {name(l) for l in range(model.n_layers) for name in (z_name, pattern_name, v_name)}
        names.add(FINAL_SCALE)
        release()   # the weight circuits' many medium temporaries, freed but kept by the C allocator
        pred, cache = cached_predictions(model, tokens, names)
        seen, earlier = repeated_predictions(tokens, pred)
        if not seen.any():
            return self.not_applicable(model, "the model never predicts a token already in the context "
                                       "of the corpus, so copy suppression cannot act")
        attn_seen = torch.stack([_attention_to(cache[pattern_name(l)], earlier, seen)
                                 for l in range(model.n_layers)])
        rows, pos = torch.meshgrid(torch.arange(tokens.shape[0]), torch.arange(tokens.shape[1]), indexing="ij")
        rows, pos = rows.flatten(), pos.flatten()
        w_u = model.bridge.W_U
        dla = head_dla(model, cache, rows, pos, w_u[:, pred.flatten().to(w_u.device)].float().T)   # [L, H, b*pos]
        is_seen = seen.flatten()
        dla_seen = dla[..., is_seen].mean(-1)
        neg = dla.clamp(max=0)
        neg_share = neg[..., is_seen].sum(-1) / neg.sum(-1).clamp(max=-1e-9)

        top = top_heads(score, max(p.top_k, p.cspa_heads))
        cspa = torch.full_like(score, float("nan"))
        n = min(p.cspa_seqs, len(tokens))
        # CSPA reads only its heads' layers of the first n prompts: keep those, free the rest first
        kept = {k: cache[k][:n].clone() for l, _ in top[:p.cspa_heads]
                for k in (z_name(l), v_name(l), pattern_name(l))}
        del cache
        release()
        for (l, h), v in zip(top[:p.cspa_heads], self._cspa(model, tokens[:n], kept, top[:p.cspa_heads])):
            cspa[l, h] = v
        del kept
        n = len(sample)
        ov_lo, qk_lo = wilson_lower(ov_band, n, p.z), wilson_lower(qk_band, n, p.z)
        claimed = [(l, h) for l, h in top_heads(score, score.numel()) if ov_lo[l, h] > p.majority
                   and qk_lo[l, h] > p.majority and dla_seen[l, h] < 0]
        causal, control = self._confirm(model, confirm, claimed, score, seed)
        labelled, reason = self.decide(claimed, causal)
        effects = self._effects(model, tokens[:p.causal_seqs], score)
        bands = torch.stack([lower < band, qk_rank < band]).float().permute(3, 0, 1, 2)   # [n, 2, L, H]
        stability = self.stability(bands, lambda b: (wilson_lower(b[:, 0], n, p.z) > p.majority)
                                   & (wilson_lower(b[:, 1], n, p.z) > p.majority), seed)
        frame = head_frame(model, self.name, score, {
            **self.interval((suppress_tok - copy_tok).permute(2, 0, 1), seed, bounds=(-1, 1)),
            "stability": stability,
            "ov_suppress": suppress, "ov_copy": copy, "qk": qk,
            "ov_median_rank": ov_median, "ov_bottom1pct": ov_band,
            "qk_median_rank": qk_median, "qk_top1pct": qk_band,
            "attn_seen": attn_seen, "dla_seen": dla_seen, "neg_share": neg_share, "cspa": cspa, **effects})
        if not claimed:
            reason = (
            f"no head has most sampled tokens (95% Wilson lower bound > {p.majority}) in the extreme "
            f"{p.rank_band:.0%} of the vocabulary for both OV (own logit lowest) and QK (own key highest), "
            "with a negative attribution on repeated predictions; the top rows are the best candidates")
        info = {"n_tokens_sampled": int(len(sample)), "sampled_token_ids": sample.tolist(),
                "vocab_size": int(model.bridge.cfg.d_vocab), "rank_band_tokens": int(band),
                "n_text_tokens": int(tokens.numel()), "n_repeat_positions": int(seen.sum()),
                "clean_repeat_share": float(seen.float().mean()), "start_token": model.info.start_token,
                "claimed": [f"L{l}H{h}" for l, h in claimed], "n_confirmation_chunks": int(len(confirm)),
                "causal_specificity": control, "interval_unit": "sampled token", "interval_units": int(len(sample))}
        return DetectorResult(role=self.name, frame=frame, labelled=labelled, reason=reason,
                              causal=causal, params=self.param_dict(), info=info)

    def _cspa(self, model, tokens, cache, heads) -> list[float]:
        """Per head: 1 - KL(clean || CSPA-like) / KL(clean || mean-ablated), all heads batched through
        :func:`~headlens.methods.run_variants` (each chunk resumed at the first layer it touches), over
        :func:`full_logit_rows` prompts at a time, each group with its own clean run whose logits the KL
        reads (a prompt's are 135 MB in float32 at a 262k vocabulary)."""
        if not heads:
            return []
        b = model.bridge
        n_b, n_pos = tokens.shape
        layers = sorted({l for l, _ in heads})
        w_u = b.W_U
        u = w_u[:, tokens.flatten().to(w_u.device)].float().T
        u = (u / u.norm(dim=-1, keepdim=True).clamp_min(1e-9)).view(n_b, n_pos, -1)      # [b, k, d]
        deltas = {l: torch.zeros(2 * len(heads) * n_b, n_pos, b.cfg.d_model) for l in layers}
        w_o_all = b.W_O
        for i, (l, h) in enumerate(heads):
            z = cache[z_name(l)][:n_b, :, h].float().to(u.device)          # [b, q, dh]
            w_o = w_o_all[l, h].float().to(u.device)
            out = z @ w_o                                                                    # [b, q, d]
            mean = out[:, 1:].mean((0, 1), keepdim=True)                                   # start token left out
            v = cache[v_name(l)][:n_b, :, model.kv_head(h)].float().to(u.device)  # [b, k, dh]
            coef = einsum(v @ w_o, u, "b k d, b k d -> b k").clamp(max=0)                   # suppression only
            attn = cache[pattern_name(l)][:n_b, h].float().to(u.device)      # [b, q, k]
            kept = einsum(attn, coef[..., None] * u, "b q k, b k d -> b q d")
            deltas[l][2 * i * n_b:(2 * i + 1) * n_b] = (mean - out).cpu()                  # mean ablation
            deltas[l][(2 * i + 1) * n_b:(2 * i + 2) * n_b] = (mean + kept - out).cpu()     # CSPA-like
            # as MeanAblation's default: the start position (0; these chunks are unpadded) keeps its output
            deltas[l][2 * i * n_b:(2 * i + 2) * n_b, 0] = 0

        # Variant 2i mean-ablates head i, 2i+1 gives it the CSPA-like output: one batched run_variants
        # per group of prompts (deltas row variant * n_b + prompt); each adds its part of the mean KL.
        step = full_logit_rows(model, n_pos)
        kls = 0
        for j in range(0, n_b, step):
            run = clean_run(model, tokens[j:j + step], keep_z=False)
            n = len(run.tokens)
            part = {l: d.view(-1, n_b, n_pos, d.shape[-1])[:, j:j + n].flatten(0, 1) for l, d in deltas.items()}
            kls = kls + run_variants(model, run.tokens, [[hd] for hd in heads for _ in range(2)],
                                     mean_kl(run.logits, n_b * n_pos), AddToAttnOut(part, n), run=run,
                                     batch_size=self.batch_size, description="CSPA ablations")
            del run
        kls = kls.tolist()
        return [1 - kls[2 * i + 1] / kls[2 * i] if kls[2 * i] > 0 else float("nan") for i in range(len(heads))]

    def _confirm(self, model, tokens, claimed, score, seed) -> tuple:
        """The confirmation check on held-out text chunks: per chunk, the mean log-prob of the model's top
        prediction where it repeats an earlier token (copy suppression lowers it, so ablation raises it),
        the claimed heads (else the best candidates) vs layer-matched random heads; and the specificity
        control: the same ablations scored at positions whose prediction is NOT in the context (copy
        suppression has nothing to act on there, so a specific effect changes that log-prob little).
        No floor: the metric has no level that means "no copy suppression", so the effect is NaN and
        ``z`` is the scale to compare with other roles."""
        p = self.params
        run = clean_run(model, tokens)
        pred = run.logits.argmax(-1).cpu()
        seen, _ = repeated_predictions(tokens, pred)
        unseen = ~seen
        unseen[:, 0] = False                                                 # the start position
        both = repeat_logprob_metric(pred, seen, unseen, per_prompt=True)
        check = self.confirm(
            model, claimed, score, seed, "mean log-prob of the model's top prediction where it repeats an "
            f"earlier token, on held-out text ({p.ablation} ablation; copy suppression lowers it, so "
            "ablation raises it)", "higher", run=run, metric=both)
        values = check.raw.nanmean(1)                                        # [variants, 2]
        rise_on = float(values[1, 0] - values[0, 0])
        rise_off = float(values[1, 1] - values[0, 1])
        control = {"metric": "the same mean log-prob at positions whose top prediction is not in the context",
                   "n_positions": int(unseen.sum()), "n_repeat_positions": int(seen.sum()),
                   "clean": float(values[0, 1]), "top_k_ablated": float(values[1, 1]),
                   "random_k_ablated_mean": float(values[2:, 1].mean()),
                   "top_k_change_repeat": rise_on, "top_k_change_control": rise_off,
                   "specificity": rise_on / (abs(rise_on) + abs(rise_off)) if rise_on or rise_off else float("nan")}
        return check, control

    def _effects(self, model, tokens, score) -> dict[str, torch.Tensor]:
        """On discovery chunks: the direct vs total effect of the ``effect_heads`` top heads on the repeat
        log-prob (signed so that positive = ablation raises it, as for suppression)."""
        p = self.params
        run = clean_run(model, tokens)
        pred = run.logits.argmax(-1).cpu()
        seen, _ = repeated_predictions(tokens, pred)
        on = repeat_logprob_metric(pred, seen)
        clean = float(run.value(on))
        heads = top_heads(score, p.effect_heads)
        # `on` reads the repeat positions only: the planner sizes the chunks by the logits there
        total = sweep_heads(model, run.tokens, on, p.ablation, heads=heads, batch_size=self.batch_size, run=run)
        total = total - clean
        direct = self.direct_and_self_repair(model, run, on, total, "higher", clean, heads=heads)
        return {"total": total, **direct}
