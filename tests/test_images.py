import base64
import functools
import http.server
import io
import json
import socket
import struct
import threading
import urllib.parse
import warnings
import zlib

import pytest
from PIL import Image

from vlm2rec_lab.config import PrepareConfig
from vlm2rec_lab.data.dataset import prepare
from vlm2rec_lab.data.images import (
    ImagesOfflineError,
    ImageStore,
    Resolution,
    UnreadableImageError,
    fit_max_pixels,
    verify_image,
)


def _png(path, size=(40, 30), colour=(255, 0, 0)):
    Image.new("RGB", size, colour).save(path)
    return path


def _blank_bilevel_png(path, width, height):
    """A valid all-black 1-bit PNG of any declared size, written row by row: 20000 x 20000 is ~50 KB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _prepare_amazon(tmp_path, imgs, items):
    """``prepare`` on 4 users x ``items`` (each user misses one of the first 4), images from ``imgs``."""
    lines = [json.dumps({"reviewerID": f"u{u}", "asin": x, "unixReviewTime": t})
             for u in range(4) for t, x in enumerate(items) if t != u]
    (tmp_path / "r.json").write_text("\n".join(lines) + "\n")
    (tmp_path / "meta_r.json").write_text("".join(json.dumps({"asin": x, "title": x.upper()}) + "\n" for x in items))
    cfg = PrepareConfig(format="amazon2018", inputs=[str(tmp_path / "r.json"), str(tmp_path / "meta_r.json")],
                        images=str(imgs), k_core=2, num_negatives=1, seeds=(0,))
    return prepare(cfg, tmp_path / "out", progress=False)


def test_fit_max_pixels_keeps_aspect_and_never_upscales():
    assert fit_max_pixels(100, 50, 10_000) == (100, 50)
    w, h = fit_max_pixels(1000, 500, 20_000)
    assert w * h <= 20_000 and abs(w / h - 2) < 0.05 and w * h > 19_000


def test_verify_and_load(tmp_path):
    good = _png(tmp_path / "a.png", size=(200, 100))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert verify_image(good) is None
    assert verify_image(tmp_path / "bad.png") is not None
    Image.new("L", (10, 10)).save(tmp_path / "grey.png")
    store = ImageStore(folder=tmp_path, max_pixels=5000)
    im = store.load(good)
    assert im.mode == "RGB" and im.width * im.height <= 5000 and im.width == 2 * im.height
    assert store.load(tmp_path / "grey.png").mode == "RGB"


def test_local_folder_resolution_and_drop_reasons(tmp_path):
    _png(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.jpg")
    (tmp_path / "c.png").write_bytes(b"broken")
    resolution = ImageStore(folder=tmp_path).resolve([("a", None), ("b", None), ("c", None), ("d", None)], progress=False)
    assert set(resolution.paths) == {"a", "b"}
    assert resolution.missing == {"c": "unreadable_image", "d": "no_image"}


def test_item_ids_cannot_reach_files_outside_the_image_folder(tmp_path):
    imgs, outside = tmp_path / "imgs", tmp_path / "outside"
    (imgs / "sub").mkdir(parents=True)
    outside.mkdir()
    _png(outside / "evil.png")
    _png(tmp_path / "abs.png")
    _png(imgs / "ok.png")
    _png(imgs / "sub" / "nested.png")  # ids naming a subfolder stay inside: still found
    (imgs / "link").symlink_to(outside, target_is_directory=True)  # a way out through a folder symlink
    (imgs / "farm.png").symlink_to(outside / "evil.png")  # a file the folder's owner linked in: found
    ids = ["ok", "../outside/evil", str(tmp_path / "abs"), "link/evil", "sub/nested", "farm", "sub/../../outside/evil"]
    resolution = ImageStore(folder=imgs).resolve([(i, None) for i in ids], progress=False)
    assert resolution.paths == {"ok": str((imgs / "ok.png").resolve()),
                         "sub/nested": str((imgs / "sub" / "nested.png").resolve()),
                         "farm": str((outside / "evil.png").resolve())}
    assert resolution.missing == {"../outside/evil": "no_image", str(tmp_path / "abs"): "no_image",
                           "link/evil": "no_image", "sub/../../outside/evil": "no_image"}
    assert resolution.counts() == {"no_image": 4, "unsupported_url_scheme": 0, "unreadable_image": 0}


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """Real PNGs over Pillow's pixel limit: 20000 x 20000 (Pillow raises) and 10000 x 10000 (Pillow only warns)."""
    d = tmp_path_factory.mktemp("bombs")
    assert 10000**2 > Image.MAX_IMAGE_PIXELS and 20000**2 > 2 * Image.MAX_IMAGE_PIXELS
    return _blank_bilevel_png(d / "error.png", 20000, 20000), _blank_bilevel_png(d / "warn.png", 10000, 10000)


@pytest.mark.parametrize("bomb_warning", ["ignore", "error"])
def test_oversized_and_broken_images_are_unreadable_with_the_file_named(tmp_path, bombs, bomb_warning):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    store = ImageStore(max_pixels=5000)
    with warnings.catch_warnings():
        warnings.simplefilter(bomb_warning, Image.DecompressionBombWarning)
        for path in (*bombs, broken):
            assert verify_image(path) is not None
            with pytest.raises(UnreadableImageError, match=str(path)) as e:
                store.load(path)
            assert isinstance(e.value, ValueError)  # what the encoder wraps with the item's index
        assert "DecompressionBomb" in verify_image(bombs[0]) and "DecompressionBomb" in verify_image(bombs[1])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_prepare_drops_oversized_images_instead_of_aborting(tmp_path, bombs):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    items = "abcdefghij"
    for x in items[:7]:
        _png(imgs / f"{x}.png")
    (imgs / "h.png").write_bytes(bombs[0].read_bytes())
    (imgs / "i.png").write_bytes(bombs[1].read_bytes())  # j absent
    ds = _prepare_amazon(tmp_path, imgs, items)
    assert ds.manifest["drops"]["unreadable_image"] == 2 and ds.manifest["drops"]["no_image"] == 1
    assert sorted(ds.items["item_id"]) == list("abcdefg")


def test_resolution_names_dropped_items_per_reason_in_input_order(tmp_path):
    for x in "ab":
        _png(tmp_path / f"{x}.png")
    for x in "zyx":
        (tmp_path / f"{x}.png").write_bytes(b"broken")
    ids = ["z", "m", "a", "y", "q", "b", "x", "c"]
    resolution = ImageStore(folder=tmp_path).resolve([(i, None) for i in ids], progress=False)
    assert resolution.examples("unreadable_image") == ["z", "y", "x"]
    assert resolution.examples("unreadable_image", k=2) == ["z", "y"]
    assert resolution.examples("no_image") == ["m", "q", "c"]
    assert resolution.examples("unsupported_url_scheme") == []
    assert resolution.counts() == {"no_image": 3, "unsupported_url_scheme": 0, "unreadable_image": 3}
    assert Resolution().examples("no_image") == []


def _serve(handler):
    """Serve ``handler`` on 127.0.0.1 in a thread; yields the base URL."""
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture()
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    for base in _serve(handler):
        yield root, base


class _Redirect(http.server.BaseHTTPRequestHandler):
    """``GET /<quoted url>`` answers 302 to that URL."""

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", urllib.parse.unquote(self.path[1:]))
        self.end_headers()


@pytest.fixture()
def redirector():
    yield from _serve(_Redirect)


def test_urls_are_fetched_once_into_the_cache(tmp_path, http_root):
    root, base = http_root
    _png(root / "a.png")
    store = ImageStore(cache_dir=tmp_path / "cache", retries=1, timeout=5)
    resolution = store.resolve([("a", f"{base}/a.png"), ("b", f"{base}/missing.png")], progress=False)
    assert set(resolution.paths) == {"a"} and resolution.missing == {"b": "unreadable_image"}
    (root / "a.png").unlink()  # served once; now only the cache has it
    again = ImageStore(cache_dir=tmp_path / "cache", offline=True).resolve([("a", f"{base}/a.png")], progress=False)
    assert again.paths == resolution.paths


def test_only_http_urls_are_fetched(tmp_path):
    png, text = _png(tmp_path / "x.png"), tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    urls = {"file_png": png.as_uri(), "file_text": text.as_uri(), "localhost_png": f"file://localhost{png}",
            "data_png": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
            "ftp": f"ftp://127.0.0.1:{_closed_port()}/x.png", "no_scheme": str(png), "relative": "x.png"}
    cache = tmp_path / "cache"
    for offline in (False, True):
        resolution = ImageStore(cache_dir=cache, retries=1, timeout=1, offline=offline).resolve(urls.items(), progress=False)
        assert resolution.paths == {} and resolution.missing == dict.fromkeys(urls, "unsupported_url_scheme")
        assert resolution.counts()["unsupported_url_scheme"] == len(urls)
        assert not cache.exists()  # nothing written, not even an empty cache folder
    store = ImageStore(cache_dir=cache, offline=True)
    store.cache_path(urls["file_png"]).parent.mkdir()
    store.cache_path(urls["file_png"]).write_bytes(png.read_bytes())  # left by an older version: not used
    assert store.resolve([("file_png", urls["file_png"])], progress=False).missing == {"file_png": "unsupported_url_scheme"}


def test_redirects_are_followed_to_http_only(tmp_path, http_root, redirector):
    root, base = http_root
    _png(root / "a.png")
    to = {"http": f"{base}/a.png", "ftp": f"ftp://127.0.0.1:{_closed_port()}/a.png", "file": (root / "a.png").as_uri()}
    items = [(k, f"{redirector}/{urllib.parse.quote(u, safe='')}") for k, u in to.items()]
    resolution = ImageStore(cache_dir=tmp_path / "cache", retries=1, timeout=2).resolve(items, progress=False)
    assert set(resolution.paths) == {"http"}
    # urllib itself refuses a redirect to file:, as an HTTP error
    assert resolution.missing == {"ftp": "unsupported_url_scheme", "file": "unreadable_image"}
    assert len(list((tmp_path / "cache").iterdir())) == 1


def _closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_offline_gives_one_clear_error_listing_what_is_missing(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/x.png"
    store = ImageStore(cache_dir=tmp_path / "cache", retries=2, timeout=1)
    with pytest.raises(ImagesOfflineError) as e:
        store.resolve([("item1", url), ("item2", url + "?2")], progress=False)
    msg = str(e.value)
    assert "2 of 2 item images could not be fetched" in msg and "item1" in msg and "item2" in msg
    assert "--images DIR" in msg and "--require-images no" in msg
    with pytest.raises(ImagesOfflineError):
        ImageStore(cache_dir=tmp_path / "cache", offline=True).resolve([("item1", "http://example.invalid/a.png")], progress=False)


def test_prepare_drops_items_without_readable_images(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    items = "abcdefghij"
    for x in items[:-1]:
        _png(imgs / f"{x}.png")
    (imgs / "i.png").write_bytes(b"broken")  # i unreadable, j absent
    ds = _prepare_amazon(tmp_path, imgs, items)
    assert ds.manifest["drops"]["unreadable_image"] == 1 and ds.manifest["drops"]["no_image"] == 1
    assert sorted(ds.items["item_id"]) == list("abcdefgh")
