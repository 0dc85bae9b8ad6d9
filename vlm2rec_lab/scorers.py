"""Reference scorers, so the evaluation protocol runs before any model exists (DESIGN §4).

All are fitted on the training part of the sequences only (no valid/test target leaks in).
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


SCORERS = ("random", "popularity", "cooccurrence")


def make_scorer(name: str, dataset, seed: int = 0):
    if name == "random":
        return RandomScorer(dataset.n_items, seed)
    if name == "popularity":
        return PopularityScorer(dataset)
    if name == "cooccurrence":
        return CooccurrenceScorer(dataset)
    raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
