"""Benchmark: item embedding end to end, from JPEG files and titles to embeddings, through the
library's own ``Encoder`` on a Qwen2.5-VL-3B-shaped model with random weights — what a user embedding
a real catalogue waits for, tokenizer, image decoding and token layout included (``gpu_bench.py``
feeds ready token ids and pixel tensors instead).

Two paths side by side in one run:

- ``plain``: the levers off — pixel values through the vision tower on every call, padded batches of
  32 prompts, images read in the calling thread, Hugging Face's own modules and per-window attention;
- ``project``: the defaults — each image through the tower once (the vision cache, filled in chunks
  while worker threads read the next ones), packed batches of 128 prompts with their shared leading
  tokens computed once, the compute path's stand-ins, batched window attention.

The tokenizer is a byte-level BPE trained on the synthetic domain's titles (no download) and the
image processor is Qwen's own, capped at 224 x 224 px (64 visual tokens) as in ``gpu_bench.py``;
the JPEGs are ``--size`` px (Amazon's product photos are about 500 px).

Usage: python bench/pipeline_embed.py [--tiny] [--items 1024] [--plain-items 128] [--size 500]
Prints one JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BEAUTY_ITEMS, model_config, settle, sync  # noqa: E402
from image_cache import write_images  # noqa: E402


def random_backbone(titles: list[str], tiny: bool, device: torch.device, min_px: int = 56):
    """The benchmarks' stand-in for a real checkpoint: a Qwen2.5-VL-3B-shaped model with random
    weights (``tiny``: the tiny config), a byte-level BPE tokenizer trained on ``titles`` (no
    download) and Qwen's image processor capped at 224 x 224 px (64 visual tokens; at least
    ``min_px`` a side), as a library ``Backbone``."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlm2rec_lab.accel.attention import set_vision_attention
    from vlm2rec_lab.backbones import Backbone
    from vlm2rec_lab.tiny import SPECIAL_TOKENS, train_tokenizer
    from vlm2rec_lab.prompts import prompt_words

    tokenizer = train_tokenizer(titles + prompt_words() + ["Describe this item."], 4096)
    processor = Qwen2VLImageProcessorPil(min_pixels=min_px * min_px, max_pixels=224 * 224, patch_size=14, merge_size=2,
                                         temporal_patch_size=2)
    cfg = model_config(tiny)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg.image_token_id, cfg.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    cfg.vision_start_token_id, cfg.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(
            cfg, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).model
    model.eval().requires_grad_(False)
    if device.type == "cuda":  # as load_backbone does on a GPU
        set_vision_attention(model, varlen=True)
    return Backbone(name="pipeline-bench", model=model, tokenizer=tokenizer, image_processor=processor, kind="vlm")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a tiny model config on the CPU (exercises the script)")
    ap.add_argument("--items", type=int, default=1024)
    ap.add_argument("--plain-items", type=int, default=128)
    ap.add_argument("--size", type=int, default=500, help="side of the JPEG files, px")
    ap.add_argument("--workers", type=int, default=None, help="image threads (default: usable cores, at most 8)")
    a = ap.parse_args()
    if a.tiny:
        a.items, a.plain_items = min(a.items, 48), min(a.plain_items, 16)
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")

    from vlm2rec_lab.accel.attention import set_vision_attention
    from vlm2rec_lab.config import SpeedConfig, SynthConfig
    from vlm2rec_lab.data.formats import read_amazon2018
    from vlm2rec_lab.data.synthetic import generate
    from vlm2rec_lab.encoder import Encoder
    from vlm2rec_lab.accel.prefetch import default_workers

    emit = lambda **kw: print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", **kw}), flush=True)  # noqa: E731
    workers = default_workers() if a.workers is None else a.workers
    tmp = tempfile.TemporaryDirectory(prefix="vlm2rec-bench-")
    work = Path(tmp.name)
    raw = generate(SynthConfig(items=max(a.items, 200), users=300), work / "raw")
    meta = read_amazon2018([str(raw)]).meta or {}
    titles = [m["title"] for m in meta.values() if m.get("title")][:a.items]
    titles = (titles * (a.items // len(titles) + 1))[:a.items]
    backbone = random_backbone(titles, a.tiny, device)
    model = backbone.model
    t = time.perf_counter()
    paths = write_images(work / "jpeg", a.items, a.size, workers)
    emit(figure="jpegs_written", items=a.items, px=a.size, seconds=round(time.perf_counter() - t, 2))
    items = pd.DataFrame({"item_id": [str(i) for i in range(a.items)], "title": titles, "image": paths})

    def embed(enc: Encoder, n: int) -> tuple[float, dict]:
        idx = list(range(n))
        settle(device)  # (no full garbage collection inside the timed run)
        t = time.perf_counter()
        out = {k: enc.item_embeddings(k, idx) for k in ("V", "T")}
        sync(device)
        return time.perf_counter() - t, out

    runs = {}
    for warm in (True, False):  # a few items through each path first (allocator, kernels)
        for path in ("plain", "project"):
            plain = path == "plain"
            set_vision_attention(model, varlen=not plain)
            enc = Encoder(backbone, items, SpeedConfig(cache_vision=not plain, packed=not plain, fused=not plain,
                                                       image_workers=0 if plain else workers),
                          batch_size=32 if plain else 128)
            n = 8 if warm else (a.plain_items if plain else a.items)
            secs, out = embed(enc, n)
            if not warm:
                runs[path] = (n / secs, out)
                emit(figure="pipeline_item_embedding", path=path, items=n, seconds=round(secs, 2),
                     items_per_s=round(n / secs, 1), beauty_s=round(BEAUTY_ITEMS * secs / n, 1),
                     image_workers=enc.image_workers, batch=enc.batch_size)
    (plain_rate, ref), (rate, got) = runs["plain"], runs["project"]
    n = min(len(ref["T"]), len(got["T"]))
    diff = max(float((got[k][:n] - ref[k][:n]).abs().max() / ref[k][:n].abs().max()) for k in ("T", "V"))
    emit(figure="pipeline_item_embedding_ratio", ratio=round(rate / plain_rate, 2), max_rel_diff=float(f"{diff:.2e}"))
    tmp.cleanup()


if __name__ == "__main__":
    main()
