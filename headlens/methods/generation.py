"""Greedy decoding through the bridge with the KV cache, optional per-row head ablation, and the
top-1 attended position of every head at every generated token.

The prompt is prefilled once; each later step feeds one token with the HF cache
(``return_type='logits_and_cache'``), so attention hooks see a single query row per step and the
context is never re-run. Prompts of different lengths are left-padded with an attention mask; ablation
by uniform attention respects it (padding gets no weight). Positions returned are in the unpadded
prompt's coordinates.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..errors import HeadlensError
from .ablation import Head, pattern_name, uniform_pattern


@contextlib.contextmanager
def kv_cache_fix(model):
    """Make the bridge's attention components extend the HF cache during decoding.

    TransformerLens 4.3 attention bridges look for the cache under ``past_key_values`` while
    transformers 5.x passes it as ``cache``; without this, every decoding step would attend to itself
    alone. The mapping is installed on the model's attention components for the block only.
    """
    mods = [m for m in model.bridge.modules() if hasattr(type(m), "_update_kv_cache")]
    for m in mods:
        def update(k, v, _orig=m._update_kv_cache, **kwargs):
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return _orig(k, v, **kwargs)
        m._update_kv_cache = update
    try:
        with warnings.catch_warnings():
            # The bridge passes ``past_key_values``, which transformers 5.x flags on every step.
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            yield
    finally:
        for m in mods:
            m.__dict__.pop("_update_kv_cache", None)


@dataclass
class Generation:
    tokens: list[list[int]]           # generated ids per row (up to and without the stop token)
    top1: torch.Tensor | None         # [steps, n_layers, batch, n_heads] top-1 key position (unpadded), -1 = none
    prompt_lengths: list[int]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``tokens`` and ``attention_mask`` (both ``[batch, max_len]``)."""
    n = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, n - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, n - len(p):] = 1
    return tokens, mask


def row_masks(model, ablate: Sequence[Iterable[Head]], batch: int) -> dict[int, torch.Tensor]:
    """Per touched layer, a bool ``[batch, n_heads]`` mask of the heads each row ablates."""
    if len(ablate) != batch:
        raise HeadlensError(f"ablate has {len(ablate)} rows for {batch} prompts")
    masks: dict[int, torch.Tensor] = {}
    for row, heads in enumerate(ablate):
        for layer, head in heads:
            if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
                raise HeadlensError(f"no head L{layer}H{head} in {model.info.name}")
            masks.setdefault(layer, torch.zeros(batch, model.n_heads, dtype=torch.bool))[row, head] = True
    return masks


def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    ablate: Sequence[Iterable[Head]] | None = None, record_top1: bool = False,
                    stop_ids: Iterable[int] = ()) -> Generation:
    """Greedy-decode every prompt (a token list, BOS included) for up to ``max_new_tokens``.

    ``ablate[i]`` lists the heads whose attention is made uniform in row ``i`` (prefill and every
    decoding step). With ``record_top1`` the top-1 key position of every head's last query row is kept
    at each step (the step that produced generated token ``t``), for copy-paste scores.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise HeadlensError("greedy_generate needs non-empty prompts")
    lengths = [len(p) for p in prompts]
    model.check_length(max(lengths) + max_new_tokens, "prompt plus generated tokens")
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    tokens, mask = left_pad(prompts, pad)
    tokens, mask = tokens.to(model.device), mask.to(model.device)
    batch, n_pad = tokens.shape[0], tokens.shape[1] - torch.tensor(lengths)
    masks = row_masks(model, ablate, batch) if ablate is not None else {}
    state = {"mask": mask}
    rows: dict[int, torch.Tensor] = {}

    def hook(pattern, hook):
        layer = int(hook.name.split(".")[1])
        if layer in masks:
            key_mask = state["mask"][:, -pattern.shape[-1]:]
            uni = uniform_pattern(pattern.shape[-2], pattern.shape[-1], key_mask, pattern.device,
                                  pattern.dtype)
            sel = masks[layer].to(pattern.device)[:, :, None, None]
            pattern = torch.where(sel, uni, pattern)
        if record_top1:
            rows[layer] = pattern[:, :, -1].argmax(-1)                      # [batch, n_heads]
        return pattern

    layers = set(masks) | (set(range(model.n_layers)) if record_top1 else set())
    hooks = [(pattern_name(l), hook) for l in sorted(layers)]
    stops = set(int(s) for s in stop_ids)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    top1 = []
    bridge = model.bridge
    with torch.no_grad(), kv_cache_fix(model), bridge.hooks(fwd_hooks=hooks):
        logits, cache = bridge(tokens, attention_mask=mask, return_type="logits_and_cache",
                               use_cache=True)
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            if record_top1:
                pos = torch.stack([rows[l] for l in range(model.n_layers)]).cpu() - n_pad[None, :, None]
                top1.append(torch.where(done[None, :, None], -1, pos))
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t in stops:
                        done[i] = True
                    else:
                        out[i].append(t)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            state["mask"] = torch.cat([state["mask"], torch.ones_like(mask[:, :1])], 1)
            logits, cache = bridge(nxt[:, None], attention_mask=state["mask"], past_key_values=cache,
                                   return_type="logits_and_cache")
    return Generation(tokens=out, top1=torch.stack(top1) if record_top1 else None,
                      prompt_lengths=lengths)


def uses_chat(model, chat: bool = True) -> bool:
    """Whether prompts go through the chat template: asked for and the model has one."""
    return bool(chat and model.info.has_chat_template)


def encode_prompt(model, user_text: str, chat: bool = True, marker: str | None = None) -> list[list[int]]:
    """Token ids of a one-turn prompt: ``user_text`` through the chat template (with the generation
    prompt) when :func:`uses_chat`, else the plain text after BOS.

    With ``marker`` (a string inside ``user_text``) the rendered prompt is split there and the pieces
    are tokenised separately, so a caller can put its own token ids (a long context) in between.
    """
    tok = model.tokenizer
    if uses_chat(model, chat):
        text = tok.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                       add_generation_prompt=True)
        bos = []
    else:
        text = user_text
        bos = [model.bos_token_id] if model.bos_token_id is not None else []
    parts = text.split(marker) if marker else [text]
    if marker and len(parts) != 2:
        raise HeadlensError(f"prompt template must contain the marker {marker!r} exactly once")
    ids = [tok(p, add_special_tokens=False)["input_ids"] if p else [] for p in parts]
    ids[0] = bos + ids[0]
    return ids


def stop_token_ids(model) -> set[int]:
    """Token ids that end a generation: EOS and, for chat models, the end-of-turn token."""
    tok = model.tokenizer
    stops = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        i = tok.convert_tokens_to_ids(name) if name in tok.get_vocab() else None
        if i is not None:
            stops.add(i)
    return stops
