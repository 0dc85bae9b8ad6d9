"""Benchmark: the host's work in one packed training step, on the CPU. The step has the structure of
the 3B model's (36 decoder layers, LoRA r 16 on the seven projections with dropout 0.2, autocast
to bf16, the project's fused stand-ins, AdamW) but tiny widths, so that its arithmetic is small: the
wall time is then mostly what a GPU step also pays on its host (Python, dispatch, autograd). It is
measured at two token counts (8 prompts of 4 or 8 tokens) and extrapolated to none, which leaves
the arithmetic out and the host's work per prompt in (the step at the defaults has 32 prompts: the
cost of each prompt beyond 8 is measured here as 32 prompts of 4 tokens against 8 of 16). Compare it with a GPU step's time (``gpu_bench.py``'s ``host_share`` measures the share on the
GPU itself).

Usage: python bench/host_cost.py [--layers 36] [--threads 1] [--steps 10]
Prints one JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlm2rec_lab.accel.packing import forward_packed
    from vlm2rec_lab.backbones import Backbone, lora_target_regex

    cfg = model_config(tiny=True)
    cfg.text_config.num_hidden_layers = a.layers
    cfg.text_config.layer_types = ["full_attention"] * a.layers
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg).model.train().requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.2, target_modules=lora_target_regex("vlm")))
    backbone = Backbone(name="host-cost", model=model, tokenizer=None, image_processor=None, kind="vlm")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)  # as the trainer's

    def step(seqs: list, pos: list) -> None:
        opt.zero_grad(set_to_none=True)
        # the GPU path's context (SpeedEngine.compute autocasts on CUDA only): stand-ins, PEFT's casts off, autocast
        with backbone.engine.stand_ins(skip_input_cast=True), torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = forward_packed(backbone, seqs, pos)
        hidden.float().pow(2).mean().backward()
        opt.step()

    ms = {}
    for length in (4, 8):  # 8 prompts (a prompt's own host work stays in the figure) of 4 or 8 tokens: the
        # fewest tokens, where the line is straight (from 128 tokens on the arithmetic grows faster than linearly here)
        seqs = [torch.randint(100, 2000, (length,)) for _ in range(8)]
        pos = [torch.arange(length).expand(3, -1) for _ in range(8)]
        for _ in range(3):
            step(seqs, pos)
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            step(seqs, pos)
            times.append(time.perf_counter() - t)
        ms[8 * length] = 1e3 * statistics.median(times)
        print(json.dumps({"figure": "host_step", "layers": a.layers, "prompts": 8, "tokens": 8 * length,
                          "median_ms": round(ms[8 * length], 1), "threads": a.threads}), flush=True)
    (n0, t0), (n1, t1) = sorted(ms.items())
    none = t0 - (t1 - t0) * n0 / (n1 - n0)  # the line through both, at no tokens
    print(json.dumps({"figure": "host_step_no_tokens", "layers": a.layers, "ms": round(none, 1),
                      "ms_per_layer": round(none / a.layers, 2), "cpu": _cpu_name()}))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
