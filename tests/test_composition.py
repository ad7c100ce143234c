"""Composition scores (Elhage et al. 2021): the batched low-rank computation against explicit d x d matrices
per pair (torch.linalg.matrix_norm) on a tiny GPT-2 and a tiny Llama with grouped-query attention, and
against TransformerLens's own scores; chunked = unchunked; on the planted induction model the planted
previous-token head is the induction head's K-composition partner, above the random-matrix baseline; the
catalogue's partner columns from hand-built results; bad input."""
import numpy as np
import pytest
import torch

import headlens as hl
from headlens import HeadlensError, load_model
from headlens.catalogue import build_catalogue
from headlens.detectors import DetectorResult, head_frame
from headlens.methods import composition_baseline

from planted import (
    INDUCTION_HEAD,
    LLAMA_INDUCTION_HEAD,
    LLAMA_PREV_TOKEN_HEAD,
    PREV_TOKEN_HEAD,
    induction_model,
    llama_induction_model,
    make_tokenizer,
)


def _save_tiny(kind, folder):
    """Three layers x 4 heads of d_head 8, random weights (norm gains and biases away from 1 and 0, so
    the folding at load matters); the Llama has 2 key/value heads."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=3, n_head=4,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=0))
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "ln" in name or "norm" in name or name.endswith("bias"):
            p.data = (0.5 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                      else 0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    make_tokenizer(64, folder)
    return load_model(str(folder))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    return _save_tiny(request.param, tmp_path_factory.mktemp(request.param))


def plain(model, kind):
    """``[L, H, L, H]`` the plain way: per pair, the explicit d_model x d_model matrices in float64 and
    ``torch.linalg.matrix_norm``; a query head's key/value weights picked by ``model.kv_head``."""
    L, H = model.n_layers, model.n_heads
    att = [model.bridge.blocks[l].attn for l in range(L)]

    def w(l, name, h):
        m = getattr(att[l], name).double()
        return m[h] if m.shape[0] == H else m[model.kv_head(h)]
    ov = {(l, h): w(l, "W_V", h) @ w(l, "W_O", h) for l, h in model.heads()}
    qk = {(l, h): w(l, "W_Q", h) @ w(l, "W_K", h).T for l, h in model.heads()}
    out = torch.full((L, H, L, H), float("nan"), dtype=torch.float64)
    norm = torch.linalg.matrix_norm
    for a in model.heads():
        for b in model.heads():
            if b[0] > a[0]:
                m = {"q": qk[b], "k": qk[b].T, "v": ov[b]}[kind]
                out[a + b] = norm(ov[a] @ m) / (norm(ov[a]) * norm(m))
    return out


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_low_rank_equals_explicit_matrices(tiny, kind):
    comp = hl.composition(tiny, kind, n_samples=0)
    grid = comp.grid()
    assert grid.shape == (3, 4, 3, 4) and comp.scores.shape == (12, 12)
    ref = plain(tiny, kind)
    torch.testing.assert_close(grid.double(), ref, rtol=1e-4, atol=1e-6, equal_nan=True)
    assert torch.isfinite(ref[0, :, 1:]).all()          # every later pair scored, earlier/same layer NaN
    # TransformerLens's own composition scores (zeros where the reader is not later)
    tl = tiny.bridge.all_composition_scores(kind.upper()).scores.double()
    later = torch.isfinite(ref)
    torch.testing.assert_close(grid.double()[later], tl[later], rtol=1e-4, atol=1e-6)
    # the long frame: one row per scored pair, with the baseline (none asked: NaN)
    frame = comp.frame()
    assert len(frame) == int(later.sum()) and set(frame.kind) == {kind}
    row = frame[(frame.writer == "L0H3") & (frame.reader == "L2H1")]
    assert row.score.item() == pytest.approx(float(ref[0, 3, 2, 1]), rel=1e-4) and np.isnan(row.baseline.item())


def test_subsets_and_head_names(tiny):
    full = hl.composition(tiny, "v", n_samples=0).grid()
    sub = hl.composition(tiny, "v", writers=["L1H3", (0, 1)], readers=[(2, 0), "L1H2"], n_samples=0)
    assert sub.writers == [(0, 1), (1, 3)] and sub.readers == [(1, 2), (2, 0)]
    for i, a in enumerate(sub.writers):
        for j, b in enumerate(sub.readers):
            torch.testing.assert_close(sub.scores[i, j], full[a + b], equal_nan=True)
    assert torch.isnan(sub.scores[1, 0])          # L1H3 -> L1H2: same layer
    both = hl.composition(tiny, "q", heads=[(0, 0), (2, 2)], n_samples=0)
    assert both.writers == both.readers == [(0, 0), (2, 2)]


def test_chunked_equals_unchunked(tiny):
    whole = hl.composition(tiny, "k", n_samples=0)
    with hl.runtime.use(max_memory=tiny.weight_bytes() + 1):     # no working memory: one head at a time
        small = hl.composition(tiny, "k", n_samples=0)
    assert small.info["writers_per_block"] == 1 and small.info["reader_chunks"] == 12
    assert whole.info["reader_chunks"] < small.info["reader_chunks"]
    torch.testing.assert_close(small.scores, whole.scores, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_baseline_is_seeded_and_shaped_by_d_model():
    a, b = composition_baseline(64, 8, 20, seed=3), composition_baseline(64, 8, 20, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, composition_baseline(64, 8, 20, seed=4))
    # For Gaussian factors E||W_OV M||^2 = ||W_OV||^2 ||M||^2 / d_model: the score sits near 1/sqrt(d_model)
    for d in (64, 256):
        assert composition_baseline(d, 8, 20).mean().item() == pytest.approx(d ** -0.5, rel=0.2)


def _with_rivals(folder):
    """The planted induction model with the other layer-0 heads given random (seeded) weights, so the
    previous-token head has rivals that write into the residual stream too."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder)
    d, dh = model.config.n_embd, model.config.n_embd // model.config.n_head
    g = torch.Generator().manual_seed(0)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        for h in (0, 2, 3):
            for i in range(3):                          # c_attn: [d, 3d] = [Q | K | V]
                attn.c_attn.weight[:, i * d + h * dh: i * d + (h + 1) * dh] = torch.randn(d, dh, generator=g)
            attn.c_proj.weight[h * dh:(h + 1) * dh] = torch.randn(dh, d, generator=g)
    model.save_pretrained(folder)
    return load_model(str(folder))


@pytest.fixture(scope="module")
def rivals(tmp_path_factory):
    return _with_rivals(induction_model(tmp_path_factory.mktemp("planted_rivals")))


def test_planted_previous_token_head_is_the_k_partner(rivals):
    comp = hl.composition(rivals, "k", readers=[INDUCTION_HEAD], seed=0)
    layer0 = [i for i, w in enumerate(comp.writers) if w[0] == 0]
    col = comp.scores[layer0, 0]
    assert torch.isfinite(col).all()                    # four layer-0 heads, all writing
    assert comp.writers[layer0[int(col.argmax())]] == PREV_TOKEN_HEAD
    assert col.max() > comp.baseline_samples.max()     # above every random-matrix draw
    assert comp.top(INDUCTION_HEAD, 1).writer.item() == "L%dH%d" % PREV_TOKEN_HEAD
    # the planted pair composes through the key only: its query and value read other subspaces
    pair = {kind: hl.composition(rivals, kind, writers=[PREV_TOKEN_HEAD], readers=[INDUCTION_HEAD],
                                 n_samples=0).scores.item() for kind in "qkv"}
    assert pair["k"] == pytest.approx(col.max().item(), rel=1e-5)
    assert pair["q"] < comp.baseline and pair["v"] < comp.baseline


def test_planted_llama_gqa_k_partner(tmp_path):
    model = load_model(str(llama_induction_model(tmp_path / "llama")))
    comp = hl.composition(model, "k", readers=[LLAMA_INDUCTION_HEAD], seed=0)
    col = torch.nan_to_num(comp.scores[:, 0], nan=float("-inf"))
    assert comp.writers[int(col.argmax())] == LLAMA_PREV_TOKEN_HEAD
    assert col.max() > comp.baseline_samples.max()


def test_bad_input(tiny):
    with pytest.raises(HeadlensError, match="kind must be 'q', 'k' or 'v'") as err:
        hl.composition(tiny, "x")
    assert "\n" not in str(err.value)
    with pytest.raises(HeadlensError, match="no head L5H0"):
        hl.composition(tiny, "k", readers=[(5, 0)])
    with pytest.raises(HeadlensError, match="no head L0H9"):
        hl.composition(tiny, "k", heads=["L0H9"])
    with pytest.raises(HeadlensError, match="name like 'L0H1'"):
        hl.composition(tiny, "k", writers=["head one"])
    with pytest.raises(HeadlensError, match="at least one writer"):
        hl.composition(tiny, "k", writers=[])
    with pytest.raises(HeadlensError, match="n_samples"):
        hl.composition(tiny, "k", n_samples=-1)


# ---- the catalogue's induction_k_partner columns, from hand-built results --------------------------------

def _results(model, induction_labelled, prev_labelled):
    L, H = model.n_layers, model.n_heads
    ind = np.arange(L * H, dtype=float).reshape(L, H) / (L * H)
    ind[INDUCTION_HEAD] = 1.0
    prev = np.full((L, H), 0.1)
    prev[0] = [0.3, 0.5, 0.4, 1.0]          # the top previous-token score is a rival (L0H3), not the planted L0H1
    return [DetectorResult("induction", head_frame(model, "induction", ind), labelled=list(induction_labelled),
                           params={"top_k": 5}),
            DetectorResult("previous_token", head_frame(model, "previous_token", prev),
                           labelled=list(prev_labelled), params={"top_k": 5})]


def test_catalogue_induction_k_partner(rivals, tmp_path):
    cat = build_catalogue(rivals, _results(rivals, [INDUCTION_HEAD], []), seed=0)
    f = cat.frame.set_index("head_id")
    cols = list(cat.frame.columns)
    assert cols.index("induction_k_partner") == cols.index("induction_status") + 1
    assert cols.index("induction_k_partner_score") + 1 == cols.index("previous_token_score")
    assert cols[-1] == "roles"
    ih = "L%dH%d" % INDUCTION_HEAD
    # writers: the top 5 by previous_token_score (none labelled), chosen by K-composition, not by their score
    assert f.loc[ih, "induction_k_partner"] == "L%dH%d" % PREV_TOKEN_HEAD
    record = cat.meta["composition"]["induction_k_partner"]
    assert record["readers"] == [ih] and record["writers_from"] == "top 5 by previous_token_score"
    assert "L0H1" in record["writers"] and "L0H3" in record["writers"]
    assert f.loc[ih, "induction_k_partner_score"] > record["baseline"]
    others = f.drop(index=ih)
    assert (others.induction_k_partner == "").all() and others.induction_k_partner_score.isna().all()
    # same seed, same bytes
    again = build_catalogue(rivals, _results(rivals, [INDUCTION_HEAD], []), seed=0)
    assert again.to_csv(tmp_path / "b.csv").read_bytes() == cat.to_csv(tmp_path / "a.csv").read_bytes()
    # labelled previous-token heads are the only candidates
    only = build_catalogue(rivals, _results(rivals, [INDUCTION_HEAD], [(0, 3)]), seed=0).frame.set_index("head_id")
    assert only.loc[ih, "induction_k_partner"] == "L0H3"


def test_catalogue_partner_without_labelled_induction_heads(rivals):
    cat = build_catalogue(rivals, _results(rivals, [], [PREV_TOKEN_HEAD]), seed=0)
    f = cat.frame.set_index("head_id")
    record = cat.meta["composition"]["induction_k_partner"]
    assert record["readers_from"] == "top 5 by induction_score" and record["writers"] == ["L0H1"]
    assert f.loc["L%dH%d" % INDUCTION_HEAD, "induction_k_partner"] == "L0H1"
    # the other layer-1 candidates have no query/key weights (score undefined): no partner
    assert (f.loc[["L1H1", "L1H3"], "induction_k_partner"] == "").all()
    # without a previous_token result there is nothing to pair
    alone = build_catalogue(rivals, _results(rivals, [INDUCTION_HEAD], [])[:1], seed=0)
    assert "induction_k_partner" not in alone.frame and "composition" not in alone.meta
