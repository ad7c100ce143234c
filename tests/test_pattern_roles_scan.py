"""Real run on SmolLM2-135M through ``headlens scan -d induction,previous_token,duplicate_token,attention_sink``.

Small settings keep it short (99 draws, so a check can reach alpha = 0.01); the full-size figures are in
benchmarks/results/cpu_scan_smollm2.json and the role pages. Nothing here is fitted to one run's output:
the assertions are the label rules themselves (labelled heads are exactly the claimed heads when their
confirmation check is significant, none otherwise), the columns' definitions recomputed from the
catalogue, TransformerLens's previous-token score on the same prompt, and the composition partner
recomputed with ``hl.composition``.
"""
import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from headlens.cli import app

pytestmark = pytest.mark.real   # every test reads one scan of the embedded SmolLM2

PARAMS = ["induction.seq_len=10", "induction.n_seqs=4", "induction.causal_seqs=1", "induction.confirm_seqs=2",
          "induction.effect_heads=2",
          "previous_token.seq_len=64", "previous_token.n_seqs=4", "previous_token.confirm_seqs=2",
          "previous_token.confirm_len=12", "previous_token.text_seqs=1", "previous_token.text_draws=4",
          "duplicate_token.n_seqs=4", "duplicate_token.confirm_seqs=2", "duplicate_token.confirm_len=32",
          "attention_sink.seq_len=64", "attention_sink.n_seqs=4", "attention_sink.confirm_seqs=2",
          "all.n_random=99", "all.n_boot=200"]
ROLES = ("previous_token", "duplicate_token", "attention_sink")


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    out = tmp_path_factory.mktemp("pattern_roles") / "cat.csv"
    args = ["scan", "smollm2-135m", "-d", "induction," + ",".join(ROLES), "--out", str(out)]
    for p in PARAMS:
        args += ["--param", p]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads(out.with_suffix(".json").read_text())
    return pd.read_csv(out), meta


def heads_of(frame, mask):
    return set(frame.head_id[mask])


def test_each_role_ran_and_labels_follow_its_check(scanned):
    frame, meta = scanned
    rules = {
        "previous_token": lambda p: frame.previous_token_score >= p["threshold"],
        "duplicate_token": lambda p: frame.duplicate_token_score >= p["threshold"],
        "attention_sink": lambda p: frame.attention_sink_dormant.astype(str).str.lower() == "true",
    }
    for role in ROLES:
        d = meta["detectors"][role]
        assert d["status"] == "ok" and frame[f"{role}_score"].between(0, 1).all(), role
        claimed = set(d["info"]["claimed"])
        assert claimed == heads_of(frame, rules[role](d["params"])), role
        c = d["causal"]
        assert c["matched"] and c["tested"] == ("claimed" if claimed else "best candidates"), role
        assert set(d["labelled"]) == (claimed if c["significant"] else set()), role
        assert set(d["labelled"]) == heads_of(frame, frame[f"{role}_label"]), role
        if not d["labelled"]:
            assert d["reason"], role


def test_previous_token_scores_agree_with_transformer_lens(smollm):
    """TransformerLens's ``detect_head(..., "previous_token_head")`` divides the same attention sum by the
    whole pattern's (the first row included): TL = ours * (n - 1) / n on one prompt."""
    from transformer_lens.head_detector import detect_head

    from headlens.detectors.previous_token import previous_token_score
    from headlens.methods import pattern_name

    text = "The quick brown fox jumps over the lazy dog while the cat sleeps."
    tl = detect_head(smollm.bridge, text, "previous_token_head").float()
    tokens = smollm.bridge.to_tokens(text)
    n = tokens.shape[1]
    _, cache = smollm.bridge.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    ours = torch.stack([previous_token_score(cache[pattern_name(l)][0].float()) for l in range(smollm.n_layers)])
    assert torch.allclose(tl, ours * (n - 1) / n, atol=1e-5)


def test_sink_columns_follow_their_definitions(scanned):
    frame, meta = scanned
    d = meta["detectors"]["attention_sink"]
    p, info = d["params"], d["info"]
    sink = frame.attention_sink_score >= p["sink_threshold"]
    assert info["sink_rate"] == pytest.approx(sink.mean()) and info["n_sink_heads"] == sink.sum()
    dormant = sink & (frame.attention_sink_output_norm < p["dormant_norm"])
    assert (frame.attention_sink_dormant.astype(str).str.lower() == "true").tolist() == dormant.tolist()
    assert info["n_dormant_heads"] == dormant.sum()
    # The output norm is relative to the layer's mean head: each layer's values average to 1.
    per_layer = frame.groupby("layer").attention_sink_output_norm.mean()
    assert ((per_layer - 1).abs() < 1e-3).all()
    # The dormant check claims the heads matter LESS than random ones; the record says so.
    assert d["causal"]["claim"] == "less"


def test_induction_heads_get_their_k_composition_partner(scanned, smollm):
    """Each induction head's strongest K-composition partner among the previous-token heads, recomputed
    from the weights with hl.composition."""
    import headlens as hl

    frame, meta = scanned
    record = meta["composition"]["induction_k_partner"]
    readers, writers = record["readers"], record["writers"]
    assert readers and writers
    rows = frame.set_index("head_id").loc[readers]
    assert (rows.induction_k_partner != "").all() and rows.induction_k_partner.isin(writers).all()
    as_pair = lambda h: tuple(int(x) for x in h[1:].split("H"))      # noqa: E731
    comp = hl.composition(smollm, "k", writers=[as_pair(w) for w in writers],
                          readers=[as_pair(r) for r in readers], n_samples=10)
    for j, reader in enumerate(readers):
        column = torch.nan_to_num(comp.scores[:, j], nan=float("-inf"))
        best = int(column.argmax())
        assert rows.loc[reader, "induction_k_partner"] == writers[best]
        assert rows.loc[reader, "induction_k_partner_score"] == pytest.approx(float(column[best]), rel=1e-4)
    others = frame[~frame.head_id.isin(readers)]
    assert others.induction_k_partner.isna().all() or (others.induction_k_partner.fillna("") == "").all()
