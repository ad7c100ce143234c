"""Post-hoc attention steering (PASTA; Zhang et al. 2023, "Tell your model where to attend").

For chosen heads, every query's attention to the prompt's keys *outside* the emphasised spans is scaled by
``alpha`` (paper: 0.01) and each row renormalised; equivalently ``log(alpha)`` is added to those keys'
pre-softmax scores. Keys after the prompt (generated tokens) are left alone, as in the paper's code.

- :func:`emphasis`: prompts with ``**marked**`` spans (or character ranges) -> tokens, attention mask and
  the emphasised key positions, markers removed, left-padded like every headlens batch.
- :class:`Steer`: the intervention (a :class:`~headlens.methods.interventions.PatternIntervention`), usable
  wherever interventions are: the batched sweeps (:func:`~headlens.methods.run_variants`, one variant per
  head: profiling) and :func:`steer` (any forward pass through the bridge, generation included).
- :func:`steer`: a context manager, ``with hl.steer(model, heads, spans): model.generate(...)``: every
  forward pass inside it is steered, through the bridge (the pattern hooks, :class:`Steer`) and on the
  native path of :func:`~headlens.methods.generation.greedy_generate` (an additive ``log(alpha)`` bias in
  the attention function, SDPA kept; :class:`~headlens.methods.generation.Steering`), KV-cached
  decoding included.
- :func:`steer_generate`: prompts with markup -> the unsteered and the steered greedy continuations
  (one batch; the ``headlens steer`` command).
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..errors import HeadlensError
from ..models import HeadModel, left_pad
from . import generation
from .interventions import PatternIntervention, ablate, head_masks

__all__ = ["Emphasis", "emphasis", "Steer", "steer", "steer_scale", "strip_markers", "parse_heads", "MARKER",
           "SteeredText", "steer_generate"]

MARKER = "**"


@dataclass
class Emphasis:
    """Prompts with emphasised spans, tokenised: ``tokens`` and ``attention_mask`` ``[batch, pos]``
    (left-padded, the model's start token first), ``mask`` ``[batch, pos]`` (True on emphasised tokens),
    ``texts`` (what the model sees: markers removed) and ``spans`` (character ranges in those texts)."""
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    texts: list[str]
    spans: list[list[tuple[int, int]]]


def strip_markers(text: str, marker: str = MARKER) -> tuple[str, list[tuple[int, int]]]:
    """``"a **b** c"`` -> ``("a b c", [(2, 3)])``: the text without markers and the character ranges the
    markers enclosed (in the stripped text). An unpaired marker is an error.

    >>> strip_markers("Answer in JSON. **Use the key name.** Thanks")
    ('Answer in JSON. Use the key name. Thanks', [(16, 33)])
    """
    parts = text.split(marker)
    if len(parts) % 2 == 0:
        raise HeadlensError(f"unpaired emphasis marker {marker!r} in prompt: {text[:60]!r}")
    out, spans, n = [], [], 0
    for i, part in enumerate(parts):
        if i % 2 and part:
            spans.append((n, n + len(part)))
        out.append(part)
        n += len(part)
    return "".join(out), spans


def _token_mask(model: HeadModel, text: str, spans: Sequence[tuple[int, int]],
                start_token: bool = True) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` after the start token (:meth:`HeadModel.encode`; none without
    ``start_token``) and, per token, whether its characters overlap an emphasised span (the tokenizer's
    offsets)."""
    tok = model.tokenizer
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError) as exc:
        raise HeadlensError(f"emphasis needs a fast tokenizer with offsets ({type(tok).__name__}: {exc})") from None
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    for a, b in spans:
        if not 0 <= a < b <= len(text):
            raise HeadlensError(f"emphasised span {(a, b)} is outside the prompt's {len(text)} characters")
    flags = [any(s < b and a < e for a, b in spans) for s, e in offsets]
    start = [] if model.start_token_id is None or not start_token else [int(model.start_token_id)]
    return start + ids, [False] * len(start) + flags


def _chat(model: HeadModel, text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
    """``text`` as the user turn of the chat template (with the generation prompt) and its spans moved
    to where the text sits in the rendered prompt."""
    rendered = model.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)
    at = rendered.rfind(text)
    if at < 0:
        raise HeadlensError("the chat template changes the prompt's text: emphasise it without --chat")
    return rendered, [(a + at, b + at) for a, b in spans]


def emphasis(model: HeadModel, prompts: str | Sequence[str],
             spans: Sequence[Sequence[tuple[int, int]]] | None = None, marker: str = MARKER,
             chat: bool = False) -> Emphasis:
    """Tokenise ``prompts`` and find their emphasised tokens: from ``**...**`` markup (removed from the
    text the model sees; several spans per prompt), or from ``spans``, character ranges per prompt
    (then the text is used as it is). A token is emphasised if any of its characters is. With ``chat``
    (and a model with a chat template) each prompt is the user turn of the chat template, as
    :func:`~headlens.methods.generation.encode_prompt` renders it; ``texts`` are then the rendered prompts.

    >>> e = emphasis(model, ["The capital is Rome. **The capital is Paris.** Q: capital? A:"])  # doctest: +SKIP
    >>> e.mask.sum().item()            # the emphasised sentence's tokens                  # doctest: +SKIP
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise HeadlensError("emphasis needs at least one prompt")
    if spans is None:
        stripped = [strip_markers(t, marker) for t in texts]
        texts, spans = [t for t, _ in stripped], [s for _, s in stripped]
    elif len(spans) != len(texts):
        raise HeadlensError(f"{len(spans)} span lists for {len(texts)} prompts")
    spans = [[(int(a), int(b)) for a, b in s] for s in spans]
    for t, s in zip(texts, spans):
        for a, b in s:
            if not 0 <= a < b <= len(t):
                raise HeadlensError(f"emphasised span {(a, b)} is outside the prompt's {len(t)} characters")
    templated = generation.uses_chat(model, chat)
    if templated:
        rendered = [_chat(model, t, s) for t, s in zip(texts, spans)]
        texts, spans = [t for t, _ in rendered], [s for _, s in rendered]
    rows = [_token_mask(model, t, s, start_token=not templated) for t, s in zip(texts, spans)]
    tokens, attention_mask = left_pad([ids for ids, _ in rows], model.pad_id())
    flags, _ = left_pad([[int(f) for f in fl] for _, fl in rows], 0)
    for t in tokens:
        model.check_length(len(t))
    dev = model.device
    return Emphasis(tokens.to(dev), attention_mask.to(dev), flags.bool().to(dev), texts, spans)


def steer_scale(emphasised: Bool[Tensor, "batch pos"], n_key: int, alpha: float,
                attention_mask: Tensor | None = None) -> Tensor:
    """``[batch, n_key]`` multipliers of the attention to each key column: ``alpha`` on the prompt's keys
    outside the emphasised positions, 1 on emphasised keys and on keys after the prompt (generated tokens).
    A row with no emphasised token is left unsteered (all ones). Padding keys get weight 0 anyway."""
    b, p = emphasised.shape
    scale = torch.ones(b, n_key, device=emphasised.device)
    n = min(p, n_key)
    row_steered = emphasised.any(1, keepdim=True)
    inside = emphasised[:, :n] | ~row_steered
    scale[:, :n] = torch.where(inside, 1.0, float(alpha))
    return scale


class Steer(PatternIntervention):
    """PASTA steering of the selected heads: their attention to the prompt's keys outside ``emphasised``
    (``[batch, pos]``, True on emphasised tokens, e.g. :attr:`Emphasis.mask`) scaled by ``alpha`` and each
    query's row renormalised, which equals adding ``log(alpha)`` to those keys' scores before the softmax.
    Keys after the prompt's ``pos`` columns (generated tokens) are not scaled."""
    name = "steer"
    offset_aware = True      # it scales keys, all of them present whichever queries run

    def __init__(self, emphasised: Bool[Tensor, "batch pos"] | None = None, alpha: float = 0.01):
        if emphasised is None:
            raise HeadlensError("Steer needs the emphasised positions: Steer(emphasis(model, prompts).mask)")
        if not 0 < alpha <= 1:
            raise HeadlensError(f"steering alpha must be in (0, 1], not {alpha}")
        self.emphasised = torch.as_tensor(emphasised).bool()
        self.alpha = float(alpha)

    @property
    def log_alpha(self) -> float:
        return math.log(self.alpha)

    def forward(self, pattern, site):
        emph = site.rows(self.emphasised.to(pattern.device))
        if emph.shape[0] != pattern.shape[0]:
            raise HeadlensError(f"Steer: the emphasis has {emph.shape[0]} rows, the run {pattern.shape[0]}")
        scale = steer_scale(emph, pattern.shape[-1], self.alpha).to(pattern.dtype)
        new = pattern * scale[:, None, None, :]
        return new / new.sum(-1, keepdim=True).clamp_min(torch.finfo(new.dtype).tiny)

    def key(self):
        return ("steer", self.alpha, self.emphasised)


@contextlib.contextmanager
def steer(model: HeadModel, heads: Sequence[tuple[int, int]], emphasised: Bool[Tensor, "batch pos"] | Emphasis,
          alpha: float = 0.01, attention_mask: Int[Tensor, "batch pos"] | None = None):
    """Steer ``heads`` (query heads) towards the emphasised positions in every forward pass of ``model``
    inside the block: through the bridge (:class:`Steer` on the pattern hooks: ``model(...)``,
    ``model.generate``) and on the native path (an additive bias in SDPA and in every decoding row:
    :func:`~headlens.methods.generation.greedy_generate`), KV-cached generation included. Generated
    tokens are never down-weighted. ``emphasised``: an :class:`Emphasis`, or a bool ``[batch, pos]`` mask
    with its ``attention_mask`` (left padding; None: no padding). The forward passes must run the
    emphasised prompts (generated tokens after them)::

        e = hl.emphasis(model, "Answer in JSON. ... **Use the key 'name'.**")
        with hl.steer(model, [(12, 3), (14, 0)], e, alpha=0.01):
            logits = model(e.tokens, attention_mask=e.attention_mask)
            text = model.generate(e.tokens, max_new_tokens=20)
    """
    if isinstance(emphasised, Emphasis):
        attention_mask = emphasised.attention_mask if attention_mask is None else attention_mask
        emphasised = emphasised.mask
    intervention = Steer(emphasised, alpha)
    masks = head_masks(model, [tuple(h) for h in heads])
    generation.uses_native(model)      # checked (once per model) before anything is steered
    spec = _native_steering(model, masks, intervention, attention_mask)
    with generation.steering(spec), ablate(model, heads, intervention, attention_mask=attention_mask):
        yield


def _native_steering(model: HeadModel, masks: dict[int, Tensor], intervention: Steer,
                     attention_mask: Tensor | None) -> "generation.Steering":
    """The native path's description of a steering: the emphasis in each row's own positions."""
    emph = intervention.emphasised.cpu()
    real = torch.ones_like(emph) if attention_mask is None else torch.as_tensor(attention_mask).cpu().bool()
    if real.shape != emph.shape:
        raise HeadlensError(f"steer: the attention mask is {tuple(real.shape)}, the emphasis {tuple(emph.shape)}")
    lengths = real.sum(1)
    # each row's real positions first (a stable sort puts padding, False, last)
    order = torch.sort((~real).long(), dim=1, stable=True).indices
    own = emph.gather(1, order) & (torch.arange(emph.shape[1])[None, :] < lengths[:, None])
    return generation.Steering(hf=model.bridge.original_model,
                               heads={l: m.reshape(-1) for l, m in masks.items()},
                               emphasised=own, lengths=lengths, log_alpha=intervention.log_alpha)


def parse_heads(spec: str) -> list[tuple[int, int]]:
    """``"L12H3,L14H0"`` or ``"12.3,14.0"`` -> ``[(12, 3), (14, 0)]``."""
    heads = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"L?(\d+)[H.](\d+)", part, flags=re.IGNORECASE)
        if not m:
            raise HeadlensError(f"cannot read head {part!r}: write L12H3 or 12.3")
        heads.append((int(m.group(1)), int(m.group(2))))
    return heads


@dataclass
class SteeredText:
    """What :func:`steer_generate` returns: the prompts as the model saw them (markers removed, chat
    template applied), each one's unsteered and steered greedy continuation, and the emphasis."""
    texts: list[str]
    unsteered: list[str]
    steered: list[str]
    emphasis: Emphasis


def steer_generate(model: HeadModel, prompts: str | Sequence[str], heads: Sequence[tuple[int, int]],
                   alpha: float = 0.01, max_new_tokens: int = 32, chat: bool = False, marker: str = MARKER,
                   stop: bool = True) -> SteeredText:
    """Greedy continuations of ``prompts`` (with ``**emphasis**`` markup; every prompt needs at least one
    span) without and with ``heads`` steered to the emphasised tokens, in one batch of twice the prompts
    (the unsteered rows carry no emphasis, which leaves them alone). ``chat``: the prompts go through the
    chat template as the user turn; ``stop``: a row ends at EOS / end of turn.

    >>> out = steer_generate(model, "Reply in French. **Answer in one word.** What is water?",
    ...                      [(12, 3), (14, 0)], chat=True)                          # doctest: +SKIP
    >>> out.unsteered[0], out.steered[0]                                              # doctest: +SKIP
    """
    e = emphasis(model, prompts, marker=marker, chat=chat)
    missing = [i for i, row in enumerate(e.mask) if not bool(row.any())]
    if missing:
        raise HeadlensError(f"prompt {missing[0]} has no emphasised span: mark one as {marker}like this{marker}")
    rows = [t[m.bool()].tolist() for t, m in zip(e.tokens.cpu(), e.attention_mask.cpu())]
    mask = torch.cat([torch.zeros_like(e.mask), e.mask])             # first the unsteered rows
    attention = torch.cat([e.attention_mask, e.attention_mask])
    stops = generation.stop_token_ids(model) if stop else ()
    with steer(model, heads, mask, alpha, attention_mask=attention):
        g = generation.greedy_generate(model, rows + rows, max_new_tokens, stop_ids=stops)
    text = [model.tokenizer.decode(t, skip_special_tokens=True) for t in g.tokens]
    n = len(rows)
    return SteeredText(e.texts, text[:n], text[n:], e)
