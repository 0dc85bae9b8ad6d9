"""Frozen negatives (docs/data.md): for each user and seed, items the user never interacted with,
drawn once at prepare time and saved with the dataset."""
from __future__ import annotations

import numpy as np


def sample_negatives(
    offsets: np.ndarray, seq: np.ndarray, n_items: int, num: int, seeds=(0,), chunk: int = 16384
) -> dict[int, np.ndarray]:
    """``num`` distinct items per user and seed, uniform over items the user never interacted with.

    Returns {seed: (n_users, num) int32}. Vectorised rejection sampling: draw a surplus of candidates
    per user, drop those the user has seen and repeats within the row, keep the first ``num`` (so
    the draw is uniform without replacement); the rare user left short is drawn exactly from its
    complement. Users are handled in chunks (the seen-set lookup stays cache-sized, so time grows
    linearly with the data); each seed has its own generator, so results do not depend on ``chunk``
    order across seeds.
    """
    n_users = offsets.shape[0] - 1
    lengths = np.diff(offsets)
    if n_items - int(lengths.max(initial=0)) < num:
        distinct = np.array([np.unique(seq[offsets[u]:offsets[u + 1]]).size for u in range(n_users)])
        short = np.flatnonzero(n_items - distinct < num)
        if short.size:
            fewest = int(n_items - distinct.max())
            raise ValueError(
                f"{short.size} user(s) have fewer than {num} unseen items (catalogue of {n_items}; the most-seen "
                f"user leaves {fewest}): lower --num-negatives to {fewest} or less"
            )
    generators = {seed: np.random.default_rng(seed) for seed in seeds}
    negatives = {seed: np.empty((n_users, num), dtype=np.int32) for seed in seeds}
    for start in range(0, n_users, chunk):
        stop = min(start + chunk, n_users)
        chunk_users = stop - start
        first_row, stop_row = offsets[start], offsets[stop]
        local_user = np.repeat(np.arange(chunk_users, dtype=np.int64), lengths[start:stop])
        seen_keys = np.unique(local_user * n_items + seq[first_row:stop_row].astype(np.int64))  # user * n_items + item
        seen_share_p99 = float(np.quantile(lengths[start:stop] / n_items, 0.99))
        surplus = int(np.ceil((num + 8 + num * num / (2 * n_items)) / max(1e-3, 1 - seen_share_p99) * 1.1))
        users = np.arange(chunk_users, dtype=np.int64)[:, None]
        for seed in seeds:
            rng = generators[seed]
            candidates = rng.integers(0, n_items, size=(chunk_users, surplus), dtype=np.int64)
            keys = users * n_items + candidates
            pos = np.minimum(np.searchsorted(seen_keys, keys), max(seen_keys.size - 1, 0))
            seen = seen_keys[pos] == keys if seen_keys.size else np.zeros(keys.shape, dtype=bool)
            order = np.argsort(candidates, axis=1, kind="stable")
            sorted_candidates = np.take_along_axis(candidates, order, axis=1)
            repeat_sorted = np.zeros(sorted_candidates.shape, dtype=bool)
            # later copies (the stable sort keeps the first first)
            repeat_sorted[:, 1:] = sorted_candidates[:, 1:] == sorted_candidates[:, :-1]
            repeat = np.empty_like(repeat_sorted)
            np.put_along_axis(repeat, order, repeat_sorted, axis=1)
            valid = ~seen & ~repeat
            rank = np.cumsum(valid, axis=1)
            full = rank[:, -1] >= num
            rows = np.flatnonzero(full)
            take = valid[rows] & (rank[rows] <= num)
            negatives[seed][start + rows] = candidates[rows][take].reshape(rows.size, num)
            for row in np.flatnonzero(~full):
                user = start + row
                pool = np.setdiff1d(np.arange(n_items), seq[offsets[user]:offsets[user + 1]])
                negatives[seed][user] = rng.choice(pool, size=num, replace=False)
    return negatives
