"""Benchmark: filling the vision-feature cache from product-photo-like JPEG files, the images read,
decoded and preprocessed in the calling thread between vision-tower chunks (the plain path) and by
worker threads ahead of the vision tower (the project's path), side by side in one run.

The images are written once: ``--size`` px noisy JPEGs (Amazon's product photos are about 500 px),
sized by the image processor to ``--pixels`` (224 x 224 by default, the GPU benchmark's 64 visual
tokens). The backbone is the tiny one, whose vision tower is small: the figure isolates the CPU side
of item embedding, which on a GPU runs beside the tower (``--device cuda``) instead of before it.

Usage: python bench/image_cache.py [--images 512] [--workers N] [--repeats 2] [--device cpu]
Prints one JSON line per figure (seconds are the best of ``--repeats``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def write_images(folder: Path, n: int, size: int, workers: int = 0) -> list[str]:
    """``n`` product-photo-like ``size`` px JPEGs (shifted copies of one noise image), written by
    ``workers`` threads (0: in this thread)."""
    from PIL import Image

    from vlm2rec_lab.accel.prefetch import ordered_map

    folder.mkdir(parents=True, exist_ok=True)
    base = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)

    def write(i: int) -> str:
        p = folder / f"{i}.jpg"
        Image.fromarray(np.roll(base, 7 * i, axis=1)).save(p, quality=90)
        return str(p)

    return list(ordered_map(write, range(n), workers))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=500, help="side of the JPEG files, px")
    ap.add_argument("--pixels", type=int, default=224 * 224, help="the processor's max pixels per image")
    ap.add_argument("--workers", type=int, default=None, help="image threads (default: usable cores, at most 8)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=None, help="a prepared dataset to build the tiny backbone on (default: demo domain)")
    ap.add_argument("--threads", type=int, default=None, help="torch's CPU threads")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from vlm2rec_lab.accel.prefetch import default_workers
    from vlm2rec_lab.backbones import load_backbone
    from vlm2rec_lab.config import SpeedConfig
    from vlm2rec_lab.data.dataset import Dataset
    from vlm2rec_lab.data.synthetic import synthetic_dataset
    from vlm2rec_lab.encoder import Encoder

    tmp = tempfile.TemporaryDirectory(prefix="vlm2rec-bench-")
    work = Path(tmp.name)
    if a.data:
        ds = Dataset.load(a.data)
    else:
        ds = synthetic_dataset(work)
    backbone = load_backbone("tiny", dataset=ds, device=a.device, max_pixels=a.pixels)
    paths = write_images(work / "jpeg", a.images, a.size)
    items = pd.DataFrame({"item_id": [str(i) for i in range(a.images)], "title": ["x"] * a.images, "image": paths})
    workers = default_workers() if a.workers is None else a.workers
    idx = list(range(a.images))

    def fill(n_workers: int) -> tuple[float, list]:
        best, feats = float("inf"), None
        for _ in range(a.repeats):
            enc = Encoder(backbone, items, SpeedConfig(image_workers=n_workers))
            if backbone.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            feats, _ = enc.vision_features(idx)
            if backbone.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best, feats

    serial, fa = fill(0)
    threaded, fb = fill(workers)
    # the CPU half alone (reading, decoding, preprocessing; no vision tower), serial and threaded: on a
    # GPU machine this is what runs beside the tower
    from vlm2rec_lab.accel.prefetch import ordered_map

    enc = Encoder(backbone, items, SpeedConfig(image_workers=0))
    cpu = {}
    for n in (0, workers):
        t = time.perf_counter()
        for _ in ordered_map(enc.pixels_of, idx, n):
            pass
        cpu[n] = time.perf_counter() - t
    diff = max(float((x - y).abs().max()) for x, y in zip(fa, fb))
    tokens = backbone.tokens_per_image(enc.pixels_of(0)[1][0])
    common = {"images": a.images, "jpeg_px": a.size, "visual_tokens": tokens, "device": str(backbone.device),
              "cores": default_workers(cap=1 << 10)}
    print(json.dumps({"figure": "image_cache_fill", "path": "plain", "workers": 0, "seconds": round(serial, 3),
                      "ms_per_image": round(1e3 * serial / a.images, 2), **common}), flush=True)
    print(json.dumps({"figure": "image_cache_fill", "path": "project", "workers": workers, "seconds": round(threaded, 3),
                      "ms_per_image": round(1e3 * threaded / a.images, 2), **common}), flush=True)
    print(json.dumps({"figure": "image_cpu_side", "ms_per_image": round(1e3 * cpu[0] / a.images, 2),
                      "beauty_seconds": round(cpu[0] / a.images * 9311, 1), "workers": workers,
                      "threaded_ms_per_image": round(1e3 * cpu[workers] / a.images, 2),
                      "threaded_beauty_seconds": round(cpu[workers] / a.images * 9311, 1),
                      "ratio": round(cpu[0] / cpu[workers], 2)}), flush=True)
    print(json.dumps({"figure": "image_cache_ratio", "ratio": round(serial / threaded, 2), "max_abs_diff": diff}), flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
