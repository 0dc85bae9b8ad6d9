"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo) or as one process."""
import sys
from pathlib import Path

import torch

from vlm2rec_lab import distributed as dist
from vlm2rec_lab.config import TrainConfig
from vlm2rec_lab.data.dataset import Dataset
from vlm2rec_lab.runs import create_run, embed_run
from vlm2rec_lab.train import Trainer


def main(mode: str, data: str, out: str) -> None:
    dist.init_from_env()
    ds = Dataset.load(data)
    out = Path(out)
    if mode == "grads":
        cfg = TrainConfig(method="vlm2rec", batch_size=8, users_k=32, lora_dropout=0.0, grad_cos_every=0)
        tr = Trainer(cfg, ds, out / f"run{dist.world_size()}", progress=False)
        loss, grads = tr.loss_and_gradients()
        if dist.rank() == 0:
            torch.save({"loss": loss, "grads": grads}, out / f"grads_{dist.world_size()}.pt")
    else:
        run = out / f"embed{dist.world_size()}"
        if dist.rank() == 0:
            create_run(run, TrainConfig(method="vlm-vanilla"), ds)
        dist.barrier()
        embed_run(run, ds, progress=False)
    dist.finish(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
