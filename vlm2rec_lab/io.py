"""Atomic file and folder writes, and the readers' line iterator with precise error locations.

Every file a run or a prepared dataset trusts is written to a temporary name first and renamed into
place, so a killed process never leaves a half-written file behind (DESIGN §6).
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

GZIP_MAGIC = b"\x1f\x8b"


class DataFormatError(ValueError):
    """Bad input: says which file, which line (when there is one) and what was wrong."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to ``target``.

    On any exception the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists (pass overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def open_binary(path: str | os.PathLike):
    """Open a plain or gzip file (detected by its magic bytes, not its name) for binary reading."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, "no such file")
    if path.is_dir():
        raise DataFormatError(path, "is a folder, expected a file")
    with open(path, "rb") as f:
        head = f.read(2)
    if not head:
        raise DataFormatError(path, "file is empty")
    if head == GZIP_MAGIC:
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_lines(path: str | os.PathLike, skip_blank: bool = True) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for a plain or gzip text file, UTF-8 strict.

    Broken gzip streams and non-UTF-8 bytes raise :class:`DataFormatError` naming the line.
    A file with no non-blank line raises too.
    """
    lineno = 0
    seen = False
    with open_binary(path) as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataFormatError(path, f"not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r})", lineno) from None
                text = text.rstrip("\r\n")
                if skip_blank and not text.strip():
                    continue
                seen = True
                yield lineno, text
        except (EOFError, OSError, zlib.error) as e:
            if isinstance(e, DataFormatError):
                raise
            raise DataFormatError(path, f"corrupt or truncated compressed stream after line {lineno} ({e})") from None
    if not seen:
        raise DataFormatError(path, "file has no data lines")
