"""Atomic file and folder writes, and the readers' line iterator with precise error locations.

Every file a run or a prepared dataset trusts is written to a temporary name first and renamed into
place, so a killed process never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterable, Iterator

GZIP_MAGIC = b"\x1f\x8b"


class DataFormatError(ValueError):
    """Bad input: says which file, which line (when there is one) and what was wrong."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders a killed writer of ``target`` left beside it
    (``.NAME.tmp-PID-*`` and ``.NAME.old-PID``, whose process ``PID`` is no longer running; a name
    without a process id is from an older version, and stale). Returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        name_match = re.fullmatch(rf"\.{re.escape(target.name)}\.(?:tmp-(\d+)-.*|old-(\d+)|tmp-[^-]*)", path.name)
        if name_match is None:
            continue
        pid = int(name_match.group(1) or name_match.group(2) or 0)
        if pid and (pid == os.getpid() or _alive(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _refuse_replacing(target: Path, marks: tuple[str, ...], protect: Iterable[str | os.PathLike]) -> None:
    """Why ``target`` (which exists) must not be replaced, raised; nothing when it may be."""
    real = target.resolve()
    for given in protect:
        protected = Path(given).resolve()
        if protected == real or real in protected.parents:
            raise FileExistsError(f"{target}: holds the input {protected}; a folder that holds an input is never replaced: "
                                  f"choose another --out")
    missing = [mark for mark in marks if not (target / mark).exists()]
    if missing:
        raise FileExistsError(f"{target}: is not a folder this command writes (no {', '.join(missing)} in it), so "
                              f"--overwrite does not replace it: choose another --out, or empty it yourself")


def check_replaceable(target: str | os.PathLike, overwrite: bool = False, marks: tuple[str, ...] = (),
                      protect: Iterable[str | os.PathLike] = ()) -> None:
    """Raise :class:`FileExistsError` (saying which rule) unless :func:`atomic_dir` may write
    ``target`` with these arguments: callers check before long work, not only after it."""
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target}: is a file, not a folder: choose another --out")
        _refuse_replacing(target, marks, protect)
        if not overwrite:
            raise FileExistsError(f"{target}: already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False, marks: tuple[str, ...] = (),
               protect: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to ``target``.

    On any exception the temporary folder is removed and ``target`` is left as it was. An existing
    ``target`` is replaced only with ``overwrite``, only when it holds every path in ``marks`` (what
    the caller writes: a prepared dataset's ``manifest.json`` and ``items.parquet``; none for a
    run's own subfolders), and never when it is, or holds, one of ``protect`` (the caller's inputs). Stale
    temporaries of a killed earlier write are removed first; the new folder gets the process's
    umask (a temporary folder is made 0700)."""
    target = Path(target)
    check_replaceable(target, overwrite, marks, protect)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except PermissionError as e:
        where = e.filename or target.parent
        raise PermissionError(e.errno, f"{target}: cannot write in {where} ({e.strerror}): choose an --out "
                                       f"in a folder you can write to") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
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
        os.chmod(tmp, 0o666 & ~_umask())  # (mkstemp makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value):
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


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
            for lineno, line_bytes in enumerate(f, start=1):
                try:
                    text = line_bytes.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataFormatError(path, f"not UTF-8 text (byte {e.start}: {line_bytes[e.start:e.start + 4]!r})",
                                          lineno) from None
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
