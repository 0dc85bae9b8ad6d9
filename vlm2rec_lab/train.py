"""The training loop (docs/method.md §2, §5): LoRA on the language model, learnable α and β (β ≥ 0),
gradient accumulation, checkpoints with exact resume (:mod:`~vlm2rec_lab.checkpoint`), NaN/inf
guard, per-step logs, and the gradient-cosine probe (:mod:`~vlm2rec_lab.probe`). How fast a step
runs (packing, compiling, out-of-memory recovery) is :mod:`~vlm2rec_lab.accel`'s.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from . import probe
from .accel import distributed as dist
from .accel.checkpointing import checkpointed_every, enable_checkpointing
from .accel.compile import check_compile_backend
from .accel.recovery import StepRecovery
from .accel.transfer import to_device
from .backbones import Backbone, load_backbone, lora_target_regex
from .checkpoint import (CheckpointWriter, ResumeError, own_stream, read_logs, restore_rng, rng_state, seed_everything,
                         write_logs)
from .config import TrainConfig
from .encoder import Encoder
from .io import atomic_dir
from .losses import ObjectiveConfig, objective
from .methods import get_method


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite."""


def check_fusion(method, backbone: Backbone) -> None:
    """Image prompts need a VLM: refuse a text-only backbone for external / internal fusion."""
    if method.fusion in ("external", "internal", "item-mean") and backbone.kind != "vlm":
        raise ValueError(f"method {method.name!r} ({method.fusion} fusion) needs a vision-language backbone; "
                         f"{backbone.name} is a text-only model (use llm-vanilla or llm-sft)")


def apply_lora(backbone: Backbone, cfg: TrainConfig) -> None:
    """LoRA (r, alpha, dropout) on the language model's projections only (docs/method.md §1), in place."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_target_regex(backbone.kind))
    backbone.model = get_peft_model(backbone.model, lcfg)
    if cfg.speed.gradient_checkpointing:
        enable_checkpointing(backbone, cfg.speed.gradient_checkpointing)


class Trainer:
    """Trains one method on one dataset into a run folder.

    Args:
        cfg: the run's :class:`~vlm2rec_lab.config.TrainConfig`.
        dataset: a loaded :class:`~vlm2rec_lab.data.dataset.Dataset`.
        run_dir: the run folder (checkpoint, logs, adapter go here).
        backbone: an already loaded backbone (else loaded from ``cfg.backbone``).
        on_step: called with the step number after each optimizer step (tests use it to kill a run).
    """

    def __init__(self, cfg: TrainConfig, dataset, run_dir: str | Path, backbone: Backbone | None = None,
                 progress: bool = True, on_step: Callable[[int], None] | None = None):
        cfg = cfg.resolved()
        check_compile_backend(cfg.speed.compile)
        self.cfg, self.ds, self.run_dir = cfg, dataset, Path(run_dir)
        self.method = get_method(cfg.method)
        if not self.method.trains:
            raise ValueError(f"method {cfg.method!r} is zero-shot: nothing to train")
        self.progress, self.on_step = progress, on_step
        self.probe_forwards: tuple | None = probe.PROBE_FORWARDS  # (None: a probed micro-batch in one forward)
        seed_everything(cfg.seed)
        self.backbone = backbone or load_backbone(cfg.backbone, device=cfg.device, dataset=dataset,
                                                  chat_template=cfg.chat_template, max_pixels=cfg.max_pixels)
        check_fusion(self.method, self.backbone)
        apply_lora(self.backbone, cfg)
        self.encoder = Encoder(self.backbone, dataset.items, cfg.speed)
        self.obj = ObjectiveConfig(name=self.method.objective, tau=cfg.tau, tau_crtr=cfg.tau_crtr, lam=cfg.lam,
                                   penalty_offset=cfg.penalty_offset)
        dev = self.backbone.device
        learn = cfg.learn_alpha_beta and self.method.objective not in ("sft", "crtr_only", "no_penalty")
        self.alpha = torch.nn.Parameter(torch.tensor(float(cfg.alpha), device=dev), requires_grad=learn)
        self.beta = torch.nn.Parameter(torch.tensor(float(cfg.beta), device=dev), requires_grad=learn)
        self.lora = [p for p in self.backbone.model.parameters() if p.requires_grad]
        groups = [{"params": self.lora, "weight_decay": cfg.weight_decay}]
        if learn:
            groups.append({"params": [self.alpha, self.beta], "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)  # (fused: one kernel for all tensors)
        dist.broadcast_from_first(self.lora + [self.alpha, self.beta])  # every process starts from rank 0's adapter
        own_stream(cfg.seed)  # then each draws its own LoRA-dropout masks (rank 0 keeps the seed's stream)

        users, hist, targets = dataset.train_examples(cfg.train_examples)
        if cfg.users_k is not None:
            pool = np.unique(users)
            if cfg.users_k > pool.size:
                raise ValueError(f"users_k={cfg.users_k} but only {pool.size} users have training examples")
            chosen = np.random.default_rng(cfg.seed).choice(pool, size=cfg.users_k, replace=False)
            keep = np.isin(users, chosen)
            users, hist, targets = users[keep], hist[keep], targets[keep]
        self.users, self.hist, self.targets = users, hist, targets
        if cfg.batch_size % dist.world_size():
            raise ValueError(f"batch_size {cfg.batch_size} does not split over {dist.world_size()} processes")
        self.micro_per_epoch = len(targets) // cfg.batch_size
        if self.micro_per_epoch < cfg.grad_accum:
            raise ValueError(f"{len(targets)} training examples give no full step of {cfg.batch_size} x {cfg.grad_accum}")
        self.steps_per_epoch = self.micro_per_epoch // cfg.grad_accum
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.step, self.epoch, self.micro = 0, 0, 0
        self.probes = bool(cfg.grad_cos_every) and self.method.fusion == "external"  # the gradient-cosine probe
        self.recovery = StepRecovery(self.backbone)  # out of memory -> checkpointing; compiler error -> eager
        self.checkpoints = CheckpointWriter(self.run_dir / "checkpoint")
        self.lookahead: tuple[np.ndarray, object] | None = None  # (examples, layout) of the next micro-batch
        self.log: list[dict] = []
        self.weak: list[tuple[int, int, str]] = []

    # ---------------------------------------------------------------- one batch
    def requests(self, hist: np.ndarray, targets: np.ndarray) -> list[tuple[str, list]]:
        """The prompt sets the objective needs for a batch, by fusion (docs/method.md §1): text and image
        histories and targets (external), or interleaved / text-only histories and targets."""
        lists = [row[row >= 0].tolist() for row in hist]
        items = [[int(t)] for t in targets]
        if self.method.fusion == "external":  # one packed forward for the four sets where the backbone can
            return [("T", lists), ("V", lists), ("T", items), ("V", items)]
        kind = "I" if self.method.fusion == "internal" else "T"
        return [(kind, lists), (kind, items)]

    def embeddings(self, hist: np.ndarray, targets: np.ndarray, layout=None, forward_groups=None) -> dict[str, Tensor]:
        """The embeddings the objective needs for a batch (``layout``: its requests' layout, worked
        out beforehand; ``forward_groups``: see ``Encoder.embed_sets``)."""
        out = self.encoder.embed_sets(self.requests(hist, targets), layout, forward_groups)
        names = ("z_t", "z_v", "e_t", "e_v") if self.method.fusion == "external" else ("z", "e")
        return dict(zip(names, out))

    def local_rows(self, rows: np.ndarray) -> np.ndarray:
        """This process's share of a micro-batch's examples."""
        share = len(rows) // dist.world_size()
        return rows[dist.rank() * share:(dist.rank() + 1) * share]

    def micro_step(self, rows: np.ndarray, layout=None, probed: bool = False):
        """Objective of one micro-batch ``rows`` (global example indices). Each process embeds its
        own share of the rows; the embeddings are gathered (differentiably) so the loss, and its
        in-batch negatives, cover the whole global batch on every process. ``probed``: the
        gradient-cosine probe will take g_T and g_V from this micro-batch, so its text histories,
        image histories and targets go through forwards of their own (``self.probe_forwards``)."""
        own = self.local_rows(rows)
        local = self.embeddings(self.hist[own], self.targets[own], layout, self.probe_forwards if probed else None)
        emb = {k: dist.gather_cat(v) for k, v in local.items()}
        labels = to_device(torch.as_tensor(self.targets[rows]), self.backbone.device)  # no wait for the forward
        return objective(self.obj, emb, self.alpha, self.beta, labels=labels), emb, labels

    def loss_and_gradients(self, epoch: int = 0, micro: int = 0) -> tuple[float, dict[str, Tensor]]:
        """The loss and the (process-averaged) LoRA gradients of one micro-batch, without stepping:
        what the multi-process test compares with a single process."""
        cfg = self.cfg
        rows = self.order(epoch)[micro * cfg.batch_size:(micro + 1) * cfg.batch_size]
        self.opt.zero_grad(set_to_none=True)
        out, _, _ = self.micro_step(rows)
        out.total.backward()
        dist.average_gradients(self.lora)
        names = [n for n, p in self.backbone.model.named_parameters() if p.requires_grad]
        return out.total.item(), {n: p.grad.detach().clone() for n, p in zip(names, self.lora)}

    def order(self, epoch: int) -> np.ndarray:
        """The examples in ``epoch``'s order: a pure function of (seed, epoch)."""
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.targets))

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """The adapter, optimizer, α/β, every process's RNG state, the data position and the logs,
        written to the run's checkpoint folder in the background (:class:`CheckpointWriter`).
        Every process calls it (each one's RNG state is gathered); rank 0 writes."""
        rngs = dist.gather_objects(rng_state())
        if dist.rank() != 0:
            return
        self.checkpoints.save({
            "lora": {n: p for n, p in self.backbone.model.named_parameters() if p.requires_grad},
            "optimizer": self.opt.state_dict(), "alpha": self.alpha, "beta": self.beta,  # (references: copied)
            "rng": rngs[0], "rng_ranks": rngs, "step": self.step, "epoch": self.epoch, "micro": self.micro,
        }, self.log, self.weak)

    def load_checkpoint(self) -> bool:
        """Restore the run's checkpoint (False where there is none)."""
        state = self.checkpoints.load()
        if state is None:
            return False
        named = dict(self.backbone.model.named_parameters())
        with torch.no_grad():
            for n, v in state["lora"].items():
                named[n].copy_(v)
            self.alpha.copy_(state["alpha"])
            self.beta.copy_(state["beta"])
        self.opt.load_state_dict(state["optimizer"])
        restore_rng(state, self.cfg.seed)
        self.step, self.epoch, self.micro = state["step"], state["epoch"], state["micro"]
        log, weak = read_logs(self.checkpoints.folder)
        self.log = self.log if log is None else log
        self.weak = self.weak if weak is None else weak
        return True

    # ---------------------------------------------------------------- the loop
    def train(self, resume: bool = False, fresh: bool = False) -> dict:
        """Run (or resume) to ``total_steps``; returns the final log row. Writes the adapter,
        α/β and the logs into the run folder. ``resume`` without a checkpoint raises
        :class:`ResumeError` unless ``fresh`` (then it trains from step 1)."""
        from tqdm.auto import tqdm

        if resume and not self.load_checkpoint() and not fresh:
            raise ResumeError(f"{self.checkpoints.folder}: no checkpoint to resume from (deleted, or the run stopped "
                              f"before its first one): add --fresh to train {self.run_dir} from step 1")
        cfg = self.cfg
        self.backbone.model.train()
        if cfg.speed.cache_vision and self.method.fusion in ("external", "internal"):
            self.encoder.cache_all(progress=self.progress and dist.rank() == 0)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {cfg.method}",
                   disable=not self.progress or dist.rank() != 0 or None)
        try:
            # compiled until train() returns (embedding is eager unless asked); the probe runs a
            # step's backward more than once
            self.recovery.compile(cfg.speed.compile, self.total_steps, retained_backward=self.probes)
            while self.step < self.total_steps:
                order, n_weak = self.order(self.epoch), len(self.weak)
                # (a step that is redone is timed from its last start)
                t0, (sums, stats) = self.recovery.run(lambda: (time.perf_counter(), self._accumulate(order)),
                                                      lambda: self._undo(n_weak), self.step)
                dist.average_gradients(self.lora + ([self.alpha, self.beta] if self.alpha.requires_grad else []))
                self.opt.step()
                with torch.no_grad():  # projected onto α ≥ 0, β ≥ 0 (docs/method.md §2): below 0, α flips the penalty
                    self.alpha.clamp_(min=0.0)
                    self.beta.clamp_(min=0.0)
                self.step += 1
                self.epoch, self.micro = self._advance(self.epoch, self.micro)
                self.log.append(self._log_row(sums, stats, time.perf_counter() - t0))
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items() if not k.startswith("cos_")})
                self.checkpoints.poll()  # a failed write is raised at the first step after it
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self.step)
            bar.close()
            self.save_checkpoint()
            if dist.rank() == 0:
                self.save_final()
        except BaseException:  # a checkpoint still being written is complete before train() raises
            self.checkpoints.settle()
            raise
        finally:
            self.recovery.uncompile()
        self.checkpoints.wait()  # ... and before it returns
        dist.barrier()
        return self.log[-1] if self.log else {}

    def _log_row(self, sums: dict[str, float], stats: dict[str, list], seconds: float) -> dict:
        """The step's log row: its loss terms, their sum, α, β, per-example statistics (means)."""
        every = checkpointed_every(self.backbone)
        row = {"step": self.step, "epoch": self.epoch, **sums, "loss": sum(v for k, v in sums.items() if not k.startswith("cos_")),
               "alpha": self.alpha.item(), "beta": self.beta.item(), "seconds": seconds, "checkpointing": every,
               "compiled": self.recovery.backend is not None and every != 1}  # (a checkpointed layer runs uncompiled)
        if stats:
            cat = {k: torch.cat(v) for k, v in stats.items()}
            row.update({f"{k}_mean": float(v.float().mean()) for k, v in cat.items()})
            row["image_weak_share"] = float((cat["margin_v"] < cat["margin_t"]).float().mean())
        return row

    def _accumulate(self, order: np.ndarray) -> tuple[dict[str, float], dict[str, list]]:
        """Forward and backward over one optimizer step's micro-batches (gradients accumulate in
        the LoRA weights): the step's loss terms (micro-batch means) and per-example statistics."""
        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        stats: dict[str, list] = {}
        probe_now = self.probes and self.step % cfg.grad_cos_every == 0
        for k in range(cfg.grad_accum):
            rows = order[(self.micro + k) * cfg.batch_size:(self.micro + k + 1) * cfg.batch_size]
            prepared, self.lookahead = self.lookahead, None
            layout = prepared[1] if prepared is not None and np.array_equal(prepared[0], rows) else None
            out, emb, labels = self.micro_step(rows, layout, probed=bool(probe_now) and k == 0)
            loss = out.total / cfg.grad_accum
            if probe_now and k == 0:  # (held through the backward: two LoRA-sized gradients more at its peak)
                g_mod = probe.modality_gradients(emb, labels, self.lora, cfg.tau)
            loss.backward()
            self._lay_out_next(k, order)  # CPU work while the device runs this backward
            for name, term in out.terms.items():  # a non-finite loss stops the run before the optimizer steps
                if not torch.isfinite(term):
                    self._diverged(name, term)
                sums[name] = sums.get(name, 0.0) + term.item() / cfg.grad_accum
            if probe_now and k == 0:  # g_total: this first micro-batch's gradient, as its backward left it
                sums.update(probe.objective_modality_cosines(g_mod, [p.grad for p in self.lora]))
            for name, v in out.stats.items():
                stats.setdefault(name, []).append(v.cpu())
            if "margin_t" in out.stats:
                weak = np.where((out.stats["margin_v"] < out.stats["margin_t"]).cpu().numpy(), "V", "T")
                self.weak.extend((self.step + 1, int(u), str(w)) for u, w in zip(self.users[rows], weak))
        return sums, stats

    def _lay_out_next(self, k: int, order: np.ndarray) -> None:
        """The token layout of the micro-batch after this step's ``k``-th, kept in ``lookahead``;
        the host reads that follow wait for the device anyway."""
        upcoming = self._upcoming(k, order)
        if upcoming is None:
            return
        own = self.local_rows(upcoming)
        try:
            self.lookahead = (upcoming, self.encoder.layout(self.requests(self.hist[own], self.targets[own])))
        except Exception:  # noqa: BLE001  (e.g. an unreadable image: raised when that micro-batch
            pass  # is laid out in its turn, after this one's loss has been checked)

    def _diverged(self, name: str, term: Tensor) -> None:
        """Stop on a non-finite loss term: rank 0 writes the logs; every process gets here (the loss
        sees the gathered batch, the same on all), and none leaves before rank 0 has written (a
        launcher stops the rest when one ends)."""
        if dist.rank() == 0:
            write_logs(self.run_dir, self.log, self.weak)
            self.checkpoints.settle()
        dist.barrier()
        raise TrainingDiverged(f"step {self.step + 1}: loss term {name!r} is {term.item()} "
                               f"(method {self.cfg.method}, lr {self.cfg.lr})")

    def _advance(self, epoch: int, micro: int) -> tuple[int, int]:
        """(epoch, first micro-batch) of the step after the one at (epoch, micro)."""
        micro += self.cfg.grad_accum
        return (epoch + 1, 0) if micro + self.cfg.grad_accum > self.micro_per_epoch else (epoch, micro)

    def _upcoming(self, k: int, order: np.ndarray) -> np.ndarray | None:
        """The examples of the micro-batch after this step's ``k``-th (the next step's first after
        its last; None after the run's last); ``order``: this epoch's."""
        bs = self.cfg.batch_size
        if k + 1 < self.cfg.grad_accum:
            epoch, micro = self.epoch, self.micro + k + 1
        elif self.step + 1 < self.total_steps:
            epoch, micro = self._advance(self.epoch, self.micro)
        else:
            return None
        return (order if epoch == self.epoch else self.order(epoch))[micro * bs:(micro + 1) * bs]

    def _undo(self, n_weak: int) -> None:
        """What a failed step leaves behind: its gradients, look-ahead and per-user log rows."""
        self.opt.zero_grad(set_to_none=True)
        self.lookahead = None
        del self.weak[n_weak:]

    def save_final(self) -> None:
        """The adapter (PEFT format), α/β and the logs, each written atomically."""
        from .io import atomic_write_json

        with atomic_dir(self.run_dir / "adapter", overwrite=True) as tmp:
            self.backbone.model.save_pretrained(tmp)
        atomic_write_json(self.run_dir / "alpha_beta.json", {"alpha": self.alpha.item(), "beta": self.beta.item(),
                                                             "step": self.step})
        with atomic_dir(self.run_dir / "logs", overwrite=True) as tmp:
            write_logs(tmp, self.log, self.weak)
