"""The command line as a user meets it: scans, saved catalogues, and one-line errors for mistakes."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from headlens.catalogue import Catalogue, read_catalogue
from headlens.cli import top_table


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
    # The table holds what a reader needs (head, score [interval], the role's key evidence, label); the
    # other evidence stays in the CSV.
    header = next(line for line in r.stdout.splitlines() if "score [95% interval]" in line)
    assert [w for w in ("head", "copying", "loss_rise", "label") if w in header] == ["head", "copying",
                                                                                     "loss_rise", "label"]
    assert "prev_token" not in r.stdout and "self_repair" not in r.stdout
    top_row = next(line for line in r.stdout.splitlines() if "L1H2" in line)
    assert "yes" in top_row and "[" in top_row
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
    assert "loss_rise" in shown.stdout and "prev_token" not in shown.stdout   # the same table as scan's
    assert read_catalogue(out).top("induction", 1).head_id.item() == "L1H2"


def _rendered(table) -> str:
    console = Console(file=io.StringIO(), width=250)
    console.print(table)
    return console.file.getvalue()


def test_top_table_columns_key_evidence_label_and_stability():
    """Per role: head, score [interval], the detector's key_columns, label (yes / no), and stability when
    the catalogue has it; a role no detector registers gets score and label only."""
    frame = pd.DataFrame({
        "layer": [1, 0], "head": [2, 1], "head_id": ["L1H2", "L0H1"],
        "induction_score": [0.83, 0.1], "induction_score_lo": [0.71, 0.05], "induction_score_hi": [0.9, 0.2],
        "induction_copying": [0.95, 0.2], "induction_prev_token": [0.01, 0.97],
        "induction_loss_rise": [0.79, 0.66], "induction_self_repair": [0.015, float("nan")],
        "induction_label": [True, False], "induction_status": ["ok", "ok"], "induction_stability": [0.9, 0.4],
        "my_role_score": [0.2, 0.7], "my_role_evidence": [1.0, 2.0], "my_role_label": [False, True],
        "my_role_status": ["ok", "ok"]})
    meta = {"detectors": {"induction": {"params": {"ci_level": 0.95}}, "my_role": {}}}
    cat = Catalogue(frame=frame, meta=meta)
    text = _rendered(top_table(cat, "induction", 2))
    header = next(line for line in text.splitlines() if "head" in line and "score" in line)
    names = [c.strip() for c in header.strip("┃ ").split("┃")]
    assert names == ["head", "score [95% interval]", "copying", "loss_rise", "label", "stability"]
    rows = [line for line in text.splitlines() if "L1H2" in line or "L0H1" in line]
    assert "L1H2" in rows[0] and "0.830 [0.710, 0.900]" in rows[0] and "yes" in rows[0] and "0.900" in rows[0]
    assert "L0H1" in rows[1] and "no" in rows[1]
    assert "prev_token" not in text and "self_repair" not in text
    other = _rendered(top_table(cat, "my_role", 2))
    header = next(line for line in other.splitlines() if "head" in line and "score" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["head", "score", "label"]
    first = next(line for line in other.splitlines() if "L0H1" in line or "L1H2" in line)
    assert "L0H1" in first and "0.700" in first and "yes" in first and "evidence" not in other
    # A catalogue without the stability column (or an old one without a key column) drops them quietly.
    old = Catalogue(frame=frame.drop(columns=["induction_stability", "induction_copying"]), meta=meta)
    header = next(line for line in _rendered(top_table(old, "induction", 1)).splitlines() if "score" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["head", "score [95% interval]", "loss_rise",
                                                                 "label"]


def test_every_detector_declares_documented_key_columns():
    """Each registered role names one or two key columns, each a column its page in docs/detectors/
    documents (a typo would silently drop the column from the table)."""
    from headlens.detectors import REGISTRY, detector_class

    docs = Path(__file__).resolve().parents[1] / "docs" / "detectors"
    for role in REGISTRY:
        keys = detector_class(role).key_columns
        assert 1 <= len(keys) <= 2, role
        page = (docs / f"{role}.md").read_text()
        assert all(f"`{role}_{k}`" in page for k in keys), (role, keys)


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
    (["scan", "{planted}", "-d", "induction", "-p", "all.nope=1"], "none of the detectors run"),
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


def test_param_for_all_detectors(planted_folder, tmp_path):
    """``-p all.NAME=VALUE`` sets NAME for every detector run that has it; a role's own -p wins."""
    out = tmp_path / "cat.csv"
    r = headlens("scan", str(planted_folder), *SMALL, "-d", "induction,previous_token", "-p", "all.n_random=7",
                 "-p", "previous_token.n_random=9", "-p", "all.seq_len=10", "-o", str(out))
    assert r.returncode == 0, r.stderr
    det = json.loads((tmp_path / "cat.json").read_text())["detectors"]
    assert det["induction"]["params"]["n_random"] == 7 and det["previous_token"]["params"]["n_random"] == 9
    assert len(det["induction"]["causal"]["random_k_ablated"]) == 7


def test_detectors_lists_each_with_one_line():
    r = headlens("detectors")
    assert r.returncode == 0
    assert "induction:" in r.stdout and "Olsson" in r.stdout


def test_opt_in_roles_are_left_out_of_the_default_scan_only(monkeypatch):
    """A role whose class says ``opt_in`` runs only when named (``-d NAME``, ``all``, ``default,NAME``)."""
    from headlens import detectors as d
    from headlens.detectors.induction import InductionDetector

    class Costly(InductionDetector):
        name = "costly_test_role"
        opt_in = True
    original = d.detector_class
    monkeypatch.setitem(d.REGISTRY, "costly_test_role", "x:y")
    monkeypatch.setattr(d, "detector_class", lambda n: Costly if n == "costly_test_role" else original(n))
    assert "costly_test_role" not in d.parse_detectors(None)
    assert "costly_test_role" not in d.parse_detectors("default")
    assert d.parse_detectors("all")[-1] == "costly_test_role"
    assert d.parse_detectors("default,costly_test_role")[-1] == "costly_test_role"
    assert d.parse_detectors("costly_test_role") == ["costly_test_role"]
