"""Safety heads (Zhou et al., ICLR 2025, "On the Role of Attention Heads in LLM Safety").

A safety head carries a chat model's refusal of harmful requests: making its attention uniform over the
causal prefix ("undifferentiated attention"; the paper scales W_q by 1e-5, which gives the same
pattern) changes the next-token distribution on harmful requests and lets them through. Columns:

- ``safety_score`` = Ships: KL(p_clean || p_ablated) of the next token at the last position of the
  prompt (the chat template's generation prompt), that head's attention made uniform, averaged over the
  harmful requests; all heads in batched forward passes (``sweep_heads``).
- ``safety_harmless_kl``: the same on the harmless requests (a head that changes everything is not a
  safety head); ``safety_specificity`` = score / (score + harmless KL).

Refusal is measured by refusal phrases (``data/refusal_phrases.txt``) in greedy generations. If the
baseline refusal rate on the harmful requests is below ``min_refusal_rate`` (0.5: the model must refuse
most harmful requests for a refusal mechanism to exist), the role is not applicable and no head is
ranked. Otherwise a greedy group of up to ``group_size`` heads is grown from the ``candidates``
highest-Ships heads (each step adds the head that most raises the group's KL on harmful requests,
stopping when the gain is under ``min_gain`` of the current KL), and the attack success rate (share of
harmful requests not refused) is measured with the top head and with the group ablated.

Label rule: the group's heads with Ships above their harmless KL, if ablating the group raises the
attack success rate by at least ``min_asr_rise``. Causal check: refusal rate with the group ablated vs
as many random heads (``n_random`` draws).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import data_path
from ..errors import HeadlensError
from ..methods import clean_run, kl_metric, run_variants, sweep_heads
from ..methods.generation import encode_prompt, greedy_generate, left_pad, stop_token_ids
from .base import Detector, DetectorResult, ReviewParams, head_frame


def read_lines(name: str) -> list[str]:
    """Non-empty, non-comment lines of a data file (a name in ``data/`` or a path)."""
    path = Path(name) if Path(name).is_file() else data_path(name)
    lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines()]
    return [l for l in lines if l and not l.startswith("#")]


def is_refusal(text: str, phrases: list[str]) -> bool:
    low = text.lower()
    return any(p.lower() in low for p in phrases)


class SafetyDetector(Detector):
    name = "safety"
    summary = "its attention carries the refusal of harmful requests (Ships: KL under uniform attention)"
    paper = "Zhou et al. 2025, On the Role of Attention Heads in LLM Safety"

    @dataclass
    class Params(ReviewParams):
        harmful: str = "harmful.txt"
        harmless: str = "harmless.txt"
        refusal_phrases: str = "refusal_phrases.txt"
        n_prompts: int = 0              # requests used from each set (0 = all)
        chat: bool = True               # use the chat template when the model has one
        max_new_tokens: int = 32        # greedy tokens searched for refusal phrases
        min_refusal_rate: float = 0.5   # below this baseline refusal rate the role does not apply
        candidates: int = 10            # highest-Ships heads the greedy group is grown from
        group_size: int = 3             # greedy group of at most this many heads (Sahara: ~3)
        min_gain: float = 0.05          # stop growing when the group KL rises by less than this share
        min_asr_rise: float = 0.2       # label only if the group raises the attack success rate this much
        ablation: str = "uniform"       # undifferentiated attention (the only kind the check decodes with)
        max_rows: int = 64              # sequences per batched forward pass

    def run(self, model, seed: int = 0) -> DetectorResult:
        p = self.params
        phrases = read_lines(p.refusal_phrases)
        harmful, harmless = read_lines(p.harmful), read_lines(p.harmless)
        if p.n_prompts:
            harmful, harmless = harmful[:p.n_prompts], harmless[:p.n_prompts]
        if not harmful or not harmless or not phrases:
            raise HeadlensError("safety detector needs non-empty harmful, harmless and refusal-phrase files")
        bad = [encode_prompt(model, r, p.chat)[0] for r in harmful]
        good = [encode_prompt(model, r, p.chat)[0] for r in harmless]
        refusal = self._refusal_rate(model, bad, phrases)
        info = {"refusal_rate": refusal, "n_harmful": len(bad), "n_harmless": len(good)}
        if refusal < p.min_refusal_rate:
            return self.not_applicable(
                model, f"the model refuses only {refusal:.0%} of harmful requests (< {p.min_refusal_rate:.0%}): "
                "no refusal behaviour to attribute to heads", **info)

        info["harmless_refusal_rate"] = self._refusal_rate(model, good, phrases)
        ships_per_prompt, bad_run = self._ships(model, bad)                    # [L, H, n_prompts]
        ships, harmless_kl = ships_per_prompt.mean(-1), self._ships(model, good)[0].mean(-1)
        group = self._greedy_group(model, ships, bad_run)
        top = [group[0]]
        check = self.causal_check(model, None, seed, "refusal rate on harmful requests (uniform attention)",
                                  "lower", top=group, extra_variants=[top], prompts=bad, phrases=phrases)
        asr_top, asr_group = 1 - float(check.raw[-1]), 1 - check.top_k_ablated
        causal = check.to_dict()
        specific = [h for h in group if ships[h] > harmless_kl[h]]
        rise = asr_group - (1 - refusal)
        labelled = specific if rise >= p.min_asr_rise else []
        info.update({"asr_baseline": 1 - refusal, "asr_top_head": asr_top, "top_head": f"L{top[0][0]}H{top[0][1]}",
                     "asr_group": asr_group, "group": [f"L{l}H{h}" for l, h in group]})
        reason = "" if labelled else (f"ablating the greedy group raises the attack success rate by only "
                                      f"{rise:.2f} (< {p.min_asr_rise}); the top rows are weak candidates")
        # Direct effect: the head's uniform-attention change on its path straight to the logits only.
        repair = self.direct_and_self_repair(model, bad_run, kl_metric(bad_run.logits), ships, "higher", 0.0,
                                             positions=slice(-1, None))
        frame = head_frame(model, self.name, ships, {
            **self.interval(ships_per_prompt.permute(2, 0, 1), seed), **repair,
            "harmless_kl": harmless_kl,
            "specificity": ships / (ships + harmless_kl).clamp_min(1e-12)})
        return DetectorResult(role=self.name, frame=frame, labelled=labelled, reason=reason,
                              causal=causal, params=self.param_dict(), info=info)

    def causal_values(self, model, variants, prompts=(), phrases=(), **_) -> torch.Tensor:
        """Refusal rate with each variant's heads' attention uniform, all decoded as one batch."""
        return torch.tensor(self._refusal_rates(model, prompts, phrases, variants))

    def _refusal_rate(self, model, prompts, phrases) -> float:
        return self._refusal_rates(model, prompts, phrases, [[]])[0]

    def _refusal_rates(self, model, prompts, phrases, head_sets) -> list[float]:
        """Refusal rate on ``prompts`` with each set of heads ablated; all sets decoded as one batch."""
        rows = [ids for _ in head_sets for ids in prompts]
        ablate = [list(heads) for heads in head_sets for _ in prompts]
        gen = greedy_generate(model, rows, self.params.max_new_tokens, ablate=ablate,
                              stop_ids=stop_token_ids(model))
        texts = model.tokenizer.batch_decode(gen.tokens, skip_special_tokens=True)
        refused = torch.tensor([is_refusal(t, phrases) for t in texts], dtype=torch.float)
        return refused.view(len(head_sets), len(prompts)).mean(1).tolist()

    def _ships(self, model, prompts):
        """KL(clean || head uniform) at the last position, every head, per prompt: [L, H, n_prompts]."""
        pad = model.tokenizer.pad_token_id or 0
        tokens, mask = left_pad(prompts, pad)
        tokens, mask = tokens.to(model.device), mask.to(model.device)
        run = clean_run(model, tokens, mask)   # z kept for the direct effects
        kl = sweep_heads(model, tokens, kl_metric(run.logits, per_prompt=True), "uniform", attention_mask=mask,
                         max_rows=self.params.max_rows, run=run)
        return kl.clamp_min(0), run

    def _greedy_group(self, model, ships, run) -> list[tuple[int, int]]:
        """Grow a group from the top candidates, each step adding the head that most raises its KL."""
        p = self.params
        flat = ships.flatten().argsort(descending=True, stable=True)[:p.candidates]
        pool = [divmod(int(i), model.n_heads) for i in flat]
        group, best = [pool[0]], float(ships[pool[0]])
        metric = kl_metric(run.logits)
        while len(group) < p.group_size:
            rest = [h for h in pool if h not in group]
            if not rest:
                break
            values = run_variants(model, run.tokens, [group + [h] for h in rest], metric, "uniform",
                                  run.attention_mask, p.max_rows, run, description="greedy safety group")
            i = int(values.argmax())
            if float(values[i]) < best * (1 + p.min_gain):
                break
            group.append(rest[i])
            best = float(values[i])
        return group
