"""Benchmark: a Llama-3.1-8B-shaped model (random weights, bfloat16) loaded and scanned on one GPU.

    python benchmarks/bench_gpu_8b.py benchmarks/results/gpu_llama8b.json            # on one H100
    python benchmarks/bench_gpu_8b.py /tmp/tiny.json --tiny --device cpu               # a smoke test

Steps (one command; the first runs in a child process so that its memory is not counted):

1. build: the model is created in bfloat16 directly on the GPU (random init, no host copy) and saved
   with ``save_pretrained`` (safetensors) to ``--folder`` (default: a temporary folder), with
   SmolLM2-135M's tokenizer. The vocabulary stays Llama-3.1's 128,256 (the real size of the
   embedding and of the logits); the tokenizer's 49,152 ids all lie inside it, so every prompt is
   valid and ids above 49,151 are simply never fed in (they can still be predicted, and decode to
   an empty string). Save time is reported separately (``build.save_s``).
2. load: ``headlens.load_model(folder, device=..., dtype="bfloat16")`` in this process: wall time,
   peak GPU memory (``torch.cuda.max_memory_allocated``) and peak host RSS (``VmHWM``, imports
   included), against the bytes of the loaded weights.
3. scan: every detector in turn (``headlens.catalogue.scan``), each one's time and peak GPU memory.

Targets (issue 10): load peak GPU memory and host RSS at most 1.2 x the weights; the five-role scan
under 10 minutes with peak GPU memory at most 1.6 x the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
            rope_theta=500000.0, tie_word_embeddings=False)
GB = 1e9


def peak_rss() -> int:
    """Peak resident set size of this process, bytes (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def smollm_tokenizer_folder() -> Path:
    """SmolLM2's tokenizer files (from the headlens cache, converting the built-in GGUF if needed)."""
    cache = Path(os.environ.get("HEADLENS_CACHE", Path.home() / ".cache" / "headlens"))
    found = sorted(cache.glob("SmolLM2-135M-Instruct*/tokenizer.json"))
    if found:
        return found[0].parent
    from headlens.models import builtin_gguf, convert_gguf
    return convert_gguf(builtin_gguf("smollm2-135m"))


def build(folder: Path, tiny: bool, device: str) -> dict:
    """Create the random model in bfloat16 on ``device`` and save it with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_folder())
    cfg = LlamaConfig(**(TINY if tiny else LLAMA_8B), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                      attn_implementation="eager")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters created in bfloat16, never in float32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    save_s = time.perf_counter() - t0
    return {"build_s": round(build_s, 1), "save_s": round(save_s, 1), "n_params": n_params,
            "weights_gb": round(n_params * 2 / GB, 3), "config": TINY if tiny else LLAMA_8B}


def gpu_peak(device: str) -> float | None:
    import torch
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / GB, 3)


def reset_gpu(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def measure(folder: Path, device: str, detectors: list[str]) -> dict:
    import torch

    import headlens
    from headlens.catalogue import scan
    from headlens.detectors import get_detector

    out: dict = {}
    reset_gpu(device)
    rss0 = peak_rss()
    t0 = time.perf_counter()
    model = headlens.load_model(str(folder), device=device, dtype="bfloat16")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    weights = model.weight_bytes()
    out["load"] = {"seconds": round(load_s, 1), "weights_gb": round(weights / GB, 3),
                   "peak_gpu_gb": gpu_peak(device), "peak_rss_gb": round(peak_rss() / GB, 3),
                   "rss_after_imports_gb": round(rss0 / GB, 3)}
    load = out["load"]
    if load["peak_gpu_gb"] is not None:
        load["peak_gpu_x_weights"] = round(load["peak_gpu_gb"] / load["weights_gb"], 3)
    load["peak_rss_x_weights"] = round(load["peak_rss_gb"] / load["weights_gb"], 3)
    print("load", json.dumps(load), flush=True)
    out["scan"] = {}
    total = 0.0
    for name in detectors:
        reset_gpu(device)
        t0 = time.perf_counter()
        try:
            cat = scan(model, [get_detector(name)])
            status = cat.meta["detectors"][name]["status"]
        except Exception as exc:  # report and go on with the next detector
            status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        seconds = time.perf_counter() - t0
        total += seconds
        r = {"seconds": round(seconds, 1), "peak_gpu_gb": gpu_peak(device), "status": status}
        if r["peak_gpu_gb"] is not None:
            r["peak_gpu_x_weights"] = round(r["peak_gpu_gb"] / load["weights_gb"], 3)
        out["scan"][name] = r
        print(name, json.dumps(r), flush=True)
    out["scan_total_s"] = round(total, 1)
    out["peak_rss_gb_end"] = round(peak_rss() / GB, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="where to write the JSON results")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same kind (smoke test)")
    ap.add_argument("--folder", help="save/load the model here (default: a temporary folder); "
                                     "an existing model folder is reused")
    ap.add_argument("--detectors", default="induction,retrieval,successor,safety,copy_suppression")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:  # the child: build and save, print the figures
        print(json.dumps(build(Path(args.folder), args.tiny, args.device)))
        return
    import torch
    results = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else
               f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)",
               "torch": torch.__version__, "tiny": args.tiny}
    with tempfile.TemporaryDirectory(prefix="headlens-8b-") as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "llama-8b-random"
        if not (folder / "config.json").exists():
            proc = subprocess.run([sys.executable, __file__, args.out, "--build-only", "--folder", str(folder),
                                   "--device", args.device] + (["--tiny"] if args.tiny else []),
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"building the model failed:\n{proc.stderr[-3000:]}")
            results["build"] = json.loads(proc.stdout.strip().splitlines()[-1])
            print("build", json.dumps(results["build"]), flush=True)
        results.update(measure(folder, args.device, args.detectors.split(",")))
    if not args.tiny and "load" in results:
        w = results["load"]["weights_gb"]
        peak_scan = max((r["peak_gpu_gb"] or 0) for r in results["scan"].values()) if results["scan"] else 0
        results["targets"] = {
            "load_gpu_le_1.2x": (results["load"]["peak_gpu_gb"] or 0) <= 1.2 * w,
            "load_rss_le_1.2x": results["load"]["peak_rss_gb"] <= 1.2 * w,
            "scan_under_600s": results["scan_total_s"] < 600,
            "scan_gpu_le_1.6x": peak_scan <= 1.6 * w,
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=1) + "\n")
    tmp_out.rename(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
