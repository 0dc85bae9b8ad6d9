"""Item images: a local folder (by item id) or URLs through an on-disk cache; verified, RGB, sized.

``ImageStore.resolve`` is what ``data prepare`` uses to decide which items have a readable image;
``ImageStore.load`` is what the encoder uses to read one, with the ``max_pixels`` size policy.
"""
from __future__ import annotations

import hashlib
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError

from ..io import atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
DEFAULT_CACHE = Path.home() / ".cache" / "vlm2rec_lab" / "images"


class ImagesOfflineError(RuntimeError):
    """Images could not be fetched because the network is unreachable; lists what is missing."""


@dataclass
class Resolution:
    """Outcome of resolving the catalogue's images."""

    paths: dict[str, str] = field(default_factory=dict)  # item id -> local file
    missing: dict[str, str] = field(default_factory=dict)  # item id -> reason (no_image / unreadable_image)


def verify_image(path: str | Path) -> str | None:
    """Return None when ``path`` is a decodable image, else the reason it is not."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the file unusable; a real decode catches truncation
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def fit_max_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Largest size with the same aspect ratio and ``width * height <= max_pixels`` (never upscales)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    while w * h > max_pixels:  # rounding guard
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


class ImageStore:
    """Reads item images from a local folder or from URLs cached on disk.

    Args:
        folder: local folder holding ``{item_id}.{png,jpg,...}``; takes precedence over URLs.
        cache_dir: where fetched URLs are kept (by SHA-1 of the URL); fetched once.
        max_pixels: size policy applied by :meth:`load`.
        timeout, retries: per-URL network policy (exponential back-off between tries).
        offline: never touch the network; only what the folder or the cache already holds.
    """

    def __init__(
        self,
        folder: str | Path | None = None,
        cache_dir: str | Path | None = None,
        max_pixels: int = 448 * 448,
        timeout: float = 10.0,
        retries: int = 3,
        offline: bool = False,
    ):
        self.folder = Path(folder) if folder else None
        if self.folder is not None and not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: image folder does not exist")
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        self.max_pixels = max_pixels
        self.timeout = timeout
        self.retries = retries
        self.offline = offline

    # ---------------------------------------------------------------- locating
    def local_path(self, item_id: str) -> Path | None:
        if self.folder is None:
            return None
        for suffix in IMAGE_SUFFIXES:
            p = self.folder / f"{item_id}{suffix}"
            if p.exists():
                return p
        return None

    def cache_path(self, url: str) -> Path:
        suffix = Path(url.split("?")[0]).suffix.lower()
        suffix = suffix if suffix in IMAGE_SUFFIXES else ".img"
        return self.cache_dir / f"{hashlib.sha1(url.encode()).hexdigest()}{suffix}"

    def fetch(self, url: str) -> Path:
        """Download ``url`` into the cache (once). Raises ``urllib.error.HTTPError`` for HTTP
        failures and ``ConnectionError`` when the host cannot be reached after the retries."""
        dest = self.cache_path(url)
        if dest.exists():
            return dest
        if self.offline:
            raise ConnectionError("offline mode and not in the cache")
        last: Exception | None = None
        for attempt in range(self.retries):
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as r:
                    data = r.read()
                atomic_write_bytes(dest, data)
                return dest
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    raise
                last = e
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
            if attempt + 1 < self.retries:
                time.sleep(min(0.2 * 2**attempt, 2.0))
        if isinstance(last, urllib.error.HTTPError):
            raise last
        raise ConnectionError(f"{type(last).__name__}: {getattr(last, 'reason', last)}")

    def resolve(self, items: Iterable[tuple[str, str | None]], progress: bool = True) -> Resolution:
        """Find and verify an image for each ``(item_id, url)``.

        Items with no image anywhere are ``no_image``; files that do not decode, or URLs that answer
        with an HTTP error, are ``unreadable_image``. If any URL cannot be reached at all (no
        network), raises :class:`ImagesOfflineError` listing every item still missing.
        """
        from tqdm.auto import tqdm

        res = Resolution()
        unreachable: list[tuple[str, str, str]] = []
        items = list(items)
        for item_id, url in tqdm(items, desc="images", unit="img", disable=not progress or None, leave=False):
            path = self.local_path(item_id)
            if path is None and url:
                try:
                    path = self.fetch(url)
                except urllib.error.HTTPError:
                    res.missing[item_id] = "unreadable_image"
                    continue
                except ConnectionError as e:
                    unreachable.append((item_id, url, str(e)))
                    continue
            if path is None:
                res.missing[item_id] = "no_image"
                continue
            if verify_image(path) is not None:
                res.missing[item_id] = "unreadable_image"
                continue
            res.paths[item_id] = str(Path(path).resolve())
        if unreachable:
            shown = "\n".join(f"  {i}\t{u}\t({why})" for i, u, why in unreachable[:20])
            more = f"\n  ... and {len(unreachable) - 20} more" if len(unreachable) > 20 else ""
            raise ImagesOfflineError(
                f"{len(unreachable)} of {len(items)} item images could not be fetched (network unreachable or offline). "
                f"Missing:\n{shown}{more}\n"
                f"Put the images in a folder named by item id and pass --images DIR, fill the cache at "
                f"{self.cache_dir}, or prepare without images (--require-images no)."
            )
        return res

    # ---------------------------------------------------------------- reading
    def load(self, path: str | Path) -> Image.Image:
        """Open an image as RGB, shrunk (aspect kept) so that width * height <= max_pixels."""
        with Image.open(path) as im:
            im = im.convert("RGB")
        w, h = fit_max_pixels(im.width, im.height, self.max_pixels)
        if (w, h) != im.size:
            im = im.resize((w, h), Image.Resampling.BICUBIC)
        return im
