"""What every raw reader shares: the :class:`RawData` it returns, the bad-line policy, the collector
that turns ids into integer codes as they are read, the input files, and the parsing of one field.

Interactions are collected as integer codes while reading (no per-row Python objects are kept), so
memory and time grow linearly with the number of rows.
"""
from __future__ import annotations

import ast
import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

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
        file_report = self.report.setdefault(str(path), {"count": 0, "examples": []})
        file_report["count"] += 1
        if len(file_report["examples"]) < 5:
            file_report["examples"].append(f"line {line}: {message}")


class InteractionCollector:
    """Turns (user, item, time) strings into integer codes as they are read."""

    def __init__(self):
        self.user_codes: dict[str, int] = {}  # user id -> code, in order of first appearance
        self.item_codes: dict[str, int] = {}
        self.user_column = array("q")
        self.item_column = array("q")
        self.time_column = array("q")

    def add(self, user: str, item: str, timestamp: int) -> None:
        user_codes, item_codes = self.user_codes, self.item_codes
        user_code = user_codes.get(user)
        if user_code is None:
            user_code = user_codes[user] = len(user_codes)
        item_code = item_codes.get(item)
        if item_code is None:
            item_code = item_codes[item] = len(item_codes)
        self.user_column.append(user_code)
        self.item_column.append(item_code)
        self.time_column.append(timestamp)

    def finish(self, meta, bad: BadLines, sources: list[str]) -> RawData:
        if not self.user_column:
            raise DataFormatError(", ".join(sources), "no interactions were read")
        return RawData(
            user_ids=list(self.user_codes),
            item_ids=list(self.item_codes),
            user=np.frombuffer(self.user_column, dtype=np.int64).copy(),
            item=np.frombuffer(self.item_column, dtype=np.int64).copy(),
            timestamp=np.frombuffer(self.time_column, dtype=np.int64).copy(),
            meta=meta,
            bad_lines=bad.report,
            sources=sources,
        )


# --------------------------------------------------------------------------- input files


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """The input files: each file given, and the visible files of each folder given (sorted)."""
    files: list[Path] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            files.extend(sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")))
        elif path.exists():
            files.append(path)
        else:
            raise DataFormatError(path, "no such file or folder")
    return files


def is_meta_file(path: Path) -> bool:
    return path.name.lower().startswith("meta")


# --------------------------------------------------------------------------- fields


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def as_int_time(value, what: str = "timestamp") -> int:
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
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(f"{what} {value!r} does not fit an int64 unix time")
    return number


def str_field(record: dict, key: str) -> str:
    """``record[key]`` as a non-empty string (ints allowed); KeyError naming the field otherwise."""
    if key not in record:
        raise KeyError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, (str, int)) or value == "":
        raise KeyError(f"field {key!r} is empty or not a string: {value!r}")
    return str(value)


def parse_json(text: str):
    return orjson.loads(text)


def parse_literal(text: str):
    return ast.literal_eval(text)  # never eval() on data


def parse_json_or_literal(text: str):
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return ast.literal_eval(text)


def iter_records(paths, parse: Callable[[str], object], bad: BadLines) -> Iterator[tuple[Path, int, dict]]:
    """``(path, line, dict)`` for each line that parses to an object; the others go to ``bad``."""
    for path in paths:
        for lineno, text in iter_lines(path):
            try:
                record = parse(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                bad(path, lineno, f"not a valid record ({type(e).__name__}: {str(e)[:80]})")
                continue
            if type(record) is not dict:
                bad(path, lineno, f"expected an object, got {type(record).__name__}")
                continue
            yield path, lineno, record
