"""Resumable scans: a scan killed after its first detector (or in the middle of a batched sweep) and run
again with ``--resume`` writes the same catalogue bytes as an uninterrupted scan; checkpoints of another
run (seed, parameters, model) are refused with one ``error:`` line; a damaged or planted checkpoint file is
never loaded (one line says so) and its part is recomputed, to the same bytes.

The kill is simulated deterministically by tests/die_after.py (the process ends with ``os._exit(75)``, no
cleanup, right after the named checkpoint is written)."""
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from headlens.runtime import checkpoint

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
    r = headlens("scan", tiny, *ARGS, "-o", out, *extra, die_after=when)
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
    r = headlens("scan", tiny, *ARGS, "-o", out, ranks=2, die_after="successor")
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


# A damaged or planted checkpoint file is never loaded: one line says so, and that part is recomputed.

@pytest.fixture(scope="module")
def after_induction(tiny, tmp_path_factory):
    """The checkpoint folder of a scan killed after induction (each test damages a copy)."""
    return killed(tiny, tmp_path_factory.mktemp("after_induction") / "cat.csv", "induction")


def resumed(tiny, ckpt, out, *extra):
    """Resume from a copy of ``ckpt`` beside ``out``: the scan must succeed quietly (no traceback)."""
    r = headlens("scan", tiny, *ARGS, "-o", out, "--resume", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not ckpt.exists()
    return [line for line in r.stderr.splitlines() if "damaged" in line], r.stderr


def copy_of(ckpt, out):
    return Path(shutil.copytree(ckpt, out.with_name(out.name + ".ckpt")))


def test_a_garbled_manifest_starts_afresh(tiny, reference, after_induction, tmp_path):
    out = tmp_path / "cat.csv"
    ckpt = copy_of(after_induction, out)
    (ckpt / "manifest.json").write_text('{"model": {"name": "tiny", "n_lay')
    damaged, err = resumed(tiny, ckpt, out)
    assert len(damaged) == 1 and "manifest.json" in damaged[0] and "starting afresh" in damaged[0], err
    assert "taken from the checkpoint" not in err
    assert out.read_bytes() == reference


def test_a_truncated_detector_file_is_run_again(tiny, reference, after_induction, tmp_path):
    out = tmp_path / "cat.csv"
    ckpt = copy_of(after_induction, out)
    (ckpt / "induction.pt").write_bytes((ckpt / "induction.pt").read_bytes()[:100])
    damaged, err = resumed(tiny, ckpt, out)
    assert len(damaged) == 1 and str(ckpt / "induction.pt") in damaged[0], err
    assert "failed reading zip archive" in damaged[0] and "running induction again" in damaged[0]
    assert "taken from the checkpoint" not in err and "induction: done in" in err
    assert out.read_bytes() == reference


def test_a_truncated_chunk_file_is_recomputed(tiny, reference, tmp_path):
    out = tmp_path / "cat.csv"
    ckpt = killed(tiny, out, "chunks:2", "--checkpoint-every", "0")
    chunks = ckpt / "induction.chunks" / "call1.rank0.pt"
    chunks.write_bytes(chunks.read_bytes()[:100])
    damaged, err = resumed(tiny, ckpt, out, "--checkpoint-every", "0")
    assert len(damaged) == 1 and str(chunks) in damaged[0] and "recomputing its chunks" in damaged[0], err
    assert "reusing" not in err
    assert out.read_bytes() == reference


class Planted:
    """Unpickled, it runs a shell command: what a file planted in a shared checkpoint folder could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_is_refused_unread(tiny, reference, after_induction, tmp_path):
    """A planted detector file (torch.save) and chunk file (a plain pickle) never run their code."""
    out, marker = tmp_path / "cat.csv", tmp_path / "ran"
    ckpt = copy_of(after_induction, out)
    torch.save({"format": checkpoint.FORMAT, "role": "induction", "state": Planted(marker)}, ckpt / "induction.pt")
    (ckpt / "successor.chunks").mkdir()
    (ckpt / "successor.chunks" / "call1.rank0.pt").write_bytes(pickle.dumps(Planted(marker)))
    damaged, err = resumed(tiny, ckpt, out)
    assert not marker.exists()
    assert len(damaged) == 2, err
    assert str(ckpt / "induction.pt") in damaged[0] and "running induction again" in damaged[0]
    assert "(it holds posix.system, not only tensors and plain data)" in damaged[0]
    assert str(ckpt / "successor.chunks" / "call1.rank0.pt") in damaged[1] and "recomputing its chunks" in damaged[1]
    assert "taken from the checkpoint" not in err
    assert out.read_bytes() == reference
