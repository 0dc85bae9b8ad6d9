"""Random state, checkpoints and resume (docs/training.md, "α and β, checkpoints and resume, logs").

A run killed at any step and resumed ends with the same adapter weights as an uninterrupted one:
the data order is a pure function of (seed, epoch), and a checkpoint holds the adapter, the
optimizer, α/β, every RNG state (every process's) and the position in the data order. Checkpoints
are written from a background thread, from a snapshot taken on the CPU.
"""
from __future__ import annotations

import random
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .accel import distributed as dist
from .io import atomic_dir, atomic_write_text


class ResumeError(ValueError):
    """``--resume`` where there is nothing to resume (no run folder, or no checkpoint in it)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: truncated, corrupt, or holding more than tensors and
    plain values (which ``torch.load`` would have to run code to rebuild)."""


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


def own_stream(seed: int, step: int = 0) -> None:
    """Under a launcher, processes beyond rank 0 switch to a random stream of their own (rank 0, like
    one process, keeps the seed's): with one seed everywhere, rows of two processes at the same
    packed positions would draw the same dropout masks, which one process never does."""
    if dist.rank() > 0:
        seed_everything(rank_seed(seed, dist.rank(), step))


def rng_state() -> dict:
    """Every random generator's state as tensors and plain values (a checkpoint loads with
    ``torch.load(weights_only=True)``, which rebuilds nothing else)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Put back what :func:`rng_state` took."""
    random.setstate(state["python"])  # (tuples survive torch.load(weights_only=True))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():  # (a run moved to fewer GPUs: theirs)
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def restore_rng(state: dict, seed: int) -> None:
    """A checkpoint's random state for this process: its own where the process count is the
    checkpoint's; otherwise rank 0 goes on with rank 0's stream and the others start streams of
    their own (reproducible: seed, rank, step)."""
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == dist.world_size():
        set_rng_state(ranks[dist.rank()])
    else:
        set_rng_state(state["rng"])
        own_stream(seed, state["step"])


def snapshot(obj):
    """``obj`` with every tensor copied to the CPU (a copy even where it is there already), through
    dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(snapshot(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def write_logs(folder: Path, log: list[dict], weak: list[tuple]) -> None:
    """The per-step log and the per-user weak-modality rows, as CSV files in ``folder``."""
    atomic_write_text(folder / "train_log.csv", pd.DataFrame(log).to_csv(index=False))
    atomic_write_text(folder / "weak_modality.csv", pd.DataFrame(weak, columns=["step", "user", "weak"]).to_csv(index=False))


def read_logs(folder: Path) -> tuple[list[dict] | None, list[tuple] | None]:
    """What :func:`write_logs` wrote (None for a file that is not there)."""
    log = pd.read_csv(folder / "train_log.csv").to_dict("records") if (folder / "train_log.csv").exists() else None
    weak = None
    if (folder / "weak_modality.csv").exists():
        weak = list(pd.read_csv(folder / "weak_modality.csv").itertuples(index=False, name=None))
    return log, weak


class CheckpointWriter:
    """Writes a run's checkpoint folder from a background thread, one write at a time: the folder
    is replaced atomically; the previous write is finished (its error raised) before the next."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.pending: Future | None = None  # the write in progress

    def save(self, state: dict, log: list[dict], weak: list[tuple]) -> None:
        """Snapshot ``state`` (tensors copied to the CPU here, so later steps cannot change them)
        and the logs, then write them while training goes on."""
        self.wait()  # first: one snapshot held at a time, and a failed write stops here
        state, log, weak = snapshot(state), list(log), list(weak)

        def write() -> None:
            with atomic_dir(self.folder, overwrite=True) as tmp:
                torch.save(state, tmp / "state.pt")
                write_logs(tmp, log, weak)

        pool = ThreadPoolExecutor(1, thread_name_prefix="vlm2rec-checkpoint")
        self.pending = pool.submit(write)
        pool.shutdown(wait=False)  # the thread ends with the write

    def wait(self) -> None:
        """Block until the write in progress (if any) is on disk; raises its error."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def poll(self) -> None:
        """Where the write in progress has finished, take it off (raising its error); never blocks."""
        if self.pending is not None and self.pending.done():
            self.wait()

    def settle(self) -> None:
        """Finish the write in progress on the way out of a failed run: its own failure is a
        warning, so that it does not replace the error that stopped the run."""
        try:
            self.wait()
        except Exception as w:  # noqa: BLE001
            warnings.warn(f"the checkpoint being written when training stopped was not saved: "
                          f"{type(w).__name__}: {w}", RuntimeWarning, stacklevel=3)

    def load(self) -> dict | None:
        """The checkpoint's state (None where there is none; the folder sits in its run's folder), loaded with ``weights_only=True``: a
        file holding anything but tensors and plain values is refused (:class:`CheckpointError`),
        as is one that cannot be read."""
        import pickle

        self.wait()
        f = self.folder / "state.pt"
        if not f.exists():
            return None
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{f}: refused: it holds objects other than tensors and plain values, which loading "
                                  f"would run code to rebuild (a checkpoint this toolkit wrote never does; "
                                  f"{' '.join(str(e).split())[:200]})") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: unreadable (truncated or corrupt: {' '.join(str(e).split())[:200]}); move "
                                  f"{self.folder} away and add --fresh to train {self.folder.parent} from step 1") from None

