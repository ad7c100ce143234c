"""Data parallel scans with torch.distributed (gloo on the CPU): 2 ranks started by torchrun give the same
catalogue bytes as 1 process, both when each rank computes half of every batched sweep's chunks
(``--split sweeps``) and when each runs whole detectors (the default plan on a small model); 3 ranks with
a group of two sharing one detector and a group of one running another, likewise.

The model is a tiny random-weight Llama (3 layers x 4 heads, grouped-query attention) over the word-level
vocabulary of the planted successor model, so induction, successor and copy suppression all run and give
non-trivial floats; the planted safety model covers padded prompts (Ships under uniform attention), and the
planted retriever the needle runs, the generation causal check and the direct effects of retrieval.
Besides the batched sweeps, the direct effects, induction's OV eigenvalues and copying, and copy
suppression's OV and QK ranks are shared by the ranks, and all of them are checked here."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from headlens.runtime import distributed, each, use
from headlens.runtime.work import plan

from planted import SUCCESSOR_SEQUENCES, make_tokenizer, retrieval_model, safety_model

ARGS = ["-d", "induction,successor,copy_suppression", "--batch-size", "8", "-p", "induction.seq_len=10",
        "-p", "copy_suppression.n_tokens=32", "-p", "copy_suppression.seq_len=32"]


def random_llama(folder: Path) -> Path:
    """A seeded random Llama (3 x 4 heads, 2 kv heads, d_model 64) with the successor words as vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    words = [w for seq in SUCCESSOR_SEQUENCES for w in seq]
    ids = {w: i + 1 for i, w in enumerate(words)}
    cfg = LlamaConfig(vocab_size=len(words) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
                      initializer_range=0.2)
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    make_tokenizer(len(words) + 1, folder, special=ids)
    return folder


def headlens(*args, ranks: int = 1, env: dict | None = None, cwd=None, die_after: str | None = None):
    """``python -m headlens ARGS`` (ranks=1) or ``torchrun --nproc-per-node RANKS -m headlens ARGS``;
    with ``die_after`` the process ends right after that checkpoint write (tests/die_after.py)."""
    root = str(Path(__file__).resolve().parents[1])
    full = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), **(env or {}))
    full.pop("WORLD_SIZE", None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                if ranks > 1 else [sys.executable])
    entry = [str(Path(__file__).with_name("die_after.py")), die_after] if die_after else ["-m", "headlens"]
    return subprocess.run([*launcher, *entry, *map(str, args)], capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_llama(tmp_path_factory.mktemp("tiny_llama") / "model")


def test_one_process_needs_no_process_group():
    assert "WORLD_SIZE" not in os.environ
    calls = []
    out = each(lambda x: calls.append(x) or x * x, [3, 1, 2], "squares")
    assert out == [9, 1, 4] and calls == [3, 1, 2]          # every item, in order, on the one rank
    assert list(distributed.shard(5)) == [0, 1, 2, 3, 4]
    assert distributed.init("cpu") == "cpu" and distributed.world_size() == 1 and distributed.is_main()
    assert not torch.distributed.is_initialized()


def test_segments_keep_straddling_variants_together():
    # rows (variant, prompt), 3 prompts per variant, chunks of 4 rows: variants straddle chunk ends.
    rows = [(v, p) for v in range(4) for p in range(3)]
    chunks = [rows[i:i + 4] for i in range(0, len(rows), 4)]
    assert distributed.segments(chunks, key=lambda r: r[0]) == [chunks]          # one chain
    chunks = [rows[i:i + 6] for i in range(0, len(rows), 6)]                     # whole variants
    assert distributed.segments(chunks, key=lambda r: r[0]) == [[c] for c in chunks]
    assert distributed.agree_min(7) == 7


def test_map_gather_and_broadcast_on_two_gloo_ranks(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        from headlens.runtime import distributed as d
        from headlens.runtime import each
        assert d.init("cpu") == "cpu" and d.world_size() == 2
        who = each(lambda x: (x, d.rank()), list(range(5)), key="k")
        assert who == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)], who   # round-robin, results in order
        assert d.broadcast(f"plan of rank {d.rank()}") == "plan of rank 0"
        assert d.agree_min(10 + d.rank()) == 10
        try:
            d.gather({}, 3 + d.rank(), key="plan")                   # ranks that planned different work
        except RuntimeError as exc:
            assert "planned different work" in str(exc)
            import sys
            sys.stdout.write(f"refused {d.rank()}\\n")   # one write: the two ranks share stdout
            sys.stdout.flush()
        d.finish()
    """))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "refused 0" in r.stdout and "refused 1" in r.stdout


def test_plan_spreads_detectors_or_sweeps():
    costs = [1.0, 0.7, 0.6, 0.55, 0.12]          # induction, successor, copy suppression, retrieval, safety
    # Llama-3.1-8B (1,024 heads): on 2 ranks each runs whole detectors, the longest first to the least loaded.
    assert distributed.plan(costs, 2, 1024) == [(0,), (1,), (1,), (0,), (1,)]
    assert distributed.plan(costs, 2, 1024, "sweeps") == [(0, 1)] * 5
    assert distributed.plan(costs, 1, 1024) == [(0,)] * 5
    # Llama-3.1-70B (5,120 heads): little is repeated per rank, so all ranks share every sweep.
    assert distributed.plan(costs, 2, 5120) == [(0, 1)] * 5
    # More ranks than detectors: the extra ranks go to the groups estimated slowest.
    assert distributed.plan(costs[:2], 3, 1024, "detectors") == [(0, 1), (2,)]
    for world in range(1, 10):
        for n_heads in (12, 1024, 5120):
            owners = distributed.plan(costs, world, n_heads)
            used = sorted({r for o in owners for r in o})
            assert used == list(range(world)) or len(set(owners)) == len(owners)   # idle ranks only if 1 each
            assert all(list(o) == list(range(o[0], o[-1] + 1)) for o in owners)       # contiguous groups
            assert len({r for o in set(owners) for r in o}) == sum(len(o) for o in set(owners))  # disjoint
    with pytest.raises(Exception, match="unknown split"):
        distributed.plan(costs, 2, 1024, "layers")


def test_two_ranks_give_the_same_catalogue_bytes(tiny, tmp_path):
    """Both ways of sharing: every sweep split between the ranks (--split sweeps), and whole detectors
    on each rank (the default on a small model)."""
    one, two, whole = tmp_path / "one.csv", tmp_path / "two.csv", tmp_path / "whole.csv"
    r1 = headlens("scan", tiny, *ARGS, "-o", one)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = headlens("scan", tiny, *ARGS, "-o", two, "--split", "sweeps", ranks=2, env={"HEADLENS_PROGRESS_EVERY": "0"})
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert one.read_bytes() == two.read_bytes()
    r3 = headlens("scan", tiny, *ARGS, "-o", whole, ranks=2)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert one.read_bytes() == whole.read_bytes()
    m1, m2, m3 = (json.loads(p.with_suffix(".json").read_text()) for p in (one, two, whole))
    assert (m1["world_size"], m2["world_size"], m3["world_size"]) == (1, 2, 2)
    # Whole detectors: induction on rank 0, successor and copy suppression on rank 1, each computing every
    # chunk of its detector (none shared); rank 0 prints the others' 'done' lines.
    assert m3["ranks"] == {"induction": [0], "successor": [1], "copy_suppression": [1]}
    assert m3["steps_s"] == {role: {step: {**rec, "seconds": m3["steps_s"][role][step]["seconds"]}
                                    for step, rec in steps.items()} for role, steps in m1["steps_s"].items()}
    assert "induction on rank 0; successor, copy_suppression on rank 1" in r3.stderr
    assert r3.stderr.count("successor: done in") == 1 and "(rank 1)" in r3.stderr
    # Rank 0 really computed only its share: ceil(n / 2) of each sweep's n chunks.
    for role, steps in m1["steps_s"].items():
        for step, rec in steps.items():
            assert m2["steps_s"][role][step]["chunks"] == (rec["chunks"] + 1) // 2, (role, step)
    assert sum(rec["chunks"] for s in m1["steps_s"].values() for rec in s.values()) >= 10
    # Not only the sweeps: direct effects and the weight circuits are shared too.
    for role, step in [("induction", "direct effects"), ("induction", "OV eigenvalues"), ("induction", "copying"),
                       ("successor", "direct effects"), ("copy_suppression", "direct effects"),
                       ("copy_suppression", "OV ranks"), ("copy_suppression", "QK ranks")]:
        assert m1["steps_s"][role][step]["chunks"] >= 2, (role, step)
    # Only rank 0 prints: one table per role, one 'done' line per detector.
    assert r2.stdout.count("induction: top 10 heads") == 1
    assert r2.stderr.count("induction: done in") == 1
    # Progress in a log (no terminal): chunks done/total and an ETA per step of each detector, rank 0 only.
    n = (m1["steps_s"]["induction"]["single-head ablations"]["chunks"] + 1) // 2
    assert r2.stderr.count(f"induction: single-head ablations: {n}/{n} done") == 1
    assert "ETA 0:00" in r2.stderr
    assert not list(tmp_path.glob("*.ckpt"))                 # the checkpoint folder is gone


def test_three_ranks_a_group_of_two_and_one(tiny, tmp_path):
    """Two detectors on three ranks: induction on ranks 0-1 (sharing its sweeps in their own process
    group), successor on rank 2; same bytes as one process."""
    args = ["-d", "induction,successor", "--batch-size", "8", "-p", "induction.seq_len=10", "--split", "detectors"]
    r1 = headlens("scan", tiny, *args, "-o", tmp_path / "one.csv")
    r3 = headlens("scan", tiny, *args, "-o", tmp_path / "three.csv", ranks=3)
    assert r1.returncode == 0 and r3.returncode == 0, r1.stderr[-2000:] + r3.stderr[-2000:]
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "three.csv").read_bytes()
    m1, m3 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "three"))
    assert m3["ranks"] == {"induction": [0, 1], "successor": [2]}
    s1, s3 = m1["steps_s"], m3["steps_s"]
    step = "single-head ablations"
    assert s1["induction"][step]["chunks"] >= 2
    assert s3["induction"][step]["chunks"] == (s1["induction"][step]["chunks"] + 1) // 2   # rank 0's half
    assert s3["successor"][step]["chunks"] == s1["successor"][step]["chunks"]             # all on rank 2


def test_ranks_finishing_far_apart_outwait_the_collective_timeout(tiny, tmp_path):
    """Whole detectors per rank: rank 1 (successor, under a second) waits for rank 0 (a heavy induction,
    seconds) longer than a collective may take (HEADLENS_DIST_TIMEOUT_MIN=0.04: 2.4 s; at 70B such waits
    are hours). Without the store-polled wait before the exchange, gloo raises 'Timed out waiting'."""
    args = ["-d", "induction,successor", "--batch-size", "8", "-p", "induction.seq_len=30", "-p", "induction.n_seqs=64",
            "-p", "induction.causal_seqs=64", "-p", "induction.sweep_repeats=4", "-p", "induction.confirm_seqs=64",
            "-p", "induction.n_random=100",
            "-p", "successor.n_random=20"]
    r1 = headlens("scan", tiny, *args, "-o", tmp_path / "one.csv")
    r2 = headlens("scan", tiny, *args, "-o", tmp_path / "two.csv", ranks=2, env={"HEADLENS_DIST_TIMEOUT_MIN": "0.04"})
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr[-2000:] + r2.stderr[-2000:]
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()
    times = json.loads((tmp_path / "two.json").read_text())["timings_s"]
    assert times["induction"] - times["successor"] > 2.4          # rank 1 really waited past the timeout


def test_two_ranks_padded_safety_prompts_same_bytes(tmp_path):
    folder = safety_model(tmp_path / "safety")
    from test_safety import HARMFUL, HARMLESS  # 8 padded pairs: enough refusals (min_refused=5)

    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL) + "\n")
    (tmp_path / "harmless.txt").write_text("\n".join(HARMLESS) + "\n")
    (tmp_path / "phrases.txt").write_text("sorry\n")
    args = ["-d", "safety", "--batch-size", "8", "-p", f"safety.harmful={tmp_path / 'harmful.txt'}",
            "-p", f"safety.harmless={tmp_path / 'harmless.txt'}", "-p", "safety.max_new_tokens=3",
            "-p", f"safety.refusal_phrases={tmp_path / 'phrases.txt'}"]
    r1 = headlens("scan", folder, *args, "-o", tmp_path / "one.csv")
    r2 = headlens("scan", folder, *args, "-o", tmp_path / "two.csv", ranks=2)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr[-2000:] + r2.stderr[-2000:]
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()
    meta = json.loads((tmp_path / "two.json").read_text())
    assert meta["detectors"]["safety"]["status"] == "ok" and meta["detectors"]["safety"]["labelled"] == ["L1H1"]


def test_two_ranks_share_needle_runs_same_bytes(tmp_path):
    """Retrieval on the planted retriever: the needle runs (one item per decoded batch), the causal
    check's generations (one item per batch of variants; a tiny byte budget makes it one variant each)
    and the direct effects are shared; same bytes."""
    folder = retrieval_model(tmp_path / "retriever")
    (tmp_path / "needles.json").write_text(json.dumps([{"needle": "t20 t21 t22 t23 t24", "question": "t20"},
                                                       {"needle": "t25 t26 t27 t28 t29", "question": "t25"}]))
    (tmp_path / "hay.txt").write_text(" ".join(f"t{1 + (i * 7) % 15}" for i in range(60)))
    args = ["-d", "retrieval", "-p", f"retrieval.needles={tmp_path / 'needles.json'}",
            "-p", f"retrieval.haystack={tmp_path / 'hay.txt'}", "-p", "retrieval.context_lengths=[30,50]",
            "-p", "retrieval.depths=[0.0,0.5,1.0]", "-p", "retrieval.plain_template={context} {question}",
            "-p", "retrieval.max_new_tokens=4", "-p", "retrieval.top_k=2", "-p", "retrieval.n_random=5",
            "-p", "retrieval.effect_runs=1", "-p", "retrieval.max_bytes=1"]
    r1 = headlens("scan", folder, *args, "-o", tmp_path / "one.csv")
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = headlens("scan", folder, *args, "-o", tmp_path / "two.csv", ranks=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()
    m1, m2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert m1["detectors"]["retrieval"]["status"] == "ok"
    assert m1["detectors"]["retrieval"]["causal"] == m2["detectors"]["retrieval"]["causal"]
    s1, s2 = m1["steps_s"]["retrieval"], m2["steps_s"]["retrieval"]
    for step in ("needle runs", "retrieval causal check"):
        assert s1[step]["chunks"] >= 2 and s2[step]["chunks"] == (s1[step]["chunks"] + 1) // 2, step
    assert s1["direct effects"]["chunks"] == s2["direct effects"]["chunks"] == 1   # one chunk: rank 0's


def test_gpus_with_one_pinned_gpu_is_refused(tiny, tmp_path):
    r = headlens("scan", tiny, *ARGS, "-o", tmp_path / "x.csv", "--gpus", "2", "--device", "cuda:1")
    assert r.returncode == 1 and "use --device cuda" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.csv").exists()


def test_gpu_groups_for_data_times_model_parallel():
    # 8 GPUs, 4 ranks per machine with --device auto: each rank spreads its replica over 2 GPUs.
    assert [distributed.gpu_group(r, 4, [str(i) for i in range(8)]) for r in range(4)] == \
        [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert distributed.gpu_group(1, 2, ["3", "5", "6"]) == ["5"]      # an odd GPU is left over
    with pytest.raises(Exception, match="at least one"):
        distributed.gpu_group(0, 4, ["0", "1"])


def test_layer_skip_keeps_a_modules_own_forward(tiny):
    """Blocks skipped by start_at_layer runs get their own forward back (accelerate's device hooks on a
    model split over GPUs live in the instance's ``forward``), and plain blocks get the class's."""
    from headlens import load_model
    from headlens.methods.forward import skip_blocks_before

    model = load_model(str(tiny))
    block0, block1 = (model.bridge.blocks[i].original_component for i in (0, 1))
    hooked = block0.forward  # a bound method, stored on the instance like accelerate does
    block0.forward = hooked
    with skip_blocks_before(model, 2):
        assert block0.forward is not hooked and "forward" in block1.__dict__
    assert block0.__dict__["forward"] is hooked and "forward" not in block1.__dict__


@pytest.mark.real
def test_two_ranks_same_bytes_on_smollm(tmp_path):
    """SmolLM2, two detectors: 2 ranks sharing every sweep, and 2 ranks running one detector each."""
    args = ["smollm2-135m", "-d", "induction,copy_suppression", "--batch-size", "32", "-p", "induction.seq_len=10",
            "-p", "induction.n_seqs=2", "-p", "induction.causal_seqs=1", "-p", "induction.n_random=4",
            "-p", "copy_suppression.n_tokens=64", "-p", "copy_suppression.seq_len=32",
            "-p", "copy_suppression.n_random=4"]
    r1 = headlens("scan", *args, "-o", tmp_path / "one.csv")
    r2 = headlens("scan", *args, "--split", "sweeps", "-o", tmp_path / "two.csv", ranks=2)
    r3 = headlens("scan", *args, "-o", tmp_path / "whole.csv", ranks=2)
    for r in (r1, r2, r3):
        assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    one, two, whole = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two", "whole"))
    step = "single-head ablations"
    n = one["steps_s"]["induction"][step]["chunks"]
    assert n >= 9 and two["steps_s"]["induction"][step]["chunks"] == (n + 1) // 2   # 270 heads, <= 32 per chunk
    assert whole["ranks"] == {"induction": [0], "copy_suppression": [1]}
    assert whole["steps_s"]["induction"][step]["chunks"] == n                      # all on rank 0


def test_weight_circuits_in_pieces_match_one_piece(tiny):
    """Successor's OV logits and copy suppression's QK ranks, split by a small memory budget (one layer
    per piece, keys recomputed per layer), equal the one-piece results exactly: at 70B the one-piece
    products are tens of GiB (successor ran out of memory on an H200)."""
    from headlens import load_model
    from headlens.detectors.copy_suppression import qk_own_ranks
    from headlens.detectors.successor import load_tasks, succession_logits, task_groups

    model = load_model(str(tiny))
    groups = task_groups(model.tokenizer, load_tasks())
    tokens = torch.tensor([3, 5, 7, 11, 2, 9])
    whole, ranks = succession_logits(model, groups), qk_own_ranks(model, tokens, chunk=7)
    small = model.weight_bytes() + 1024                        # 1 KiB of working memory
    with use(max_memory=small):
        assert plan(2048, device="cpu", weights=model.weight_bytes(), n_items=model.n_layers) == 1
        pieces, ranks_small = succession_logits(model, groups), qk_own_ranks(model, tokens, chunk=7)
    assert len(groups) >= 2
    for (a, ta), (b, tb) in zip(whole, pieces):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert torch.equal(ranks, ranks_small)
