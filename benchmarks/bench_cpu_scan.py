"""Benchmark: the README's scan of the embedded model on this CPU: wall time, per-detector seconds, peak RSS.

    python benchmarks/bench_cpu_scan.py --json benchmarks/results/cpu_scan_smollm2.json [--detectors ...]

Runs ``headlens scan smollm2-135m`` (all five roles unless ``--detectors``) in a fresh process, exactly as
a user would (imports, model load and the CSV/JSON writes included), and reports its wall time, its peak
resident set size (``ru_maxrss`` of the child), the per-detector and per-step seconds from the JSON
sidecar, each role's top-10 heads and causal p-value. Run it on a quiet machine: timings of a shared CPU
are not speed figures (the load average before and after is recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--detectors", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--target-s", type=float, default=300.0)
    ap.add_argument("extra", nargs="*", help="more arguments for headlens scan (after --)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "catalogue.csv"
        cmd = [sys.executable, "-m", "headlens", "scan", a.model, "--out", str(out), *a.extra]
        if a.detectors:
            cmd += ["--detectors", a.detectors]
        before = loadavg()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if proc.returncode:
            sys.exit(f"scan failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        meta = json.loads(out.with_suffix(".json").read_text())
        from headlens import read_catalogue
        cat = read_catalogue(out)
    roles = {}
    for role, res in cat.results.items():
        check = res.causal_check
        roles[role] = {"status": res.status, "reason": res.reason,
                       "labelled": [f"L{l}H{h}" for l, h in res.labelled],
                       "top10": [f"L{l}H{h}" for l, h in res.heads(10)],
                       "p_value": check.p_value if check else None}
        if check is not None:
            d = check.to_dict()
            roles[role]["check"] = {k: d.get(k) for k in ("tested", "top_heads", "clean", "top_k_ablated",
                                                          "random_k_ablated_mean", "random_k_ablated_std",
                                                          "n_random", "n_as_extreme", "matched", "alpha",
                                                          "significant", "z", "n_units", "floor", "effect",
                                                          "effect_lo", "effect_hi")}
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores; load average before {before}, after {loadavg()}",
        "command": " ".join(["headlens", *cmd[3:]]).replace(str(out), "catalogue.csv"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": round(wall, 1), "target_wall_s": a.target_s, "target_met": wall <= a.target_s,
        "peak_rss_gb": round(peak / 1e9, 3),
        "seconds": meta.get("timings_s"), "steps_s": meta.get("steps_s"), "roles": roles,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
