"""Prompt material that several roles use: random tokens from a model's vocabulary, and chunks of a text
corpus."""
from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from ..data import file_or_data
from ..errors import HeadlensError
from ..models import HeadModel

__all__ = ["random_token_ids", "repeated_tokens", "text_chunks"]


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


def text_chunks(model: HeadModel, corpus: str, seq_len: int, n_seqs: int,
                what: str = "text chunk") -> Int[Tensor, "n pos"]:
    """``[m, 1 + seq_len]`` (``m <= n_seqs``, as many as the corpus holds): the model's start token, then
    consecutive ``seq_len``-token chunks of ``corpus`` (a file in ``data/`` or a path). A model without a
    start token gets ``1 + seq_len`` text tokens per row instead. ``what`` names the prompt in the error
    when a row does not fit the model's context."""
    path = file_or_data(corpus)
    model.check_length(seq_len + 1, f"{what} (1 + seq_len)")
    ids = model.tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
    start = model.start_token_id
    width = seq_len if start is not None else seq_len + 1
    n = min(n_seqs, len(ids) // width)
    if n < 1:
        raise HeadlensError(f"corpus {corpus} has {len(ids)} tokens, fewer than seq_len={seq_len}"
                            + ("" if start is not None else " + 1 (the model has no start token)"))
    chunks = torch.tensor(ids[:n * width], dtype=torch.long).view(n, width)
    if start is None:
        return chunks
    return torch.cat([torch.full((n, 1), int(start), dtype=torch.long), chunks], 1)
