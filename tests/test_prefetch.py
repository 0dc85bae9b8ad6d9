"""Images read ahead by worker threads: the same results in the same order as the serial path,
bounded memory, errors raised at the item that caused them, nothing left running."""
import threading
import time

import pytest
import torch

from vlm2rec_lab.config import SpeedConfig
from vlm2rec_lab.encoder import Encoder
from vlm2rec_lab.accel.prefetch import default_workers, ordered_map


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_ordered_map_keeps_the_order_whatever_finishes_first(workers):
    def slow_square(x):
        time.sleep(0.002 * ((7 * x) % 5))  # later items often finish first
        return x * x

    assert list(ordered_map(slow_square, range(23), workers)) == [x * x for x in range(23)]


def test_ordered_map_never_runs_more_than_ahead_items_past_the_consumer():
    started, consumed = [], 0
    lock = threading.Lock()

    def f(x):
        with lock:
            started.append(x)
        return x

    for x in ordered_map(f, range(40), workers=2, max_pending=3):
        time.sleep(0.001)
        with lock:
            assert len(started) <= consumed + 3  # submitted (hence possibly started) at most 3 ahead
        consumed += 1
        assert x == consumed - 1
    assert consumed == 40


def test_ordered_map_raises_at_the_failing_item_and_cancels_the_rest():
    seen = []

    def f(x):
        if x == 5:
            raise ValueError("bad item 5")
        return x

    with pytest.raises(ValueError, match="bad item 5"):
        for x in ordered_map(f, range(1000), workers=2, max_pending=4):
            seen.append(x)
    assert seen == [0, 1, 2, 3, 4]
    assert not [t for t in threading.enumerate() if t.name.startswith("vlm2rec-prefetch")]


def test_ordered_map_stopped_early_leaves_no_thread_and_starts_no_more_work():
    calls = []
    gen = ordered_map(lambda x: calls.append(x) or x, range(1000), workers=2, max_pending=4)
    assert [next(gen) for _ in range(3)] == [0, 1, 2]
    gen.close()
    assert len(calls) <= 3 + 4
    assert not [t for t in threading.enumerate() if t.name.startswith("vlm2rec-prefetch")]


def test_default_workers_share_the_cores_among_torchruns_local_processes(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 8 and default_workers(cap=3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # more processes than cores: still one thread each
    assert default_workers() == 1


def test_vision_cache_filled_by_worker_threads_equals_the_serial_fill(tiny, synth_ds):
    idx = list(range(0, 150, 3))
    serial = Encoder(tiny, synth_ds.items, SpeedConfig(image_workers=0))
    threaded = Encoder(tiny, synth_ds.items, SpeedConfig(image_workers=3))
    fa, ga = serial.vision_features(idx, chunk=7)
    fb, gb = threaded.vision_features(idx, chunk=7)
    assert len(fa) == len(fb) == len(idx) and torch.equal(ga, gb)
    for a, b in zip(fa, fb):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and the image prompts' embeddings, which fill the cache first
    torch.testing.assert_close(Encoder(tiny, synth_ds.items, SpeedConfig(image_workers=2)).item_embeddings("V", idx[:20]),
                               serial.item_embeddings("V", idx[:20]), rtol=1e-6, atol=1e-6)


def test_an_unreadable_image_names_its_file_and_item(tiny, synth_ds, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    enc = Encoder(tiny, synth_ds.items, SpeedConfig(image_workers=2))
    enc.image_paths[4] = str(bad)
    with pytest.raises(ValueError, match=r"broken\.png: the image of item_idx 4 cannot be read"):
        enc.vision_features(list(range(10)), chunk=3)
    plain = Encoder(tiny, synth_ds.items, SpeedConfig(cache_vision=False, image_workers=2))
    plain.image_paths[4] = str(bad)
    with pytest.raises(ValueError, match=r"item_idx 4"):
        plain.item_embeddings("V", [3, 4])
