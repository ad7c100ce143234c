"""Successor-head detector: planted ground truth, tokenizer filtering, batched-vs-plain scoring.

The real-model run through ``headlens scan`` is in test_ov_roles_scan.py."""
import pytest
import torch

from headlens.detectors import get_detector
from headlens.detectors.successor import load_tasks, single_token, succession_hits, task_groups
from headlens.errors import HeadlensError
from headlens.methods.circuits import effective_embedding, normalise

from planted import SUCCESSOR_COPY_HEAD, SUCCESSOR_HEAD, successor_model


@pytest.fixture(scope="module")
def planted_successor(tmp_path_factory):
    from headlens import load_model

    return load_model(str(successor_model(tmp_path_factory.mktemp("planted_successor"))))


@pytest.fixture(scope="module")
def planted_result(planted_successor):
    return get_detector("successor", top_k=1, n_random=99).run(planted_successor, seed=0)


def test_planted_successor_head_ranked_first_and_alone_labelled(planted_result):
    res = planted_result
    top = res.top(2)
    assert (int(top.iloc[0]["layer"]), int(top.iloc[0]["head"])) == SUCCESSOR_HEAD
    assert top.iloc[0]["successor_score"] == 1.0
    assert top.iloc[1]["successor_score"] < 0.1          # nothing else maps i -> i+1
    assert res.labelled == [SUCCESSOR_HEAD]
    # Per task: the planted head gets every pair right; tasks the vocabulary lacks have NaN, not zeros.
    row = res.frame.set_index(["layer", "head"]).loc[SUCCESSOR_HEAD]
    for task in ("days", "months", "numbers", "letters"):
        assert row[f"successor_{task}"] == 1.0
    assert row["successor_ordinals"] != row["successor_ordinals"]   # NaN
    assert set(res.info["tasks_without_pairs"]) == {"number_words", "ordinals", "day_abbreviations",
                                                     "month_abbreviations"}


def test_planted_behaviour_separates_successor_from_copying(planted_result):
    f = planted_result.frame.set_index(["layer", "head"])
    assert f.loc[SUCCESSOR_HEAD, "successor_dla"] > 0.5      # pushes the successor over the current item
    assert f.loc[SUCCESSOR_COPY_HEAD, "successor_dla"] < -0.1  # the copying head does the opposite
    assert SUCCESSOR_COPY_HEAD not in planted_result.labelled


def test_planted_causal_check(planted_result):
    c = planted_result.causal.to_dict()
    assert c["top_heads"] == ["L1H1"]
    assert c["clean"] == 1.0 and c["top_k_ablated"] == 0.0
    assert min(c["random_k_ablated"]) == 1.0                 # other heads do not carry succession
    assert c["worse"] == "lower" and c["p_value"] == pytest.approx(1 / 100)   # the minimum with 99 draws
    assert c["tested"] == "claimed" and c["significant"] and c["matched"]
    assert all(d[0].startswith("L1H") for d in c["random_draws"])             # the claimed head's layer
    assert c["effect"] > 1.0          # the next item falls below chance among the task's tokens
    info = planted_result.info
    assert info["n_confirmation_prompts"] > 0 and info["n_discovery_prompts"] > 0


def test_planted_interval_and_direct_vs_total(planted_result):
    f = planted_result.frame.set_index(["layer", "head"])
    row = f.loc[SUCCESSOR_HEAD]
    # Every pair succeeds, so every resample does: the interval is the point.
    assert row.successor_score_lo == row.successor_score_hi == 1.0
    assert ((f.successor_score_lo <= f.successor_score) & (f.successor_score <= f.successor_score_hi)).all()
    # The unit is the task word with all its spellings, resampled within its task.
    info = planted_result.info
    assert info["interval_unit"] == "task word (all its spellings), within its task"
    assert info["interval_units"]["days"] == 7 and info["pairs_per_task"]["days"] >= 7
    # The planted head writes straight to the logits from the last layer: its ablation hurts the next
    # item's log-prob directly, and nothing downstream can repair it.
    assert row.successor_direct > 0.5 and row.successor_total > 0.5
    assert abs(row.successor_self_repair) < 0.2
    assert row.successor_compensation == pytest.approx(row.successor_direct - row.successor_total)
    # Heads with no direct path (|direct| under both floors) get no self-repair share, but a compensation.
    small = f.successor_direct.abs() < 0.01
    assert small.sum() == len(f) - 1 and f.successor_self_repair[small].isna().all()
    assert ((f.successor_compensation - (f.successor_direct - f.successor_total)).abs() < 1e-6).all()


def test_pair_items_name_the_task_word_across_spellings():
    from headlens.detectors.successor import Group

    spaced = Group("days", " ", [10, 11, None, 13], cyclic=True)      # " Wednesday" is not one token
    bare = Group("days", "", [20, 21, 22, 23], cyclic=True)
    assert spaced.pairs() == [(10, 11), (13, 10)] and spaced.pair_items() == [0, 3]
    assert bare.pair_items() == [0, 1, 2, 3]                            # words 0 and 3 have two spellings
    assert Group("letters", "", [1, 2, 3], cyclic=False).pair_items() == [0, 1]


def test_single_token_filtering(smollm, planted_successor):
    tok = smollm.tokenizer
    assert single_token(tok, " Monday") is not None
    assert single_token(tok, " monday") is None               # two tokens in SmolLM2
    assert single_token(tok, "12") is None and single_token(tok, "7") is not None
    groups = task_groups(tok, load_tasks())
    numbers = [g for g in groups if g.task == "numbers"]
    assert numbers and all(len(g.candidates) == 9 for g in numbers)    # "1".."9": digits are single tokens
    # Word-level vocabulary: lower-case variants are unknown words and are dropped, not mapped to <unk>.
    assert single_token(planted_successor.tokenizer, "monday") is None
    assert single_token(planted_successor.tokenizer, " Monday") is not None


def test_batched_hits_match_plain_per_head(smollm):
    """The all-heads einsum score equals a plain per-head, per-pair computation."""
    groups = [g for g in task_groups(smollm.tokenizer, load_tasks()) if g.task in ("days", "letters")]
    hits = succession_hits(smollm, groups)
    b = smollm.bridge
    ids = sorted({s for g in groups for s, _ in g.pairs()})
    ee = dict(zip(ids, normalise(smollm, effective_embedding(smollm, torch.tensor(ids)))))
    W_V, W_O, W_U = b.W_V.float(), b.W_O.float(), b.W_U.float()
    for l, h in [(0, 0), (23, 3), (17, 8)]:
        w_v, w_o = W_V[l, smollm.kv_head(h)], W_O[l, h]
        plain = {}
        for g in groups:
            cand = g.candidates
            for s, t in g.pairs():
                logits = ((ee[s] @ w_v) @ w_o) @ W_U[:, cand]
                others = torch.cat([logits[:cand.index(t)], logits[cand.index(t) + 1:]])
                plain.setdefault(g.task, []).append(bool(logits[cand.index(t)] > others.max()))
        for task, values in plain.items():
            assert hits[task][l, h].tolist() == values


def test_bad_parameter_and_missing_task_file(smollm):
    with pytest.raises(HeadlensError, match="no parameter"):
        get_detector("successor", thresold=0.3)
    with pytest.raises(HeadlensError, match="not found"):
        get_detector("successor", tasks_file="nope.json").run(smollm)


@pytest.fixture(scope="module")
def planted_llama(tmp_path_factory):
    from headlens import load_model

    from planted import llama_successor_model

    model = load_model(str(llama_successor_model(tmp_path_factory.mktemp("llama_successor"))))
    return model, get_detector("successor", top_k=1, n_random=99).run(model, seed=0)


def test_planted_llama_successor_head_first_and_significant(planted_llama):
    """RMSNorm, rotary, GQA, and an MLP0 the tokens must pass through: the planted head comes first,
    alone labelled, with the smallest possible p-value against the shuffled-successor null."""
    from headlens.detectors.successor import source_embedding
    from headlens.methods.circuits import ov_out

    from planted import LLAMA_SUCCESSOR_COPY_HEAD, LLAMA_SUCCESSOR_HEAD

    model, res = planted_llama
    f = res.frame.set_index(["layer", "head"])
    assert res.top(1).index[0] == f.index.get_loc(LLAMA_SUCCESSOR_HEAD)
    assert res.labelled == [LLAMA_SUCCESSOR_HEAD]
    row = f.loc[LLAMA_SUCCESSOR_HEAD]
    assert row.successor_score == 1.0 and row.successor_p == pytest.approx(1 / (1 + res.params["n_null"]))
    assert row.successor_z > 5
    assert f.loc[LLAMA_SUCCESSOR_COPY_HEAD].successor_dla < 0 < row.successor_dla
    # The tokens reach layer 1 only through MLP0: the bare embedding gives the head nothing to map,
    # while MLP0(W_E) alone (the reference's choice) gives the same answer as W_E + MLP0(W_E).
    ids = torch.tensor([5, 6, 7])
    bare = ov_out(model, normalise(model, model.bridge.W_E.float()[ids]))[LLAMA_SUCCESSOR_HEAD]
    assert bare.abs().max() < 1e-4
    mlp0 = get_detector("successor", embedding="mlp0", averaging="pooled", top_k=1, n_random=2)
    other = mlp0.run(model, seed=0).frame.set_index(["layer", "head"])
    assert other.loc[LLAMA_SUCCESSOR_HEAD].successor_score == 1.0
    assert source_embedding(model, ids, "mlp0").shape == (3, model.info.d_model)


def test_null_mean_is_the_analytic_chance_level(smollm):
    """Under the shuffled-successor null a head wins a pair with probability 1/|group| (when its top
    logit is unique), so the null mean of every head must match that analytic chance level."""
    from headlens.detectors.successor import aggregate, null_scores, succession_logits

    groups = task_groups(smollm.tokenizer, load_tasks())
    logits = succession_logits(smollm, groups)
    null = null_scores(groups, logits, 400, "task", seed=0)
    per_task: dict[str, list[torch.Tensor]] = {}
    for g, (lg, _) in zip(groups, logits):
        top2 = lg.topk(2, dim=-1).values
        per_task.setdefault(g.task, []).append((top2[..., 0] > top2[..., 1]).float() / lg.shape[-1])
    analytic = aggregate({t: torch.cat(v, -1) for t, v in per_task.items()}, "task")
    # 400 draws: the standard error of a head's null mean is at most ~0.5 / sqrt(400) / ... < 0.01
    assert (null.mean(0) - analytic).abs().max() < 0.02
    assert 0.05 < float(analytic.median()) < 0.2       # SmolLM2's task chance averages ~0.11


def test_pooled_and_per_task_averaging(smollm):
    from headlens.detectors.successor import aggregate

    hits = succession_hits(smollm, task_groups(smollm.tokenizer, load_tasks()))
    pooled, task = aggregate(hits, "pooled"), aggregate(hits, "task")
    n = sum(h.shape[-1] for h in hits.values())
    assert torch.allclose(pooled, sum(h.float().sum(-1) for h in hits.values()) / n)
    assert torch.allclose(task, torch.stack([h.float().mean(-1) for h in hits.values()]).mean(0))
    with pytest.raises(HeadlensError, match="averaging"):
        aggregate(hits, "median")
