"""Readers for the raw formats of docs/data.md; each returns a :class:`~.raw_data.RawData`.

Readers only parse: cleaning and filtering happen in :mod:`.cleaning`, splitting in :mod:`.dataset`.
This module holds the line-per-record formats (Amazon 2018 and 2014 reviews, ratings CSV, P5
sequences) and :func:`read_raw`, which picks a reader by format name; the atomic files' reader is
in :mod:`.atomic_files`, what every reader shares in :mod:`.raw_data`.
"""
from __future__ import annotations

import csv
import functools
import io
import re
from pathlib import Path
from typing import Callable, Iterable

from ..io import DataFormatError, iter_lines
from .atomic_files import read_atomic
from .raw_data import (
    INT64_MAX,
    INT64_MIN,
    BadLines,
    InteractionCollector,
    RawData,
    as_int_time,
    expand_inputs,
    is_meta_file,
    iter_records,
    parse_json,
    parse_json_or_literal,
    parse_literal,
    str_field,
)

# --------------------------------------------------------------------------- Amazon metadata


def _first(value) -> str | None:
    """``value`` itself when a non-empty string, else the first non-empty string in a list of them."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, (list, tuple)):
        for entry in value:
            if isinstance(entry, str) and entry:
                return entry
    return None


def _category(record: dict) -> str | None:
    categories = record.get("category") or record.get("categories")
    if categories and isinstance(categories, (list, tuple)) and isinstance(categories[0], (list, tuple)):
        categories = categories[0]  # 2014: a list of category paths
    if isinstance(categories, (list, tuple)):
        categories = [name for name in categories if isinstance(name, str) and name]
        if categories:
            return categories[1] if len(categories) > 1 else categories[0]
    main = record.get("main_cat")
    return main if isinstance(main, str) and main else None


def _meta_record(record: dict) -> dict:
    title = record.get("title")
    return {
        "title": title if isinstance(title, str) else None,
        "image_url": _first(record.get("imageURLHighRes")) or _first(record.get("imageURL")) or _first(record.get("imUrl")),
        "category": _category(record),
    }


def read_meta(paths: Iterable[Path], parse: Callable[[str], object], bad: BadLines) -> dict[str, dict]:
    """Amazon metadata lines (2018 JSON or 2014 Python literals) -> item id -> record."""
    meta: dict[str, dict] = {}
    for path, lineno, record in iter_records(paths, parse, bad):
        try:
            asin = str_field(record, "asin")
        except KeyError as e:
            bad(path, lineno, e.args[0])
            continue
        meta.setdefault(asin, _meta_record(record))
    return meta


def _read_review_lines(paths, parse, collector: InteractionCollector, bad: BadLines) -> None:
    add = collector.add
    for path, lineno, record in iter_records(paths, parse, bad):
        user, item, timestamp = record.get("reviewerID"), record.get("asin"), record.get("unixReviewTime")
        if not (type(user) is str and user and type(item) is str and item
                and type(timestamp) is int and INT64_MIN <= timestamp <= INT64_MAX):
            try:  # the slow path names what is wrong
                user = str_field(record, "reviewerID")
                item = str_field(record, "asin")
                if "unixReviewTime" not in record:
                    raise KeyError("missing field 'unixReviewTime'")
                timestamp = as_int_time(record["unixReviewTime"], "unixReviewTime")
            except (KeyError, ValueError) as e:
                bad(path, lineno, e.args[0])
                continue
        add(user, item, timestamp)


# --------------------------------------------------------------------------- readers


def _read_with_meta(inputs, skip_bad_lines: bool, what: str, read_rows, parse_meta) -> RawData:
    """The shape every line-per-record format shares: data files, plus optional ``meta_*`` files.
    ``read_rows(paths, collector, bad)`` reads the data files."""
    paths = expand_inputs(inputs)
    bad = BadLines(skip_bad_lines)
    data_files = [p for p in paths if not is_meta_file(p)]
    meta_files = [p for p in paths if is_meta_file(p)]
    if not data_files:
        raise DataFormatError(", ".join(map(str, paths)) or "inputs", f"no {what} file among the inputs (files named meta_* are metadata)")
    collector = InteractionCollector()
    read_rows(data_files, collector, bad)
    meta = read_meta(meta_files, parse_meta, bad) if meta_files else None
    return collector.finish(meta, bad, [str(p) for p in paths])


def read_amazon2018(inputs: Iterable[str], skip_bad_lines: bool = False) -> RawData:
    """Amazon 2018: reviews JSON lines (reviewerID, asin, unixReviewTime) and ``meta_*`` JSON lines."""
    return _read_with_meta(inputs, skip_bad_lines, "review",
                           lambda paths, collector, bad: _read_review_lines(paths, parse_json, collector, bad), parse_json)


def read_amazon2014(inputs: Iterable[str], skip_bad_lines: bool = False) -> RawData:
    """Amazon 2014: reviews (JSON, or Python literals in the raw dumps) and ``meta_*`` Python literals."""
    return _read_with_meta(inputs, skip_bad_lines, "review",
                           lambda paths, collector, bad: _read_review_lines(paths, parse_json_or_literal, collector, bad), parse_literal)


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


def _read_rating_rows(paths, collector: InteractionCollector, bad: BadLines) -> None:
    for path in paths:
        for position, (lineno, text) in enumerate(iter_lines(path)):
            try:
                row = next(csv.reader(io.StringIO(text)))
            except csv.Error as e:
                bad(path, lineno, f"not a CSV row ({e})")
                continue
            if len(row) != 4:
                bad(path, lineno, f"expected 4 fields (item,user,rating,timestamp), found {len(row)}")
                continue
            fields = [value.strip() for value in row]
            if position == 0 and all(map(_is_column_name, fields)):
                continue  # a header: the file's first line, every field a column name
            item, user, rating, timestamp_text = fields
            try:
                float(rating)
                timestamp = as_int_time(timestamp_text)
            except ValueError as e:
                bad(path, lineno, f"{e.args[0]} (rating {rating!r}, timestamp {timestamp_text!r})")
                continue
            if not item or not user:
                bad(path, lineno, "empty item or user field")
                continue
            collector.add(user, item, timestamp)


def read_ratings_csv(inputs: Iterable[str], skip_bad_lines: bool = False) -> RawData:
    """Amazon 2018 ratings CSV: ``item,user,rating,timestamp`` (no header; a first line whose four fields
    are all column names, e.g. ``item,user,rating,timestamp``, is skipped as one).
    Files named ``meta_*`` among the inputs are read as metadata (JSON, or 2014 literals)."""
    return _read_with_meta(inputs, skip_bad_lines, "ratings", _read_rating_rows, parse_json_or_literal)


_NOT_ID_CHAR = re.compile(r"[^\w.\s-]")  # ids are letters, digits, '_', '.' and '-'


def _not_an_id(text: str, tokens: list[str]) -> str | None:
    """The first of a line's tokens with a character no id has, or None."""
    if text.replace(" ", "").isalnum() or not _NOT_ID_CHAR.search(text):  # isalnum: the usual line, fast
        return None
    return next(token for token in tokens if _NOT_ID_CHAR.search(token))


def _read_sequence_rows(paths, collector: InteractionCollector, bad: BadLines, integer_ids: bool = False) -> None:
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
            if integer_ids and not all(part.isdigit() for part in parts):
                token = next(part for part in parts if not part.isdigit())
                bad(path, lineno, f"{token!r} is not an integer id (--integer-ids: every id on a line is an integer)")
                continue
            for pos, item in enumerate(parts[1:]):
                collector.add(parts[0], item, pos)


def read_p5(inputs: Iterable[str], skip_bad_lines: bool = False, integer_ids: bool = False) -> RawData:
    """P5 / S3-Rec ``user_sequence.txt``: a user id, then that user's item ids in chronological order,
    separated by whitespace. Ids are integers or raw ids such as reviewer ids and ASINs: letters,
    digits, '_', '.' and '-' (a line with other characters, e.g. JSON or CSV, is malformed).
    Timestamps are positions in the sequence. An optional ``meta_*`` file adds titles and images.
    ``integer_ids``: P5's own integer-indexed files, where any other token is malformed (ours: off
    by default, since the shared Beauty file, like S3-Rec's raw one, holds reviewer ids and ASINs)."""
    return _read_with_meta(inputs, skip_bad_lines, "sequence",
                           functools.partial(_read_sequence_rows, integer_ids=integer_ids), parse_json_or_literal)


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
