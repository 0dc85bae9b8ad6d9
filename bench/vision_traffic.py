"""Benchmark: memory traffic of one Qwen2.5-VL-3B vision block in bf16, Hugging Face's modules against
the compute path's vision attention (``vlm2rec_lab.accel.fused.vision_attention_forward``: the rotary half
by half, no fp32 copies), side by side in one run, on the CPU.

In eager mode the vision tower waits on memory traffic more than on its matrix products, so the bytes each operator reads and writes say what a stand-in can save there. They are counted at the ATen level under a
dispatch mode: each operator's tensor inputs (broadcast dimensions counted once) and outputs; views
move nothing. The wall time is the CPU's (bf16 on a CPU, for the record, not a GPU projection).

Usage: python bench/vision_traffic.py [--images 4] [--repeats 3] [--tiny]
Prints one JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_config  # noqa: E402


def moved_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` an elementwise kernel touches: its elements, broadcast (stride-0) dims once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride:
            n *= size
    return n * t.element_size()


class Traffic(TorchDispatchMode):
    """Bytes read and written per ATen operator (views excluded)."""

    def __init__(self):
        super().__init__()
        self.per_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # (an out= tensor is written, not read: counted with the outputs)
            kw = {k: v for k, v in (kwargs or {}).items() if k != "out"}
            ins = [t for t in tree_flatten((args, kw))[0] if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.per_op[func.overloadpacket.__name__] += sum(map(moved_bytes, ins + outs))
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4, help="224 px images in the block's input")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="the tiny config (CI)")
    a = ap.parse_args()

    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLVisionBlock,
                                                                    Qwen2_5_VLVisionRotaryEmbedding)

    from vlm2rec_lab.accel.attention import NAME, register_varlen
    from vlm2rec_lab.accel.fused import fused_forwards

    cfg = model_config(a.tiny).vision_config
    register_varlen()
    cfg._attn_implementation = NAME
    torch.manual_seed(0)
    block = Qwen2_5_VLVisionBlock(cfg).to(torch.bfloat16).eval()
    side = 224 // cfg.patch_size  # patches per image side
    window = cfg.window_size // cfg.patch_size  # patches per window side
    tokens = a.images * side * side
    x = torch.randn(tokens, cfg.hidden_size).bfloat16()
    cu = torch.arange(0, tokens + 1, window * window, dtype=torch.int32)
    pos = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2).repeat(a.images, 1)
    pe = Qwen2_5_VLVisionRotaryEmbedding(cfg)(x, pos)

    swaps = fused_forwards(block)
    # Hugging Face's modules, then the vision attention's stand-in (the norms' stand-in is left out:
    # on the CPU F.rms_norm runs as its decomposition, the traffic of HF's norm, where a GPU runs one kernel)
    variants = {"plain": [], "rotary": [(m, f) for m, f in swaps if type(m).__name__.endswith("VisionAttention")]}

    def run(variant: str):
        for m, f in variants[variant]:
            m.forward = f
        try:
            with torch.no_grad():
                return block(x, cu_seqlens=cu, position_embeddings=pe)
        finally:
            for m, _ in swaps:
                m.__dict__.pop("forward", None)

    rows = {}
    for variant in variants:
        with Traffic() as t:
            out = run(variant)
        best = float("inf")
        for _ in range(a.repeats):
            start = time.perf_counter()
            run(variant)
            best = min(best, time.perf_counter() - start)
        rows[variant] = (sum(t.per_op.values()), best, out)
        print(json.dumps({"figure": "vision_block_traffic", "path": variant, "images": a.images,
                          "stand_ins": sorted({type(m).__name__ for m, _ in variants[variant]}),
                          "mb_per_image": round(rows[variant][0] / a.images / 1e6, 2), "cpu_s": round(best, 4),
                          "top": {k: round(v / a.images / 1e6, 2) for k, v in t.per_op.most_common(6)}}))
    ref = rows["plain"][2].float()
    moved, best, out = rows["rotary"]
    print(json.dumps({"figure": "vision_block_traffic_ratio", "path": "rotary", "traffic_ratio": round(rows["plain"][0] / moved, 2),
                      "saved_mb_per_image": round((rows["plain"][0] - moved) / a.images / 1e6, 2),
                      "cpu_ratio": round(rows["plain"][1] / best, 2),
                      "max_rel_diff": round(float((out.float() - ref).abs().max() / ref.abs().max()), 5)}))


if __name__ == "__main__":
    main()
