"""The PASTA evaluation table on SmolLM2-135M-Instruct (CPU): profile on each task's training split, then
steer on its held-out split with the profiled heads, catalogue heads, random heads and all heads.

    python benchmarks/steering_eval.py benchmarks/results/steering_smollm2.json --tasks counterfact,json_format

Profiling is coarse to fine (every layer's heads together, then each head of the ``--top-layers`` best
layers); the profiled set is :func:`headlens.steering.select_heads` of that profile (top ``--k`` heads whose
gain interval lies above 0). The catalogue set is the ``--role`` heads labelled by the stored SmolLM2 scan
(``benchmarks/results/cpu_scan_smollm2.json``). The JSON is rewritten after each task.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import headlens as hl  # noqa: E402
from headlens.methods.steering import parse_heads  # noqa: E402
from headlens.steering import evaluate, head_id, profile_heads, select_heads  # noqa: E402

SCAN = Path(__file__).resolve().parent / "results" / "cpu_scan_smollm2.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--tasks", default="counterfact,json_format")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--n-train", type=int, default=16)
    ap.add_argument("--top-layers", type=int, default=2)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--n-random", type=int, default=3)
    ap.add_argument("--role", default="retrieval")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    catalogue = parse_heads(",".join(json.loads(SCAN.read_text())["roles"][args.role]["labelled"]))
    t0 = time.perf_counter()
    model = hl.load_model(args.model)
    out = {"what": "PASTA steering evaluation: profile on train, evaluate on held-out test",
           "model": model.info.name, "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores "
           "(shared with parallel work)", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "settings": vars(args), "catalogue_source": f"{SCAN.name}: {args.role} labelled heads",
           "load_s": round(time.perf_counter() - t0, 1), "tasks": {}}
    for name in args.tasks.split(","):
        t1 = time.perf_counter()
        profile = profile_heads(model, name, args.alpha, "train", coarse_to_fine=True, top_layers=args.top_layers,
                                n_train=args.n_train, seed=args.seed)
        profile_s = time.perf_counter() - t1
        profiled = select_heads(profile, k=args.k)
        t2 = time.perf_counter()
        sets = {"profiled": profiled, "catalogue": catalogue} if profiled else {"catalogue": catalogue}
        table = evaluate(model, name, sets, args.alpha, "test", n_train=args.n_train, n_random=args.n_random,
                         random_k=len(profiled) or len(catalogue), seed=args.seed)
        eval_s = time.perf_counter() - t2
        n_variants = model.n_layers + len(profile) + 2
        out["tasks"][name] = {
            "profile": {"seconds": round(profile_s, 1), "variants": n_variants, "examples": args.n_train,
                        "unsteered_score": profile.attrs["unsteered_score"],
                        "layer_gain": profile.attrs["layer_gain"],
                        "top": profile.head(12).to_dict("records")},
            "profiled_heads": [head_id(h) for h in profiled],
            "evaluation": {"seconds": round(eval_s, 1), "table": table.to_dict("records")}}
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))
        print(name, f"profile {profile_s:.0f} s, evaluation {eval_s:.0f} s")
        print(table.drop(columns=["heads"]).to_string())


if __name__ == "__main__":
    main()
