"""Processed datasets (DESIGN §1): cleaning, iterated k-core, chronological sequences, the
leave-one-out split, frozen negatives per seed, statistics; saved as parquet + a JSON manifest.

Folder layout::

    items.parquet          item_idx, item_id, title, image, image_url, category
    interactions.parquet   user_idx, item_idx, timestamp  (sorted by user, then time, ties in file order)
    users.parquet          user_idx, user_id
    negatives/seed_{s}.npy (n_users, num_negatives) int32, drawn once per seed
    manifest.json          config, statistics, drop counts, bad lines, sources, fingerprint
"""
from __future__ import annotations

import hashlib
import html
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import PrepareConfig, to_dict
from ..io import DataFormatError, atomic_dir, atomic_write_json, check_replaceable
from .formats import RawData, read_raw
from .images import ImageStore

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
_TAG = re.compile(r"<[^>]+>")
_WS = re.compile(r"\s+")


# --------------------------------------------------------------------------- cleaning


def clean_title(raw: object, max_tokens: int = 32) -> str | None:
    """HTML-unescape (repeatedly: Amazon titles are often double-escaped), drop tags, collapse
    whitespace, keep the first ``max_tokens`` whitespace tokens. Empty -> None."""
    if not isinstance(raw, str):
        return None
    text = raw
    for _ in range(3):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    text = _WS.sub(" ", _TAG.sub(" ", text)).strip()
    if not text:
        return None
    return " ".join(text.split(" ")[:max_tokens])


def kcore(user: np.ndarray, item: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Boolean mask of rows kept by the k-core, iterated until nothing changes; and the rounds run.

    Every kept user and every kept item has at least ``k`` kept rows (a single pass is not a k-core).
    """
    keep = np.ones(user.shape[0], dtype=bool)
    rounds = 0
    if k <= 1:
        return keep, rounds
    nu, ni = int(user.max()) + 1, int(item.max()) + 1
    while True:
        rounds += 1
        u, i = user[keep], item[keep]
        ok_u = np.bincount(u, minlength=nu) >= k
        ok_i = np.bincount(i, minlength=ni) >= k
        row_ok = ok_u[user] & ok_i[item] & keep
        if row_ok.sum() == keep.sum():
            return keep, rounds
        keep = row_ok


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
    rngs = {s: np.random.default_rng(s) for s in seeds}
    out = {s: np.empty((n_users, num), dtype=np.int32) for s in seeds}
    for start in range(0, n_users, chunk):
        stop = min(start + chunk, n_users)
        m = stop - start
        lo, hi = offsets[start], offsets[stop]
        local_user = np.repeat(np.arange(m, dtype=np.int64), lengths[start:stop])
        seen_keys = np.unique(local_user * n_items + seq[lo:hi].astype(np.int64))
        q = float(np.quantile(lengths[start:stop] / n_items, 0.99))
        surplus = int(np.ceil((num + 8 + num * num / (2 * n_items)) / max(1e-3, 1 - q) * 1.1))
        users = np.arange(m, dtype=np.int64)[:, None]
        for s in seeds:
            rng = rngs[s]
            cand = rng.integers(0, n_items, size=(m, surplus), dtype=np.int64)
            keys = users * n_items + cand
            pos = np.minimum(np.searchsorted(seen_keys, keys), max(seen_keys.size - 1, 0))
            seen = seen_keys[pos] == keys if seen_keys.size else np.zeros(keys.shape, dtype=bool)
            order = np.argsort(cand, axis=1, kind="stable")
            srt = np.take_along_axis(cand, order, axis=1)
            dup_sorted = np.zeros(srt.shape, dtype=bool)
            dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]  # later copies (stable sort keeps the first first)
            dup = np.empty_like(dup_sorted)
            np.put_along_axis(dup, order, dup_sorted, axis=1)
            valid = ~seen & ~dup
            rank = np.cumsum(valid, axis=1)
            full = rank[:, -1] >= num
            rows = np.flatnonzero(full)
            take = valid[rows] & (rank[rows] <= num)
            out[s][start + rows] = cand[rows][take].reshape(rows.size, num)
            for r in np.flatnonzero(~full):
                u = start + r
                pool = np.setdiff1d(np.arange(n_items), seq[offsets[u]:offsets[u + 1]])
                out[s][u] = rng.choice(pool, size=num, replace=False)
    return out


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
        m = set(self.modalities)
        return {frozenset({"ids", "titles", "images"}): "multimodal", frozenset({"ids", "titles"}): "text-only",
                frozenset({"ids", "images"}): "images-only"}.get(frozenset(m), "ids-only")

    def sequence(self, u: int) -> np.ndarray:
        return self.seq[self.offsets[u]:self.offsets[u + 1]]

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
            ok = train_end - starts >= 2
            users = np.flatnonzero(ok)
            tgt_pos = train_end[users] - 1
        elif mode == "all_prefixes":
            n_ex = np.maximum(train_end - starts - 1, 0)
            users = np.repeat(np.arange(self.n_users), n_ex)
            first = np.repeat(starts + 1, n_ex)
            within = np.arange(n_ex.sum()) - np.repeat(np.cumsum(n_ex) - n_ex, n_ex)
            tgt_pos = first + within
        else:
            raise ValueError(f"mode must be 'last' or 'all_prefixes', got {mode!r}")
        hist = pad_right_aligned(self.seq, starts[users], tgt_pos, L)
        return users, hist, self.seq[tgt_pos]

    def seen_items(self, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
        """CSR (offsets, items) of each user's history before the split's target (for masking)."""
        ends = self.offsets[1:] - self._cut(split)
        lengths = ends - self.offsets[:-1]
        idx = _ranges(self.offsets[:-1], ends)
        return np.concatenate([[0], np.cumsum(lengths)]), self.seq[idx]

    def train_item_counts(self) -> np.ndarray:
        """How often each item occurs in the training parts of the sequences (cold-start buckets)."""
        idx = _ranges(self.offsets[:-1], self.offsets[1:] - 2)
        return np.bincount(self.seq[idx], minlength=self.n_items)

    # ---------------------------------------------------------------- negatives
    def negatives(self, seed: int) -> np.ndarray:
        """(U, num_negatives) frozen negatives for ``seed`` (drawn at prepare time)."""
        if self._negatives is None:
            self._negatives = {}
        if seed not in self._negatives:
            if self.path is None:
                raise KeyError(f"no negatives for seed {seed} in this in-memory dataset")
            f = self.path / "negatives" / f"seed_{seed}.npy"
            if not f.exists():
                raise FileNotFoundError(f"{f}: no frozen negatives for seed {seed}; prepared seeds: {self.seeds}")
            _check_file(self.path, f"negatives/seed_{seed}.npy", self.manifest)
            self._negatives[seed] = np.load(f)
        return self._negatives[seed]

    # ---------------------------------------------------------------- stats
    def stats(self) -> dict:
        """Table 3 of the paper: users, items, interactions, average length, sparsity (a fraction)."""
        u, i, n = self.n_users, self.n_items, self.n_interactions
        return {
            "users": u,
            "items": i,
            "interactions": n,
            "avg_length": n / u if u else 0.0,
            "sparsity": 1.0 - n / (u * i) if u and i else 1.0,
        }

    def stats_table(self, name: str | None = None) -> pd.DataFrame:
        s = self.stats()
        row = {
            "#Users": s["users"], "#Items": s["items"], "#Interactions": s["interactions"],
            "Avg. length": round(s["avg_length"], 2), "Sparsity": f"{100 * s['sparsity']:.2f}%",
        }
        return pd.DataFrame([row], index=[name or self.manifest.get("name", "dataset")])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    # ---------------------------------------------------------------- io
    @classmethod
    def load(cls, path: str | Path) -> "Dataset":
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.exists():
            raise FileNotFoundError(f"{path}: not a prepared dataset (no manifest.json); run `vlm2rec-lab data prepare`")
        manifest = json.loads(mf.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{mf}: format_version {manifest.get('format_version')} (expected {FORMAT_VERSION}); prepare it again")
        for name in DATA_FILES:
            _check_file(path, name, manifest)
        items = pq.read_table(path / "items.parquet").to_pandas()
        inter = pq.read_table(path / "interactions.parquet")
        users = pq.read_table(path / "users.parquet").column("user_id").to_numpy(zero_copy_only=False)
        user_idx = inter.column("user_idx").to_numpy()
        offsets = np.concatenate([[0], np.cumsum(np.bincount(user_idx, minlength=len(users)))]).astype(np.int64)
        return cls(
            path=path,
            items=items,
            user_ids=users,
            offsets=offsets,
            seq=inter.column("item_idx").to_numpy().astype(np.int32, copy=False),
            timestamps=inter.column("timestamp").to_numpy(),
            manifest=manifest,
        )


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, e)`` for each pair, vectorised."""
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
    out = np.full(pos.shape, -1, dtype=np.int64)
    out[valid] = flat[pos[valid]]
    return out


# --------------------------------------------------------------------------- building


DROP_EXAMPLES = 5  # dropped items named per reason in the manifest and the prepare report


def _drop_hint(drops: dict[str, int], n_items: int) -> str:
    """What to pass when every item was dropped for want of titles or of images."""
    if drops.get("no_metadata", 0) + drops.get("no_title", 0) >= n_items:
        return "; no item has a title: pass --require-titles no to prepare an ids-only dataset"
    left = n_items - drops.get("no_metadata", 0) - drops.get("no_title", 0)
    if sum(v for k, v in drops.items() if k not in ("no_metadata", "no_title")) >= left:
        return "; no item has a usable image: pass --images FOLDER, or --require-images no for a dataset without images"
    return ""


def build(raw: RawData, cfg: PrepareConfig, images: ImageStore | None = None, progress: bool = True) -> Dataset:
    """Raw interactions -> an in-memory :class:`Dataset` (not yet saved). See the module docstring."""
    t0 = time.perf_counter()
    n_raw = raw.n_rows
    drops: dict[str, int] = {}
    examples: dict[str, list[str]] = {}  # the first few dropped items' ids per reason
    item_ids = np.asarray(raw.item_ids, dtype=object)

    # 1. items: titles and images (drop reasons counted over items that occur in interactions)
    need_titles = cfg.require_titles == "yes" or (cfg.require_titles == "auto" and raw.meta is not None)
    if cfg.require_titles == "yes" and raw.meta is None:
        raise DataFormatError(", ".join(raw.sources), "titles are required but the input carries no item metadata")
    meta = raw.meta or {}
    titles = np.array([clean_title((meta.get(i) or {}).get("title"), cfg.max_title_tokens) for i in raw.item_ids], dtype=object)
    keep_item = np.ones(len(item_ids), dtype=bool)
    if need_titles:
        no_meta = np.array([i not in meta for i in raw.item_ids])
        no_title = (titles == None) & ~no_meta  # noqa: E711 (elementwise)
        drops["no_metadata"] = int(no_meta.sum())
        drops["no_title"] = int(no_title.sum())
        examples["no_metadata"] = list(item_ids[no_meta][:DROP_EXAMPLES])
        examples["no_title"] = list(item_ids[no_title][:DROP_EXAMPLES])
        keep_item &= ~(no_meta | no_title)
    image_paths = np.full(len(item_ids), None, dtype=object)
    urls = np.array([(meta.get(i) or {}).get("image_url") for i in raw.item_ids], dtype=object)
    if cfg.require_images or images is not None or cfg.images:
        store = images or ImageStore(cfg.images, cfg.image_cache, cfg.max_pixels, offline=cfg.offline)
        todo = np.flatnonzero(keep_item)
        res = store.resolve(((item_ids[k], urls[k]) for k in todo), progress=progress)
        for k in todo:
            image_paths[k] = res.paths.get(item_ids[k])
        if cfg.require_images:
            for reason, n in res.counts().items():
                drops[reason], examples[reason] = n, res.examples(reason, DROP_EXAMPLES)
            keep_item &= image_paths != None  # noqa: E711
    keep = keep_item[raw.item]

    # 2. duplicate (user, item, time) rows, first kept
    user, item, ts = raw.user[keep], raw.item[keep], raw.timestamp[keep]
    order_in_file = np.flatnonzero(keep)
    if user.size == 0:
        raise DataFormatError(", ".join(raw.sources), f"no interactions left after dropping items ({drops})"
                              + _drop_hint(drops, len(item_ids)))
    df = pd.DataFrame({"u": user, "i": item, "t": ts})
    dup = df.duplicated(keep="first").to_numpy()
    drops["duplicate_rows"] = int(dup.sum())
    user, item, ts, order_in_file = user[~dup], item[~dup], ts[~dup], order_in_file[~dup]

    # 3. iterated k-core
    kc, rounds = kcore(user, item, cfg.k_core)
    # users too short for leave-one-out (only possible with k_core < 3)
    counts = np.bincount(user[kc], minlength=len(raw.user_ids))
    short = counts[user] < 3
    drops["kcore_rows"] = int((~kc).sum())
    drops["short_user_rows"] = int((kc & short).sum())
    kc &= ~short
    user, item, ts, order_in_file = user[kc], item[kc], ts[kc], order_in_file[kc]
    if user.size == 0:
        raise DataFormatError(", ".join(raw.sources), f"no interactions survive the {cfg.k_core}-core: lower --k-core")

    # 4. dense ids in order of first appearance in the file; chronological order, stable ties
    u_codes, u_first = np.unique(user, return_index=True)
    u_rank = np.argsort(u_first, kind="stable")
    u_map = np.empty(int(user.max()) + 1, dtype=np.int64)
    u_map[u_codes[u_rank]] = np.arange(u_codes.size)
    i_codes, i_first = np.unique(item, return_index=True)
    i_rank = np.argsort(i_first, kind="stable")
    i_map = np.empty(int(item.max()) + 1, dtype=np.int64)
    i_map[i_codes[i_rank]] = np.arange(i_codes.size)
    uu, ii = u_map[user], i_map[item]
    order = np.lexsort((order_in_file, ts, uu))
    uu, ii, ts = uu[order], ii[order], ts[order]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(uu, minlength=u_codes.size))]).astype(np.int64)

    kept_items = i_codes[i_rank]
    items = pd.DataFrame({
        "item_idx": np.arange(kept_items.size, dtype=np.int32),
        "item_id": item_ids[kept_items].astype(str),
        "title": titles[kept_items],
        "image": image_paths[kept_items],
        "image_url": urls[kept_items],
        "category": np.array([(meta.get(i) or {}).get("category") for i in item_ids[kept_items]], dtype=object),
    })
    user_ids = np.asarray(raw.user_ids, dtype=object)[u_codes[u_rank]]

    manifest = {
        "format_version": FORMAT_VERSION,
        "config": to_dict(cfg),
        "has_titles": bool(items["title"].notna().any()),
        "has_images": bool(items["image"].notna().all()) and len(items) > 0,
        "raw_rows": n_raw,
        "drops": drops,
        "drop_examples": {k: v for k, v in examples.items() if v},
        "kcore_rounds": rounds,
        "bad_lines": raw.bad_lines,
        "sources": [{"path": str(Path(s).resolve()), "bytes": Path(s).stat().st_size} for s in raw.sources],
    }
    ds = Dataset(None, items, user_ids, offsets, ii.astype(np.int32), ts.astype(np.int64), manifest)
    manifest["stats"] = ds.stats()

    # 5. frozen negatives per seed
    ds._negatives = sample_negatives(offsets, ds.seq, ds.n_items, cfg.num_negatives, seeds=cfg.seeds)
    manifest["fingerprint"] = _fingerprint(ds)
    manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
    return ds


DATA_FILES = ("items.parquet", "interactions.parquet", "users.parquet")  # read by Dataset.load
DATASET_MARKS = ("manifest.json", *DATA_FILES)  # what makes a folder a prepared dataset (--overwrite replaces it)


def _file_record(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _check_file(folder: Path, name: str, manifest: dict) -> None:
    """Raise unless ``folder/name`` is the file its manifest recorded (size and SHA-256); a
    manifest from before files were recorded checks nothing."""
    want = manifest.get("files", {}).get(name)
    if want is None:
        return
    f = folder / name
    if not f.is_file():
        raise DataFormatError(f, "missing: the dataset folder is incomplete; prepare it again")
    got = _file_record(f) if f.stat().st_size == want["bytes"] else {"bytes": f.stat().st_size}
    if got != want:
        why = f"{got['bytes']:,} bytes against {want['bytes']:,}" if got["bytes"] != want["bytes"] else "its SHA-256 differs"
        raise DataFormatError(f, f"is not the file this dataset's manifest.json recorded ({why}): it comes from "
                                 f"another prepare or was changed since; prepare the folder again")


def _fingerprint(ds: Dataset) -> str:
    h = hashlib.sha256()
    for arr in (ds.offsets, ds.seq, ds.timestamps):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\x1f".join(map(str, ds.user_ids)).encode())
    for col in ("item_id", "title", "category"):
        h.update("\x1f".join("" if v is None else str(v) for v in ds.items[col]).encode())
    for s in sorted(ds._negatives or {}):
        h.update(ds._negatives[s].tobytes())
    return h.hexdigest()


def save(ds: Dataset, out: str | Path, overwrite: bool = False, protect=()) -> Path:
    """Write the dataset folder atomically (temporary folder, then rename), recording each file's
    size and SHA-256 in the manifest (checked on load). An existing ``out`` is replaced only with
    ``overwrite`` and only when it is a prepared dataset, never when it is or holds one of
    ``protect`` (the inputs: see :func:`~vlm2rec_lab.io.atomic_dir`)."""
    out = Path(out)
    negatives = {s: ds.negatives(s) for s in ds.seeds}  # loads any not yet read from the old folder
    with atomic_dir(out, overwrite=overwrite, marks=DATASET_MARKS, protect=protect) as tmp:
        pq.write_table(pa.Table.from_pandas(ds.items, preserve_index=False), tmp / "items.parquet")
        pq.write_table(
            pa.table({
                "user_idx": np.repeat(np.arange(ds.n_users, dtype=np.int32), ds.lengths),
                "item_idx": ds.seq,
                "timestamp": ds.timestamps,
            }),
            tmp / "interactions.parquet",
        )
        pq.write_table(pa.table({"user_idx": np.arange(ds.n_users, dtype=np.int32), "user_id": ds.user_ids.astype(str)}),
                       tmp / "users.parquet")
        (tmp / "negatives").mkdir()
        for s, neg in negatives.items():
            np.save(tmp / "negatives" / f"seed_{s}.npy", neg)
        ds.manifest["name"] = ds.manifest.get("name") or out.name
        ds.manifest["files"] = {f.relative_to(tmp).as_posix(): _file_record(f)
                                for f in sorted(tmp.rglob("*")) if f.is_file()}
        atomic_write_json(tmp / "manifest.json", ds.manifest)
    ds.path = out
    return out


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
