"""Benchmark: embedding every item (image and text prompts) with the tiny backbone, three ways side by
side in one run — padded batches (the plain path), packed batches, and packed batches whose prompts'
shared leading tokens (chat template, prompt head) are computed once — with their agreement. Then,
with a LoRA adapter on (as after training): the adapters as in training against their updates
merged into the weights (``SpeedConfig.merge_adapters``), both packed with shared prefixes.

Usage: python bench/embed_items.py [--data PREPARED] [--batch 32] [--repeats 3] [--threads N]
Prints one JSON line per figure (seconds are the best of ``--repeats``).
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
from common import settle  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None, help="a prepared dataset (default: the synthetic demo domain)")
    ap.add_argument("--batch", type=int, default=128, help="prompts per forward")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from vlm2rec_lab.backbones import load_backbone
    from vlm2rec_lab.config import SpeedConfig
    from vlm2rec_lab.data.dataset import Dataset
    from vlm2rec_lab.data.synthetic import synthetic_dataset
    from vlm2rec_lab.encoder import Encoder

    if a.data:
        ds = Dataset.load(a.data)
    else:
        work = Path(tempfile.mkdtemp(prefix="vlm2rec-bench-"))
        ds = synthetic_dataset(work)
    backbone = load_backbone("tiny", dataset=ds, device="cpu")
    paths = {"padded": dict(packed=False), "packed": dict(packed=True, share_prefix=False),
             "packed_shared_prefix": dict(packed=True, share_prefix=True)}
    out, secs = {}, {}

    def measure(name: str, **kw) -> None:
        enc = Encoder(backbone, ds.items, SpeedConfig(**kw), batch_size=a.batch)
        enc.cache_all()  # the vision tower is the same for every path: measured apart
        best = float("inf")
        for _ in range(a.repeats):
            settle(backbone.device)  # (no full garbage collection inside the timed pass)
            t = time.perf_counter()
            emb = {k: enc.item_embeddings(k) for k in ("T", "V")}
            best = min(best, time.perf_counter() - t)
        out[name], secs[name] = emb, best
        print(json.dumps({"figure": "item_embedding", "path": name, "items": enc.n_items, "batch": a.batch,
                          "seconds": round(best, 3), "items_per_s": round(enc.n_items / best, 1),
                          "threads": torch.get_num_threads()}), flush=True)

    def compare(name: str, ref: str, figure: str = "item_embedding_ratio") -> None:
        diff = max(((out[name][k] - out[ref][k]).abs().max() / out[ref][k].abs().max()).item() for k in out[ref])
        print(json.dumps({"figure": figure, "path": name, f"vs_{ref}": round(secs[ref] / secs[name], 2),
                          "max_rel_diff": float(f"{diff:.2e}")}), flush=True)

    for name, kw in paths.items():
        measure(name, **kw)
    for name in ("packed", "packed_shared_prefix"):
        compare(name, "padded")

    # a trained adapter (random, nonzero B): in training form against merged into the weights
    from vlm2rec_lab.config import TrainConfig
    from vlm2rec_lab.train import apply_lora

    apply_lora(backbone, TrainConfig(lora_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    for n, p in backbone.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02, generator=gen)
    backbone.model.eval()
    for merge in (False, True):
        measure(f"lora_{'merged' if merge else 'unmerged'}", merge_adapters=merge)
    compare("lora_merged", "lora_unmerged", figure="lora_merge_ratio")


if __name__ == "__main__":
    main()
