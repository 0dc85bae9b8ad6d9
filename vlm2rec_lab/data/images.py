"""Item images: a local folder (by item id) or URLs through an on-disk cache; verified, RGB, sized.

``ImageStore.resolve`` is what ``data prepare`` uses to decide which items have a readable image;
``ImageStore.load`` is what the encoder uses to read one, with the ``max_pixels`` size policy.
"""
from __future__ import annotations

import hashlib
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image, UnidentifiedImageError

from ..io import atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
URL_SCHEMES = ("http", "https")  # the only schemes ever fetched, redirects included
DEFAULT_CACHE = Path.home() / ".cache" / "vlm2rec_lab" / "images"
REASONS = ("no_image", "unsupported_url_scheme", "unreadable_image")  # every value of Resolution.missing

# what Pillow raises for files it cannot identify or decode, and for decompression bombs
# (the warning only when warnings are turned into errors)
_PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError,
               Image.DecompressionBombError, Image.DecompressionBombWarning)


class ImagesOfflineError(RuntimeError):
    """Images could not be fetched because the network is unreachable; lists what is missing."""


class UnsupportedURLError(ValueError):
    """An image URL (or a redirect it led to) whose scheme is not http or https; never fetched."""


class UnreadableImageError(ValueError):
    """An image file that Pillow cannot read, or one over its decompression-bomb limit; names the file."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: not a readable image ({reason})")
        self.path, self.reason = str(path), reason


@dataclass
class Resolution:
    """Outcome of resolving the catalogue's images."""

    paths: dict[str, str] = field(default_factory=dict)  # item id -> local file
    missing: dict[str, str] = field(default_factory=dict)  # item id -> reason (one of REASONS), in input order

    def counts(self) -> dict[str, int]:
        """Number of items per reason, for every reason in :data:`REASONS` (0 when none)."""
        return {reason: sum(1 for why in self.missing.values() if why == reason) for reason in REASONS}

    def examples(self, reason: str, k: int = 5) -> list[str]:
        """The first ``k`` item ids dropped for ``reason``, in the order the items were resolved."""
        return [item_id for item_id, why in self.missing.items() if why == reason][:k]


def _refuse_bombs(im: Image.Image) -> None:
    """Raise ``DecompressionBombError`` when ``im`` has more pixels than ``Image.MAX_IMAGE_PIXELS``.

    Pillow itself only warns between 1x and 2x that limit, and would then decode the whole image."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.width * im.height > limit:
        raise Image.DecompressionBombError(f"{im.width} x {im.height} pixels exceeds Pillow's limit of {limit} pixels")


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """The image at ``path``, open for the ``with`` block.

    Guarantees that whatever Pillow raises for this file -- at open, or while the block reads it
    (decode, convert, verify) -- comes out as :class:`UnreadableImageError` naming ``path``, and that
    an image over ``Image.MAX_IMAGE_PIXELS`` is refused before any of its pixels are decoded.
    """
    try:
        with Image.open(path) as im:
            _refuse_bombs(im)
            yield im
    except _PIL_ERRORS as e:
        raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e


def verify_image(path: str | Path) -> str | None:
    """Return None when ``path`` is a decodable image within Pillow's pixel limit, else the reason it is not.

    Never raises for a bad file: undecodable, truncated and oversized images all return a reason."""
    try:
        with open_image(path) as im:
            im.verify()
        with open_image(path) as im:  # verify() leaves the file unusable; a real decode catches truncation
            im.load()
    except UnreadableImageError as e:
        return e.reason
    return None


def require_http(url: str) -> None:
    """Raise :class:`UnsupportedURLError` unless ``url`` is an http or https URL."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise UnsupportedURLError(f"{url[:80]}: scheme {scheme or '(none)'!r} is not fetched (only {', '.join(URL_SCHEMES)})")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http(s); any other target raises :class:`UnsupportedURLError`."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        require_http(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def fit_max_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Largest size with the same aspect ratio and ``width * height <= max_pixels`` (never upscales)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    fitted_width, fitted_height = max(1, int(width * scale)), max(1, int(height * scale))
    while fitted_width * fitted_height > max_pixels:  # rounding guard
        if fitted_width >= fitted_height:
            fitted_width -= 1
        else:
            fitted_height -= 1
    return fitted_width, fitted_height


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
        self._root = self.folder.resolve() if self.folder is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        self.max_pixels = max_pixels
        self.timeout = timeout
        self.retries = retries
        self.offline = offline

    # ---------------------------------------------------------------- locating
    def local_path(self, item_id: str) -> Path | None:
        """``{item_id}.{png,jpg,...}`` in the image folder, or None.

        Only files whose directory, symlinks resolved, is the image folder or one below it are found:
        an id such as ``../x`` or ``/abs/x`` finds nothing. (A file in the folder may itself be a
        symlink: the folder's owner put it there, the id did not choose it.)
        """
        if self._root is None:
            return None
        for suffix in IMAGE_SUFFIXES:
            path = self.folder / f"{item_id}{suffix}"
            if self._inside(path) and path.exists():
                return path
        return None

    def _inside(self, path: Path) -> bool:
        """Whether ``path``'s directory, symlinks resolved, is the image folder or below it."""
        try:
            parent = path.parent.resolve()
        except (OSError, ValueError, RuntimeError):  # unreadable, NUL byte, symlink loop
            return False
        return parent == self._root or self._root in parent.parents

    def cache_path(self, url: str) -> Path:
        suffix = Path(url.split("?")[0]).suffix.lower()
        suffix = suffix if suffix in IMAGE_SUFFIXES else ".img"
        return self.cache_dir / f"{hashlib.sha1(url.encode()).hexdigest()}{suffix}"

    def fetch(self, url: str) -> Path:
        """Download ``url`` into the cache (once). Raises :class:`UnsupportedURLError` (before looking at
        the cache, writing nothing) unless ``url`` and every redirect it takes are http or https,
        ``urllib.error.HTTPError`` for HTTP failures and ``ConnectionError`` when the host cannot be
        reached after the retries."""
        require_http(url)
        dest = self.cache_path(url)
        if dest.exists():
            return dest
        if self.offline:
            raise ConnectionError("offline mode and not in the cache")
        last_error: Exception | None = None
        for attempt in range(self.retries):
            try:
                with _OPENER.open(url, timeout=self.timeout) as response:
                    data = response.read()
                atomic_write_bytes(dest, data)
                return dest
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    raise
                last_error = e
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last_error = e
            if attempt + 1 < self.retries:
                time.sleep(min(0.2 * 2**attempt, 2.0))
        if isinstance(last_error, urllib.error.HTTPError):
            raise last_error
        raise ConnectionError(f"{type(last_error).__name__}: {getattr(last_error, 'reason', last_error)}")

    def resolve(self, items: Iterable[tuple[str, str | None]], progress: bool = True) -> Resolution:
        """Find and verify an image for each ``(item_id, url)``.

        Items with no image anywhere (the image folder is the only place looked in locally) are
        ``no_image``; URLs that are not http(s), or redirect to another scheme, are
        ``unsupported_url_scheme`` and never fetched; files that do not decode, are over Pillow's pixel
        limit, or URLs that answer with an HTTP error (urllib's own refusal of a redirect to ``file:``
        included), are ``unreadable_image``. ``missing`` keeps the input order. If any URL
        cannot be reached at all (no network), raises :class:`ImagesOfflineError` listing every item
        still missing.
        """
        from tqdm.auto import tqdm

        resolution = Resolution()
        unreachable: list[tuple[str, str, str]] = []
        items = list(items)
        for item_id, url in tqdm(items, desc="images", unit="img", disable=not progress or None, leave=False):
            path = self.local_path(item_id)
            if path is None and url:
                try:
                    path = self.fetch(url)
                except UnsupportedURLError:
                    resolution.missing[item_id] = "unsupported_url_scheme"
                    continue
                except urllib.error.HTTPError:
                    resolution.missing[item_id] = "unreadable_image"
                    continue
                except ConnectionError as e:
                    unreachable.append((item_id, url, str(e)))
                    continue
            if path is None:
                resolution.missing[item_id] = "no_image"
                continue
            if verify_image(path) is not None:
                resolution.missing[item_id] = "unreadable_image"
                continue
            resolution.paths[item_id] = str(Path(path).resolve())
        if unreachable:
            shown = "\n".join(f"  {item_id}\t{url}\t({why})" for item_id, url, why in unreachable[:20])
            more = f"\n  ... and {len(unreachable) - 20} more" if len(unreachable) > 20 else ""
            raise ImagesOfflineError(
                f"{len(unreachable)} of {len(items)} item images could not be fetched (network unreachable or offline). "
                f"Missing:\n{shown}{more}\n"
                f"Put the images in a folder named by item id and pass --images DIR, fill the cache at "
                f"{self.cache_dir}, or prepare without images (--require-images no)."
            )
        return resolution

    # ---------------------------------------------------------------- reading
    def load(self, path: str | Path) -> Image.Image:
        """Open an image as RGB, shrunk (aspect kept) so that width * height <= max_pixels.

        Raises :class:`UnreadableImageError` naming ``path`` when it cannot be read (see :func:`open_image`)."""
        with open_image(path) as im:
            im = im.convert("RGB")
        size = fit_max_pixels(im.width, im.height, self.max_pixels)
        if size != im.size:
            im = im.resize(size, Image.Resampling.BICUBIC)
        return im
