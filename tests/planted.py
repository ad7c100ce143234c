"""Tiny models with hand-set weights whose head roles are known (planted ground truth).

All are GPT-2 architecture (learned absolute positions make hand-set attention easy), saved to a folder
with a word-level tokenizer and loaded through the public ``headlens.load_model(path)`` route.

Residual layout for ``d_model = 4 * n_tok_dims`` (``plant_space``): the token one-hot lives in dims
``[0, V)``, the position one-hot in ``[V, V + P)``, and a free "previous token" subspace in
``[V + P, 2V + P)``; everything else is unused. MLPs are zero, LayerNorm gains are set so that
LN(x) is roughly x. Unembedding is tied to the token embedding, so writing e_t raises the logit of t.
"""
from __future__ import annotations

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


def induction_model(folder: Path, vocab: int = 32, n_pos: int = 64, strength: float = 60.0) -> Path:
    """Two layers x 4 heads: L0H1 is a previous-token head, L1H2 an induction head; the rest are off.

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
