"""Greedy decoding with the KV cache, optional per-row head ablation, and the top-1 attended position
of every head at every generated token, without materialising attention patterns.

The bridge processes the weights in place (LayerNorm folding and friends) inside the model's own
transformers modules, so the forward pass here runs those modules directly (the bridge's wrappers are
taken out of the module tree for the duration, :func:`native_forward`) with one attention function of
ours, registered with transformers as ``"headlens"``:

- a prompt is prefilled with PyTorch's memory-efficient attention (SDPA); only the last query row of each
  head (the row that predicts the next token) is computed explicitly, from the cached keys after the
  rotary embedding, per query head (grouped-query attention needs nothing special);
- each decoding step computes that one row explicitly;
- a head ablated by uniform attention ("undifferentiated attention") outputs the mean of the values over
  its causal prefix: during prefill a running mean (cumulative sum / count, padding left out), at a
  decoding step the mean of the cached values.

Prompts of different lengths are left-padded; positions are counted over real tokens, so every row is
computed as if it were alone. Runs that share a prefix (the same long context up to a needle, the chat
header) can prefill it once (:func:`prefill`) and start from a copy of its KV cache (``prefix=``).
Positions returned are in each prompt's own coordinates. ``tests/test_retrieval.py`` checks all of this
against the bridge's eager attention with full patterns.

Whether the transformers modules compute the bridge's function is checked once per model
(:func:`uses_native`); where they do not (GPT-2: its bridge keeps the split, processed QKV weights to
itself) decoding goes through the bridge with eager attention and pattern hooks, as before (no prefix
reuse there).
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import HeadlensError
from .ablation import Head, pattern_name, uniform_pattern

PREFILL_CHUNK = 8192   # default tokens prefilled per forward pass: longer prompts go in chunks (bounds activations)
_ACTIVE: contextvars.ContextVar["_State | None"] = contextvars.ContextVar("headlens_attention", default=None)
ATTN_NAME = "headlens"


@dataclass
class _State:
    """What the attention function needs for one forward pass."""
    key_mask: Bool[Tensor, "batch key"]                 # real tokens among all key columns (cache + new)
    ablate: dict[int, Bool[Tensor, "batch head"]] = field(default_factory=dict)
    record: bool = False
    top1: dict[int, Int[Tensor, "batch head"]] = field(default_factory=dict)   # key column, per layer


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """``[batch, kv_heads, pos, d]`` -> ``[batch, kv_heads * groups, pos, d]`` (query-head order)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _mask_scores(scores: Tensor, attention_mask: Tensor | None) -> Tensor:
    if attention_mask is None:
        return scores
    m = attention_mask[..., -scores.shape[-2]:, -scores.shape[-1]:]
    if m.dtype == torch.bool:
        return scores.masked_fill(~m, float("-inf"))
    return scores + m


def _last_row(query, key, attention_mask, scaling, softcap) -> Tensor:
    """Attention weights of the last query row: ``[batch, n_heads, 1, key]`` in the query's dtype."""
    k = _repeat_kv(key, query.shape[1] // key.shape[1])
    scores = torch.matmul(query[:, :, -1:], k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = _mask_scores(scores, None if attention_mask is None else attention_mask[..., -1:, :])
    return torch.softmax(scores.float(), dim=-1).to(query.dtype)


def _attention(module, query: Float[Tensor, "batch head q d"], key: Float[Tensor, "batch kv k d"],
               value: Float[Tensor, "batch kv k d"], attention_mask: Tensor | None, scaling: float | None = None,
               dropout: float = 0.0, **kwargs) -> tuple[Float[Tensor, "batch q head d"], None]:
    """transformers attention function: SDPA for a prompt, one explicit row per decoding step; the top-1
    key of the last row recorded and uniform-attention ablation applied where the active state asks.
    Returns the heads' outputs ``[batch, q, head, d_head]`` (no weights)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    softcap = kwargs.get("softcap")
    groups = query.shape[1] // key.shape[1]
    q_len = query.shape[2]
    weights = None
    if kwargs.get("s_aux") is not None or (softcap is not None and q_len > 1):
        # attention sinks, or softcapping in a prompt: the architecture's own eager attention
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        weights = weights[:, :, -1:]
    elif q_len == 1:
        weights = _last_row(query, key, attention_mask, scaling, softcap)
        out = torch.matmul(weights, _repeat_kv(value, groups)).transpose(1, 2).contiguous()
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, **kwargs)
    st = _ACTIVE.get()
    if st is None:
        return out, None
    layer = int(module.layer_idx)
    if st.record:
        if weights is None:
            weights = _last_row(query, key, attention_mask, scaling, softcap)
        top = weights[:, :, -1].argmax(-1)
        if layer in st.ablate:      # uniform attention: its first key, as argmax of a uniform row gives
            first = st.key_mask[:, -key.shape[2]:].long().argmax(-1)
            top = torch.where(st.ablate[layer], first[:, None], top)
        st.top1[layer] = top
    if layer in st.ablate:
        out = _uniform(out, value, st.key_mask, st.ablate[layer], q_len, groups)
    return out, None


def _uniform(out: Float[Tensor, "batch q head d"], value: Float[Tensor, "batch kv k d"],
                     key_mask: Bool[Tensor, "batch k"], ablate: Bool[Tensor, "batch head"], q_len: int,
                     groups: int) -> Float[Tensor, "batch q head d"]:
    """Put the mean of the values over each query's causal prefix (real tokens only; a running mean over
    a prompt) in place of the output of the ablated heads: uniform attention without a pattern."""
    m = key_mask[:, None, -value.shape[2]:, None].to(torch.float32)
    total = torch.cumsum(value.float() * m, dim=2)[:, :, -q_len:]
    count = torch.cumsum(m, dim=2)[:, :, -q_len:].clamp_min(1)
    mean = _repeat_kv((total / count).to(out.dtype), groups).transpose(1, 2)       # [batch, q, head, d]
    return torch.where(ablate[:, None, :, None].to(out.device), mean, out)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, _attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


@contextlib.contextmanager
def native_forward(model):
    """Run the model's transformers modules directly with the ``headlens`` attention function.

    The bridge's wrappers are swapped out of the transformers module tree for the block and put back
    afterwards; the weights are the same tensors (processed by the bridge), so the function is the
    bridge's (tested: same tokens, same top-1 positions as the bridge's eager attention). Bridge hooks
    do not fire inside the block.
    """
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    _register()
    hf = model.bridge.original_model
    swaps = []

    def unwrap(module):
        for name, child in list(module._modules.items()):
            if isinstance(child, GeneralizedComponent) and child.original_component is not None:
                swaps.append((module, name, child))
                module._modules[name] = child.original_component
                unwrap(child.original_component)
            elif child is not None and not isinstance(child, GeneralizedComponent):
                unwrap(child)

    configs = [c for c in {id(m.config): m.config for m in hf.modules() if hasattr(m, "config")
                           and hasattr(m.config, "_attn_implementation")}.values()]
    old = [c._attn_implementation for c in configs]
    try:
        unwrap(hf)
        for c in configs:
            c._attn_implementation = ATTN_NAME
        with torch.no_grad(), warnings.catch_warnings():
            # transformers 5.x renames ``past_key_values`` to ``cache`` and flags the old name on every call
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            yield hf
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o
        for module, name, child in reversed(swaps):
            module._modules[name] = child


@dataclass
class Generation:
    tokens: list[list[int]]           # generated ids per row (up to and without the stop token)
    top1: torch.Tensor | None         # [steps, n_layers, batch, n_heads] top-1 key position (unpadded), -1 = none
    prompt_lengths: list[int]


@dataclass
class Prefix:
    """A prefilled token sequence: its KV cache for runs that start with it (:func:`prefill`), one row per
    set of heads ablated (uniform attention) while it was prefilled."""
    tokens: list[int]
    keys: list[Tensor]                # per layer [rows, kv_heads, len(tokens), d_head]
    values: list[Tensor]
    variants: tuple[frozenset, ...] = (frozenset(),)   # the heads ablated in each row

    @property
    def heads(self) -> frozenset:
        """The heads ablated in its first (usually only) row."""
        return self.variants[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def rows_for(self, ablate: Sequence[Iterable[Head]]) -> list[int]:
        """The row whose ablated heads each of ``ablate`` matches (an error if one matches none)."""
        where = {v: i for i, v in enumerate(self.variants)}
        try:
            return [where[frozenset(tuple(h) for h in heads)] for heads in ablate]
        except KeyError:
            raise HeadlensError("a prefix is reused only by rows that ablate the same heads as one of "
                                "its rows did while it was prefilled") from None


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


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes in one row (all layers, keys and values)."""
    i = model.info
    itemsize = torch.empty(0, dtype=getattr(torch, i.dtype)).element_size()
    return 2 * i.n_layers * i.n_kv_heads * i.d_head * itemsize


def _cache(hf, keys: list[Tensor] | None = None, values: list[Tensor] | None = None):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=hf.config)
    for layer, (k, v) in enumerate(zip(keys or [], values or [])):
        cache.update(k[:, :, :0], v[:, :, :0], layer)       # initialise the layer (dtype, device)
        held = cache.layers[layer]
        if type(held) is DynamicLayer:   # hold k, v themselves: no copy (decoding concatenates to new tensors)
            held.keys, held.values = k, v
        else:
            cache.update(k, v, layer)
    return cache


def _cache_tensors(cache) -> tuple[list[Tensor], list[Tensor]]:
    return [l.keys for l in cache.layers], [l.values for l in cache.layers]


def _forward(hf, state: _State, tokens: Tensor, cache) -> Tensor:
    """One forward pass of new ``tokens`` ``[batch, n]`` after ``cache``; next-token logits ``[batch, vocab]``."""
    mask = state.key_mask
    positions = (mask.long().cumsum(1) - 1).clamp_min(0)[:, -tokens.shape[1]:]
    token = _ACTIVE.set(state)
    try:
        out = hf(input_ids=tokens, attention_mask=mask.long(), position_ids=positions, past_key_values=cache,
                 use_cache=True, logits_to_keep=1)
    finally:
        _ACTIVE.reset(token)
    return out.logits[:, -1]


def prefill(model, tokens: Sequence[int], ablate: Iterable[Head] = (),
            variants: Sequence[Iterable[Head]] | None = None) -> Prefix:
    """Prefill ``tokens`` once and keep the KV cache for runs that start with them: one row with
    ``ablate``'s heads made uniform, or with ``variants`` one row per set of heads (batched).

    >>> shared = prefill(model, haystack, variants=[[], [(17, 3)]])      # doctest: +SKIP
    >>> greedy_generate(model, [haystack + q1, haystack + q2], 32, ablate=[[(17, 3)], []],
    ...                 prefix=shared)                                 # doctest: +SKIP
    """
    tokens = list(tokens)
    if not tokens:
        raise HeadlensError("prefill needs a non-empty token list")
    model.check_length(len(tokens), "prefix")
    rows = [ablate] if variants is None else list(variants)
    heads = tuple(frozenset(tuple(h) for h in v) for v in rows)
    if not uses_native(model):          # decoded through the bridge, which does not reuse a prefix
        return Prefix(tokens, [], [], heads)
    with native_forward(model) as hf:
        x = torch.tensor([tokens], device=model.device).expand(len(rows), -1)
        state = _State(key_mask=torch.ones_like(x, dtype=torch.bool), ablate=row_masks(model, heads, len(rows)))
        state.ablate = {l: m.to(model.device) for l, m in state.ablate.items()}
        cache = _cache(hf)
        _forward(hf, state, x, cache)
    keys, values = _cache_tensors(cache)
    return Prefix(tokens, keys, values, heads)


def shared_length(prompt: Sequence[int], prefix: Sequence[int]) -> int:
    """Length of the common start of ``prompt`` and ``prefix``, leaving at least one prompt token."""
    n = min(len(prompt) - 1, len(prefix))
    a = torch.as_tensor(list(prompt[:n])) != torch.as_tensor(list(prefix[:n]))
    return int(a.nonzero()[0]) if bool(a.any()) else n


def uses_native(model) -> bool:
    """Whether the model's transformers modules compute the bridge's function (checked once per model on a
    few tokens: next-token log-probabilities agree to 1e-4). True for Llama-like models, whose bridge
    keeps the processed weights in those modules; GPT-2's bridge keeps its split QKV weights to itself, so
    it decodes through the bridge with eager attention instead (full patterns)."""
    if "_headlens_native" not in model.__dict__:
        x = torch.arange(1, 9, device=model.device)[None] % model.bridge.cfg.d_vocab
        with torch.no_grad():
            ref = torch.log_softmax(model.bridge(x)[:, -1].float(), -1)
            with native_forward(model) as hf:
                state = _State(key_mask=torch.ones_like(x, dtype=torch.bool))
                got = torch.log_softmax(_forward(hf, state, x, _cache(hf)).float(), -1)
        tol = 1e-4 if ref.dtype == torch.float32 and model.info.dtype == "float32" else 5e-2
        model.__dict__["_headlens_native"] = bool((got - ref).abs().max() <= tol * max(1.0, ref.abs().max()))
    return model.__dict__["_headlens_native"]


def _decode(logits: Tensor, advance, positions, max_new_tokens: int, stops: set[int], batch: int,
            record_top1: bool) -> tuple[list[list[int]], Tensor | None]:
    """The greedy loop: ``advance(next_ids) -> logits``; ``positions() -> [layers, batch, heads]``."""
    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    top1 = []
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)
        if record_top1:
            top1.append(torch.where(done[None, :, None], -1, positions().cpu()))
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                if t in stops:
                    done[i] = True
                else:
                    out[i].append(t)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = advance(nxt)
    return out, (torch.stack(top1) if record_top1 else None)


def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    ablate: Sequence[Iterable[Head]] | None = None, record_top1: bool = False,
                    stop_ids: Iterable[int] = (), prefix: Prefix | None = None,
                    chunk_tokens: int | None = None) -> Generation:
    """Greedy-decode every prompt (a token list, BOS included) for up to ``max_new_tokens``.

    ``ablate[i]`` lists the heads whose attention is made uniform in row ``i`` (prefill and every
    decoding step). With ``record_top1`` the top-1 key position of every head's last query row is kept
    at each step (the step that produced generated token ``t``), for copy-paste scores. With ``prefix``
    (from :func:`prefill`), each row starts from the KV cache of the prefix's row that ablated the same
    heads, for the tokens it shares with it. With no ``stop_ids`` every row decodes
    ``max_new_tokens`` tokens. ``chunk_tokens`` prefills the prompts that many tokens at a time (0: at
    once; default :data:`PREFILL_CHUNK`), which bounds the activations' memory: a 32k-token prompt of an
    8B model peaks at 1.41x its weights in 8192-token chunks, 1.56x at once (``docs/scale.md``).

    Returns a :class:`Generation`: generated ids per row, and ``top1`` ``[steps, n_layers, batch,
    n_heads]`` (positions in each prompt, -1 after a row stopped) when recorded.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise HeadlensError("greedy_generate needs non-empty prompts")
    lengths = [len(p) for p in prompts]
    batch = len(prompts)
    model.check_length(max(lengths) + max_new_tokens, "prompt plus generated tokens")
    masks = row_masks(model, ablate, batch) if ablate is not None else {}
    prefix_rows = prefix.rows_for(ablate if ablate is not None else [[]] * batch) if prefix is not None else []
    stops = set(int(s) for s in stop_ids)
    masks = {l: m.to(model.device) for l, m in masks.items()}
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    if not uses_native(model):
        tokens, out = _bridge_generate(model, prompts, max_new_tokens, masks, record_top1, stops, pad)
        return Generation(tokens=tokens, top1=out, prompt_lengths=lengths)
    shared = [shared_length(p, prefix.tokens) for p in prompts] if prefix is not None else [0] * batch
    n_cached = max(shared)
    tokens, new_mask = left_pad([p[s:] for p, s in zip(prompts, shared)], pad)
    cached_mask = torch.arange(n_cached)[None, :] < torch.tensor(shared)[:, None]
    key_mask = torch.cat([cached_mask, new_mask.bool()], 1).to(model.device)
    with native_forward(model) as hf:
        if n_cached:
            if len(prefix.variants) == 1:    # one row for all: a view
                pick = lambda t: t[:, :, :n_cached].expand(batch, -1, -1, -1)
            elif prefix_rows == list(range(len(prefix.variants))):   # row i is prefix row i: a view
                pick = lambda t: t[:, :, :n_cached]
            else:                            # each row's own ablated prefix
                rows = torch.tensor(prefix_rows, device=prefix.keys[0].device)
                pick = lambda t: t[:, :, :n_cached].index_select(0, rows)
            cache = _cache(hf, [pick(k) for k in prefix.keys], [pick(v) for v in prefix.values])
        else:
            cache = _cache(hf)
        state = _State(key_mask=key_mask, ablate=masks, record=record_top1)
        tokens = tokens.to(model.device)
        size = (PREFILL_CHUNK if chunk_tokens is None else chunk_tokens) or tokens.shape[1]
        for start in range(0, tokens.shape[1], size):      # prompt in chunks: activations for `size` tokens
            end = min(start + size, tokens.shape[1])
            state.key_mask = key_mask[:, :n_cached + end]
            logits = _forward(hf, state, tokens[:, start:end], cache)

        def advance(nxt):
            state.key_mask = torch.cat([state.key_mask, torch.ones_like(state.key_mask[:, :1])], 1)
            state.top1 = {}
            return _forward(hf, state, nxt[:, None], cache)

        def positions():
            position = state.key_mask.long().cumsum(1) - 1                      # key column -> token position
            return torch.stack([position.gather(1, state.top1[l].to(position.device)) for l in range(model.n_layers)])

        out, top1 = _decode(logits, advance, positions, max_new_tokens, stops, batch, record_top1)
    return Generation(tokens=out, top1=top1, prompt_lengths=lengths)


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
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            yield
    finally:
        for m in mods:
            m.__dict__.pop("_update_kv_cache", None)


def _bridge_generate(model, prompts, max_new_tokens, masks, record_top1, stops, pad):
    """Decoding through the bridge with eager attention (full patterns): for models whose transformers
    modules do not hold the bridge's weights (:func:`uses_native`). A prefix is not reused here."""
    tokens, mask = left_pad(prompts, pad)
    tokens, mask = tokens.to(model.device), mask.to(model.device)
    n_pad = tokens.shape[1] - torch.tensor([len(p) for p in prompts])
    state = {"mask": mask}
    rows: dict[int, torch.Tensor] = {}

    def hook(pattern, hook):
        layer = int(hook.name.split(".")[1])
        if layer in masks:
            key_mask = state["mask"][:, -pattern.shape[-1]:]
            uni = uniform_pattern(pattern.shape[-2], pattern.shape[-1], key_mask, pattern.device, pattern.dtype)
            pattern = torch.where(masks[layer][:, :, None, None], uni, pattern)
        if record_top1:
            rows[layer] = pattern[:, :, -1].argmax(-1)                      # [batch, n_heads]
        return pattern

    layers = set(masks) | (set(range(model.n_layers)) if record_top1 else set())
    bridge = model.bridge
    with torch.no_grad(), kv_cache_fix(model), bridge.hooks(fwd_hooks=[(pattern_name(l), hook) for l in sorted(layers)]):
        logits, cache = bridge(tokens, attention_mask=mask, return_type="logits_and_cache", use_cache=True)

        def advance(nxt):
            nonlocal cache
            state["mask"] = torch.cat([state["mask"], torch.ones_like(mask[:, :1])], 1)
            step_logits, cache = bridge(nxt[:, None], attention_mask=state["mask"], past_key_values=cache,
                                        return_type="logits_and_cache")
            return step_logits[:, -1]

        def positions():
            return torch.stack([rows[l].cpu() for l in range(model.n_layers)]) - n_pad[None, :, None]

        return _decode(logits[:, -1], advance, positions, max_new_tokens, stops, len(prompts), record_top1)


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
