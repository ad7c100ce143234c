"""Token vs concept induction (dual-route) detector: the prompt layout, the batched copying scores against
a one-head-at-a-time loop, a planted look-ahead token-copying head (and a decoy that attends the same way
and writes nothing), user mistakes, and SmolLM2's honest report."""
import pytest
import torch

from headlens import load_model
from headlens.detectors import default_detectors, get_detector, parse_detectors
from headlens.detectors.dual_route import copying_prompts, copying_rises, read_words
from headlens.errors import HeadlensError
from headlens.methods import random_token_ids, z_name

from planted import DUAL_DECOY_HEAD, DUAL_SEPARATOR, DUAL_TOKEN_HEAD, dual_route_model, dual_route_words

PLANTED = dict(context="random", separator=DUAL_SEPARATOR, context_len=8, max_word_tokens=3, n_random=99,
               confirm_prompts=6)


@pytest.fixture(scope="module")
def dual(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dual_route")
    return load_model(str(dual_route_model(folder / "model"))), str(dual_route_words(folder))


@pytest.fixture(scope="module")
def planted_result(dual):
    model, words = dual
    return get_detector("concept_induction", words=words, **PLANTED).run(model, seed=0)


def test_prompt_layout():
    p = copying_prompts([[7, 8, 6], [5, 4]], torch.tensor([[1, 2, 3, 4, 9], [11, 12, 13, 14, 15]]),
                        torch.tensor([[20, 21, 22, 23, 24], [25, 26, 27, 28, 29]]), 2, 3, 30, 0)
    # [start] pre ctx X [sep] ctx X[0]: the same length for items of 3 and 2 tokens
    assert p.clean.tolist() == [[0, 1, 2, 7, 8, 6, 30, 1, 2, 7], [0, 11, 12, 13, 5, 4, 30, 12, 13, 5]]
    assert p.corrupted.tolist() == [[0, 20, 21, 22, 23, 24, 30, 1, 2, 7], [0, 25, 26, 27, 28, 29, 30, 12, 13, 5]]
    assert p.first.tolist() == [7, 5] and p.target.tolist() == [8, 4]


def loop_rises(model, prompts, heads):
    """The reference: each head's z patched at position -2 from the clean run, one forward pass per head."""
    b = model.bridge
    with torch.no_grad():
        _, cache = b.run_with_cache(prompts.clean, names_filter=lambda n: n.endswith("hook_z"))
        rows = torch.arange(len(prompts.target))
        base = b(prompts.corrupted)[:, -1].float().softmax(-1)[rows, prompts.target]
        out = []
        for l, h in heads:
            def patch(z, hook, l=l, h=h):
                z = z.clone()
                z[:, -2, h] = cache[z_name(l)][:, -2, h]
                return z
            logits = b.run_with_hooks(prompts.corrupted, fwd_hooks=[(z_name(l), patch)])
            out.append(logits[:, -1].float().softmax(-1)[rows, prompts.target] - base)
    return torch.stack(out)


def test_batched_rises_match_a_one_head_loop(dual):
    model, words = dual
    items = read_words(model, words, 3)[:6]
    g = torch.Generator().manual_seed(3)
    ctx = random_token_ids(model, 12, 11, g)
    prompts = copying_prompts(items, ctx[:6], ctx[6:], 8, 3, 31, model.start_token_id)
    heads = model.heads()
    batched, clean = copying_rises(model, prompts, heads, batch_size=7)   # chunks split variants
    reference = loop_rises(model, prompts, heads)
    assert torch.allclose(batched, reference, atol=1e-5)
    assert batched[heads.index(DUAL_TOKEN_HEAD)].mean() > 0.3             # the planted head is the one that matters
    assert (clean["clean_prob"] >= clean["corrupted_prob"]).all()


def test_planted_token_head_is_found_and_confirmed(planted_result):
    r = planted_result
    f = r.frame.set_index(["layer", "head"])
    b = r.info["clean_behaviour"]
    assert b["token_clean_prob"] > b["token_corrupted_prob_ci"][1]          # the clean behaviour exists
    assert b["concept_clean_prob"] > b["concept_corrupted_prob_ci"][1]
    assert r.info["claimed_token"] == ["L1H2"] and r.info["token_heads"] == ["L1H2"]
    assert r.info["token_causal"]["top_k_ablated"] > max(r.info["token_causal"]["random_k_ablated"])
    # it copies any sequence, words included: both routes, and the concept check confirms it too
    assert r.labelled == [DUAL_TOKEN_HEAD] and r.causal.significant
    assert f.loc[DUAL_TOKEN_HEAD, "concept_induction_kind"] == "both"
    assert f.loc[DUAL_TOKEN_HEAD, "concept_induction_token_score_lo"] > 0.05
    assert abs(f.loc[DUAL_DECOY_HEAD, "concept_induction_token_score"]) < 1e-6   # same attention, no output
    assert (f.drop(index=[DUAL_TOKEN_HEAD])["concept_induction_kind"] == "").all()
    assert r.info["n_words"] == 16 and r.reason == ""


def test_same_seed_same_scores(dual, planted_result):
    model, words = dual
    again = get_detector("concept_induction", words=words, **PLANTED).run(model, seed=0)
    assert again.frame.equals(planted_result.frame)


def test_user_mistakes(dual, planted_induction):
    model, words = dual
    with pytest.raises(HeadlensError, match="separator"):
        get_detector("concept_induction", words=words, context="random", separator="t3 t4").run(model)
    with pytest.raises(HeadlensError, match="n_prompts"):
        get_detector("concept_induction", words=words, n_prompts=1).run(model)
    # a word-level tokenizer that knows none of the data file's words: nothing multi-token to copy
    r = get_detector("concept_induction", context="random").run(planted_induction)
    assert not r.applies and "multi-token" in r.reason


def test_opt_in_role():
    assert "concept_induction" not in default_detectors()
    assert "concept_induction" in parse_detectors("all")


def test_smollm_reports_both_routes_honestly(smollm):
    """SmolLM2: the clean copying behaviour first; every kind label backed by a significant check of its
    route; a route without one labels nothing and says so. Fewer units than the default (8, not 16; the
    sign test can then still reach q <= 0.01 when many heads rise in every unit) and 99 random draws, to
    keep the CPU cost near 20 minutes."""
    r = get_detector("concept_induction", n_prompts=8, confirm_prompts=4, n_random=99).run(smollm, seed=0)
    b = r.info["clean_behaviour"]
    assert list(b)[0] == "concept_clean_prob"
    assert b["concept_clean_prob"] > b["concept_corrupted_prob_ci"][1]       # it copies words in context
    assert r.info["n_words"] >= 16
    f = r.frame
    kinds = dict(zip(zip(f["layer"], f["head"]), f["concept_induction_kind"]))
    concept = {h for h, k in kinds.items() if k in ("concept", "both")}
    token = {h for h, k in kinds.items() if k in ("token", "both")}
    assert concept == set(r.labelled)
    assert not concept or r.causal.significant
    assert not token or r.info["token_causal"]["top_k_ablated"] > r.info["token_causal"]["clean"]
    for route, heads in (("concept", concept), ("token", token)):
        if not heads:
            assert f"{route} route" in r.reason
    assert f["concept_induction_score"].notna().all() and f["concept_induction_token_score"].notna().all()


def test_catalogue_keeps_both_scores_and_the_kind(dual, tmp_path):
    from headlens.catalogue import read_catalogue, scan

    model, words = dual
    cat = scan(model, [get_detector("concept_induction", words=words, **PLANTED)], seed=0)
    back = read_catalogue(cat.to_csv(tmp_path / "cat.csv")).frame.set_index(["layer", "head"])
    assert back.loc[DUAL_TOKEN_HEAD, "concept_induction_kind"] == "both"
    assert bool(back.loc[DUAL_TOKEN_HEAD, "concept_induction_label"])
    assert back.loc[DUAL_TOKEN_HEAD, "concept_induction_token_score"] > 0.05
    assert not back.drop(index=[DUAL_TOKEN_HEAD])["concept_induction_label"].astype(bool).any()
