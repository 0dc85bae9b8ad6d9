"""Benchmark: one training step on the tiny backbone with the vision-feature cache on and off,
measured side by side in one run; a step with the gradient-cosine probe against one without, with
the probed micro-batch's histories and targets in forwards of their own (the trainer's way,
``Trainer.probe_forwards``) and in one packed forward (before); and the wall time of one epoch of the
default demo domain.

Usage: python bench/train_step.py [--steps 12] [--method vlm2rec] [--no-probe] [--no-epoch] [--threads N]
Prints one JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import settle  # noqa: E402  (no full garbage collection inside a timed run)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--method", default="vlm2rec")
    ap.add_argument("--data", default=None, help="a prepared dataset (default: the synthetic demo domain)")
    ap.add_argument("--no-probe", action="store_true", help="skip the probed-step timing")
    ap.add_argument("--no-epoch", action="store_true", help="skip the full-epoch timing")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from vlm2rec_lab.config import SpeedConfig, TrainConfig
    from vlm2rec_lab.data.dataset import Dataset
    from vlm2rec_lab.data.synthetic import synthetic_dataset
    from vlm2rec_lab.train import Trainer

    work = Path(tempfile.mkdtemp(prefix="vlm2rec-bench-"))
    if a.data:
        ds = Dataset.load(a.data)
    else:
        ds = synthetic_dataset(work)
    Trainer(TrainConfig(method=a.method, max_steps=1), ds, work / "warm", progress=False)  # builds/caches the backbone

    per_step = {}
    for cache in (True, False):
        cfg = TrainConfig(method=a.method, speed=SpeedConfig(cache_vision=cache), max_steps=a.steps, grad_cos_every=0, checkpoint_every=0)
        tr = Trainer(cfg, ds, work / f"cache_{cache}", progress=False)
        t0 = time.perf_counter()
        if cache:
            tr.encoder.cache_all()
        fill = time.perf_counter() - t0
        settle(torch.device("cpu"))
        tr.train()
        secs = [r["seconds"] for r in tr.log[1:]]  # the first step warms up
        per_step[cache] = sum(secs) / len(secs)
        print(json.dumps({"vision_cache": cache, "method": a.method, "batch_size": tr.cfg.batch_size,
                          "seconds_per_step": round(per_step[cache], 4), "cache_fill_seconds": round(fill, 2) if cache else None,
                          "steps_timed": len(secs), "threads": torch.get_num_threads()}))
    print(json.dumps({"cache_speedup": round(per_step[False] / per_step[True], 2)}))

    if not a.no_probe:  # median step time: every step probed against none, probed forwards apart or not
        import statistics

        from vlm2rec_lab.probe import PROBE_FORWARDS

        probed = {}
        for name, groups in (("apart", PROBE_FORWARDS), ("one_forward", None)):
            secs = {}
            for every in (0, 1):
                cfg = TrainConfig(method=a.method, max_steps=a.steps, grad_cos_every=every, checkpoint_every=0)
                tr = Trainer(cfg, ds, work / f"probe_{name}_{every}", progress=False)
                tr.probe_forwards = groups
                settle(torch.device("cpu"))
                tr.train()
                secs[every] = statistics.median(r["seconds"] for r in tr.log[1:])
            probed[name] = secs[1] / secs[0]
            print(json.dumps({"probe": name, "seconds_per_step": round(secs[0], 4), "seconds_per_probed_step": round(secs[1], 4),
                              "probed_vs_plain_step": round(probed[name], 3)}))
        print(json.dumps({"probe_extra_cost_ratio": round((probed["one_forward"] - 1) / (probed["apart"] - 1), 2)}))

    if not a.no_epoch:
        cfg = TrainConfig(method=a.method, epochs=1, grad_cos_every=0, checkpoint_every=0)
        tr = Trainer(cfg, ds, work / "epoch", progress=False)
        settle(torch.device("cpu"))
        t0 = time.perf_counter()
        tr.train()
        print(json.dumps({"epoch_seconds": round(time.perf_counter() - t0, 1), "steps": tr.step,
                          "examples": len(tr.targets), "method": a.method, "batch_size": tr.cfg.batch_size}))


if __name__ == "__main__":
    main()
