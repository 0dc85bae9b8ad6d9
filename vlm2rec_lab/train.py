"""The training loop (DESIGN §3, §5): LoRA on the language model, learnable α and β (β ≥ 0),
gradient accumulation, checkpoints with exact resume, NaN/inf guard, per-step logs, and the
gradient-cosine probe.

A run killed at any step and resumed ends with the same adapter weights as an uninterrupted one:
the data order is a pure function of (seed, epoch), and a checkpoint holds the adapter, the
optimizer, α/β, every RNG state (every process's) and the position in the data order.
"""
from __future__ import annotations

import functools
import gc
import random
import time
import traceback
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .backbones import Backbone, load_backbone, lora_target_regex, out_of_memory
from .accel import distributed as dist
from .config import TrainConfig
from .encoder import Encoder
from .io import atomic_dir, atomic_write_text
from .losses import ObjectiveConfig, info_nce, objective
from .methods import get_method
from .accel.transfer import to_device


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite."""


def seed_everything(seed: int) -> None:
    """Seed every random source from one place (STYLE 6)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of process ``rank``'s own random stream (LoRA-dropout masks), drawn from ``seed``,
    ``rank`` and ``step`` (the step a process count other than the checkpoint's resumes at)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _own_stream(seed: int, step: int = 0) -> None:
    """Under a launcher, processes beyond rank 0 switch to a random stream of their own (rank 0, like
    one process, keeps the seed's): see ``Trainer.__init__``."""
    if dist.rank() > 0:
        seed_everything(rank_seed(seed, dist.rank(), step))


class ResumeError(ValueError):
    """``--resume`` where there is nothing to resume (no run folder, or no checkpoint in it)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: truncated, corrupt, or holding more than tensors and
    plain values (which ``torch.load`` would have to run code to rebuild)."""


def _rng_state() -> dict:
    """Every random generator's state as tensors and plain values (a checkpoint loads with
    ``torch.load(weights_only=True)``, which rebuilds nothing else)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])  # (tuples survive torch.load(weights_only=True))
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():  # (a run moved to fewer GPUs: theirs)
        torch.cuda.set_rng_state_all(s["cuda"][:torch.cuda.device_count()])


# the bounds of `--compile auto` (compile_backend): where the first step's compiling was measured to be repaid
COMPILE_AUTO_MIN_STEPS = 2000
COMPILE_AUTO_MIN_PARAMS = 10**9


def compile_backend(setting: bool | str | None, bb: Backbone, steps: int) -> str | None:
    """The ``torch.compile`` backend for a run's decoder layers, or None. ``setting`` is
    ``TrainConfig.compile``: True is inductor, False none, a string that backend, and None ("auto")
    inductor on a CUDA device, for a model of at least :data:`COMPILE_AUTO_MIN_PARAMS` parameters
    and a run of at least :data:`COMPILE_AUTO_MIN_STEPS` optimizer steps (``steps``), unless every
    decoder layer is checkpointed (a checkpointed layer runs uncompiled). On an H100 a
    Qwen2.5-VL-3B step at the trainer's defaults took 0.306 s compiled against 0.356 s eager (0.340
    against 0.379 s in another run) after 18-44 s of compiling: paid back after 360-1,130 steps."""
    if setting is None:
        big = sum(p.numel() for p in bb.model.parameters()) >= COMPILE_AUTO_MIN_PARAMS
        pays = bb.device.type == "cuda" and big and steps >= COMPILE_AUTO_MIN_STEPS and bb.checkpoint_every != 1
        return "inductor" if pays else None
    if isinstance(setting, bool):
        return "inductor" if setting else None
    return setting


def check_compile_backend(setting: bool | str | None) -> None:
    """Refuse a backend name torch.compile does not know, before any model is loaded."""
    if isinstance(setting, str):
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if setting not in known:
            raise ValueError(f"compile: {setting!r} is not auto, on, off or a torch.compile backend ({', '.join(known)})")


_COMPILER_PARTS = ("torch._dynamo", "torch._inductor", "torch._functorch", "triton")
# where checks and operators that others call raise from (torch._check, ...): their caller says who failed
_HELPERS = ("torch._ops", "torch._prims_common", "torch.utils")


def _within(module: str, packages: tuple[str, ...], exact: tuple[str, ...] = ()) -> bool:
    return module in exact or any(module == p or module.startswith(p + ".") for p in packages)


def compile_error(e: BaseException) -> bool:
    """Whether ``e`` (or an error it was raised from) came out of torch.compile's machinery: an
    exception class of dynamo, inductor, AOTAutograd or triton, or one raised inside them (say, a
    backward graph compiled on its first use, a missing triton, a check of AOTAutograd's runtime)
    rather than in the model's own code or in an operator it called. An error dynamo meets while
    tracing the model's code counts too, whoever's it is: redone uncompiled, the model's own is
    raised again."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if _within(type(e).__module__, _COMPILER_PARTS):
            return True
        modules = [frame.f_globals.get("__name__", "") for frame, _ in traceback.walk_tb(e.__traceback__)]
        while modules and _within(modules[-1], _HELPERS, exact=("torch",)):
            modules.pop()
        if modules and _within(modules[-1], _COMPILER_PARTS):
            return True
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False


def check_fusion(method, bb: Backbone) -> None:
    """Image prompts need a VLM: refuse a text-only backbone for external / internal fusion."""
    if method.fusion in ("external", "internal", "item-mean") and bb.kind != "vlm":
        raise ValueError(f"method {method.name!r} ({method.fusion} fusion) needs a vision-language backbone; "
                         f"{bb.name} is a text-only model (use llm-vanilla or llm-sft)")


def apply_lora(bb: Backbone, cfg: TrainConfig) -> None:
    """LoRA (r, alpha, dropout) on the language model's projections only (DESIGN §2), in place."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_target_regex(bb.kind))
    bb.model = get_peft_model(bb.model, lcfg)
    if cfg.gradient_checkpointing:
        bb.enable_checkpointing(cfg.gradient_checkpointing)


def _snapshot(obj):
    """``obj`` with every tensor copied to the CPU (a copy even where it is there already), through
    dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(_snapshot(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _flat_cos(a, b) -> float:
    """Cosine between two gradients given as lists of tensors (None: no gradient, skipped), read
    back from the device once."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return 0.0
    sums = torch.stack([torch.stack([(x * y).sum(), (x * x).sum(), (y * y).sum()]) for x, y in pairs])
    dot, na, nb = sums.double().sum(0).tolist()
    return dot / max(np.sqrt(na * nb), 1e-30)


# The requests of an external-fusion step (Trainer.requests: text and image histories, text and image
# targets) in the forwards a probed micro-batch gives them: g_T = ∇θ InfoNCE(z^T, e^F) needs the text
# histories and the targets, g_V the image histories and the targets, so with the three apart each
# gradient pass runs backward over those tokens alone instead of the whole step's (with Beauty's
# shapes about 1.17 instead of 2 backward passes of the step for the two; the step's own backward
# covers all three). With LoRA dropout on, three forwards draw their masks apart, so a run's
# trajectory depends on --grad-cos-every as it does on the seed (the same distribution, other draws).
PROBE_APART = ((0,), (1,), (2, 3))


def modality_gradients(emb: dict[str, Tensor], labels: Tensor, params: list, tau: float) -> tuple[list, list]:
    """g_T and g_V of DESIGN §5: g_m = ∇θ InfoNCE(z^m, e^F) over ``params`` (θ = LoRA), averaged over
    processes; the graph is kept for the step's own backward."""
    e_f = emb["e_t"] + emb["e_v"]
    grad = lambda loss: torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)  # noqa: E731
    return (dist.average_tensors(grad(info_nce(emb["z_t"], e_f, tau, labels)), like=params),
            dist.average_tensors(grad(info_nce(emb["z_v"], e_f, tau, labels)), like=params))


def gradient_cosines(g_mod: tuple[list, list], g_total: list) -> dict[str, float]:
    """DESIGN §5: cos(g_total, g_T) and cos(g_total, g_V). ``g_total`` is the objective's gradient as
    the step's backward leaves it in ``.grad`` (scaled by 1 / grad_accum, which no cosine sees)
    rather than a third gradient pass of its own (a probed step costs 1.9 instead of 2.2 plain steps
    on the CPU); averaged over processes here."""
    g_total = dist.average_tensors(g_total, like=g_mod[0])  # (a weight without gradient: zeros)
    return {"cos_total_t": _flat_cos(g_total, g_mod[0]), "cos_total_v": _flat_cos(g_total, g_mod[1])}


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
        check_compile_backend(cfg.compile)
        self.cfg, self.ds, self.run_dir = cfg, dataset, Path(run_dir)
        self.method = get_method(cfg.method)
        if not self.method.trains:
            raise ValueError(f"method {cfg.method!r} is zero-shot: nothing to train")
        self.progress, self.on_step = progress, on_step
        self.probe_apart: tuple | None = PROBE_APART  # (None: a probed micro-batch in one forward, as before)
        seed_everything(cfg.seed)
        self.bb = backbone or load_backbone(cfg.backbone, device=cfg.device, dataset=dataset,
                                            chat_template=cfg.chat_template, max_pixels=cfg.max_pixels)
        check_fusion(self.method, self.bb)
        apply_lora(self.bb, cfg)
        self.encoder = Encoder(self.bb, dataset.items, cache_vision=cfg.cache_vision, packed=cfg.packed,
                               share_prefix=cfg.share_prefix)
        self.obj = ObjectiveConfig(name=self.method.objective, tau=cfg.tau, tau_crtr=cfg.tau_crtr, lam=cfg.lam,
                                   penalty_offset=cfg.penalty_offset)
        dev = self.bb.device
        learn = cfg.learn_alpha_beta and self.method.objective not in ("sft", "crtr_only", "no_penalty")
        self.alpha = torch.nn.Parameter(torch.tensor(float(cfg.alpha), device=dev), requires_grad=learn)
        self.beta = torch.nn.Parameter(torch.tensor(float(cfg.beta), device=dev), requires_grad=learn)
        self.lora = [p for p in self.bb.model.parameters() if p.requires_grad]
        groups = [{"params": self.lora, "weight_decay": cfg.weight_decay}]
        if learn:
            groups.append({"params": [self.alpha, self.beta], "weight_decay": 0.0})
        # fused: one kernel for all tensors instead of about a dozen multi-tensor passes (the default's
        # step spanned 12.6 ms of an H100's timeline for the 3B LoRA's 504 tensors)
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
        dist.broadcast_from_first(self.lora + [self.alpha, self.beta])  # every process starts from rank 0's adapter
        # then each process draws its own LoRA-dropout masks. With one seed everywhere, rows of two
        # processes at the same packed positions would be dropped alike, which one process holding
        # the whole batch never does. Rank 0 keeps the seed's stream: one process runs as before.
        _own_stream(cfg.seed)

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
        self.compiled: str | None = None  # the backend of the decoder layers while train() runs them compiled
        self._ahead: tuple[np.ndarray, object] | None = None  # (examples, layout) of the next micro-batch
        self._written: Future | None = None  # the checkpoint being written in the background
        self.log: list[dict] = []
        self.weak: list[tuple[int, int, str]] = []

    # ---------------------------------------------------------------- one batch
    def requests(self, hist: np.ndarray, targets: np.ndarray) -> list[tuple[str, list]]:
        """The prompt sets the objective needs for a batch, by fusion (DESIGN §2): text and image
        histories and targets (external), or interleaved / text-only histories and targets."""
        lists = [row[row >= 0].tolist() for row in hist]
        items = [[int(t)] for t in targets]
        if self.method.fusion == "external":  # one packed forward for the four sets where the backbone can
            return [("T", lists), ("V", lists), ("T", items), ("V", items)]
        kind = "I" if self.method.fusion == "internal" else "T"
        return [(kind, lists), (kind, items)]

    def embeddings(self, hist: np.ndarray, targets: np.ndarray, layout=None, apart=None) -> dict[str, Tensor]:
        """The embeddings the objective needs for a batch (``layout``: its requests' layout, worked
        out beforehand; ``apart``: see ``Encoder.embed_sets``)."""
        out = self.encoder.embed_sets(self.requests(hist, targets), layout, apart)
        names = ("z_t", "z_v", "e_t", "e_v") if self.method.fusion == "external" else ("z", "e")
        return dict(zip(names, out))

    def _mine(self, sel: np.ndarray) -> np.ndarray:
        share = len(sel) // dist.world_size()
        return sel[dist.rank() * share:(dist.rank() + 1) * share]

    def micro_step(self, sel: np.ndarray, layout=None, probed: bool = False):
        """Objective of one micro-batch ``sel`` (global example indices). Each process embeds its own
        share of the rows; the embeddings are gathered (differentiably) so the loss, and its in-batch
        negatives, cover the whole global batch on every process. ``probed``: the gradient-cosine
        probe will take g_T and g_V from this micro-batch, so its text histories, image histories and
        targets go through forwards of their own (:data:`PROBE_APART`, ``self.probe_apart``)."""
        mine = self._mine(sel)
        local = self.embeddings(self.hist[mine], self.targets[mine], layout, self.probe_apart if probed else None)
        emb = {k: dist.gather_cat(v) for k, v in local.items()}
        labels = to_device(torch.as_tensor(self.targets[sel]), self.bb.device)  # no wait for the forward
        return objective(self.obj, emb, self.alpha, self.beta, labels=labels), emb, labels

    def loss_and_gradients(self, epoch: int = 0, micro: int = 0) -> tuple[float, dict[str, Tensor]]:
        """The loss and the (process-averaged) LoRA gradients of one micro-batch, without stepping:
        what the multi-process test compares with a single process."""
        cfg = self.cfg
        sel = self._order(epoch)[micro * cfg.batch_size:(micro + 1) * cfg.batch_size]
        self.opt.zero_grad(set_to_none=True)
        out, _, _ = self.micro_step(sel)
        out.total.backward()
        dist.average_gradients(self.lora)
        names = [n for n, p in self.bb.model.named_parameters() if p.requires_grad]
        return out.total.item(), {n: p.grad.detach().clone() for n, p in zip(names, self.lora)}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.targets))

    # ---------------------------------------------------------------- checkpoints
    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoint"

    def save_checkpoint(self) -> None:
        """Snapshot the adapter, optimizer, α/β, every RNG state, the data position and the logs
        (copied to the CPU here, so later steps cannot change them) and write them to the run's
        checkpoint folder from a background thread while training goes on: a 3B model's LoRA
        checkpoint with AdamW state is 360 MB, about 0.3 s of disk a write. The folder is replaced
        atomically; the previous write is finished (its error raised) first, and :meth:`train`
        finishes the last before it returns or raises. Every process calls it (each one's RNG state
        is gathered); rank 0 writes."""
        rngs = dist.gather_objects(_rng_state())
        if dist.rank() != 0:
            return
        self.wait_for_checkpoint()  # first: one snapshot held at a time, and a failed write stops here
        state = _snapshot({
            "lora": {n: p for n, p in self.bb.model.named_parameters() if p.requires_grad},
            "optimizer": self.opt.state_dict(), "alpha": self.alpha, "beta": self.beta,  # (references: copied)
            "rng": rngs[0], "rng_ranks": rngs, "step": self.step, "epoch": self.epoch, "micro": self.micro,
        })
        log, weak = list(self.log), list(self.weak)

        def write() -> None:
            with atomic_dir(self.ckpt_dir, overwrite=True) as tmp:
                torch.save(state, tmp / "state.pt")
                self._write_logs(tmp, log, weak)

        pool = ThreadPoolExecutor(1, thread_name_prefix="vlm2rec-checkpoint")
        self._written = pool.submit(write)
        pool.shutdown(wait=False)  # the thread ends with the write

    def wait_for_checkpoint(self) -> None:
        """Block until the checkpoint being written (if any) is on disk; raises its error."""
        written, self._written = self._written, None
        if written is not None:
            written.result()

    def _settle_checkpoint(self) -> None:
        """Finish the checkpoint being written, on the way out of a failed run: its own failure is
        a warning, so that it does not replace the error that stopped the run."""
        try:
            self.wait_for_checkpoint()
        except Exception as w:  # noqa: BLE001
            warnings.warn(f"the checkpoint being written when training stopped was not saved: "
                          f"{type(w).__name__}: {w}", RuntimeWarning, stacklevel=3)

    def load_checkpoint(self) -> bool:
        """Restore the run's checkpoint (False where there is none). Loaded with
        ``weights_only=True``: a file holding anything but tensors and plain values is refused
        (:class:`CheckpointError`), as is one that cannot be read."""
        import pickle

        self.wait_for_checkpoint()
        f = self.ckpt_dir / "state.pt"
        if not f.exists():
            return False
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{f}: refused: it holds objects other than tensors and plain values, which loading "
                                  f"would run code to rebuild (a checkpoint this toolkit wrote never does; "
                                  f"{' '.join(str(e).split())[:200]})") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: unreadable (truncated or corrupt: {' '.join(str(e).split())[:200]}); move "
                                  f"{self.ckpt_dir} away and add --fresh to train {self.run_dir} from step 1") from None
        named = dict(self.bb.model.named_parameters())
        with torch.no_grad():
            for n, v in state["lora"].items():
                named[n].copy_(v)
            self.alpha.copy_(state["alpha"])
            self.beta.copy_(state["beta"])
        self.opt.load_state_dict(state["optimizer"])
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == dist.world_size():
            _set_rng_state(ranks[dist.rank()])
        else:  # another process count than the checkpoint's: rank 0 goes on with its stream, the others
            _set_rng_state(state["rng"])  # start streams of their own (reproducible: seed, rank, step)
            _own_stream(self.cfg.seed, state["step"])
        self.step, self.epoch, self.micro = state["step"], state["epoch"], state["micro"]
        if (self.ckpt_dir / "train_log.csv").exists():
            self.log = pd.read_csv(self.ckpt_dir / "train_log.csv").to_dict("records")
        if (self.ckpt_dir / "weak_modality.csv").exists():
            w = pd.read_csv(self.ckpt_dir / "weak_modality.csv")
            self.weak = list(w.itertuples(index=False, name=None))
        return True

    def _write_logs(self, folder: Path, log: list | None = None, weak: list | None = None) -> None:
        atomic_write_text(folder / "train_log.csv", pd.DataFrame(self.log if log is None else log).to_csv(index=False))
        atomic_write_text(folder / "weak_modality.csv", pd.DataFrame(
            self.weak if weak is None else weak, columns=["step", "user", "weak"]).to_csv(index=False))

    # ---------------------------------------------------------------- the loop
    def train(self, resume: bool = False, fresh: bool = False) -> dict:
        """Run (or resume) to ``total_steps``; returns the final log row. Writes the adapter,
        α/β and the logs into the run folder. ``resume`` without a checkpoint raises
        :class:`ResumeError` unless ``fresh`` (then it trains from step 1)."""
        from tqdm.auto import tqdm

        if resume and not self.load_checkpoint() and not fresh:
            raise ResumeError(f"{self.ckpt_dir}: no checkpoint to resume from (deleted, or the run stopped before "
                              f"its first one): add --fresh to train {self.run_dir} from step 1")
        cfg = self.cfg
        self.bb.model.train()
        if cfg.cache_vision and self.method.fusion in ("external", "internal"):
            self.encoder.cache_all(progress=self.progress and dist.rank() == 0)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {cfg.method}",
                   disable=not self.progress or dist.rank() != 0 or None)
        try:
            # compiled until train() returns (embedding is eager unless asked), decided on the whole
            # run so that a resumed run compiles as it did (compiled graphs draw other dropout masks)
            self.compiled = compile_backend(cfg.compile, self.bb, self.total_steps)
            if self.compiled:  # (the probe runs a step's backward more than once)
                self.bb.compile_layers(backend=self.compiled, retained_backward=self.probes)
            while self.step < self.total_steps:
                order = self._order(self.epoch)
                t0 = time.perf_counter()
                ladder, eager = self._can_fall_back(), self._can_fall_back_to_eager()
                if ladder or eager:
                    rng, n_weak = _rng_state(), len(self.weak)
                redo = None  # the step is redone below, outside the handler (which holds its tensors)
                try:
                    sums, stats = self._accumulate(order)
                except Exception as e:  # torch.OutOfMemoryError is a RuntimeError
                    if ladder and out_of_memory(e):
                        redo = self._fall_back_to_checkpointing
                    elif eager and compile_error(e):
                        why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                        redo = functools.partial(self._fall_back_to_eager, why=why)
                    else:
                        if self.compiled and compile_error(e) and hasattr(e, "add_note"):  # (Python 3.11+)
                            e.add_note(f"raised within torch.compile ({self.compiled}): --compile off trains without it")
                        raise
                if redo is not None:
                    redo(rng, n_weak)
                    continue
                dist.average_gradients(self.lora + ([self.alpha, self.beta] if self.alpha.requires_grad else []))
                self.opt.step()
                with torch.no_grad():  # projected onto α ≥ 0, β ≥ 0 (DESIGN §3): below 0, α flips the penalty
                    self.alpha.clamp_(min=0.0)
                    self.beta.clamp_(min=0.0)
                self.step += 1
                self.epoch, self.micro = self._advance(self.epoch, self.micro)
                row = {"step": self.step, "epoch": self.epoch, **sums, "loss": sum(v for k, v in sums.items() if not k.startswith("cos_")),
                       "alpha": self.alpha.item(), "beta": self.beta.item(), "seconds": time.perf_counter() - t0,
                       "checkpointing": self.bb.checkpoint_every,
                       "compiled": self.compiled is not None and self.bb.checkpoint_every != 1}  # (see compile_backend)
                if stats:
                    cat = {k: torch.cat(v) for k, v in stats.items()}
                    row.update({f"{k}_mean": float(v.float().mean()) for k, v in cat.items()})
                    row["image_weak_share"] = float((cat["margin_v"] < cat["margin_t"]).float().mean())
                self.log.append(row)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items() if not k.startswith("cos_")})
                if self._written is not None and self._written.done():
                    self.wait_for_checkpoint()  # a failed write is raised at the first step after it
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self.step)
            bar.close()
            self.save_checkpoint()
            if dist.rank() == 0:
                self.save_final()
        except BaseException:  # a checkpoint still being written is complete before train() raises
            self._settle_checkpoint()
            raise
        finally:
            if self.compiled:
                self.bb.uncompile_layers()
                self.compiled = None
        self.wait_for_checkpoint()  # ... and before it returns
        dist.barrier()
        return self.log[-1] if self.log else {}

    def _accumulate(self, order: np.ndarray) -> tuple[dict[str, float], dict[str, list]]:
        """Forward and backward over one optimizer step's micro-batches (gradients accumulate in
        the LoRA weights): the step's loss terms (micro-batch means) and per-example statistics."""
        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        stats: dict[str, list] = {}
        probe = self.probes and self.step % cfg.grad_cos_every == 0
        for a in range(cfg.grad_accum):
            sel = order[(self.micro + a) * cfg.batch_size:(self.micro + a + 1) * cfg.batch_size]
            ahead, self._ahead = self._ahead, None
            out, emb, labels = self.micro_step(sel, ahead[1] if ahead is not None and np.array_equal(ahead[0], sel) else None,
                                               probed=bool(probe) and a == 0)
            loss = out.total / cfg.grad_accum
            if probe and a == 0:  # (held through the backward: two LoRA-sized gradients more at its peak)
                g_mod = modality_gradients(emb, labels, self.lora, cfg.tau)
            loss.backward()
            # the next micro-batch's token layout (CPU work) while the device runs this backward; the
            # host reads below wait for the device
            upcoming = self._upcoming(a, order)
            if upcoming is not None:
                mine = self._mine(upcoming)
                try:
                    self._ahead = (upcoming, self.encoder.layout(self.requests(self.hist[mine], self.targets[mine])))
                except Exception:  # noqa: BLE001  (e.g. an unreadable image: raised when that micro-batch
                    pass  # is laid out in its turn, after this one's loss has been checked)
            for name, term in out.terms.items():  # a non-finite loss stops the run before the optimizer steps
                if not torch.isfinite(term):
                    if dist.rank() == 0:
                        self._write_logs(self.run_dir)
                        self._settle_checkpoint()
                    # every process gets here (the loss sees the gathered batch, the same on all), and
                    # none leaves before rank 0 has written: a launcher stops the rest when one ends
                    dist.barrier()
                    raise TrainingDiverged(f"step {self.step + 1}: loss term {name!r} is {term.item()} "
                                           f"(method {cfg.method}, lr {cfg.lr})")
                sums[name] = sums.get(name, 0.0) + term.item() / cfg.grad_accum
            if probe and a == 0:  # g_total: this first micro-batch's gradient, as its backward left it
                sums.update(gradient_cosines(g_mod, [p.grad for p in self.lora]))
            for k, v in out.stats.items():
                stats.setdefault(k, []).append(v.cpu())
            if "margin_t" in out.stats:
                weak = np.where((out.stats["margin_v"] < out.stats["margin_t"]).cpu().numpy(), "V", "T")
                self.weak.extend((self.step + 1, int(u), str(w)) for u, w in zip(self.users[sel], weak))
        return sums, stats

    def _advance(self, epoch: int, micro: int) -> tuple[int, int]:
        """(epoch, first micro-batch) of the step after the one at (epoch, micro)."""
        micro += self.cfg.grad_accum
        return (epoch + 1, 0) if micro + self.cfg.grad_accum > self.micro_per_epoch else (epoch, micro)

    def _upcoming(self, a: int, order: np.ndarray) -> np.ndarray | None:
        """The examples of the micro-batch after this step's ``a``-th (the next step's first after
        its last; None after the run's last); ``order``: this epoch's."""
        bs = self.cfg.batch_size
        if a + 1 < self.cfg.grad_accum:
            epoch, micro = self.epoch, self.micro + a + 1
        elif self.step + 1 < self.total_steps:
            epoch, micro = self._advance(self.epoch, self.micro)
        else:
            return None
        return (order if epoch == self.epoch else self._order(epoch))[micro * bs:(micro + 1) * bs]

    def _can_fall_back(self) -> bool:
        """Gradient checkpointing is used only as far as memory requires it: a step that runs out of
        device memory is redone with more of it — in one process (ranks cannot agree on a retry
        midway through their collectives) and until every layer is checkpointed."""
        return dist.world_size() == 1 and self.bb.checkpoint_every != 1

    def _can_fall_back_to_eager(self) -> bool:
        """A step that torch.compile fails on is redone with the layers uncompiled, in one process
        (ranks cannot agree on a retry midway through their collectives: there the error is raised)."""
        return self.compiled is not None and dist.world_size() == 1

    def _rewind(self, rng: dict, n_weak: int) -> None:
        """Undo a failed step: free what it held, drop its gradients, look-ahead and per-user log rows,
        and put the random state back to where the step started."""
        self.opt.zero_grad(set_to_none=True)
        self._ahead = None
        del self.weak[n_weak:]
        gc.collect()  # the failed step's graph may hang on reference cycles through its traceback
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _set_rng_state(rng)

    def _fall_back_to_eager(self, rng: dict, n_weak: int, why: str) -> None:
        """After a step that torch.compile failed on: the decoder layers run uncompiled from here on,
        and the step is redone from its start, as an uncompiled run would have run it."""
        self._rewind(rng, n_weak)
        n = self.bb.uncompile_layers()
        backend, self.compiled = self.compiled, None
        warnings.warn(f"step {self.step + 1}: torch.compile ({backend}) raised an error, so the {n} compiled decoder "
                      f"layers run uncompiled for the rest of this run (slower; --compile off starts that way; were it "
                      f"the model's own, the step redone raises it again): {why}", RuntimeWarning, stacklevel=2)

    def _fall_back_to_checkpointing(self, rng: dict, n_weak: int) -> None:
        """After an out-of-memory step: checkpoint more decoder layers (none -> every 4th -> every
        2nd -> all; packed forwards keep working, see ``Backbone.enable_checkpointing``) and redo
        the step from its start (:meth:`_rewind`), as if it had run with that checkpointing."""
        self._rewind(rng, n_weak)
        now = self.bb.checkpoint_every  # (0: none; never 1 here, see _can_fall_back)
        every = next(r for r in (4, 2, 1) if not now or r < now)
        self.bb.enable_checkpointing(every)
        which = "every decoder layer" if every == 1 else f"every {every}{'nd' if every == 2 else 'th'} decoder layer"
        warnings.warn(f"step {self.step + 1} ran out of device memory: gradient checkpointing is now on for {which} "
                      f"for the rest of this run (slower, less memory); --gradient-checkpointing {every} starts "
                      f"there", RuntimeWarning, stacklevel=2)

    def save_final(self) -> None:
        """The adapter (PEFT format), α/β and the logs, each written atomically."""
        from .io import atomic_write_json

        with atomic_dir(self.run_dir / "adapter", overwrite=True) as tmp:
            self.bb.model.save_pretrained(tmp)
        atomic_write_json(self.run_dir / "alpha_beta.json", {"alpha": self.alpha.item(), "beta": self.beta.item(),
                                                             "step": self.step})
        with atomic_dir(self.run_dir / "logs", overwrite=True) as tmp:
            self._write_logs(tmp)
