"""Pins of the leave-one-out split as the method uses it (docs/data.md; docs/method.md §3-§5), each on a tiny dataset
written by hand in this file, with the expected values listed or counted by hand (or by a plain loop
written here), never read back from the code under test.

Per user: test target = last item, validation target = second to last, training = the rest.

* Training examples (Task 1) and Task 2's training windows use the training items only.
* Training-item counts (popularity, co-occurrence back-off, cold-start buckets) count the training
  items only.
* Task 2's early stopping reads the validation split, never the test split.

Each pin is proven by a mutant in tests/mutants_data.yaml (``python tools/mutation_check.py``).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from vlm2rec_lab.data.dataset import Dataset
from vlm2rec_lab.diagnostics import cold_start
from vlm2rec_lab.task2.config import DownstreamConfig
from vlm2rec_lab.task2.train import ModelScorer, run, train, training_windows, validate
from vlm2rec_lab.evaluate import evaluate
from vlm2rec_lab.scorers import CooccurrenceScorer, PopularityScorer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hand_dataset(seqs, n_items=None, max_len=3, negatives=None) -> Dataset:
    """An in-memory :class:`Dataset` of the given per-user item sequences (chronological), with
    negatives for seed 0 when given (one row per user)."""
    lengths = [len(s) for s in seqs]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    seq = np.concatenate([np.asarray(s) for s in seqs]).astype(np.int32)
    n = int(seq.max()) + 1 if n_items is None else n_items
    items = pd.DataFrame({"item_idx": np.arange(n, dtype=np.int32), "item_id": [f"i{k}" for k in range(n)],
                          "title": [None] * n, "image": [None] * n, "image_url": [None] * n, "category": [None] * n})
    manifest = {"config": {"max_len": max_len, "seeds": [0], "train_examples": "last"}}
    neg = None if negatives is None else {0: np.asarray(negatives, dtype=np.int32)}
    return Dataset(None, items, np.array([f"u{k}" for k in range(len(seqs))], dtype=object), offsets, seq,
                   np.arange(seq.size, dtype=np.int64), manifest, neg)


# Every item occurs once, so an item names its position: user 0's training items are 0-3 (validation
# target 4, test target 5), user 1's 6-7 (8, 9), user 2's only 10 (11, 12).
DISTINCT = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12]]
HELD_OUT = {4, 5, 8, 9, 11, 12}  # the validation and test targets


# --------------------------------------------------------------------------- 1. training windows


def test_train_examples_are_the_hand_listed_ones():
    ds = hand_dataset(DISTINCT, max_len=3)
    users, hist, tgt = ds.train_examples("last")
    # last: history = training items but the last (the last 3 kept), target = the last training item;
    # user 2 has a single training item and gives no example
    assert users.tolist() == [0, 1]
    assert hist.tolist() == [[0, 1, 2], [-1, -1, 6]]
    assert tgt.tolist() == [3, 7]
    assert [x.tolist() for x in ds.train_examples()] == [users.tolist(), hist.tolist(), tgt.tolist()]  # the manifest's mode
    users, hist, tgt = ds.train_examples("all_prefixes")
    assert users.tolist() == [0, 0, 0, 1]
    assert hist.tolist() == [[-1, -1, 0], [-1, 0, 1], [0, 1, 2], [-1, -1, 6]]
    assert tgt.tolist() == [1, 2, 3, 7]
    users, hist, tgt = ds.train_examples("all_prefixes", max_len=2)
    assert hist.tolist() == [[-1, 0], [0, 1], [1, 2], [-1, 6]] and tgt.tolist() == [1, 2, 3, 7]
    for mode in ("last", "all_prefixes"):
        _, hist, tgt = ds.train_examples(mode)
        assert not HELD_OUT & set(tgt.tolist()) and not HELD_OUT & set(hist.ravel().tolist())


def _plain_train_examples(seqs, mode, L):
    """The same examples by a plain loop over each user's training items ``s[:-2]``."""
    out = []
    for u, s in enumerate(seqs):
        tr = list(s[:-2])
        ends = [len(tr) - 1] if mode == "last" and len(tr) >= 2 else range(1, len(tr)) if mode == "all_prefixes" else []
        for j in ends:
            h = tr[max(0, j - L):j]
            out.append((u, [-1] * (L - len(h)) + h, tr[j]))
    return out


def test_train_examples_match_a_plain_implementation():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 30, rng.integers(3, 12)).tolist() for _ in range(50)]
    ds = hand_dataset(seqs, n_items=30, max_len=4)
    for mode in ("last", "all_prefixes"):
        users, hist, tgt = ds.train_examples(mode)
        got = list(zip(users.tolist(), hist.tolist(), tgt.tolist()))
        assert got == _plain_train_examples(seqs, mode, 4)


def test_task2_training_windows_are_the_hand_listed_ones():
    ds = hand_dataset(DISTINCT)
    inputs, targets = training_windows(ds, 2)
    # model layout: ids + 1, left-aligned, 0 = padding. User 0's training items 0-3 give the targets
    # 1, 2, 3, cut into windows of 2 from the end: (inputs 1 2 -> targets 2 3), then (0 -> 1);
    # user 1's 6-7 give (6 -> 7); user 2 (one training item) gives none.
    assert (inputs - 1).tolist() == [[1, 2], [0, -1], [6, -1]]
    assert (targets - 1).tolist() == [[2, 3], [1, -1], [7, -1]]
    inputs, targets = training_windows(ds, 5)
    assert (inputs - 1).tolist() == [[0, 1, 2, -1, -1], [6, -1, -1, -1, -1]]
    assert (targets - 1).tolist() == [[1, 2, 3, -1, -1], [7, -1, -1, -1, -1]]
    assert not HELD_OUT & (set((inputs - 1).ravel().tolist()) | set((targets - 1).ravel().tolist()))


def _plain_windows(seqs, L):
    """Task 2's windows by a plain loop: each user's training targets tr[1:], cut into runs of L
    from the end (the last run first), each target tr[j] with its input tr[j - 1]."""
    ins, outs = [], []
    for s in seqs:
        tr = list(s[:-2])
        js = list(range(1, len(tr)))
        while js:
            run_, js = js[-L:], js[:-L]
            ins.append([tr[j - 1] + 1 for j in run_] + [0] * (L - len(run_)))
            outs.append([tr[j] + 1 for j in run_] + [0] * (L - len(run_)))
    return ins, outs


def test_task2_training_windows_match_a_plain_implementation():
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 30, rng.integers(3, 15)).tolist() for _ in range(50)]
    ds = hand_dataset(seqs, n_items=30)
    for L in (1, 3, 4):
        inputs, targets = training_windows(ds, L)
        want_in, want_out = _plain_windows(seqs, L)
        assert inputs.tolist() == want_in and targets.tolist() == want_out


# --------------------------------------------------------------------------- 2. training-item counts

# Items 0-7. Training parts: u0 [0 1 0], u1 [1 0], u2 [4], u3 [5 5 6]; validation targets 2 3 1 0;
# test targets 3 3 2 4.
REPEATS = [[0, 1, 0, 2, 3], [1, 0, 3, 3], [4, 1, 2], [5, 5, 6, 0, 4]]
TRAIN_COUNTS = [3, 2, 0, 0, 1, 2, 1, 0]  # counted by hand over the training parts
# two negatives per user, none of them an item the user saw
REPEAT_NEG = [[5, 7], [2, 7], [0, 5], [2, 7]]


def test_train_item_counts_are_the_hand_counted_training_occurrences():
    ds = hand_dataset(REPEATS, n_items=8)
    assert ds.train_item_counts().tolist() == TRAIN_COUNTS


def test_popularity_ranks_by_training_counts_only():
    ds = hand_dataset(REPEATS, n_items=8, negatives=REPEAT_NEG)
    pop = PopularityScorer(ds)
    cand = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    assert pop(ds.histories("test")[:1], cand).tolist() == [TRAIN_COUNTS]
    assert pop(ds.histories("test")[:2], None).tolist() == [TRAIN_COUNTS, TRAIN_COUNTS]
    # test targets 3 3 2 4 have training counts 0 0 0 1; their negatives' counts:
    # u0 (5: 2, 7: 0) -> rank 1 + 1/2 tie; u1 (2: 0, 7: 0) -> 0 + 2/2; u2 (0: 3, 5: 2) -> 2; u3 (2: 0, 7: 0) -> 0
    ranks = [1.5, 1.0, 2.0, 0.0]
    ev = evaluate(ds, pop, "test", seeds=[0], ks=(1, 2, 10), progress=False)
    assert ev.ranks[0].tolist() == ranks
    row = ev.sampled.loc[0]
    assert row["HR@1"] == pytest.approx(1 / 4) and row["HR@2"] == pytest.approx(3 / 4) and row["HR@10"] == 1.0
    assert row["NDCG@10"] == pytest.approx(sum(1 / math.log2(r + 2) for r in ranks) / 4)


def test_cooccurrence_counts_training_transitions_only():
    ds = hand_dataset(REPEATS, n_items=8)
    scorer = CooccurrenceScorer(ds)
    # training transitions: u0 0->1, 1->0; u1 1->0; u2 none; u3 5->5, 5->6 (so 1->0 twice)
    want = np.zeros((8, 8))
    for item, next_item in [(0, 1), (1, 0), (1, 0), (5, 5), (5, 6)]:
        want[item, next_item] += 1
    np.testing.assert_array_equal(scorer.matrix.toarray(), want)
    backoff = 0.5 * np.array(TRAIN_COUNTS) / 3  # popularity scaled below one count (max count 3)
    hist = np.array([[-1, 0, 1], [-1, -1, 5]])
    np.testing.assert_allclose(scorer(hist, np.array([[0, 2], [5, 6]])), [[2 + backoff[0], backoff[2]], [1 + backoff[5], 1 + backoff[6]]])


def test_cold_start_buckets_use_training_counts():
    ds = hand_dataset(REPEATS, n_items=8)
    ranks = np.array([1.5, 1.0, 2.0, 0.0])
    cs = cold_start(ranks, ds, "test", edges=(0, 1, 2, np.inf))
    # the test targets' training counts are 0 0 0 1 (whole sequences would give 3 3 2 2)
    assert cs["users"].tolist() == [3, 1, 0]
    assert cs["NDCG@10"].iloc[0] == pytest.approx((1 / math.log2(3.5) + 1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert cs["HR@10"].iloc[1] == 1.0 and cs["NDCG@10"].iloc[1] == 1.0
    # validation targets 2 3 1 0: training counts 0 0 2 3
    assert cold_start(ranks, ds, "valid", edges=(0, 1, 2, np.inf))["users"].tolist() == [2, 0, 2]


def test_task2_cold_start_buckets_use_training_counts():
    # four users (0, 1 + k, 5 + k, 0): item 0 is every test target and occurs 4 times in the training
    # parts (bucket [0, 5)), 8 times in the whole sequences; items 9-11 are nobody's, the negatives
    seqs = [[0, 1 + k, 5 + k, 0] for k in range(4)]
    ds = hand_dataset(seqs, n_items=12, negatives=[[9, 10]] * 4)
    cfg = DownstreamConfig(hidden=8, heads=2, layers=1, epochs=1, patience=1, batch_size=4, device="cpu")
    result = run(ds, cfg, seeds=[0])
    assert result.cold_start["users"].tolist() == [4, 0, 0, 0, 0]
    assert list(result.cold_start.index) == ["[0, 5)", "[5, 10)", "[10, 20)", "[20, 50)", "[50, inf)"]


# --------------------------------------------------------------------------- 3. early stopping reads valid


class ScoresByItemIndex(torch.nn.Module):
    """A stand-in model whose score of a candidate is its item index (history ignored), so that
    ranks can be counted by hand."""

    def predict(self, batch):
        return batch["candidates"].float()


def test_validate_is_valid_ndcg_by_hand():
    # u0 (0 1 | valid 9 | test 2), negatives 6 7: valid rank 0, test rank 2
    # u1 (3 4 | valid 5 | test 8), negatives 6 2: valid rank 1, test rank 0
    ds = hand_dataset([[0, 1, 9, 2], [3, 4, 5, 8]], n_items=10, negatives=[[6, 7], [6, 2]])
    got = validate(ScoresByItemIndex(), ds, seed=0, max_len=3, device="cpu")
    assert got == pytest.approx((1 + 1 / math.log2(3)) / 2)  # the test split would give (1/2 + 1) / 2
    assert validate(ScoresByItemIndex(), ds, seed=0, max_len=1, device="cpu") == pytest.approx((1 + 1 / math.log2(3)) / 2)


def _random_dataset(n_users=60, n_items=40, num_neg=20, seed=0):
    """Sequences that mostly step to the next item (so a model learns something), and negatives
    drawn here from each user's unseen items."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        s = [int(rng.integers(n_items))]
        for _ in range(int(rng.integers(5, 10)) - 1):
            s.append((s[-1] + 1) % n_items if rng.random() < 0.7 else int(rng.integers(n_items)))
        seqs.append(s)
    neg = [rng.choice(np.setdiff1d(np.arange(n_items), s), num_neg, replace=False) for s in seqs]
    return hand_dataset(seqs, n_items=n_items, max_len=5, negatives=neg)


def test_task2_best_valid_ndcg_is_the_restored_models_valid_ndcg():
    ds = _random_dataset()
    cfg = DownstreamConfig(hidden=16, heads=2, layers=1, epochs=4, patience=4, batch_size=16, lr=1e-2,
                           dropout=0.0, device="cpu")
    r = train(ds, cfg, seed=0)
    recorded = [h["valid_NDCG@10"] for h in r.history]
    assert r.best_valid_ndcg == max(recorded) and r.best_epoch == 1 + int(np.argmax(recorded))
    scorer = ModelScorer(r.model, 5)
    valid = evaluate(ds, scorer, "valid", seeds=[0], progress=False).sampled.loc[0, "NDCG@10"]
    test = evaluate(ds, scorer, "test", seeds=[0], progress=False).sampled.loc[0, "NDCG@10"]
    assert abs(valid - test) > 1e-3  # (so that the check below tells the splits apart)
    assert r.best_valid_ndcg == pytest.approx(valid, abs=1e-12)
