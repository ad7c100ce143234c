"""Prompt material built from a model's vocabulary (random tokens) that several roles use."""
from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from ..models import HeadModel

__all__ = ["random_token_ids", "repeated_tokens"]


def random_token_ids(model: HeadModel, n: int, length: int, generator: torch.Generator,
                     id_range: tuple[float, float] = (0.01, 0.9)) -> Int[Tensor, "n length"]:
    """``[n, length]`` random token ids, avoiding special tokens and (for real vocabularies) the
    lowest and highest ids (BPE's bytes/most frequent merges and its rarest merges)."""
    vocab = model.bridge.cfg.d_vocab
    special = set(model.tokenizer.all_special_ids)
    lo, hi = (int(vocab * id_range[0]), int(vocab * id_range[1])) if vocab >= 1000 else (0, vocab)
    pool = torch.tensor([i for i in range(lo, hi) if i not in special])
    return pool[torch.randint(len(pool), (n, length), generator=generator)]


def repeated_tokens(model: HeadModel, n_seqs: int, seq_len: int, n_repeats: int,
                    seed: int) -> Int[Tensor, "n_seqs pos"]:
    """The start token followed by a random sequence repeated ``n_repeats`` times:
    ``[n_seqs, 1 + seq_len * n_repeats]``."""
    g = torch.Generator().manual_seed(seed)
    seq = random_token_ids(model, n_seqs, seq_len, g)
    start = torch.full((n_seqs, 1), model.start_token_id, dtype=torch.long)
    return torch.cat([start, seq.repeat(1, n_repeats)], dim=1)
