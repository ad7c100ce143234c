"""What the plots show of a model, computed here (plots take data): a prompt's tokens, the attention
patterns of chosen heads on it, and each head's direct logit attribution at a position.

>>> words, patterns = attention_on(model, "The cat sat. The cat", [(18, 6)])   # doctest: +SKIP
>>> patterns.shape                                                              # doctest: +SKIP
torch.Size([1, 7, 7])
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import HeadlensError
from ..models import HeadModel
from .attribution import direct_logit_attribution
from .hooks import check_head, pattern_name

__all__ = ["prompt_tokens", "token_id", "attention_on", "head_logit_attribution"]


def prompt_tokens(model: HeadModel, prompt) -> torch.Tensor:
    """``[1, n]`` token ids from a string (the model's start token prepended: :meth:`HeadModel.to_tokens`)
    or from a sequence/tensor of ids (used as they are)."""
    if isinstance(prompt, str):
        if not prompt:
            raise HeadlensError("the prompt is empty")
        tokens = model.to_tokens(prompt)
    else:
        tokens = torch.as_tensor(prompt, dtype=torch.long)
        tokens = tokens[None] if tokens.ndim == 1 else tokens
        if tokens.ndim != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0:
            raise HeadlensError("give one prompt: a string or a 1-D sequence of token ids")
    model.check_length(tokens.shape[1])
    return tokens.to(model.device)


def token_id(model: HeadModel, target) -> int:
    """The id of one token given as an id or as its text (often with its leading space, e.g. ``" Paris"``)."""
    if isinstance(target, (int, np.integer)):
        tid = int(target)
    else:
        ids = model.tokenizer.encode(str(target), add_special_tokens=False)
        if len(ids) != 1:
            raise HeadlensError(f"target {target!r} is {len(ids)} tokens; give a single token "
                                "(often with its leading space, e.g. ' Paris') or a token id")
        tid = ids[0]
    if not 0 <= tid < model.bridge.cfg.d_vocab:
        raise HeadlensError(f"token id {tid} is outside the vocabulary (0..{model.bridge.cfg.d_vocab - 1})")
    return tid


def attention_on(model: HeadModel, prompt, heads: Sequence[tuple[int, int]]
                 ) -> tuple[list[str], Float[Tensor, "head query key"]]:
    """The token strings of ``prompt`` and the attention patterns of ``heads`` on it (one forward pass):
    ``[len(heads), n, n]``."""
    heads = [tuple(map(int, h[:2])) for h in heads]
    if not heads:
        raise HeadlensError("give at least one head, e.g. heads=[(18, 6)]")
    for head in heads:
        check_head(model, head)
    tokens = prompt_tokens(model, prompt)
    names = {pattern_name(l) for l, _ in heads}
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    patterns = torch.stack([cache[pattern_name(l)][0, h] for l, h in heads])
    return [model.tokenizer.decode([int(t)]) for t in tokens[0]], patterns


def head_logit_attribution(model: HeadModel, prompt, target, against=None,
                           position: int = -1) -> Float[Tensor, "layer head"]:
    """``[n_layers, n_heads]`` direct logit attribution of each head at ``position`` of ``prompt``:
    its output (``hook_z @ W_O``) over the final norm's scale, projected on ``W_U[:, target]`` (minus
    ``W_U[:, against]`` when given: a logit difference), by :func:`direct_logit_attribution` (exact with
    the folded norm)."""
    tokens = prompt_tokens(model, prompt)
    if not -tokens.shape[1] <= position < tokens.shape[1]:
        raise HeadlensError(f"position {position} is outside the prompt ({tokens.shape[1]} tokens)")
    wrong = None if against is None else torch.tensor([token_id(model, against)])
    parts = direct_logit_attribution(model, tokens, torch.tensor([token_id(model, target)]), wrong)
    return parts.heads[:, :, 0, position].float().cpu()
