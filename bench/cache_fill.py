"""Filling the vision cache before training under a launcher: every process reading, decoding and
encoding every image (the plain path: what each process did before) against each process taking
its share and the features being gathered (``Encoder.cache_all``), side by side in one run of N
CPU processes (gloo), on the tiny backbone. Prints one JSON line.

    python bench/cache_fill.py                      # a synthetic domain of 1,000 items, 224 px images
    python bench/cache_fill.py --data PREPARED_DIR  # a prepared dataset (its tiny backbone)

On a GPU the vision tower is the larger part of the fill; here the images' decoding is. Either way the plain path does N times the work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_side_by_side  # noqa: E402


def worker(rank: int, world: int, port: int, data: str, reps: int) -> None:
    from vlm2rec_lab.accel import distributed as dist
    from vlm2rec_lab.backbones import load_backbone
    from vlm2rec_lab.config import SpeedConfig
    from vlm2rec_lab.data.dataset import Dataset
    from vlm2rec_lab.encoder import Encoder

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_from_env()
    ds = Dataset.load(data)
    backbone = load_backbone("tiny", dataset=ds, device="cpu")
    images = [i for i, p in enumerate(ds.items["image"].tolist()) if isinstance(p, str) and p]
    def filling(fill):  # a fresh encoder (an empty cache) each run; the run keeps its features
        enc = Encoder(backbone, ds.items, SpeedConfig(image_workers=1))
        return lambda: (fill(enc), enc.features)[1]

    secs, held = median_side_by_side({"plain": lambda: filling(lambda enc: enc.vision_features(images)),
                                      "project": lambda: filling(lambda enc: enc.cache_all())}, reps, dist.barrier)
    diff = max((held["plain"][i][0] - held["project"][i][0]).abs().max().item() for i in images)
    if rank == 0:
        plain, project = secs["plain"], secs["project"]
        print(json.dumps({"figure": "vision_cache_fill", "backend": "gloo", "processes": world, "images": len(images),
                          "plain_s": round(plain, 4), "project_s": round(project, 4), "ratio": round(plain / project, 2),
                          "max_abs_diff": diff, "reps": reps}), flush=True)
    dist.finish(0)


def synthetic(items: int, image_size: int) -> str:
    """A prepared synthetic domain (users: twice the items) in a scratch folder."""
    from vlm2rec_lab.config import PrepareConfig, SynthConfig
    from vlm2rec_lab.data.dataset import prepare
    from vlm2rec_lab.data.synthetic import generate

    root = Path(tempfile.mkdtemp(prefix="cache_fill_"))
    raw = generate(SynthConfig(users=2 * items, items=items, image_size=image_size), root / "raw")
    cfg = PrepareConfig(format="amazon2018", inputs=[str(p) for p in sorted(raw.glob("*.json.gz"))],
                        images=str(raw / "images"))
    prepare(cfg, root / "prepared", progress=False)
    return str(root / "prepared")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="a prepared dataset (default: a synthetic domain made here)")
    ap.add_argument("--items", type=int, default=1000, help="synthetic domain: items")
    ap.add_argument("--image-size", type=int, default=224, help="synthetic domain: image side in pixels")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    args = ap.parse_args()
    data = args.data or synthetic(args.items, args.image_size)
    from vlm2rec_lab.data.dataset import Dataset
    from vlm2rec_lab.tiny import build_tiny

    build_tiny(Dataset.load(data), progress=False)  # (once, before the processes start)
    from vlm2rec_lab.accel.distributed import free_port

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(args.processes, free_port(), data, args.reps), nprocs=args.processes)


if __name__ == "__main__":
    main()
