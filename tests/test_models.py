"""Model loading through the public path: tiny GPT-2 and Llama (GQA) checkpoints saved locally, the
embedded GGUF, and clear errors for what cannot be loaded."""
import pytest
import torch

from headlens import HeadlensError, load_model
from headlens.models import builtin_gguf, cache_dir


def _save_tiny(kind, folder):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from planted import make_tokenizer

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                           n_head=4, bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, max_position_embeddings=32,
                                             bos_token_id=0, eos_token_id=0, pad_token_id=0))
    # Norm gains and biases away from 1 and 0, so the in-place folding at load really does something.
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "ln" in name or "norm" in name or name.endswith("bias"):
            p.data = (0.5 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                      else 0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    make_tokenizer(64, folder)
    return folder


@pytest.mark.parametrize("kind,n_kv", [("gpt2", 4), ("llama", 2)])
def test_tiny_local_models_match_transformers(tmp_path, kind, n_kv):
    from transformers import AutoModelForCausalLM

    folder = _save_tiny(kind, tmp_path / kind)
    m = load_model(str(folder))
    assert (m.info.n_layers, m.info.n_heads, m.info.n_kv_heads) == (2, 4, n_kv)
    assert m.info.d_head == 8 and m.info.n_ctx == 32
    tokens = torch.randint(1, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    ref = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()(tokens).logits
    ours = m.bridge(tokens)
    # Compatibility mode centres the unembedding, which shifts every logit of a position by one
    # constant: compare log-probabilities (and centred logits).
    torch.testing.assert_close(torch.log_softmax(ours, -1), torch.log_softmax(ref, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours - ours.mean(-1, keepdim=True), ref - ref.mean(-1, keepdim=True),
                               atol=1e-4, rtol=0)
    assert m.kv_head(3) == (3 // (4 // n_kv))


@pytest.mark.real
def test_embedded_smollm2(smollm):
    info = smollm.info
    assert info.name == "smollm2-135m" and info.architecture == "LlamaForCausalLM"
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_head) == (30, 9, 3, 64)
    assert info.has_chat_template
    # Converted once into the cache; it really is a language model.
    assert any(p.name.startswith("SmolLM2-135M-Instruct") for p in cache_dir().iterdir())
    tokens = smollm.bridge.to_tokens("The capital of France is")
    assert smollm.tokenizer.decode(smollm.bridge(tokens)[0, -1].argmax()).strip() == "Paris"


@pytest.mark.real
def test_smollm2_matches_transformers(smollm):
    """After the in-place weight processing: log-probs equal plain transformers', and DLA sums exactly."""
    from transformers import AutoModelForCausalLM

    from headlens.methods import direct_logit_attribution

    tokens = smollm.bridge.to_tokens(["The capital of France is Paris, and the capital of Italy is"])
    ref = AutoModelForCausalLM.from_pretrained(smollm.info.source, attn_implementation="eager").eval()
    ref_logits = ref(tokens).logits
    ours = smollm.bridge(tokens)
    torch.testing.assert_close(torch.log_softmax(ours, -1), torch.log_softmax(ref_logits, -1), atol=1e-4, rtol=0)
    dla = direct_logit_attribution(smollm, tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(dla.total(), dla.logits, atol=1e-3, rtol=1e-5)
    # The unembedding was untied from the embedding before folding; the embedding is unchanged.
    torch.testing.assert_close(smollm.bridge.embed.original_component.weight, ref.model.embed_tokens.weight,
                               atol=0, rtol=0)


@pytest.mark.real
def test_gguf_file_path_uses_the_same_cache(smollm):
    m = load_model(str(builtin_gguf("smollm2-135m")))
    assert m.info.name == "SmolLM2-135M-Instruct.Q4_1" and m.info.source == smollm.info.source


def test_hub_failure_says_how_to_use_local_weights():
    with pytest.raises(HeadlensError, match="local weights") as e:
        load_model("some-org/not-a-model")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec,match", [("./missing-folder", "not found"), ("/no/such/file.gguf", "not found")])
def test_bad_paths(spec, match):
    with pytest.raises(HeadlensError, match=match):
        load_model(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(HeadlensError, match="config.json"):
        load_model(str(tmp_path))


def test_bad_dtype_and_device(tmp_path):
    with pytest.raises(HeadlensError, match="dtype"):
        load_model(str(tmp_path), dtype="int3")
    with pytest.raises(HeadlensError, match="device"):
        load_model(str(tmp_path), device="tpu")
