"""Frozen item embeddings for Task 2 (docs/method.md §4), aligned to a dataset's items.

From a run folder (``RUN/embeddings/item_{F,T,V}.npy`` whose rows follow
``RUN/embeddings/item_ids.txt``), from a ``.npy`` plus an id file (:func:`load_item_embeddings`), or
one table per training seed from a run set (:func:`load_run_set_embeddings`): the embedder's run of
seed s initialises the downstream model of seed s. :func:`load_init` reads what ``--init`` names.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..methods import MODALITIES


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
    row_of = {v: k for k, v in enumerate(ids)}
    wanted = dataset.items["item_id"].astype(str).tolist()
    idx = np.array([row_of.get(v, -1) for v in wanted])  # the file's row of each dataset item, -1 where none
    missing = [v for v, k in zip(wanted, idx) if k < 0]
    out = np.empty((len(wanted), mat.shape[1]), dtype=np.float32)
    out[idx >= 0] = mat[idx[idx >= 0]]
    fallback = None
    if missing:
        msg = (f"{npy}: {len(missing)} of {len(wanted)} dataset items have no embedding "
               f"(e.g. {', '.join(missing[:5])})")
        if on_missing == "error" or len(missing) == len(wanted):
            raise MissingItemsError(msg + "; embed every item of the dataset, or allow a fallback (on_missing='mean')")
        out[idx < 0] = out[idx >= 0].mean(0)
        fallback = "mean of the present rows"
        warnings.warn(msg + f"; filled with the {fallback}", stacklevel=2)
    extra = len(ids) - int((idx >= 0).sum())
    return ItemEmbeddings(out, str(npy), missing, fallback, extra)


def load_run_set_embeddings(dataset, run_set: str | Path, modality: str = "F", on_missing: str = "error",
                            seeds=None) -> dict[int, ItemEmbeddings]:
    """{training seed: item embeddings} of a run set (``SET/seed{s}/``, see :mod:`vlm2rec_lab.runsets`):
    the embedder's run of seed s initialises the downstream model of seed s."""
    from ..runsets import find_runs

    runs = find_runs(run_set)
    lacking = [s for s in (seeds or []) if s not in runs]
    if lacking:
        raise ValueError(f"{run_set}: no run of training seed {lacking} (it has seeds {list(runs)})")
    return {s: load_item_embeddings(dataset, r, modality=modality, on_missing=on_missing)
            for s, r in runs.items() if seeds is None or s in seeds}



def load_init(dataset, init: str | Path, item_ids: str | Path | None = None, modality: str = "F",
              on_missing: str = "error", seeds=None) -> ItemEmbeddings | dict[int, ItemEmbeddings] | None:
    """The item tables ``init`` names: ``"id"`` -> None (a learnable ID table); a run set (a folder
    of run folders) -> {training seed: table} for ``seeds``; a run folder, or a ``.npy`` with
    ``item_ids`` -> one table (:func:`load_item_embeddings`)."""
    if str(init) == "id":
        if item_ids:
            raise ValueError("--item-ids goes with --init FILE.npy (or a run folder), not with --init id")
        return None
    path = Path(str(init))
    is_run = (path / "manifest.json").exists() or (path / "embeddings").is_dir()
    if path.is_dir() and not is_run and not item_ids:
        return load_run_set_embeddings(dataset, path, modality, on_missing, seeds=seeds)
    return load_item_embeddings(dataset, init, item_ids, modality, on_missing=on_missing)
