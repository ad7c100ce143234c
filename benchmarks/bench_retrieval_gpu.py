"""GPU benchmark: needle runs of a Llama-3.1-8B-shaped model (random weights, bfloat16) at long contexts.

A model of Llama-3.1-8B's shape (32 layers, 32 query heads, 8 key/value heads, d_model 4096, MLP 14336) is
built with random weights directly on the GPU, with SmolLM2's tokenizer (vocabulary 49,152) and rotary
positions covering the longest run, and wrapped for headlens through the public path
(``headlens.models.wrap_hf_model``, the same as ``headlens.load_model`` after reading weights). Each run is
one needle-in-a-haystack prompt through the retrieval detector's decoding (SDPA prefill, explicit last
attention row per step, top-1 recorded) with 32 forced decoding steps (random weights retrieve nothing, so
stop tokens are ignored). Reports per run: wall time, peak GPU memory (``torch.cuda.max_memory_allocated``)
and its ratio to the weights' bytes. Targets (issue 14): the 32k run under 20 s and within 1.5x the weights.

    python benchmarks/bench_retrieval_gpu.py benchmarks/results/gpu_retrieval_llama8b.json
    python benchmarks/bench_retrieval_gpu.py /tmp/tiny.json --tiny          # CPU smoke test, tiny shape
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5)


def smollm_tokenizer(path: str | None):
    """SmolLM2's tokenizer: ``path``, else the converted model in the headlens cache (made if missing)."""
    from transformers import AutoTokenizer

    import headlens.models as hm

    if path is None:
        found = sorted(glob.glob(str(hm.cache_dir() / "SmolLM2-135M-Instruct.Q4_1-*")))
        path = found[0] if found else str(hm.convert_gguf(hm.builtin_gguf("smollm2-135m")))
    return AutoTokenizer.from_pretrained(path)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="JSON file for the results")
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU in float32 (smoke test)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="tokens per run, prompt + decoded (default 4096 16384 32768; tiny: 128 256 512)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 8192],
                    help="prefill chunk sizes to measure (0 = the whole prompt at once)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: SmolLM2's in the cache)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 (float32 with --tiny)")
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    import headlens
    from headlens.detectors.retrieval import MARKER, RetrievalDetector, load_needles, needle_prompts
    from headlens.methods.generation import encode_prompt, greedy_generate
    from headlens.models import wrap_hf_model

    device = a.device or ("cpu" if a.tiny else "cuda")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float32 if a.tiny else torch.bfloat16)
    lengths = a.lengths or ([128, 256, 512] if a.tiny else [4096, 16384, 32768])
    chunks = [c if not a.tiny or c == 0 else min(c, 64) for c in a.chunks]
    tok = smollm_tokenizer(a.tokenizer)
    shape = TINY if a.tiny else LLAMA_8B
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=max(lengths), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **shape)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    build_s = time.perf_counter() - t0
    reset_peak(device)
    t0 = time.perf_counter()
    model = wrap_hf_model(hf, tok, name="llama-3.1-8b-shape-random" if not a.tiny else "tiny-llama",
                          device=device)
    sync(device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()
    result = {"native_fast_path": None, "device": name,
              "platform": platform.platform(), "torch": torch.__version__, "model": model.info.as_dict(),
              "weight_bytes": weight_bytes, "build_s": build_s, "wrap_s": time.perf_counter() - t0,
              "wrap_peak_bytes": peak(device), "steps": a.steps, "runs": []}
    print(f"{model.info.name}: {weight_bytes / 2**30:.2f} GiB of weights, built in {build_s:.1f} s, "
          f"wrapped in {result['wrap_s']:.1f} s (peak {result['wrap_peak_bytes'] / 2**30:.2f} GiB)")
    det = RetrievalDetector()
    needles = load_needles(det.params.needles)[:1]
    haystack = headlens.data_path(det.params.haystack).read_text(encoding="utf-8")
    overhead = sum(len(x) for x in encode_prompt(model, det.params.template.format(
        context=MARKER, question=needles[0]["question"]), True, marker=MARKER))      # chat header + question

    def one_run(total: int, chunk: int) -> dict:
        run = needle_prompts(model, needles, haystack, [total - a.steps - overhead], [0.5], True,
                             det.params.template)[0]
        reset_peak(device)
        sync(device)
        t = time.perf_counter()
        gen = greedy_generate(model, [run.tokens], a.steps, record_top1=True, stop_ids=(), chunk_tokens=chunk)
        sync(device)
        seconds = time.perf_counter() - t
        assert len(gen.tokens[0]) == a.steps and gen.top1.shape[0] == a.steps
        return {"tokens": len(run.tokens) + a.steps, "prompt_tokens": len(run.tokens), "chunk_tokens": chunk,
                "seconds": seconds, "peak_bytes": peak(device), "peak_over_weights": peak(device) / weight_bytes}

    one_run(min(lengths), 0)          # warm-up (kernels, allocator)
    from headlens.methods.generation import uses_native

    result["native_fast_path"] = uses_native(model)
    for total in lengths:
        for chunk in chunks:
            try:
                r = one_run(total, chunk)
            except torch.cuda.OutOfMemoryError as exc:
                r = {"tokens": total, "chunk_tokens": chunk, "error": str(exc).splitlines()[0]}
                torch.cuda.empty_cache()
            result["runs"].append(r)
            print(json.dumps(r))
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(a.out).with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2))
            tmp.replace(a.out)


if __name__ == "__main__":
    main()
