"""Scorers (docs/method.md §3): reference scorers, so the evaluation protocol runs before any model exists,
and :class:`EmbeddingScorer`, a run's precomputed embeddings as a scorer.

The reference scorers are fitted on the training part of the sequences only (no valid/test target
leaks in).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class RandomScorer:
    """Uniform random scores; ``with_seed`` gives an independent stream per evaluation seed."""

    name = "random"

    def __init__(self, n_items: int, seed: int = 0):
        self.n_items, self.seed = n_items, seed
        self.rng = np.random.default_rng(seed + 7919)

    def with_seed(self, seed: int) -> "RandomScorer":
        return RandomScorer(self.n_items, seed)

    def __call__(self, histories, candidates=None):
        shape = (len(histories), self.n_items) if candidates is None else np.shape(candidates)
        return self.rng.random(shape)


class PopularityScorer:
    """Score = how often the item occurs in the training parts of all sequences."""

    name = "popularity"

    def __init__(self, dataset):
        self.counts = dataset.train_item_counts().astype(np.float64)

    def __call__(self, histories, candidates=None):
        if candidates is None:
            return np.broadcast_to(self.counts, (len(histories), self.counts.size)).copy()
        return self.counts[candidates]


class CooccurrenceScorer:
    """Item-to-item transitions: score = count(last history item -> candidate) in training sequences,
    plus popularity scaled below one count as a back-off that breaks ties (ours)."""

    name = "cooccurrence"

    def __init__(self, dataset):
        from .data.dataset import _ranges

        pos = _ranges(dataset.offsets[:-1], dataset.offsets[1:] - 3)  # training pairs (j, j + 1)
        src, dst = dataset.seq[pos], dataset.seq[pos + 1]
        n = dataset.n_items
        self.matrix = sp.csr_array((np.ones(src.size), (src, dst)), shape=(n, n))
        pop = dataset.train_item_counts().astype(np.float64)
        self.backoff = 0.5 * pop / max(pop.max(), 1.0)

    def __call__(self, histories, candidates=None):
        last = np.asarray(histories)[:, -1]
        if candidates is None:
            return self.matrix[last].toarray() + self.backoff[None, :]
        cand = np.asarray(candidates)
        vals = np.asarray(self.matrix[np.broadcast_to(last[:, None], cand.shape).ravel(), cand.ravel()]).reshape(cand.shape)
        return vals + self.backoff[cand]


class EmbeddingScorer:
    """Cosine scorer over precomputed embeddings: each history (a row of the split's histories) is
    looked up to its sequence embedding, candidates to item embeddings."""

    def __init__(self, histories: np.ndarray, seq_emb: np.ndarray, item_emb: np.ndarray, name: str = "embedding"):
        import torch
        import torch.nn.functional as F

        self.lookup = {row.tobytes(): k for k, row in enumerate(np.ascontiguousarray(histories, dtype=np.int64))}
        self.seq = F.normalize(torch.as_tensor(seq_emb, dtype=torch.float32), dim=-1).numpy()
        self.items = F.normalize(torch.as_tensor(item_emb, dtype=torch.float32), dim=-1).numpy()
        self.name = name

    def __call__(self, histories: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
        try:
            rows = [self.lookup[h.tobytes()] for h in np.ascontiguousarray(histories, dtype=np.int64)]
        except KeyError:
            raise KeyError("a history has no precomputed embedding (embeddings from another split or dataset?)") from None
        z = self.seq[rows]  # (n, d)
        if candidates is None:
            return z @ self.items.T
        return np.einsum("nd,nmd->nm", z, self.items[candidates])


SCORERS = ("random", "popularity", "cooccurrence")


def make_scorer(name: str, dataset, seed: int = 0, latents: str | None = None):
    """A reference scorer by name (:data:`SCORERS`), or ``oracle-{text,image,both,latent}`` on a
    synthetic dataset, whose latents (the domain's raw folder or its ``oracle/latents.json``) it needs."""
    if name.startswith("oracle-"):
        from .data.synthetic import OracleScorer

        if not latents:
            raise ValueError(f"--scorer {name} needs --latents (the synthetic domain's raw folder)")
        return OracleScorer(latents, dataset.items["item_id"], name.split("-", 1)[1])
    if name == "random":
        return RandomScorer(dataset.n_items, seed)
    if name == "popularity":
        return PopularityScorer(dataset)
    if name == "cooccurrence":
        return CooccurrenceScorer(dataset)
    raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
