"""Benchmark: the retrieval detector on CPU (SmolLM2-135M by default): its time on a grid, one long needle
run, and the agreement of grids.

    python benchmarks/bench_retrieval.py --detector --json out.json          # the default grid, full detector
    python benchmarks/bench_retrieval.py --long 8192 --json out.json          # one run: prefill + 32 steps
    python benchmarks/bench_retrieval.py --agreement --json out.json          # sub-grids vs the 500-2000 grid

``--agreement`` decodes every run of the union grid (``--lengths`` x ``--depths`` x all needles; by
default the old default grid 500/1000/2000 tokens x 5 depths x 6 needles) once, then scores each sub-grid
(``--subgrids``, e.g. ``1000:0,0.5,1``) from those runs exactly as the detector does, and reports each
sub-grid's top-10 overlap with the full grid's top-10, the Spearman rank correlation over all heads, and
the prompt tokens it needs. Times are wall seconds and this process's CPU seconds (user + system), with the
machine's load average, since the CPU may be shared; peak memory is the resident set's high-water mark,
reset after the model is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import headlens  # noqa: E402
from headlens.detectors import get_detector  # noqa: E402
from headlens.detectors.retrieval import (  # noqa: E402
    MARKER,
    budget,
    copy_scores,
    decode_runs,
    load_needles,
    needle_prompts,
    rouge1_recall,
)
from headlens.methods.generation import encode_prompt, greedy_generate, stop_token_ids  # noqa: E402


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024


class Timer:
    def __enter__(self):
        reset_peak()
        self.wall, self.cpu, self.load = time.perf_counter(), cpu_s(), os.getloadavg()[0]
        return self

    def __exit__(self, *exc):
        self.figures = {"wall_s": time.perf_counter() - self.wall, "cpu_s": cpu_s() - self.cpu,
                        "peak_rss_bytes": peak_bytes(), "load_avg_1min_before": self.load,
                        "load_avg_1min_after": os.getloadavg()[0]}


def rank(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank)."""
    order = x.argsort(stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=x.dtype)
    for v in x.unique():
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = rank(a.flatten().double()), rank(b.flatten().double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top(score: torch.Tensor, k: int = 10) -> list[int]:
    return score.flatten().argsort(descending=True, stable=True)[:k].tolist()


def agreement(model, a) -> dict:
    det = get_detector("retrieval")
    p = det.params
    needles = load_needles(p.needles)
    chat = model.info.has_chat_template
    runs = needle_prompts(model, needles, headlens.data_path(p.haystack).read_text(encoding="utf-8"),
                          a.lengths, a.depths, chat, p.template)
    with Timer() as t:
        results = decode_runs(model, runs, p.max_new_tokens, stop_token_ids(model), budget(model))
    per_run = []
    for run, generated, top1 in results:
        recall = rouge1_recall(run.needle, model.tokenizer.decode(generated, skip_special_tokens=True))
        per_run.append((run, recall, copy_scores(run, generated, top1)))

    def grid_score(lengths, depths):
        chosen = [(r, rec, s) for r, rec, s in per_run if r.length in lengths and
                  any(abs(r.depth - d) < 1e-9 for d in depths)]
        kept = [s for r, rec, s in chosen if rec > p.recall_threshold]
        score = torch.stack(kept).mean(0) if kept else torch.zeros(model.n_layers, model.n_heads)
        return score, len(chosen), len(kept), sum(len(r.tokens) for r, _, _ in chosen)

    full, n_full, kept_full, tokens_full = grid_score(a.lengths, a.depths)
    name = lambda i: f"L{i // model.n_heads}H{i % model.n_heads}"  # noqa: E731
    out = {"union_grid": {"lengths": a.lengths, "depths": a.depths, "n_runs": n_full, "n_retrieved": kept_full,
                          "prompt_tokens": tokens_full, "top10": [name(i) for i in top(full)],
                          "top10_scores": [float(full.flatten()[i]) for i in top(full)], **t.figures},
           "subgrids": []}
    for spec in a.subgrids:
        ls, ds = spec.split(":")
        lengths, depths = [int(x) for x in ls.split(",")], [float(x) for x in ds.split(",")]
        score, n, kept, tokens = grid_score(lengths, depths)
        out["subgrids"].append({"grid": spec, "n_runs": n, "n_retrieved": kept, "prompt_tokens": tokens,
                                "token_share": tokens / tokens_full, "top10": [name(i) for i in top(score)],
                                "top10_overlap": len(set(top(score)) & set(top(full))),
                                "spearman_all_heads": spearman(score, full)})
        print(json.dumps(out["subgrids"][-1]))
    print(json.dumps(out["union_grid"]))
    return out


def detector(model, a) -> dict:
    det = get_detector("retrieval", **({"preset": a.preset} if a.preset else {}))
    with Timer() as t:
        res = det.run(model, seed=0)
    c = res.causal
    out = {"preset": det.params.preset, **t.figures, "info": res.info, "causal": c, "labelled":
           [f"L{l}H{h}" for l, h in res.labelled],
           "top10": [(f"L{r.layer}H{r.head}", float(r.retrieval_score)) for r in res.top(10).itertuples()]}
    print(json.dumps({k: out[k] for k in ("preset", "wall_s", "cpu_s", "peak_rss_bytes", "top10")}))
    return out


def long_run(model, a) -> dict:
    det = get_detector("retrieval")
    needles = load_needles(det.params.needles)[:1]
    hay = headlens.data_path(det.params.haystack).read_text(encoding="utf-8")
    chat = model.info.has_chat_template
    overhead = sum(len(x) for x in encode_prompt(model, det.params.template.format(
        context=MARKER, question=needles[0]["question"]), chat, marker=MARKER))      # chat header + question
    run = needle_prompts(model, needles, hay, [a.long - a.steps - overhead], [0.5], chat, det.params.template)[0]
    with Timer() as t:
        gen = greedy_generate(model, [run.tokens], a.steps, record_top1=True, stop_ids=())
    out = {"tokens": len(run.tokens) + a.steps, "prompt_tokens": len(run.tokens), "steps": a.steps, **t.figures,
           "answer": model.tokenizer.decode(gen.tokens[0], skip_special_tokens=True)}
    print(json.dumps(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--detector", action="store_true", help="time the whole detector (causal check included)")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--long", type=int, default=0, help="one needle run of this many tokens (prompt + steps)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--agreement", action="store_true")
    ap.add_argument("--lengths", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--subgrids", nargs="+", default=["1000:0,0.5,1", "500,1000:0,0.5,1", "1000:0,0.25,0.5,0.75,1",
                                                      "500:0,0.5,1", "2000:0,0.5,1", "500,1000,2000:0.5"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = headlens.load_model(a.model, device=a.device)
    out = {"model": model.info.as_dict(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "load_s": time.perf_counter() - t0}
    if a.agreement:
        out["agreement"] = agreement(model, a)
    if a.detector:
        out["detector"] = detector(model, a)
    if a.long:
        out["long_run"] = long_run(model, a)
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2, default=str)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
