"""Function-vector heads (Todd, Li, Sen Sharma, Mueller, Wallace, Bau, ICLR 2024, "Function vectors in large
language models"; Yin & Steinhardt 2025 find these heads, not induction heads, driving few-shot learning).

A function-vector (FV) head carries a compact representation of the task an in-context prompt
demonstrates: its output at the last position, averaged over clean few-shot prompts of a task, restores
the answer when it is patched into prompts whose demonstrations have their labels shuffled (so the task
cannot be read off the pairs). Task sets live in ``data/icl_tasks.json`` (input -> output word pairs:
antonyms, country -> capital, English -> French, present -> past tense). A prompt shows ``n_demos``
demonstrations ``"Q: x\\nA: y\\n\\n"`` and then the query ``"Q: x\\nA:"``; the answer is scored by the
first token of ``" y"``. Per task only the pairs whose answer's first token is well defined are kept
(:func:`kept_pairs`: a token exists, no other answer of the task starts with it, and it is not the
query's own first token, which copying would produce).

Clean behaviour first (``info["tasks"]``): per task, P(answer) and accuracy on the clean few-shot prompts
vs the same queries with shuffled labels. A task whose clean-minus-shuffled P(answer) interval is not above
0 is left out with that reason; with none left the result is ``not_applicable`` with the measured numbers.

Columns (on the discovery prompts of the tasks kept):

- ``function_vector_score``: the average indirect effect (AIE) of the head: the rise of P(answer) at the
  last position of a shuffled-label prompt when the head's output ``z`` there is replaced by its mean over
  the task's clean few-shot prompts (at their last position), averaged over the prompts of each task and
  then over the tasks. One batched :func:`headlens.methods.run_variants` over every head at the last
  position (:class:`TaskMeanPatch`).
- ``function_vector_score_lo`` / ``_hi``: the bootstrap-t interval over the prompts, resampled within
  their task.
- ``function_vector_<task>``: the AIE on each task alone.

Label rule: the claimed heads are the ``n_top`` best by AIE (the paper's 10) whose interval lies above
``min_aie`` (0.001: a tenth of a percentage point of P(answer), far above the ~1e-6 float noise of a
patch that changes nothing);
they are labelled only if their confirmation check is significant. Confirmation (held-out query pairs,
never a discovery query): P(answer) on clean few-shot prompts with the claimed heads mean-ablated
together must fall more than with ``n_random`` draws of as many random heads from the same layers, at
``p <= alpha``; the effect's floor is P(answer) with shuffled labels.

The function vector (``info["function_vector"]``): per task, the sum over the ``n_top`` best heads of
their mean output through ``W_O`` (a ``d_model`` vector), added to the residual stream entering layer
``fv_layer`` (default ``n_layers // 3``, the paper's choice) at the last position of zero-shot prompts
``"Q: x\\nA:"`` (the confirmation queries). Reported: zero-shot P(answer) and accuracy without it, with it,
and with the same sum over layer-matched random heads (the control), each with the paired interval of
the change.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..data import file_or_data
from ..errors import HeadlensError
from ..methods import Intervention, clean_run, forward_from, random_head_sets, run_variants
from ..methods.metrics import PositionMetric, positioned
from ..models import left_pad
from ..results import DetectorResult, head_frame, head_names
from ..stats import bootstrap_t_ci
from .base import Detector, ReviewParams, top_heads

CONFIRM_SEED = 7919   # the confirmation split's seed offset (as the other detectors')


def load_icl_tasks(name: str = "icl_tasks.json") -> dict[str, list[tuple[str, str]]]:
    """``{task: [(input, output), ...]}`` from a JSON file (in ``data/`` or a path) shaped
    ``{"tasks": {name: [{"input": x, "output": y}, ...]}}``."""
    try:
        raw = json.loads(file_or_data(name).read_text())["tasks"]
        return {t: [(str(p["input"]), str(p["output"])) for p in pairs] for t, pairs in raw.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise HeadlensError(f"{name} is not an in-context task file ({{'tasks': {{name: [{{'input': x, "
                            f"'output': y}}]}}}}): {e}") from None


def first_token(tokenizer, text: str) -> int | None:
    """The first token of ``" " + text`` (how an answer after ``"A:"`` starts), None if there is none."""
    ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids else None


def kept_pairs(tokenizer, pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str, int]], dict[str, int]]:
    """The pairs whose answer's first token is well defined, as ``(x, y, token)``, and how many were
    dropped for each reason: ``no_token``; ``shared_first_token`` (another answer of the task that is a
    different word starts with the same token, so the token cannot tell them apart); ``copy`` (the answer's
    first token is the query's, which copying the query would produce)."""
    tok = {y: first_token(tokenizer, y) for _, y in pairs}
    owners: dict[int, set[str]] = {}
    for y, t in tok.items():
        if t is not None:
            owners.setdefault(t, set()).add(y)
    kept, dropped = [], {"no_token": 0, "shared_first_token": 0, "copy": 0}
    for x, y in pairs:
        t = tok[y]
        if t is None:
            dropped["no_token"] += 1
        elif len(owners[t]) > 1:
            dropped["shared_first_token"] += 1
        elif t == first_token(tokenizer, x):
            dropped["copy"] += 1
        else:
            kept.append((x, y, t))
    return kept, dropped


def prompt_text(demos: list[tuple[str, str]], query: str) -> str:
    """``"Q: x\\nA: y\\n\\n"`` per demonstration, then ``"Q: query\\nA:"`` (Todd et al.'s template)."""
    return "".join(f"Q: {x}\nA: {y}\n\n" for x, y in demos) + f"Q: {query}\nA:"


def derange(n: int, g: torch.Generator) -> list[int]:
    """A seeded permutation of ``range(n)`` with no fixed point (a random cycle), for ``n >= 2``.

    >>> p = derange(5, torch.Generator().manual_seed(0))
    >>> sorted(p) == list(range(5)) and all(p[i] != i for i in range(5))
    True
    """
    order = torch.randperm(n, generator=g).tolist()
    out = [0] * n
    for i in range(n):
        out[order[i]] = order[(i + 1) % n]
    return out


@dataclass
class IclPrompts:
    """Few-shot prompts of several tasks (token lists, each starting with the model's start token):
    ``clean`` and ``shuffled`` (the same demonstrations and query, the demonstrations' labels deranged),
    ``zero_shot`` (the query alone), the answer's first token ``target`` ``[n]`` and the ``task`` index of
    each prompt ``[n]``."""
    clean: list[list[int]]
    shuffled: list[list[int]]
    zero_shot: list[list[int]]
    target: Int[Tensor, " n"]
    task: Int[Tensor, " n"]
    queries: list[str]


def icl_prompts(model, pairs: list[tuple[str, str, int]], queries: list[int], demo_pool: list[int],
                n_demos: int, task: int, g: torch.Generator) -> IclPrompts:
    """One prompt per query index (into ``pairs``): ``n_demos`` demonstrations drawn (seeded) from
    ``demo_pool`` less the query itself."""
    clean, shuffled, zero = [], [], []
    for q in queries:
        pool = [i for i in demo_pool if i != q]
        if len(pool) < n_demos:
            raise HeadlensError(f"function_vector needs {n_demos} demonstrations besides each query, the task "
                                f"has {len(pool)}: lower n_demos")
        demos = [pool[i] for i in torch.randperm(len(pool), generator=g)[:n_demos].tolist()]
        perm = derange(n_demos, g) if n_demos > 1 else [0]
        x = pairs[q][0]
        clean.append(model.encode(prompt_text([pairs[d][:2] for d in demos], x)))
        shuffled.append(model.encode(prompt_text([(pairs[d][0], pairs[demos[perm[i]]][1])
                                                  for i, d in enumerate(demos)], x)))
        zero.append(model.encode(prompt_text([], x)))
    return IclPrompts(clean, shuffled, zero, torch.tensor([pairs[q][2] for q in queries], dtype=torch.long),
                      torch.full((len(queries),), task, dtype=torch.long), [pairs[q][0] for q in queries])


def concat(parts: list[IclPrompts]) -> IclPrompts:
    return IclPrompts(sum((p.clean for p in parts), []), sum((p.shuffled for p in parts), []),
                      sum((p.zero_shot for p in parts), []), torch.cat([p.target for p in parts]),
                      torch.cat([p.task for p in parts]), sum((p.queries for p in parts), []))


def answer_metric(target: Int[Tensor, " n"], columns: int = 2) -> PositionMetric:
    """Per prompt, at the last position (the only one read): ``[n, 2]`` P(answer's first token) and whether
    it is the top token; ``columns=1``: ``[n]``, the probability alone."""
    def metric(logits: Float[Tensor, "n 1 vocab"]) -> Tensor:
        last = torch.softmax(logits[:, -1].float(), -1)
        t = target[:len(last)].to(last.device)
        p = last.gather(-1, t[:, None])[:, 0]
        return p if columns == 1 else torch.stack([p, (last.argmax(-1) == t).float()], -1)
    return positioned(metric, [-1])


class TaskMeanPatch(Intervention):
    """The selected heads' output replaced by their mean over a task's clean prompts: ``means`` ``{layer:
    [n_tasks, n_heads, d_head]}``, ``task`` ``[n_prompts]`` (which mean each prompt of the run gets). Used
    with ``(layer, head, position)`` variants, it writes only there (the AIE patch)."""
    name = "task_mean_patch"
    offset_aware = True      # one value per prompt for every position: right on the last positions alone

    def __init__(self, means: dict[int, Tensor], task: Tensor):
        self.means = means
        self.task = task

    def forward(self, z, site):
        per_prompt = self.means[site.layer][self.task.to(self.means[site.layer].device)]   # [n, H, d_head]
        return site.rows(per_prompt)[:, None]                                            # [rows, 1, H, d_head]

    def key(self):
        return ("task_mean_patch", self.task, *(self.means[l] for l in sorted(self.means)))


def mean_interval(per_item: Tensor, strata: list | None, seed: int, n_boot: int, level: float,
                  bounds=None) -> tuple[float, float, float]:
    """The mean over strata of each stratum's mean of ``per_item`` ``[n]`` and its bootstrap-t interval."""
    x = per_item.float()[:, None, None]
    lo, hi = bootstrap_t_ci(x, n_boot, seed, level, strata=strata, bounds=bounds)
    if strata is None:
        m = float(per_item.float().mean())
    else:
        s = torch.as_tensor(strata)
        m = float(torch.stack([per_item[s == k].float().mean() for k in s.unique()]).mean())
    return m, float(lo.flatten()[0]), float(hi.flatten()[0])


class FunctionVectorDetector(Detector):
    name = "function_vector"
    cost = 1.5   # share of a scan (relative; headlens.runtime.distributed.plan)
    summary = ("its mean output on few-shot prompts carries the task: patched into shuffled-label prompts it "
               "restores the answer")
    paper = "Todd et al. 2024, Function vectors in large language models"
    key_columns = ("score_lo",)
    opt_in = True   # every head patched on every shuffled prompt: see docs/detectors/function_vector.md

    @dataclass
    class Params(ReviewParams):
        tasks_file: str = "icl_tasks.json"   # in data/ (or a path)
        n_demos: int = 10            # demonstrations per prompt (the paper's 10)
        discovery_prompts: int = 12  # shuffled/clean prompt pairs per task on which each head is patched
        confirm_queries: int = 6     # query pairs per task held out for the confirmation check and zero-shot
        n_top: int = 10              # heads claimed at most (and summed into the function vector): the paper's 10
        min_aie: float = 0.001       # a claimed head's AIE interval lies above this (0.1 points of P)
        fv_layer: int = -1           # layer whose residual input gets the function vector (-1: n_layers // 3)

    def run(self, model, seed: int = 0) -> DetectorResult:
        p = self.params
        if p.n_demos < 1 or p.discovery_prompts < 2 or p.confirm_queries < 2 or p.n_top < 1:
            raise HeadlensError("function_vector needs n_demos >= 1, discovery_prompts >= 2, confirm_queries "
                                ">= 2 and n_top >= 1")
        layer = model.n_layers // 3 if p.fv_layer == -1 else p.fv_layer
        if not 0 <= layer < model.n_layers:
            raise HeadlensError(f"function_vector fv_layer must be in 0..{model.n_layers - 1} (or -1), "
                                f"not {p.fv_layer}")
        tasks = load_icl_tasks(p.tasks_file)
        disc, conf, report = self._prompts(model, tasks, seed)
        if not disc:
            return self.not_applicable(model, "no task has enough pairs with a well-defined answer token "
                                       f"({p.n_demos} demonstrations + {p.discovery_prompts} + "
                                       f"{p.confirm_queries} queries)", tasks=report)
        kept = self._behaviour(model, disc, report, seed)
        if not kept:
            summary = "; ".join(f"{t}: clean P {r['clean_p']:.3f} vs shuffled {r['shuffled_p']:.3f}"
                                for t, r in report.items() if "clean_p" in r)
            return self.not_applicable(model, "the model does none of the in-context tasks: no task's clean "
                                       f"few-shot P(answer) is above its shuffled-label P(answer) ({summary})",
                                       tasks=report)
        names = list(kept)
        disc = concat([disc[t] for t in names])
        conf = concat([conf[t] for t in names])
        disc.task = torch.cat([torch.full((p.discovery_prompts,), i) for i in range(len(names))])
        conf.task = torch.cat([torch.full((p.confirm_queries,), i) for i in range(len(names))])

        means = self.task_means(model, disc.clean, disc.task, len(names))
        per_item = self.indirect_effects(model, disc.shuffled, disc.target, disc.task, means)   # [n, L, H]
        strata = disc.task.tolist()
        score = torch.stack([per_item[disc.task == i].mean(0) for i in range(len(names))]).mean(0)
        ci = self.interval(per_item, seed, strata=strata, bounds=(-1, 1))
        per_task = {t: per_item[disc.task == i].mean(0) for i, t in enumerate(names)}
        claimed = [h for h in top_heads(score, p.n_top) if ci["score_lo"][h] > p.min_aie]
        causal = self._confirm(model, claimed, score, conf, seed)
        labelled, reason = self.decide(claimed, causal)
        if not claimed:
            reason = (f"none of the {p.n_top} heads with the largest average indirect effect has an interval above "
                      f"{p.min_aie}; the top rows are the best candidates")
        fv = self.function_vector_effect(model, means, top_heads(score, p.n_top), conf, layer, names, seed)
        frame = head_frame(model, self.name, score, {**ci, **per_task})
        info = {"tasks": report, "tasks_used": names, "claimed": head_names(claimed),
                "function_vector": fv, "interval_unit": "prompt (resampled within its task)",
                "interval_units": int(len(disc.target)), "n_demos": p.n_demos,
                "start_token": model.info.start_token}
        return DetectorResult(role=self.name, frame=frame, labelled=labelled, reason=reason, causal=causal,
                              params=self.param_dict(), info=info)

    # -- prompts and behaviour ------------------------------------------------------------------------

    def _prompts(self, model, tasks, seed):
        """Per task with enough kept pairs: discovery prompts (queries and demonstrations from the discovery
        pairs) and confirmation prompts (held-out queries; demonstrations from every other pair)."""
        p = self.params
        disc, conf, report = {}, {}, {}
        for i, (name, pairs) in enumerate(tasks.items()):
            kept, dropped = kept_pairs(model.tokenizer, pairs)
            report[name] = {"pairs": len(pairs), "kept": len(kept), "dropped": dropped}
            if len(kept) < p.confirm_queries + p.n_demos + 2:
                report[name]["left_out"] = (f"{len(kept)} pairs with a well-defined answer token, fewer than "
                                            f"{p.confirm_queries} held-out queries + {p.n_demos} demonstrations + 2")
                continue
            g = torch.Generator().manual_seed(seed * 1000 + CONFIRM_SEED + i)
            order = torch.randperm(len(kept), generator=g).tolist()
            held, rest = order[:p.confirm_queries], order[p.confirm_queries:]
            queries = [rest[j % len(rest)] for j in range(p.discovery_prompts)]   # cycled if there are few
            disc[name] = icl_prompts(model, kept, queries, rest, p.n_demos, i, g)
            conf[name] = icl_prompts(model, kept, held, order, p.n_demos, i, g)
        return disc, conf, report

    def _behaviour(self, model, disc, report, seed) -> list[str]:
        """Clean vs shuffled-label P(answer) and accuracy per task on the discovery prompts (into ``report``);
        the tasks whose paired clean-minus-shuffled P(answer) interval lies above 0."""
        p = self.params
        kept = []
        for name, prompts in disc.items():
            clean = self._answers(model, prompts.clean, prompts.target)
            shuffled = self._answers(model, prompts.shuffled, prompts.target)
            diff, lo, hi = mean_interval(clean[:, 0] - shuffled[:, 0], None, seed, p.n_boot, p.ci_level, (-1, 1))
            _, clo, chi = mean_interval(clean[:, 0], None, seed, p.n_boot, p.ci_level, (0, 1))
            report[name].update({
                "clean_p": float(clean[:, 0].mean()), "clean_p_lo": clo, "clean_p_hi": chi,
                "clean_accuracy": float(clean[:, 1].mean()), "shuffled_p": float(shuffled[:, 0].mean()),
                "shuffled_accuracy": float(shuffled[:, 1].mean()), "p_gain": diff, "p_gain_lo": lo,
                "p_gain_hi": hi, "n_prompts": int(len(clean))})
            if lo > 0:
                kept.append(name)
            else:
                report[name]["left_out"] = (f"clean few-shot P(answer) {clean[:, 0].mean():.3f} is not above the "
                                            f"shuffled-label {shuffled[:, 0].mean():.3f} (gain interval "
                                            f"[{lo:.3f}, {hi:.3f}])")
        return kept

    def _answers(self, model, prompts: list[list[int]], target: Tensor) -> Tensor:
        """``[n, 2]``: P(answer) and accuracy at the last position of left-padded prompts."""
        tokens, mask = self._pad(model, prompts)
        metric = answer_metric(target)
        return clean_run(model, tokens, mask, keep_z=False, positions=metric.positions).value(metric).float().cpu()

    @staticmethod
    def _pad(model, prompts: list[list[int]]) -> tuple[Tensor, Tensor]:
        tokens, mask = left_pad(prompts, model.pad_id())
        model.check_length(tokens.shape[1], "in-context prompt")
        return tokens.to(model.device), mask.to(model.device)

    # -- the score ------------------------------------------------------------------------------------

    def task_means(self, model, prompts: list[list[int]], task: Tensor, n_tasks: int) -> dict[int, Tensor]:
        """``{layer: [n_tasks, n_heads, d_head]}``: each head's output ``z`` at the last position, averaged
        over each task's clean prompts."""
        tokens, mask = self._pad(model, prompts)
        run = clean_run(model, tokens, mask, positions=[tokens.shape[1] - 1])
        t = task.to(run.z[0].device)
        return {l: torch.stack([z[t == i, -1].float().mean(0) for i in range(n_tasks)]).to(z.dtype)
                for l, z in run.z.items()}

    def indirect_effects(self, model, prompts: list[list[int]], target: Tensor, task: Tensor,
                         means: dict[int, Tensor]) -> Float[Tensor, "n layer head"]:
        """Per prompt and head: P(answer) with the head's output at the last position of the shuffled-label
        prompt replaced by its task mean, minus P(answer) without (one batched sweep over every head)."""
        tokens, mask = self._pad(model, prompts)
        metric = answer_metric(target, columns=1)
        run = clean_run(model, tokens, mask, positions=metric.positions)
        base = run.value(metric).float().cpu()                                           # [n]
        heads = model.heads()
        values = run_variants(model, tokens, [[(l, h, -1)] for l, h in heads], metric, TaskMeanPatch(means, task),
                              mask, self.batch_size, run, description="function-vector patching")
        effect = values.float().cpu() - base[None]                                       # [L*H, n]
        return effect.T.reshape(len(base), model.n_layers, model.n_heads)

    # -- the confirmation check and the function vector -----------------------------------------------

    def _confirm(self, model, claimed, score, conf: IclPrompts, seed):
        """The confirmation check on the held-out queries' clean few-shot prompts: P(answer) per prompt
        (accuracy recorded too); floor: the same queries' P(answer) with shuffled labels."""
        p = self.params
        tokens, mask = self._pad(model, conf.clean)
        metric = answer_metric(conf.target)
        run = clean_run(model, tokens, mask, positions=metric.positions)
        floor = float(self._answers(model, conf.shuffled, conf.target)[:, 0].mean())
        check = self.confirm(model, claimed, score, seed, "P(answer) on held-out clean few-shot prompts "
                             f"({p.ablation} ablation)", "lower", floor=floor, run=run, metric=metric)
        acc = check.raw.nanmean(1)[:, 1]
        check.extra.update({"clean_accuracy": float(acc[0]), "top_k_ablated_accuracy": float(acc[1]),
                            "random_k_ablated_accuracy_mean": float(acc[2:].mean())})
        return check

    def function_vectors(self, model, means: dict[int, Tensor], heads: list[tuple[int, int]]
                         ) -> Float[Tensor, "n_tasks d_model"]:
        """Per task, the sum over ``heads`` of their mean output through ``W_O`` (``[n_tasks, d_model]``)."""
        w_o = model.bridge.W_O          # [L, H, d_head, d_model]; the bridge re-stacks it on each access
        n_tasks = next(iter(means.values())).shape[0]
        out = torch.zeros(n_tasks, w_o.shape[-1], device=means[0].device)
        for l, h in heads:
            out += means[l][:, h].float() @ w_o[l, h].float().to(out.device)
        return out

    def zero_shot(self, model, prompts: list[list[int]], target: Tensor, task: Tensor, layer: int,
                  vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{name: [n, 2]}`` P(answer) and accuracy of zero-shot prompts with each task's vector (``[n_tasks,
        d_model]``, or None for none) added to the residual stream entering ``layer`` at the last position."""
        tokens, mask = self._pad(model, prompts)
        run = clean_run(model, tokens, mask, keep_z=False, positions=[tokens.shape[1] - 1])
        metric = answer_metric(target)
        last = torch.tensor([tokens.shape[1] - 1])
        out = {}
        for name, vec in vectors.items():
            resid = run.resid[layer].to(model.device).clone()
            if vec is not None:
                resid[:, -1] += vec[task.to(vec.device)].to(resid.device, resid.dtype)
            logits = forward_from(model, resid, layer, mask, (), last, run.block_returns_tuple)
            out[name] = metric.on_positions(logits).float().cpu()
        return out

    def function_vector_effect(self, model, means, heads, conf: IclPrompts, layer: int, names: list[str],
                               seed: int) -> dict:
        """The function vector of ``heads`` and of as many layer-matched random heads (the control) added to
        the held-out queries' zero-shot prompts: P(answer) and accuracy, with the paired interval of the change."""
        p = self.params
        control = random_head_sets(model, len(heads), 1, seed, exclude=heads, layers=[l for l, _ in heads])[0]
        vectors = {"none": None, "function_vector": self.function_vectors(model, means, heads)}
        if len(control) == len(heads):          # a model with no other heads has no control
            vectors["random_heads"] = self.function_vectors(model, means, control)
        values = self.zero_shot(model, conf.zero_shot, conf.target, conf.task, layer, vectors)
        strata = conf.task.tolist()
        out = {"layer": layer, "heads": head_names(heads), "control_heads": head_names(control),
               "norm": {t: float(vectors["function_vector"][i].norm()) for i, t in enumerate(names)},
               "n_prompts": int(len(conf.target))}
        for name, v in values.items():
            for j, what in ((0, "p"), (1, "accuracy")):
                m, lo, hi = mean_interval(v[:, j], strata, seed, p.n_boot, p.ci_level, (0, 1))
                out[f"zero_shot_{what}_{name}"] = {"mean": m, "lo": lo, "hi": hi,
                                                   "per_task": {t: float(v[conf.task == i, j].mean())
                                                                for i, t in enumerate(names)}}
                if name != "none":
                    m, lo, hi = mean_interval(v[:, j] - values["none"][:, j], strata, seed, p.n_boot, p.ci_level,
                                              (-1, 1))
                    out[f"zero_shot_{what}_gain_{name}"] = {"mean": m, "lo": lo, "hi": hi}
        return out
