"""PASTA head profiling and its evaluation (headlens.steering): the written tasks and their seeded split, the
planted steerable head ranked first (head by head and coarse to fine), the batched profile against a
one-head-at-a-time loop through ``hl.steer``, the evaluation table, the CLI (same seed, same bytes; user
mistakes in one line), and on SmolLM2 the structural facts only (chat-template emphasis, intervals, the
unsteered condition equal to a plain forward pass)."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from headlens import load_model, steer
from headlens.errors import HeadlensError
from headlens.methods.generation import encode_prompt
from headlens.steering import (
    TASKS,
    encode_task,
    evaluate,
    load_task,
    profile_heads,
    select_heads,
    task_metric,
)

from planted import STEERABLE_HEAD, WEAK_STEERABLE_HEAD, steerable_model, steering_examples


@pytest.fixture(scope="module")
def steerable(tmp_path_factory):
    return str(steerable_model(tmp_path_factory.mktemp("steerable")))


@pytest.fixture(scope="module")
def steer_model(steerable):
    return load_model(steerable)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("steering_tasks") / "planted.json"
    path.write_text(json.dumps({"tasks": {"planted": {"examples": steering_examples(36, seed=1)}}}))
    return f"{path}:planted"


@pytest.fixture(scope="module")
def profile(steer_model, task_file):
    return profile_heads(steer_model, task_file, alpha=0.01, n_train=12)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "headlens.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_written_tasks_and_seeded_split():
    for name in TASKS:
        full = load_task(name)
        assert len(full) >= 60
        assert all(p.count("**") >= 2 for p in full.prompts)                  # every prompt emphasises a span
        assert all(t != d for t, d in zip(full.targets, full.distractors))
        train, test = load_task(name, "train", 20, seed=3), load_task(name, "test", 20, seed=3)
        assert len(train) == 20 and len(test) == len(full) - 20
        assert not set(train.prompts) & set(test.prompts)
        assert sorted(train.prompts + test.prompts) == sorted(full.prompts)
        assert load_task(name, "train", 20, seed=3).prompts == train.prompts
    assert load_task("counterfact", "train", 20, 0).prompts != load_task("counterfact", "train", 20, 1).prompts


@pytest.mark.parametrize("args, message", [
    (("nope",), "unknown steering task 'nope'"),
    (("json_format", "dev"), "unknown split 'dev'"),
    (("json_format", "train", 0), "n_train must be between 1 and"),
    (("/no/such/tasks.json",), "cannot read steering tasks"),
])
def test_task_mistakes_are_one_line(args, message):
    with pytest.raises(HeadlensError, match=message):
        load_task(*args)


def test_profile_ranks_the_planted_head_first(profile):
    top = profile.set_index("head_id")
    assert profile["head_id"].iloc[0] == "L%dH%d" % STEERABLE_HEAD
    assert profile["head_id"].iloc[1] == "L%dH%d" % WEAK_STEERABLE_HEAD
    assert top.loc["L%dH%d" % STEERABLE_HEAD, "gain_lo"] > 0
    silent = profile.iloc[2:]                                  # heads that write nothing: steering them is a no-op
    assert silent["gain"].abs().max() < 1e-5
    assert (profile["gain_lo"] <= profile["gain"] + 1e-6).all() and (profile["gain"] <= profile["gain_hi"] + 1e-6).all()
    assert list(profile["rank"]) == list(range(1, len(profile) + 1)) and (profile["n_examples"] == 12).all()
    assert select_heads(profile, k=1) == [STEERABLE_HEAD]


def test_batched_profile_equals_one_head_at_a_time(steer_model, task_file, profile):
    batch = encode_task(steer_model, load_task(task_file, "train", 12))
    e, metric = batch.emphasis, task_metric(batch, fluency=False)
    clean = metric(steer_model(e.tokens, attention_mask=e.attention_mask))
    looped = {}
    for head in steer_model.heads():
        with steer(steer_model, [head], e, alpha=0.01):
            looped["L%dH%d" % head] = metric(steer_model(e.tokens, attention_mask=e.attention_mask))
    by_head = profile.set_index("head_id")
    for hid, value in looped.items():
        assert by_head.loc[hid, "score"] == pytest.approx(value.mean().item(), abs=1e-4)
        assert by_head.loc[hid, "gain"] == pytest.approx((value - clean).mean().item(), abs=1e-4)
    assert profile.attrs["unsteered_score"] == pytest.approx(clean.mean().item(), abs=1e-5)


def test_coarse_to_fine_finds_the_same_head(steer_model, task_file, profile):
    fine = profile_heads(steer_model, task_file, n_train=12, coarse_to_fine=True, top_layers=1)
    assert fine["head_id"].iloc[0] == profile["head_id"].iloc[0]
    assert set(fine["layer"]) == {STEERABLE_HEAD[0]}
    assert set(fine.attrs["layer_gain"]) == {0, 1}
    with pytest.raises(HeadlensError, match="not both"):
        profile_heads(steer_model, task_file, n_train=12, coarse_to_fine=True, heads=[(0, 0)])


def test_select_heads_union_and_intersection():
    def frame(heads):
        return pd.DataFrame({"layer": [h[0] for h in heads], "head": [h[1] for h in heads],
                             "rank": range(1, len(heads) + 1), "gain_lo": [1.0] * (len(heads) - 1) + [-1.0]})
    a, b = frame([(1, 0), (2, 0), (3, 0), (4, 0)]), frame([(3, 0), (1, 0), (5, 0), (2, 0)])
    assert select_heads([a, b], k=2, how="union") == [(1, 0), (3, 0), (2, 0)]
    assert select_heads([a, b], k=3, how="intersect") == [(1, 0), (3, 0)]
    assert select_heads(a, k=4) == [(1, 0), (2, 0), (3, 0)]                  # (4, 0)'s interval touches 0
    assert select_heads(a, k=4, positive=False) == [(1, 0), (2, 0), (3, 0), (4, 0)]
    with pytest.raises(HeadlensError, match="how="):
        select_heads(a, how="both")


def test_evaluation_table_has_every_condition_with_intervals(steer_model, task_file):
    table = evaluate(steer_model, task_file, {"profiled": [STEERABLE_HEAD]}, n_train=12, n_random=4)
    assert list(table["condition"]) == ["none", "profiled", "random", "all"]
    assert list(table["n_heads"]) == [0, 1, 1, 8] and (table["n_examples"] == 24).all()
    for col in ("score", "gain", "fluency", "fluency_rise"):
        assert (table[f"{col}_lo"] <= table[col] + 1e-6).all() and (table[col] <= table[f"{col}_hi"] + 1e-6).all()
    row = table.set_index("condition")
    assert row.loc["none", "gain"] == 0 and row.loc["none", "fluency_rise"] == 0
    assert row.loc["profiled", "gain_lo"] > 0                 # the planted copier follows the emphasis
    assert abs(row.loc["random", "gain"]) < 1e-5              # random heads here write nothing
    assert row.loc["profiled", "accuracy"] > row.loc["none", "accuracy"]
    with pytest.raises(HeadlensError, match="may not be named"):
        evaluate(steer_model, task_file, {"all": [STEERABLE_HEAD]}, n_train=12)


def test_cli_profile_same_seed_same_bytes(steerable, task_file, tmp_path):
    outs = []
    for name in ("a.csv", "b.csv"):
        r = run_cli("profile-steering", steerable, "--task", task_file, "--n-train", "12", "--no-chat",
                    "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    frame = pd.read_csv(tmp_path / "a.csv")
    assert frame["head_id"].iloc[0] == "L%dH%d" % STEERABLE_HEAD and len(frame) == 8
    assert not (tmp_path / "a.csv.ckpt").exists() and not (tmp_path / "a.csv.tmp").exists()
    r = run_cli("evaluate-steering", steerable, "--task", task_file, "--n-train", "12", "--profile",
                str(tmp_path / "a.csv"), "--k", "1", "--n-random", "2", "--out", str(tmp_path / "eval.csv"))
    assert r.returncode == 0, r.stderr
    assert list(pd.read_csv(tmp_path / "eval.csv")["condition"]) == ["none", "profiled", "random", "all"]


def test_cli_killed_profile_resumes_to_the_same_bytes(steerable, task_file, tmp_path):
    args = ("profile-steering", steerable, "--task", task_file, "--n-train", "12", "--batch-size", "4")
    fresh = tmp_path / "fresh.csv"
    assert run_cli(*args, "--out", str(fresh)).returncode == 0
    out = tmp_path / "heads.csv"
    die = Path(__file__).with_name("die_after.py")
    r = subprocess.run([sys.executable, str(die), "chunks:3", *args, "--out", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 75, r.stderr[-2000:]
    chunks = out.with_name("heads.csv.ckpt") / "steering_profile.chunks"
    assert not out.exists() and any(chunks.iterdir())
    r = run_cli(*args, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_bytes() == fresh.read_bytes()
    assert not out.with_name("heads.csv.ckpt").exists()


@pytest.mark.parametrize("args, message", [
    (("--task", "nope"), "unknown steering task 'nope'"),
    (("--alpha", "0"), "--alpha must be in (0, 1]"),
    (("--alpha", "1.5"), "--alpha must be in (0, 1]"),
    (("--n-train", "500"), "n_train must be between 1 and"),
    (("--out", "/no/such/folder/heads.csv"), "folder /no/such/folder does not exist"),
])
def test_cli_mistakes_give_one_line(steerable, args, message, tmp_path):
    r = run_cli("profile-steering", steerable, "--out", str(tmp_path / "h.csv"), *args)
    assert r.returncode == 1
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "h.csv").exists()


def test_smollm_chat_emphasis_and_evaluation(smollm):
    task = load_task("counterfact", "train", 6, seed=0)
    batch = encode_task(smollm, task)
    e = batch.emphasis
    assert batch.chat
    for i, prompt in enumerate(task.prompts):
        real = e.attention_mask[i].bool()
        assert e.tokens[i][real].tolist() == encode_prompt(smollm, prompt.replace("**", ""))[0]
        emphasised = smollm.tokenizer.decode(e.tokens[i][e.mask[i]]).strip()
        assert emphasised == prompt.split("**")[1].strip()
        assert not (batch.fluency[i] & e.mask[i, 1:]).any()
    heads = [(23, 4), (5, 0)]
    profile = profile_heads(smollm, task, split="all", heads=heads)
    clean = task_metric(batch, fluency=False)(smollm(e.tokens, attention_mask=e.attention_mask))
    with steer(smollm, [(23, 4)], e, alpha=0.01):
        looped = task_metric(batch, fluency=False)(smollm(e.tokens, attention_mask=e.attention_mask))
    assert profile.set_index("head_id").loc["L23H4", "score"] == pytest.approx(looped.mean().item(), abs=1e-3)
    assert profile.attrs["unsteered_score"] == pytest.approx(clean.mean().item(), abs=1e-4)
    table = evaluate(smollm, task, {"profiled": heads}, split="all", n_random=1)
    assert list(table["condition"]) == ["none", "profiled", "random", "all"]
    for col in ("score", "fluency"):
        assert (table[f"{col}_lo"] <= table[col] + 1e-5).all() and (table[col] <= table[f"{col}_hi"] + 1e-5).all()
    none = table.set_index("condition").loc["none"]
    assert none["score"] == pytest.approx(clean.mean().item(), abs=1e-4)
    assert none["accuracy"] == pytest.approx((clean > 0).float().mean().item())
    assert torch.isfinite(torch.tensor(table["fluency"].values)).all()
