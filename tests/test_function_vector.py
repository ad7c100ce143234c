"""Function-vector detector: the prompts, a planted function-vector head (found, confirmed, its function vector
restores zero-shot answers), a model that cannot do the task (not applicable), the batched AIE against a
one-head-at-a-time loop, and SmolLM2."""
import json

import pytest
import torch

from headlens import load_model
from headlens.detectors import get_detector, parse_detectors
from headlens.detectors.function_vector import (
    answer_metric,
    derange,
    icl_prompts,
    kept_pairs,
    load_icl_tasks,
    prompt_text,
)
from headlens.errors import HeadlensError
from headlens.methods import z_name

from planted import (
    FV_ANSWER_HEAD,
    FV_HEAD,
    FV_NONE_HEAD,
    function_vector_model,
    function_vector_tasks,
    llama_induction_model,
)

SMALL = dict(n_demos=4, discovery_prompts=6, confirm_queries=4, n_top=1)


@pytest.fixture(scope="module")
def fv_model(tmp_path_factory):
    return load_model(str(function_vector_model(tmp_path_factory.mktemp("function_vector"))))


@pytest.fixture(scope="module")
def fv_tasks(tmp_path_factory):
    return str(function_vector_tasks(tmp_path_factory.mktemp("fv_tasks")))


@pytest.fixture(scope="module")
def planted_result(fv_model, fv_tasks):
    return get_detector("function_vector", tasks_file=fv_tasks, n_random=99, **SMALL).run(fv_model, seed=0)


def test_the_task_file_and_its_pairs():
    tasks = load_icl_tasks()
    assert {"antonyms", "country_capital", "english_french", "present_past"} <= set(tasks)
    assert all(len(pairs) >= 40 for pairs in tasks.values())
    for pairs in tasks.values():                       # every input once per task
        assert len({x for x, _ in pairs}) == len(pairs)


def test_kept_pairs_drop_answers_whose_first_token_is_not_well_defined(fv_model):
    pairs = [("a1", "b1"), ("a2", "b2"), ("a3", "a3"), ("a4", "b5 b6"), ("a5", "b5"), ("a6", "")]
    kept, dropped = kept_pairs(fv_model.tokenizer, pairs)
    ids = fv_model.tokenizer.convert_tokens_to_ids
    assert kept == [("a1", "b1", ids("b1")), ("a2", "b2", ids("b2"))]
    # "b5 b6" and "b5" start with the same token; "a3" -> "a3" is a copy; "" has no token
    assert dropped == {"no_token": 1, "shared_first_token": 2, "copy": 1}


def test_prompts_shuffle_every_label_and_are_seeded(fv_model):
    assert prompt_text([("x", "y")], "q") == "Q: x\nA: y\n\nQ: q\nA:"
    for n in (2, 3, 10):
        p = derange(n, torch.Generator().manual_seed(n))
        assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
    pairs, _ = kept_pairs(fv_model.tokenizer, [(f"a{i}", f"b{i}") for i in range(1, 15)])
    make = lambda s: icl_prompts(fv_model, pairs, [0, 1, 2], list(range(14)), 5, 0,   # noqa: E731
                                 torch.Generator().manual_seed(s))
    p = make(3)
    assert p.clean == make(3).clean and p.shuffled == make(3).shuffled and p.clean != make(4).clean
    ids = fv_model.tokenizer.convert_ids_to_tokens
    for q, clean, shuffled, zero in zip(range(3), p.clean, p.shuffled, p.zero_shot):
        c, s = ids(clean), ids(shuffled)
        assert c[0] == "<bos>" and c[-3:] == ["Q:", f"a{q + 1}", "A:"] and s[-3:] == c[-3:]
        assert ids(zero) == ["<bos>", "Q:", f"a{q + 1}", "A:"]
        xs, ys, ys_shuffled = c[2:-3:4], c[4:-3:4], s[4:-3:4]
        assert len(xs) == 5 and f"a{q + 1}" not in xs                  # the query is never a demonstration
        assert xs == s[2:-3:4] and sorted(ys) == sorted(ys_shuffled)   # same inputs, labels permuted
        assert all(y == "b" + x[1:] for x, y in zip(xs, ys))
        assert all(y != "b" + x[1:] for x, y in zip(xs, ys_shuffled))  # no demonstration keeps its label
    assert p.target.tolist() == [fv_model.tokenizer.convert_tokens_to_ids(f"b{i}") for i in (1, 2, 3)]


def test_planted_function_vector_head_is_found_and_confirmed(planted_result):
    res = planted_result
    f = res.frame.set_index(["layer", "head"])
    assert res.status == "ok" and res.labelled == [FV_HEAD] and res.info["claimed"] == ["L1H0"]
    task = res.info["tasks"]["letters"]
    assert task["kept"] == 14 and task["clean_accuracy"] == 1 and task["shuffled_accuracy"] == 0
    assert task["p_gain_lo"] > 0.5 and res.info["tasks_used"] == ["letters"]
    row = f.loc[FV_HEAD]
    assert row.function_vector_score > 0.5 and row.function_vector_score_lo > 0.5
    assert row.function_vector_score == pytest.approx(row.function_vector_letters)
    # The answer head's mean output (an average query) only loses the query; the zero heads do nothing.
    assert f.loc[FV_ANSWER_HEAD].function_vector_score < 0
    others = f.drop([FV_HEAD, FV_ANSWER_HEAD]).function_vector_score
    assert others.abs().max() < 1e-3 and abs(f.loc[FV_NONE_HEAD].function_vector_score) < 1e-3
    c = res.causal
    assert c.tested == "claimed" and c.top_heads == ["L1H0"] and c.significant
    assert all(d[0].startswith("L1H") and d[0] != "L1H0" for d in c.random_draws)
    assert c.top_k_ablated < c.clean - 0.1 and c.floor < c.clean - 0.5
    assert c.extra["clean_accuracy"] == 1


def test_the_function_vector_restores_zero_shot_answers(planted_result):
    fv = planted_result.info["function_vector"]
    assert fv["layer"] == 0 and fv["heads"] == ["L1H0"] and fv["control_heads"][0].startswith("L1H")
    assert fv["zero_shot_accuracy_none"]["mean"] == 0                    # "none" wins without the task
    assert fv["zero_shot_p_gain_function_vector"]["lo"] > 0.5
    assert fv["zero_shot_accuracy_function_vector"]["mean"] == 1
    assert abs(fv["zero_shot_p_gain_random_heads"]["mean"]) < 0.05     # a zero or constant head's mean: no task


def test_a_model_without_the_task_is_not_applicable(tmp_path, fv_tasks):
    """With the function-vector head's output set to zero the demonstrations change nothing: clean and
    shuffled prompts get the same answer, and the result says so with the numbers."""
    m = load_model(str(function_vector_model(tmp_path / "m", task=0.0)))
    res = get_detector("function_vector", tasks_file=fv_tasks, **SMALL).run(m, seed=0)
    assert res.status == "not_applicable" and res.labelled == []
    assert "does none of the in-context tasks" in res.reason and "letters: clean P" in res.reason
    task = res.info["tasks"]["letters"]
    assert task["p_gain_lo"] <= 0 and abs(task["p_gain"]) < 1e-3 and "left_out" in task
    assert res.frame.function_vector_score.isna().all()


def test_user_mistakes_are_one_line_errors(fv_model, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pairs": []}))
    with pytest.raises(HeadlensError, match="not an in-context task file"):
        get_detector("function_vector", tasks_file=str(bad)).run(fv_model)
    with pytest.raises(HeadlensError, match="fv_layer"):
        get_detector("function_vector", fv_layer=7).run(fv_model)
    with pytest.raises(HeadlensError, match="n_demos"):
        get_detector("function_vector", n_demos=0).run(fv_model)


def test_it_is_opt_in():
    assert "function_vector" not in parse_detectors(None)
    assert "function_vector" in parse_detectors("all") and parse_detectors("function_vector") == ["function_vector"]


def _loop_aie(model, tokens, mask, target, task, means) -> torch.Tensor:
    """The plain version: for each head, one forward pass with its output at the last position replaced by
    its task mean (a hook on ``hook_z``), P(answer) minus the unpatched P(answer): ``[n, L, H]``."""
    metric = answer_metric(target, columns=1)
    base = metric(model.bridge(tokens, attention_mask=mask)[:, -1:]).float()
    out = torch.zeros(len(tokens), model.n_layers, model.n_heads)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            def patch(z, hook, layer=layer, head=head):
                z = z.clone()
                z[:, -1, head] = means[layer][task, head]
                return z
            logits = model.bridge.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(z_name(layer), patch)])
            out[:, layer, head] = metric(logits[:, -1:]).float() - base
    return out


@pytest.mark.parametrize("which", ["planted", "llama"])
def test_batched_aie_matches_a_per_head_loop(which, fv_model, tmp_path):
    """``indirect_effects`` (every head in one batched ``run_variants``, the patch at the last position)
    equals a hooked forward pass per head: on the planted GPT-2 with its own few-shot prompts, and on a tiny
    Llama (its native forward, grouped-query attention) with left-padded random prompts of different
    lengths; two tasks each, the answer the model's own top token (a probability worth comparing)."""
    from headlens.models import left_pad

    det = get_detector("function_vector")
    task = torch.tensor([0, 1, 0, 1, 0, 1])
    if which == "planted":
        model = fv_model
        pairs, _ = kept_pairs(model.tokenizer, [(f"a{i}", f"b{i}") for i in range(1, 15)])
        p = icl_prompts(model, pairs, list(range(6)), list(range(14)), 4, 0, torch.Generator().manual_seed(0))
        clean, patched = p.clean, p.shuffled
    else:
        model = load_model(str(llama_induction_model(tmp_path / "llama")))
        g = torch.Generator().manual_seed(0)
        vocab = model.bridge.cfg.d_vocab
        clean = patched = [[model.start_token_id] + torch.randint(1, vocab, (n,), generator=g).tolist()
                           for n in (9, 12, 7, 12, 10, 8)]
    tokens, mask = left_pad(patched, model.pad_id())
    tokens, mask = tokens.to(model.device), mask.to(model.device)
    target = model.bridge(tokens, attention_mask=mask)[:, -1].argmax(-1).cpu()
    means = det.task_means(model, clean, task, 2)
    assert set(means) == set(range(model.n_layers)) and means[0].shape == (2, model.n_heads, model.info.d_head)
    batched = det.indirect_effects(model, patched, target, task, means)
    plain = _loop_aie(model, tokens, mask, target, task, means)
    assert batched.shape == plain.shape == (6, model.n_layers, model.n_heads)
    assert plain.abs().max() > 1e-2                                   # something to compare
    torch.testing.assert_close(batched, plain, atol=2e-5, rtol=1e-3)


def test_the_same_seed_gives_the_same_frame(fv_model, fv_tasks, planted_result):
    again = get_detector("function_vector", tasks_file=fv_tasks, n_random=9, **SMALL).run(fv_model, seed=0)
    assert again.frame.equals(planted_result.frame)
    assert again.info["function_vector"] == planted_result.info["function_vector"]


SMOLLM = dict(discovery_prompts=3, confirm_queries=4, n_random=20, candidate_draws=20)


def test_smollm2_reports_its_clean_behaviour_first_and_labels_only_what_it_confirms(smollm):
    """SmolLM2-135M-Instruct with few prompts (the default role is opt-in and takes far longer; see its
    docs page): every task's clean vs shuffled behaviour is reported with its interval, the tasks kept are
    exactly those whose gain interval lies above 0, the AIE interval holds the score, a label only follows a
    significant check, and the function vector's zero-shot effect comes with its random-head control."""
    res = get_detector("function_vector", **SMOLLM).run(smollm, seed=0)
    tasks = res.info["tasks"]
    for name, t in tasks.items():
        assert t["kept"] >= 40 and t["kept"] + sum(t["dropped"].values()) == t["pairs"], name
        assert t["clean_p_lo"] <= t["clean_p"] <= t["clean_p_hi"] and t["p_gain_lo"] <= t["p_gain"] <= t["p_gain_hi"]
        assert (t["p_gain_lo"] > 0) == ("left_out" not in t), name
    used = [n for n, t in tasks.items() if t["p_gain_lo"] > 0]
    if not used:
        assert res.status == "not_applicable" and "does none of the in-context tasks" in res.reason
        return
    assert res.status == "ok" and res.info["tasks_used"] == used
    f = res.frame
    assert (f.function_vector_score_lo <= f.function_vector_score + 1e-6).all()
    assert (f.function_vector_score <= f.function_vector_score_hi + 1e-6).all()
    claimed = res.info["claimed"]
    assert all(f.set_index(["layer", "head"]).loc[(int(h[1:].split("H")[0]), int(h.split("H")[1]))]
               .function_vector_score_lo > 0.001 for h in claimed)
    c = res.causal
    assert c.n_units == 4 * len(used) and c.tested == ("claimed" if claimed else "best candidates")
    if c.significant and claimed:
        assert [f"L{l}H{h}" for l, h in res.labelled] == claimed
    else:
        assert res.labelled == [] and res.reason
    fv = res.info["function_vector"]
    assert len(fv["heads"]) == 10 and len(fv["control_heads"]) == 10 and fv["layer"] == 10
    for key in ("zero_shot_p_none", "zero_shot_p_function_vector", "zero_shot_p_random_heads",
                "zero_shot_p_gain_function_vector", "zero_shot_p_gain_random_heads"):
        assert fv[key]["lo"] <= fv[key]["mean"] + 1e-6 and fv[key]["mean"] <= fv[key]["hi"] + 1e-6, key
