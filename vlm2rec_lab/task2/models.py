"""Task 2's sequence models (docs/method.md §4; the paper's Table 4): SASRec and GRU4Rec over an item table.

* Item representation (:class:`ItemTable`): a learnable ID table, or a trainable
  ``Linear(d -> hidden)`` over frozen item embeddings (:mod:`vlm2rec_lab.task2.items`), transformed
  once over the catalogue first (:func:`prepare_init_table`: whitened with shrinkage by default,
  ours). The same vectors serve as input embeddings and as output item vectors (score = dot product
  with the sequence state).
* Encoders: SASRec (Kang & McAuley, 2018: causal self-attention, learned positions, pre-norm
  blocks) and GRU4Rec (Hidasi et al., 2016: embedding -> dropout -> GRU), behind RecBole's interface
  ``forward(item_seq, seq_len)``, ``calculate_loss(batch)``, ``predict(batch)``.

Sequence layout (RecBole's): item ids shifted by one so that 0 is padding, sequences *left*-aligned
``[i_1, ..., i_n, 0, ..., 0]`` with ``seq_len = n``. With this layout a causal encoder never sees
padding from a real position, for SASRec and the GRU alike.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..accel.softmax_ce import softmax_ce
from .config import INIT_TRANSFORMS, DownstreamConfig


def prepare_init_table(e: np.ndarray, transform: str = "whiten", eps: float = 1.0) -> np.ndarray:
    """Frozen item vectors as the Task 2 Linear sees them, computed once over the catalogue (ours).

    VLM embeddings are anisotropic: item vectors crowd a narrow cone around one shared direction,
    and after L2 normalisation alone a ``Linear(d -> hidden)`` can hardly tell such rows apart.

    - ``whiten`` (default): centre on the catalogue mean, rotate onto the covariance's
      eigenvectors and scale each by ``1 / sqrt(λ_k + ε·mean(λ))``: whitening with shrinkage. At the
      default ε = 1 the dominant directions come out near unit variance and the weak ones keep
      their proportion (ε → 0 is plain PCA whitening, which lifts directions of noise to unit scale
      as well; ε → ∞ only centres).
    - ``standardize``: centre, divide each dimension by ``sqrt(σ² + ε·mean(σ²))``.
    - ``l2``: rows scaled to unit length (the earlier default).
    - ``raw``: as stored.
    ``eps`` is relative to the mean variance, so the transform does not depend on the embeddings' scale.
    """
    e = np.asarray(e, dtype=np.float64)
    if transform == "raw":
        out = e
    elif transform == "l2":
        out = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    elif transform in ("standardize", "whiten"):
        c = e - e.mean(0, keepdims=True)
        var = c.var(0)
        floor = eps * max(float(var.mean()), np.finfo(np.float64).tiny)
        if transform == "standardize":
            out = c / np.sqrt(var + floor)
        else:
            lam, vec = np.linalg.eigh(c.T @ c / len(c))
            lam = np.maximum(lam, 0.0)
            out = (c @ vec) / np.sqrt(lam + eps * max(float(lam.mean()), np.finfo(np.float64).tiny))
    else:
        raise ValueError(f"init transform: {transform!r} is not one of {', '.join(INIT_TRANSFORMS)}")
    return out.astype(np.float32)


class ItemTable(nn.Module):
    """Item vectors ``(n_items + 1, hidden)``, row 0 the (zero) padding row.

    ID: a learnable table (normal init, std 0.02). Init: ``Linear(d -> hidden)`` (trainable) over
    the frozen embeddings (docs/method.md §4), after :func:`prepare_init_table` (``transform``, ours).
    """

    def __init__(self, n_items: int, hidden: int, embeddings: np.ndarray | None = None,
                 transform: str = "whiten", eps: float = 1.0):
        super().__init__()
        self.n_items = n_items
        if embeddings is None:
            self.table = nn.Embedding(n_items + 1, hidden, padding_idx=0)
            nn.init.normal_(self.table.weight, std=0.02)
            with torch.no_grad():
                self.table.weight[0].zero_()
            self.proj = None
        else:
            if len(embeddings) != n_items:
                raise ValueError(f"embeddings have {len(embeddings)} rows for {n_items} items")
            e = torch.as_tensor(prepare_init_table(embeddings, transform, eps))
            self.register_buffer("frozen", e)  # (n_items, d), not a parameter
            self.proj = nn.Linear(e.shape[1], hidden)
            self.table = None

    def weight(self) -> torch.Tensor:
        """(n_items + 1, hidden): the padding row, then one row per item."""
        if self.proj is None:
            return self.table.weight
        w = self.proj(self.frozen)
        return torch.cat([w.new_zeros(1, w.shape[1]), w])


class _Block(nn.Module):
    """Pre-norm transformer block with causal self-attention (SASRec's block, Kang & McAuley 2018)."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, T, H/h)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.out(attn.transpose(1, 2).reshape(B, T, H)))
        return x + self.drop(self.ff(self.ln2(x)))


class SASRecEncoder(nn.Module):
    """Item vectors (B, T, H) -> states (B, T, H): items + learned positions, causal blocks, final
    layer norm. Positions count from the first item of the (left-aligned) window."""

    def __init__(self, hidden: int, max_len: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.pos = nn.Embedding(max_len, hidden)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x + self.pos.weight[: x.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class GRU4RecEncoder(nn.Module):
    """Item vectors (B, T, H) -> states (B, T, H): dropout, then a GRU (Hidasi et al., 2016)."""

    def __init__(self, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(self.drop(x))[0]


def gather_rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``w[idx]`` through ``index_select``: on CPU the backward of advanced indexing accumulates
    repeated indices in a thread-dependent order (not reproducible with 2+ threads); this is."""
    return w.index_select(0, idx.reshape(-1)).view(*idx.shape, w.shape[1])


class SeqRec(nn.Module):
    """A sequence model over an :class:`ItemTable`, with RecBole's interface; not built on its own:
    :class:`SASRec` and :class:`GRU4Rec` (:func:`build_model`) add their encoder (``self.encoder``:
    item vectors (B, T, H) -> states (B, T, H)).

    Batches are dicts of tensors in the model layout (ids + 1, left-aligned, 0 = padding):
    ``item_seq`` (B, T), ``seq_len`` (B,); for training ``targets`` (B, T) (0 = no target) and, for
    BCE, ``negatives`` (B, T); for prediction optionally ``candidates`` (B, M) (ids + 1).
    """

    encoder: nn.Module

    def __init__(self, cfg: DownstreamConfig, n_items: int, embeddings: np.ndarray | None = None):
        super().__init__()
        self.loss_type = cfg.loss
        self.ce_dtype = torch.float32  # train() sets the fast dtype for its device
        self.items = ItemTable(n_items, cfg.hidden, embeddings, cfg.init_transform, cfg.init_eps)
        self.input_scale = math.sqrt(cfg.hidden)  # inputs scaled by sqrt(H) as in SASRec; for the GRU too (ours)

    def states(self, item_seq: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, T, H): the state after each position (causal: depends on positions <= t)."""
        w = self.items.weight() if weight is None else weight
        return self.encoder(gather_rows(w, item_seq) * self.input_scale)

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T), (B,) -> (B, H): the state at each sequence's last item."""
        h = self.states(item_seq, weight)
        return h[torch.arange(h.shape[0], device=h.device), seq_len - 1]

    def calculate_loss(self, batch: dict) -> torch.Tensor:
        """Mean over target positions: full-softmax cross-entropy, or BCE with one negative."""
        w = self.items.weight()  # (N + 1, H)
        h = self.states(batch["item_seq"], w)
        mask = batch["targets"] > 0
        hv, t = h[mask], batch["targets"][mask]  # (P, H), (P,)
        if self.loss_type == "ce":
            return softmax_ce(hv, w[1:], t - 1, self.ce_dtype)
        pos = (hv * gather_rows(w, t)).sum(-1)
        neg = (hv * gather_rows(w, batch["negatives"][mask])).sum(-1)
        return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + \
            F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))

    def predict(self, batch: dict) -> torch.Tensor:
        """Scores (B, M) of ``candidates`` (ids + 1), or (B, n_items) of every item when absent."""
        w = self.items.weight()
        h = self.forward(batch["item_seq"], batch["seq_len"], w)
        cand = batch.get("candidates")
        if cand is None:
            return h @ w[1:].T
        return torch.einsum("bh,bmh->bm", h, gather_rows(w, cand))


class SASRec(SeqRec):
    """SASRec (Kang & McAuley, 2018) over an :class:`ItemTable`."""

    def __init__(self, cfg: DownstreamConfig, n_items: int, max_len: int, embeddings: np.ndarray | None = None):
        super().__init__(cfg, n_items, embeddings)
        self.encoder = SASRecEncoder(cfg.hidden, max_len, cfg.layers, cfg.heads, cfg.dropout)


class GRU4Rec(SeqRec):
    """GRU4Rec (Hidasi et al., 2016) over an :class:`ItemTable`; ``max_len`` is not used (a GRU has no
    positions) and kept for one signature with :class:`SASRec`."""

    def __init__(self, cfg: DownstreamConfig, n_items: int, max_len: int, embeddings: np.ndarray | None = None):
        super().__init__(cfg, n_items, embeddings)
        self.encoder = GRU4RecEncoder(cfg.hidden, cfg.layers, cfg.dropout)


def build_model(cfg: DownstreamConfig, n_items: int, max_len: int, embeddings: np.ndarray | None = None) -> SeqRec:
    """``cfg.model``'s model (sasrec or gru4rec) for ``n_items`` items and windows of ``max_len``."""
    return {"sasrec": SASRec, "gru4rec": GRU4Rec}[cfg.model](cfg, n_items, max_len, embeddings)
