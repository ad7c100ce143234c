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


DUPLICATE_TOKEN_HEAD = (0, 2)
DUPLICATE_READER_HEAD = (1, 2)     # reads where the earlier copy was: attends just after it and copies
DUPLICATE_PREV_TOKEN_HEAD = (0, 1)  # a previous-token head whose output nothing reads


def duplicate_token_model(folder: Path, vocab: int = 32, n_pos: int = 64, strength: float = 150.0,
                          reader_strength: float = 300.0) -> Path:
    """Two layers x 4 heads (d_head 128). L0H2 is a duplicate-token head: its query and key match token
    identity (the start token excluded), a penalty on its own position keeps it off itself, and a weaker
    bias on position 0 takes its attention where the token has no earlier copy; its OV writes the one-hot
    of the attended *position* into a free subspace. L1H2 reads that subspace: its query (position p' of
    the earlier copy) meets the key of position p' + 1, and its OV copies the token found there into the
    logits, so after a repeated token ``a`` of a bigram ``(a, b)`` the model predicts ``b`` (induction by
    Q-composition with the duplicate-token head). L0H1 is a previous-token head writing into the
    previous-token subspace, which nothing reads. The other heads are zero.
    """
    space = Space(vocab=vocab, n_pos=n_pos, d_model=512, n_head=4)
    d, dh = space.d_model, space.d_head
    assert space.free(n_pos) <= d and vocab + n_pos + 1 <= dh and n_pos <= dh
    model = blank_gpt2(space, n_layer=2)
    # Duplicate-token head: token match in dims [0, vocab), self penalty in [vocab, vocab + n_pos), the
    # fallback to position 0 in dim vocab + n_pos.
    q, k, v, o = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(dh, d)
    for t in range(1, vocab):
        q[space.tok(t), t] = strength
        k[space.tok(t), t] = 1.0
    for p in range(n_pos):
        q[space.pos(p), vocab + p] = -strength
        k[space.pos(p), vocab + p] = 1.0
        q[space.pos(p), vocab + n_pos] = strength / 2
        v[space.pos(p), p] = 1.0
        o[p, space.free(p)] = 1.0
    k[space.pos(0), vocab + n_pos] = 1.0
    set_head(model, space, *DUPLICATE_TOKEN_HEAD, q=q, k=k, v=v, o=o)
    # Reader: query = where the earlier copy was (free(p')), key = position p' + 1; OV copies the token.
    q, k, v, o = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(dh, d)
    for p in range(n_pos - 1):
        q[space.free(p), p + 1] = reader_strength
    for p in range(1, n_pos):
        k[space.pos(p), p] = 1.0
    for t in range(1, vocab):
        v[space.tok(t), t] = 1.0
        o[t, space.tok(t)] = 3.0
    set_head(model, space, *DUPLICATE_READER_HEAD, q=q, k=k, v=v, o=o)
    # Previous-token head whose output nothing reads.
    q, k, v, o = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(dh, d)
    for p in range(n_pos):
        q[space.pos(p), p] = strength / 2
        if p + 1 < n_pos:
            k[space.pos(p), p + 1] = 1.0
    for t in range(vocab):
        v[space.tok(t), t] = 1.0
        o[t, space.prev(t)] = 1.0
    set_head(model, space, *DUPLICATE_PREV_TOKEN_HEAD, q=q, k=k, v=v, o=o)
    return save(model, make_tokenizer(vocab, folder), folder)


# ---------------------------------------------------------------------------------------------------
# Attention sinks: a dormant head, an active sink head and ordinary heads.
# ---------------------------------------------------------------------------------------------------

SINK_DORMANT_HEAD = (0, 0)     # attends to the first token, whose value it reads as zero: writes ~nothing
SINK_ACTIVE_HEAD = (0, 1)      # half its attention on the first token, half on itself: predicts the successor
SINK_VOCAB = 32                # ids 1..31; 30 is ",", 31 is "."; the successor of t is t % 31 + 1


def sink_successor(t: int) -> int:
    """The next word of the planted sink models' text: ``t1 -> t2 -> ... -> , -> . -> t1``."""
    return t % (SINK_VOCAB - 1) + 1


def sink_text(n_words: int, seed: int = 0) -> str:
    """Text for the planted sink models: runs of 4-12 successive words (``sink_successor``) from random
    starts, so the next word is mostly the current word's successor."""
    import random

    rng = random.Random(seed)
    names = {30: ",", 31: "."}
    words: list[str] = []
    while len(words) < n_words:
        t = rng.randint(1, SINK_VOCAB - 1)
        for _ in range(rng.randint(4, 12)):
            words.append(names.get(t, f"t{t}"))
            t = sink_successor(t)
    return " ".join(words[:n_words])


def attention_sink_model(folder: Path, dormant: bool = True, n_pos: int = 32, strength: float = 160.0) -> Path:
    """Two layers x 4 heads (GPT-2), layer 1 all zero. Layer 0:

    - L0H0 (``dormant``): a constant query meets a key that only the first token (``<bos>``, id 0) has, so
      it attends to position 0 (by ``strength / sqrt(d_head)`` = 20 nats over every other key); its value
      reads words 1..31 with columns that sum to zero over the other dims (so neither the LayerNorm's mean
      subtraction nor its bias, which headlens folds into the output bias, gives ``<bos>`` a value): the
      value it attends to is zero and it writes almost nothing, although its W_O would write the successor
      of a word it attended to. ``dormant=False`` leaves L0H0 all zero instead (uniform attention, no
      output): then no head is dormant.
    - L0H1, an active sink head: equal scores for position 0 and its own position, so half its attention
      on the sink, and it writes the successor of the current word (the text's next word, mostly).
    - L0H2: a previous-token head writing the successor of the successor of the previous word (helps);
      L0H3: attends to itself and writes the current word (hurts). Both matter for the loss.

    Layer 0's input is exactly two one-hots (token and position), so its LayerNorm bias is set to cancel
    the mean subtraction: LN(x) = c * x (c ~ 1), and the one-hot queries and keys score exactly as set.
    """
    vocab = SINK_VOCAB
    space = Space(vocab=vocab, n_pos=n_pos, d_model=4 * 64, n_head=4)
    assert 2 * vocab + n_pos <= space.d_model and n_pos + 1 <= space.d_head
    model = blank_gpt2(space, n_layer=2)
    d, dh = space.d_model, space.d_head
    ln = model.transformer.h[0].ln_1
    m = 2.0 / d
    with torch.no_grad():
        ln.bias.fill_(float(ln.weight[0]) * m / math.sqrt(m - m * m + 1e-5))
    zeros = lambda *shape: torch.zeros(*shape)      # noqa: E731
    value = zeros(d, dh)                             # word t -> dim t; <bos> -> 0
    for t in range(1, vocab):
        value[space.tok(t), t] = 1.0

    def writes(target, gain: float) -> torch.Tensor:          # dim t -> gain * e_{target(t)}
        o = zeros(dh, d)
        for t in range(1, vocab):
            o[t, space.tok(target(t))] = gain
        return o

    if dormant:
        q, k = zeros(d, dh), zeros(d, dh)
        q[[space.pos(p) for p in range(n_pos)], 0] = strength
        k[space.tok(0), 0] = 1.0
        others = [j for j in range(d) if j not in (space.tok(0), space.pos(0))]
        silent = zeros(d, dh)                        # each column sums to 0 and is 0 on <bos>'s dims
        for t in range(1, vocab):
            silent[others, t] = -1.0 / (len(others) - 1)
            silent[space.tok(t), t] = 1.0
        set_head(model, space, *SINK_DORMANT_HEAD, q=q, k=k, v=silent, o=writes(sink_successor, 1.0))
    # Active sink: dim 0 scores the first token, dim 1 + p the own position p, both at `strength / 2`.
    q, k = zeros(d, dh), zeros(d, dh)
    for p in range(n_pos):
        q[space.pos(p), 0] = strength / 2
        q[space.pos(p), 1 + p] = strength / 2
        k[space.pos(p), 1 + p] = 1.0
    k[space.tok(0), 0] = 1.0
    set_head(model, space, *SINK_ACTIVE_HEAD, q=q, k=k, v=value, o=writes(sink_successor, 8.0))
    # Previous-token head (q(p) . k(p') = strength iff p' = p - 1) and a self-attending head.
    q, k = zeros(d, dh), zeros(d, dh)
    for p in range(n_pos):
        q[space.pos(p), p] = strength / 2
        if p + 1 < n_pos:
            k[space.pos(p), p + 1] = 1.0
    set_head(model, space, 0, 2, q=q, k=k, v=value, o=writes(lambda t: sink_successor(sink_successor(t)), 4.0))
    q, k = zeros(d, dh), zeros(d, dh)
    for p in range(n_pos):
        q[space.pos(p), p] = strength / 2
        k[space.pos(p), p] = 1.0
    set_head(model, space, 0, 3, q=q, k=k, v=value, o=writes(lambda t: t, 2.0))
    return save(model, make_tokenizer(vocab, folder, special={",": 30, ".": 31}), folder)


def llama_attention_sink_model(folder: Path, strength: float = 15.0) -> Path:
    """Llama-style (RMSNorm, rotary, 4 query heads on 2 key/value heads) version of
    :func:`attention_sink_model`, two layers, layer 1 and the MLPs zero. Key/value head 0 has a key only the
    first token (``<bos>``) has, and content keys (word t meets word t, in slowly rotating dims); its
    value reads words 1..31, not ``<bos>``. L0H0 (dormant): a constant query on the ``<bos>`` key only: all
    its attention on a zero value. L0H1 (active sink): the same ``<bos>`` score plus its own word's
    copies: about half its attention on the sink, and it writes the successor of the current word. L0H2
    and L0H3 (key/value head 1: content keys) attend to their own word and write it (hurts) or its
    successor (helps)."""
    vocab = SINK_VOCAB
    space = LlamaSpace(vocab=vocab, d_model=128, d_head=128)
    model = blank_llama(space, n_layer=2)
    d, dh = space.d_model, space.d_head
    k0, k1, value = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh)
    k0[space.raw(0), space.content(0)] = 1.0
    for t in range(1, vocab):
        k0[space.raw(t), space.content(t)] = 1.0
        k1[space.raw(t), space.content(t)] = 1.0
        value[space.raw(t), t] = 1.0

    def writes(target, gain: float) -> torch.Tensor:
        o = torch.zeros(dh, d)
        for t in range(1, vocab):
            o[t, space.raw(target(t))] = gain
        return o

    sink_q = torch.zeros(d, dh)
    sink_q[space.one, space.content(0)] = strength
    own_q = torch.zeros(d, dh)
    for t in range(1, vocab):
        own_q[space.raw(t), space.content(t)] = strength
    set_llama_head(model, space, *SINK_DORMANT_HEAD, q=sink_q, k=k0, v=value, o=writes(sink_successor, 1.0))
    set_llama_head(model, space, *SINK_ACTIVE_HEAD, q=sink_q + own_q, o=writes(sink_successor, 3.0))
    set_llama_head(model, space, 0, 2, q=own_q, k=k1, v=value, o=writes(lambda t: t, 1.0))
    set_llama_head(model, space, 0, 3, q=own_q, o=writes(sink_successor, 2.0))
    return save(model, make_tokenizer(vocab, folder, special={",": 30, ".": 31}), folder)


STEER_COPY_HEAD = (1, 2)        # attends evenly to its causal prefix and copies what it attends to
STEER_SELF_HEAD = (0, 0)        # attends to its own position and copies that token
STEER_DECOY_HEAD = (1, 0)       # attends as the copy head does but writes where nothing reads
STEER_SPAN_TOKEN = 9


def steering_model(folder: Path, vocab: int = 32, n_pos: int = 32, strength: float = 60.0,
                   gain: float = 4.0) -> Path:
    """Two layers x 4 heads for attention steering (PASTA). L1H2, the copy head, has a zero query: it
    attends evenly over its causal prefix, and its OV writes the attended token into the logits
    (``gain`` x a token embedding), so unsteered it adds ``gain / n`` to each of n context tokens' logits;
    steered to a marked span it adds nearly ``gain`` to the span's token. L0H0 attends to its own
    position and copies that token (with the residual's own token: 2 for the current token), so the
    unsteered model repeats the last token. L0H1 is a previous-token head and L1H0 attends as L1H2 does,
    both writing into the previous-token subspace, which nothing reads; the other heads are off."""
    space = Space(vocab=vocab, n_pos=n_pos, d_model=4 * 32, n_head=4)
    assert 2 * vocab + n_pos <= space.d_model and n_pos <= space.d_head
    model = blank_gpt2(space, n_layer=2)
    d, dh = space.d_model, space.d_head
    q_self, k_self = _self_attention(space, strength)
    q_prev, k_prev = torch.zeros(d, dh), torch.zeros(d, dh)
    for p in range(n_pos):
        q_prev[space.pos(p), p] = strength
        if p + 1 < n_pos:
            k_prev[space.pos(p), p + 1] = 1.0
    v = torch.zeros(d, dh)
    o_copy, o_logit, o_unread = torch.zeros(dh, d), torch.zeros(dh, d), torch.zeros(dh, d)
    for t in range(1, vocab):
        v[space.tok(t), t] = 1.0
        o_copy[t, space.tok(t)] = 1.0
        o_logit[t, space.tok(t)] = gain
        o_unread[t, space.prev(t)] = 1.0
    zero = torch.zeros(d, dh)
    set_head(model, space, *STEER_SELF_HEAD, q=q_self, k=k_self, v=v, o=o_copy)
    set_head(model, space, 0, 1, q=q_prev, k=k_prev, v=v, o=o_unread)
    set_head(model, space, *STEER_COPY_HEAD, q=zero, k=zero, v=v, o=o_logit)
    set_head(model, space, *STEER_DECOY_HEAD, q=zero, k=zero, v=v, o=o_unread)
    return save(model, make_tokenizer(vocab, folder), folder)


# ---------------------------------------------------------------------------------------------------
# Dual-route induction: a look-ahead token-copying head (Feucht et al. 2025's copying scores).
# ---------------------------------------------------------------------------------------------------

DUAL_TOKEN_HEAD = (1, 2)       # at the token before an item, fetches the item's second token from its earlier copy
DUAL_DECOY_HEAD = (1, 3)       # the same attention, writes nothing
DUAL_PREV2_HEAD = (0, 1)       # attends two back, writes that token into a free subspace
DUAL_READER_HEAD = (2, 1)      # attends to the previous position and unembeds what the token head wrote there
DUAL_SEPARATOR = "t31"
# "multi-token words" of the planted vocabulary: word-level tokens, so " t3 t7" is two tokens
DUAL_WORDS = ["t3 t7", "t4 t9 t12", "t5 t11", "t6 t13 t2", "t8 t14", "t10 t15 t16", "t17 t18", "t19 t20 t21",
              "t22 t23", "t24 t25 t26", "t27 t28", "t29 t30 t1", "t2 t9", "t12 t5 t7", "t14 t3", "t16 t8 t4"]


def dual_route_words(folder: Path) -> Path:
    """A words file of :data:`DUAL_WORDS` for the dual-route detector on :func:`dual_route_model`."""
    path = Path(folder) / "dual_words.txt"
    path.write_text("\n".join(DUAL_WORDS) + "\n")
    return path


def dual_route_model(folder: Path, vocab: int = 32, n_pos: int = 32, strength: float = 300.0,
                     gain: float = 10.0) -> Path:
    """Three layers x 4 heads (GPT-2, d_model 512): a token-route copying mechanism that raises, one
    position *after* the token head reads it, the probability of the token two ahead of an earlier copy.

    L0H1 attends from p to p - 2 and writes that token into ``free(t)``. L1H2 (the token head) matches its
    current token against ``free`` (the token two back of each key, a weaker bias to position 0 where
    there is none), so at the context token before an item ``X`` it attends to ``X[1]`` in the earlier
    copy, and writes that token into ``free(vocab + t)``. L2H1 attends to the previous position and maps
    ``free(vocab + t)`` to the token's logit: after ``X[0]`` the model predicts ``X[1]``. L1H3 (decoy)
    attends as L1H2 does and writes nothing. The final LayerNorm's gain is raised so that the logits
    reach probabilities near 1. The mechanism copies any sequence, so it serves words and random tokens
    alike (token route; a planted concept head is not built).
    """
    space = Space(vocab=vocab, n_pos=n_pos, d_model=512, n_head=4)
    d, dh = space.d_model, space.d_head
    assert space.free(2 * vocab) <= d and n_pos + 2 < dh
    model = blank_gpt2(space, n_layer=3)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(10.0)
    z = lambda: (torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(dh, d))  # noqa: E731
    q, k, v, o = z()
    for p in range(n_pos):
        q[space.pos(p), p] = strength
        k[space.pos(p), p + 2] = 1.0        # q(p) . k(p') large iff p' = p - 2
    for t in range(vocab):
        v[space.tok(t), t] = 1.0
        o[t, space.free(t)] = 1.0
    set_head(model, space, *DUAL_PREV2_HEAD, q=q, k=k, v=v, o=o)
    q, k, v, o = z()
    for t in range(1, vocab):
        q[space.tok(t), t] = strength
        k[space.free(t), t] = 1.0
    for p in range(n_pos):
        q[space.pos(p), dh - 1] = strength / 2
    k[space.pos(0), dh - 1] = 1.0
    for t in range(vocab):
        v[space.tok(t), t] = 1.0
        o[t, space.free(vocab + t)] = 1.0
    set_head(model, space, *DUAL_TOKEN_HEAD, q=q, k=k, v=v, o=o)
    set_head(model, space, *DUAL_DECOY_HEAD, q=q, k=k, v=v, o=torch.zeros(dh, d))
    q, k, v, o = z()
    for p in range(n_pos):
        q[space.pos(p), p] = strength
        k[space.pos(p), p + 1] = 1.0        # attends to p - 1
    for t in range(vocab):
        v[space.free(vocab + t), t] = 1.0
        o[t, space.tok(t)] = gain
    set_head(model, space, *DUAL_READER_HEAD, q=q, k=k, v=v, o=o)
    return save(model, make_tokenizer(vocab, folder), folder)


STEERABLE_HEAD = (1, 2)
WEAK_STEERABLE_HEAD = (0, 0)


def steerable_model(folder: Path, vocab: int = 32, n_pos: int = 32, gain: float = 8.0, weak_gain: float = 1.0) -> Path:
    """Two layers x 4 heads for PASTA steering: L1H2 attends evenly to every earlier position (its query and
    key are zero) and copies the tokens it reads into the logits with ``gain``; L0H0 does the same with the
    smaller ``weak_gain``; every other head writes nothing (steering it changes nothing). Steering a copier
    towards an emphasised token raises that token's logit at the last position, L1H2 most."""
    space = Space(vocab=vocab, n_pos=n_pos, d_model=4 * 32, n_head=4)
    assert vocab + n_pos <= space.d_model and vocab <= space.d_head
    model = blank_gpt2(space, n_layer=2)
    d, dh = space.d_model, space.d_head
    for head, g in ((STEERABLE_HEAD, gain), (WEAK_STEERABLE_HEAD, weak_gain)):
        v = torch.zeros(d, dh)
        o = torch.zeros(dh, d)
        for t in range(1, vocab):
            v[space.tok(t), t] = 1.0
            o[t, space.tok(t)] = g
        set_head(model, space, *head, q=torch.zeros(d, dh), k=torch.zeros(d, dh), v=v, o=o)
    return save(model, make_tokenizer(vocab, folder), folder)


def steering_examples(n: int, vocab: int = 32, length: int = 8, seed: int = 0) -> list[dict]:
    """``n`` prompts of ``length`` distinct words ``t1``..``t{vocab-1}`` for :func:`steerable_model`, one of
    them emphasised (``**t7**``): the target is the emphasised word, the distractor another word of the
    prompt (seeded)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        words = (torch.randperm(vocab - 1, generator=g)[:length] + 1).tolist()
        at, other = torch.randperm(length, generator=g)[:2].tolist()
        text = " ".join(f"**t{w}**" if i == at else f"t{w}" for i, w in enumerate(words))
        out.append({"prompt": text, "target": f"t{words[at]}", "distractor": f"t{words[other]}"})
    return out


# ---------------------------------------------------------------------------------------------------
# Function-vector heads: a head whose output at the last position tells the model which task the
# demonstrations show.
# ---------------------------------------------------------------------------------------------------

FV_HEAD = (1, 0)           # attends to the demonstrations' consistent answers, writes the task direction
FV_ANSWER_HEAD = (0, 1)    # attends to the previous token and maps a_i -> b_i (alone, too weak to win)
FV_NONE_HEAD = (1, 2)      # attends to <bos> and writes the default answer "none" at every position
FV_PAIRS = 14              # a1 -> b1, ..., a14 -> b14


def fv_vocabulary() -> dict[str, int]:
    """The planted function-vector model's words: ``Q:``, ``A:``, ``a1..a14``, ``b1..b14``, ``none``."""
    words = ["Q:", "A:"] + [f"a{i}" for i in range(1, FV_PAIRS + 1)] + [f"b{i}" for i in range(1, FV_PAIRS + 1)]
    return {w: i + 1 for i, w in enumerate(words + ["none"])}


def function_vector_tasks(folder: Path) -> Path:
    """The planted model's one in-context task (``a_i -> b_i``) as an ``icl_tasks.json``-shaped file."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fv_tasks.json"
    pairs = [{"input": f"a{i}", "output": f"b{i}"} for i in range(1, FV_PAIRS + 1)]
    path.write_text(json.dumps({"tasks": {"letters": pairs}}))
    return path


def function_vector_model(folder: Path, n_pos: int = 48, strength: float = 400.0, answer: float = 2.0,
                          task: float = 2.2, default: float = 3.0, final_gain: float = 30.0) -> Path:
    """Two layers x 4 heads (GPT-2, d_model 512) over ``Q: a_i A: b_i`` few-shot prompts.

    - L0H0 attends two positions back and writes that token into a free subspace (``P2``).
    - MLP0 unit i fires where the current token is ``b_i`` and the token two back is ``a_i``: a demonstration
      whose answer is consistent with the task; it writes a "consistent" dim ``C`` there (never at ``A:``).
    - L0H1 (answer head) attends to the previous token and maps ``a_i`` to ``answer`` x ``b_i``'s logit.
    - L1H0 (the function-vector head) attends from ``A:`` to the positions with ``C`` and writes ``task`` x
      the sum of every ``b_j``'s direction: "the answer is one of the task's outputs".
    - L1H2 attends to ``<bos>`` and writes ``default`` x the direction of the word ``none``, everywhere.

    Without the task direction ``none`` wins; with it the answer head's ``b_i`` does. With shuffled labels no
    demonstration is consistent, the function-vector head writes nothing, and the model answers ``none``;
    its mean output on clean prompts, patched in at the last position, restores ``b_i``. L0H2, L0H3, L1H1
    and L1H3 are zero. ``final_gain``: the final LayerNorm's gain (sharpens the logits).
    """
    ids = fv_vocabulary()
    vocab = len(ids) + 1
    space = Space(vocab=vocab, n_pos=n_pos, d_model=512, n_head=4)
    d, dh = space.d_model, space.d_head
    p2 = space.free                                     # P2(t): dims free(0..vocab)
    consistent = space.free(vocab)
    assert consistent < d and n_pos <= dh
    model = blank_gpt2(space, n_layer=2)
    a = [ids[f"a{i}"] for i in range(1, FV_PAIRS + 1)]
    b = [ids[f"b{i}"] for i in range(1, FV_PAIRS + 1)]
    # L0H0: two positions back, writes P2(token).
    q, k, v, o = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(dh, d)
    for p in range(n_pos):
        q[space.pos(p), p] = strength
        if p + 2 < n_pos:
            k[space.pos(p), p + 2] = 1.0
    for t in range(vocab):
        v[space.tok(t), t] = 1.0
        o[t, p2(t)] = 1.0
    set_head(model, space, 0, 0, q=q, k=k, v=v, o=o)
    # L0H1: the previous token; OV a_i -> b_i.
    q, k, v, o = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(dh, d)
    for p in range(n_pos):
        q[space.pos(p), p] = strength
        if p + 1 < n_pos:
            k[space.pos(p), p + 1] = 1.0
    for i, (x, y) in enumerate(zip(a, b)):
        v[space.tok(x), i] = 1.0
        o[i, space.tok(y)] = answer
    set_head(model, space, *FV_ANSWER_HEAD, q=q, k=k, v=v, o=o)
    # MLP0: unit i = [token b_i and P2 a_i and not at A:], written into C.
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        scale = 10.0
        for i, (x, y) in enumerate(zip(a, b)):
            mlp.c_fc.weight[space.tok(y), i] = scale
            mlp.c_fc.weight[p2(x), i] = scale
            mlp.c_fc.weight[space.tok(ids["A:"]), i] = -10 * scale
            mlp.c_fc.bias[i] = -1.5 * scale * (2.0 / 3.0) ** 0.5
            mlp.c_proj.weight[i, consistent] = 0.25
    # L1H0: the function-vector head: from A: to the consistent answers; writes the task direction.
    q, k, v, o = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(dh, d)
    q[space.tok(ids["A:"]), 0] = strength
    k[consistent, 0] = 1.0
    v[consistent, 0] = 1.0
    for y in b:
        o[0, space.tok(y)] = task
    set_head(model, space, *FV_HEAD, q=q, k=k, v=v, o=o)
    # L1H2: the default answer "none", from <bos>.
    q, k, v, o = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(dh, d)
    for p in range(n_pos):
        q[space.pos(p), 0] = strength
    k[space.pos(0), 0] = 1.0
    v[space.pos(0), 0] = 1.0
    o[0, space.tok(ids["none"])] = default
    set_head(model, space, *FV_NONE_HEAD, q=q, k=k, v=v, o=o)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(final_gain / d ** 0.5)
    return save(model, make_tokenizer(vocab, folder, special=ids), folder)


# ---------------------------------------------------------------------------------------------------
# IOI: a planted S-inhibition head, name mover, negative name mover and backup name mover.
# ---------------------------------------------------------------------------------------------------

IOI_NAMES = ("Ann", "Bob", "Cat", "Dan", "Eve", "Fay", "Gus", "Hal")
IOI_WORDS = ("and", "went", "gave", "to")
IOI_S_INHIBITION_HEAD = (0, 0)
IOI_NAME_MOVER_HEAD = (1, 0)
IOI_NEGATIVE_NAME_MOVER_HEAD = (1, 1)
IOI_BACKUP_HEAD = (2, 0)
IOI_END = 7             # the last position of the planted template "<bos> A and B went S gave to"
IOI_S2 = 5              # the position of the repeated subject


def ioi_model(folder: Path, strength: float = 40.0, gain: float = 3.0) -> Path:
    """A 3-layer GPT-2 that does IOI on the fixed template ``"{A} and {B} went {S} gave to"`` (names at
    positions 1, 3, 5; the answer read at position 7):

    - L0H0, the S-inhibition head: from the last position it attends to position 5 (the repeated subject,
      by position) and writes that name into an "inhibit" subspace ``free(t)``;
    - L1H0, the name mover: from the last position its query is drawn to every name token and pushed away
      from the name in the inhibit subspace, so it attends to the IO; its OV copies the name to the logits
      (``gain``) and writes a "done" flag ``free(8)``; elsewhere it attends to the start token (writes 0);
    - L1H1, a negative name mover: the same attention, OV writes ``-0.5`` of the name;
    - L2H0, a backup name mover: the name mover's query and OV (``2/3 gain``), plus a pull to the start
      token in proportion to the done flag: while the name mover works it attends to the start token
      and writes nothing; with the name mover ablated it attends to the IO and copies it.

    Under the ABC corruption (position 5 holds a third name) the inhibit subspace holds that name, the
    name mover splits its attention between A and B, and the logit difference falls to about 0."""
    vocab = 1 + len(IOI_NAMES) + len(IOI_WORDS) + 3
    space = Space(vocab=vocab, n_pos=16, d_model=64, n_head=4)
    ids = {n: i + 1 for i, n in enumerate(IOI_NAMES)}
    ids.update({w: len(IOI_NAMES) + 1 + i for i, w in enumerate(IOI_WORDS)})
    names = [ids[n] for n in IOI_NAMES]
    model = blank_gpt2(space, n_layer=3)
    d, dh = space.d_model, space.d_head
    done = space.free(8)

    q, k, v, o = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(dh, d)
    q[space.pos(IOI_END), 0] = strength
    k[space.pos(IOI_S2), 0] = 1.0
    for j, t in enumerate(names):
        v[space.tok(t), 1 + j] = 1.0
        o[1 + j, space.free(j)] = 1.0
    set_head(model, space, *IOI_S_INHIBITION_HEAD, q=q, k=k, v=v, o=o)

    def mover(copy: float, flag: float, bos_pull: float = 0.0):
        q, k, v, o = torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(d, dh), torch.zeros(dh, d)
        q[space.pos(IOI_END), 0] = strength                  # drawn to every name from the last position
        q[space.pos(IOI_END), 1] = -2.5 * strength            # elsewhere (the bias below): to the start token
        k[space.tok(0), 1] = 1.0
        for j, t in enumerate(names):
            k[space.tok(t), 0] = 1.0
            q[space.free(j), 2 + j] = -1.5 * strength         # pushed away from the inhibited name
            k[space.tok(t), 2 + j] = 1.0
            v[space.tok(t), 2 + j] = 1.0
            o[2 + j, space.tok(t)] = copy
            o[2 + j, done] = flag
        q[done, 1] = bos_pull
        return dict(q=q, k=k, v=v, o=o)
    set_head(model, space, *IOI_NAME_MOVER_HEAD, **mover(gain, 1.0))
    set_head(model, space, *IOI_NEGATIVE_NAME_MOVER_HEAD, **mover(-0.5, 0.0))
    set_head(model, space, *IOI_BACKUP_HEAD, **mover(2 * gain / 3, 0.0, bos_pull=4 * strength))
    with torch.no_grad():      # the query bias of the start-token pull (cancelled at the last position)
        for layer, head in (IOI_NAME_MOVER_HEAD, IOI_NEGATIVE_NAME_MOVER_HEAD, IOI_BACKUP_HEAD):
            model.transformer.h[layer].attn.c_attn.bias[head * dh + 1] = 2 * strength
    return save(model, make_tokenizer(vocab, folder, special=ids), folder)


def ioi_spec() -> dict:
    """The planted model's prompt file content (for ``get_detector("ioi", data=...)``)."""
    return {"templates": ["{A} and {B} went {S} gave to"], "names": list(IOI_NAMES)}
