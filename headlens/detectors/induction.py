"""Induction heads (Olsson et al. 2022, "In-context learning and induction heads"; Elhage et al. 2021).

On sequences of random tokens repeated several times (BOS first), an induction head at a token of a
repeat attends to the position just *after* the earlier copy of that token (prefix matching) and raises
the logit of the token it attends to (copying). Columns:

- ``induction_score`` = prefix-matching score: mean attention, over every position of repeats 2..R,
  to the positions right after earlier occurrences of the current token.
- ``induction_copying``: direct copying on a 0-1 scale: the head's OV output for the token it should
  attend to (the value vector at the position after the earlier copy, through W_O, the final norm's
  scale and W_U; attention left out), and the rank of that token among the whole vocabulary's logits;
  ``copying = 1 - median rank / vocabulary`` over sampled positions of the last repeat. 1 = the token
  comes first, 0.5 = chance (a random token's median rank is half the vocabulary), below 0.5 =
  anti-copying. ``induction_copying_top1pct``: the share of samples where the token is in the top 1% of
  the vocabulary (chance 0.01). ``induction_copying_q``: the Benjamini-Hochberg q-value (over all heads)
  of a one-sided sign test that the token ranks in the top half more often than chance.
- ``induction_ov_eigen``: weight-only copying proxy, sum(lambda) / sum(|lambda|) of the full OV circuit
  W_EE W_V W_O W_U (positive = copying; W_EE = the effective embedding, block 0 without attention).
- ``induction_prev_token``: mean attention to the previous position; ``induction_duplicate_token``: mean
  attention to earlier copies of the current token (the other two heads of the circuit).
- ``induction_loss_rise``: causal evidence: rise in mean loss on the repeated part (of the first
  ``sweep_repeats`` repeats of ``causal_seqs`` discovery sequences) when that head alone is ablated (mean
  ablation by default), for all heads in batched forward passes.
- ``induction_direct`` / ``induction_compensation`` / ``induction_self_repair``: the same ablation along
  the head's direct path to the logits only, ``direct - loss_rise``, and ``1 - loss_rise / direct`` where
  that is a share (:func:`~headlens.detectors.base.self_repair`: same signs, ``|direct|`` above both
  floors; NaN otherwise), for the ``effect_heads`` top heads by score and the ``effect_heads`` with the
  largest loss rise (NaN elsewhere).
- ``induction_stability``: the share of bootstrap resamples of the sequences in which the head's prefix
  score passes the threshold.

Discovery and confirmation: heads are scored on ``n_seqs`` sequences of ``n_repeats`` repeats; the
confirmation check runs on ``confirm_seqs`` *other* random sequences (another seed) of ``confirm_repeats``
repeats.

Label rule: the claimed heads are those with ``induction_score >= threshold`` (0.4, prefix matching) and
``induction_copying_q <= alpha`` (they copy directly, better than chance); they are labelled only if
their confirmation check is significant: the claimed heads (at most ``max_k``) mean-ablated together
raise the loss on the repeated part of the confirmation sequences more than ``n_random`` draws of as
many random heads from the same layers, at ``p <= alpha``. The effect's floor is the loss on the first
(unrepeated) occurrence of the tokens: removing induction entirely would bring the repeated part there.
What the label claims: prefix matching on repeated random tokens, direct copying better than chance
through the head's own path to the unembedding, and a held-out causal role of the claimed heads as a
set. A mid-depth head whose output is read by later heads (rather than the unembedding) can copy
indirectly and still fail the direct-copying test: its ``copying`` column says how far it is from chance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum

from ..methods import FINAL_SCALE, clean_run, logits_at, loss_metric, pattern_name, repeated_tokens, sweep_heads, v_name
from ..methods.circuits import layer_weights, per_query_head, unembed_times_embedding
from ..results import DetectorResult, head_frame
from ..runtime import each
from ..stats import bh_qvalues, binomial_sf
from .base import Detector, ReviewParams, effect_heads, top_heads


def induction_masks(tokens: torch.Tensor, first_repeat_end: int):
    """Boolean ``[batch, q, k]`` masks: ``after_copy`` (k-1 is an earlier copy of token q),
    ``copy`` (k is an earlier copy of token q), and the query positions that count (repeats 2..R)."""
    same = tokens[:, :, None] == tokens[:, None, :]                       # [b, q, k]
    n = tokens.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)                  # k < q
    copy = same & earlier
    after_copy = torch.zeros_like(copy)
    after_copy[:, :, 1:] = copy[:, :, :-1] & (torch.arange(1, n)[None, :] <= torch.arange(n)[:, None])
    queries = torch.zeros(n, dtype=torch.bool)
    queries[first_repeat_end:] = True
    return after_copy, copy, queries


def ov_eigen_ratio(model) -> torch.Tensor:
    """``[n_layers, n_heads]``: sum(lambda)/sum(|lambda|) of W_EE W_V W_O W_U, via the d_head x d_head
    matrix W_O (W_U W_EE) W_V that has the same non-zero eigenvalues. ``W_EE`` is the effective embedding
    (block 0 with its attention ablated, normalised as the heads' norm would), which equals W_E in the
    attention-only models of Olsson et al. and is what later heads actually read when block 0 has an MLP."""
    ue = unembed_times_embedding(model)                                     # [d, d]

    def layer(l: int) -> torch.Tensor:
        """One layer's ratios ``[H]``: its weights alone are upcast (all layers at once are tens of GiB
        at 70B), and the eigenvalues (on the CPU, whatever the model's device) are shared among ranks."""
        w_v = per_query_head(model, layer_weights(model, "W_V", [l], ue.device).float())   # [1, H, d, dh]
        w_o = layer_weights(model, "W_O", [l], ue.device).float()
        m = einsum(w_o, ue, w_v, "l h e d1, d1 d2, l h d2 f -> l h e f")
        lam = eigvals_cpu(m[0])
        return lam.sum(-1).real / lam.abs().sum(-1).clamp_min(1e-12)
    return torch.stack(each(layer, range(model.n_layers), "OV eigenvalues"))


def eigvals_cpu(m: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a stack of small square matrices ``[n, d, d]`` on the CPU: LAPACK on one thread per
    matrix (CUDA's eigvals of small matrices is slow, and so is multithreaded LAPACK on them), the
    matrices spread over threads, one per core of this process's share
    of the host (LAPACK releases the GIL). Each matrix is computed as if alone, so the result does not
    depend on the split."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    m = m.cpu()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(len(m), 16, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    threads = torch.get_num_threads()

    def part(rows: torch.Tensor) -> torch.Tensor:
        torch.set_num_threads(1)                 # this thread's LAPACK: one thread
        return torch.linalg.eigvals(rows)
    try:
        if workers == 1:
            return part(m)
        with ThreadPoolExecutor(workers) as pool:
            return torch.cat(list(pool.map(part, m.tensor_split(workers))))
    finally:
        torch.set_num_threads(threads)


class InductionDetector(Detector):
    name = "induction"
    cost = 1.0   # share of a scan (relative; headlens.runtime.distributed.plan)
    summary = ("attends to the token after an earlier copy of the current token and copies it "
               "(prefix matching + copying)")
    paper = "Olsson et al. 2022, In-context learning and induction heads"
    # the label's copying condition (the copying share is unreadable without its chance level) and the
    # causal evidence
    key_columns = ("copying", "loss_rise")

    @dataclass
    class Params(ReviewParams):
        seq_len: int = 25          # random tokens per repeat (paper: 25)
        n_repeats: int = 4         # paper: 4
        n_seqs: int = 10           # random sequences averaged (paper: 10): discovery
        threshold: float = 0.4     # prefix-matching score for the label
        copy_positions: int = 4    # sampled positions per sequence for the copying score
        causal_seqs: int = 4       # discovery sequences used by the all-heads ablation sweep
        sweep_repeats: int = 2     # their first repeats the sweep runs on (the loss is read on repeats 2..)
        confirm_seqs: int = 4      # confirmation: other random sequences for the confirmation check
        confirm_repeats: int = 2   # repeats of a confirmation sequence (the loss is read on the second)
        effect_heads: int = 20     # top heads by score and by |total effect| given direct effects (0 = all)

    def run(self, model, seed: int = 0) -> DetectorResult:
        p = self.params
        model.check_length(1 + p.seq_len * p.n_repeats, "induction prompt (1 + seq_len * n_repeats)")
        tokens = repeated_tokens(model, p.n_seqs, p.seq_len, p.n_repeats, seed).to(model.device)
        after_copy, copy, queries = induction_masks(tokens.cpu(), 1 + p.seq_len)
        names = {pattern_name(l) for l in range(model.n_layers)}
        names |= {v_name(l) for l in range(model.n_layers)} | {FINAL_SCALE}
        with logits_at(model, torch.tensor([tokens.shape[1] - 1])):  # the logits are not read: unembed one position
            _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)

        def mean_over_queries(weights, q_mask):   # per sequence: [b, L, H]; each layer where its pattern is
            out = []
            for l in range(model.n_layers):
                pattern = cache[pattern_name(l)]                # [b, H, q, k]
                per_query = einsum(pattern.float(), weights.to(pattern.device, torch.float32),
                                   "b h q k, b q k -> b h q")
                out.append(per_query[..., q_mask.to(pattern.device)].mean(-1).cpu())
            return torch.stack(out, 1)

        prefix_per_seq = mean_over_queries(after_copy, queries)
        prefix = prefix_per_seq.mean(0)
        duplicate = mean_over_queries(copy, queries).mean(0)
        n = tokens.shape[1]
        prev = torch.zeros(tokens.shape[0], n, n, dtype=torch.bool)
        prev[:, torch.arange(1, n), torch.arange(n - 1)] = True
        prev_token = mean_over_queries(prev, torch.arange(n) >= 1).mean(0)
        copying = self._copying(model, cache, tokens, seed)
        ov = ov_eigen_ratio(model).cpu()
        loss_rise, run, metric = self._loss_sweep(model, tokens)
        clean_loss = float(run.value(metric))

        score = prefix
        claimed = [(l, h) for l, h in top_heads_by(score) if score[l, h] >= p.threshold
                   and copying["copying_q"][l, h] <= p.alpha]
        causal = self._confirm(model, claimed, score, seed)
        labelled, reason = self.decide(claimed, causal)
        if not claimed:
            reason = (f"no head reaches prefix-matching score {p.threshold} with direct copying better than "
                      f"chance (q <= {p.alpha}); the top rows are the best candidates")
        repair = self.direct_and_self_repair(model, run, metric, loss_rise, "higher", clean_loss,
                                             heads=effect_heads(score, loss_rise, p.effect_heads))
        stability = self.stability(prefix_per_seq, lambda boots: boots >= p.threshold, seed)
        frame = head_frame(model, self.name, score, {
            **self.interval(prefix_per_seq, seed, bounds=(0, 1)), "stability": stability, **copying,
            "ov_eigen": ov,
            "prev_token": prev_token, "duplicate_token": duplicate, "loss_rise": loss_rise, **repair})
        return DetectorResult(role=self.name, frame=frame, labelled=labelled, reason=reason,
                              causal=causal, params=self.param_dict(),
                              info={"n_tokens": int(tokens.shape[1]), "clean_repeat_loss": clean_loss,
                                    "claimed": [f"L{l}H{h}" for l, h in claimed],
                                    "copying_chance": 0.5, "copying_top1pct_chance": 0.01,
                                    "copying_samples": int(p.n_seqs * min(p.copy_positions, p.seq_len - 1)),
                                    "start_token": model.info.start_token,
                                    "interval_unit": "sequence", "interval_units": int(tokens.shape[0])})

    def _confirm(self, model, claimed, score, seed):
        """The confirmation check on ``confirm_seqs`` fresh random sequences (another seed): the loss on
        their repeated part, per sequence; floor: the loss on their first occurrence."""
        p = self.params
        tokens = repeated_tokens(model, p.confirm_seqs, p.seq_len, p.confirm_repeats, seed + 7919).to(model.device)
        targets = tokens.shape[1] - 1
        repeated = torch.zeros(tokens.shape[0], targets, dtype=torch.bool)
        repeated[:, p.seq_len:] = True                      # targets inside repeats 2..R
        first = torch.zeros_like(repeated)
        first[:, 1:p.seq_len] = True                        # targets inside the first occurrence (but its first)
        metric = loss_metric(tokens, repeated, per_prompt=True)
        run = clean_run(model, tokens, positions=metric.positions)
        floor = float(clean_run(model, tokens, positions=loss_metric(tokens, first).positions)
                      .value(loss_metric(tokens, first)))
        return self.confirm(model, claimed, score, seed, f"repeated-part loss on held-out sequences "
                            f"({p.ablation} ablation)", "higher", floor=floor, run=run, metric=metric)

    def _copying(self, model, cache, tokens, seed) -> dict[str, torch.Tensor]:
        """Direct copying, rank-based: each head's OV output for the token it *should* attend to.

        At sampled positions q of the last repeat, the key position an induction head attends to is
        ``q - seq_len + 1`` (just after the earlier copy of token q), holding the token to copy
        (``tokens[q + 1]``). Its value vector through W_O, the final norm's scale at q and W_U gives the
        head's logits *if* it attended there fully (attention is left out: that is the prefix score's
        job); the rank of the token among the whole vocabulary (0 = the top; ties count against it).
        Returns ``[L, H]`` columns: ``copying`` (1 - median rank / vocabulary; chance 0.5),
        ``copying_top1pct`` (share of samples in the top 1%; chance 0.01) and ``copying_q`` (BH q-value
        of a one-sided sign test: the token in the top half more often than in half the samples).
        """
        p = self.params
        b = model.bridge
        g = torch.Generator().manual_seed(seed + 1)
        last_start = 1 + p.seq_len * (p.n_repeats - 1)
        pos = last_start + torch.randperm(p.seq_len - 1, generator=g)[:p.copy_positions]
        key = pos - p.seq_len + 1                                             # attended positions
        target = tokens[:, key].cpu()                                         # [b, P] = tokens[:, pos + 1]
        scale = cache[FINAL_SCALE][:, pos].float().to(model.device)  # [b, P, 1]
        w_u = b.W_U.float()
        vocab = w_u.shape[-1]
        kv = torch.tensor([model.kv_head(h) for h in range(model.n_heads)])

        def layer(l: int) -> torch.Tensor:   # [H, b * P] ranks of the target among the vocabulary
            v = cache[v_name(l)][:, key][:, :, kv].float().to(model.device)   # [b, P, H, dh]
            w_o = layer_weights(model, "W_O", [l])[0].float()   # one layer upcast (all of them: tens of GiB at 70B)
            resid = einsum(v, w_o, "b p h e, h e d -> b p h d") / scale[..., None]
            logits = resid @ w_u                                              # [b, P, H, vocab]
            idx = target.to(logits.device)[:, :, None, None].expand(-1, -1, model.n_heads, 1)
            own = logits.gather(-1, idx)                                      # [b, P, H, 1]
            above = (logits.sub_(own) >= 0).sum(-1) - 1                       # rivals at or above it
            return above.permute(2, 0, 1).reshape(model.n_heads, -1).cpu()
        ranks = torch.stack(each(layer, range(model.n_layers), "copying"))   # [L, H, n]
        n = ranks.shape[-1]
        top_half = (ranks < vocab / 2).sum(-1)
        return {"copying": 1 - ranks.float().median(-1).values / vocab,
                "copying_top1pct": (ranks < 0.01 * vocab).float().mean(-1),
                "copying_q": bh_qvalues(binomial_sf(top_half, n, 0.5)).float()}

    def _loss_sweep(self, model, tokens):
        """Per-head rise of the repeated-part loss when that head alone is ablated (batched)."""
        p = self.params
        sweep_tokens = tokens[:p.causal_seqs, :1 + p.seq_len * min(p.sweep_repeats, p.n_repeats)]
        repeated = torch.zeros(sweep_tokens.shape[0], sweep_tokens.shape[1] - 1, dtype=torch.bool)
        repeated[:, p.seq_len:] = True                      # targets inside repeats 2..R
        metric = loss_metric(sweep_tokens, repeated)
        run = clean_run(model, sweep_tokens, positions=metric.positions)   # logits where the loss reads
        clean_loss = float(run.value(metric))
        losses = sweep_heads(model, sweep_tokens, metric, p.ablation, batch_size=self.batch_size, run=run)
        return losses - clean_loss, run, metric


def top_heads_by(score: torch.Tensor) -> list[tuple[int, int]]:
    """Every head, highest ``score`` first (the claimed set is tested in this order, at most ``max_k``)."""
    return top_heads(score, score.numel())
