"""Gradient averaging across processes: one all-reduce per LoRA tensor (the plain path) against the
project's bucketed averaging (``distributed.all_reduce_mean``: the tensors of one dtype flattened
into buckets, one all-reduce each), side by side in one run, on the LoRA of the Qwen2.5-VL-3B shape
(r 16 on the language model's projections: 504 tensors, 29.9 M parameters, fp32). Prints one JSON
line per figure.

    python bench/allreduce.py                 # 2 CPU processes, gloo
    python bench/allreduce.py --tiny          # the tiny backbone's LoRA shapes (tests)

On this machine only gloo on the CPU can be measured; under NCCL a collective's fixed cost is
smaller, but it is paid once per tensor by the plain path all the same.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def lora_shapes(tiny: bool) -> list[tuple[int, ...]]:
    """The trainable shapes PEFT gives the benchmark model (built on the meta device: no memory)."""
    import warnings

    from common import model_config
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLModel

    from vlm2rec_lab.backbones import lora_target_regex

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Qwen2_5_VLModel(model_config(tiny)),
                               LoraConfig(r=16, lora_alpha=32, target_modules=lora_target_regex("vlm")))
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def per_tensor(tensors: list) -> None:
    """The plain path: one all-reduce per tensor."""
    import torch.distributed as tdist

    w = tdist.get_world_size()
    for t in tensors:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        t.div_(w)


def worker(rank: int, world: int, port: int, shapes: list, reps: int) -> None:
    import torch.distributed as tdist

    from common import median_side_by_side

    from vlm2rec_lab.accel import distributed as dist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    base = [torch.randn(s, generator=gen) for s in shapes]
    def averaging(fn):  # fresh copies each run; the run keeps its averaged tensors
        ts = [t.clone() for t in base]
        return lambda: (fn(ts), ts)[1]

    secs, results = median_side_by_side({"plain": lambda: averaging(per_tensor),
                                         "project": lambda: averaging(dist.all_reduce_mean)}, reps, tdist.barrier)
    diff = max((a - b).abs().max().item() for a, b in zip(results["plain"], results["project"]))
    if rank == 0:
        n = sum(t.numel() for t in base)
        plain, project = secs["plain"], secs["project"]
        print(json.dumps({"figure": "gradient_averaging", "backend": "gloo", "processes": world, "tensors": len(base),
                          "parameters": n, "plain_s": round(plain, 5), "project_s": round(project, 5),
                          "ratio": round(plain / project, 2), "max_abs_diff": diff, "reps": reps}), flush=True)
    tdist.barrier()
    tdist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny backbone's LoRA shapes")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    args = ap.parse_args()
    shapes = lora_shapes(args.tiny)
    from vlm2rec_lab.accel.distributed import free_port

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(args.processes, free_port(), shapes, args.reps), nprocs=args.processes)


if __name__ == "__main__":
    main()
