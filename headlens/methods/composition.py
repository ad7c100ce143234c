"""Q-, K- and V-composition scores between attention heads (Elhage et al. 2021, "A mathematical framework
for transformer circuits"), computed from the weights alone.

An earlier head A writes into the residual stream through its OV circuit; a later head B reads it through
its query (Q-composition), its key (K-composition) or its value (V-composition). In the row-vector
convention of TransformerLens (a residual row ``x`` becomes ``x @ W_V @ W_O``):

- ``W_OV^A = W_V^A W_O^A`` (``d_model x d_model``), ``W_QK^B = W_Q^B W_K^B^T`` (the attention score of a
  query row ``x`` and a key row ``y`` is ``x W_QK^B y^T``);
- Q-composition: ``||W_OV^A W_QK^B||_F / (||W_OV^A||_F ||W_QK^B||_F)``;
- K-composition: ``||W_OV^A W_QK^B^T||_F / (...)``, the same as ``||W_QK^B W_OV^A^T||_F / (...)``;
- V-composition: ``||W_OV^A W_OV^B||_F / (||W_OV^A||_F ||W_OV^B||_F)``.

These are TransformerLens's ``composition_scores`` (``bridge.all_composition_scores("Q" | "K" | "V")``,
which pairs ``FactoredMatrix(W_V, W_O)`` with ``FactoredMatrix(W_Q, W_K^T)``, its transpose, or the OV
matrix again); biases are left out, as there.

The ``d x d`` matrices are never formed. With ``W_OV^A = V O`` and a reader matrix ``M_B = F G^T`` (Q:
``F = W_Q, G = W_K``; K: ``F = W_K, G = W_Q``; V: ``F = W_V, G = W_O^T``), all four ``[d_model, d_head]``,
take the triangular factors of the thin QR decompositions ``V = Q_V R_V`` and ``G = Q_G R_G``: the
orthonormal columns drop out of every Frobenius norm, so

    ||W_OV^A M_B||_F = ||X_A Y_B||_F  with  X_A = R_V O  [d_head, d_model],  Y_B = F R_G^T  [d_model, d_head]

and ``||W_OV^A||_F = ||X_A||_F``, ``||M_B||_F = ||Y_B||_F``. (Equivalently
``||P M R^T||_F^2 = tr(M^T (P^T P) M (R^T R))`` with ``d_head x d_head`` pieces.) Every pair then costs one
``[d_head, d_model] @ [d_model, d_head]`` product, done for a block of writers against a chunk of readers
as one matrix product.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import HeadlensError
from ..models import HeadModel
from ..runtime import chunked
from ..runtime.work import budget, plan
from .circuits import layer_weights, per_query_head
from .hooks import check_head

__all__ = ["COMPOSITION_KINDS", "Composition", "composition", "composition_baseline", "head_factors",
           "pair_scores"]

COMPOSITION_KINDS = ("q", "k", "v")
N_SAMPLES = 100    # random-matrix draws behind the baseline (its standard error is its std / 10)


@dataclass
class Composition:
    """Composition scores of every (writer, reader) pair of heads.

    ``scores``: ``[n_writers, n_readers]`` float32, NaN where the reader's layer is not after the writer's
    (or a head's matrix is zero, where the score is undefined). ``writers``, ``readers``: the heads
    ``(layer, head)`` of the rows and columns, sorted. ``baseline``: the mean score of random matrices of
    the same shapes (``baseline_samples``, ``[n_samples]``; the same for Q, K and V), ``baseline_std``
    their standard deviation. ``info``: how the work was chunked.
    """
    kind: str
    writers: list[tuple[int, int]]
    readers: list[tuple[int, int]]
    scores: Tensor
    baseline: float
    baseline_std: float
    baseline_samples: Tensor
    n_layers: int
    n_heads: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def excess(self) -> Tensor:
        """``[n_writers, n_readers]``: ``scores - baseline``."""
        return self.scores - self.baseline

    def grid(self) -> Tensor:
        """``[n_layers, n_heads, n_layers, n_heads]`` (writer layer, writer head, reader layer, reader
        head), NaN for pairs not scored."""
        out = torch.full((self.n_layers, self.n_heads, self.n_layers, self.n_heads), float("nan"))
        w, r = torch.tensor(self.writers), torch.tensor(self.readers)
        out[w[:, 0, None], w[:, 1, None], r[None, :, 0], r[None, :, 1]] = self.scores
        return out

    def frame(self) -> pd.DataFrame:
        """Long form, one row per scored pair (the reader in a later layer), writers then readers in
        order: ``writer``, ``reader`` (``L0H1``), ``writer_layer``, ``writer_head``, ``reader_layer``,
        ``reader_head``, ``kind``, ``score``, ``baseline``, ``excess`` (score - baseline)."""
        w, r = torch.tensor(self.writers), torch.tensor(self.readers)
        i, j = torch.nonzero(w[:, None, 0] < r[None, :, 0], as_tuple=True)
        score = self.scores[i, j].double().numpy()
        return pd.DataFrame({
            "writer": [f"L{a}H{b}" for a, b in w[i].tolist()], "reader": [f"L{a}H{b}" for a, b in r[j].tolist()],
            "writer_layer": w[i, 0].numpy(), "writer_head": w[i, 1].numpy(),
            "reader_layer": r[j, 0].numpy(), "reader_head": r[j, 1].numpy(), "kind": self.kind,
            "score": score, "baseline": self.baseline, "excess": score - self.baseline})

    def top(self, reader: tuple[int, int] | str, k: int = 5) -> pd.DataFrame:
        """The ``k`` writers that compose most with ``reader`` (rows of :meth:`frame`, best first)."""
        name = reader if isinstance(reader, str) else f"L{reader[0]}H{reader[1]}"
        rows = self.frame()
        rows = rows[rows["reader"] == name]
        if rows.empty and name not in {f"L{a}H{b}" for a, b in self.readers}:
            raise HeadlensError(f"{name} is not among the readers scored")
        return rows.sort_values("score", ascending=False, na_position="last", kind="stable").head(k)

    def __repr__(self) -> str:
        return (f"Composition({self.kind.upper()}-composition, {len(self.writers)} writers x {len(self.readers)} "
                f"readers, baseline {self.baseline:.4g})")


def _kind(kind: str) -> str:
    k = str(kind).lower()
    if k not in COMPOSITION_KINDS:
        raise HeadlensError(f"composition kind must be 'q', 'k' or 'v', not {kind!r}")
    return k


def _heads(model: HeadModel, heads, what: str) -> list[tuple[int, int]]:
    """``heads`` (``(layer, head)`` pairs or ``"L0H1"`` names; None: every head) as sorted unique pairs."""
    if heads is None:
        return model.heads()
    out = set()
    for h in heads:
        if isinstance(h, str):
            layer, sep, head = h.upper().removeprefix("L").partition("H")
            if not (sep and layer.isdigit() and head.isdigit()):
                raise HeadlensError(f"a head is (layer, head) or a name like 'L0H1', not {h!r}")
            h = (int(layer), int(head))
        try:
            entry = tuple(int(x) for x in h)
        except (TypeError, ValueError):
            raise HeadlensError(f"a head is (layer, head) or a name like 'L0H1', not {h!r}") from None
        check_head(model, entry)
        out.add(entry)
    if not out:
        raise HeadlensError(f"composition needs at least one {what} head")
    return sorted(out)


def head_factors(model: HeadModel, layer: int, heads: Sequence[int], side: str,
                 device=None) -> Float[Tensor, "n k d"]:
    """The reduced factors of some heads of one layer, in float32: ``side="writer"``: ``X = R_V W_O``
    ``[n, k, d_model]`` (``||X N||_F = ||W_OV N||_F`` for every ``N``); ``side`` ``"q"``, ``"k"`` or
    ``"v"`` (the reader): ``Y^T = (F R_G^T)^T`` ``[n, k, d_model]`` (``||N Y||_F = ||N M||_F`` for the
    reader's matrix ``M = F G^T``). ``k = min(d_head, d_model)``. Key/value weights are expanded to the
    query heads (grouped-query attention)."""
    device = model.device if device is None else device
    idx = torch.as_tensor(list(heads), dtype=torch.long)

    def w(name: str) -> Tensor:      # [n, d, dh] (W_O: [n, dh, d]) in float32, this layer's chosen heads only
        m = layer_weights(model, name, [layer], device)
        if name in ("W_K", "W_V"):
            m = per_query_head(model, m)
        return m[0, idx.to(m.device)].float()
    if side == "writer":
        return torch.linalg.qr(w("W_V"), mode="r").R @ w("W_O")              # [n, k, dh] @ [n, dh, d]
    f, g = {"q": ("W_Q", "W_K"), "k": ("W_K", "W_Q"), "v": ("W_V", "W_O")}[side]
    gm = w(g)
    r = torch.linalg.qr(gm.transpose(-2, -1) if g == "W_O" else gm, mode="r").R   # [n, k, dh]
    return r @ w(f).transpose(-2, -1)                                       # (F R^T)^T: [n, k, d]


def pair_scores(x: Float[Tensor, "a k d"], y: Float[Tensor, "b k d"]) -> Float[Tensor, "a b"]:
    """``||x_i y_j^T||_F / (||x_i||_F ||y_j||_F)`` for every pair, one matrix product for all of them
    (NaN where a factor is zero)."""
    a, k, d = x.shape
    b = y.shape[0]
    prod = (x.reshape(a * k, d) @ y.reshape(b * k, d).T).view(a, k, b, y.shape[1])
    num = prod.square_().sum((1, 3)).sqrt()
    den = x.square().sum((1, 2)).sqrt()[:, None] * y.square().sum((1, 2)).sqrt()[None, :]
    return torch.where(den > 0, num / den, torch.full_like(num, float("nan")))


def composition_baseline(d_model: int, d_head: int, n_samples: int = N_SAMPLES, seed: int = 0,
                         device=None) -> Float[Tensor, " n_samples"]:
    """``[n_samples]`` composition scores of random matrices of a head's shapes: ``W_OV = V O`` and
    ``M = F G^T`` with ``V, O^T, F, G`` independent ``[d_model, d_head]`` standard Gaussians (drawn on the
    CPU from ``seed``, one sample at a time). Q-, K- and V-composition pair matrices of the same shapes, so
    this is the baseline of all three (Elhage et al. compare with random matrices of the same shapes)."""
    g = torch.Generator().manual_seed(int(seed))
    out = torch.empty(n_samples)
    for i in range(n_samples):   # one sample at a time: four [d_model, d_head] draws (0.5 GiB at 8192 x 128 x 100)
        v, o, f, gg = (torch.randn(d_model, d_head, generator=g).to(device) for _ in range(4))
        x = torch.linalg.qr(v, mode="r").R @ o.T                   # [k, d]
        y = torch.linalg.qr(gg, mode="r").R @ f.T                  # [k, d]
        out[i] = pair_scores(x[None], y[None])[0, 0].cpu()
    return out


def composition(model: HeadModel, kind: str = "k", heads=None, *, writers=None, readers=None,
                n_samples: int = N_SAMPLES, seed: int = 0) -> Composition:
    """Q-, K- or V-composition scores (``kind``) between every writer head and every reader head in a later
    layer (module docstring: definitions, conventions, the low-rank computation).

    ``heads``: the heads on both sides (``(layer, head)`` pairs or ``"L0H1"`` names; None: all);
    ``writers`` / ``readers`` restrict one side (e.g. the previous-token heads and the induction heads: only
    those pairs are computed). ``n_samples`` random-matrix draws (from ``seed``) give the baseline
    (0: none, NaN). Weights are the bridge's: its compatibility mode folds the norms' gains into
    ``W_Q/W_K/W_V`` (and centres them after a LayerNorm) and centres the writing weights ``W_O``, so the
    scores are those of the processed model, as TransformerLens computes them.

    Returns a :class:`Composition`: ``.scores`` ``[n_writers, n_readers]`` (NaN unless the reader's layer
    is after the writer's), ``.grid()`` ``[n_layers, n_heads, n_layers, n_heads]``, ``.frame()`` one row
    per pair with ``score``, ``baseline`` and ``excess``. Cost: ``d_head^2 x d_model`` multiply-adds per
    pair, a QR per head; the pairs go in chunks of readers (against blocks of writers) sized by the
    runtime's memory budget (:func:`headlens.runtime.chunked`), one layer's weights read at a time.

    >>> comp = hl.composition(model, "k", readers=[(1, 2)])           # doctest: +SKIP
    >>> comp.top((1, 2), k=3)[["writer", "score", "baseline"]]        # doctest: +SKIP
    """
    kind = _kind(kind)
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 0:
        raise HeadlensError(f"n_samples must be a whole number >= 0, not {n_samples!r}")
    writers, readers = _heads(model, writers, "writer"), _heads(model, readers, "reader")
    if heads is not None:
        both = set(_heads(model, heads, "model"))
        writers, readers = [h for h in writers if h in both], [h for h in readers if h in both]
    if not writers or not readers:
        raise HeadlensError(f"no {'writer' if not writers else 'reader'} head left among the heads given")
    info = model.info
    d, dh = info.d_model, info.d_head
    k = min(d, dh)
    itemsize = layer_weights(model, "W_O", [0])[0, :1].element_size()
    layer_bytes = 2 * model.n_heads * d * dh * (itemsize + 4)   # two matrices of one layer, as read and in float32
    head_bytes = 3 * k * d * 4 + d * dh * 4                    # a head's factor and its QR's temporaries
    pair_bytes = 2 * k * k * 4                                 # a pair's [k, k] product and its square
    room = budget(model.device, model.weight_bytes(), head_bytes + pair_bytes, layer_bytes)
    block = plan(head_bytes, room=room // 2, n_items=len(writers))     # writers per block
    w_layer = torch.tensor([l for l, _ in writers])

    def factors(heads: Sequence[tuple[int, int]], side: str) -> Tensor:   # [n, k, d], one layer at a time
        parts = []
        for layer in sorted({l for l, _ in heads}):
            parts.append(head_factors(model, layer, [h for l, h in heads if l == layer], side))
        return torch.cat(parts)

    def chunk(part: Sequence[tuple[int, int]]) -> Tensor:      # [n_writers, len(part)] on the CPU
        out = torch.full((len(writers), len(part)), float("nan"))
        y = factors(part, kind)
        r_layer = torch.tensor([l for l, _ in part])
        todo = torch.nonzero(w_layer < r_layer.max()).flatten()   # writers some reader of the chunk comes after
        for s in range(0, len(todo), block):
            rows = todo[s:s + block]
            x = factors([writers[i] for i in rows.tolist()], "writer")
            got = pair_scores(x, y).cpu()
            out[rows] = torch.where(w_layer[rows, None] < r_layer[None, :], got, torch.full_like(got, float("nan")))
            del x
        return out

    stats: dict = {}
    with torch.no_grad():
        parts = chunked(chunk, readers, item_bytes=head_bytes + block * pair_bytes, device=model.device,
                        weights=model.weight_bytes(), reserve=layer_bytes + block * head_bytes,
                        description=f"{kind.upper()}-composition", key=(kind, writers, readers), stats=stats)
        samples = (composition_baseline(d, dh, n_samples, seed, model.device) if n_samples
                   else torch.empty(0))
    scores = torch.cat(parts, dim=1)
    mean = float(samples.mean()) if n_samples else math.nan
    std = float(samples.std()) if n_samples > 1 else math.nan
    return Composition(kind=kind, writers=list(writers), readers=list(readers), scores=scores, baseline=mean,
                       baseline_std=std, baseline_samples=samples, n_layers=model.n_layers, n_heads=model.n_heads,
                       info={"writers_per_block": int(block), "readers_per_chunk": stats.get("per_chunk"),
                             "reader_chunks": stats.get("chunks"), "seed": seed, "n_samples": n_samples})
