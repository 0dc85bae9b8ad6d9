"""Task 2 (DESIGN §4; the paper's Table 4 and Fig. 3): SASRec and GRU4Rec over ID or VLM-initialised
item representations, trained per seed and evaluated through the Task 1 protocol.

* Item representation (:class:`ItemTable`): a learnable ID table, or a trainable
  ``Linear(d -> hidden)`` over frozen item embeddings read from a run folder
  (``RUN/embeddings/item_{F,T,V}.npy`` whose rows follow ``RUN/embeddings/item_ids.txt``) or from a
  ``.npy`` plus an id file (:func:`load_item_embeddings`), transformed once over the catalogue
  first (:func:`prepare_init_table`: whitened with shrinkage by default, ours). The same vectors
  serve as input embeddings and as output item vectors (score = dot product with the sequence
  state). A run set gives one table per training seed (:func:`load_run_set_embeddings`).
* Encoders: SASRec (Kang & McAuley, 2018: causal self-attention, learned positions, pre-norm
  blocks) and GRU4Rec (Hidasi et al., 2016: embedding -> dropout -> GRU), behind RecBole's interface
  ``forward(item_seq, seq_len)``, ``calculate_loss(batch)``, ``predict(batch)``.
* Training (:func:`train`): SASRec-style sequence-to-sequence targets (one forward per window
  predicts every next item), full-softmax cross-entropy by default or BCE with one sampled
  negative, early stopping on validation NDCG@10 (sampled protocol, the seed's frozen negatives).
* Evaluation (:func:`run`): :func:`vlm2rec_lab.evaluate.evaluate` on the test split with the seed's
  frozen 100 negatives and full ranking, and cold-start buckets by the target item's training
  frequency (Fig. 3).

Internal sequence layout (RecBole's): item ids shifted by one so that 0 is padding, sequences
*left*-aligned ``[i_1, ..., i_n, 0, ..., 0]`` with ``seq_len = n``. With this layout a causal
encoder never sees padding from a real position, for SASRec and the GRU alike.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .config import to_dict
from .evaluate import METRIC_NAMES, Evaluation, bucket_metrics, evaluate

MODELS = ("sasrec", "gru4rec")
LOSSES = ("ce", "bce")
MODALITIES = ("F", "T", "V")
COLD_START_EDGES = (0, 5, 10, 20, 50, math.inf)
INIT_TRANSFORMS = ("whiten", "standardize", "l2", "raw")
EVAL_BATCH = 512  # users per scoring call: the (B, 101, H) candidate gather stays small (measured on CPU)


@dataclass
class DownstreamConfig:
    """One Task 2 run (DESIGN §4). ``None`` fields take the defaults listed in the comments."""

    model: str = "sasrec"
    hidden: int = 128  # the paper's hidden size
    layers: int = 2  # SASRec blocks / GRU layers
    heads: int = 2
    dropout: float = 0.5
    max_len: int | None = None  # None: the dataset's max_len
    loss: str = "ce"  # "ce": full-softmax cross-entropy; "bce": one sampled negative per position
    epochs: int = 200  # upper bound; early stopping decides
    patience: int = 5  # evaluations without a better validation NDCG@10
    eval_every: int = 1  # epochs between validations
    batch_size: int = 256  # training windows per step
    lr: float = 4e-3
    weight_decay: float = 0.0
    init_transform: str = "whiten"  # the frozen table before the Linear (ours): see prepare_init_table
    init_eps: float = 1.0  # ε of whiten / standardize, relative to the mean variance
    device: str | None = None  # None: cuda when available, else cpu
    matmul: str = "auto"  # precision of the training softmax's matmuls: auto, float32, bfloat16
    threads: int | None = None  # torch intra-op threads on CPU; None leaves torch's default

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model: {self.model!r} is not one of {', '.join(MODELS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: {self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if min(self.hidden, self.layers, self.heads, self.epochs, self.patience, self.eval_every, self.batch_size) < 1:
            raise ValueError("hidden, layers, heads, epochs, patience, eval_every and batch_size must be >= 1")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len: {self.max_len} must be >= 1")
        if self.matmul not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"matmul: {self.matmul!r} is not auto, float32 or bfloat16")
        if self.init_transform not in INIT_TRANSFORMS:
            raise ValueError(f"init_transform: {self.init_transform!r} is not one of {', '.join(INIT_TRANSFORMS)}")
        if self.init_eps <= 0:
            raise ValueError(f"init_eps: {self.init_eps} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: {self.dropout} is outside [0, 1)")


# --------------------------------------------------------------------------- item embeddings


class MissingItemsError(KeyError):
    """Dataset items without a row in the embedding file (a KeyError that prints its message plainly)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class ItemEmbeddings:
    """Frozen item vectors aligned to a dataset's items (row k = item_idx k), and where they came from."""

    matrix: np.ndarray  # (n_items, d) float32
    source: str
    missing: list[str] = field(default_factory=list)  # dataset item ids the file lacks
    fallback: str | None = None  # how missing rows were filled, when they were allowed
    extra: int = 0  # rows of the file whose id is not in the dataset (ignored)

    def summary(self) -> dict:
        return {"source": self.source, "dim": int(self.matrix.shape[1]), "missing": len(self.missing),
                "missing_examples": self.missing[:5], "fallback": self.fallback, "extra_rows": self.extra}


def read_item_ids(path: str | Path) -> list[str]:
    """One item id per line (trailing blank lines allowed; a blank line inside is an error)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: item id file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    ids = [ln.strip() for ln in lines]
    for k, v in enumerate(ids):
        if not v:
            raise ValueError(f"{path}:{k + 1}: empty item id")
    seen: dict[str, int] = {}
    for k, v in enumerate(ids):
        if v in seen:
            raise ValueError(f"{path}:{k + 1}: item id {v!r} repeats line {seen[v] + 1}")
        seen[v] = k
    return ids


def load_item_embeddings(dataset, init: str | Path, item_ids: str | Path | None = None, modality: str = "F",
                         on_missing: str = "error") -> ItemEmbeddings:
    """Frozen item embeddings for ``dataset``'s items, from a run folder or a ``.npy`` + id file.

    ``init`` a folder: ``init/embeddings/item_{modality}.npy`` (fused F, text T, image V; float,
    (n, d)) whose rows follow ``init/embeddings/item_ids.txt`` (``item_ids`` overrides the id file).
    ``init`` a ``.npy``: ``item_ids`` is required. Dataset items the file lacks are never silently
    zero-filled: ``on_missing="error"`` (default) raises with their count and examples;
    ``"mean"`` fills them with the mean of the present rows and records it (``.missing``,
    ``.fallback``) — a warning is also issued.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality: {modality!r} is not one of {', '.join(MODALITIES)}")
    if on_missing not in ("error", "mean"):
        raise ValueError(f"on_missing: {on_missing!r} is not 'error' or 'mean'")
    init = Path(init)
    if init.is_dir():
        emb_dir = init / "embeddings"
        npy = emb_dir / f"item_{modality}.npy"
        ids_path = Path(item_ids) if item_ids else emb_dir / "item_ids.txt"
        if not npy.exists():
            have = sorted(p.name for p in emb_dir.glob("item_*.npy")) if emb_dir.is_dir() else []
            raise FileNotFoundError(f"{npy}: no item embeddings for modality {modality} in run folder {init} "
                                    f"(expected embeddings/item_{{F,T,V}}.npy; found {have or 'none'})")
    elif init.suffix == ".npy":
        npy = init
        if not npy.exists():
            raise FileNotFoundError(f"{npy}: embedding file not found")
        if item_ids is None:
            raise ValueError(f"{npy}: a .npy needs --item-ids (one item id per line, in the file's row order)")
        ids_path = Path(item_ids)
    else:
        raise FileNotFoundError(f"{init}: --init must be 'id', a run folder or a .npy file")
    ids = read_item_ids(ids_path)
    mat = np.load(npy, allow_pickle=False)
    if mat.ndim != 2 or not np.issubdtype(mat.dtype, np.floating):
        raise ValueError(f"{npy}: expected a 2-D float array, got {mat.dtype} of shape {mat.shape}")
    if mat.shape[0] != len(ids):
        raise ValueError(f"{npy}: {mat.shape[0]} rows but {ids_path} lists {len(ids)} item ids")
    bad = np.flatnonzero(~np.isfinite(mat).all(axis=1))
    if bad.size:
        raise ValueError(f"{npy}: {bad.size} row(s) hold NaN or inf (e.g. item {ids[bad[0]]!r}, row {bad[0]})")
    row = {v: k for k, v in enumerate(ids)}
    want = dataset.items["item_id"].astype(str).tolist()
    idx = np.array([row.get(v, -1) for v in want])
    missing = [v for v, k in zip(want, idx) if k < 0]
    out = np.empty((len(want), mat.shape[1]), dtype=np.float32)
    out[idx >= 0] = mat[idx[idx >= 0]]
    fallback = None
    if missing:
        msg = (f"{npy}: {len(missing)} of {len(want)} dataset items have no embedding "
               f"(e.g. {', '.join(missing[:5])})")
        if on_missing == "error" or len(missing) == len(want):
            raise MissingItemsError(msg + "; embed every item of the dataset, or allow a fallback (on_missing='mean')")
        out[idx < 0] = out[idx >= 0].mean(0)
        fallback = "mean of the present rows"
        warnings.warn(msg + f"; filled with the {fallback}", stacklevel=2)
    extra = len(ids) - int((idx >= 0).sum())
    return ItemEmbeddings(out, str(npy), missing, fallback, extra)


# --------------------------------------------------------------------------- sequences


def left_align(histories: np.ndarray, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned, -1 padded item indices (the dataset's layout) -> the model's layout:
    ids + 1, left-aligned, 0 padded, and the lengths. Keeps the last ``max_len`` items."""
    h = np.asarray(histories)
    if max_len is not None and h.shape[1] > max_len:
        h = h[:, -max_len:]
    n, L = h.shape
    lens = (h >= 0).sum(1)
    cols = np.arange(L)[None, :]
    src = np.minimum(cols + (L - lens)[:, None], L - 1)  # row r's items sit in its last lens[r] columns
    out = np.where(cols < lens[:, None], np.take_along_axis(h, src, axis=1) + 1, 0)
    return out.astype(np.int64), lens.astype(np.int64)


def training_windows(dataset, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """SASRec-style training pairs from the training items (all but the last two) of every user.

    Returns ``inputs`` and ``targets`` (M, max_len), model layout (ids + 1, left-aligned, 0 pad):
    position t of a window is item j of a user and predicts item j + 1 from the window's first
    t + 1 items (causal attention). Each user's training items are cut into windows of ``max_len``
    targets from the end backwards, so every training item but the first is a target exactly once
    (ours: the original SASRec keeps only the last window, dropping the rest of long histories).
    """
    starts = dataset.offsets[:-1]
    n_targets = np.maximum(dataset.offsets[1:] - 2 - starts - 1, 0)  # training items but the first
    n_win = -(-n_targets // max_len)
    user = np.repeat(np.arange(starts.size), n_win)
    k = np.arange(n_win.sum()) - np.repeat(np.cumsum(n_win) - n_win, n_win)  # window k from the end
    t_end = starts[user] + 1 + n_targets[user] - k * max_len  # exclusive end of the window's targets
    t_start = np.maximum(starts[user] + 1, t_end - max_len)
    pos = t_start[:, None] + np.arange(max_len)[None, :]
    valid = pos < t_end[:, None]
    seq = dataset.seq.astype(np.int64)
    targets = np.where(valid, seq[np.where(valid, pos, 0)] + 1, 0)
    inputs = np.where(valid, seq[np.where(valid, pos - 1, 0)] + 1, 0)
    return inputs, targets


# --------------------------------------------------------------------------- models


class _SoftmaxCE(torch.autograd.Function):
    """Mean cross-entropy of ``h @ W.T`` against ``t`` in row chunks: matmuls in ``dtype``, softmax
    in float32; the (P, N) logits are never stored whole — backward recomputes each chunk (one
    extra matmul), which on CPU beats allocating and page-faulting a P x N buffer every step."""

    @staticmethod
    def forward(ctx, h, W, t, dtype):
        hd, Wd = h.to(dtype), W.to(dtype)
        rows = max(8, _CE_CHUNK // W.shape[0])
        lse, pos = h.new_empty(h.shape[0], dtype=torch.float32), h.new_empty(h.shape[0], dtype=torch.float32)
        for a in range(0, h.shape[0], rows):
            logits = (hd[a:a + rows] @ Wd.T).float()  # (rows, N)
            lse[a:a + rows] = torch.logsumexp(logits, 1)
            pos[a:a + rows] = logits.gather(1, t[a:a + rows, None]).squeeze(1)
        ctx.save_for_backward(h, W, t, lse)
        ctx.dtype, ctx.rows = dtype, rows
        return (lse - pos).mean()

    @staticmethod
    def backward(ctx, grad):
        h, W, t, lse = ctx.saved_tensors
        hd, Wd, rows = h.to(ctx.dtype), W.to(ctx.dtype), ctx.rows
        gh, gW = torch.empty_like(h), torch.zeros(W.shape, dtype=torch.float32, device=W.device)
        scale = grad / h.shape[0]
        for a in range(0, h.shape[0], rows):
            p = (hd[a:a + rows] @ Wd.T).float().sub_(lse[a:a + rows, None]).exp_()  # softmax (rows, N)
            p[torch.arange(p.shape[0], device=p.device), t[a:a + rows]] -= 1.0
            g = p.mul_(scale).to(ctx.dtype)
            gh[a:a + rows] = g @ Wd
            gW += (g.T @ hd[a:a + rows]).float()
        return gh, gW.to(W.dtype), None, None


_CE_CHUNK = 3_000_000  # logits per chunk (12 MB in float32): stays in the allocator's heap and cache


def softmax_ce(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Full-softmax cross-entropy over all items: ``mean_p -log softmax(h_p W^T)[t_p]``.

    Args:
        h: (P, H) sequence states at target positions.
        W: (N, H) item vectors (no padding row).
        targets: (P,) item index in [0, N).
        dtype: matmul precision; ``torch.bfloat16`` runs about 2x faster on CPUs with bf16 units
            (ours; the softmax stays float32). Equals ``F.cross_entropy(h @ W.T, targets)`` in float32.
    """
    return _SoftmaxCE.apply(h, W, targets, dtype)


def matmul_dtype(device: str, setting: str = "auto") -> torch.dtype:
    """``auto``: bfloat16 on a CPU with native bf16 (avx512_bf16 / amx_bf16), else float32."""
    if setting != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]
    if not device.startswith("cpu"):
        return torch.float32
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


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
    the frozen embeddings (DESIGN §4), after :func:`prepare_init_table` (``transform``, ours).
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
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(B, T, H)))
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


def rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``w[idx]`` through ``index_select``: on CPU the backward of advanced indexing accumulates
    repeated indices in a thread-dependent order (not reproducible with 2+ threads); this is."""
    return w.index_select(0, idx.reshape(-1)).view(*idx.shape, w.shape[1])


class SeqRec(nn.Module):
    """SASRec or GRU4Rec over an :class:`ItemTable`, with RecBole's interface.

    Batches are dicts of tensors in the model layout (ids + 1, left-aligned, 0 = padding):
    ``item_seq`` (B, T), ``seq_len`` (B,); for training ``targets`` (B, T) (0 = no target) and, for
    BCE, ``negatives`` (B, T); for prediction optionally ``candidates`` (B, M) (ids + 1).
    """

    def __init__(self, cfg: DownstreamConfig, n_items: int, max_len: int, embeddings: np.ndarray | None = None):
        super().__init__()
        self.loss_type = cfg.loss
        self.ce_dtype = torch.float32  # train() sets the fast dtype for its device
        self.items = ItemTable(n_items, cfg.hidden, embeddings, cfg.init_transform, cfg.init_eps)
        self.input_scale = math.sqrt(cfg.hidden)  # inputs scaled by sqrt(H) as in SASRec; for the GRU too (ours)
        if cfg.model == "sasrec":
            self.encoder = SASRecEncoder(cfg.hidden, max_len, cfg.layers, cfg.heads, cfg.dropout)
        else:
            self.encoder = GRU4RecEncoder(cfg.hidden, cfg.layers, cfg.dropout)

    def states(self, item_seq: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, T, H): the state after each position (causal: depends on positions <= t)."""
        w = self.items.weight() if weight is None else weight
        return self.encoder(rows(w, item_seq) * self.input_scale)

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
        pos = (hv * rows(w, t)).sum(-1)
        neg = (hv * rows(w, batch["negatives"][mask])).sum(-1)
        return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + \
            F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))

    def predict(self, batch: dict) -> torch.Tensor:
        """Scores (B, M) of ``candidates`` (ids + 1), or (B, n_items) of every item when absent."""
        w = self.items.weight()
        h = self.forward(batch["item_seq"], batch["seq_len"], w)
        cand = batch.get("candidates")
        if cand is None:
            return h @ w[1:].T
        return torch.einsum("bh,bmh->bm", h, rows(w, cand))


class ModelScorer:
    """A :class:`SeqRec` as an evaluation scorer ``(histories, candidates) -> scores`` (DESIGN §4)."""

    def __init__(self, model: SeqRec, max_len: int, device: str = "cpu", name: str = "model"):
        self.model, self.max_len, self.device, self.name = model, max_len, device, name

    @torch.no_grad()
    def __call__(self, histories: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        seq, lens = left_align(histories, self.max_len)
        batch = {"item_seq": torch.as_tensor(seq, device=self.device),
                 "seq_len": torch.as_tensor(lens, device=self.device)}
        if candidates is not None:
            batch["candidates"] = torch.as_tensor(np.asarray(candidates, dtype=np.int64) + 1, device=self.device)
        scores = self.model.predict(batch).float().cpu().numpy()
        self.model.train(was_training)
        return scores


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """A trained model (restored to its best validation epoch) and how training went."""

    model: SeqRec
    seed: int
    best_epoch: int
    best_valid_ndcg: float
    epochs: int  # epochs run
    train_seconds: float  # wall time of the whole loop, validations included
    seconds_to_best: float  # wall time until the best validation was measured
    history: list[dict] = field(default_factory=list)  # per epoch: loss, seconds, valid NDCG@10

    def summary(self) -> dict:
        epoch_s = [h["train_seconds"] for h in self.history]
        return {"seed": self.seed, "epochs": self.epochs, "best_epoch": self.best_epoch,
                "best_valid_NDCG@10": self.best_valid_ndcg, "train_seconds": round(self.train_seconds, 2),
                "seconds_to_best": round(self.seconds_to_best, 2),
                "seconds_per_epoch": round(float(np.mean(epoch_s)), 3) if epoch_s else None}


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return device


def with_max_len(dataset, max_len: int):
    """A shallow view of ``dataset`` whose histories keep ``max_len`` items (for the protocol)."""
    if max_len == dataset.max_len:
        return dataset
    manifest = {**dataset.manifest, "config": {**dataset.manifest["config"], "max_len": max_len}}
    return dataclasses.replace(dataset, manifest=manifest)


def _bce_negatives(targets: np.ndarray, n_items: int, rng: np.random.Generator) -> np.ndarray:
    """One uniform negative per target position (ids + 1), redrawn where it equals the target."""
    neg = rng.integers(1, n_items + 1, size=targets.shape)
    clash = neg == targets
    while clash.any():
        neg[clash] = rng.integers(1, n_items + 1, size=int(clash.sum()))
        clash = neg == targets
    return neg


def validate(model: SeqRec, dataset, seed: int, max_len: int, device: str) -> float:
    """Validation NDCG@10, sampled protocol with the seed's frozen negatives (vectorised)."""
    ev = evaluate(with_max_len(dataset, max_len), ModelScorer(model, max_len, device), split="valid",
                  seeds=[seed], batch_size=EVAL_BATCH, progress=False)
    return float(ev.sampled.loc[seed, "NDCG@10"])


def train(dataset, cfg: DownstreamConfig, seed: int = 0, embeddings: np.ndarray | None = None,
          log=None) -> TrainResult:
    """Train one model with ``seed`` (torch and numpy seeded here; same seed => same numbers on CPU).

    Each epoch visits every training window once in a seeded order; validation every
    ``cfg.eval_every`` epochs; stops after ``cfg.patience`` validations without improvement and
    restores the best weights. ``log(dict)`` receives one record per epoch.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    L = cfg.max_len or dataset.max_len
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SeqRec(cfg, dataset.n_items, L, embeddings).to(device)
    model.ce_dtype = matmul_dtype(device, cfg.matmul)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    inputs, targets = training_windows(dataset, L)
    if inputs.shape[0] == 0:
        raise ValueError("no training windows: every user has a single training item")
    best, best_state, best_epoch, to_best, bad = -1.0, None, 0, 0.0, 0
    history: list[dict] = []
    t0 = time.perf_counter()
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        te = time.perf_counter()
        model.train()
        order = rng.permutation(inputs.shape[0])
        total, steps = 0.0, 0
        for a in range(0, order.size, cfg.batch_size):
            rows = order[a:a + cfg.batch_size]
            batch = {"item_seq": torch.as_tensor(inputs[rows], device=device),
                     "targets": torch.as_tensor(targets[rows], device=device)}
            if cfg.loss == "bce":
                batch["negatives"] = torch.as_tensor(_bce_negatives(targets[rows], dataset.n_items, rng), device=device)
            loss = model.calculate_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.detach().item(), steps + 1
        rec = {"epoch": epoch, "loss": total / steps, "train_seconds": time.perf_counter() - te}
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            score = validate(model, dataset, seed, L, device)
            rec["valid_NDCG@10"] = score
            if score > best:
                best, best_epoch, bad = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                to_best = time.perf_counter() - t0
            else:
                bad += 1
        rec["seconds"] = time.perf_counter() - t0
        history.append(rec)
        if log is not None:
            log(rec)
        if bad >= cfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, seed, best_epoch, best, epoch, time.perf_counter() - t0, to_best, history)


# --------------------------------------------------------------------------- the whole of Task 2


@dataclass
class DownstreamResult:
    """Per-seed test (sampled + full) and validation metrics, cold-start buckets, training records."""

    test: Evaluation
    valid: Evaluation
    cold_start: pd.DataFrame  # bucket x (users, metrics), mean over seeds, sampled protocol
    runs: list[dict]
    config: DownstreamConfig
    init: dict
    models: dict[int, SeqRec] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        t = self.test.to_dict()
        return {"model": self.config.model, "init": self.init, "config": to_dict(self.config),
                "test": {k: t[k] for k in ("sampled", "full") if k in t},
                "valid": {"sampled": self.valid.to_dict()["sampled"]},
                "cold_start": {str(b): {k: int(v) if k == "users" else float(v) for k, v in row.items()}
                               for b, row in self.cold_start.iterrows()},
                "runs": self.runs}


def _concat(evals: list[Evaluation], name: str, split: str) -> Evaluation:
    full = [e.full for e in evals if e.full is not None]
    return Evaluation(name, split, pd.concat([e.sampled for e in evals]),
                      pd.concat(full) if full else None, {s: r for e in evals for s, r in e.ranks.items()})


def run(dataset, cfg: DownstreamConfig, seeds=(0, 1, 2, 3, 4),
        embeddings: ItemEmbeddings | Mapping[int, ItemEmbeddings] | None = None, log=None) -> DownstreamResult:
    """Train one model per seed, evaluate each with that seed's frozen negatives (test: sampled and
    full ranking; valid: sampled), and bucket the test ranks by the target's training frequency.

    ``embeddings``: one frozen table for every seed, or {seed: table} so that the embedder's run of
    training seed s initialises the downstream model of seed s (DESIGN §4: a seed is a training run)."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("at least one seed is needed")
    per_seed = embeddings if isinstance(embeddings, Mapping) else {s: embeddings for s in seeds}
    lacking = [s for s in seeds if s not in per_seed]
    if lacking:
        raise ValueError(f"no item embeddings for seeds {lacking} (an embedder run per training seed is needed)")
    missing = [s for s in seeds if s not in dataset.seeds]
    if missing:
        raise ValueError(f"seeds {missing} have no frozen negatives in {dataset.path}; prepared seeds: {dataset.seeds}")
    L = cfg.max_len or dataset.max_len
    view = with_max_len(dataset, L)
    device = resolve_device(cfg.device)
    name = f"{cfg.model}-{'id' if embeddings is None else 'init'}"
    tests, valids, runs, models = [], [], [], {}
    for s in seeds:
        res = train(dataset, cfg, s, None if per_seed[s] is None else per_seed[s].matrix,
                    log=None if log is None else (lambda rec, s=s: log({"seed": s, **rec})))
        sc = ModelScorer(res.model, L, device, name)
        tests.append(evaluate(view, sc, "test", [s], full_ranking=True, batch_size=EVAL_BATCH, name=name, progress=False))
        valids.append(evaluate(view, sc, "valid", [s], batch_size=EVAL_BATCH, name=name, progress=False))
        runs.append(res.summary())
        models[s] = res.model
    test, valid = _concat(tests, name, "test"), _concat(valids, name, "valid")
    freq = dataset.train_item_counts()[dataset.targets("test")]
    buckets = [bucket_metrics(test.ranks[s], freq, COLD_START_EDGES) for s in seeds]
    cold = pd.concat(buckets).groupby(level=0, sort=False).mean()
    cold["users"] = cold["users"].astype(int)
    if embeddings is None:
        init = {"kind": "id"}
    elif isinstance(embeddings, Mapping):
        init = {"kind": "embeddings", "per_seed": {str(s): per_seed[s].summary() for s in seeds},
                "transform": cfg.init_transform, "eps": cfg.init_eps}
    else:
        init = {"kind": "embeddings", **embeddings.summary(), "transform": cfg.init_transform, "eps": cfg.init_eps}
    return DownstreamResult(test, valid, cold, runs, cfg, init, models)


def save_result(result: DownstreamResult, out: str | Path) -> Path:
    """Write ``result.json``, per-seed metrics CSV, cold-start CSV and one state dict per seed,
    each file atomically."""
    from .io import atomic_write_bytes, atomic_write_json, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "result.json", result.to_dict())
    frames = [result.test.sampled.assign(protocol="sampled"), result.test.full.assign(protocol="full")]
    atomic_write_text(out / "metrics.csv", pd.concat(frames).reset_index().to_csv(index=False))
    atomic_write_text(out / "cold_start.csv", result.cold_start.reset_index().to_csv(index=False))
    for s, m in result.models.items():
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        atomic_write_bytes(out / f"model_seed{s}.pt", buf.getvalue())
    return out


def config_from_args(a) -> DownstreamConfig:
    """CLI flags -> :class:`DownstreamConfig` (``None`` flags keep the config's defaults)."""
    given = {"model": a.model, "max_len": a.max_len, "loss": a.loss, "epochs": a.epochs, "patience": a.patience,
             "batch_size": a.batch_size, "lr": a.lr, "device": a.device,
             "threads": getattr(a, "threads", None), "init_transform": getattr(a, "init_transform", None),
             "init_eps": getattr(a, "init_eps", None)}
    return DownstreamConfig(**{k: v for k, v in given.items() if v is not None})


def load_run_set_embeddings(dataset, run_set: str | Path, modality: str = "F", on_missing: str = "error",
                            seeds=None) -> dict[int, ItemEmbeddings]:
    """{training seed: item embeddings} of a run set (``SET/seed{s}/``, see :mod:`vlm2rec_lab.runs`):
    the embedder's run of seed s initialises the downstream model of seed s."""
    from .runs import find_runs

    runs = find_runs(run_set)
    lacking = [s for s in (seeds or []) if s not in runs]
    if lacking:
        raise ValueError(f"{run_set}: no run of training seed {lacking} (it has seeds {list(runs)})")
    return {s: load_item_embeddings(dataset, r, modality=modality, on_missing=on_missing)
            for s, r in runs.items() if seeds is None or s in seeds}


def run_cli(a) -> int:
    """`vlm2rec-lab downstream`: train per seed, print metrics (table or JSON), optionally save."""
    from .data.dataset import Dataset

    cfg = config_from_args(a)
    ds = Dataset.load(a.data)
    emb = None
    init = Path(str(a.init))
    is_run = (init / "manifest.json").exists() or (init / "embeddings").is_dir()
    if str(a.init) != "id" and init.is_dir() and not is_run and not a.item_ids:
        emb = load_run_set_embeddings(ds, init, a.modality, getattr(a, "on_missing", "error"), seeds=a.seeds)
    elif str(a.init) != "id":
        emb = load_item_embeddings(ds, a.init, a.item_ids, a.modality, on_missing=getattr(a, "on_missing", "error"))
    elif a.item_ids:
        raise ValueError("--item-ids goes with --init FILE.npy (or a run folder), not with --init id")

    def log(rec):
        if "valid_NDCG@10" in rec:
            print(f"seed {rec['seed']} epoch {rec['epoch']:3d} loss {rec['loss']:.4f} "
                  f"valid NDCG@10 {rec['valid_NDCG@10']:.4f} ({rec['seconds']:.0f}s)", file=sys.stderr, flush=True)

    result = run(ds, cfg, a.seeds, emb, log=log)
    if a.out:
        save_result(result, a.out)
    if a.json:
        print(json.dumps(result.to_dict(), indent=2, default=float))
        return 0
    for which in ("sampled", "full"):
        df = result.test.protocol(which)[list(METRIC_NAMES)].copy()
        df.loc["mean"] = df.mean()
        print(f"{result.test.name} — test, {which} ranking")
        print(df.round(4).to_string())
    print(pd.DataFrame(result.runs).set_index("seed").to_string())
    print("cold start (sampled, mean over seeds):")
    print(result.cold_start.round(4).to_string())
    return 0
