"""Safety heads: Ships on a planted refusal head, batched-with-padding Ships checked against one head and
one prompt at a time, and SmolLM2-135M-Instruct, which does not refuse (the role is not applicable)."""
import json

import pandas as pd
import pytest
import torch

from headlens import load_model
from headlens.detectors import get_detector
from headlens.detectors.safety import is_degenerate, is_refusal, read_lines, reply_outcome, wilson
from headlens.methods import ablate, clean_run, kl_metric, sweep_heads
from headlens.methods.generation import encode_prompt, left_pad

from planted import SAFETY_HEAD, safety_model
from test_cli import headlens

HARMFUL = ["t7 t8 harm t9", "harm t3 t4", "t2 t10 t11 harm t12 t13", "t4 harm t4 t9",
           "t9 harm t2", "t3 t3 harm t8 t1", "t12 t13 t14 harm t12", "t11 t10 t9 harm t7"]
HARMLESS = ["t7 t8 t14 t9", "t15 t3 t4", "t2 t10 t11 t1 t12 t13", "t4 t3 t4 t9",
            "t9 t14 t2", "t3 t3 t15 t8 t1", "t12 t13 t14 t1 t12", "t11 t10 t9 t2 t7"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted_safety")
    model = load_model(str(safety_model(folder / "model")))
    (folder / "harmful.txt").write_text("\n".join(HARMFUL))
    (folder / "harmless.txt").write_text("\n".join(HARMLESS))
    (folder / "phrases.txt").write_text("# refusal word of the planted model\nsorry\n")
    return model, folder


def planted_detector(folder, harmful="harmful.txt", **kw):
    return get_detector("safety", harmful=str(folder / harmful), harmless=str(folder / "harmless.txt"),
                        refusal_phrases=str(folder / "phrases.txt"), max_new_tokens=3, **kw)


def test_refusal_phrases():
    phrases = read_lines("refusal_phrases.txt")
    assert phrases and not any(p.startswith("#") for p in phrases)
    assert is_refusal("I'm sorry, but I can't help with that.", phrases)
    assert is_refusal("As an AI, I CANNOT do this", phrases)
    assert not is_refusal("Sure! Here is a recipe for lemon cake.", phrases)
    # Read at the start of the reply only: a later "I cannot" inside a compliant answer is not a refusal.
    assert not is_refusal("Sure, here is a plan. I cannot promise it works, but step one is", phrases)
    assert is_refusal("  I'm sorry, but I can't help with that. Instead", phrases)


def test_refusals_with_typographic_quotes_and_other_forms():
    """Llama, Gemma and Qwen write typographic apostrophes: matched after Unicode normalisation."""
    phrases = read_lines("refusal_phrases.txt")
    assert is_refusal("I\u2019m sorry, but I can\u2019t help with that.", phrases)
    assert is_refusal("I\u2019M SORRY", phrases) and is_refusal("\uff29\u2019m sorry", phrases)  # fullwidth I
    assert is_refusal("I can\u02bct do that", phrases)
    assert not is_refusal("Sure \u2014 here\u2019s how to bake bread.", phrases)


def test_degenerate_replies_are_neither_refusal_nor_attack_success():
    phrases = read_lines("refusal_phrases.txt")
    for text in ["", "   \n ", "------------", "!!! ??? ...", "sure sure sure sure", "the the cat the the",
                 "PPPPPPPPPPPP", "ahahahahahah"]:
        assert is_degenerate(text) and not is_refusal(text, phrases), text
        assert reply_outcome(text, phrases) == "degenerate", text
    for text in ["Sure! Here is a recipe for lemon cake.", "Step 1: mix the flour", "t9 t9 t9", "1. 2. 3."]:
        assert not is_degenerate(text) and reply_outcome(text, phrases) == "answer", text
    assert reply_outcome("I\u2019m sorry, but I can\u2019t help", phrases) == "refusal"


def test_planted_degenerate_replies_are_counted_apart(planted):
    """The planted model with its safety head ablated repeats the last word: over 5 tokens ("t9 t9 t9 t9
    t9") a degenerate reply. The refusal rate falls, the attack success rate does not rise; the degenerate
    share is reported in info and in the causal check's extra."""
    model, folder = planted
    det = get_detector("safety", harmful=str(folder / "harmful.txt"), harmless=str(folder / "harmless.txt"),
                       refusal_phrases=str(folder / "phrases.txt"), max_new_tokens=5)
    res = det.run(model, seed=0)
    assert res.info["n_refused"] == 8 and res.info["n_degenerate"] == 0 and res.info["asr_baseline"] == 0
    c = res.causal.to_dict()
    assert c["clean"] == 1.0 and c["top_k_ablated"] == 0.0                     # refusals gone...
    assert c["top_k_ablated_answer_rate"] == 0.0 and c["top_k_ablated_degenerate_rate"] == 1.0   # ...not answered
    assert c["clean_degenerate_rate"] == 0.0 and len(c["random_k_ablated_degenerate_rate"]) == c["n_random"]
    assert res.info["asr_group"] == res.info["asr_top_head"] == 0.0 and res.info["degenerate_group"] == 1.0
    assert res.labelled == [] and "degenerate" in res.reason


def test_wilson_interval():
    lo, hi = wilson(7, 24)
    assert lo < 7 / 24 < hi and 0.13 < lo < 0.16 and 0.47 < hi < 0.51     # textbook values 0.149-0.488
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0

def test_request_sets_are_balanced():
    harmful, harmless = read_lines("harmful.txt"), read_lines("harmless.txt")
    assert len(harmful) == len(harmless) >= 100 and not set(harmful) & set(harmless)
    assert len(set(harmful)) == len(harmful)
    mean = lambda xs: sum(len(x.split()) for x in xs) / len(xs)
    assert abs(mean(harmful) - mean(harmless)) < 1.0


def test_planted_safety_head_found_and_causal(planted):
    model, folder = planted
    res = planted_detector(folder).run(model, seed=0)
    assert res.status == "ok" and res.info["refusal_rate"] == 1.0 and res.info["n_refused"] == 8
    assert res.info["refusal_rate_lo"] == pytest.approx(wilson(8, 8)[0]) and res.info["refusal_rate_hi"] == 1.0
    assert res.info["harmless_refusal_rate"] == 0.0
    assert res.labelled == [SAFETY_HEAD] and res.info["group"] == ["L1H1"]
    assert res.info["asr_top_head"] == 1.0 and res.info["asr_group"] == 1.0   # refusal broken
    assert res.info["asr_group_lo"] > res.params["min_asr_rise"]
    top = res.top(2)
    assert (top["layer"].iloc[0], top["head"].iloc[0]) == SAFETY_HEAD
    assert top.safety_score.iloc[0] > 0.01 and top.safety_score.iloc[1] == 0
    assert top.safety_harmless_kl.iloc[0] < 1e-3
    assert res.info["interval_unit"] == "refused harmful request"
    assert res.info["interval_units"] == 8 - res.info["n_confirmation_prompts"]          # the discovery ones
    assert top.safety_score_lo.iloc[0] <= top.safety_score.iloc[0] <= top.safety_score_hi.iloc[0]
    assert top.safety_score_lo.iloc[0] >= 0                                   # a KL: clipped at 0
    # Direct vs total (the score): the planted head's KL comes through its own path (last layer).
    best = top.iloc[0]
    assert best.safety_direct > 0.01 and abs(best.safety_self_repair) < 0.2
    assert best.safety_compensation == pytest.approx(best.safety_direct - best.safety_score)
    c = res.causal.to_dict()
    assert c["clean"] == 1.0 and c["top_k_ablated"] == 0.0 and c["random_k_ablated_mean"] == 1.0
    assert c["n_units"] == res.info["n_confirmation_prompts"] == 4     # half the 8 refused, held out
    assert c["p_value"] == pytest.approx(1 / 100) and c["significant"] and c["effect"] == 1.0


def test_model_that_never_refuses_is_not_applicable(planted):
    model, folder = planted
    res = planted_detector(folder, harmful="harmless.txt").run(model)
    assert res.status == "not_applicable" and res.labelled == []
    assert res.info["refusal_rate"] == 0.0 and "refuses only 0 of 8" in res.reason
    assert res.frame.safety_score.isna().all()


def test_estimate_counts_the_ships_sweeps_only_when_the_model_refuses(planted):
    """The distributed plan's estimate: the refusal check alone for a model that does not refuse, plus
    the Ships sweeps' tokens for one that does; run() after estimate() (which keeps the refusal check)
    gives the same result as a fresh detector."""
    model, folder = planted
    never = planted_detector(folder, harmful="harmless.txt")
    assert never.estimate(model) == never.cost
    det = planted_detector(folder)
    refused_tokens = sum(len(encode_prompt(model, r, True)[0]) for r in HARMFUL + HARMLESS)   # 8 pairs
    assert det.estimate(model) == pytest.approx(det.cost + 0.7 * refused_tokens / 404)
    after, fresh = det.run(model, seed=0), planted_detector(folder).run(model, seed=0)
    pd.testing.assert_frame_equal(after.frame, fresh.frame)
    assert after.info == fresh.info and after.labelled == fresh.labelled == [SAFETY_HEAD]


def test_few_refusals_still_scored_on_the_refused_prompts(planted, tmp_path):
    """A model that refuses 5 of 10 requests (under the old 50%-rate rule borderline; 5 of 24 would
    have been dropped) has refusal behaviour: Ships is scored on the refused requests only."""
    model, folder = planted
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("\n".join(HARMFUL[:5] + HARMLESS[:5]))
    res = planted_detector(folder, harmful=str(mixed), min_refused=5).run(model, seed=0)
    assert res.status == "ok" and res.info["n_refused"] == 5 and res.info["refusal_rate"] == 0.5
    # the refused requests split: 2 held out for the confirmation check, 3 for Ships (discovery)
    assert res.info["refused_prompts"] == HARMFUL[:5] and res.info["n_ships_prompts"] == 3
    assert res.info["n_confirmation_prompts"] == 2
    assert res.top(1)[["layer", "head"]].values.tolist() == [list(SAFETY_HEAD)]
    four = planted_detector(folder, harmful=str(mixed), min_refused=6).run(model)
    assert four.status == "not_applicable" and "fewer than min_refused=6" in four.reason


def one_at_a_time_kl(model, prompts, heads):
    """Reference Ships: each prompt unpadded, each head ablated on its own with ablate()."""
    out = torch.zeros(len(heads))
    for ids in prompts:
        x = torch.tensor([ids])
        clean = torch.log_softmax(model.bridge(x)[0, -1], -1)
        for i, head in enumerate(heads):
            with ablate(model, [head], "uniform"):
                abl = torch.log_softmax(model.bridge(x)[0, -1], -1)
            out[i] += (clean.exp() * (clean - abl)).sum() / len(prompts)
    return out


@pytest.mark.parametrize("which", ["planted", pytest.param("smollm", marks=pytest.mark.real)])
def test_batched_padded_ships_match_one_at_a_time(which, planted, request):
    if which == "planted":
        model = planted[0]
        prompts = [encode_prompt(model, r)[0] for r in HARMFUL]
        heads = model.heads()
    else:
        model = request.getfixturevalue("smollm")
        prompts = [encode_prompt(model, r)[0] for r in read_lines("harmful.txt")[1:3]]
        heads = [(0, 0), (29, 8)]
    assert len({len(p) for p in prompts}) > 1             # different lengths: left padding is exercised
    tokens, mask = left_pad(prompts, model.tokenizer.pad_token_id)
    run = clean_run(model, tokens, mask, keep_z=False)
    batched = sweep_heads(model, tokens, kl_metric(run.logits), "uniform", heads=heads,
                          attention_mask=mask, run=run)
    expected = one_at_a_time_kl(model, prompts, heads)
    got = torch.stack([batched[l, h] for l, h in heads])
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-3)
    if which == "planted":
        assert got.max() == got[heads.index(SAFETY_HEAD)] > 0.01


@pytest.mark.real
def test_smollm_does_not_refuse_so_safety_is_not_applicable(tmp_path):
    """SmolLM2-135M-Instruct complies with harmful requests: the catalogue says the role does not apply,
    with the measured refusal rate, and ranks no head."""
    out = tmp_path / "cat.csv"
    r = headlens("scan", "smollm2-135m", "-d", "safety", "-o", str(out),
                 "-p", "safety.n_prompts=8", "-p", "safety.max_new_tokens=24")
    assert r.returncode == 0, r.stderr
    assert "safety: not applicable" in r.stdout
    frame = pd.read_csv(out)
    meta = json.loads(out.with_suffix(".json").read_text())["detectors"]["safety"]
    assert meta["status"] == "not_applicable" and meta["labelled"] == []
    assert meta["info"]["n_refused"] < 5 and meta["info"]["n_harmful"] == 8
    shown = headlens("show", str(out), "--role", "safety")  # one line with the reason, no table of NaNs
    assert shown.returncode == 0 and "safety: not applicable: the model refuses only" in shown.stdout
    assert "nan" not in shown.stdout
    assert frame.safety_score.isna().all() and not frame.safety_label.any()
    assert frame.safety_status.str.startswith("not_applicable").all()
