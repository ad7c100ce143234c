"""The one-import Python API (issue 13's front door), on the planted induction model: a scan by role
name, typed results kept on the catalogue, head lists for the next call, a TransformerLens-shaped metric,
plots from data, and a saved catalogue read back into the same objects."""
import pandas as pd
import torch

import headlens as hl
from planted import INDUCTION_HEAD


def test_front_door(planted_induction, tmp_path):
    model = planted_induction
    cat = hl.scan(model, [hl.get_detector("induction", seq_len=10, top_k=1, n_random=6)], seed=0)
    res = cat["induction"]
    assert isinstance(res, hl.DetectorResult) and "induction" in cat
    top = cat["induction"].top(3)
    assert {"layer", "head", "head_id", "induction_score"} <= set(top.columns)
    assert cat.heads("induction", k=1) == [INDUCTION_HEAD] == res.heads(1)
    assert INDUCTION_HEAD in cat.heads("induction", labelled=True)
    check = res.causal_check
    assert isinstance(check, hl.CausalCheck) and check.top_heads[0] == "L%dH%d" % INDUCTION_HEAD
    assert f"p = {check.p_value:.3g}" in str(check) and check.p_value == 1 / 7   # beyond all 6 draws
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
