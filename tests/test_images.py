import functools
import http.server
import socket
import threading

import pytest
from PIL import Image

from vlm2rec_lab.config import PrepareConfig
from vlm2rec_lab.data.dataset import prepare
from vlm2rec_lab.data.images import ImagesOfflineError, ImageStore, fit_max_pixels, verify_image


def _png(path, size=(40, 30), colour=(255, 0, 0)):
    Image.new("RGB", size, colour).save(path)
    return path


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
    res = ImageStore(folder=tmp_path).resolve([("a", None), ("b", None), ("c", None), ("d", None)], progress=False)
    assert set(res.paths) == {"a", "b"}
    assert res.missing == {"c": "unreadable_image", "d": "no_image"}


@pytest.fixture()
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a, **k: None
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_are_fetched_once_into_the_cache(tmp_path, http_root):
    root, base = http_root
    _png(root / "a.png")
    store = ImageStore(cache_dir=tmp_path / "cache", retries=1, timeout=5)
    res = store.resolve([("a", f"{base}/a.png"), ("b", f"{base}/missing.png")], progress=False)
    assert set(res.paths) == {"a"} and res.missing == {"b": "unreadable_image"}
    (root / "a.png").unlink()  # served once; now only the cache has it
    again = ImageStore(cache_dir=tmp_path / "cache", offline=True).resolve([("a", f"{base}/a.png")], progress=False)
    assert again.paths == res.paths


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
    import json

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    items = "abcdefghij"
    for x in items[:-1]:
        _png(imgs / f"{x}.png")
    (imgs / "i.png").write_bytes(b"broken")  # i unreadable, j absent
    lines = [json.dumps({"reviewerID": f"u{u}", "asin": x, "unixReviewTime": t})
             for u in range(4) for t, x in enumerate(items) if t != u]  # each user misses one item
    (tmp_path / "r.json").write_text("\n".join(lines) + "\n")
    (tmp_path / "meta_r.json").write_text("".join(json.dumps({"asin": x, "title": x.upper()}) + "\n" for x in items))
    cfg = PrepareConfig(format="amazon2018", inputs=[str(tmp_path / "r.json"), str(tmp_path / "meta_r.json")],
                        images=str(imgs), k_core=2, num_negatives=1, seeds=(0,))
    ds = prepare(cfg, tmp_path / "out", progress=False)
    assert ds.manifest["drops"]["unreadable_image"] == 1 and ds.manifest["drops"]["no_image"] == 1
    assert sorted(ds.items["item_id"]) == list("abcdefgh")
