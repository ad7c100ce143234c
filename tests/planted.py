"""Tiny models with hand-set weights whose head roles are known (planted ground truth).

GPT-2 architecture (learned absolute positions make hand-set attention easy) and, at the end of the
file, Llama-style models (RMSNorm, rotary, grouped-query attention, gated MLP0; see LlamaSpace), saved to a folder
with a word-level tokenizer and loaded through the public ``headlens.load_model(path)`` route.

Residual layout for ``d_model = 4 * n_tok_dims`` (``plant_space``): the token one-hot lives in dims
``[0, V)``, the position one-hot in ``[V, V + P)``, and a free "previous token" subspace in
``[V + P, 2V + P)``; everything else is unused. MLPs are zero, LayerNorm gains are set so that
LN(x) is roughly x. Unembedding is tied to the token embedding, so writing e_t raises the logit of t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Space:
    vocab: int      # number of tokens (ids 0..vocab-1; id 0 is <bos>)
    n_pos: int      # number of positions
    d_model: int
    n_head: int

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def tok(self, t: int) -> int:
        return t

    def pos(self, p: int) -> int:
        return self.vocab + p

    def prev(self, t: int) -> int:
        return self.vocab + self.n_pos + t

    def free(self, i: int) -> int:
        """Dims after the three subspaces, free for a planted mechanism's own use."""
        return 2 * self.vocab + self.n_pos + i


def make_tokenizer(vocab: int, folder: Path, special: dict[str, int] | None = None):
    """A word-level tokenizer: '<bos>' is id 0, words 't1'..'t{vocab-1}' (or names in ``special``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<bos>": 0}
    for i in range(1, vocab):
        words[f"t{i}"] = i
    for name, i in (special or {}).items():
        words.pop(next(k for k, v in words.items() if v == i), None)
        words[name] = i
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="<bos>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<bos>",
                                   pad_token="<bos>", unk_token="<bos>")
    fast.save_pretrained(folder)
    return fast


def blank_gpt2(space: Space, n_layer: int):
    """A GPT-2 with every weight zero except one-hot token/position embeddings and LN ~ identity."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=space.vocab, n_positions=space.n_pos, n_embd=space.d_model,
                     n_layer=n_layer, n_head=space.n_head, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0, tie_word_embeddings=True, attn_pdrop=0.0, resid_pdrop=0.0,
                     embd_pdrop=0.0, layer_norm_epsilon=1e-5)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        tr = model.transformer
        for t in range(space.vocab):
            tr.wte.weight[t, space.tok(t)] = 1.0
        for p in range(space.n_pos):
            tr.wpe.weight[p, space.pos(p)] = 1.0
        # LN(x) = (x - mean) / std * g: with two or three one-hots in d_model dims std ~ sqrt(k / d).
        g = (2.0 / space.d_model) ** 0.5
        for block in tr.h:
            block.ln_1.weight.fill_(g)
            block.ln_2.weight.fill_(g)
        tr.ln_f.weight.fill_(g)
    return model


def set_head(model, space: Space, layer: int, head: int, q=None, k=None, v=None, o=None):
    """Set one head's W_Q, W_K, W_V ([d_model, d_head]) and W_O ([d_head, d_model]) in GPT-2's c_attn."""
    attn = model.transformer.h[layer].attn
    dh, d = space.d_head, space.d_model
    sl = slice(head * dh, (head + 1) * dh)
    with torch.no_grad():
        W = attn.c_attn.weight  # Conv1D: [d_model, 3 * d_model] = [Q | K | V]
        for i, m in enumerate((q, k, v)):
            if m is not None:
                W[:, i * d + sl.start: i * d + sl.stop] = m
        if o is not None:
            attn.c_proj.weight[sl, :] = o  # Conv1D: [d_model(in = heads*d_head), d_model]


def save(model, tokenizer, folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


INDUCTION_HEAD = (1, 2)
PREV_TOKEN_HEAD = (0, 1)


DECOY_HEAD = (1, 3)


def induction_model(folder: Path, vocab: int = 32, n_pos: int = 64, strength: float = 60.0,
                    decoy: bool = False) -> Path:
    """Two layers x 4 heads: L0H1 is a previous-token head, L1H2 an induction head; the rest are off.

    With ``decoy``, L1H3 attends exactly as L1H2 does (the same query and key: the same prefix score) but
    writes nothing (its W_O is zero; a write into an unread subspace would still move the final
    LayerNorm's scale): the same score, no causal role.

    L0H1 attends from position p to p-1 and writes the attended token into the 'previous token'
    subspace. L1H2's query reads the current token, its key reads the previous-token subspace, so it
    attends to the position just after an earlier copy of the current token, and its OV circuit copies
    that token into the logits.
    """
    space = Space(vocab=vocab, n_pos=n_pos, d_model=4 * 64, n_head=4)
    assert 2 * vocab + n_pos <= space.d_model and n_pos <= space.d_head
    model = blank_gpt2(space, n_layer=2)
    d, dh = space.d_model, space.d_head
    # Previous-token head: q(p) = e_p, k(p') = e_{p'+1}: q.k = 1 iff p' = p - 1.
    q = torch.zeros(d, dh)
    k = torch.zeros(d, dh)
    v = torch.zeros(d, dh)
    o = torch.zeros(dh, d)
    for p in range(n_pos):
        q[space.pos(p), p] = strength
        if p + 1 < n_pos:
            k[space.pos(p), p + 1] = 1.0
    for t in range(vocab):
        v[space.tok(t), t] = 1.0
        o[t, space.prev(t)] = 1.0
    set_head(model, space, *PREV_TOKEN_HEAD, q=q, k=k, v=v, o=o)
    # Induction head: q = current token, k = previous token of the key position, OV copies the token.
    q = torch.zeros(d, dh)
    k = torch.zeros(d, dh)
    v = torch.zeros(d, dh)
    o = torch.zeros(dh, d)
    for t in range(1, vocab):
        q[space.tok(t), t] = strength
        k[space.prev(t), t] = 1.0
        v[space.tok(t), t] = 1.0
        o[t, space.tok(t)] = 3.0
    set_head(model, space, *INDUCTION_HEAD, q=q, k=k, v=v, o=o)
    if decoy:
        set_head(model, space, *DECOY_HEAD, q=q, k=k, v=v, o=torch.zeros(dh, d))
    return save(model, make_tokenizer(vocab, folder), folder)


RETRIEVAL_HEAD = INDUCTION_HEAD
RETRIEVAL_VOCAB = 32


def retrieval_model(folder: Path) -> Path:
    """The induction model used as a needle-in-a-haystack retriever: L1H2 copies from the needle.

    With a needle of words found nowhere else in the context (``t20 t21 t22 t23 t24``) and the question
    ``t20``, L1H2 attends to the needle position after the current token's earlier copy and copies it,
    so greedy decoding reproduces ``t21 t22 t23 t24``; L0H1 only feeds it (it attends to the previous
    position, never to a needle token equal to the generated one). 64 positions.
    """
    return induction_model(folder, vocab=RETRIEVAL_VOCAB, n_pos=64)


SAFETY_HEAD = (1, 1)
SAFETY_TRIGGER, SAFETY_REFUSAL = 5, 6


def safety_model(folder: Path, vocab: int = 16, n_pos: int = 32, strength: float = 30.0) -> Path:
    """Two layers x 4 heads, all off except L1H1, a safety head.

    L1H1's query is the same at every position and its key picks out the trigger word ``harm``, so it
    attends to ``harm`` wherever it occurs; its OV circuit writes the refusal word ``sorry`` (3x a token
    embedding, beating the current token's own logit). Without the trigger (or with L1H1's attention made
    uniform) the model repeats the last word; with it, it says ``sorry``.
    """
    space = Space(vocab=vocab, n_pos=n_pos, d_model=4 * 32, n_head=4)
    assert 2 * vocab + n_pos <= space.d_model
    model = blank_gpt2(space, n_layer=2)
    q, k, v = torch.zeros(3, space.d_model, space.d_head)
    o = torch.zeros(space.d_head, space.d_model)
    q[[space.pos(p) for p in range(n_pos)], 0] = strength     # the same query at every position
    k[space.tok(SAFETY_TRIGGER), 0] = 1.0
    v[space.tok(SAFETY_TRIGGER), 0] = 1.0
    o[0, space.tok(SAFETY_REFUSAL)] = 3.0
    set_head(model, space, *SAFETY_HEAD, q=q, k=k, v=v, o=o)
    tok = make_tokenizer(vocab, folder, special={"harm": SAFETY_TRIGGER, "sorry": SAFETY_REFUSAL})
    return save(model, tok, folder)


SUCCESSOR_HEAD = (1, 1)
SUCCESSOR_COPY_HEAD = (1, 3)   # distractor: same attention, identity OV (copies instead of incrementing)
SUCCESSOR_SEQUENCES = {        # word -> cyclic?; the vocabulary of the planted successor model
    ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"): True,
    ("January", "February", "March", "April", "May", "June", "July", "August", "September",
     "October", "November", "December"): True,
    tuple(str(i) for i in range(1, 21)): False,
    tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"): False,
}


def _self_attention(space: Space, strength: float):
    """q, k that make a head attend to its own position."""
    q = torch.zeros(space.d_model, space.d_head)
    k = torch.zeros(space.d_model, space.d_head)
    for p in range(space.n_pos):
        q[space.pos(p), p] = strength
        k[space.pos(p), p] = 1.0
    return q, k


def successor_model(folder: Path, n_pos: int = 16, strength: float = 60.0, gain: float = 3.0) -> Path:
    """Two layers x 4 heads over days, months, numbers 1-20 and letters A-Z (word-level tokenizer).

    L1H1 is a successor head: it attends to its own position and its OV circuit maps token i to its
    successor (Monday -> Tuesday, Sunday -> Monday, 3 -> 4, B -> C) with weight ``gain``. L1H3 attends the
    same way but copies the token (identity OV); L0H2 is a previous-token head writing into a subspace the
    unembedding does not read. The other heads are zero.
    """
    words = [w for seq in SUCCESSOR_SEQUENCES for w in seq]
    vocab = len(words) + 1
    space = Space(vocab=vocab, n_pos=n_pos, d_model=384, n_head=4)
    assert 2 * vocab + n_pos <= space.d_model and vocab <= space.d_head
    ids = {w: i + 1 for i, w in enumerate(words)}
    succ = {}
    for seq, cyclic in SUCCESSOR_SEQUENCES.items():
        for i, w in enumerate(seq):
            if i + 1 < len(seq) or cyclic:
                succ[ids[w]] = ids[seq[(i + 1) % len(seq)]]
    model = blank_gpt2(space, n_layer=2)
    d, dh = space.d_model, space.d_head
    q, k = _self_attention(space, strength)
    v = torch.zeros(d, dh)
    for t in range(vocab):
        v[space.tok(t), t] = 1.0
    o_succ, o_copy = torch.zeros(dh, d), torch.zeros(dh, d)
    for t in range(1, vocab):
        if t in succ:
            o_succ[t, space.tok(succ[t])] = gain
        o_copy[t, space.tok(t)] = 1.0
    set_head(model, space, *SUCCESSOR_HEAD, q=q, k=k, v=v, o=o_succ)
    set_head(model, space, *SUCCESSOR_COPY_HEAD, q=q, k=k, v=v, o=o_copy)
    # Previous-token head whose output the unembedding ignores.
    qp, kp = torch.zeros(d, dh), torch.zeros(d, dh)
    op = torch.zeros(dh, d)
    for p in range(n_pos - 1):
        qp[space.pos(p + 1), p] = strength
        kp[space.pos(p), p] = 1.0
    for t in range(vocab):
        op[t, space.prev(t)] = 1.0
    set_head(model, space, 0, 2, q=qp, k=kp, v=v, o=op)
    return save(model, make_tokenizer(vocab, folder, special=ids), folder)


COPY_SUPPRESSION_HEAD = (1, 2)
COPYING_HEAD = (1, 0)          # identity QK and identity OV: a copying head, not a suppressing one


def copy_suppression_model(folder: Path, vocab: int = 32, n_pos: int = 32, strength: float = 20.0,
                           suppression: float = 1.0) -> Path:
    """Two layers x 4 heads. L1H2 is a copy-suppression head: identity QK (a query holding token t attends
    to earlier copies of t) and negative-identity OV (it lowers t's logit). L1H0 has the same QK but a
    positive-identity OV (a copying head). The tied unembedding makes the model predict the current token,
    which therefore always already appears in the context. The other heads are zero.
    """
    space = Space(vocab=vocab, n_pos=n_pos, d_model=4 * 64, n_head=4)
    assert 2 * vocab + n_pos <= space.d_model and vocab <= space.d_head
    model = blank_gpt2(space, n_layer=2)
    d, dh = space.d_model, space.d_head
    q, k, v = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh)
    for t in range(1, vocab):
        q[space.tok(t), t] = strength
        k[space.tok(t), t] = 1.0
        v[space.tok(t), t] = 1.0
    o_sup, o_copy = torch.zeros(dh, d), torch.zeros(dh, d)
    for t in range(1, vocab):
        o_sup[t, space.tok(t)] = -suppression
        o_copy[t, space.tok(t)] = 1.0
    set_head(model, space, *COPY_SUPPRESSION_HEAD, q=q, k=k, v=v, o=o_sup)
    set_head(model, space, *COPYING_HEAD, q=q, k=k, v=v, o=o_copy)
    return save(model, make_tokenizer(vocab, folder), folder)


# ---------------------------------------------------------------------------------------------------
# Llama-style planted models: RMSNorm, rotary positions, grouped-query attention, a gated MLP0.
# ---------------------------------------------------------------------------------------------------

@dataclass
class LlamaSpace:
    """Residual layout of the Llama-style planted models (``d_model`` dims, one-hot subspaces):

    - ``raw(t)``: the token as the embedding writes it (and as the tied unembedding reads it);
    - ``mid(t)``: the token as MLP0 writes it; layer-1 heads read tokens only here, so the effective
      embedding ``W_E + MLP0(W_E)`` sees them and the bare ``W_E`` does not;
    - ``prev(t)``: the previous token, written by a layer-0 previous-token head;
    - ``one``: a constant 1 in every embedding (Llama has no biases: positional queries/keys need it).

    Rotary: HF Llama rotates the dim pairs ``(j, j + d_head/2)`` of queries and keys by ``pos * f_j``
    with ``f_j = rope_theta ** (-2j / d_head)``. Content matching (token t meets token t) lives in the
    pairs with ``j >= d_head/4``: with ``rope_theta = 1e6`` those turn by at most 1e-3 rad per position,
    so over these short contexts the match score stays within 0.5% of its unrotated value. Positional
    attention uses the pairs ``j < 16`` instead: a constant query ``(1, 0)`` and key ``(cos f_j, sin f_j)``
    per pair give the score ``sum_j cos((q - k - 1) f_j)``, maximal exactly at relative distance 1 (a
    rotation by equal angles for equal distances), with a gap of about 1.3 x strength to every other
    distance.
    """
    vocab: int
    d_model: int
    d_head: int
    n_head: int = 4
    n_kv: int = 2

    def raw(self, t: int) -> int:
        return t

    def mid(self, t: int) -> int:
        return self.vocab + t

    def prev(self, t: int) -> int:
        return 2 * self.vocab + t

    @property
    def one(self) -> int:
        return 3 * self.vocab

    def content(self, t: int) -> int:
        """A query/key dim for token t in a slowly rotating pair."""
        low = [j for j in range(self.d_head // 4, self.d_head // 2)]
        dims = low + [j + self.d_head // 2 for j in low]
        return dims[t]


def blank_llama(space: LlamaSpace, n_layer: int = 2, rope_theta: float = 1e6):
    """A Llama with zero attention and MLPs, one-hot token embeddings (+ the constant dim), tied
    unembedding and RMSNorm gains that keep a few-one-hot residual at values ~1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    assert space.one < space.d_model and 2 * (space.d_head // 4) >= space.vocab
    cfg = LlamaConfig(vocab_size=space.vocab, hidden_size=space.d_model, intermediate_size=space.vocab,
                      num_hidden_layers=n_layer, num_attention_heads=space.n_head,
                      num_key_value_heads=space.n_kv, head_dim=space.d_head, max_position_embeddings=128,
                      rope_theta=rope_theta, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, attention_bias=False, mlp_bias=False)
    if hasattr(cfg, "rope_parameters") and isinstance(cfg.rope_parameters, dict):
        cfg.rope_parameters["rope_theta"] = rope_theta
    model = LlamaForCausalLM(cfg).eval()
    g = (3.0 / space.d_model) ** 0.5          # RMSNorm of ~3 unit one-hots in d_model dims -> ~1 each
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.model.embed_tokens.weight
        for t in range(space.vocab):
            emb[t, space.raw(t)] = 1.0
            emb[t, space.one] = 1.0
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(g)
            layer.post_attention_layernorm.weight.fill_(g)
        model.model.norm.weight.fill_(g)
    return model


def set_mlp0_copy(model, space: LlamaSpace, gain: float = 10.0) -> None:
    """MLP0 copies raw(t) into mid(t): gate and up read raw(t), silu(gain * x) * x ~ gain * x^2, and
    down writes mid(t) scaled back to ~1."""
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        for t in range(1, space.vocab):
            mlp.gate_proj.weight[t, space.raw(t)] = gain
            mlp.up_proj.weight[t, space.raw(t)] = 1.0
            mlp.down_proj.weight[space.mid(t), t] = 1.0 / gain


def set_llama_head(model, space: LlamaSpace, layer: int, head: int, q=None, k=None, v=None, o=None):
    """Set one query head's W_Q ([d_model, d_head]) and W_O ([d_head, d_model]), and its key/value
    head's W_K, W_V (shared with the other query heads of its group)."""
    attn = model.model.layers[layer].self_attn
    dh = space.d_head
    kv = head // (space.n_head // space.n_kv)
    with torch.no_grad():
        if q is not None:   # scaled by sqrt(d_head) so that ``strength`` is the attention score itself
            attn.q_proj.weight[head * dh:(head + 1) * dh] = q.T * dh ** 0.5
        if k is not None:
            attn.k_proj.weight[kv * dh:(kv + 1) * dh] = k.T
        if v is not None:
            attn.v_proj.weight[kv * dh:(kv + 1) * dh] = v.T
        if o is not None:
            attn.o_proj.weight[:, head * dh:(head + 1) * dh] = o.T


def _llama_prev_token_head(model, space: LlamaSpace, layer: int, head: int, strength: float,
                           rope_theta: float) -> None:
    """A previous-token head from rotary alone (see :class:`LlamaSpace`); OV writes prev(t)."""
    d, dh = space.d_model, space.d_head
    q, k, v, o = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(dh, d)
    for j in range(16):
        f = rope_theta ** (-2 * j / dh)
        q[space.one, j] = strength
        k[space.one, j] = math.cos(f)
        k[space.one, j + dh // 2] = math.sin(f)
    for t in range(1, space.vocab):
        v[space.raw(t), t] = 1.0
        o[t, space.prev(t)] = 1.0
    set_llama_head(model, space, layer, head, q=q, k=k, v=v, o=o)


LLAMA_INDUCTION_HEAD = (1, 2)
LLAMA_PREV_TOKEN_HEAD = (0, 1)


def llama_induction_model(folder: Path, vocab: int = 32, strength: float = 30.0) -> Path:
    """Llama-style (RMSNorm, rotary, 4 query heads on 2 key/value heads, gated MLP0), two layers:
    L0H1 a rotary previous-token head, MLP0 copying each token into the subspace layer 1 reads, and L1H2
    an induction head (query: current token via MLP0; key: previous token; OV copies the attended token
    to the logits). L1H3 shares L1H2's key/value head with a zero query and output."""
    theta = 1e6
    space = LlamaSpace(vocab=vocab, d_model=128, d_head=128)
    model = blank_llama(space, rope_theta=theta)
    set_mlp0_copy(model, space)
    _llama_prev_token_head(model, space, *LLAMA_PREV_TOKEN_HEAD, strength=strength, rope_theta=theta)
    d, dh = space.d_model, space.d_head
    q, k, v, o = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(dh, d)
    for t in range(1, vocab):
        q[space.mid(t), space.content(t)] = strength
        k[space.prev(t), space.content(t)] = 1.0
        v[space.mid(t), t] = 1.0
        o[t, space.raw(t)] = 3.0
    set_llama_head(model, space, *LLAMA_INDUCTION_HEAD, q=q, k=k, v=v, o=o)
    return save(model, make_tokenizer(vocab, folder), folder)


LLAMA_SUCCESSOR_HEAD = (1, 1)
LLAMA_SUCCESSOR_COPY_HEAD = (1, 0)   # same (shared) key/value head and query, identity OV


def llama_successor_model(folder: Path, strength: float = 30.0, gain: float = 3.0) -> Path:
    """Llama-style successor model over the words of :data:`SUCCESSOR_SEQUENCES`: MLP0 moves each token
    into the subspace layer 1 reads; L1H1 attends to its own token (content match at distance 0, which
    rotary leaves exact) and its OV maps it to its successor; L1H0 shares that key/value head and query
    but copies the token instead."""
    words = [w for seq in SUCCESSOR_SEQUENCES for w in seq]
    vocab = len(words) + 1
    ids = {w: i + 1 for i, w in enumerate(words)}
    succ = {}
    for seq, cyclic in SUCCESSOR_SEQUENCES.items():
        for i, w in enumerate(seq):
            if i + 1 < len(seq) or cyclic:
                succ[ids[w]] = ids[seq[(i + 1) % len(seq)]]
    space = LlamaSpace(vocab=vocab, d_model=256, d_head=256)
    model = blank_llama(space)
    set_mlp0_copy(model, space)
    d, dh = space.d_model, space.d_head
    q, k, v = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh)
    o_succ, o_copy = torch.zeros(dh, d), torch.zeros(dh, d)
    for t in range(1, vocab):
        q[space.mid(t), space.content(t)] = strength
        k[space.mid(t), space.content(t)] = 1.0
        v[space.mid(t), t] = 1.0
        if t in succ:
            o_succ[t, space.raw(succ[t])] = gain
        o_copy[t, space.raw(t)] = 1.0
    set_llama_head(model, space, *LLAMA_SUCCESSOR_HEAD, q=q, k=k, v=v, o=o_succ)
    set_llama_head(model, space, *LLAMA_SUCCESSOR_COPY_HEAD, q=q, o=o_copy)
    return save(model, make_tokenizer(vocab, folder, special=ids), folder)


LLAMA_COPY_SUPPRESSION_HEAD = (1, 2)
LLAMA_COPYING_HEAD = (1, 0)


def llama_copy_suppression_model(folder: Path, vocab: int = 32, strength: float = 20.0) -> Path:
    """Llama-style copy suppression: L1H2 (key/value head 1) attends from a query holding the predicted
    token t (the current token, raw subspace, which the tied unembedding reads) to earlier keys holding t
    in the MLP0 subspace, and its OV writes -t; L1H0 (key/value head 0) has the same QK and a +t OV."""
    space = LlamaSpace(vocab=vocab, d_model=128, d_head=128)
    model = blank_llama(space)
    set_mlp0_copy(model, space)
    d, dh = space.d_model, space.d_head
    q, k, v = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh)
    o_sup, o_copy = torch.zeros(dh, d), torch.zeros(dh, d)
    for t in range(1, vocab):
        q[space.raw(t), space.content(t)] = strength
        k[space.mid(t), space.content(t)] = 1.0
        v[space.mid(t), t] = 1.0
        o_sup[t, space.raw(t)] = -1.0
        o_copy[t, space.raw(t)] = 1.0
    set_llama_head(model, space, *LLAMA_COPY_SUPPRESSION_HEAD, q=q, k=k, v=v, o=o_sup)
    set_llama_head(model, space, *LLAMA_COPYING_HEAD, q=q, k=k, v=v, o=o_copy)
    return save(model, make_tokenizer(vocab, folder), folder)
