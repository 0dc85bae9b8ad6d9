"""Processed datasets (docs/data.md): cleaning, iterated k-core, chronological sequences, the
leave-one-out split, frozen negatives per seed, statistics; saved as parquet + a JSON manifest.

Folder layout::

    items.parquet          item_idx, item_id, title, image, image_url, category
    interactions.parquet   user_idx, item_idx, timestamp  (sorted by user, then time, ties in file order)
    users.parquet          user_idx, user_id
    negatives/seed_{s}.npy (n_users, num_negatives) int32, drawn once per seed
    manifest.json          config, statistics, drop counts, bad lines, sources, fingerprint

This module holds :class:`Dataset` (sizes, modalities, the split, negatives, statistics),
:func:`build` and :func:`prepare`; the steps :func:`build` runs are in :mod:`.cleaning` and
:mod:`.negatives`, the folder on disk (:func:`save`, loading, file checks) in :mod:`.dataset_folder`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import PrepareConfig, to_dict
from ..io import check_replaceable
from .cleaning import filter_items, filter_rows, first_appearance_codes
from .dataset_folder import DATASET_MARKS, FORMAT_VERSION, fingerprint, read_dataset_folder, read_negatives, save
from .formats import read_raw
from .images import ImageStore
from .negatives import sample_negatives
from .raw_data import RawData

SPLITS = ("train", "valid", "test")


# --------------------------------------------------------------------------- the dataset


def manifest_modalities(manifest: dict) -> tuple[str, ...]:
    """:attr:`Dataset.modalities` from a manifest alone (no parquet read)."""
    return ("ids",) + (("titles",) if manifest.get("has_titles") else ()) + (("images",) if manifest.get("has_images") else ())


@dataclass
class Dataset:
    """A processed dataset: chronological sequences (CSR), items, frozen negatives, manifest."""

    path: Path | None
    items: pd.DataFrame
    user_ids: np.ndarray  # (U,) object
    offsets: np.ndarray  # (U + 1,) int64
    seq: np.ndarray  # (N,) int32, item_idx in chronological order per user
    timestamps: np.ndarray  # (N,) int64
    manifest: dict
    _negatives: dict | None = None

    # ---------------------------------------------------------------- sizes
    @property
    def n_users(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def n_items(self) -> int:
        return int(len(self.items))

    @property
    def n_interactions(self) -> int:
        return int(self.seq.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def max_len(self) -> int:
        return int(self.manifest["config"]["max_len"])

    @property
    def seeds(self) -> list[int]:
        return list(self.manifest["config"]["seeds"])

    # ---------------------------------------------------------------- modalities
    @property
    def modalities(self) -> tuple[str, ...]:
        """What the dataset offers a method: ``ids`` always, ``titles`` where items have titles,
        ``images`` only where *every* item has one (the manifest's ``has_images``); a dataset where
        some items lack an image offers no images (image prompts need every item's)."""
        return manifest_modalities(self.manifest)

    @property
    def kind(self) -> str:
        """``multimodal``, ``text-only``, ``images-only`` or ``ids-only``, from :attr:`modalities`."""
        return {frozenset({"ids", "titles", "images"}): "multimodal", frozenset({"ids", "titles"}): "text-only",
                frozenset({"ids", "images"}): "images-only"}.get(frozenset(self.modalities), "ids-only")

    def sequence(self, user: int) -> np.ndarray:
        return self.seq[self.offsets[user]:self.offsets[user + 1]]

    # ---------------------------------------------------------------- split
    def _cut(self, split: str) -> int:
        """How many items at the end of each sequence the split holds out (target included)."""
        try:
            return {"test": 1, "valid": 2, "train": 3}[split]
        except KeyError:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}") from None

    def targets(self, split: str = "test") -> np.ndarray:
        """Target item per user: test = last, valid = second to last, train = last training item."""
        return self.seq[self.offsets[1:] - self._cut(split)]

    def histories(self, split: str = "test", max_len: int | None = None) -> np.ndarray:
        """(U, L) item_idx of each user's history before the split's target, right-aligned, -1 padded.

        ``max_len=None`` uses the dataset's ``max_len``; 0 keeps whole histories.
        """
        ends = self.offsets[1:] - self._cut(split)
        return pad_right_aligned(self.seq, self.offsets[:-1], ends, self.max_len if max_len is None else max_len)

    def train_examples(self, mode: str | None = None, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training examples ``(users, histories (M, L), targets (M,))`` from the training items.

        ``last`` (default, the paper's): history = training items but the last, target = the last.
        ``all_prefixes`` (ours): every non-empty prefix of the training items predicts its next item.
        Users whose training part has a single item give no example.
        """
        mode = mode or self.manifest["config"].get("train_examples", "last")
        L = self.max_len if max_len is None else max_len
        starts = self.offsets[:-1]
        train_end = self.offsets[1:] - 2  # exclusive end of the training items
        if mode == "last":
            users = np.flatnonzero(train_end - starts >= 2)
            target_pos = train_end[users] - 1
        elif mode == "all_prefixes":
            n_examples = np.maximum(train_end - starts - 1, 0)
            users = np.repeat(np.arange(self.n_users), n_examples)
            first = np.repeat(starts + 1, n_examples)
            within = np.arange(n_examples.sum()) - np.repeat(np.cumsum(n_examples) - n_examples, n_examples)
            target_pos = first + within
        else:
            raise ValueError(f"mode must be 'last' or 'all_prefixes', got {mode!r}")
        histories = pad_right_aligned(self.seq, starts[users], target_pos, L)
        return users, histories, self.seq[target_pos]

    def seen_items(self, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
        """CSR (offsets, items) of each user's history before the split's target (for masking)."""
        ends = self.offsets[1:] - self._cut(split)
        lengths = ends - self.offsets[:-1]
        positions = _ranges(self.offsets[:-1], ends)
        return np.concatenate([[0], np.cumsum(lengths)]), self.seq[positions]

    def train_item_counts(self) -> np.ndarray:
        """How often each item occurs in the training parts of the sequences (cold-start buckets)."""
        positions = _ranges(self.offsets[:-1], self.offsets[1:] - 2)
        return np.bincount(self.seq[positions], minlength=self.n_items)

    # ---------------------------------------------------------------- negatives
    def negatives(self, seed: int) -> np.ndarray:
        """(U, num_negatives) frozen negatives for ``seed`` (drawn at prepare time)."""
        if self._negatives is None:
            self._negatives = {}
        if seed not in self._negatives:
            if self.path is None:
                raise KeyError(f"no negatives for seed {seed} in this in-memory dataset")
            self._negatives[seed] = read_negatives(self.path, seed, self.manifest)
        return self._negatives[seed]

    # ---------------------------------------------------------------- stats
    def stats(self) -> dict:
        """Table 3 of the paper: users, items, interactions, average length, sparsity (a fraction)."""
        users, items, interactions = self.n_users, self.n_items, self.n_interactions
        return {
            "users": users,
            "items": items,
            "interactions": interactions,
            "avg_length": interactions / users if users else 0.0,
            "sparsity": 1.0 - interactions / (users * items) if users and items else 1.0,
        }

    def stats_table(self, name: str | None = None) -> pd.DataFrame:
        stats = self.stats()
        row = {
            "#Users": stats["users"], "#Items": stats["items"], "#Interactions": stats["interactions"],
            "Avg. length": round(stats["avg_length"], 2), "Sparsity": f"{100 * stats['sparsity']:.2f}%",
        }
        return pd.DataFrame([row], index=[name or self.manifest.get("name", "dataset")])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    # ---------------------------------------------------------------- io
    @classmethod
    def load(cls, path: str | Path) -> "Dataset":
        """The prepared dataset in folder ``path``, its files checked against its manifest."""
        path = Path(path)
        return cls(path=path, **read_dataset_folder(path))


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(start, end)`` for each pair, vectorised."""
    lengths = np.maximum(ends - starts, 0)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    base = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return base + np.arange(total)


def pad_right_aligned(flat: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int) -> np.ndarray:
    """Rows ``flat[max(start, end - L):end]`` right-aligned in an (n, L) array padded with -1.

    ``max_len=0`` sets L to the longest row.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    L = int(max_len) if max_len else int((ends - starts).max(initial=0))
    pos = ends[:, None] - L + np.arange(L)[None, :]  # (n, L)
    valid = pos >= starts[:, None]
    padded = np.full(pos.shape, -1, dtype=np.int64)
    padded[valid] = flat[pos[valid]]
    return padded


# --------------------------------------------------------------------------- building


def build(raw: RawData, cfg: PrepareConfig, images: ImageStore | None = None, progress: bool = True) -> Dataset:
    """Raw interactions -> an in-memory :class:`Dataset` (not yet saved). See the module docstring."""
    start_time = time.perf_counter()
    # 1. items: titles and images; 2-3. duplicate rows, the iterated k-core, users too short
    items_found = filter_items(raw, cfg, images, progress)
    rows, kcore_rounds, row_drops = filter_rows(raw, items_found.keep, cfg.k_core, items_found.drops)
    drops = {**items_found.drops, **row_drops}

    # 4. dense ids in order of first appearance in the file; chronological order, stable ties
    timestamps = raw.timestamp[rows]
    kept_users, user_idx = first_appearance_codes(raw.user[rows])
    kept_items, item_idx = first_appearance_codes(raw.item[rows])
    order = np.lexsort((rows, timestamps, user_idx))
    user_idx, item_idx, timestamps = user_idx[order], item_idx[order], timestamps[order]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(user_idx, minlength=kept_users.size))]).astype(np.int64)

    meta = raw.meta or {}
    item_ids = np.asarray(raw.item_ids, dtype=object)[kept_items]
    items = pd.DataFrame({
        "item_idx": np.arange(kept_items.size, dtype=np.int32),
        "item_id": item_ids.astype(str),
        "title": items_found.titles[kept_items],
        "image": items_found.image_paths[kept_items],
        "image_url": items_found.image_urls[kept_items],
        "category": np.array([(meta.get(i) or {}).get("category") for i in item_ids], dtype=object),
    })
    user_ids = np.asarray(raw.user_ids, dtype=object)[kept_users]

    manifest = {
        "format_version": FORMAT_VERSION,
        "config": to_dict(cfg),
        "has_titles": bool(items["title"].notna().any()),
        "has_images": bool(items["image"].notna().all()) and len(items) > 0,
        "raw_rows": raw.n_rows,
        "drops": drops,
        "drop_examples": {reason: ids for reason, ids in items_found.drop_examples.items() if ids},
        "kcore_rounds": kcore_rounds,
        "bad_lines": raw.bad_lines,
        "sources": [{"path": str(Path(s).resolve()), "bytes": Path(s).stat().st_size} for s in raw.sources],
    }
    ds = Dataset(None, items, user_ids, offsets, item_idx.astype(np.int32), timestamps.astype(np.int64), manifest)
    manifest["stats"] = ds.stats()

    # 5. frozen negatives per seed
    ds._negatives = sample_negatives(offsets, ds.seq, ds.n_items, cfg.num_negatives, seeds=cfg.seeds)
    manifest["fingerprint"] = fingerprint(ds, ds._negatives)
    manifest["build_seconds"] = round(time.perf_counter() - start_time, 3)
    return ds


def prepare(cfg: PrepareConfig, out: str | Path | None, overwrite: bool = False, progress: bool = True) -> Dataset:
    """Read, build and (when ``out`` is given) save a dataset: the whole of ``data prepare``."""
    inputs = [*cfg.inputs, *(p for p in (cfg.images, cfg.image_cache) if p)]
    if out is not None:
        check_replaceable(out, overwrite, DATASET_MARKS, protect=inputs)
    raw = read_raw(cfg.format, cfg.inputs, skip_bad_lines=cfg.skip_bad_lines, integer_ids=cfg.integer_ids)
    ds = build(raw, cfg, progress=progress)
    if out is not None:
        save(ds, out, overwrite=overwrite, protect=inputs)
    return ds
