"""Benchmark: Task 2 SASRec (ID items, full-softmax CE) on the real Beauty set, trained to early stop.

Prints JSON lines: seconds per epoch and total training time; then one validation pass two ways,
side by side on the same trained model — the library's vectorised protocol (frozen negatives,
batched scoring) and a deliberately plain reference loop in the style of the widely used PyTorch
port (per user: Python rejection sampling of 100 negatives, one forward, a Python rank) — and the
ratio, plus what the whole training would have cost with the plain loop as its validation.

Usage: python bench/downstream.py (--data DIR | --p5 FILE) [--seed 0] [--threads N] [--epochs 200]
(--p5: a P5-format ``user_sequence.txt``, e.g. Amazon 2014 Beauty's, prepared into a temp folder).
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlm2rec_lab.data.dataset import Dataset
from vlm2rec_lab.task2.config import DownstreamConfig
from vlm2rec_lab.task2.train import left_align, train, validate


def plain_validation(model, ds, max_len: int, seed: int = 0, num: int = 100) -> tuple[float, float]:
    """The reference loop: per user, draw ``num`` unseen negatives one by one in Python, score the
    target and negatives with a forward pass on that user alone, rank in Python. -> (NDCG@10, HR@10)."""
    rng = random.Random(seed)
    hist, targets = ds.histories("valid", max_len), ds.targets("valid")
    ndcg = hit = 0.0
    model.eval()
    with torch.no_grad():
        for u in range(ds.n_users):
            seen = set(ds.sequence(u).tolist())
            cand = [int(targets[u])]
            while len(cand) < num + 1:
                j = rng.randrange(ds.n_items)
                if j not in seen and j not in cand:
                    cand.append(j)
            seq, lens = left_align(hist[u:u + 1], max_len)
            scores = model.predict({"item_seq": torch.as_tensor(seq), "seq_len": torch.as_tensor(lens),
                                    "candidates": torch.tensor([cand]) + 1})[0].tolist()
            rank = sum(s > scores[0] for s in scores[1:])
            if rank < 10:
                hit += 1
                ndcg += 1 / np.log2(rank + 2)
    return ndcg / ds.n_users, hit / ds.n_users


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a prepared dataset folder")
    source.add_argument("--p5", help="a P5-format user_sequence.txt, prepared here (text-less, no images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--epochs", type=int, default=200)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if a.data:
            ds = Dataset.load(a.data)
        else:
            from vlm2rec_lab.config import PrepareConfig
            from vlm2rec_lab.data.dataset import prepare

            prepare(PrepareConfig(format="p5", inputs=[a.p5], require_images=False), Path(tmp) / "beauty",
                    progress=False)
            ds = Dataset.load(Path(tmp) / "beauty")
        cfg = DownstreamConfig(model="sasrec", epochs=a.epochs, device="cpu")
        L = ds.max_len
        res = train(ds, cfg, seed=a.seed)
        h = res.history
        n_eval = sum("valid_NDCG@10" in r for r in h)
        train_only = sum(r["train_seconds"] for r in h)
        print(json.dumps({"bench": "sasrec_train", "dataset": str(ds.path), "users": ds.n_users, "items": ds.n_items,
                          "threads": torch.get_num_threads(), "epochs": res.epochs, "best_epoch": res.best_epoch,
                          "seconds_per_epoch": round(train_only / res.epochs, 2),
                          "seconds_per_epoch_with_validation": round(res.train_seconds / res.epochs, 2),
                          "seconds_to_best": round(res.seconds_to_best, 1), "total_seconds": round(res.train_seconds, 1),
                          "best_valid_NDCG@10": round(res.best_valid_ndcg, 4)}), flush=True)

        t0 = time.perf_counter()
        fast = validate(res.model, ds, a.seed, L, "cpu")
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain, _ = plain_validation(res.model, ds, L, a.seed)
        t_plain = time.perf_counter() - t0
        print(json.dumps({"bench": "validation_pass", "vectorised_seconds": round(t_fast, 2),
                          "plain_loop_seconds": round(t_plain, 2), "ratio_plain_over_vectorised": round(t_plain / t_fast, 1),
                          "vectorised_NDCG@10": round(fast, 4), "plain_NDCG@10": round(plain, 4),
                          "note": "plain draws its own negatives, so NDCG differs by sampling noise only"}), flush=True)
        print(json.dumps({"bench": "sasrec_total", "validations": n_eval,
                          "total_seconds_vectorised": round(res.train_seconds, 1),
                          "total_seconds_plain_loop": round(train_only + n_eval * t_plain, 1),
                          "ratio": round((train_only + n_eval * t_plain) / res.train_seconds, 2)}), flush=True)


if __name__ == "__main__":
    main()
