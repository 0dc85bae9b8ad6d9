"""The reader of RecBole / UniSRec atomic files (``.inter``, ``.text``, ``.item2index``, ``.user2index``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..io import DataFormatError, iter_lines
from .raw_data import BadLines, InteractionCollector, RawData, as_int_time, expand_inputs

ATOMIC_SUFFIXES = (".inter", ".text", ".item2index", ".user2index")


def read_atomic(inputs: Iterable[str], skip_bad_lines: bool = False) -> RawData:
    """RecBole / UniSRec atomic files.

    ``.inter`` files either list interactions (``user_id``, ``item_id`` [, ``timestamp``]) or, in the
    UniSRec layout, one example per line (``user_id``, ``item_id_list``, ``item_id``): history then
    target. Sequence files are merged across train/valid/test into one chronological sequence per
    user by chaining each line onto the previous one (histories may be cut, e.g. at 50 items).
    ``.item2index`` / ``.user2index`` map integer indices back to ids; ``.text`` gives titles.
    """
    given = [Path(p) for p in inputs]
    paths = expand_inputs(inputs)
    for path in given:
        if path.is_file() and _atomic_suffix(path) is None:
            raise DataFormatError(path, f"not an atomic file (expected one of {', '.join(ATOMIC_SUFFIXES)})")
    bad = BadLines(skip_bad_lines)
    inters = [p for p in paths if _atomic_suffix(p) == ".inter"]
    if not inters:
        raise DataFormatError(", ".join(map(str, given)), "no .inter file among the inputs")
    item_index: dict[str, str] = {}
    user_index: dict[str, str] = {}
    for path in paths:
        if _atomic_suffix(path) == ".item2index":
            item_index.update(_read_index(path, bad))
        elif _atomic_suffix(path) == ".user2index":
            user_index.update(_read_index(path, bad))
    item_of = (lambda x: item_index.get(x, x)) if item_index else (lambda x: x)
    user_of = (lambda x: user_index.get(x, x)) if user_index else (lambda x: x)

    collector = InteractionCollector()
    sequence_lines: dict[str, list[tuple[tuple[str, ...], str]]] = {}  # user -> (history, target) per line
    for path in inters:
        _read_inter_file(path, bad, collector, sequence_lines, user_of, item_of)
    for user, lines in sequence_lines.items():
        for pos, item in enumerate(merge_sequence_lines(lines)):
            collector.add(user_of(user), item_of(item), pos)

    texts = [p for p in paths if _atomic_suffix(p) == ".text"]
    meta = _read_titles(texts, bad, item_of) if texts else None
    return collector.finish(meta, bad, [str(p) for p in paths])


def _atomic_suffix(path: Path) -> str | None:
    """Which atomic file ``path`` is (``.inter``, ...; gzip allowed), or None."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = os.path.splitext(name)[1]
    return suffix if suffix in ATOMIC_SUFFIXES else None


def _atomic_header(path: Path, text: str) -> list[str]:
    names = [c.split(":", 1)[0] for c in text.split("\t")]
    if not all(":" in c for c in text.split("\t")):
        raise DataFormatError(path, f"header must be name:type columns separated by tabs, found {text[:80]!r}", 1)
    return names


def _atomic_rows(path: Path, bad: BadLines, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line, {column: field})`` for each data line of an atomic file. The first line is the
    ``name:type`` header, which must name the ``required`` columns; a line with another number of
    fields goes to ``bad``."""
    lines = iter_lines(path)  # raises for a file without a line
    _, header_text = next(lines)
    header = _atomic_header(path, header_text)
    if not all(column in header for column in required):
        raise DataFormatError(path, f"a {_atomic_suffix(path)} file needs {' and '.join(required)} columns", 1)
    for lineno, text in lines:
        fields = text.split("\t")
        if len(fields) != len(header):
            bad(path, lineno, f"expected {len(header)} tab-separated fields ({', '.join(header)}), found {len(fields)}")
            continue
        yield lineno, dict(zip(header, fields))


def _read_index(path: Path, bad: BadLines) -> dict[str, str]:
    """``.item2index`` / ``.user2index``: ``id<TAB>index`` -> {index: id}."""
    id_of_index: dict[str, str] = {}
    for lineno, text in iter_lines(path):
        parts = text.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1].strip().lstrip("-").isdigit():
            bad(path, lineno, f"expected 'id<TAB>integer index', found {text[:80]!r}")
            continue
        id_of_index[parts[1].strip()] = parts[0]
    return id_of_index


def _read_inter_file(path: Path, bad: BadLines, collector: InteractionCollector,
                     sequence_lines: dict[str, list[tuple[tuple[str, ...], str]]],
                     user_of: Callable[[str], str], item_of: Callable[[str], str]) -> None:
    """One ``.inter`` file: interaction rows go to ``collector``, sequence-layout lines to
    ``sequence_lines`` (merged once every file is read)."""
    for lineno, row in _atomic_rows(path, bad):
        if "item_id_list" in row:
            if "user_id" not in row or "item_id" not in row:
                raise DataFormatError(path, "sequence layout needs user_id, item_id_list and item_id columns", 1)
            history = tuple(row["item_id_list"].split())
            target = row["item_id"].strip()
            if not target or not row["user_id"]:
                bad(path, lineno, "empty user_id or item_id")
                continue
            sequence_lines.setdefault(row["user_id"], []).append((history, target))
            continue
        try:
            user, item = row["user_id"], row["item_id"]
        except KeyError as e:
            raise DataFormatError(path, f"header lacks column {e.args[0]!r}", 1) from None
        if not user or not item:
            bad(path, lineno, "empty user_id or item_id")
            continue
        try:
            timestamp = as_int_time(row["timestamp"]) if "timestamp" in row else lineno
        except ValueError as e:
            bad(path, lineno, e.args[0])
            continue
        collector.add(user_of(user), item_of(item), timestamp)


def _read_titles(paths: list[Path], bad: BadLines, item_of: Callable[[str], str]) -> dict[str, dict]:
    """``.text`` files (``item_id``, ``text``) -> item id -> metadata record with the title."""
    meta: dict[str, dict] = {}
    for path in paths:
        for _, row in _atomic_rows(path, bad, required=("item_id", "text")):
            meta.setdefault(item_of(row["item_id"]), {"title": row["text"], "image_url": None, "category": None})
    return meta


def merge_sequence_lines(lines: list[tuple[tuple[str, ...], str]]) -> list[str]:
    """Rebuild one chronological sequence from (history, target) lines whose histories may be cut.

    Each line's history is the previous line's history plus target, cut to the longest history
    length seen. Starting from the shortest history, each next line is found by that key. Lines that
    do not chain (inconsistent input) fall back to the longest line, which is the most recent.
    """
    if len(lines) == 1:
        history, target = lines[0]
        return [*history, target]
    cut = max(len(history) for history, _ in lines)
    lines_by_history: dict[tuple[str, ...], list[int]] = {}
    for k, (history, _) in enumerate(lines):
        lines_by_history.setdefault(history, []).append(k)
    start = min(range(len(lines)), key=lambda k: len(lines[k][0]))
    sequence = [*lines[start][0], lines[start][1]]
    used = {start}
    while True:
        key = tuple(sequence[-cut:]) if len(sequence) > cut else tuple(sequence)
        next_line = next((k for k in lines_by_history.get(key, ()) if k not in used), None)
        if next_line is None:
            break
        used.add(next_line)
        sequence.append(lines[next_line][1])
    if len(used) != len(lines):
        history, target = max(lines, key=lambda line: len(line[0]))
        longest = [*history, target]
        return longest if len(longest) > len(sequence) else sequence
    return sequence
