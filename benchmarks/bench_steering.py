"""Benchmark: the PASTA profiling rate (heads x examples per second) and the full sweep it implies.

    python benchmarks/bench_steering.py benchmarks/results/cpu_steering_smollm2.json          # SmolLM2, CPU
    python benchmarks/bench_steering.py benchmarks/results/gpu_steering_llama8b.json \\
        --random-shape 8b --device cuda                                                        # one GPU
    python benchmarks/bench_steering.py /tmp/tiny.json --random-shape tiny                    # a smoke test

Profiles every head of three layers (the first, the middle and the last: the engine starts each variant at
its head's layer, so these average the depth of a full sweep) on ``--examples`` training examples of
``--task`` through :func:`headlens.steering.profile_heads` (one batched sweep, the unsteered run included),
and reports heads x examples per second. From that rate: the full sweep (every head, ``--full-examples``
examples) and the coarse-to-fine one (every layer, then the heads of three layers).

``--random-shape 8b``: a Llama-3.1-8B-shaped model with random weights, built in bfloat16 directly on the
device (``LlamaForCausalLM(config)`` under ``torch.device``) and wrapped with
:func:`headlens.models.wrap_hf_model`, with SmolLM2's tokenizer (its chat template included; from
``--tokenizer PATH`` or the headlens cache). Random weights give the timing, not a meaningful profile.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu_8b import LLAMA_8B, TINY, smollm_tokenizer_folder  # noqa: E402


def random_model(shape: str, device: str, tokenizer: str | None):
    """A random-weight Llama of ``shape`` (``8b`` or ``tiny``) in bfloat16 on ``device``, wrapped."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from headlens.models import wrap_hf_model

    tok = AutoTokenizer.from_pretrained(tokenizer or smollm_tokenizer_folder())
    cfg = LlamaConfig(**(LLAMA_8B if shape == "8b" else TINY), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, attn_implementation="eager")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    return wrap_hf_model(hf, tok, name=f"random-llama-{shape}", device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--model", default="smollm2-135m", help="a model to load (ignored with --random-shape)")
    ap.add_argument("--random-shape", choices=["8b", "tiny"], default=None)
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder for --random-shape (default: SmolLM2's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--task", default="json_format")
    ap.add_argument("--examples", type=int, default=8, help="training examples profiled")
    ap.add_argument("--full-examples", type=int, default=20, help="examples of the estimated full sweep")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    import torch

    import headlens as hl
    from headlens.steering import profile_heads

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    if args.random_shape:
        model = random_model(args.random_shape, args.device, args.tokenizer)
    else:
        model = hl.load_model(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    n_layers, n_heads = model.n_layers, model.n_heads
    layers = sorted({0, n_layers // 2, n_layers - 1})
    heads = [(l, h) for l in layers for h in range(n_heads)]
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    frame = profile_heads(model, args.task, split="train", n_train=args.examples, heads=heads,
                          batch_size=args.batch_size)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t1
    rate = len(heads) * args.examples / seconds
    full = n_layers * n_heads * args.full_examples / rate
    coarse = (n_layers + 3 * n_heads) * args.full_examples / rate
    result = {
        "what": "PASTA profiling rate: every head of three layers steered alone (one batched sweep)",
        "model": model.info.name, "shape": f"{n_layers} layers x {n_heads} heads ({model.info.n_kv_heads} kv)",
        "dtype": str(model.info.dtype), "device": args.device,
        "machine": (torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {os.cpu_count()} cores "
                    "(shared with parallel work)"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "task": args.task,
        "prompt_tokens": int(frame.attrs.get("n_pos", 0)) or None, "load_s": round(load_s, 1),
        "layers": layers, "heads_profiled": len(heads), "examples": args.examples, "seconds": round(seconds, 2),
        "heads_x_examples_per_s": round(rate, 2),
        "estimate_full_sweep_s": {"heads": n_layers * n_heads, "examples": args.full_examples,
                                  "seconds": round(full, 1)},
        "estimate_coarse_to_fine_s": {"variants": n_layers + 3 * n_heads, "examples": args.full_examples,
                                      "seconds": round(coarse, 1)},
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
    }
    if args.random_shape != "8b":
        rate_8b_note = "8B estimate: measure with --random-shape 8b --device cuda"
        result["note"] = rate_8b_note
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
