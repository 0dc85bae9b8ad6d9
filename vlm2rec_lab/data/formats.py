"""Readers for the raw formats of DESIGN §1; each returns a :class:`RawData`.

Readers only parse: cleaning, filtering and splitting happen in :mod:`vlm2rec_lab.data.dataset`.
Interactions are collected as integer codes while reading (no per-row Python objects are kept), so
memory and time grow linearly with the number of rows.
"""
from __future__ import annotations

import ast
import csv
import functools
import io
import math
import os
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import orjson

from ..io import DataFormatError, iter_lines


@dataclass
class RawData:
    """Interactions as codes into ``user_ids`` / ``item_ids``, in file order, plus item metadata.

    ``meta`` maps item id -> {"title", "image_url", "category"}; it is ``None`` when the source
    carries no item metadata at all (e.g. a bare P5 ``user_sequence.txt``).
    ``timestamp`` is the source's time, or the position in the user's sequence for sequence formats.
    """

    user_ids: list[str]
    item_ids: list[str]
    user: np.ndarray  # (N,) int64 codes into user_ids
    item: np.ndarray  # (N,) int64 codes into item_ids
    timestamp: np.ndarray  # (N,) int64
    meta: dict[str, dict] | None
    bad_lines: dict[str, dict] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return int(self.user.shape[0])


class BadLines:
    """Stops at the first malformed line, or (``skip=True``) counts them per file and keeps examples."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.report: dict[str, dict] = {}

    def __call__(self, path, line: int, message: str) -> None:
        if not self.skip:
            raise DataFormatError(path, message, line)
        rec = self.report.setdefault(str(path), {"count": 0, "examples": []})
        rec["count"] += 1
        if len(rec["examples"]) < 5:
            rec["examples"].append(f"line {line}: {message}")


class _Collector:
    """Turns (user, item, time) strings into integer codes as they are read."""

    def __init__(self):
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.u = array("q")
        self.i = array("q")
        self.t = array("q")

    def add(self, user: str, item: str, ts: int) -> None:
        users, items = self.users, self.items
        u = users.get(user)
        if u is None:
            u = users[user] = len(users)
        i = items.get(item)
        if i is None:
            i = items[item] = len(items)
        self.u.append(u)
        self.i.append(i)
        self.t.append(ts)

    def finish(self, meta, bad: BadLines, sources: list[str]) -> RawData:
        if not self.u:
            raise DataFormatError(", ".join(sources), "no interactions were read")
        return RawData(
            user_ids=list(self.users),
            item_ids=list(self.items),
            user=np.frombuffer(self.u, dtype=np.int64).copy(),
            item=np.frombuffer(self.i, dtype=np.int64).copy(),
            timestamp=np.frombuffer(self.t, dtype=np.int64).copy(),
            meta=meta,
            bad_lines=bad.report,
            sources=sources,
        )


# --------------------------------------------------------------------------- helpers


def _expand(inputs: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for p in inputs:
        path = Path(p)
        if path.is_dir():
            out.extend(sorted(q for q in path.iterdir() if q.is_file() and not q.name.startswith(".")))
        elif path.exists():
            out.append(path)
        else:
            raise DataFormatError(path, "no such file or folder")
    return out


def _is_meta(path: Path) -> bool:
    return path.name.lower().startswith("meta")


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _as_int_time(value, what: str = "timestamp") -> int:
    """An int, a float or a numeric string as an int64 unix time (floats truncated).
    Anything else -- a non-number, inf, nan, a value beyond int64 -- raises ValueError naming ``what``."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ValueError(f"{what} {value!r} is not a number")
    if isinstance(number, float):
        if not math.isfinite(number):
            raise ValueError(f"{what} {value!r} is not a finite unix time")
        number = int(number)
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise ValueError(f"{what} {value!r} does not fit an int64 unix time")
    return number


def _str_field(obj: dict, key: str) -> str:
    if key not in obj:
        raise KeyError(f"missing field {key!r}")
    v = obj[key]
    if not isinstance(v, (str, int)) or v == "":
        raise KeyError(f"field {key!r} is empty or not a string: {v!r}")
    return str(v)


def _parse_json(text: str):
    return orjson.loads(text)


def _parse_literal(text: str):
    return ast.literal_eval(text)  # never eval(): DESIGN §1


def _parse_json_or_literal(text: str):
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return ast.literal_eval(text)


def _first(v) -> str | None:
    if isinstance(v, str):
        return v or None
    if isinstance(v, (list, tuple)):
        for x in v:
            if isinstance(x, str) and x:
                return x
    return None


def _category(obj: dict) -> str | None:
    cats = obj.get("category") or obj.get("categories")
    if cats and isinstance(cats, (list, tuple)) and isinstance(cats[0], (list, tuple)):
        cats = cats[0]  # 2014: a list of category paths
    if isinstance(cats, (list, tuple)):
        cats = [c for c in cats if isinstance(c, str) and c]
        if cats:
            return cats[1] if len(cats) > 1 else cats[0]
    main = obj.get("main_cat")
    return main if isinstance(main, str) and main else None


def _meta_record(obj: dict) -> dict:
    title = obj.get("title")
    return {
        "title": title if isinstance(title, str) else None,
        "image_url": _first(obj.get("imageURLHighRes")) or _first(obj.get("imageURL")) or _first(obj.get("imUrl")),
        "category": _category(obj),
    }


def _iter_records(paths, parse: Callable[[str], object], bad: BadLines):
    """``(path, line, dict)`` for each line that parses to an object; the others go to ``bad``."""
    for path in paths:
        for lineno, text in iter_lines(path):
            try:
                obj = parse(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                bad(path, lineno, f"not a valid record ({type(e).__name__}: {str(e)[:80]})")
                continue
            if type(obj) is not dict:
                bad(path, lineno, f"expected an object, got {type(obj).__name__}")
                continue
            yield path, lineno, obj


def read_meta(paths: Iterable[Path], parse: Callable[[str], object], bad: BadLines) -> dict[str, dict]:
    """Amazon metadata lines (2018 JSON or 2014 Python literals) -> item id -> record."""
    meta: dict[str, dict] = {}
    for path, lineno, obj in _iter_records(paths, parse, bad):
        try:
            asin = _str_field(obj, "asin")
        except KeyError as e:
            bad(path, lineno, e.args[0])
            continue
        meta.setdefault(asin, _meta_record(obj))
    return meta


def _read_review_lines(paths, parse, col: _Collector, bad: BadLines) -> None:
    add = col.add
    for path, lineno, obj in _iter_records(paths, parse, bad):
        user, item, ts = obj.get("reviewerID"), obj.get("asin"), obj.get("unixReviewTime")
        if not (type(user) is str and user and type(item) is str and item
                and type(ts) is int and _INT64_MIN <= ts <= _INT64_MAX):
            try:  # the slow path names what is wrong
                user = _str_field(obj, "reviewerID")
                item = _str_field(obj, "asin")
                if "unixReviewTime" not in obj:
                    raise KeyError("missing field 'unixReviewTime'")
                ts = _as_int_time(obj["unixReviewTime"], "unixReviewTime")
            except (KeyError, ValueError) as e:
                bad(path, lineno, e.args[0])
                continue
        add(user, item, ts)


# --------------------------------------------------------------------------- readers


def _read_with_meta(inputs, skip_bad_lines: bool, what: str, read_rows, parse_meta) -> RawData:
    """The shape every line-per-record format shares: data files, plus optional ``meta_*`` files.
    ``read_rows(paths, collector, bad)`` reads the data files."""
    paths = _expand(inputs)
    bad = BadLines(skip_bad_lines)
    data = [p for p in paths if not _is_meta(p)]
    metas = [p for p in paths if _is_meta(p)]
    if not data:
        raise DataFormatError(", ".join(map(str, paths)) or "inputs", f"no {what} file among the inputs (files named meta_* are metadata)")
    col = _Collector()
    read_rows(data, col, bad)
    meta = read_meta(metas, parse_meta, bad) if metas else None
    return col.finish(meta, bad, [str(p) for p in paths])


def read_amazon2018(inputs: Iterable[str], skip_bad_lines: bool = False) -> RawData:
    """Amazon 2018: reviews JSON lines (reviewerID, asin, unixReviewTime) and ``meta_*`` JSON lines."""
    return _read_with_meta(inputs, skip_bad_lines, "review",
                           lambda paths, col, bad: _read_review_lines(paths, _parse_json, col, bad), _parse_json)


def read_amazon2014(inputs: Iterable[str], skip_bad_lines: bool = False) -> RawData:
    """Amazon 2014: reviews (JSON, or Python literals in the raw dumps) and ``meta_*`` Python literals."""
    return _read_with_meta(inputs, skip_bad_lines, "review",
                           lambda paths, col, bad: _read_review_lines(paths, _parse_json_or_literal, col, bad), _parse_literal)


_COLUMN_NAME = re.compile(r"[A-Za-z_][\w ]*")


def _is_column_name(text: str) -> bool:
    """A word such as ``rating`` or ``unixReviewTime``; not a number (``inf`` and ``nan`` are numbers)."""
    if not _COLUMN_NAME.fullmatch(text):
        return False
    try:
        float(text)
    except ValueError:
        return True
    return False


def _read_rating_rows(paths, col: _Collector, bad: BadLines) -> None:
    for path in paths:
        for k, (lineno, text) in enumerate(iter_lines(path)):
            try:
                row = next(csv.reader(io.StringIO(text)))
            except csv.Error as e:
                bad(path, lineno, f"not a CSV row ({e})")
                continue
            if len(row) != 4:
                bad(path, lineno, f"expected 4 fields (item,user,rating,timestamp), found {len(row)}")
                continue
            fields = [x.strip() for x in row]
            if k == 0 and all(map(_is_column_name, fields)):
                continue  # a header: the file's first line, every field a column name
            item, user, rating, ts = fields
            try:
                float(rating)
                t = _as_int_time(ts)
            except ValueError as e:
                bad(path, lineno, f"{e.args[0]} (rating {rating!r}, timestamp {ts!r})")
                continue
            if not item or not user:
                bad(path, lineno, "empty item or user field")
                continue
            col.add(user, item, t)


def read_ratings_csv(inputs: Iterable[str], skip_bad_lines: bool = False) -> RawData:
    """Amazon 2018 ratings CSV: ``item,user,rating,timestamp`` (no header; a first line whose four fields
    are all column names, e.g. ``item,user,rating,timestamp``, is skipped as one).
    Files named ``meta_*`` among the inputs are read as metadata (JSON, or 2014 literals)."""
    return _read_with_meta(inputs, skip_bad_lines, "ratings", _read_rating_rows, _parse_json_or_literal)


_NOT_ID_CHAR = re.compile(r"[^\w.\s-]")  # ids are letters, digits, '_', '.' and '-'


def _not_an_id(text: str, tokens: list[str]) -> str | None:
    """The first of a line's tokens with a character no id has, or None."""
    if text.replace(" ", "").isalnum() or not _NOT_ID_CHAR.search(text):  # isalnum: the usual line, fast
        return None
    return next(t for t in tokens if _NOT_ID_CHAR.search(t))


def _read_sequence_rows(paths, col: _Collector, bad: BadLines, integer_ids: bool = False) -> None:
    for path in paths:
        for lineno, text in iter_lines(path):
            parts = text.split()
            if len(parts) < 2:
                bad(path, lineno, f"expected a user id followed by item ids, found {len(parts)} field(s)")
                continue
            token = _not_an_id(text, parts)
            if token is not None:
                bad(path, lineno, f"{token!r} is not an id (ids are letters, digits, '_', '.' and '-')")
                continue
            if integer_ids and not all(p.isdigit() for p in parts):
                token = next(p for p in parts if not p.isdigit())
                bad(path, lineno, f"{token!r} is not an integer id (--integer-ids: every id on a line is an integer)")
                continue
            for pos, item in enumerate(parts[1:]):
                col.add(parts[0], item, pos)


def read_p5(inputs: Iterable[str], skip_bad_lines: bool = False, integer_ids: bool = False) -> RawData:
    """P5 / S3-Rec ``user_sequence.txt``: a user id, then that user's item ids in chronological order,
    separated by whitespace. Ids are integers or raw ids such as reviewer ids and ASINs: letters,
    digits, '_', '.' and '-' (a line with other characters, e.g. JSON or CSV, is malformed).
    Timestamps are positions in the sequence. An optional ``meta_*`` file adds titles and images.
    ``integer_ids``: P5's own integer-indexed files, where any other token is malformed (ours: off
    by default, since the shared Beauty file, like S3-Rec's raw one, holds reviewer ids and ASINs)."""
    return _read_with_meta(inputs, skip_bad_lines, "sequence",
                           functools.partial(_read_sequence_rows, integer_ids=integer_ids), _parse_json_or_literal)


def _atomic_header(path: Path, text: str) -> list[str]:
    names = [c.split(":", 1)[0] for c in text.split("\t")]
    if not all(":" in c for c in text.split("\t")):
        raise DataFormatError(path, f"header must be name:type columns separated by tabs, found {text[:80]!r}", 1)
    return names


def _read_index(path: Path, bad: BadLines) -> dict[str, str]:
    """``.item2index`` / ``.user2index``: ``id<TAB>index`` -> {index: id}."""
    out: dict[str, str] = {}
    for lineno, text in iter_lines(path):
        parts = text.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1].strip().lstrip("-").isdigit():
            bad(path, lineno, f"expected 'id<TAB>integer index', found {text[:80]!r}")
            continue
        out[parts[1].strip()] = parts[0]
    return out


def read_atomic(inputs: Iterable[str], skip_bad_lines: bool = False) -> RawData:
    """RecBole / UniSRec atomic files.

    ``.inter`` files either list interactions (``user_id``, ``item_id`` [, ``timestamp``]) or, in the
    UniSRec layout, one example per line (``user_id``, ``item_id_list``, ``item_id``): history then
    target. Sequence files are merged across train/valid/test into one chronological sequence per
    user by chaining each line onto the previous one (histories may be cut, e.g. at 50 items).
    ``.item2index`` / ``.user2index`` map integer indices back to ids; ``.text`` gives titles.
    """
    given = [Path(p) for p in inputs]
    paths = _expand(inputs)
    known = (".inter", ".text", ".item2index", ".user2index")
    for p in given:
        if p.is_file() and p.suffix not in known and not p.name.endswith(tuple(k + ".gz" for k in known)):
            raise DataFormatError(p, f"not an atomic file (expected one of {', '.join(known)})")

    def kind(p: Path) -> str | None:
        name = p.name[:-3] if p.name.endswith(".gz") else p.name
        suffix = os.path.splitext(name)[1]
        return suffix if suffix in known else None

    bad = BadLines(skip_bad_lines)
    inters = [p for p in paths if kind(p) == ".inter"]
    if not inters:
        raise DataFormatError(", ".join(map(str, given)), "no .inter file among the inputs")
    item_index: dict[str, str] = {}
    user_index: dict[str, str] = {}
    for p in paths:
        if kind(p) == ".item2index":
            item_index.update(_read_index(p, bad))
        elif kind(p) == ".user2index":
            user_index.update(_read_index(p, bad))
    item_of = (lambda x: item_index.get(x, x)) if item_index else (lambda x: x)
    user_of = (lambda x: user_index.get(x, x)) if user_index else (lambda x: x)

    col = _Collector()
    seq_lines: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for path in inters:
        header = None
        for lineno, text in iter_lines(path):
            if header is None:
                header = _atomic_header(path, text)
                continue
            parts = text.split("\t")
            if len(parts) != len(header):
                bad(path, lineno, f"expected {len(header)} tab-separated fields ({', '.join(header)}), found {len(parts)}")
                continue
            row = dict(zip(header, parts))
            if "item_id_list" in row:
                if "user_id" not in row or "item_id" not in row:
                    raise DataFormatError(path, "sequence layout needs user_id, item_id_list and item_id columns", 1)
                hist = tuple(row["item_id_list"].split())
                target = row["item_id"].strip()
                if not target or not row["user_id"]:
                    bad(path, lineno, "empty user_id or item_id")
                    continue
                seq_lines.setdefault(row["user_id"], []).append((hist, target))
            else:
                try:
                    user, item = row["user_id"], row["item_id"]
                except KeyError as e:
                    raise DataFormatError(path, f"header lacks column {e.args[0]!r}", 1) from None
                if not user or not item:
                    bad(path, lineno, "empty user_id or item_id")
                    continue
                try:
                    ts = _as_int_time(row["timestamp"]) if "timestamp" in row else lineno
                except ValueError as e:
                    bad(path, lineno, e.args[0])
                    continue
                col.add(user_of(user), item_of(item), ts)
        if header is None:
            raise DataFormatError(path, "no header line")
    for user, lines in seq_lines.items():
        for pos, item in enumerate(_merge_sequence_lines(lines)):
            col.add(user_of(user), item_of(item), pos)

    meta = None
    texts = [p for p in paths if kind(p) == ".text"]
    if texts:
        meta = {}
        for path in texts:
            header = None
            for lineno, text in iter_lines(path):
                if header is None:
                    header = _atomic_header(path, text)
                    if "item_id" not in header or "text" not in header:
                        raise DataFormatError(path, "a .text file needs item_id and text columns", 1)
                    continue
                parts = text.split("\t")
                if len(parts) != len(header):
                    bad(path, lineno, f"expected {len(header)} tab-separated fields, found {len(parts)}")
                    continue
                row = dict(zip(header, parts))
                meta.setdefault(item_of(row["item_id"]), {"title": row["text"], "image_url": None, "category": None})
    return col.finish(meta, bad, [str(p) for p in paths])


def _merge_sequence_lines(lines: list[tuple[tuple[str, ...], str]]) -> list[str]:
    """Rebuild one chronological sequence from (history, target) lines whose histories may be cut.

    Each line's history is the previous line's history plus target, cut to the longest history
    length seen. Starting from the shortest history, each next line is found by that key. Lines that
    do not chain (inconsistent input) fall back to the longest line, which is the most recent.
    """
    if len(lines) == 1:
        hist, target = lines[0]
        return [*hist, target]
    cut = max(len(h) for h, _ in lines)
    by_hist: dict[tuple[str, ...], list[int]] = {}
    for k, (h, _) in enumerate(lines):
        by_hist.setdefault(h, []).append(k)
    start = min(range(len(lines)), key=lambda k: len(lines[k][0]))
    seq = [*lines[start][0], lines[start][1]]
    used = {start}
    while True:
        key = tuple(seq[-cut:]) if len(seq) > cut else tuple(seq)
        nxt = next((k for k in by_hist.get(key, ()) if k not in used), None)
        if nxt is None:
            break
        used.add(nxt)
        seq.append(lines[nxt][1])
    if len(used) != len(lines):
        hist, target = max(lines, key=lambda ht: len(ht[0]))
        longest = [*hist, target]
        return longest if len(longest) > len(seq) else seq
    return seq


READERS: dict[str, Callable[..., RawData]] = {
    "amazon2018": read_amazon2018,
    "amazon2014": read_amazon2014,
    "ratings-csv": read_ratings_csv,
    "atomic": read_atomic,
    "p5": read_p5,
}


def read_raw(fmt: str, inputs: Iterable[str], skip_bad_lines: bool = False, integer_ids: bool = False) -> RawData:
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(READERS)}")
    if integer_ids and fmt != "p5":
        raise ValueError(f"--integer-ids applies to --format p5, not {fmt}")
    return READERS[fmt](list(inputs), skip_bad_lines=skip_bad_lines, **({"integer_ids": True} if integer_ids else {}))
