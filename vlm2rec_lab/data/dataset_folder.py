"""A prepared dataset's folder (layout in :mod:`vlm2rec_lab.data.dataset`): writing it atomically,
reading it back, checking each file against the size and SHA-256 its manifest recorded, and the
content fingerprint the manifest carries."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..io import DataFormatError, atomic_dir, atomic_write_json

if TYPE_CHECKING:
    from .dataset import Dataset

FORMAT_VERSION = 1
DATA_FILES = ("items.parquet", "interactions.parquet", "users.parquet")  # read by read_dataset_folder
DATASET_MARKS = ("manifest.json", *DATA_FILES)  # what makes a folder a prepared dataset (--overwrite replaces it)


def negatives_file(seed: int) -> str:
    """Where the frozen negatives of ``seed`` lie, relative to the dataset folder."""
    return f"negatives/seed_{seed}.npy"


def file_record(path: Path) -> dict:
    """What the manifest records of a file: its size and SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_file(folder: Path, name: str, manifest: dict) -> None:
    """Raise unless ``folder/name`` is the file its manifest recorded (size and SHA-256); a
    manifest from before files were recorded checks nothing."""
    want = manifest.get("files", {}).get(name)
    if want is None:
        return
    path = folder / name
    if not path.is_file():
        raise DataFormatError(path, "missing: the dataset folder is incomplete; prepare it again")
    got = file_record(path) if path.stat().st_size == want["bytes"] else {"bytes": path.stat().st_size}
    if got != want:
        why = f"{got['bytes']:,} bytes against {want['bytes']:,}" if got["bytes"] != want["bytes"] else "its SHA-256 differs"
        raise DataFormatError(path, f"is not the file this dataset's manifest.json recorded ({why}): it comes from "
                                    f"another prepare or was changed since; prepare the folder again")


def fingerprint(ds: Dataset, negatives: dict[int, np.ndarray]) -> str:
    """SHA-256 of the dataset's content: sequences, ids, titles, categories and its frozen
    ``negatives`` (by seed)."""
    digest = hashlib.sha256()
    for array in (ds.offsets, ds.seq, ds.timestamps):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update("\x1f".join(map(str, ds.user_ids)).encode())
    for column in ("item_id", "title", "category"):
        digest.update("\x1f".join("" if v is None else str(v) for v in ds.items[column]).encode())
    for seed in sorted(negatives):
        digest.update(negatives[seed].tobytes())
    return digest.hexdigest()


def save(ds: Dataset, out: str | Path, overwrite: bool = False, protect=()) -> Path:
    """Write the dataset folder atomically (temporary folder, then rename), recording each file's
    size and SHA-256 in the manifest (checked on load). An existing ``out`` is replaced only with
    ``overwrite`` and only when it is a prepared dataset, never when it is or holds one of
    ``protect`` (the inputs: see :func:`~vlm2rec_lab.io.atomic_dir`)."""
    out = Path(out)
    negatives = {seed: ds.negatives(seed) for seed in ds.seeds}  # loads any not yet read from the old folder
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
        for seed, negatives_of_seed in negatives.items():
            np.save(tmp / negatives_file(seed), negatives_of_seed)
        ds.manifest["name"] = ds.manifest.get("name") or out.name
        ds.manifest["files"] = {f.relative_to(tmp).as_posix(): file_record(f)
                                for f in sorted(tmp.rglob("*")) if f.is_file()}
        atomic_write_json(tmp / "manifest.json", ds.manifest)
    ds.path = out
    return out


def read_dataset_folder(path: Path) -> dict:
    """The fields of a :class:`~.dataset.Dataset` (all but ``path``) read from its folder, each
    data file checked against the manifest first."""
    manifest_file = path / "manifest.json"
    if not manifest_file.exists():
        raise FileNotFoundError(f"{path}: not a prepared dataset (no manifest.json); run `vlm2rec-lab data prepare`")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{manifest_file}: format_version {manifest.get('format_version')} (expected {FORMAT_VERSION}); "
                         f"prepare it again")
    for name in DATA_FILES:
        check_file(path, name, manifest)
    items = pq.read_table(path / "items.parquet").to_pandas()
    interactions = pq.read_table(path / "interactions.parquet")
    user_ids = pq.read_table(path / "users.parquet").column("user_id").to_numpy(zero_copy_only=False)
    user_idx = interactions.column("user_idx").to_numpy()
    offsets = np.concatenate([[0], np.cumsum(np.bincount(user_idx, minlength=len(user_ids)))]).astype(np.int64)
    return {
        "items": items,
        "user_ids": user_ids,
        "offsets": offsets,
        "seq": interactions.column("item_idx").to_numpy().astype(np.int32, copy=False),
        "timestamps": interactions.column("timestamp").to_numpy(),
        "manifest": manifest,
    }


def read_negatives(folder: Path, seed: int, manifest: dict) -> np.ndarray:
    """The frozen negatives of ``seed`` from a dataset folder, checked against the manifest."""
    path = folder / negatives_file(seed)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no frozen negatives for seed {seed}; prepared seeds: {list(manifest['config']['seeds'])}")
    check_file(folder, negatives_file(seed), manifest)
    return np.load(path)
