"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo) or as one process."""
import sys
from pathlib import Path

import torch

from vlm2rec_lab.accel import distributed as dist
from vlm2rec_lab.config import TrainConfig
from vlm2rec_lab.data.dataset import Dataset
from vlm2rec_lab.runs import create_run, embed_run
from vlm2rec_lab.train import Trainer


def rank_tensors(r: int) -> list:
    """What rank ``r`` reduces in the "reduce" mode: three dtypes, tensors large and small."""
    return [torch.arange(12.0).reshape(3, 4) * (r + 1), torch.full((5,), r + 0.5, dtype=torch.bfloat16),
            torch.eye(2, dtype=torch.float64) * (r - 3), torch.arange(9.0) + 10 * r, torch.tensor(float(r))]


def main(mode: str, data: str, out: str) -> None:
    dist.init_from_env()
    out = Path(out)
    if mode == "reduce":  # the bucketed averaging on its own (buckets of at most 10 elements here)
        mine = rank_tensors(dist.rank())
        calls, real = [], dist.dist.all_reduce
        dist.dist.all_reduce = lambda t, **k: calls.append(t.numel()) or real(t, **k)
        dist.all_reduce_mean(mine, bucket_elements=10)
        dist.dist.all_reduce = real
        missing = dist.average_tensors([None, mine[0]], like=[torch.ones(2, 3), None])
        if dist.rank() == 0:
            torch.save({"mean": mine, "missing": missing, "calls": calls}, out / f"reduce_{dist.world_size()}.pt")
        dist.finish(0)
    if mode in ("fail", "crash"):  # rank 1 alone fails while rank 0 waits in a collective for it
        from vlm2rec_lab import cli

        def handler(a):
            if dist.rank() == 1:
                raise (ValueError if mode == "fail" else RuntimeError)(f"rank 1 alone: {mode}")
            dist.gather_cat(torch.ones(2))
            return 0

        cli.cmd_embed = handler  # "fail": the command line's own error path; "crash": an error it does not catch
        sys.exit(cli.main(["embed", data]))
    ds = Dataset.load(data)
    if mode == "grads":
        cfg = TrainConfig(method="vlm2rec", batch_size=8, users_k=32, lora_dropout=0.0, grad_cos_every=1,
                          max_steps=2, checkpoint_every=0)
        tr = Trainer(cfg, ds, out / f"run{dist.world_size()}", progress=False)
        loss, grads = tr.loss_and_gradients()
        tr.train()  # two optimizer steps, each with the gradient-cosine probe
        if dist.rank() == 0:
            torch.save({"loss": loss, "grads": grads, "log": [{k: float(v) for k, v in row.items()} for row in tr.log]}, out / f"grads_{dist.world_size()}.pt")
    elif mode == "init":
        import time

        from vlm2rec_lab import tiny
        from vlm2rec_lab import train as train_module

        order, real_build, real_load = [], tiny.build_tiny, train_module.load_backbone

        def build(*a, **k):  # rank 0 takes its time; rank 1 must come after it
            if dist.rank() == 0:
                time.sleep(1.0)
                (out / "built").touch()
                order.append([0, "built"])
            else:
                order.append([1, "asked after rank 0 built" if (out / "built").exists() else "asked first"])
            return real_build(*a, **k)

        def load(*a, **k):  # rank 1's random stream moves on before its adapter is made
            backbone = real_load(*a, **k)
            if dist.rank() == 1:
                torch.rand(7)
            return backbone

        tiny.build_tiny, train_module.load_backbone = build, load
        cfg = TrainConfig(method="vlm2rec", batch_size=8, users_k=32, alpha=0.7, checkpoint_every=0)
        tr = Trainer(cfg, ds, out / "init", progress=False)
        mine = torch.cat([p.detach().reshape(-1) for p in tr.lora] + [tr.alpha.detach().reshape(1), tr.beta.detach().reshape(1)])
        every = dist.gather_objects(mine)
        orders = dist.gather_objects(order)
        if dist.rank() == 0:
            torch.save({"same_start": all(torch.equal(every[0], e) for e in every),
                        "lora_numel": mine.numel(), "order": [x for o in orders for x in o]}, out / "init_2.pt")
    elif mode == "cache":  # the vision cache filled before training: each process encodes its share
        from vlm2rec_lab.backbones import load_backbone
        from vlm2rec_lab.encoder import Encoder

        backbone = load_backbone("tiny", dataset=ds, device="cpu")
        encoded, real = [], backbone.image_features
        backbone.image_features = lambda px, grid: encoded.append(len(grid)) or real(px, grid)
        enc = Encoder(backbone, ds.items)
        enc.vision_features([3, 5])  # some images already cached on one rank only
        if dist.rank() == 1:
            enc.vision_features([7])
        enc.cache_all()
        held = dist.gather_objects({i: (f.clone(), g.clone()) for i, (f, g) in enc.features.items()})
        counts = dist.gather_objects(sum(encoded))
        if dist.rank() == 0:
            torch.save({"held": held, "encoded": counts}, out / f"cache_{dist.world_size()}.pt")
    elif mode == "resume":  # LoRA dropout on: 3 steps in one go, and 2 steps then a resumed third
        base = dict(method="vlm2rec", batch_size=8, users_k=32, lora_dropout=0.2, grad_cos_every=0, checkpoint_every=2)
        whole = Trainer(TrainConfig(**base, max_steps=3), ds, out / f"whole{dist.world_size()}", progress=False)
        streams = dist.gather_objects(torch.get_rng_state())  # each process's own dropout stream
        whole.train()
        Trainer(TrainConfig(**base, max_steps=2), ds, out / f"part{dist.world_size()}", progress=False).train()
        resumed = Trainer(TrainConfig(**base, max_steps=3), ds, out / f"part{dist.world_size()}", progress=False)
        resumed.train(resume=True)
        if dist.rank() == 0:
            torch.save({"streams": streams, "whole": [r["loss"] for r in whole.log],
                        "resumed": [r["loss"] for r in resumed.log]}, out / f"resume_{dist.world_size()}.pt")
    else:
        run = out / f"embed{dist.world_size()}"
        if dist.rank() == 0:
            create_run(run, TrainConfig(method="vlm-vanilla"), ds)
        dist.barrier()
        embed_run(run, ds, progress=False)
    dist.finish(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
