"""Duplicate-token detector: the prompts, a planted duplicate-token head that feeds a later head, heads that
must not be labelled (a previous-token head, an induction head), a failed check, the batched score against
a per-head loop and against TransformerLens's ``detect_head``."""
import pytest
import torch

from headlens import load_model
from headlens.catalogue import scan
from headlens.detectors import get_detector
from headlens.detectors.duplicate_token import (
    bigram_sequences,
    duplicate_chance,
    duplicate_masks,
    duplicate_sequences,
    duplicate_token_score,
)
from headlens.errors import HeadlensError
from headlens.methods import pattern_name, uniform_pattern

from planted import (
    DUPLICATE_PREV_TOKEN_HEAD,
    DUPLICATE_READER_HEAD,
    DUPLICATE_TOKEN_HEAD,
    INDUCTION_HEAD,
    duplicate_token_model,
)

SMALL = dict(seq_len=40, n_seqs=6, n_dups=6, confirm_len=40, confirm_pairs=4, top_k=1)


@pytest.fixture(scope="module")
def dup_model(tmp_path_factory):
    return load_model(str(duplicate_token_model(tmp_path_factory.mktemp("duplicate_token"))))


@pytest.fixture(scope="module")
def planted_result(dup_model):
    return get_detector("duplicate_token", n_random=99, **SMALL).run(dup_model, seed=0)


def test_masks_on_a_small_example():
    copy, after, queries = duplicate_masks(torch.tensor([[0, 5, 6, 5, 5, 0]]))
    assert copy[0, 4].nonzero().flatten().tolist() == [1, 3]      # every earlier copy, itself left out
    assert after[0, 4].nonzero().flatten().tolist() == [2, 4]
    assert queries[0].tolist() == [False, False, False, True, True, False]   # the start token is no content


def test_prompts_plant_copies_at_a_distance_and_are_seeded(planted_induction):
    m = planted_induction
    tokens = duplicate_sequences(m, 5, 30, 6, 2, seed=3)
    assert tokens.shape == (5, 31) and (tokens[:, 0] == m.start_token_id).all()
    assert torch.equal(tokens, duplicate_sequences(m, 5, 30, 6, 2, seed=3))
    assert not torch.equal(tokens, duplicate_sequences(m, 5, 30, 6, 2, seed=4))
    copy, _, queries = duplicate_masks(tokens)
    assert (queries.sum(-1) >= 6).all()                    # the planted repeats (chance ones come on top)
    far = copy.clone()
    far[:, torch.arange(1, 31), torch.arange(30)] = False  # without the previous position
    assert (far.any(-1).sum(-1) >= 6).all()                # each planted copy lies at least 2 back
    tokens, first, second = bigram_sequences(m, 4, 40, 4, seed=5)
    rows = torch.arange(4)[:, None]
    assert (second > first + 1).all() and (first[:, 1:] > first[:, :-1]).all()
    assert torch.equal(tokens[rows, first], tokens[rows, second])
    assert torch.equal(tokens[rows, first + 1], tokens[rows, second + 1])
    assert (torch.cat([first, second], 1).sort(1).values.diff(dim=1) >= 2).all()   # no bigram overlaps another


def test_planted_duplicate_token_head_is_labelled(planted_result):
    res = planted_result
    f = res.frame.set_index(["layer", "head"])
    assert res.labelled == [DUPLICATE_TOKEN_HEAD] and res.info["claimed"] == ["L0H2"]
    row = f.loc[DUPLICATE_TOKEN_HEAD]
    assert row.duplicate_token_score > 0.9 and row.duplicate_token_stability == 1
    assert row.duplicate_token_score_lo <= row.duplicate_token_score <= row.duplicate_token_score_hi
    assert 0 < res.info["chance"] < 0.2
    # The reader attends just after the earlier copy (as an induction head): high after_copy, low score;
    # the previous-token head attends to neither.
    reader, prev = f.loc[DUPLICATE_READER_HEAD], f.loc[DUPLICATE_PREV_TOKEN_HEAD]
    assert reader.duplicate_token_after_copy > 0.8 and reader.duplicate_token_score < 0.2
    assert prev.duplicate_token_score < 0.2 and prev.duplicate_token_after_copy < 0.2
    assert f.drop([DUPLICATE_TOKEN_HEAD]).duplicate_token_score.max() < 0.4


def test_the_check_reads_the_token_after_a_repeat_on_held_out_bigrams(planted_result):
    """Ablating the duplicate-token head leaves the reader without the earlier copy's position: the loss of
    b at the second a rises towards the loss at the first a (the floor); the other layer-0 heads (zero, or
    a previous-token head nothing reads) change little."""
    c = planted_result.causal
    assert c.tested == "claimed" and c.top_heads == ["L0H2"] and c.matched
    assert all(d[0].startswith("L0H") and d[0] != "L0H2" for d in c.random_draws)
    assert c.significant and c.p_value == pytest.approx(1 / 100) and c.n_units == 4
    assert c.top_k_ablated > c.clean + 0.3 and c.floor > c.clean + 0.3
    assert 0.3 < c.effect <= 1.2 and c.effect_lo <= c.effect <= c.effect_hi


def test_an_induction_model_has_no_duplicate_token_head(planted_induction):
    """The planted induction head attends just after the earlier copies, the previous-token head to the
    previous position: no head passes the score rule, nothing is labelled, and the reason says so."""
    res = get_detector("duplicate_token", n_random=6, **SMALL).run(planted_induction, seed=0)
    f = res.frame.set_index(["layer", "head"])
    assert res.labelled == [] and res.info["claimed"] == [] and "no head puts" in res.reason
    assert f.duplicate_token_score.max() < 0.4
    assert f.loc[INDUCTION_HEAD].duplicate_token_after_copy > 0.8
    assert res.causal.tested == "best candidates"


def test_a_failed_confirmation_labels_nothing_and_the_same_seed_gives_the_same_frame(dup_model):
    det = get_detector("duplicate_token", n_random=6, **SMALL)
    res = det.run(dup_model, seed=0)
    assert res.labelled == [] and "not significant" in res.reason
    assert res.info["claimed"] == ["L0H2"] and res.causal.p_value == pytest.approx(1 / 7)
    assert res.heads(1) == [DUPLICATE_TOKEN_HEAD]
    assert det.run(dup_model, seed=0).frame.equals(res.frame)


def _per_head_loop(pattern: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The plain computation: per sequence and head, for each query whose token occurred earlier (after the
    start token), the attention summed over those earlier positions; averaged over the queries."""
    b, n_heads, n, _ = pattern.shape
    out = torch.zeros(b, n_heads)
    for i in range(b):
        for h in range(n_heads):
            values = [sum(float(pattern[i, h, q, k]) for k in range(1, q) if tokens[i, k] == tokens[i, q])
                      for q in range(1, n) if (tokens[i, 1:q] == tokens[i, q]).any()]
            out[i, h] = sum(values) / len(values)
    return out


def test_batched_score_equals_one_head_at_a_time(dup_model):
    """The detector's score (all heads of a layer at once, chunks of 4 sequences through the runtime)
    against a plain loop over heads, queries and keys on one cached pass."""
    m = dup_model
    cat = scan(m, [get_detector("duplicate_token", n_random=4, **SMALL)], batch_size=4, progress=False)
    f = cat.frame.set_index(["layer", "head"])
    tokens = duplicate_sequences(m, SMALL["n_seqs"], SMALL["seq_len"], SMALL["n_dups"], 2, seed=0)
    _, cache = m.bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in range(m.n_layers):
        naive = _per_head_loop(cache[pattern_name(layer)].float(), tokens).mean(0)
        got = torch.tensor([f.loc[(layer, h)].duplicate_token_score for h in range(m.n_heads)])
        assert torch.allclose(got.float(), naive, atol=1e-5)


def test_score_and_chance_on_known_patterns():
    tokens = torch.tensor([[0, 3, 4, 3, 5, 4, 3], [0, 1, 1, 2, 2, 2, 6]])
    copy, _, queries = duplicate_masks(tokens)
    pattern = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(0)).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    assert torch.allclose(duplicate_token_score(pattern, copy, queries), _per_head_loop(pattern, tokens),
                          atol=1e-6)
    uniform = uniform_pattern(7, 7, None, "cpu", torch.float32).expand(2, 1, 7, 7)
    assert float(duplicate_token_score(uniform, copy, queries).mean()) == pytest.approx(
        duplicate_chance(copy, queries))


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_agrees_with_transformer_lens_detect_head(which, planted_induction, tmp_path):
    """TransformerLens's ``detect_head(..., "duplicate_token_head")`` ("mul") divides the same sum by the sum
    of the whole pattern, every query's row included: with m of the n tokens repeating an earlier one,
    TL = ours * m / n."""
    from transformer_lens.head_detector import detect_head

    from planted import llama_induction_model

    model = planted_induction if which == "gpt2" else load_model(str(llama_induction_model(tmp_path / "l")))
    text = "t3 t5 t9 t3 t5 t9 t1 t2 t7 t7 t4 t3"
    tl = detect_head(model.bridge, text, "duplicate_token_head")                # [L, H]
    tokens = model.bridge.to_tokens(text)
    copy, _, queries = duplicate_masks(tokens)
    n, m = tokens.shape[1], int(queries.sum())
    _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    ours = torch.stack([duplicate_token_score(cache[pattern_name(l)], copy, queries)[0]
                        for l in range(model.n_layers)])
    assert torch.allclose(tl.float(), ours * m / n, atol=1e-5)
    assert not torch.allclose(tl.float(), ours, atol=1e-3)


def test_bad_settings_are_one_line_errors(planted_induction):
    for params, message in ((dict(seq_len=100), "context of 64 tokens"),
                            (dict(seq_len=20, n_dups=19), "n_dups"),
                            (dict(seq_len=20, confirm_len=20, confirm_pairs=4), "confirm_pairs")):
        with pytest.raises(HeadlensError, match=message) as err:
            get_detector("duplicate_token", **params).run(planted_induction)
        assert "\n" not in str(err.value)
