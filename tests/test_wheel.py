"""The package as a user installs it: a wheel built from this checkout, installed into a fresh virtual
environment outside the checkout, scans a tiny model with its own copy of ``data/``."""
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from headlens import HeadlensError, data_path

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ["pyproject.toml", "README.md", "headlens", "data"]   # what setuptools reads


def run(*args, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{args}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout. Built from a copy of the build inputs: setuptools builds in place and
    would write build/ and *.egg-info into the checkout, and put a stale build/lib file into the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "headlens-src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    # --no-build-isolation: the installed setuptools, offline. The path must be a path (with a slash):
    # a bare word is a requirement name, fetched from an index.
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", tmp / "dist", f"{src}{os.sep}")
    (whl,) = (tmp / "dist").glob("headlens-*.whl")
    return whl


def test_wheel_has_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "headlens").rglob("*.py")}
    assert modules - names == set()          # a subpackage missing from pyproject's `packages` shows here
    data = {f"headlens/_data/{p.name}" for p in (ROOT / "data").iterdir() if p.is_file()}
    assert data - names == set() and "headlens/py.typed" in names
    assert not any(n.startswith("data/") for n in names)    # inside the package, not a top-level `data`


@pytest.fixture(scope="module")
def venv_with_wheel(wheel, tmp_path_factory) -> Path:
    """A fresh venv (system packages visible for torch & co.) with the wheel installed over whatever
    headlens the system has (e.g. the editable install of a checkout)."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    assert ROOT not in env_dir.parents
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "--force-reinstall", "--no-compile", wheel)
    return env_dir


def tiny_llama(folder: Path) -> Path:
    """A seeded random Llama (2 x 4 heads, 2 kv heads, d_model 64) with the successor words as vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from planted import SUCCESSOR_SEQUENCES, make_tokenizer

    words = [w for seq in SUCCESSOR_SEQUENCES for w in seq]
    ids = {w: i + 1 for i, w in enumerate(words)}
    cfg = LlamaConfig(vocab_size=len(words) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    make_tokenizer(len(words) + 1, folder, special=ids)
    return folder


def test_installed_wheel_scans_with_its_own_data(venv_with_wheel, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="200")
    bindir = venv_with_wheel / ("Scripts" if os.name == "nt" else "bin")
    where = run(bindir / "python", "-c", "import json, headlens, headlens.data as d; "
                "print(json.dumps([headlens.__file__, str(d.data_path('ordinal_tasks.json'))]))",
                cwd=tmp_path, env=env)
    module, tasks = map(Path, json.loads(where.stdout))
    venv_root = venv_with_wheel.resolve()
    assert venv_root in module.resolve().parents and ROOT not in module.resolve().parents
    assert venv_root in tasks.resolve().parents and tasks.parent.name == "_data"

    model = tiny_llama(tmp_path / "model")
    r = subprocess.run([bindir / "headlens", "scan", model, "-d", "successor", "--out", "cat.csv"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "successor: done in" in r.stderr
    csv = (tmp_path / "cat.csv").read_text()
    assert csv.startswith("layer,head,head_id,") and len(csv.splitlines()) == 1 + 2 * 4   # a row per head


def test_missing_data_file_is_one_line_error():
    assert data_path("ordinal_tasks.json").is_file()
    with pytest.raises(HeadlensError) as exc:
        data_path("no_such_file.json")
    message = str(exc.value)
    assert "no_such_file.json" in message and "\n" not in message and "install -e" not in message
