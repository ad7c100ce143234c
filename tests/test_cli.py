"""The command line as a user meets it: scans, saved catalogues, and one-line errors for mistakes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from headlens.catalogue import read_catalogue


def headlens(*args, cwd=None):
    root = str(Path(__file__).resolve().parents[1])   # this checkout, also when cwd is elsewhere
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "headlens.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory):
    from planted import induction_model
    return induction_model(tmp_path_factory.mktemp("cli_planted"))


SMALL = ["-d", "induction", "-p", "induction.seq_len=10", "-p", "induction.top_k=1"]


def test_scan_writes_catalogue_and_sidecar(planted_folder, tmp_path):
    out = tmp_path / "cat.csv"
    r = headlens("scan", str(planted_folder), *SMALL, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "induction: top 10 heads" in r.stdout and "L1H2" in r.stdout
    assert "induction: done in" in r.stderr  # progress shows in logs too, where no bars are drawn
    frame = pd.read_csv(out)
    assert list(frame.columns[:3]) == ["layer", "head", "head_id"]
    assert {"induction_score", "induction_label", "induction_status", "roles"} <= set(frame.columns)
    assert len(frame) == 8 and frame.loc[frame.head_id == "L1H2", "roles"].item() == "induction"
    meta = json.loads((tmp_path / "cat.json").read_text())
    assert meta["seed"] == 0 and meta["model"]["n_heads"] == 4
    assert meta["detectors"]["induction"]["params"]["seq_len"] == 10
    assert meta["detectors"]["induction"]["labelled"] == ["L1H2"]
    shown = headlens("show", str(out), "--role", "induction", "--top", "2")
    assert shown.returncode == 0 and "L1H2" in shown.stdout
    assert read_catalogue(out).top("induction", 1).head_id.item() == "L1H2"


def test_same_seed_same_bytes(planted_folder, tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    for path, seed in ((a, "3"), (b, "3"), (c, "4")):
        assert headlens("scan", str(planted_folder), *SMALL, "--seed", seed, "-o", str(path)).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()  # the seed really drives the random prompts


@pytest.mark.parametrize("args,message", [
    (["scan", "no-such-model", "-d", "induction"], "local weights"),
    (["scan", "{planted}", "-d", "nonsense"], "unknown detector 'nonsense'"),
    (["scan", "{planted}", "-d", "induction", "-o", "/no/such/folder/cat.csv"], "does not exist"),
    (["scan", "{planted}", "-d", "induction"], "context of 64 tokens"),   # 101-token prompts
    (["scan", "{planted}", "-d", "induction", "-p", "induction.nope=1"], "no parameter"),
    (["scan", "{planted}", "--dtype", "int7"], "unknown dtype"),
    (["scan", "{planted}", "--split", "layers"], "unknown --split 'layers'"),
    (["show", "{out}"], "no catalogue"),
])
def test_user_mistakes_give_one_line_and_no_file(planted_folder, tmp_path, args, message):
    out = tmp_path / "cat.csv"
    args = [a.format(planted=planted_folder, out=out) for a in args]
    if args[0] == "scan" and "-o" not in args:
        args += ["-o", str(out)]
    r = headlens(*args)
    assert r.returncode == 1
    assert message in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert not out.exists() and not list(tmp_path.glob(".cat.csv*"))


def test_detectors_lists_each_with_one_line():
    r = headlens("detectors")
    assert r.returncode == 0
    assert "induction:" in r.stdout and "Olsson" in r.stdout
