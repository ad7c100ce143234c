"""Benchmark: the retrieval detector on longer contexts, and KV-cached decoding against re-running the
whole context for every generated token.

    python benchmarks/bench_retrieval.py                                  # SmolLM2-135M, CPU
    python benchmarks/bench_retrieval.py --lengths 1000 2000 4000 --depths 0 0.25 0.5 0.75 1 --json out.json

Prints the top heads (copy-paste score), needle recall per context length, the causal check (needle
recall clean / top-k uniform / random-k uniform), the detector's wall time, and the per-token time of
cached decoding vs a full re-run at the longest length (``--compare-tokens`` tokens).
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
from headlens.detectors.retrieval import load_needles, needle_prompts  # noqa: E402
from headlens.methods.generation import greedy_generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--needles", type=int, default=6)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--n-random", type=int, default=5)
    ap.add_argument("--causal-runs", type=int, default=6)
    ap.add_argument("--compare-tokens", type=int, default=8)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    model = headlens.load_model(a.model, device=a.device)
    det = get_detector("retrieval", context_lengths=a.lengths, depths=a.depths, n_needles=a.needles,
                       top_k=a.top_k, n_random=a.n_random, causal_runs=a.causal_runs)
    t0 = time.perf_counter()
    res = det.run(model, seed=0)
    seconds = time.perf_counter() - t0
    print(f"{model.info.name} on {a.device}: {res.info['n_runs']} runs, {res.info['n_retrieved']} retrieved, "
          f"mean recall {res.info['needle_recall']:.3f}, {seconds:.1f} s")
    print("retrieved by length:", res.info["retrieved_by_length"])
    top = res.top(10)
    print(top.to_string(index=False))
    c = res.causal
    if c:
        print(f"causal ({c['metric']}): clean {c['clean']:.3f}, top-{c['k']} {c['top_k_ablated']:.3f}, "
              f"random-{c['k']} {c['random_k_ablated_mean']:.3f} +- {c['random_k_ablated_std']:.3f}")
    # Cached decoding vs re-running the whole context per token, at the longest length.
    run = needle_prompts(model, load_needles("needles.json")[:1], headlens.data_path("haystack.txt").read_text(),
                         [max(a.lengths)], [0.5], model.info.has_chat_template, det.params.template)[0]
    n = a.compare_tokens
    t0 = time.perf_counter()
    greedy_generate(model, [run.tokens], n, record_top1=True)
    cached = (time.perf_counter() - t0) / n
    x = torch.tensor([run.tokens], device=model.device)
    t0 = time.perf_counter()
    for _ in range(n):
        x = torch.cat([x, model.bridge(x)[:, -1].argmax(-1, keepdim=True)], 1)
    rerun = (time.perf_counter() - t0) / n
    print(f"per generated token at {len(run.tokens)} tokens: cached {cached:.3f} s (prefill included), "
          f"full re-run {rerun:.3f} s "
          f"({rerun / cached:.1f}x)")
    if a.json:
        out = {"model": model.info.as_dict(), "platform": platform.platform(), "seconds": seconds,
               "info": res.info, "causal": c, "top10": top.to_dict(orient="records"),
               "per_token_cached_s": cached, "per_token_rerun_s": rerun}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
