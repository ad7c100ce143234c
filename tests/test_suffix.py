"""run_variants' suffix runs: variants acting at the prompts' last positions run those positions only,
after the clean KV cache of the rest; the values equal whole-prompt runs (suffix=False), on a tiny GPT-2
and a tiny Llama with grouped-query attention, left-padded prompts of different lengths included."""
import pytest
import torch

from headlens import HeadlensError, load_model
from headlens.methods import (
    MeanAblation,
    Patch,
    ResampleAblation,
    UniformAttention,
    ZeroAblation,
    clean_run,
    run_variants,
)
from headlens.methods.interventions import Intervention
from headlens.methods.metrics import positioned, summed

N_POS, VOCAB = 12, 64


def _save(kind, folder):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from planted import make_tokenizer

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=3, n_head=4,
                                           initializer_range=0.2, bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=32, initializer_range=0.2, bos_token_id=0,
                                             eos_token_id=0, pad_token_id=0))
    model.save_pretrained(folder)
    make_tokenizer(VOCAB, folder)
    return folder


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    return load_model(str(_save(request.param, tmp_path_factory.mktemp(request.param))))


def _prompts(pads=(0, 2, 5, 1), seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (len(pads), N_POS), generator=g)
    mask = torch.ones_like(tokens)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        tokens[row, :pad] = 0
    return tokens, mask


def _logprobs(positions):
    return positioned(lambda logits: torch.log_softmax(logits.float(), -1)[..., :8], positions)


def _variants(model, position):
    singles = [[(l, h, position)] for l in range(model.n_layers) for h in range(model.n_heads)]
    return singles + [[(0, 1, -1), (2, 3, -2)], [(1, 0, -2), (1, 2, -2), (2, 1, -1)], []]


def _both(model, tokens, mask, variants, metric, ablation, batch_size=5):
    run = clean_run(model, tokens, mask)
    stats = {}
    fast = run_variants(model, tokens, variants, metric, ablation, mask, batch_size=batch_size, run=run,
                        stats=stats)
    slow = run_variants(model, tokens, variants, metric, ablation, mask, batch_size=batch_size, run=run,
                        suffix=False)
    return fast, slow, stats


@pytest.mark.parametrize("ablation", ["patch", "zero", "mean", "mean_all", "resample", "uniform"])
@pytest.mark.parametrize("position,read", [(-1, -1), (-2, -1), (-2, [-2, -1]), (-1, [-2, -1])])
def test_suffix_runs_equal_whole_prompts(tiny, ablation, position, read):
    tokens, mask = _prompts()
    source = torch.randint(1, VOCAB, tokens.shape, generator=torch.Generator().manual_seed(7))
    intervention = {"patch": Patch(source=source), "zero": ZeroAblation(), "mean": MeanAblation(),
                    "mean_all": MeanAblation(keep_start=False), "resample": ResampleAblation(seed=3),
                    "uniform": UniformAttention()}[ablation]
    fast, slow, stats = _both(tiny, tokens, mask, _variants(tiny, position), _logprobs(read), intervention)
    assert stats["suffix"] == N_POS - 2          # the variants' -2 entries, or the metric's -2
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=0)
    assert (slow[:-1] - slow[-1]).abs().amax() > 1e-2     # the interventions do change the metric


def test_suffix_runs_without_padding_and_summed_metric(tiny):
    tokens, _ = _prompts(pads=(0, 0, 0))
    share = lambda logits, prompts: torch.log_softmax(logits.float(), -1)[..., 3].sum()
    fast, slow, stats = _both(tiny, tokens, None, _variants(tiny, -2), summed(share, [-2, -1]), "mean",
                              batch_size=2)
    assert stats["suffix"] == N_POS - 2
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=0)


class Recorded(ZeroAblation):
    """Zero ablation that records the length of every hooked activation and its site's offset."""
    seen: list = []

    def forward(self, z, site):
        self.seen.append((z.shape[1], site.offset))
        return super().forward(z, site)


class Unaware(Intervention):
    """A user's intervention that does not read Site.offset: always whole prompts."""
    name = "unaware"

    def forward(self, z, site):
        return z * 0.5


def test_suffix_path_is_taken_and_only_when_it_may(tiny):
    tokens, mask = _prompts()
    run = clean_run(tiny, tokens, mask)
    rec = Recorded()
    rec.seen = []
    stats = {}
    run_variants(tiny, tokens, [[(1, 2, -2)], [(2, 0, -1)]], _logprobs(-1), rec, mask, run=run, stats=stats)
    assert stats["suffix"] == N_POS - 2 and set(rec.seen) == {(2, N_POS - 2)}
    rec.seen = []
    run_variants(tiny, tokens, [[(1, 2, -2)]], _logprobs(-1), rec, mask, run=run, stats=stats, suffix=False)
    assert stats["suffix"] is None and set(rec.seen) == {(N_POS, 0)}
    cases = [([[(1, 2)]], _logprobs(-1), "zero"),                       # a head at every position
             ([[(1, 2, -2), (0, 1)]], _logprobs(-1), "zero"),           # one of them
             ([[(1, 2, -2)]], lambda logits: logits[:, -1], "zero"),    # a metric of the full logits
             ([[(1, 2, -2)]], _logprobs(2), "zero"),                    # the metric reads an early position
             ([[(1, 2, 3)]], _logprobs(-1), "zero"),                    # the suffix is most of the prompt
             ([[(1, 2, -2)]], _logprobs(-1), Unaware())]                # not offset-aware
    for variants, metric, ablation in cases:
        fast = run_variants(tiny, tokens, variants, metric, ablation, mask, run=run, stats=stats)
        assert stats["suffix"] is None
        torch.testing.assert_close(fast, run_variants(tiny, tokens, variants, metric, ablation, mask, run=run,
                                                      suffix=False))


def test_suffix_positions_are_checked(tiny):
    tokens, mask = _prompts()
    with pytest.raises(HeadlensError, match="outside"):
        run_variants(tiny, tokens, [[(1, 2, N_POS)]], _logprobs(-1), "zero", mask)
