"""Copy-suppression detector: planted ground truth, batched-vs-plain circuits, shared circuit helpers.

The real-model run through ``headlens scan`` is in test_ov_roles_scan.py."""
import random

import numpy as np
import pytest
import torch

from headlens.detectors import get_detector
from headlens.detectors.copy_suppression import ov_own_ranks, ov_ranks, qk_diagonal, qk_own_ranks, wilson_lower
from headlens.errors import HeadlensError
from headlens.methods.circuits import effective_embedding, head_dla, normalise

from planted import COPY_SUPPRESSION_HEAD, COPYING_HEAD, copy_suppression_model


@pytest.fixture(scope="module")
def planted_cs(tmp_path_factory):
    from headlens import load_model

    folder = tmp_path_factory.mktemp("planted_cs")
    model = load_model(str(copy_suppression_model(folder / "model")))
    rng = random.Random(0)
    text = folder / "text.txt"
    text.write_text(" ".join(f"t{rng.randint(1, 31)}" for _ in range(200)))
    return model, str(text)


@pytest.fixture(scope="module")
def planted_result(planted_cs):
    model, text = planted_cs
    det = get_detector("copy_suppression", corpus=text, seq_len=24, n_seqs=4, cspa_seqs=2,
                       causal_seqs=2, confirm_seqs=2, top_k=1, n_random=99, cspa_heads=2)
    return det.run(model, seed=0)


def test_planted_cs_head_first_copying_head_kept_apart(planted_result):
    res = planted_result
    f = res.frame.set_index(["layer", "head"])
    top = res.top(1).iloc[0]
    assert (int(top["layer"]), int(top["head"])) == COPY_SUPPRESSION_HEAD
    assert res.labelled == [COPY_SUPPRESSION_HEAD]
    cs, cp = f.loc[COPY_SUPPRESSION_HEAD], f.loc[COPYING_HEAD]
    assert cs["copy_suppression_score"] == 1.0 and cs["copy_suppression_qk"] == 1.0
    assert cs["copy_suppression_ov_median_rank"] == 1 and cs["copy_suppression_qk_median_rank"] == 1
    assert cs["copy_suppression_ov_bottom1pct"] == 1.0 and cs["copy_suppression_qk_top1pct"] == 1.0
    assert cp["copy_suppression_ov_bottom1pct"] == 0.0                 # a copying head's own logit is high
    # The copying head has the same QK but a positive OV: signed score -1, never labelled.
    assert cp["copy_suppression_score"] == -1.0 and cp["copy_suppression_qk"] == 1.0
    assert cp["copy_suppression_dla_seen"] > 0 > cs["copy_suppression_dla_seen"]
    # Zero heads: no score, no suppression, no label (ties do not count as suppression).
    others = f.drop([COPY_SUPPRESSION_HEAD, COPYING_HEAD])
    assert (others["copy_suppression_score"] == 0).all() and (others["copy_suppression_qk"] == 0).all()


def test_planted_behaviour_and_cspa(planted_result):
    f = planted_result.frame.set_index(["layer", "head"])
    cs = f.loc[COPY_SUPPRESSION_HEAD]
    assert cs["copy_suppression_attn_seen"] > 0.5            # attends to earlier copies of the prediction
    assert cs["copy_suppression_neg_share"] > 0.95           # all its negative effect is on repeats
    assert cs["copy_suppression_cspa"] > 0.6                 # the suppression-only output keeps most effect
    assert planted_result.info["n_tokens_sampled"] == 31
    assert planted_result.info["interval_unit"] == "sampled token" and planted_result.info["interval_units"] == 31


def test_planted_causal_check_raises_repeat_logprob(planted_result):
    c = planted_result.causal.to_dict()
    assert c["top_heads"] == ["L1H2"]
    assert c["top_k_ablated"] > c["clean"] + 0.1             # removing suppression -> overconfidence
    assert c["top_k_ablated"] > max(c["random_k_ablated"]) + 0.1
    assert c["worse"] == "higher" and c["p_value"] == pytest.approx(1 / 100)   # the minimum with 99 draws
    assert c["tested"] == "claimed" and c["matched"] and c["n_units"] == 2     # two held-out chunks
    assert c["effect"] != c["effect"] and c["z"] > 0    # no floor for this metric: z is the scale
    cs = planted_result.frame.set_index(["layer", "head"]).loc[COPY_SUPPRESSION_HEAD]
    # Its ablation raises the repeat log-prob, directly and in total (last layer: nothing to repair it).
    assert cs.copy_suppression_direct > 0.1 and cs.copy_suppression_total > 0.1
    # Same signs and a large direct effect: a self-repair share (the final norm's rescaling makes up for
    # part of it; the direct path keeps the norm's clean scale), and compensation = direct - total.
    assert 0 < cs.copy_suppression_self_repair < 1
    assert cs.copy_suppression_self_repair == pytest.approx(1 - cs.copy_suppression_total / cs.copy_suppression_direct)
    assert cs.copy_suppression_compensation == pytest.approx(cs.copy_suppression_direct - cs.copy_suppression_total)
    assert cs.copy_suppression_score_lo <= cs.copy_suppression_score <= cs.copy_suppression_score_hi


def test_repeat_metric_and_cspa_kl_match_plain_versions(planted_cs):
    """The repeat log-prob metric (several masks, read at their positions, a sum over prompts) equals a
    plain log-softmax over full logits, whole or a few prompts at a time; the CSPA's chunked KL equals
    a plain KL."""
    from headlens.detectors.copy_suppression import mean_kl, repeat_logprob_metric, repeated_predictions
    from headlens.methods import clean_run, run_variants, text_chunks

    model, text = planted_cs
    tokens = text_chunks(model, text, 24, 4)
    run = clean_run(model, tokens)
    pred = run.logits.argmax(-1).cpu()
    seen, _ = repeated_predictions(tokens, pred)
    some = torch.zeros_like(seen)
    some[:2, 5:12] = True                           # a second mask, on some prompts and positions only
    both = repeat_logprob_metric(pred, seen, some)
    logp = torch.log_softmax(run.logits.float(), -1).gather(-1, pred[..., None])[..., 0]
    expected = torch.stack([logp[seen].mean(), logp[some].mean()])
    torch.testing.assert_close(both(run.logits), expected)
    torch.testing.assert_close(run.value(both), expected)
    torch.testing.assert_close(repeat_logprob_metric(pred, seen)(run.logits), expected[0])
    variants = [[(1, 2)], [(0, 1), (1, 0)], [(1, 3)]]
    plain = lambda logits: both(logits)                                     # no positions: full logits
    whole = run_variants(model, tokens, variants, plain, "mean", batch_size=None, run=run)
    torch.testing.assert_close(run_variants(model, tokens, variants, both, "mean", batch_size=3, run=run), whole,
                               atol=1e-6, rtol=0)
    ablated = run_variants(model, tokens, [[(1, 2)]], lambda logits: logits, "mean", batch_size=None, run=run)[0]
    kl = torch.log_softmax(run.logits.float(), -1).exp() * (torch.log_softmax(run.logits.float(), -1)
                                                             - torch.log_softmax(ablated.float(), -1))
    torch.testing.assert_close(mean_kl(run.logits)(ablated).float(), kl.sum(-1).mean(), atol=1e-6, rtol=1e-5)


def test_cspa_a_prompt_at_a_time_equals_all_at_once(planted_cs, monkeypatch):
    """Where the memory budget holds one prompt's logits only, the CSPA goes a prompt at a time (its own
    clean run each): the same values as all prompts in one batched call."""
    import headlens.detectors.copy_suppression as cs
    from headlens.methods import text_chunks

    model, text = planted_cs
    tokens = text_chunks(model, text, 24, 4)
    names = {f"blocks.{l}.attn.{x}" for l in range(model.n_layers) for x in ("hook_z", "hook_pattern", "hook_v")}
    pred, cache = cs.cached_predictions(model, tokens, names)
    det = get_detector("copy_suppression")
    heads = [(1, 2), (1, 0), (0, 3)]
    together = det._cspa(model, tokens, cache, heads)
    monkeypatch.setattr(cs, "full_logit_rows", lambda model, n_pos: 1)
    one_by_one = det._cspa(model, tokens, cache, heads)
    np.testing.assert_allclose(one_by_one, together, rtol=1e-4, atol=1e-6)
    assert together[0] > 0.6                                  # the planted head, as in the detector's run
    # the predictions a prompt at a time are those of one pass
    torch.testing.assert_close(cs.cached_predictions(model, tokens, names)[0], pred)


def test_weight_circuit_ranks_in_small_pieces_equal_one_piece(planted_cs, monkeypatch):
    """OV and QK own-token ranks computed in pieces of a few queries (the memory cap on the logits and
    scores of one piece, and on the int64 counts of their comparisons) equal those of one piece."""
    import headlens.detectors.copy_suppression as cs

    model, _ = planted_cs
    vocab = model.bridge.cfg.d_vocab
    tokens = torch.arange(1, min(vocab, 41))
    whole = ov_own_ranks(model, tokens), qk_own_ranks(model, tokens, chunk=16)
    monkeypatch.setattr(cs, "PIECE", model.n_heads * max(16, vocab) * 3)    # 3 queries per piece
    pieces = ov_own_ranks(model, tokens), qk_own_ranks(model, tokens, chunk=16)
    for a, b in zip([*whole[0], whole[1]], [*pieces[0], pieces[1]]):
        assert torch.equal(a, b)


def test_ov_and_qk_batched_match_plain_per_head(smollm):
    b = smollm.bridge
    tokens = torch.tensor([1000, 2345, 5000, 7777, 12000, 20001, 30303, 41000])
    suppress, copy = ov_ranks(smollm, tokens, k=10, chunk=3)
    qk = qk_diagonal(smollm, tokens)
    x = normalise(smollm, effective_embedding(smollm, tokens))
    query = normalise(smollm, b.W_U.float()[:, tokens].T)
    W_Q, W_K, W_V, W_O, W_U = b.W_Q.float(), b.W_K.float(), b.W_V.float(), b.W_O.float(), b.W_U.float()
    for l, h in [(0, 4), (23, 3), (24, 4), (29, 8)]:
        kv = smollm.kv_head(h)
        w_v, w_o = W_V[l, kv], W_O[l, h]
        n_sup = n_copy = n_diag = 0
        for i, t in enumerate(tokens.tolist()):
            logits = W_U.T @ (w_o.T @ (w_v.T @ x[i]))
            n_sup += int((logits <= logits[t]).sum() - 1 < 10)
            n_copy += int((logits >= logits[t]).sum() - 1 < 10)
            row = torch.stack([(query[i] @ W_Q[l, h]) @ (x[j] @ W_K[l, kv])
                               for j in range(len(tokens))])
            n_diag += int(row[i] > torch.cat([row[:i], row[i + 1:]]).max())
        assert suppress[l, h] == pytest.approx(n_sup / len(tokens))
        assert copy[l, h] == pytest.approx(n_copy / len(tokens))
        assert qk[l, h] == pytest.approx(n_diag / len(tokens))
    # Rank columns: own-token ranks over the whole vocabulary, for OV (from the bottom) and QK (from the top).
    lower, _ = ov_own_ranks(smollm, tokens, chunk=3)
    qk_rank = qk_own_ranks(smollm, tokens, chunk=5000)
    keys = normalise(smollm, effective_embedding(smollm, torch.arange(b.cfg.d_vocab)))
    for l, h in [(23, 3), (24, 4)]:
        kv = smollm.kv_head(h)
        all_keys = keys @ W_K[l, kv]                                     # [vocab, d_head]
        for i, t in enumerate(tokens.tolist()[:3]):
            logits = W_U.T @ (W_O[l, h].T @ (W_V[l, kv].T @ x[i]))
            assert int(lower[l, h, i]) == int((logits <= logits[t]).sum() - 1)
            row = all_keys @ (query[i] @ W_Q[l, h])
            own = (x[i] @ W_K[l, kv]) @ (query[i] @ W_Q[l, h])
            rivals = torch.cat([row[:t], row[t + 1:]])
            assert abs(int(qk_rank[l, h, i]) - int((rivals >= own).sum())) <= 1   # float rounding at a tie


def test_effective_embedding_is_block0_mlp_without_attention(smollm):
    """W_EE from the bridge's own block 0 equals embedding + MLP0(RMSNorm(embedding)) computed on the HF modules."""
    ids = torch.tensor([330, 12397, 808])
    hf = smollm.bridge.blocks[0].original_component
    e = smollm.bridge.W_E[ids][:, None]
    expected = (e + hf.mlp(hf.post_attention_layernorm(e)))[:, 0]
    assert torch.allclose(effective_embedding(smollm, ids), expected, atol=1e-4)


def test_head_dla_matches_per_head_loop(smollm):
    tokens = smollm.bridge.to_tokens("The cat sat on the mat because the cat was tired")
    names = {f"blocks.{l}.attn.hook_z" for l in range(smollm.n_layers)} | {"ln_final.hook_scale"}
    _, cache = smollm.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    rows, pos = torch.zeros(3, dtype=torch.long), torch.tensor([2, 5, 9])
    dirs = smollm.bridge.W_U.float()[:, tokens[0, pos + 1]].T
    batched = head_dla(smollm, cache, rows, pos, dirs)
    W_O = smollm.bridge.W_O
    for l, h in [(3, 1), (23, 3), (29, 6)]:
        for i in range(3):
            z = cache[f"blocks.{l}.attn.hook_z"][0, pos[i], h]
            out = z @ W_O[l, h] / cache["ln_final.hook_scale"][0, pos[i], 0]
            assert batched[l, h, i] == pytest.approx(float(out @ dirs[i]), rel=1e-4, abs=1e-5)


def test_corpus_errors(smollm, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(HeadlensError, match="fewer than seq_len"):
        get_detector("copy_suppression", corpus=str(short), n_tokens=8).run(smollm)
    with pytest.raises(HeadlensError, match="not found"):
        get_detector("copy_suppression", corpus="missing.txt", n_tokens=8).run(smollm)


@pytest.fixture(scope="module")
def planted_llama(tmp_path_factory, planted_cs):
    from headlens import load_model

    from planted import llama_copy_suppression_model

    model = load_model(str(llama_copy_suppression_model(tmp_path_factory.mktemp("llama_cs"))))
    det = get_detector("copy_suppression", corpus=planted_cs[1], seq_len=24, n_seqs=4, cspa_seqs=2,
                       causal_seqs=2, confirm_seqs=2, top_k=1, n_random=99, cspa_heads=2)
    return det.run(model, seed=0)


def test_planted_llama_cs_head_first(planted_llama):
    """RMSNorm, rotary, GQA, and keys that exist only after MLP0: the planted head is first and labelled,
    the copying head (same QK) is never labelled, and ablating the planted head raises repeat log-probs."""
    from planted import LLAMA_COPY_SUPPRESSION_HEAD, LLAMA_COPYING_HEAD

    res = planted_llama
    top = res.top(1).iloc[0]
    assert (int(top["layer"]), int(top["head"])) == LLAMA_COPY_SUPPRESSION_HEAD
    assert res.labelled == [LLAMA_COPY_SUPPRESSION_HEAD]
    f = res.frame.set_index(["layer", "head"])
    cs, cp = f.loc[LLAMA_COPY_SUPPRESSION_HEAD], f.loc[LLAMA_COPYING_HEAD]
    assert cs["copy_suppression_qk_top1pct"] == 1.0 and cs["copy_suppression_ov_bottom1pct"] == 1.0
    assert cp["copy_suppression_qk_top1pct"] == 1.0 and cp["copy_suppression_score"] == -1.0
    assert cs["copy_suppression_dla_seen"] < 0 < cp["copy_suppression_dla_seen"]
    assert res.causal.top_k_ablated > res.causal.clean + 0.1


def test_wilson_label_margin():
    """The label needs the Wilson lower bound above 0.5: 60% of 200 tokens passes, 53% does not, so a
    resampled token set cannot flip a head sitting at the threshold."""
    lo = wilson_lower(torch.tensor([0.53, 0.60, 1.0]), 200)
    assert lo[0] < 0.5 < lo[1] and lo[2] > 0.98
