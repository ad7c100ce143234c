"""Resumable scans: a scan killed after its first detector (or in the middle of a batched sweep) and run
again with ``--resume`` writes the same catalogue bytes as an uninterrupted scan; checkpoints of another
run (seed, parameters, model) are refused with one ``error:`` line.

The kill is simulated deterministically by the documented test hook ``HEADLENS_TEST_DIE_AFTER`` (the
process ends with ``os._exit(75)``, no cleanup, right after the named checkpoint is written)."""
import json

import pytest

from test_distributed import ARGS, headlens, random_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_llama(tmp_path_factory.mktemp("tiny_llama_resume") / "model")


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "cat.csv"
    r = headlens("scan", tiny, *ARGS, "-o", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out.read_bytes()


def killed(tiny, out, when: str, *extra):
    r = headlens("scan", tiny, *ARGS, "-o", out, *extra, env={"HEADLENS_TEST_DIE_AFTER": when})
    assert r.returncode == 75, r.stderr[-3000:]
    assert not out.exists()
    return out.with_name(out.name + ".ckpt")


def test_killed_after_first_detector_resumes_to_same_bytes_on_two_ranks(tiny, reference, tmp_path):
    out = tmp_path / "cat.csv"
    ckpt = killed(tiny, out, "induction")
    assert sorted(p.name for p in ckpt.iterdir()) == ["induction.pt", "manifest.json"]
    # Resumed by 2 data-parallel ranks (--gpus 2 on the CPU launches torchrun with gloo).
    r = headlens("scan", tiny, *ARGS, "-o", out, "--resume", "--gpus", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "induction: taken from the checkpoint" in r.stderr
    assert out.read_bytes() == reference
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["resumed"] == ["induction"] and meta["world_size"] == 2
    assert not ckpt.exists()                                     # removed once the catalogue is written


def test_a_detector_finished_on_rank_1_is_checkpointed(tiny, reference, tmp_path):
    """Two ranks, each running whole detectors: rank 1 (successor, copy suppression) writes its own
    detectors' checkpoints; killed after successor, one process resumes to the same bytes."""
    out = tmp_path / "cat.csv"
    r = headlens("scan", tiny, *ARGS, "-o", out, ranks=2, env={"HEADLENS_TEST_DIE_AFTER": "successor"})
    assert r.returncode != 0 and not out.exists()
    ckpt = out.with_name(out.name + ".ckpt")
    assert (ckpt / "successor.pt").is_file() and not (ckpt / "copy_suppression.pt").exists()
    r = headlens("scan", tiny, *ARGS, "-o", out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "successor: taken from the checkpoint" in r.stderr
    assert out.read_bytes() == reference


def test_killed_inside_a_sweep_reuses_finished_chunks(tiny, reference, tmp_path):
    out = tmp_path / "cat.csv"
    ckpt = killed(tiny, out, "chunks:2", "--checkpoint-every", "0")
    assert [p.name for p in (ckpt / "induction.chunks").iterdir()] == ["call1.rank0.pt"]
    r = headlens("scan", tiny, *ARGS, "-o", out, "--resume", "--checkpoint-every", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing 2 finished chunks" in r.stderr
    assert out.read_bytes() == reference
    assert not ckpt.exists()


MISMATCHES = [
    (["--seed", "1"], "made with seed 0, not 1"),
    (["-p", "induction.top_k=2"], "other induction parameters (top_k)"),
    (["--dtype", "bfloat16"], "another model (dtype 'float32', not 'bfloat16')"),
]


def test_mismatched_checkpoint_is_refused(tiny, tmp_path):
    out = tmp_path / "cat.csv"
    ckpt = killed(tiny, out, "induction")
    for change, message in MISMATCHES:
        r = headlens("scan", tiny, *ARGS, "-o", out, "--resume", *change)
        assert r.returncode == 1, change
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0] and "without --resume" in errors[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr and not out.exists()
        assert (ckpt / "induction.pt").is_file()                # a refused resume leaves the checkpoint


def test_without_resume_an_old_checkpoint_is_ignored(tiny, reference, tmp_path):
    out = tmp_path / "cat.csv"
    ckpt = killed(tiny, out, "induction")
    r = headlens("scan", tiny, *ARGS, "-o", out)
    assert r.returncode == 0 and "ignoring the old checkpoint" in r.stderr
    assert "taken from the checkpoint" not in r.stderr
    assert out.read_bytes() == reference and not ckpt.exists()
