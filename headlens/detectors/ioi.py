"""IOI roles (Wang, Variengien, Conmy, Shlegeris, Steinhardt 2023, "Interpretability in the Wild: a circuit
for indirect object identification in GPT-2 small"): name movers, negative name movers, S-inhibition heads
and backup name movers, from one run of the IOI task.

The task: "When Mary and John went to the store, John gave a drink to" -> " Mary". The two names
introduced are ``A`` and ``B``; the subject ``S`` is repeated, the other name is the indirect object
``IO``, the answer. Metric: the logit difference ``logit(IO) - logit(S)`` at the last position, per prompt.
The corrupted distribution is ABC: the same prompt with the repeated subject replaced by a third name, so
that no name is duplicated. Prompts come from ``data/ioi.json`` (``data`` parameter): seeded templates,
names and orders (IO first or S first), names that are not one token for the loaded model dropped (the
count is in ``info``); discovery and confirmation prompts are disjoint draws of one seeded sequence.

First the clean behaviour: the mean logit difference with a percentile-bootstrap interval over prompts;
when its lower bound is not above 0 the model cannot do the task and the role is ``not_applicable`` with
that measured reason. Then, per head (columns ``ioi_<name>``):

- ``score`` = ``direct``: the name-mover evidence, the drop of the logit difference when the head's output
  from the ABC run is patched into its *direct* path to the logits only
  (:func:`headlens.methods.path_patch_logits`), mean over prompts, with ``direct_lo``/``direct_hi`` (the
  bootstrap-t interval over prompts; ``score_lo``/``score_hi`` are the same). Positive: the head writes
  IO over S; negative: against it.
- ``attn_io``, ``attn_s``: attention from the last position to the IO token and to the two S tokens.
- ``copy``, ``neg_copy``: the paper's copy score, the share of names whose effective embedding
  (the residual after block 0 with its attention ablated, :func:`headlens.methods.circuits.effective_embedding`)
  put through the head's OV circuit, the final norm and the unembedding puts the name in the top
  ``copy_k`` (5) logits of the vocabulary (``neg_copy``: with the OV negated, i.e. the bottom 5).
- ``s_inhibition`` (with ``_lo``/``_hi``): the drop of the logit difference when the head's ABC output is
  path-patched into the name movers' queries at the last position only
  (:func:`headlens.methods.path_patch_to_heads`), on the first ``sinh_prompts`` discovery prompts (a
  forward pass per sender: the costly part). The receivers are the claimed name movers, or, when
  none is claimed, the ``top_k`` heads by ``direct`` (then the column is evidence only).
- ``backup`` (with ``_lo``/``_hi``): the rise of the head's direct contribution to the logit difference
  (its output through the final norm scale onto ``W_U[IO] - W_U[S]``) when the receivers are
  mean-ablated: backup name movers take over (self-repair).
- ``role``: ``name_mover``, ``negative_name_mover``, ``s_inhibition``, ``backup_name_mover`` or "".

Score rules (a head is *claimed* by one sub-role, in this order): name mover = ``direct_lo > 0``, ``direct
>= share * max(direct)`` and ``copy >= copy_threshold``; negative name mover = ``direct_hi < 0``,
``-direct >= share * max|direct|`` and ``neg_copy >= copy_threshold``; S-inhibition (only with claimed
name movers) = ``s_inhibition_lo > 0`` and ``s_inhibition >= share * max(s_inhibition)``; backup (only
with claimed name movers) = ``backup_lo > 0`` and ``backup >= share * max(direct)``. Confirmation
(held-out prompts, the evidence standard): the claimed name movers, S-inhibition and backup heads
mean-ablated together must lower the logit difference more than layer-matched random heads; the claimed
negative name movers ablated together must raise it more than theirs (``info["negative_check"]``). Heads
are labelled only where their check is significant.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..data import file_or_data
from ..errors import HeadlensError
from ..methods import (
    FINAL_SCALE,
    MeanAblation,
    clean_run,
    interventions,
    logit_diff_metric,
    path_patch_logits,
    path_patch_to_heads,
    pattern_name,
    z_name,
)
from ..methods.circuits import effective_embedding, head_dla, normalise, ov_out
from ..results import DetectorResult, head_frame, head_names
from ..stats import bootstrap_ci
from .base import Detector, ReviewParams, top_heads

TIE = 1e-4   # copy score: logits closer than this share of the largest |logit| are tied
ROLES = ("name_mover", "negative_name_mover", "s_inhibition", "backup_name_mover")


@dataclass
class IOIPrompts:
    """A set of IOI prompts, left-padded: ``tokens`` and ``abc`` (the same prompts with the repeated S
    replaced by a third name) ``[n, pos]``, their ``mask``, the ``io``/``s`` token ids ``[n]``, the
    positions of IO and of the two S tokens ``[n]``, ``[n, 2]``, and each prompt's template index."""
    tokens: Int[Tensor, "n pos"]
    abc: Int[Tensor, "n pos"]
    mask: Int[Tensor, "n pos"]
    io: Int[Tensor, " n"]
    s: Int[Tensor, " n"]
    io_pos: Int[Tensor, " n"]
    s_pos: Int[Tensor, "n 2"]
    template: list[int]


def single_token_names(model, names: list[str]) -> list[str]:
    """The names whose space-prefixed form is one token for ``model``'s tokenizer (distinct ids)."""
    out, seen = [], set()
    for name in names:
        ids = model.tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] not in seen:
            out.append(name)
            seen.add(ids[0])
    return out


def ioi_prompts(model, spec: dict, n: int, seed: int) -> tuple[IOIPrompts, int]:
    """``n`` seeded IOI prompts (and the number of draws dropped because a name did not stay one token in
    context): per draw a template, three distinct names (IO, S, C) and an order (IO first or S first).
    Draws repeat no (template, IO, S, order)."""
    names = single_token_names(model, spec["names"])
    if len(names) < 3:
        raise HeadlensError(f"IOI needs at least 3 names that are one token for {model.info.name}; "
                            f"{len(names)} of {len(spec['names'])} are")
    g = torch.Generator().manual_seed(seed)
    texts, abcs, meta, seen, dropped = [], [], [], set(), 0
    ids = {nm: model.tokenizer(" " + nm, add_special_tokens=False)["input_ids"][0] for nm in names}
    tries = 0
    while len(texts) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise HeadlensError(f"could not draw {n} distinct IOI prompts from {len(spec['templates'])} "
                                f"templates and {len(names)} names; ask for fewer")
        t = int(torch.randint(len(spec["templates"]), (1,), generator=g))
        io, s, c = (names[i] for i in torch.randperm(len(names), generator=g)[:3].tolist())
        io_first = bool(torch.randint(2, (1,), generator=g))
        if (t, io, s, io_first) in seen:
            continue
        seen.add((t, io, s, io_first))
        a, b = (io, s) if io_first else (s, io)
        template = spec["templates"][t]
        text, abc = template.format(A=a, B=b, S=s), template.format(A=a, B=b, S=c)
        tok, tok_abc = model.encode(text), model.encode(abc)
        if (tok.count(ids[io]) != 1 or tok.count(ids[s]) != 2 or len(tok) != len(tok_abc)
                or tok_abc.count(ids[c]) != 1):
            dropped += 1
            continue
        texts.append(text)
        abcs.append(abc)
        meta.append((ids[io], ids[s], t))
    tokens, mask = model.to_tokens(texts, return_mask=True)
    abc_tokens, _ = model.to_tokens(abcs, return_mask=True)
    io = torch.tensor([m[0] for m in meta])
    s = torch.tensor([m[1] for m in meta])
    tokens, abc_tokens, mask = tokens.cpu(), abc_tokens.cpu(), mask.cpu()
    io_pos = (tokens == io[:, None]).long().argmax(1)
    s_pos = torch.stack([(tokens == s[:, None]).nonzero()[:, 1].reshape(-1, 2)[:, k] for k in range(2)], 1)
    return IOIPrompts(tokens, abc_tokens, mask, io, s, io_pos, s_pos, [m[2] for m in meta]), dropped


def copy_scores(model, name_ids: Int[Tensor, " n"], k: int = 5) -> tuple[Float[Tensor, "layer head"],
                                                                          Float[Tensor, "layer head"]]:
    """The paper's copy score and negative copy score of every head: the share of ``name_ids`` whose
    effective embedding, through the head's OV circuit, the final norm (``normalise``) and ``W_U``, puts
    the name among the top ``k`` logits of the vocabulary (negative: among the bottom ``k``, the OV
    negated). A tie counts against the name (ranked below every token whose logit is within ``TIE`` times
    the largest absolute logit, or 1, of it: a head whose OV writes nothing the unembedding reads copies
    nothing). One layer
    at a time, all its heads at once."""
    x = normalise(model, effective_embedding(model, name_ids))           # [n, d_model]
    w_u = model.bridge.W_U
    ids = name_ids.to(w_u.device)
    top = torch.zeros(model.n_layers, model.n_heads)
    bottom = torch.zeros_like(top)
    for layer in range(model.n_layers):
        out = normalise(model, ov_out(model, x, [layer])[0]).to(w_u.device)    # [H, n, d_model]
        logits = out @ w_u.float()                                           # [H, n, vocab]
        own = logits.gather(-1, ids[None, :, None].expand(logits.shape[0], -1, 1))
        tie = TIE * logits.abs().amax(-1, keepdim=True).clamp_min(1.0)   # rounding noise: a near tie counts against
        above = (logits >= own - tie).sum(-1) - 1            # other tokens at or above the name
        below = (logits <= own + tie).sum(-1) - 1
        top[layer] = (above < k).float().mean(-1).cpu()
        bottom[layer] = (below < k).float().mean(-1).cpu()
    return top, bottom


def end_attention(model, p: IOIPrompts) -> tuple[Float[Tensor, "layer head"], Float[Tensor, "layer head"]]:
    """Mean attention from the last position to the IO token and to the two S tokens, every head."""
    names = {pattern_name(l) for l in range(model.n_layers)}
    rows = torch.arange(len(p.tokens))
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(p.tokens.to(model.device), attention_mask=p.mask.to(model.device),
                                               names_filter=lambda n: n in names)
    io, s = torch.zeros(model.n_layers, model.n_heads), torch.zeros(model.n_layers, model.n_heads)
    for l in range(model.n_layers):
        last = cache[pattern_name(l)][:, :, -1].float().cpu()            # [n, H, key]
        io[l] = last[rows, :, p.io_pos].mean(0)
        s[l] = (last[rows, :, p.s_pos[:, 0]] + last[rows, :, p.s_pos[:, 1]]).mean(0)
    return io, s


class IOIDetector(Detector):
    name = "ioi"
    cost = 1.5
    opt_in = True   # path patching into the name movers' queries costs a forward pass per sender
    summary = ("IOI circuit roles: name movers, negative name movers, S-inhibition and backup name movers "
               "(logit difference IO - S)")
    paper = ("Wang et al. 2023, Interpretability in the Wild: a circuit for indirect object identification "
             "in GPT-2 small")
    key_columns = ("copy", "s_inhibition")

    @dataclass
    class Params(ReviewParams):
        data: str = "ioi.json"       # the prompt file (data/ or a path): templates and names
        n_prompts: int = 40          # discovery prompts
        n_confirm: int = 16          # held-out confirmation prompts (each of the ~1000 check variants runs them all)
        share: float = 0.1           # a sub-role's effect must be at least this share of the largest
        copy_threshold: float = 0.5  # copy score (share of names in the OV's top 5) for (negative) name movers
        copy_k: int = 5              # the paper's top 5
        top_k: int = 3               # receivers (and tested heads) when no name mover is claimed
        sinh_prompts: int = 16       # the first this many discovery prompts for the S-inhibition path patching

    def run(self, model, seed: int = 0) -> DetectorResult:
        p = self.params
        if p.n_prompts < 2 or p.n_confirm < 2:
            raise HeadlensError(f"ioi needs n_prompts and n_confirm of at least 2, not {p.n_prompts}, "
                                f"{p.n_confirm}")
        spec = json.loads(file_or_data(p.data).read_text())
        if not {"templates", "names"} <= set(spec):
            raise HeadlensError(f"{p.data} needs 'templates' and 'names'")
        prompts, dropped = ioi_prompts(model, spec, p.n_prompts + p.n_confirm, seed)
        disc, conf = _split(prompts, p.n_prompts)
        n_names = len(single_token_names(model, spec["names"]))
        info = {"n_names": n_names, "names_dropped": len(spec["names"]) - n_names,
                "prompts_dropped": dropped, "n_prompts": p.n_prompts, "n_confirm": p.n_confirm,
                "interval_unit": "prompt", "interval_units": p.n_prompts}

        metric = logit_diff_metric(disc.io, disc.s, per_prompt=True)
        run = clean_run(model, disc.tokens, disc.mask)
        clean = run.value(metric).float().cpu()                               # [n]
        lo, hi = bootstrap_ci(clean[:, None], p.n_boot, seed, p.ci_level)
        info.update(clean_logit_diff=float(clean.mean()), clean_logit_diff_lo=float(lo[0]),
                    clean_logit_diff_hi=float(hi[0]), clean_io_wins=float((clean > 0).float().mean()))
        if not float(lo[0]) > 0:
            return self.not_applicable(model, (
                f"the model does not do IOI: its clean logit difference IO - S is {float(clean.mean()):.3g} "
                f"(95% interval {float(lo[0]):.3g} to {float(hi[0]):.3g}, {p.n_prompts} prompts), not above 0"),
                **info)

        patched = path_patch_logits(model, disc.tokens, disc.abc, metric, "noise", attention_mask=disc.mask,
                                    batch_size=self.batch_size)                # [L, H, n]
        direct_each = (clean - patched).permute(2, 0, 1)                       # [n, L, H]
        direct = direct_each.mean(0)
        cols = {**self.interval(direct_each, seed, "direct")}
        copy, neg_copy = copy_scores(model, torch.tensor(sorted(set(prompts.io.tolist()) | set(prompts.s.tolist()))),
                                     p.copy_k)
        attn_io, attn_s = end_attention(model, disc)
        top = float(direct.max())
        big = float(direct.abs().max())
        nm = [h for h in top_heads(direct, direct.numel())
              if cols["direct_lo"][h] > 0 and direct[h] >= p.share * top and copy[h] >= p.copy_threshold]
        nnm = [h for h in top_heads(-direct, direct.numel())
               if cols["direct_hi"][h] < 0 and -direct[h] >= p.share * big and neg_copy[h] >= p.copy_threshold]
        receivers = nm or top_heads(direct, p.top_k)
        info["receivers"] = head_names(receivers)

        senders = [h for h in model.heads() if h[0] < max(l for l, _ in receivers) and h not in receivers]
        few = _split(disc, min(p.sinh_prompts, p.n_prompts))[0]      # a forward pass per sender: fewer prompts
        sinh_each = (clean[:len(few.io)] - path_patch_to_heads(
            model, few.tokens, few.abc, receivers, logit_diff_metric(few.io, few.s, per_prompt=True), senders,
            position=-1, attention_mask=few.mask, batch_size=self.batch_size)).permute(2, 0, 1)
        sinh = sinh_each.mean(0)
        backup_each = self._backup(model, run, disc, receivers)
        backup = backup_each.mean(0)
        cols.update(self.interval(sinh_each, seed, "s_inhibition"))
        cols.update(self.interval(backup_each, seed, "backup"))
        si, bk = [], []
        if nm:
            top_si = float(torch.nan_to_num(sinh, nan=float("-inf")).max())
            si = [h for h in top_heads(sinh, sinh.numel()) if h not in nm + nnm
                  and cols["s_inhibition_lo"][h] > 0 and sinh[h] >= p.share * top_si]
            bk = [h for h in top_heads(backup, backup.numel()) if h not in nm + nnm + si
                  and cols["backup_lo"][h] > 0 and backup[h] >= p.share * top]

        claimed = nm + si + bk
        causal = self._confirm(model, conf, claimed, direct, seed, "lower")
        labelled, reason = self.decide(claimed, causal)
        neg_labelled = []
        if nnm:
            neg = self._confirm(model, conf, nnm, -direct, seed, "higher")
            neg_labelled, neg_reason = self.decide(nnm, neg)
            info["negative_check"] = neg.to_dict() | {"p_value": neg.p_value, "significant": neg.significant}
            if neg_reason:
                info["negative_reason"] = neg_reason
        if reason and neg_labelled:
            reason = (f"name movers, S-inhibition, backup: {reason}; negative name movers "
                      f"{', '.join(head_names(neg_labelled))}: labelled by their own check (info['negative_check'])")
        if not claimed:
            reason = ("no head passes the name-mover rule (direct effect significantly above 0, at least "
                      f"{p.share} of the largest, copy score >= {p.copy_threshold}); S-inhibition and backup "
                      "columns are measured against the top heads by direct effect and label nothing")
        role = {}
        for group, name in ((nm, "name_mover"), (nnm, "negative_name_mover"), (si, "s_inhibition"),
                            (bk, "backup_name_mover")):
            for h in group:
                if h in labelled or h in neg_labelled:
                    role.setdefault(h, name)
        info["claimed"] = {name: head_names(g) for g, name in ((nm, "name_mover"), (nnm, "negative_name_mover"),
                                                               (si, "s_inhibition"), (bk, "backup_name_mover"))}
        frame = head_frame(model, self.name, direct, {
            "score_lo": cols["direct_lo"], "score_hi": cols["direct_hi"], **cols, "direct": direct,
            "copy": copy, "neg_copy": neg_copy, "attn_io": attn_io, "attn_s": attn_s,
            "s_inhibition": sinh, "backup": backup})
        frame["ioi_role"] = [role.get((int(l), int(h)), "") for l, h in zip(frame["layer"], frame["head"])]
        return DetectorResult(role=self.name, frame=frame, labelled=labelled + neg_labelled, reason=reason,
                              causal=causal, params=self.param_dict(), info=info)

    def _backup(self, model, run, prompts: IOIPrompts, receivers) -> Float[Tensor, "n layer head"]:
        """Per prompt and head, the rise of the head's direct contribution to the logit difference at the
        last position when the ``receivers`` are mean-ablated (over the prompts, start token kept)."""
        ablation = MeanAblation()
        masks = interventions.head_masks(model, receivers)
        fwd = interventions.hooks(ablation, masks, lambda layer: interventions.Site(model, layer, run))
        with model.bridge.hooks(fwd_hooks=fwd):
            ablated = clean_run(model, prompts.tokens, prompts.mask)
        w_u = model.bridge.W_U
        directions = (w_u[:, prompts.io] - w_u[:, prompts.s]).T                 # [n, d_model]
        n, n_pos = prompts.tokens.shape
        rows, last = torch.arange(n), torch.full((n,), n_pos - 1)

        def dla(r):
            cache = {FINAL_SCALE: r.scale, **{z_name(l): r.z[l] for l in range(model.n_layers)}}
            return head_dla(model, cache, rows, last, directions)              # [L, H, n]
        return (dla(ablated) - dla(run)).permute(2, 0, 1)

    def _confirm(self, model, conf: IOIPrompts, claimed, score, seed, worse):
        metric = logit_diff_metric(conf.io, conf.s, per_prompt=True)
        run = clean_run(model, conf.tokens, conf.mask)
        return self.confirm(model, claimed, score, seed,
                            f"logit difference IO - S on held-out IOI prompts ({self.params.ablation} ablation)",
                            worse, floor=0.0, run=run, metric=metric)


def _split(p: IOIPrompts, n: int) -> tuple[IOIPrompts, IOIPrompts]:
    """The first ``n`` prompts and the rest (each trimmed of the left padding all its rows share)."""
    def part(rows):
        mask = p.mask[rows]
        start = int((mask.sum(0) == 0).long().cumprod(0).sum())          # columns that are padding in every row
        return IOIPrompts(p.tokens[rows, start:], p.abc[rows, start:], mask[:, start:], p.io[rows], p.s[rows],
                          p.io_pos[rows] - start, p.s_pos[rows] - start, [p.template[i] for i in rows.tolist()])
    idx = torch.arange(len(p.tokens))
    return part(idx[:n]), part(idx[n:])
