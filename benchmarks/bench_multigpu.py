"""Benchmark: beyond one GPU. Two parts, each one command that fits a 10-minute device call.

``dp``: data parallel. A Llama-3.1-8B-shaped model (random weights, bfloat16, SmolLM2's 49,152-token
tokenizer) is saved to ``--workdir`` once, then ``headlens scan`` runs the five-role scan on 1 GPU and on
N GPUs (``--gpus N``, i.e. torchrun), compares the catalogue bytes and reports the speed-up (the scan's
wall time on rank 0 without model loading, ``scan_s`` of the sidecar, and the command's wall time).
``--splits auto,sweeps`` also runs each rank count > 1 with ``--split sweeps`` (every sweep shared).
``--ranks 1`` and ``--ranks 2`` may run as separate calls on the
same machine (the JSON collects both; the comparison is made once both are there). The first scan after a
machine starts is slower, so by default the first rank count runs once untimed (``--warmup 0`` skips it):
without it the 1-GPU baseline of a fresh machine ran 20-55% slower than on a warm one and flattered the
speed-up (``benchmarks/results/gpu_dp_llama8b.json``)::

    python benchmarks/bench_multigpu.py dp --workdir out/bench_dp --json benchmarks/results/gpu_dp_llama8b.json
    python benchmarks/bench_multigpu.py dp --ranks 1 ...   # then: dp --ranks 2 ...  (same --workdir/--json)

``mp``: model parallel. A 40-60 B-parameter Llama (default ``llama-50b``: Llama-3.1-70B's layer shape,
56 layers, 48.7 B parameters; ``llama-70b`` for two H200s) is built with random weights straight on the
GPUs, layers split evenly (accelerate's ``dispatch_model``; nothing goes through the disk, since writing
and reading ~100 GB of safetensors would take minutes), bridged with ``headlens.models.wrap_hf_model(...,
device="auto")``, and scanned with induction, successor and copy suppression; it reports build time,
per-detector time and per-GPU peak memory::

    python benchmarks/bench_multigpu.py mp --json benchmarks/results/gpu_mp_llama50b.json

``--tiny`` runs either part on the CPU at a tiny shape (the check that the script works).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

LLAMA_70B_LAYER = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
SHAPES = {  # vocabulary: SmolLM2's tokenizer (49,152), so that prompts and chat templates are real
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8),
    "llama-50b": dict(LLAMA_70B_LAYER, num_hidden_layers=56),
    "llama-70b": dict(LLAMA_70B_LAYER, num_hidden_layers=80),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
# Small settings for the CPU check (--tiny); the GPU runs use the detectors' defaults.
TINY_PARAMS = ["induction.seq_len=10", "copy_suppression.n_tokens=32", "copy_suppression.seq_len=32",
               "retrieval.context_lengths=[120]", "retrieval.depths=[0.5]", "retrieval.n_needles=2",
               "retrieval.max_new_tokens=8", "safety.n_prompts=4", "safety.max_new_tokens=8"]


def tokenizer_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    found = sorted(glob.glob(str(Path.home() / ".cache/headlens/SmolLM2-135M-Instruct.Q4_1-*/tokenizer.json")))
    if not found:
        sys.exit("error: SmolLM2's tokenizer not found in ~/.cache/headlens; pass --tokenizer DIR")
    return Path(found[0]).parent


def llama_config(shape: str, tok_dir: Path):
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(**SHAPES[shape], vocab_size=len(tok), max_position_embeddings=8192, rope_theta=500000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False, attn_implementation="eager")
    return cfg, tok


def n_params(cfg) -> int:
    d, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    return L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + 2 * V * d + d


def init_random(module, device, generator, std: float = 0.02) -> None:
    """Give a module built on the meta device real storage on ``device`` with random weights (seeded)."""
    module.to_empty(device=device)
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)            # RMSNorm gains
            else:
                p.normal_(0.0, std, generator=generator)


def build_on_devices(cfg, devices: list[str], dtype: torch.dtype):
    """The Llama with random weights, layers split evenly over ``devices`` (no CPU copy, no disk)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    L, n = cfg.num_hidden_layers, len(devices)
    placement = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    placement.update({f"model.layers.{i}": devices[i * n // L] for i in range(L)})
    placement.update({"model.norm": devices[-1], "lm_head": devices[-1]})
    gens = {d: torch.Generator(device=d).manual_seed(1234 + k) for k, d in enumerate(devices)}
    for name, dev in placement.items():
        if name == "model.rotary_emb":
            with torch.device(dev):  # its inverse frequencies are computed, not loaded: rebuild it there
                model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
        else:
            init_random(model.get_submodule(name), dev, gens[dev])
    model.eval()
    if n > 1:
        from accelerate import dispatch_model
        dispatch_model(model, device_map=placement)  # moves activations between GPUs; sets hf_device_map
    return model


def gpu_names() -> list[str]:
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def merge_json(path: Path, update: dict) -> dict:
    data = json.loads(path.read_text()) if path.is_file() else {}
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k].update(v)
        else:
            data[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


# ---- (a) data parallel ------------------------------------------------------------------------------

def cmd_dp(args) -> None:
    shape = "tiny" if args.tiny else args.shape
    device, dtype = ("cpu", "float32") if args.tiny else ("cuda", "bfloat16")
    work = Path(args.workdir)
    folder = work / f"random-{shape}"
    out = {"part": "data parallel", "shape": shape, "device": device, "dtype": dtype,
           "gpus": gpu_names() if torch.cuda.is_available() else [], "host": platform.node(),
           "torch": torch.__version__, "batch_size": args.batch_size, "detectors": args.detectors}
    if not (folder / "config.json").is_file():
        tok_dir = tokenizer_dir(args.tokenizer)
        cfg, tok = llama_config(shape, tok_dir)
        t0 = time.perf_counter()
        model = build_on_devices(cfg, ["cuda:0" if device == "cuda" else "cpu"],
                                 getattr(torch, dtype))
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for extra in ("chat_template.jinja",):
            if (tok_dir / extra).is_file() and not (tmp / extra).is_file():
                shutil.copy(tok_dir / extra, tmp / extra)
        tmp.rename(folder)
        del model
        out["build_and_save_s"] = round(time.perf_counter() - t0, 1)
        out["n_params"] = n_params(cfg)
        print(f"built and saved {folder} ({out['n_params'] / 1e9:.2f} B parameters) in {out['build_and_save_s']} s",
              flush=True)
    runs = {}
    # (ranks, split): each rank count > 1 once per --splits entry ("2": auto, "2 sweeps": --split sweeps).
    order = [(int(r), sp) for r in args.ranks.split(",") for sp in (args.splits.split(",") if int(r) > 1
                                                                    else ["auto"])]
    # The first scan after a machine starts is slower (GPU clocks, page cache, library autotuning): with
    # --warmup the first rank count runs once untimed, so the 1-GPU baseline is not flattered.
    for i, (ranks, split) in enumerate(order[:1] * args.warmup + order):
        timed = i >= args.warmup
        name = str(ranks) if split == "auto" else f"{ranks} {split}"
        csv = work / f"cat_{ranks}gpu_{split}.csv"
        cmd = [sys.executable, "-m", "headlens", "scan", str(folder), "-d", args.detectors, "--device", device,
               "--dtype", dtype, "-o", str(csv), "--checkpoint-every", "-1"]
        cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []   # 0: each detector's default
        for p in (TINY_PARAMS if args.tiny else []) + args.param:
            cmd += ["-p", p]
        if ranks > 1:
            cmd += ["--gpus", str(ranks), "--split", split]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        # On the CPU the thread count changes float reductions (torchrun gives each rank 1 thread): match it.
        env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if device == "cpu" else {}))
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-5000:])
            sys.exit(f"error: the {ranks}-rank scan failed (exit {r.returncode})")
        if not timed:
            print(f"{ranks} rank(s): warm-up scan, {wall:.1f} s (not timed)", flush=True)
            continue
        meta = json.loads(csv.with_suffix(".json").read_text())
        t = meta["timings_s"]
        # The scan's wall time on rank 0 (first detector to every result gathered; not the model load).
        scan_s = meta["scan_s"]
        runs[name] = {"wall_s": round(wall, 1), "scan_s": round(scan_s, 1), "timings_s": t,
                      "sum_of_detectors_s": round(sum(v for k, v in t.items() if k != "model_load"), 1),
                      "ranks": meta.get("ranks"),
                      "steps_s": meta.get("steps_s", {}), "world_size": meta.get("world_size"),
                            "csv_sha1": __import__("hashlib").sha1(csv.read_bytes()).hexdigest(),
                            "statuses": {k: v["status"] for k, v in meta["detectors"].items()}}
        print(f"{name} rank(s): scan {scan_s:.1f} s, wall {wall:.1f} s; per detector "
              + ", ".join(f"{k} {v}" for k, v in t.items()), flush=True)
    data = merge_json(Path(args.json), {**out, "runs": runs})
    done = data["runs"]
    if "1" in done and len(done) > 1:
        base = done["1"]
        data["comparison"] = {
            n: {"same_catalogue_bytes": r["csv_sha1"] == base["csv_sha1"],
                "speedup_scan": round(base["scan_s"] / r["scan_s"], 2),
                "speedup_wall": round(base["wall_s"] / r["wall_s"], 2),
                "speedup_per_detector": {k: round(base["timings_s"][k] / v, 2)
                                         for k, v in r["timings_s"].items() if v and k in base["timings_s"]}}
            for n, r in done.items() if n != "1"}
        merge_json(Path(args.json), {"comparison": data["comparison"]})
        print(json.dumps(data["comparison"], indent=2))


# ---- (b) model parallel -----------------------------------------------------------------------------

def cmd_mp(args) -> None:
    import headlens
    from headlens.catalogue import scan
    from headlens.detectors import get_detector

    shape = "tiny" if args.tiny else args.shape
    tok_dir = tokenizer_dir(args.tokenizer)
    cfg, tok = llama_config(shape, tok_dir)
    if args.tiny:
        devices, dtype, device = ["cpu"], torch.float32, "cpu"
    else:
        devices, dtype, device = [f"cuda:{i}" for i in range(torch.cuda.device_count())], torch.bfloat16, "auto"
        if len(devices) < 2:
            sys.exit("error: model parallel needs at least 2 visible GPUs")
    out = {"part": "model parallel", "shape": shape, "n_params": n_params(cfg), "gpus": gpu_names(),
           "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "batch_size": args.batch_size}
    print(f"building {shape} ({out['n_params'] / 1e9:.1f} B parameters) over {devices}", flush=True)
    t0 = time.perf_counter()
    hf = build_on_devices(cfg, devices, dtype)
    tok.save_pretrained(Path(args.workdir) / "tokenizer")  # the bridge may reload the tokenizer from disk
    model = headlens.models.wrap_hf_model(hf, tok, name=f"random-{shape}", device=device)
    out["build_s"] = round(time.perf_counter() - t0, 1)
    out["placement"] = {str(k): str(v) for k, v in (getattr(hf, "hf_device_map", None) or {}).items()}
    if torch.cuda.is_available():
        out["weights_gib_per_gpu"] = [round(torch.cuda.memory_allocated(i) / 2**30, 2)
                                      for i in range(torch.cuda.device_count())]
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    print(f"built and bridged in {out['build_s']} s", flush=True)
    params = {"induction": {"seq_len": 10}, "copy_suppression": {"n_tokens": 32, "seq_len": 32}} if args.tiny else {}
    dets = [get_detector(n, **params.get(n, {})) for n in args.detectors.split(",")]
    timings, statuses, peaks = {}, {}, {}
    for det in dets:  # one at a time, so a failure still reports the detectors before it
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
        t1 = time.perf_counter()
        try:
            cat = scan(model, [det], seed=0, batch_size=args.batch_size)
            d = cat.meta["detectors"][det.name]
            statuses[det.name] = d["status"] if d["status"] == "ok" else f"{d['status']}: {d['reason']}"
        except Exception as exc:  # report, do not hide: the JSON says which detector failed and why
            statuses[det.name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        timings[det.name] = round(time.perf_counter() - t1, 1)
        if torch.cuda.is_available():   # per detector: the most allocated on each GPU (weights included)
            peaks[det.name] = [round(torch.cuda.max_memory_allocated(i) / 2**30, 2)
                               for i in range(torch.cuda.device_count())]
        print(f"{det.name}: {statuses[det.name]} in {timings[det.name]} s; peak GiB per GPU {peaks.get(det.name)}",
              flush=True)
        merge_json(Path(args.json), {**out, "timings_s": timings, "statuses": statuses,
                                     "peak_gib_per_gpu_per_detector": peaks})
    if torch.cuda.is_available():
        out["peak_gib_per_gpu"] = [max(p[i] for p in peaks.values()) if peaks else None
                                   for i in range(torch.cuda.device_count())]
        out["total_gib_per_gpu"] = [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)
                                    for i in range(torch.cuda.device_count())]
    merge_json(Path(args.json), {**out, "timings_s": timings, "statuses": statuses,
                                 "peak_gib_per_gpu_per_detector": peaks})
    print(json.dumps({**out, "timings_s": timings, "statuses": statuses}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    dp = sub.add_parser("dp", help="data parallel: 1 GPU vs N GPUs, five-role scan, same bytes")
    dp.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    dp.add_argument("--ranks", default="1,2", help="comma-separated rank counts to run (1 first)")
    dp.add_argument("--splits", default="auto", help="comma-separated --split values for the runs on several "
                    "ranks (auto, detectors, sweeps); runs other than auto are named e.g. '2 sweeps'")
    dp.add_argument("--warmup", type=int, default=1, choices=(0, 1),
                    help="run the first rank count once untimed first "
                         "(default 1: a fresh machine's first scan is slow)")
    dp.add_argument("--detectors", default="induction,successor,copy_suppression,retrieval,safety")
    dp.add_argument("--batch-size", type=int, default=0, help="cap on sequences per pass (0: the detectors' defaults)")
    dp.add_argument("--param", "-p", action="append", default=[], help="detector parameter ROLE.NAME=VALUE")
    mp = sub.add_parser("mp", help="model parallel: a 40-60 B model over the GPUs, three detectors")
    mp.add_argument("--shape", default="llama-50b", choices=sorted(SHAPES))
    mp.add_argument("--detectors", default="induction,successor,copy_suppression")
    mp.add_argument("--batch-size", type=int, default=64)
    for p in (dp, mp):
        p.add_argument("--workdir", default="out/bench_multigpu")
        p.add_argument("--json", required=True, help="where to write (merge) the results")
        p.add_argument("--tokenizer", help="SmolLM2 tokenizer folder (default: ~/.cache/headlens/SmolLM2-*)")
        p.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (checks the script)")
    args = ap.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    {"dp": cmd_dp, "mp": cmd_mp}[args.part](args)


if __name__ == "__main__":
    main()
