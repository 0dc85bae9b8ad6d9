"""Benchmark: training end to end through the library's own ``Trainer``, at its defaults for a real
backbone (VLM2Rec, batch 8, the paper's LoRA dropout 0.2, the gradient-cosine probe every 10th step,
a checkpoint every 50 steps, the next micro-batch laid out during the backward, logging), on a
Qwen2.5-VL-3B-shaped model with random weights and the synthetic domain's 224 px images (64 visual
tokens each): what a user's run takes a step and an epoch, tokenizer, image reading and the vision
cache's fill included. ``gpu_bench.py``'s training figures time a loop of their own over ready
tensors; this one is the trainer's own.

Figures: the vision cache's fill (images/s), the steps' tokens, the median plain and probed step,
and the mean step over the run (probes and checkpoint writes at their share) with the Beauty epoch
it makes (19,757 training users at batch 8), apart from the time the fill adds. A run this short
does not compile its layers (``--compile auto`` does in runs of 2,000 steps or more: a Beauty epoch is 2,469),
so its epoch is the eager one; ``gpu_bench.py --compile`` measures the compiled step.

Usage: python bench/pipeline_train.py [--tiny] [--steps 40] [--users 800] [--items 1000] [--mean-len 14]
Prints one JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BEAUTY_ITEMS, BEAUTY_USERS, sync  # noqa: E402
from pipeline_embed import random_backbone  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a tiny model config on the CPU (exercises the script)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps (the first, warming up, is not counted)")
    ap.add_argument("--users", type=int, default=800)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--mean-len", type=float, default=14.0,
                    help="the synthetic users' mean sequence length (14: training histories of about 7 items, as in gpu_bench.py)")
    a = ap.parse_args()
    if a.tiny:
        a.steps, a.users, a.items = min(a.steps, 12), min(a.users, 200), min(a.items, 300)
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")

    from vlm2rec_lab.config import SynthConfig, TrainConfig
    from vlm2rec_lab.data.synthetic import synthetic_dataset
    from vlm2rec_lab.train import Trainer

    emit = lambda **kw: print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", **kw}), flush=True)  # noqa: E731
    tmp = tempfile.TemporaryDirectory(prefix="vlm2rec-bench-")
    work = Path(tmp.name)
    t = time.perf_counter()
    ds = synthetic_dataset(work / "domain", SynthConfig(users=a.users, items=a.items, mean_len=a.mean_len,
                                                        image_size=56 if a.tiny else 224))
    _, hist, _ = ds.train_examples(None)
    emit(figure="pipeline_train_domain", users=a.users, items=ds.n_items, examples=len(hist),
         history_mean=round(float((hist >= 0).sum(1).mean()), 2), seconds=round(time.perf_counter() - t, 1))
    backbone = random_backbone(ds.items["title"].tolist(), a.tiny, device, min_px=56 if a.tiny else 224)
    # the defaults for a real backbone (the name only picks them: the backbone itself is passed)
    cfg = TrainConfig(backbone="random-3b", method="vlm2rec", max_steps=a.steps, seed=0)
    t = time.perf_counter()
    tr = Trainer(cfg, ds, work / "run", backbone=backbone, progress=False)
    sync(device)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    tr.encoder.cache_all()
    sync(device)
    fill = time.perf_counter() - t
    n_images = sum(1 for p in tr.encoder.image_paths if p)
    emit(figure="pipeline_train_setup", trainer_s=round(setup, 1), cache_images=n_images, cache_fill_s=round(fill, 2),
         images_per_s=round(n_images / fill, 1), beauty_fill_s=round(BEAUTY_ITEMS * fill / n_images, 1),
         lora_dropout=tr.cfg.lora_dropout, batch_size=tr.cfg.batch_size, grad_cos_every=tr.cfg.grad_cos_every,
         checkpoint_every=tr.cfg.checkpoint_every, dropout_active=tr.backbone.engine.dropout_active)
    first_batch = tr.order(0)[:tr.cfg.batch_size]
    layout = tr.encoder.layout(tr.requests(tr.hist[first_batch], tr.targets[first_batch]))
    tokens = sum(len(s) for s in layout.sequences) if layout is not None else None
    t = time.perf_counter()
    tr.train()
    total = time.perf_counter() - t
    rows = tr.log[1:]  # the first step warms up
    probed = [r["seconds"] for r in rows if r.get("cos_total_t") is not None]
    plain = [r["seconds"] for r in rows if r.get("cos_total_t") is None]
    mean = sum(r["seconds"] for r in rows) / len(rows)
    epoch_steps = BEAUTY_USERS // tr.cfg.batch_size
    emit(figure="pipeline_train_steps", steps=len(rows), tokens_first_step=tokens,
         median_step_s=round(statistics.median(plain), 3),
         median_probed_step_s=round(statistics.median(probed), 3) if probed else None,
         mean_step_s=round(mean, 3), beauty_epoch_min=round(mean * epoch_steps / 60, 1), compiled=any(r["compiled"] for r in rows),
         train_call_s=round(total, 1), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None)
    tmp.cleanup()


if __name__ == "__main__":
    main()
