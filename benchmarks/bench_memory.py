"""Benchmark: peak host memory (RSS) of loading and of ``headlens scan``, per detector, on the CPU.

    python benchmarks/bench_memory.py --json benchmarks/results/cpu_memory.json
    python benchmarks/bench_memory.py --only gemma --detectors induction     # one part, one detector

Each measurement runs in a fresh Python process (imports of torch, transformers and TransformerLens
included) and reports that process's peak resident set size (``VmHWM``) and wall time:

- ``load``: ``headlens.load_model`` alone, against the bytes of the loaded weights;
- ``smollm2``: ``headlens scan smollm2-135m -d DET`` for each detector, against the target
  "at most 1.5 x the float32 weights + 1.5 GB";
- ``gemma``: a random-weight Gemma-3-like model with a 262,144-token vocabulary (18 layers x 4 heads,
  1 KV head, d_model 640, float32; built from a config, saved to a temporary folder with SmolLM2's
  tokenizer, whose 49,152 ids all lie inside the model's vocabulary) and loaded through the public
  path: ``headlens scan FOLDER -d induction,successor,copy_suppression``, against 4 GB.
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

ROOT = Path(__file__).resolve().parents[1]
GEMMA = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
             num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
             tie_word_embeddings=True)
SMOL_DETECTORS = ["induction", "successor", "copy_suppression", "safety", "retrieval"]
GEMMA_DETECTORS = ["induction", "successor", "copy_suppression"]
GB = 1e9


def child(argv: list[str]) -> dict:
    """Run one measurement in a fresh process; return its peak RSS and wall time."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", out, "--", *argv], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    result = json.loads(Path(out).read_text()) if Path(out).stat().st_size else {}
    os.unlink(out)
    result.update(rc=proc.returncode, wall_s=round(wall, 1))
    if proc.returncode:
        result["stderr_tail"] = proc.stderr[-2000:]
    return result


def peak_rss() -> int:
    """This process's peak resident set size in bytes: ``VmHWM`` (``ru_maxrss`` would carry over the
    parent's peak across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(out: str, argv: list[str]) -> None:
    """Inside the child: ``load MODEL`` or ``scan ...`` (the CLI), then write the peak RSS."""
    import headlens  # noqa: F401  (imports counted in the peak, as a user would see them)
    from headlens.cli import main

    result = {}
    t0 = time.perf_counter()
    if argv[0] == "load":
        from headlens import load_model

        m = load_model(argv[1])
        result["weights_gb"] = round(m.weight_bytes() / GB, 3)
    else:
        sys.argv = ["headlens", *argv]
        try:
            main()
        except SystemExit as exc:
            result["exit"] = exc.code
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["peak_rss_gb"] = round(peak_rss() / GB, 3)
    Path(out).write_text(json.dumps(result))


def gemma_folder(root: Path) -> Path:
    """The 262k-vocabulary Gemma-3-like model with random weights, saved with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from headlens.models import builtin_gguf, convert_gguf

    folder = root / "gemma-262k"
    tok = AutoTokenizer.from_pretrained(convert_gguf(builtin_gguf("smollm2-135m")))
    cfg = Gemma3TextConfig(**GEMMA, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.eos_token_id, attn_implementation="eager")
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--only", choices=["load", "smollm2", "gemma"], action="append")
    ap.add_argument("--detectors", help="comma-separated detectors (default: each one of the part)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args.child, args.rest)
    parts = args.only or ["load", "smollm2", "gemma"]
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
                          "(shared with other jobs)", "python": platform.python_version()}
    smol_weights_gb = 134_515_008 * 4 / GB  # SmolLM2-135M parameters in float32 (tied embedding)
    with tempfile.TemporaryDirectory(prefix="headlens-bench-mem-") as tmp:
        tmp = Path(tmp)
        gemma = gemma_folder(tmp) if {"load", "gemma"} & set(parts) else None
        if "load" in parts:
            results["load"] = {"smollm2-135m": child(["load", "smollm2-135m"]),
                               "gemma-262k": child(["load", str(gemma)])}
            print(json.dumps(results["load"], indent=1), flush=True)
        if "smollm2" in parts:
            target = 1.5 * smol_weights_gb + 1.5
            dets = args.detectors.split(",") if args.detectors else SMOL_DETECTORS
            results["smollm2"] = {"target_gb": round(target, 3), "float32_weights_gb": round(smol_weights_gb, 3)}
            for det in dets:
                r = child(["scan", "smollm2-135m", "-d", det, "-o", str(tmp / f"smol-{det}.csv")])
                r["within_target"] = r.get("peak_rss_gb", 99) <= target
                results["smollm2"][det] = r
                print(det, json.dumps(r), flush=True)
        if "gemma" in parts:
            dets = args.detectors.split(",") if args.detectors else GEMMA_DETECTORS
            results["gemma"] = {"target_gb": 4.0, "shape": GEMMA}
            r = child(["scan", str(gemma), "-d", ",".join(dets), "-o", str(tmp / "gemma.csv")])
            r["within_target"] = r.get("peak_rss_gb", 99) <= 4.0
            results["gemma"][",".join(dets)] = r
            print("gemma", json.dumps(r), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp_json = Path(args.json).with_suffix(".tmp")
        tmp_json.write_text(json.dumps(results, indent=1) + "\n")
        tmp_json.rename(args.json)


if __name__ == "__main__":
    main()
