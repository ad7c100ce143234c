"""The one-import Python API (issue 13's front door), on the planted induction model: a scan by role
name, typed results kept on the catalogue, head lists for the next call, a TransformerLens-shaped metric,
plots from data, and a saved catalogue read back into the same objects."""
import pandas as pd
import torch

import headlens as hl

from planted import INDUCTION_HEAD


def test_front_door(planted_induction, tmp_path):
    model = planted_induction
    cat = hl.scan(model, [hl.get_detector("induction", seq_len=10, top_k=1, n_random=99)], seed=0)
    res = cat["induction"]
    assert isinstance(res, hl.DetectorResult) and "induction" in cat
    top = cat["induction"].top(3)
    assert {"layer", "head", "head_id", "induction_score"} <= set(top.columns)
    assert cat.heads("induction", k=1) == [INDUCTION_HEAD] == res.heads(1)
    assert INDUCTION_HEAD in cat.heads("induction", labelled=True)
    check = res.causal_check
    assert isinstance(check, hl.CausalCheck) and check.top_heads[0] == "L%dH%d" % INDUCTION_HEAD
    assert f"p = {check.p_value:.3g}" in str(check) and check.p_value == 1 / 100   # beyond all 99 draws
    # a TransformerLens-shaped metric: logits [batch, pos, vocab] -> scalar
    tokens = torch.randint(1, 30, (2, 12))
    values = hl.sweep_heads(model, tokens, metric=lambda logits: logits[:, -1, 3].mean(), ablation="zero")
    assert values.shape == (model.n_layers, model.n_heads) and torch.isfinite(values).all()
    fig = hl.plot.attention(model, tokens[0], heads=cat.heads("induction", 2))
    assert len(fig.data) == 2 and fig.data[0].name == "L%dH%d" % cat.heads("induction", 1)[0]
    # the CSV + sidecar round trip restores the typed results
    cat.to_csv(tmp_path / "c.csv")
    back = hl.read_catalogue(tmp_path / "c.csv")
    assert back.heads("induction", k=3) == cat.heads("induction", k=3)
    assert back["induction"].labelled == res.labelled and back["induction"].causal_check.p_value == check.p_value
    pd.testing.assert_frame_equal(back["induction"].top(3).reset_index(drop=True)[["layer", "head"]],
                                  top.reset_index(drop=True)[["layer", "head"]])


def test_scan_takes_names_objects_and_strings(planted_induction):
    import pytest

    det = hl.get_detector("induction", n_seqs=2)
    from headlens.detectors import as_detectors
    assert [d.name for d in as_detectors(["induction", det, "successor,copy_suppression"])] == [
        "induction", "induction", "successor", "copy_suppression"]
    with pytest.raises(hl.HeadlensError, match="not a detector"):
        as_detectors([42])
    with pytest.raises(hl.HeadlensError, match="unknown detector"):
        as_detectors(["inductoin"])


# ---- interventions: the snippet, batched vs one head at a time, user subclasses, strings --------

from test_methods import VOCAB, induction_pair, logits_metric, tiny  # noqa: E402,F401  (a tiny Llama / GPT-2)


def test_ablate_snippet_changes_and_restores(planted_induction):
    model = planted_induction
    tokens = model.to_tokens("t1 t2 t3 t4 t5 t1 t2 t3")
    before, text = model(tokens), model.generate("t1 t2 t3 t4 t1 t2", max_new_tokens=3)
    with hl.ablate(model, [INDUCTION_HEAD], hl.MeanAblation(over=tokens)):
        inside, ablated_text = model(tokens), model.generate("t1 t2 t3 t4 t1 t2", max_new_tokens=3)
    assert not torch.allclose(inside, before) and ablated_text != text
    assert torch.equal(model(tokens), before) and model.generate("t1 t2 t3 t4 t1 t2", max_new_tokens=3) == text


class Halve(hl.Intervention):
    """A user-written intervention: half the head's output."""
    name = "halve"

    def forward(self, z, site):
        return z / 2


def interventions(model, clean, corrupted):
    return [hl.ZeroAblation(), hl.MeanAblation(over=corrupted), hl.ResampleAblation(seed=2),
            hl.Patch(source=hl.clean_run(model, corrupted)), hl.Scale(0.3), hl.UniformAttention(), Halve()]


def test_batched_equals_ablate_for_every_intervention(tiny):
    clean, corrupted = induction_pair(VOCAB, 3, 5)
    heads = tiny.heads()
    for iv in interventions(tiny, clean, corrupted):
        batched = hl.run_variants(tiny, clean, [[h] for h in heads], logits_metric, iv, batch_size=5)
        plain = []
        for h in heads:
            with hl.ablate(tiny, [h], iv):
                plain.append(logits_metric(tiny(clean)))
        err = (batched - torch.stack(plain)).abs().max().item()
        assert err <= 1e-4 * max(1.0, batched.abs().max().item()), (iv, err)
        assert not torch.allclose(batched, logits_metric(tiny(clean))[None].expand_as(batched))


def test_strings_name_the_interventions(tiny):
    clean, _ = induction_pair(VOCAB, 2, 5)
    for name, cls in hl.interventions.INTERVENTIONS.items():
        if name != "patch":
            assert type(hl.as_intervention(name)) is cls
    assert torch.equal(hl.sweep_heads(tiny, clean, logits_metric, "zero"),
                       hl.sweep_heads(tiny, clean, logits_metric, hl.ZeroAblation()))
    with hl.ablate(tiny, [(0, 1)], "uniform"):
        uniform = tiny(clean)
    with hl.ablate(tiny, [(0, 1)], hl.UniformAttention()):
        assert torch.equal(tiny(clean), uniform)
    import pytest
    with pytest.raises(hl.HeadlensError, match="unknown ablation"):
        hl.as_intervention("zeroo")
    with pytest.raises(hl.HeadlensError, match="over=tokens"):
        with hl.ablate(tiny, [(0, 1)], "mean"):
            tiny(clean)


def test_runtime_settings_stay_out_of_params(planted_induction):
    import pytest
    det = hl.get_detector("induction", seq_len=10, n_seqs=2, causal_seqs=1, top_k=1, n_random=2)
    cat = hl.scan(planted_induction, [det], batch_size=3, max_memory="4GB", progress=False)
    assert cat.meta["runtime"]["batch_size"] == 3 and cat.meta["runtime"]["max_memory"] == "4GB"
    assert cat.meta["runtime"]["progress"] is False
    assert "max_rows" not in cat.meta["detectors"]["induction"]["params"]
    assert not [c for c in cat.frame.columns if "max_rows" in c or "batch" in c]
    with pytest.raises(hl.HeadlensError, match="--batch-size"):
        hl.get_detector("induction", max_rows=8)
    with pytest.raises(hl.HeadlensError, match="runtime setting"):
        hl.get_detector("induction", batch_size=8)
    assert hl.runtime.current().batch_size is None    # the scan's setting ended with it


def test_causal_check_and_result_display(planted_induction):
    cat = hl.scan(planted_induction, [hl.get_detector("induction", seq_len=10, top_k=1, n_random=4)],
                  progress=False)
    res = cat["induction"]
    check = res.causal
    assert isinstance(check, hl.CausalCheck) and check.to_dict()["p_value"] == check.p_value
    assert "causal check" in check._repr_html_() and "L" in res._repr_html_()
    fig = hl.plot.causal_check(check)
    assert len(fig.data[1].y) == 4                    # one point per random draw
    assert len(hl.plot.evidence(res)) == len(res.evidence_columns) > 0
