"""Attention-sink and dormant heads (Xiao et al. 2024, "Efficient streaming language models with attention
sinks"; Gu et al. 2025, "When attention sink emerges in language models"; Guo et al. 2024, "Active-dormant
attention heads: mechanistically demystifying extreme-token phenomena in LLMs").

Most heads of a trained language model put much of their attention on the first token, whatever it is
(an attention *sink*; Xiao et al.). Gu et al. count a head as a sink when its mean attention to the first
token exceeds epsilon = 0.3; the share of such heads is the model's *sink rate*. Attending to the sink is
how a head does nothing: the first token's value vector is small (Guo et al.'s "value-state drain"), so a
head that attends there writes almost nothing, a *dormant* head, which switches on for some inputs
(Guo et al.). A sink head can also be *active*: it parks only part of its attention on the first token
and writes something that matters with the rest.

Everything is measured on natural text: consecutive ``seq_len``-token chunks of ``corpus``
(``data/prose.txt``), each after the model's start token (:attr:`~headlens.models.HeadModel.start_token_id`;
a model without one starts the row with the text), at every query position ``q >= 1`` (position 0 can
attend only to itself). Discovery: the first ``n_seqs`` chunks; confirmation: the next ``confirm_seqs``.
Columns (``[n_layers, n_heads]`` each, one row per head in the frame):

- ``attention_sink_score``: the head's mean attention on position 0 (the sink), over the query positions
  ``q >= 1`` of the discovery chunks.
- ``attention_sink_score_lo`` / ``_score_hi``: its bootstrap-t interval over the chunks (the unit).
- ``attention_sink_stability``: the share of ``n_boot`` bootstrap resamples of the chunks in which the
  head is dormant (both conditions of the rule below on the resample's means).
- ``attention_sink_delimiter``: mean attention (same queries) on the positions ``1..q`` that hold a
  *delimiter* token, the secondary sinks some models use: a token of the discovery chunks whose text,
  decoded alone with spaces and tabs removed, is non-empty and made only of ``.``, ``,``, ``\\n`` or
  ``\\r`` (e.g. ``"."``, ``" ,"``, ``"\\n\\n"``, ``".\\n"``); special tokens never count. The ids found
  are in ``info["delimiter_tokens"]``.
- ``attention_sink_output_norm``: the head's relative output norm,
  ``N[l, h] / mean_h' N[l, h']`` where ``N[l, h]`` is the mean over the discovery chunks and queries
  ``q >= 1`` of ``||z_h(q) W_O^h||`` (the head's own write to the residual stream, output bias excluded;
  ``W_O`` as headlens processes it: norms folded, centred for LayerNorm models). 1 = the layer's
  average head; NaN where no head of the layer writes anything.
- ``attention_sink_dormant`` (bool): ``score >= sink_threshold`` AND ``output_norm < dormant_norm``.

Label rule: the *claimed* heads are the dormant ones (``attention_sink_dormant``), most dormant (smallest
relative output norm) first. They are labelled only if their confirmation check is significant: the
claimed heads (at most ``max_k``) ablated together (``ablation``, mean by default) change the per-token
loss on the ``confirm_seqs`` held-out chunks LESS than ``n_random`` draws of as many random heads from
the same layers, at ``p <= alpha``. Metric: per chunk, the mean over predicted positions (queries ``q >= 1``)
of ``|loss_ablated - loss_clean|`` (nats), so a head that moves the loss either way counts as mattering;
``worse = "lower"`` and ``claim = "less"`` (lower = the heads matter less). What the label claims: the
heads park most of their attention on the first token, write almost nothing (an order of magnitude less
than their layer's average head), and removing them together disturbs the model's predictions on natural
text less than removing as many random heads of the same layers. It does not claim the heads are dormant
on every input: Guo et al.'s dormant heads switch on for some domains.

With no dormant head nothing is labelled, the reason says so, and the check is run on the best candidates
for the evidence only: the sink heads with the smallest relative output norm (the strongest sinks when no
head is a sink). ``info`` holds the sink rate (share of heads with ``score >= sink_threshold``), the
number of sink heads and of dormant heads: sink heads are most heads of most models; the column lets
other roles and users set them apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import einsum

from ..errors import HeadlensError
from ..methods import clean_run, logits_at, pattern_name, row_bytes, text_chunks, z_name
from ..methods.circuits import layer_weights
from ..methods.metrics import positioned, token_logprobs
from ..results import DetectorResult, head_frame, head_names
from ..runtime import chunked
from .base import Detector, ReviewParams, top_heads

DELIMITER_CHARS = frozenset(".,\n\r")   # a delimiter token's text, spaces and tabs removed, is made of these


def delimiter_ids(tokenizer, ids: torch.Tensor) -> list[int]:
    """The distinct ids among ``ids`` whose text, decoded alone with spaces and tabs removed, is non-empty
    and made only of ``.``, ``,`` and newlines (``"."``, ``" ,"``, ``"\\n\\n"``, ``".\\n"``...), special
    tokens left out, sorted.

    >>> delimiter_ids(tokenizer, torch.tensor([[13, 11, 198, 262]]))   # doctest: +SKIP
    [11, 13, 198]
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    found = []
    for t in torch.unique(torch.as_tensor(ids)).tolist():
        if t in special:
            continue
        core = tokenizer.decode([t]).replace(" ", "").replace("\t", "")
        if core and set(core) <= DELIMITER_CHARS:
            found.append(int(t))
    return found


def sink_statistics(model, tokens: torch.Tensor, delimiter: torch.Tensor,
                    batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Per sequence and head, over the query positions ``q >= 1``: ``{"sink", "delimiter", "norm"}``, each
    ``[n_seqs, n_layers, n_heads]`` (float32, on the CPU).

    - ``sink``: mean attention on position 0;
    - ``delimiter``: mean attention summed over the key positions where ``delimiter`` (bool ``[n_seqs,
      pos]``) is True (position 0 never counts);
    - ``norm``: mean ``||z_h(q) W_O^h||`` (the head's own output), from ``z (W_O W_O^T) z^T`` per head, so
      no ``[batch, pos, heads, d_model]`` tensor is formed.

    Every layer and head in one forward pass per chunk of sequences: hooks reduce each layer's pattern
    and head outputs as they are made (no pattern is kept) and the unembedding runs at one position only.
    Chunks are planned by :func:`headlens.runtime.chunked` (at most ``batch_size`` sequences), so the work
    is shared over ranks and resumable.
    """
    n_pos = tokens.shape[1]
    L = model.n_layers
    delimiter = delimiter.clone()
    delimiter[:, 0] = False
    grams: dict[tuple[int, str], torch.Tensor] = {}

    def gram(layer: int, device) -> torch.Tensor:          # [H, d_head, d_head]: W_O^h W_O^h^T
        key = (layer, str(device))
        if key not in grams:
            w_o = layer_weights(model, "W_O", [layer], device)[0].float()
            grams[key] = w_o @ w_o.transpose(-1, -2)
        return grams[key]

    def chunk(rows: list[int]) -> dict[str, torch.Tensor]:
        part, marks = tokens[rows].to(model.device), delimiter[rows]
        out: dict[str, list] = {"sink": [None] * L, "delimiter": [None] * L, "norm": [None] * L}

        def on_pattern(pattern, hook, layer):                 # [b, H, q, k]
            a = pattern[:, :, 1:].float()
            out["sink"][layer] = a[..., 0].mean(-1).cpu()
            d = marks.to(a.device, torch.float32)
            out["delimiter"][layer] = einsum(a, d, "b h q k, b k -> b h q").mean(-1).cpu()

        def on_z(z, hook, layer):                             # [b, q, H, d_head]
            zq = z[:, 1:].float()
            sq = einsum(zq, gram(layer, z.device), zq, "b q h e, h e f, b q h f -> b q h")
            out["norm"][layer] = sq.clamp_min(0).sqrt().mean(1).cpu()

        hooks = [(pattern_name(l), lambda x, hook, l=l: on_pattern(x, hook, l)) for l in range(L)]
        hooks += [(z_name(l), lambda x, hook, l=l: on_z(x, hook, l)) for l in range(L)]
        with torch.no_grad(), logits_at(model, torch.tensor([n_pos - 1])):
            model.bridge.run_with_hooks(part, fwd_hooks=hooks)
        return {k: torch.stack(v, 1) for k, v in out.items()}     # [b, L, H]

    parts = chunked(chunk, list(range(len(tokens))), item_bytes=row_bytes(model, n_pos, 1), device=model.device,
                    weights=model.weight_bytes(), cap=batch_size, strict="attention-sink statistics",
                    unit=f"{n_pos}-token sequence on {model.info.name}", description="attention-sink statistics",
                    key=(tokens, delimiter), resumable=True)
    return {k: torch.cat([p[k] for p in parts]) for k in ("sink", "delimiter", "norm")}


def relative_norm(norm: torch.Tensor) -> torch.Tensor:
    """``[..., L, H]``: each head's output norm over the mean of its layer's heads (NaN where that mean
    is 0: no head of the layer writes anything)."""
    mean = norm.mean(-1, keepdim=True)
    return torch.where(mean > 0, norm / mean.clamp_min(torch.finfo(norm.dtype).tiny), float("nan"))


def loss_change_metric(targets: torch.Tensor, clean_nll: torch.Tensor, read: torch.Tensor):
    """Metric ``[batch, 2]``: per prompt, the mean over the predicted positions ``read`` of ``|nll - clean|``
    (column 0) and of ``nll - clean`` (column 1), where ``nll`` is the next-token loss of ``targets``
    ``[batch, len(read)]`` and ``clean_nll`` the clean model's. Reads the logits at ``read`` only."""
    def each(logits: torch.Tensor) -> torch.Tensor:                         # [b, len(read), vocab]
        nll = -token_logprobs(logits, targets[:len(logits)])
        diff = nll - clean_nll[:len(logits)].to(nll.device)
        return torch.stack([diff.abs().mean(1), diff.mean(1)], -1)
    return positioned(each, read)


class AttentionSinkDetector(Detector):
    name = "attention_sink"
    cost = 0.5   # share of a scan (relative; headlens.runtime.distributed.plan)
    summary = ("parks its attention on the first token (a sink); dormant when it also writes almost nothing "
               "and matters less than random heads")
    paper = ("Gu et al. 2025, When attention sink emerges in language models; Guo et al. 2024, Active-dormant "
             "attention heads; Xiao et al. 2024, Efficient streaming language models with attention sinks")
    key_columns = ("output_norm", "dormant")   # the rule's second condition and its outcome

    @dataclass
    class Params(ReviewParams):
        corpus: str = "prose.txt"      # natural text (file in data/ or a path)
        seq_len: int = 128             # text tokens per chunk (after the start token)
        n_seqs: int = 16               # discovery chunks
        confirm_seqs: int = 4          # confirmation: the corpus's next chunks, after the discovery ones
        sink_threshold: float = 0.3    # Gu et al. 2025's epsilon: a sink head's mean attention on the first token
        # Prior (set before looking at any model): a dormant head writes less than a tenth of its layer's
        # average head, an order of magnitude below the typical write, which is "almost nothing" next to
        # the heads it is summed with in the residual stream.
        dormant_norm: float = 0.1

    def run(self, model, seed: int = 0) -> DetectorResult:
        p = self.params
        if p.n_seqs < 2 or p.confirm_seqs < 1 or p.seq_len < 2:
            raise HeadlensError(f"attention_sink needs n_seqs >= 2 (the interval's units), confirm_seqs >= 1 and "
                                f"seq_len >= 2; got n_seqs={p.n_seqs}, confirm_seqs={p.confirm_seqs}, "
                                f"seq_len={p.seq_len}")
        chunks = text_chunks(model, p.corpus, p.seq_len, p.n_seqs + p.confirm_seqs, "attention-sink text chunk")
        if len(chunks) <= p.n_seqs:
            raise HeadlensError(f"corpus {p.corpus} has room for {len(chunks)} chunks of {p.seq_len} tokens: "
                                f"none is left for confirmation after the {p.n_seqs} discovery chunks")
        tokens, confirm = chunks[:p.n_seqs], chunks[p.n_seqs:]
        delims = delimiter_ids(model.tokenizer, tokens[:, 1:])
        marks = torch.isin(tokens, torch.tensor(delims, dtype=torch.long))
        stats = sink_statistics(model, tokens, marks, self.batch_size)
        sink, delimiter, norm = (stats[k].mean(0) for k in ("sink", "delimiter", "norm"))
        rel = relative_norm(norm)
        is_sink = sink >= p.sink_threshold
        dormant = is_sink & (rel < p.dormant_norm)
        claimed = top_heads(torch.where(dormant, -rel, float("nan")), int(dormant.sum()))   # most dormant first
        # best candidates when none is claimed: sink heads by smallest relative norm, then the strongest sinks
        candidates = torch.where(is_sink, 2 - rel.clamp(0, 1), sink)
        causal, loss = self._confirm(model, confirm, claimed, candidates, seed)
        labelled, reason = self.decide(claimed, causal)
        if not claimed:
            reason = (f"no head is dormant: none attends to the first token (score >= {p.sink_threshold}) while "
                      f"writing less than {p.dormant_norm} of its layer's average head output; nothing is "
                      f"labelled ({int(is_sink.sum())} sink heads); the causal check tests the best candidates "
                      "for the evidence only")

        def rule(boots: torch.Tensor) -> torch.Tensor:              # [n_boot, 2, L, H] -> dormant
            return (boots[:, 0] >= p.sink_threshold) & (relative_norm(boots[:, 1]) < p.dormant_norm)
        stability = self.stability(torch.stack([stats["sink"], stats["norm"]], 1), rule, seed)
        frame = head_frame(model, self.name, sink, {
            **self.interval(stats["sink"], seed, bounds=(0, 1)), "stability": stability,
            "delimiter": delimiter, "output_norm": rel})
        frame[f"{self.name}_dormant"] = dormant.flatten().numpy()
        n_heads = model.n_layers * model.n_heads
        info = {"sink_rate": float(is_sink.sum()) / n_heads, "n_sink_heads": int(is_sink.sum()),
                "n_dormant_heads": int(dormant.sum()), "claimed": head_names(claimed),
                "n_heads": n_heads, "start_token": model.info.start_token,
                "delimiter_tokens": {str(t): model.tokenizer.decode([t]) for t in delims},
                "delimiter_share": float(marks[:, 1:].float().mean()),
                "n_text_tokens": int(tokens.numel()), "n_confirmation_chunks": int(len(confirm)),
                "causal_loss_change": loss, "interval_unit": "sequence", "interval_units": int(len(tokens))}
        return DetectorResult(role=self.name, frame=frame, labelled=labelled, reason=reason, causal=causal,
                              params=self.param_dict(), info=info)

    def _confirm(self, model, tokens, claimed, candidates, seed):
        """The confirmation check on held-out chunks: per chunk, the mean ``|change|`` of the per-token loss
        at the queries ``q >= 1`` when the tested heads (the claimed ones, else the best candidates) are
        ablated together, vs as many layer-matched random heads; lower = the heads matter less. Also
        returns the signed loss changes (tested, and the random draws' mean), in nats."""
        p = self.params
        read = torch.arange(1, tokens.shape[1] - 1)                    # queries q >= 1 with a next token
        run = clean_run(model, tokens, positions=read)
        targets = tokens[:, 2:]
        clean_nll = -token_logprobs(run.logits_at(read), targets)
        metric = loss_change_metric(targets, clean_nll, read)
        check = self.confirm(model, claimed, candidates, seed, "mean |change| of the per-token loss on "
                             f"held-out text, nats ({p.ablation} ablation)", "lower", run=run, metric=metric)
        check.claim = "less"
        signed = check.raw[..., 1].nanmean(1)                          # [variants]: mean signed change
        draws = signed[2:2 + check.n_random]
        loss = {"clean_loss": float(clean_nll.float().mean()), "tested_change": float(signed[1]),
                "random_change_mean": float(draws.mean()) if len(draws) else math.nan}
        return check, loss
