"""Memory: in-place weight processing (same weights and activations as TransformerLens's own), the byte
planner (a scan under a small --max-memory chunks more and gives the same catalogue), and logits
computed only at the positions a metric reads."""
import numpy as np
import pytest
import torch

from headlens import HeadlensError, load_model
from headlens.catalogue import scan
from headlens.detectors import get_detector
from headlens.methods import clean_run, kl_metric, logit_diff_metric, loss_metric, run_variants, sweep_heads
from headlens.methods.forward import clean_run_bytes, row_bytes
from headlens.methods.metrics import positioned
from headlens.runtime import use
from headlens.runtime.memory import parse_bytes
from headlens.runtime.work import plan

VOCAB = 48


def _tiny_hf(kind):
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if kind == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                        bos_token_id=0, eos_token_id=0))
    elif kind == "llama":
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=32, tie_word_embeddings=True,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=0))
    else:
        hf = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                                head_dim=16, max_position_embeddings=32, bos_token_id=0,
                                                eos_token_id=0, pad_token_id=0))
    # Norm gains and biases away from their initial 1 and 0, so folding them really does something.
    g = torch.Generator().manual_seed(1)
    for name, p in hf.named_parameters():
        if "norm" in name or ".ln" in name or name.endswith("bias"):
            p.data = 0.5 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("weight") \
                else 0.3 * torch.randn(p.shape, generator=g)
    return hf.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def folder(request, tmp_path_factory):
    from planted import make_tokenizer, save

    path = tmp_path_factory.mktemp(request.param)
    save(_tiny_hf(request.param), make_tokenizer(VOCAB, path), path)
    return path


def test_in_place_processing_equals_transformer_lens(folder):
    """Every hooked activation and the logits equal TransformerLens's own (copying) processing."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headlens.models import _quiet, in_place_supported

    ours = load_model(str(folder))
    assert in_place_supported(ours.bridge)
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with _quiet():
        ref = TransformerBridge.boot_transformers(str(folder), hf_model=hf,
                                                  tokenizer=AutoTokenizer.from_pretrained(folder))
        ref.enable_compatibility_mode(disable_warnings=True)
    tokens = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    logits, cache = ours.bridge.run_with_cache(tokens)
    ref_logits, ref_cache = ref.run_with_cache(tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert set(cache.keys()) == set(ref_cache.keys())
    for name in cache.keys():
        torch.testing.assert_close(cache[name], ref_cache[name], atol=1e-5, rtol=0, msg=name)
    # The weights the analyses read (W_U, W_O) agree too, and the token embedding was left alone
    # where the unembedding was tied to it.
    torch.testing.assert_close(ours.bridge.W_U, ref.W_U, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.bridge.W_O, ref.W_O, atol=1e-6, rtol=0)


def test_parse_bytes_and_errors():
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("1.5 GiB") == int(1.5 * 2**30)
    assert parse_bytes(1000) == 1000
    with pytest.raises(HeadlensError, match="memory size"):
        parse_bytes("lots")


def test_plan_is_deterministic_and_says_what_one_row_needs(planted_induction):
    m = planted_induction
    one = row_bytes(m, 41, 1)
    assert plan(one, room=10 * one) == 10 == plan(one, room=10 * one + one // 2)
    assert row_bytes(m, 41, 41) > one  # logits at every position cost more than at the last
    with pytest.raises(HeadlensError, match="needs .* for one 41-token sequence") as e:
        plan(one, room=one - 1, strict="ablating heads", unit="41-token sequence on a model")
    assert "\n" not in str(e.value)
    with pytest.raises(HeadlensError, match="less than the model's weights"), use(max_memory=m.weight_bytes() // 2):
        run_variants(m, torch.zeros(1, 4, dtype=torch.long), [[(0, 0)]], loss_metric(torch.zeros(1, 4)))


def _unembed_calls(model):
    calls = []
    handle = model.bridge.unembed.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape))
    return calls, handle


def test_scan_under_small_max_memory_chunks_more(planted_induction):
    """The induction scan under a budget of a few rows: more chunks, the same catalogue."""
    m = planted_induction
    det = lambda: get_detector("induction", seq_len=10, top_k=1, n_random=99)
    calls, handle = _unembed_calls(m)
    try:
        free = scan(m, [det()]).frame
        n_free = len(calls)
        calls.clear()
        n_pos, batch, n_loss = 21, 4, 10  # 1 + seq_len * sweep_repeats; causal_seqs; repeated-part targets
        budget = m.weight_bytes() + clean_run_bytes(m, batch, n_pos) + 3 * row_bytes(m, n_pos, n_loss)
        with use(max_memory=budget):
            small = scan(m, [det()]).frame
        n_small = len(calls)
    finally:
        handle.remove()
    assert n_small > n_free
    # The clean runs (the sweep's first, then the confirmation check's: 4 prompts each, of the same shape)
    # and the ablated runs read the loss positions only (10 of 21); no ablated run held more than three rows.
    at_loss = [shape for shape in calls if shape[1] == n_loss]
    assert at_loss[0][0] == batch and len(at_loss) > 2
    assert sum(shape[0] == batch for shape in at_loss) == 2 and max(s[0] for s in at_loss if s[0] != batch) <= 3
    assert (free.induction_label == small.induction_label).all()
    for col in free.columns:
        if col.startswith("induction_") and free[col].dtype.kind == "f":
            np.testing.assert_allclose(small[col].values, free[col].values, atol=1e-6, rtol=0, err_msg=col)


def test_logits_only_at_the_metric_positions(planted_induction):
    """A last-position metric: the unembedding sees [rows, 1, d_model]; the values equal full logits."""
    m = planted_induction
    tokens = torch.randint(1, 32, (3, 12), generator=torch.Generator().manual_seed(0))
    run = clean_run(m, tokens)
    correct, wrong = tokens[:, -1], tokens[:, 0]
    for metric in (kl_metric(run.logits), logit_diff_metric(correct, wrong)):
        calls, handle = _unembed_calls(m)
        try:
            fast = sweep_heads(m, tokens, metric, "zero", run=run)
        finally:
            handle.remove()
        assert calls and all(shape[1:] == (1, m.info.d_model) for shape in calls)
        plain = lambda logits, metric=metric: metric(logits)  # no positions: full logits
        calls, handle = _unembed_calls(m)
        try:
            full = sweep_heads(m, tokens, plain, "zero", run=run)
        finally:
            handle.remove()
        assert all(shape[1] == tokens.shape[1] for shape in calls)
        torch.testing.assert_close(fast, full, atol=1e-6, rtol=0)
    # The loss over some positions reads only those, and agrees with a plain loss on full logits.
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[:, 6:] = True
    loss = loss_metric(tokens, mask)
    assert loss.positions.tolist() == [6, 7, 8, 9, 10]

    def plain_loss(logits):
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
        return -(logp[mask]).mean()
    torch.testing.assert_close(sweep_heads(m, tokens, loss, "mean", run=run),
                               sweep_heads(m, tokens, plain_loss, "mean", run=run), atol=1e-6, rtol=0)
    # A user metric on chosen positions, via positioned(): the same through both routes.
    mine = positioned(lambda lg: lg[:, :, 3].mean(), slice(2, 5))
    torch.testing.assert_close(mine(run.logits), run.logits[:, 2:5, 3].mean())


def test_one_variant_split_over_chunks(planted_induction):
    """Chunks smaller than a variant's batch: rows of one variant land in two chunks."""
    m = planted_induction
    tokens = torch.randint(1, 32, (5, 12), generator=torch.Generator().manual_seed(3))
    metric = loss_metric(tokens)
    run = clean_run(m, tokens)
    stats = {}
    split = run_variants(m, tokens, [[h] for h in m.heads()], metric, "resample", batch_size=2, run=run,
                         stats=stats)
    assert stats["per_chunk"] == 2
    whole = run_variants(m, tokens, [[h] for h in m.heads()], metric, "resample", batch_size=None, run=run)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=0)
    # The loss is a sum over prompts: each chunk adds its share. A plain metric gets the variant's rows
    # gathered from both chunks.
    assert metric.share is not None
    plain = run_variants(m, tokens, [[h] for h in m.heads()], lambda logits: metric(logits), "resample",
                         batch_size=2, run=run)
    torch.testing.assert_close(plain, whole, atol=1e-6, rtol=0)


def _tail_loss(seed: int):
    """Three random 14-token prompts (ids 1-31), the loss mask of their last 6 predictions, that loss."""
    tokens = torch.randint(1, 32, (3, 14), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(3, 13, dtype=torch.bool)
    mask[:, 7:] = True
    return tokens, mask, loss_metric(tokens, mask)


def test_clean_run_keeps_logits_only_where_asked(planted_induction):
    """clean_run(positions=...) unembeds only there; the clean value, sweeps and direct effects on it equal
    those on a full clean run, and a metric that needs other positions is refused."""
    from headlens.methods import direct_effects

    m = planted_induction
    tokens, _, loss = _tail_loss(7)
    full = clean_run(m, tokens)
    calls, handle = _unembed_calls(m)
    try:
        part = clean_run(m, tokens, positions=loss.positions)
    finally:
        handle.remove()
    assert calls == [torch.Size([3, 6, m.info.d_model])] and part.logits.shape[1] == 6
    torch.testing.assert_close(part.value(loss), loss(full.logits), atol=1e-6, rtol=0)
    torch.testing.assert_close(sweep_heads(m, tokens, loss, "mean", run=part),
                               sweep_heads(m, tokens, loss, "mean", run=full), atol=1e-6, rtol=0)
    torch.testing.assert_close(direct_effects(m, part, loss, "mean"), direct_effects(m, full, loss, "mean"),
                               atol=1e-6, rtol=0)
    with pytest.raises(HeadlensError, match="holds logits at positions"):
        part.value(lambda logits: logits.sum())          # a plain metric reads every position


def test_direct_effects_chunked_by_bytes_and_only_at_the_metric_positions(planted_induction, monkeypatch):
    """Direct effects: under a budget of a few heads they run in more chunks and give the same values;
    a positioned loss forms logits only at its positions and equals the same loss on full logits."""
    from headlens.methods import direct_effects

    m = planted_induction
    tokens, mask, loss = _tail_loss(5)
    run = clean_run(m, tokens)

    def plain_loss(logits):
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
        return -(logp[mask]).mean()
    free = direct_effects(m, run, loss, "mean", batch_size=None)
    full = direct_effects(m, run, plain_loss, "mean", batch_size=None)
    torch.testing.assert_close(free, full, atol=1e-6, rtol=0)
    # a budget of two heads' working memory (weights excluded) -> chunks of two heads
    per_head = 3 * 6 * (2 * m.info.d_model * 4 + m.bridge.cfg.d_vocab * (2 * 4 + 4))
    assert plan(per_head, room=2 * per_head) == 2
    import headlens.methods.patching as patching
    shapes, original = [], patching.per_variant

    def recording(metric, logits, n, batch):
        shapes.append((n, logits.shape[1]))
        return original(metric, logits, n, batch)
    monkeypatch.setattr(patching, "per_variant", recording)
    with use(max_memory=m.weight_bytes() + 2 * per_head):
        small = direct_effects(m, run, loss, "mean", batch_size=None)
    assert [n for n, _ in shapes] == [2] * (len(m.heads()) // 2) + [1] * (len(m.heads()) % 2)
    assert {pos for _, pos in shapes} == {6}          # logits formed at the 6 loss positions only
    torch.testing.assert_close(small, free, atol=1e-6, rtol=0)
