"""IOI roles: the batched path patching into heads' queries against the plain two-pass computation, the
prompts, the copy score against a per-head loop, the planted name mover / negative name mover /
S-inhibition / backup heads, a model that cannot do the task, and SmolLM2."""
import json

import pytest
import torch

from headlens import load_model
from headlens.detectors import get_detector
from headlens.detectors.ioi import copy_scores, ioi_prompts, single_token_names
from headlens.errors import HeadlensError
from headlens.methods import logit_diff_metric, loss_metric, mlp_out_name, path_patch_to_heads, q_name, z_name
from headlens.methods.circuits import effective_embedding, normalise

from planted import (
    IOI_BACKUP_HEAD,
    IOI_NAME_MOVER_HEAD,
    IOI_NEGATIVE_NAME_MOVER_HEAD,
    IOI_S_INHIBITION_HEAD,
    LLAMA_INDUCTION_HEAD,
    LlamaSpace,
    ioi_model,
    ioi_spec,
    llama_induction_model,
    save,
)

SMALL = dict(n_prompts=16, n_confirm=16, n_random=99, n_boot=200)


@pytest.fixture(scope="module")
def ioi(tmp_path_factory):
    return load_model(str(ioi_model(tmp_path_factory.mktemp("ioi"))))


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ioi_spec") / "planted.json"
    path.write_text(json.dumps(ioi_spec()))
    return str(path)


@pytest.fixture(scope="module")
def planted_result(ioi, spec_file):
    return get_detector("ioi", data=spec_file, **SMALL).run(ioi, seed=0)


def two_pass(model, clean, corrupted, sender, receivers, metric, position=None, mask=None):
    """The plain path patching of one sender into the receivers' queries. Pass 1: the clean prompts with
    the sender's output taken from the corrupted run and every other head's output and every MLP's output
    frozen at their clean values; the receivers' queries are cached. Pass 2: the clean prompts with the
    receivers' queries (at ``position``, or everywhere) replaced by the cached ones."""
    b = model.bridge
    names = {z_name(l) for l in range(model.n_layers)} | {mlp_out_name(l) for l in range(model.n_layers)}
    _, clean_cache = b.run_with_cache(clean, attention_mask=mask, names_filter=lambda n: n in names)
    _, corr_cache = b.run_with_cache(corrupted, attention_mask=mask, names_filter=lambda n: n in names)
    layers = sorted({l for l, _ in receivers})
    cached = {}

    def freeze(name):
        def hook(x, hook):
            out = clean_cache[name].clone()
            if name == z_name(sender[0]):
                out[:, :, sender[1]] = corr_cache[name][:, :, sender[1]]
            return out
        return hook

    def keep(layer):
        def hook(x, hook):
            cached[layer] = x.clone()
        return hook
    hooks = [(n, freeze(n)) for n in names] + [(q_name(l), keep(l)) for l in layers]
    b.run_with_hooks(clean, attention_mask=mask, fwd_hooks=hooks)

    def put(layer):
        heads = [h for l, h in receivers if l == layer]

        def hook(x, hook):
            x = x.clone()
            where = slice(None) if position is None else slice(position % x.shape[1], position % x.shape[1] + 1)
            x[:, where, heads] = cached[layer][:, where, heads]
            return x
        return hook
    logits = b.run_with_hooks(clean, attention_mask=mask, fwd_hooks=[(q_name(l), put(l)) for l in layers])
    return metric(logits)


def query_reads_previous_token(folder):
    """The Llama-style induction model with the induction head's query also reading the previous-token
    head's output (so a layer-0 head has a path into a layer-1 query)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama_induction_model(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    space = LlamaSpace(vocab=32, d_model=128, d_head=128)
    attn, dh = hf.model.layers[1].self_attn, space.d_head
    h = LLAMA_INDUCTION_HEAD[1]
    with torch.no_grad():
        for t in range(1, 32):
            attn.q_proj.weight[h * dh + space.content(t), space.prev(t)] = 60.0 * dh ** 0.5
    return save(hf, AutoTokenizer.from_pretrained(folder), folder)


@pytest.mark.parametrize("position", [None, -2])   # -2: the last position the loss reads
def test_path_patching_to_queries_equals_the_two_pass_computation_llama(position, tmp_path):
    """Rotary, RMSNorm, grouped-query attention: every layer-0 sender into L1H2 and L1H3's queries (two
    receivers of one key/value head), chunks of 2 senders, against one sender at a time, two passes each."""
    model = load_model(str(query_reads_previous_token(tmp_path / "llama")))
    g = torch.Generator().manual_seed(0)
    half = torch.randint(1, 32, (3, 6), generator=g)
    clean = torch.cat([torch.zeros(3, 1, dtype=torch.long), half, half], 1)
    corrupted = torch.cat([clean[:, :7], torch.randint(1, 32, (3, 6), generator=g)], 1)
    metric = loss_metric(clean, per_prompt=True)
    receivers = [(1, 2), (1, 3)]
    got = path_patch_to_heads(model, clean, corrupted, receivers, metric, position=position, batch_size=6)
    assert got.shape == (2, 4, 3) and got[1].isnan().all()
    for h in range(4):
        want = two_pass(model, clean, corrupted, (0, h), receivers, metric, position)
        assert torch.allclose(got[0, h], want.float(), atol=1e-4), h
    moved = (got[0] - metric(model.bridge(clean))).abs().amax(-1)
    assert moved[1] > 1e-2 and moved[0] < 1e-4  # the previous-token head's path to the queries matters


def test_path_patching_to_queries_equals_the_two_pass_computation_gpt2_padded(ioi):
    """LayerNorm, learned positions, left padding: the planted IOI model's heads into the name mover's
    and the backup's queries (two layers of receivers), against the two-pass computation."""
    spec = {"templates": ["{A} and {B} went {S} gave to", "{A} and {B} {S} gave to"],
            "names": ioi_spec()["names"]}
    p, _ = ioi_prompts(ioi, spec, 6, seed=1)
    assert (p.mask == 0).any()                                   # two lengths: some rows are padded
    metric = logit_diff_metric(p.io, p.s, per_prompt=True)
    receivers = [IOI_NAME_MOVER_HEAD, IOI_BACKUP_HEAD]
    got = path_patch_to_heads(ioi, p.tokens, p.abc, receivers, metric, position=-1, attention_mask=p.mask,
                              batch_size=12)
    senders = [h for h in ioi.heads() if h[0] < 2]
    for s in senders:
        want = two_pass(ioi, p.tokens, p.abc, s, receivers, metric, -1, p.mask)
        assert torch.allclose(got[s], want.float(), atol=1e-4), s
    assert got[2].isnan().all()
    clean = metric(ioi.bridge(p.tokens, attention_mask=p.mask))
    done = torch.tensor(p.template) == 0          # the template the planted model does (the other: LD 0)
    assert done.any() and (got[IOI_S_INHIBITION_HEAD][done] < clean[done] - 0.5).all()   # its path matters


def test_path_patching_to_heads_refuses_bad_requests(ioi):
    t = torch.zeros(2, 8, dtype=torch.long)
    m = logit_diff_metric(torch.tensor([1, 2]), torch.tensor([2, 1]))
    for kwargs, message in ((dict(receiver_input="k"), "input only"), (dict(position=9), "outside")):
        with pytest.raises(HeadlensError, match=message):
            path_patch_to_heads(ioi, t, t, [(1, 0)], m, **kwargs)
    with pytest.raises(HeadlensError, match="no head L5H0"):
        path_patch_to_heads(ioi, t, t, [(5, 0)], m)
    with pytest.raises(HeadlensError, match="same shape"):
        path_patch_to_heads(ioi, t, t[:, 1:], [(1, 0)], m)


def test_prompts_are_seeded_single_token_and_abc_changes_only_the_repeated_subject(ioi):
    spec = {"templates": ioi_spec()["templates"], "names": ["Ann", "Bob", "Zed zed", "Cat", "Dan"]}
    assert single_token_names(ioi, spec["names"]) == ["Ann", "Bob", "Cat", "Dan"]
    p, dropped = ioi_prompts(ioi, spec, 12, seed=3)
    q, _ = ioi_prompts(ioi, spec, 12, seed=3)
    assert dropped == 0 and torch.equal(p.tokens, q.tokens) and torch.equal(p.abc, q.abc)
    rows = torch.arange(12)
    assert (p.tokens[rows, p.io_pos] == p.io).all()
    assert (p.tokens[rows, p.s_pos[:, 0]] == p.s).all() and (p.tokens[rows, p.s_pos[:, 1]] == p.s).all()
    assert ((p.io_pos < p.s_pos[:, 0]).any() and (p.io_pos > p.s_pos[:, 0]).any())   # both orders
    differs = p.tokens != p.abc
    assert (differs.sum(1) == 1).all() and differs[rows, p.s_pos[:, 1]].all()
    assert not (p.abc[rows, p.s_pos[:, 1]][:, None] == p.tokens).any(1).any()       # a third name
    keys = {tuple(t.tolist()) for t in p.tokens}
    assert len(keys) == 12
    with pytest.raises(HeadlensError, match="at least 3 names"):
        ioi_prompts(ioi, {"templates": spec["templates"], "names": ["Ann", "Bob"]}, 4, seed=0)


def test_copy_scores_equal_a_per_head_loop(ioi):
    ids = torch.tensor([1, 2, 3, 4, 5])
    top, bottom = copy_scores(ioi, ids, k=5)
    x = normalise(ioi, effective_embedding(ioi, ids))
    w_u = ioi.bridge.W_U.float()
    for l in range(ioi.n_layers):
        for h in range(ioi.n_heads):
            ov = ioi.bridge.W_V[l, h].float() @ ioi.bridge.W_O[l, h].float()
            hits = neg = 0
            for i, t in enumerate(ids.tolist()):
                logits = normalise(ioi, x[i] @ ov) @ w_u
                tie = 1e-4 * max(float(logits.abs().max()), 1.0)
                hits += int(sum(int(logits[j] >= logits[t] - tie) for j in range(len(logits)) if j != t) < 5)
                neg += int(sum(int(logits[j] <= logits[t] + tie) for j in range(len(logits)) if j != t) < 5)
            assert top[l, h] == pytest.approx(hits / len(ids)) and bottom[l, h] == pytest.approx(neg / len(ids))
    assert top[IOI_NAME_MOVER_HEAD] == 1 and bottom[IOI_NEGATIVE_NAME_MOVER_HEAD] == 1
    assert top[IOI_S_INHIBITION_HEAD] == 0


def test_planted_ioi_roles_are_found(planted_result):
    res = planted_result
    f = res.frame.set_index(["layer", "head"])
    assert res.applies and res.info["clean_logit_diff_lo"] > 0 and res.info["clean_io_wins"] == 1
    assert res.info["claimed"] == {"name_mover": ["L1H0"], "negative_name_mover": ["L1H1"],
                                   "s_inhibition": ["L0H0"], "backup_name_mover": ["L2H0"]}
    assert sorted(res.labelled) == sorted([IOI_NAME_MOVER_HEAD, IOI_NEGATIVE_NAME_MOVER_HEAD,
                                           IOI_S_INHIBITION_HEAD, IOI_BACKUP_HEAD])
    roles = f.ioi_role.to_dict()
    assert roles[IOI_NAME_MOVER_HEAD] == "name_mover" and roles[IOI_S_INHIBITION_HEAD] == "s_inhibition"
    assert roles[IOI_NEGATIVE_NAME_MOVER_HEAD] == "negative_name_mover"
    assert roles[IOI_BACKUP_HEAD] == "backup_name_mover"
    assert sum(bool(r) for r in roles.values()) == 4
    nm = f.loc[IOI_NAME_MOVER_HEAD]
    assert nm.ioi_score == f.ioi_score.max() and nm.ioi_direct_lo > 0 and nm.ioi_copy == 1
    assert nm.ioi_attn_io > 0.9 and nm.ioi_attn_s < 0.05
    assert f.loc[IOI_NEGATIVE_NAME_MOVER_HEAD].ioi_direct_hi < 0
    si = f.ioi_s_inhibition
    assert si.idxmax() == IOI_S_INHIBITION_HEAD and f.loc[IOI_S_INHIBITION_HEAD].ioi_s_inhibition_lo > 0.5
    assert f.loc[IOI_S_INHIBITION_HEAD].ioi_attn_s > 0.9            # it reads the repeated subject
    backup = f.loc[IOI_BACKUP_HEAD]
    assert abs(backup.ioi_direct) < 0.05 and backup.ioi_backup_lo > 0.5   # silent until the mover is gone
    c = res.causal
    assert c.tested == "claimed" and c.significant and c.top_k_ablated < c.clean - 0.5
    assert res.info["negative_check"]["significant"]


def test_a_model_that_cannot_do_the_task_is_not_applicable(ioi, tmp_path):
    """The planted model reads the repeated subject at position 5 only: with the subject at position 4 its
    name mover attends to the subject twice as much as to the IO and the logit difference is negative."""
    path = tmp_path / "shifted.json"
    path.write_text(json.dumps({"templates": ["{A} and {B} {S} went gave to"], "names": ioi_spec()["names"]}))
    res = get_detector("ioi", data=str(path), **SMALL).run(ioi, seed=0)
    assert not res.applies and res.labelled == [] and "does not do IOI" in res.reason
    assert res.info["clean_logit_diff_hi"] < 0 and res.frame.ioi_score.isna().all()


def test_same_seed_same_frame_and_bad_settings(ioi, spec_file, planted_result):
    again = get_detector("ioi", data=spec_file, **SMALL).run(ioi, seed=0)
    assert again.frame.equals(planted_result.frame)
    for params, message in ((dict(n_prompts=1), "at least 2"), (dict(data="nope.json"), "not found")):
        with pytest.raises(HeadlensError, match=message) as err:
            get_detector("ioi", **params).run(ioi)
        assert "\n" not in str(err.value)


SMOLLM = dict(n_prompts=24, n_confirm=12, sinh_prompts=8, n_random=99, n_boot=500)


def test_smollm_reports_its_clean_behaviour_first_and_labels_only_with_evidence(smollm):
    """SmolLM2-135M-Instruct on the IOI prompts: the clean logit difference and its interval come first;
    every labelled head passes its sub-role's rule and its held-out check; the receivers of the
    S-inhibition path patching sit above every sender."""
    res = get_detector("ioi", **SMOLLM).run(smollm, seed=0)
    info = res.info
    assert info["clean_logit_diff_lo"] <= info["clean_logit_diff"] <= info["clean_logit_diff_hi"]
    assert info["n_names"] + info["names_dropped"] == 36 and info["n_names"] >= 20
    assert res.applies == (info["clean_logit_diff_lo"] > 0)
    assert res.applies, res.reason          # SmolLM2 does IOI: IO beats S on most prompts
    f = res.frame.set_index(["layer", "head"])
    receivers = [(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in info["receivers"]]
    sent = f[f.ioi_s_inhibition.notna()].index
    assert len(sent) and max(l for l, _ in sent) < max(l for l, _ in receivers)
    assert (f.ioi_direct_lo <= f.ioi_direct + 1e-6).all() and (f.ioi_direct <= f.ioi_direct_hi + 1e-6).all()
    for head in res.labelled:
        row = f.loc[head]
        assert row.ioi_role in ("name_mover", "negative_name_mover", "s_inhibition", "backup_name_mover")
        if row.ioi_role == "name_mover":
            assert row.ioi_direct_lo > 0 and row.ioi_copy >= 0.5
        if row.ioi_role == "negative_name_mover":
            assert row.ioi_direct_hi < 0 and row.ioi_neg_copy >= 0.5
    positive = [h for h in res.labelled if f.loc[h].ioi_role != "negative_name_mover"]
    assert (not positive) or res.causal.significant
    if not res.labelled:
        assert res.reason


def test_ioi_is_opt_in():
    from headlens.detectors import parse_detectors

    assert "ioi" not in parse_detectors(None) and "ioi" not in parse_detectors("default")
    assert parse_detectors("default,ioi")[-1] == "ioi" and "ioi" in parse_detectors("all")
