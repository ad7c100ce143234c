"""Benchmark: the batched all-heads ablation sweep against the naive one-pass-per-head loop.

    python benchmarks/bench_sweep.py                      # SmolLM2-135M on the CPU, 8 x 41 tokens
    python benchmarks/bench_sweep.py --device cuda --random-weights llama-1b --naive-limit 60 --json out.json

Prints (and with ``--json`` writes) the wall time of the batched sweep and of the naive loop
(``bridge.run_with_hooks`` once per head), their ratio, their agreement, peak memory, the "floor" (a
clean forward pass F times sum over layers l of (L - l) / L x n_heads: the forward work left when every
ablation reuses the clean run below its layer), and the time and Pearson correlation of attribution
patching against the exact (batched) patching sweep. ``--naive-limit N`` times the naive loop on N heads
spread over all layers and extrapolates to all heads (the output says so). ``--random-weights`` builds a
Llama of a real model's shape with random weights (no download): ``smollm2`` (30 x 9 heads, 3 KV heads,
d_model 576) or ``llama-1b`` (Llama-3.2-1B shape: 16 x 32 heads, 8 KV heads, d_model 2048).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import headlens  # noqa: E402
from headlens.methods import (  # noqa: E402
    as_intervention,
    attribution_patching,
    clean_run,
    loss_metric,
    patch_heads,
    pearson,
    sweep_heads,
)
from headlens.methods.interventions import position_mean  # noqa: E402

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}


def random_model(shape: str, device: str, dtype: str):
    """A Llama of the given shape with random weights (seeded), bridged like any loaded model."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(cfg).to(headlens.models._resolve_dtype(dtype))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab={"<s>": 0, "x": 1}, unk_token="<s>")),
        bos_token="<s>", eos_token="<s>", pad_token="<s>", unk_token="<s>")
    folder = tempfile.mkdtemp(prefix="headlens-bench-tok-")  # the bridge reloads the tokenizer from disk
    tok.save_pretrained(folder)
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    return headlens.models.wrap_hf_model(hf, tok, name=f"random-{shape}", device=device)


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak on a GPU, else sampled process RSS."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak_mb = 0.0

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        self._stop = threading.Event()
        self.peak_mb = self.rss_mb()

        def sample():
            while not self._stop.wait(0.005):
                self.peak_mb = max(self.peak_mb, self.rss_mb())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self.rss_mb())


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def naive_sweep(model, tokens, heads, metric, kind: str):
    """One ``run_with_hooks`` per head: the plain TransformerLens way."""
    run = clean_run(model, tokens)
    # the library's mean ablation: over prompts and positions, each prompt's start token left out of the
    # mean and keeping its own output (MeanAblation's default keep_start)
    means = {l: position_mean(z)[0, 0] for l, z in run.z.items()}
    values = []
    for l, h in heads:
        def hook(z, hook, l=l, h=h):
            z = z.clone()
            if kind == "zero":
                z[:, :, h] = 0
            else:
                z[:, 1:, h] = means[l][h]
            return z
        with torch.no_grad():
            logits = model.bridge.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook)])
        values.append(metric(logits))
    return torch.stack(values).float().cpu()


def spread(heads: list, n: int | None) -> list:
    """``n`` heads spread evenly over the list (all of them if n is None or too large)."""
    if n is None or n >= len(heads):
        return heads
    idx = torch.linspace(0, len(heads) - 1, n).round().long().unique().tolist()
    return [heads[i] for i in idx]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model to load (ignored with --random-weights)")
    ap.add_argument("--random-weights", choices=sorted(SHAPES), help="random Llama of this shape")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=41, help="tokens per prompt (BOS + two halves)")
    ap.add_argument("--kind", default="mean", choices=["mean", "zero"])
    ap.add_argument("--max-rows", type=int, default=None,
                    help="sequences per batched chunk (default 64 on CPU, 512 on a GPU)")
    ap.add_argument("--naive-limit", type=int, default=None,
                    help="time the naive loop on this many heads and extrapolate")
    ap.add_argument("--repeats", type=int, default=3, help="clean forward passes timed for F (median)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on a GPU (faster, ~1e-3 agreement)")
    ap.add_argument("--skip-attribution", action="store_true")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows even when the output is redirected
    device = args.device
    max_rows = args.max_rows or (512 if device.startswith("cuda") else 64)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t0 = time.perf_counter()
    if args.random_weights:
        model = random_model(args.random_weights, device, args.dtype)
    else:
        model = headlens.load_model(args.model, device=device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    L, H = model.n_layers, model.n_heads
    print(f"model {model.info.name}: {L} layers x {H} heads ({model.info.n_kv_heads} KV heads), "
          f"d_model {model.info.d_model}, {args.dtype} on {device}; loaded in {load_s:.1f} s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""))

    # Prompts: BOS + A + A (repeated random tokens) and the corrupted BOS + A + B.
    g = torch.Generator().manual_seed(0)
    half = (args.seq - 1) // 2
    vocab = model.bridge.cfg.d_vocab
    low, high = min(100, vocab // 2), min(vocab, 20000)  # ordinary tokens, no specials
    a = torch.randint(low, high, (args.batch, half), generator=g)
    b = torch.randint(low, high, (args.batch, args.seq - 1 - half), generator=g)
    bos = torch.full((args.batch, 1), model.start_token_id or 0)
    tokens = torch.cat([bos, a, a[:, :args.seq - 1 - half]], 1).to(device)
    corrupted = torch.cat([bos, a, b], 1).to(device)
    metric = loss_metric(tokens)
    print(f"prompts: {args.batch} x {tokens.shape[1]} tokens; metric: next-token loss; "
          f"ablation: {args.kind}; chunks of <= {max_rows} sequences")

    with torch.no_grad():  # warm up, then F = one clean forward pass
        model.bridge(tokens)
        times = [timed(lambda: model.bridge(tokens), device)[1] for _ in range(args.repeats)]
    F = sorted(times)[len(times) // 2]
    floor = sum((L - l) / L for l in range(L)) * H * F
    heads = model.heads()

    with PeakMemory(device) as mem_batched:
        batched, t_batched = timed(lambda: sweep_heads(model, tokens, metric, as_intervention(args.kind),
                                                       batch_size=max_rows), device)
    naive_heads = spread(heads, args.naive_limit)
    with PeakMemory(device) as mem_naive:
        naive, t_naive_part = timed(lambda: naive_sweep(model, tokens, naive_heads, metric, args.kind), device)
    t_naive = t_naive_part * len(heads) / len(naive_heads)
    extrapolated = len(naive_heads) < len(heads)
    b_vals = torch.stack([batched[h] for h in naive_heads])
    max_diff = (b_vals - naive).abs().max().item()
    clean_loss = metric(clean_run(model, tokens, keep_z=False).logits).item()

    res = {
        "model": model.info.name, "device": device, "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "n_layers": L, "n_heads": H, "batch": args.batch, "seq": int(tokens.shape[1]), "kind": args.kind,
        "max_rows": max_rows, "tf32": args.tf32, "clean_forward_s": F, "floor_s": floor, "floor_passes": floor / F,
        "batched_s": t_batched, "naive_s": t_naive, "naive_heads_timed": len(naive_heads),
        "naive_extrapolated": extrapolated, "speedup": t_naive / t_batched,
        "batched_over_floor": t_batched / floor, "max_abs_diff": max_diff,
        "agree_1e-4": max_diff <= 1e-4 * max(1.0, naive.abs().max().item()),
        "peak_mem_batched_mb": mem_batched.peak_mb, "peak_mem_naive_mb": mem_naive.peak_mb,
        "clean_loss": clean_loss,
        "top_heads": [(f"L{l}H{h}", round(float(batched[l, h]) - clean_loss, 4)) for l, h in
                      [divmod(i, H) for i in (batched.flatten() - clean_loss).argsort(descending=True)[:5].tolist()]],
    }
    print(f"\nclean forward pass F = {F:.3f} s; floor = {floor / F:.1f} x F = {floor:.2f} s")
    print(f"batched sweep ({len(heads)} heads): {t_batched:.2f} s  = {t_batched / floor:.2f} x floor, "
          f"peak memory {mem_batched.peak_mb:.0f} MB")
    naive_note = (f" (timed on {len(naive_heads)} heads, {t_naive_part:.2f} s, extrapolated to {len(heads)})"
                  if extrapolated else "")
    print(f"naive loop ({len(heads)} passes): {t_naive:.2f} s{naive_note}, peak memory {mem_naive.peak_mb:.0f} MB")
    print(f"naive / batched = {t_naive / t_batched:.2f}x; max |batched - naive| = {max_diff:.2e} "
          f"over {len(naive_heads)} heads ({'agree' if res['agree_1e-4'] else 'DISAGREE'} to 1e-4)")
    print(f"top heads by loss increase (clean loss {clean_loss:.3f}): {res['top_heads']}")

    if not args.skip_attribution:
        with PeakMemory(device) as mem_attr:
            attr, t_attr = timed(lambda: attribution_patching(model, tokens, corrupted, metric, "denoise"),
                                 device)
        exact, t_exact = timed(lambda: patch_heads(model, tokens, corrupted, metric, "denoise",
                                                   batch_size=max_rows), device)
        base = metric(clean_run(model, corrupted, keep_z=False).logits).float().cpu()
        r = pearson(attr, exact - base)
        res.update(attribution_s=t_attr, attribution_passes=t_attr / F, exact_patching_s=t_exact,
                   attribution_vs_naive=t_naive / t_attr, attribution_pearson=r,
                   peak_mem_attribution_mb=mem_attr.peak_mb)
        print(f"\nattribution patching (denoise, all {len(heads)} heads): {t_attr:.2f} s = {t_attr / F:.1f} x F, "
              f"{t_naive / t_attr:.0f}x faster than the naive loop; peak memory {mem_attr.peak_mb:.0f} MB")
        print(f"exact batched patching sweep: {t_exact:.2f} s; Pearson r(attribution, exact) = {r:.3f}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
        print(f"\nwrote {args.json}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
