"""What ``data prepare`` keeps of the raw data (docs/data.md): cleaned titles, items with a title and
an image where required, rows that are not duplicates, the iterated k-core, users long enough for
leave-one-out; and dense ids in order of first appearance. :func:`~.dataset.build` runs these steps.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import PrepareConfig
from ..io import DataFormatError
from .images import ImageStore
from .raw_data import RawData

DROP_EXAMPLES = 5  # dropped items named per reason in the manifest and the prepare report
_TAG = re.compile(r"<[^>]+>")
_WHITESPACE = re.compile(r"\s+")


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
    text = _WHITESPACE.sub(" ", _TAG.sub(" ", text)).strip()
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
    n_users, n_items = int(user.max()) + 1, int(item.max()) + 1
    while True:
        rounds += 1
        user_ok = np.bincount(user[keep], minlength=n_users) >= k
        item_ok = np.bincount(item[keep], minlength=n_items) >= k
        row_ok = user_ok[user] & item_ok[item] & keep
        if row_ok.sum() == keep.sum():
            return keep, rounds
        keep = row_ok


@dataclass
class FilteredItems:
    """The raw items (one entry per ``RawData.item_ids``) with what prepare found for each."""

    keep: np.ndarray  # (n_items,) bool: has what the config requires
    titles: np.ndarray  # (n_items,) object: cleaned title or None
    image_paths: np.ndarray  # (n_items,) object: verified local image or None
    image_urls: np.ndarray  # (n_items,) object: the metadata's image URL or None
    drops: dict[str, int]  # items dropped per reason (counted over items that occur in interactions)
    drop_examples: dict[str, list[str]]  # the first few dropped items' ids per reason


def filter_items(raw: RawData, cfg: PrepareConfig, images: ImageStore | None = None,
                 progress: bool = True) -> FilteredItems:
    """Clean every item's title and resolve its image; keep the items that have what ``cfg`` requires."""
    need_titles = cfg.require_titles == "yes" or (cfg.require_titles == "auto" and raw.meta is not None)
    if cfg.require_titles == "yes" and raw.meta is None:
        raise DataFormatError(", ".join(raw.sources), "titles are required but the input carries no item metadata")
    item_ids = np.asarray(raw.item_ids, dtype=object)
    meta = raw.meta or {}
    titles = np.array([clean_title((meta.get(i) or {}).get("title"), cfg.max_title_tokens) for i in raw.item_ids], dtype=object)
    drops: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    keep = np.ones(len(item_ids), dtype=bool)
    if need_titles:
        no_meta = np.array([i not in meta for i in raw.item_ids])
        no_title = (titles == None) & ~no_meta  # noqa: E711 (elementwise)
        drops["no_metadata"] = int(no_meta.sum())
        drops["no_title"] = int(no_title.sum())
        examples["no_metadata"] = list(item_ids[no_meta][:DROP_EXAMPLES])
        examples["no_title"] = list(item_ids[no_title][:DROP_EXAMPLES])
        keep &= ~(no_meta | no_title)
    image_paths = np.full(len(item_ids), None, dtype=object)
    urls = np.array([(meta.get(i) or {}).get("image_url") for i in raw.item_ids], dtype=object)
    if cfg.require_images or images is not None or cfg.images:
        store = images or ImageStore(cfg.images, cfg.image_cache, cfg.max_pixels, offline=cfg.offline)
        todo = np.flatnonzero(keep)
        resolution = store.resolve(((item_ids[k], urls[k]) for k in todo), progress=progress)
        for k in todo:
            image_paths[k] = resolution.paths.get(item_ids[k])
        if cfg.require_images:
            for reason, count in resolution.counts().items():
                drops[reason], examples[reason] = count, resolution.examples(reason, DROP_EXAMPLES)
            keep &= image_paths != None  # noqa: E711
    return FilteredItems(keep, titles, image_paths, urls, drops, examples)


def _drop_hint(drops: dict[str, int], n_items: int) -> str:
    """What to pass when every item was dropped for want of titles or of images."""
    if drops.get("no_metadata", 0) + drops.get("no_title", 0) >= n_items:
        return "; no item has a title: pass --require-titles no to prepare an ids-only dataset"
    left = n_items - drops.get("no_metadata", 0) - drops.get("no_title", 0)
    if sum(count for reason, count in drops.items() if reason not in ("no_metadata", "no_title")) >= left:
        return "; no item has a usable image: pass --images FOLDER, or --require-images no for a dataset without images"
    return ""


def filter_rows(raw: RawData, keep_item: np.ndarray, k_core: int,
                item_drops: dict[str, int]) -> tuple[np.ndarray, int, dict[str, int]]:
    """The raw rows (indices, in file order) a dataset keeps, the k-core's rounds and the rows
    dropped per reason.

    Drops rows of items not kept, then duplicate (user, item, time) rows (the first kept), then rows
    outside the iterated ``k_core`` and rows of users left with fewer than 3 (too short for
    leave-one-out; only possible with ``k_core`` < 3). ``item_drops`` (the items dropped per
    reason) only explains an empty result."""
    rows = np.flatnonzero(keep_item[raw.item])
    if rows.size == 0:
        raise DataFormatError(", ".join(raw.sources), f"no interactions left after dropping items ({item_drops})"
                              + _drop_hint(item_drops, len(raw.item_ids)))
    triples = pd.DataFrame({"user": raw.user[rows], "item": raw.item[rows], "timestamp": raw.timestamp[rows]})
    repeated = triples.duplicated(keep="first").to_numpy()
    drops = {"duplicate_rows": int(repeated.sum())}
    rows = rows[~repeated]

    user, item = raw.user[rows], raw.item[rows]
    in_core, rounds = kcore(user, item, k_core)
    rows_per_user = np.bincount(user[in_core], minlength=len(raw.user_ids))
    short = rows_per_user[user] < 3
    drops["kcore_rows"] = int((~in_core).sum())
    drops["short_user_rows"] = int((in_core & short).sum())
    rows = rows[in_core & ~short]
    if rows.size == 0:
        raise DataFormatError(", ".join(raw.sources), f"no interactions survive the {k_core}-core: lower --k-core")
    return rows, rounds, drops


def first_appearance_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct, dense)``: the distinct codes in order of first appearance, and each entry of
    ``codes`` as its position in ``distinct`` (dense ids 0 .. len(distinct) - 1)."""
    unique_codes, first_index = np.unique(codes, return_index=True)
    distinct = unique_codes[np.argsort(first_index, kind="stable")]
    dense_of_code = np.empty(int(codes.max()) + 1, dtype=np.int64)
    dense_of_code[distinct] = np.arange(distinct.size)
    return distinct, dense_of_code[codes]
