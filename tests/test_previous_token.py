"""Previous-token detector: planted ground truth (GPT-2 and Llama-style), a previous-token head nothing
reads, a failed check, the batched score against a per-head loop and against TransformerLens's
``detect_head``."""
import pytest
import torch

from headlens import load_model
from headlens.catalogue import scan
from headlens.detectors import get_detector
from headlens.detectors.previous_token import previous_token_chance, previous_token_score
from headlens.errors import HeadlensError
from headlens.methods import pattern_name, text_chunks, uniform_pattern

from planted import INDUCTION_HEAD, PREV_TOKEN_HEAD

SMALL = dict(seq_len=30, n_seqs=4, confirm_len=10, top_k=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Text the planted word-level tokenizers read: 600 seeded words t1..t31."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text(" ".join(f"t{int(i)}" for i in torch.randint(1, 32, (600,), generator=g)))
    return str(path)


@pytest.fixture(scope="module")
def planted_result(planted_induction, corpus):
    return get_detector("previous_token", corpus=corpus, n_random=99, **SMALL).run(planted_induction, seed=0)


def test_planted_previous_token_head_is_labelled(planted_result):
    res = planted_result
    f = res.frame.set_index(["layer", "head"])
    assert res.labelled == [PREV_TOKEN_HEAD] and res.info["claimed"] == ["L0H1"]
    row = f.loc[PREV_TOKEN_HEAD]
    # It attends by position: the same on text and on random tokens, far above uniform attention.
    assert row.previous_token_score > 0.9 and row.previous_token_random > 0.9
    assert res.info["chance"] == pytest.approx(previous_token_chance(31)) and res.info["chance"] < 0.2
    assert row.previous_token_score_lo <= row.previous_token_score <= row.previous_token_score_hi
    assert row.previous_token_stability == 1
    # The induction head (and every zero head) is far from the threshold and not labelled.
    others = f.drop([PREV_TOKEN_HEAD])
    assert others.previous_token_score.max() < 0.4
    assert f.loc[INDUCTION_HEAD].previous_token_stability == 0


def test_the_check_runs_on_held_out_repeated_tokens_with_layer_matched_draws(planted_result):
    """Ablating the previous-token head breaks the induction head that reads it (K-composition): the loss
    on the repeated half rises towards the first occurrence's; the zero heads of layer 0 change nothing."""
    c = planted_result.causal
    assert c.tested == "claimed" and c.top_heads == ["L0H1"] and c.matched
    assert all(d[0].startswith("L0H") for d in c.random_draws)
    assert c.significant and c.p_value == pytest.approx(1 / 100)
    assert c.top_k_ablated > c.clean + 0.3 and max(c.random_k_ablated) == pytest.approx(c.clean, abs=1e-5)
    assert 0.3 < c.effect <= 1.2 and c.effect_lo <= c.effect <= c.effect_hi and c.n_units == 4
    text = planted_result.info["text_loss"]
    assert text["heads"] == ["L0H1"] and text["n_chunks"] == 2 and text["n_random"] == 10
    assert text["rise"] == pytest.approx(text["ablated"] - text["clean"])
    assert text["random_rise_mean"] == pytest.approx(0, abs=1e-5)    # zero heads of layer 0


def test_planted_llama_previous_token_head_is_labelled(tmp_path, corpus):
    """RMSNorm, rotary (the head attends to the previous position through the rotation alone), grouped-query
    attention and an MLP0."""
    from planted import LLAMA_PREV_TOKEN_HEAD, llama_induction_model

    model = load_model(str(llama_induction_model(tmp_path / "llama")))
    res = get_detector("previous_token", corpus=corpus, n_random=99, **SMALL).run(model, seed=0)
    assert res.labelled == [LLAMA_PREV_TOKEN_HEAD] and res.causal.significant
    f = res.frame.set_index(["layer", "head"])
    assert f.loc[LLAMA_PREV_TOKEN_HEAD].previous_token_score > 0.9
    assert f.drop([LLAMA_PREV_TOKEN_HEAD]).previous_token_score.max() < 0.4


def test_a_previous_token_head_nothing_reads_is_not_labelled(tmp_path, corpus):
    """In the duplicate-token model L0H1 attends to the previous token as well as the planted head does,
    but writes where nothing reads: it is claimed by its score and its check fails, so no label."""
    from planted import DUPLICATE_PREV_TOKEN_HEAD, duplicate_token_model

    model = load_model(str(duplicate_token_model(tmp_path / "dup")))
    res = get_detector("previous_token", corpus=corpus, n_random=99, **SMALL).run(model, seed=0)
    assert res.info["claimed"] == ["L0H1"] and (0, 1) == DUPLICATE_PREV_TOKEN_HEAD
    assert res.frame.set_index(["layer", "head"]).loc[DUPLICATE_PREV_TOKEN_HEAD].previous_token_score > 0.8
    assert res.labelled == [] and not res.causal.significant and "not significant" in res.reason


def test_a_failed_confirmation_labels_nothing_and_the_same_seed_gives_the_same_frame(planted_induction, corpus):
    """6 random draws: p >= 1/7 > alpha, so the claimed head is not labelled and the reason says why."""
    det = get_detector("previous_token", corpus=corpus, n_random=6, **SMALL)
    res = det.run(planted_induction, seed=0)
    assert res.labelled == [] and "not significant" in res.reason
    assert res.info["claimed"] == ["L0H1"] and res.causal.p_value == pytest.approx(1 / 7)
    assert res.heads(1) == [PREV_TOKEN_HEAD]
    again = det.run(planted_induction, seed=0)
    assert again.frame.equals(res.frame)


def _per_head_loop(pattern: torch.Tensor) -> torch.Tensor:
    """The plain computation: per head, the attention of each query q >= 1 to q - 1, summed and averaged."""
    b, n_heads, n, _ = pattern.shape
    out = torch.zeros(b, n_heads)
    for i in range(b):
        for h in range(n_heads):
            out[i, h] = sum(float(pattern[i, h, q, q - 1]) for q in range(1, n)) / (n - 1)
    return out


def test_batched_score_equals_one_head_at_a_time(planted_induction, corpus):
    """The detector's score (all heads of a layer at once, in chunks of 3 sequences through the runtime)
    against a plain loop over heads and queries on one cached pass."""
    m = planted_induction
    cat = scan(m, [get_detector("previous_token", corpus=corpus, n_random=4, **SMALL)], batch_size=3,
               progress=False)
    f = cat.frame.set_index(["layer", "head"])
    tokens = text_chunks(m, corpus, SMALL["seq_len"], SMALL["n_seqs"])
    _, cache = m.bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in range(m.n_layers):
        naive = _per_head_loop(cache[pattern_name(layer)].float()).mean(0)
        got = torch.tensor([f.loc[(layer, h)].previous_token_score for h in range(m.n_heads)])
        assert torch.allclose(got.float(), naive, atol=1e-5)


def test_score_and_chance_on_known_patterns():
    pattern = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(0)).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    assert torch.allclose(previous_token_score(pattern), _per_head_loop(pattern), atol=1e-6)
    uniform = uniform_pattern(7, 7, None, "cpu", torch.float32)                   # [1, 1, 7, 7]
    assert float(previous_token_score(uniform)) == pytest.approx(previous_token_chance(7))


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_agrees_with_transformer_lens_detect_head(which, planted_induction, tmp_path):
    """TransformerLens's ``detect_head(..., "previous_token_head")`` ("mul") divides the same sum of
    attentions by the sum of the whole pattern, which includes the first row (the start token attending to
    itself): on one sequence of n tokens, TL = ours * (n - 1) / n."""
    from transformer_lens.head_detector import detect_head

    from planted import llama_induction_model

    model = planted_induction if which == "gpt2" else load_model(str(llama_induction_model(tmp_path / "l")))
    text = "t3 t5 t9 t3 t5 t9 t1 t2 t7 t7 t4"
    tl = detect_head(model.bridge, text, "previous_token_head")                 # [L, H]
    tokens = model.bridge.to_tokens(text)
    n = tokens.shape[1]
    _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    ours = torch.stack([previous_token_score(cache[pattern_name(l)][0]) for l in range(model.n_layers)])
    assert torch.allclose(tl.float(), ours * (n - 1) / n, atol=1e-5)
    assert not torch.allclose(tl.float(), ours, atol=1e-3)                      # the definitions differ


def test_bad_settings_are_one_line_errors(planted_induction, corpus, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("t1 t2 t3")
    for params, message in ((dict(corpus=str(short), seq_len=30), "fewer than seq_len"),
                            (dict(corpus=corpus, seq_len=100), "context of 64 tokens"),
                            (dict(corpus=corpus, seq_len=30, n_seqs=20), "none is left")):
        with pytest.raises(HeadlensError, match=message) as err:
            get_detector("previous_token", **params).run(planted_induction)
        assert "\n" not in str(err.value)
