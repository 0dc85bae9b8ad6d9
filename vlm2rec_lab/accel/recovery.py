"""Fallback ladders for a training step. A step that runs out of device memory is redone with more
gradient checkpointing (none -> every 4th -> every 2nd -> every decoder layer); one that fails
inside torch.compile is redone with the layers uncompiled. Each is redone from the step's start with
the random state rewound, so the run equals one that had the final setting from the start; both
only in one process (ranks cannot agree on a retry midway through their collectives).
"""
from __future__ import annotations

import gc
import warnings
from functools import partial
from typing import Callable, TypeVar

import torch

from . import distributed as dist
from .checkpointing import checkpointed_every, enable_checkpointing
from .compile import compile_backend, compile_error, compile_layers, uncompile_layers

T = TypeVar("T")


def out_of_memory(e: BaseException) -> bool:
    """Whether an error is the device running out of memory (some kernels report it as a plain
    RuntimeError, e.g. cuBLAS failing to allocate its workspace)."""
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text


class StepRecovery:
    """Runs a training step, and redoes it with a cheaper setting where it fails for want of
    memory or in the compiler (:meth:`run`).

    Args:
        backbone: the backbone whose decoder layers it checkpoints and (un)compiles.
    """

    def __init__(self, backbone):
        self.backbone = backbone
        self.backend: str | None = None  # the compile backend while the decoder layers run compiled

    def can_checkpoint_more(self) -> bool:
        """Gradient checkpointing is used only as far as memory requires it: in one process and
        until every layer is checkpointed."""
        return dist.world_size() == 1 and checkpointed_every(self.backbone) != 1

    def can_go_eager(self) -> bool:
        """A step that torch.compile fails on is redone uncompiled, in one process."""
        return self.backend is not None and dist.world_size() == 1

    def compile(self, setting: bool | str | None, steps: int, retained_backward: bool) -> str | None:
        """Compile the decoder layers where :func:`~vlm2rec_lab.accel.compile.compile_backend` says
        so for ``setting`` and a run of ``steps`` (decided on the whole run, so that a resumed run
        compiles as it did: compiled graphs draw other dropout masks). Returns the backend."""
        self.backend = compile_backend(setting, self.backbone, steps, checkpointed_every(self.backbone))
        if self.backend:
            compile_layers(self.backbone, backend=self.backend, retained_backward=retained_backward)
        return self.backend

    def uncompile(self) -> None:
        """The decoder layers run their own forward again (where :meth:`compile` compiled them)."""
        if self.backend:
            uncompile_layers(self.backbone)
            self.backend = None

    def run(self, attempt: Callable[[], T], undo: Callable[[], None], step: int) -> T:
        """``attempt()`` (step ``step``, counted from 0) until it returns. Where it raises out of
        memory or in the compiler and a retry is possible, ``undo()`` drops what it left behind
        (gradients, log rows), the random state goes back to where it started and the step is
        redone with the next setting of the ladder; any other error is raised."""
        from ..checkpoint import rng_state, set_rng_state

        while True:
            more, eager = self.can_checkpoint_more(), self.can_go_eager()
            rng = rng_state() if more or eager else None
            try:
                return attempt()
            except Exception as e:  # torch.OutOfMemoryError is a RuntimeError
                remedy = self._remedy(e, more, eager, step)
                if remedy is None:
                    raise
            # (outside the handler, which holds the failed step's tensors)
            undo()
            gc.collect()  # the failed step's graph may hang on reference cycles through its traceback
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            set_rng_state(rng)
            remedy()

    def _remedy(self, e: Exception, more: bool, eager: bool, step: int) -> Callable[[], None] | None:
        if more and out_of_memory(e):
            return partial(self._checkpoint_more, step)
        if eager and compile_error(e):
            return partial(self._go_eager, step, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        if self.backend and compile_error(e) and hasattr(e, "add_note"):  # (Python 3.11+)
            e.add_note(f"raised within torch.compile ({self.backend}): --compile off trains without it")
        return None

    def _go_eager(self, step: int, why: str) -> None:
        n = uncompile_layers(self.backbone)
        backend, self.backend = self.backend, None
        warnings.warn(f"step {step + 1}: torch.compile ({backend}) raised an error, so the {n} compiled decoder "
                      f"layers run uncompiled for the rest of this run (slower; --compile off starts that way; were it "
                      f"the model's own, the step redone raises it again): {why}", RuntimeWarning, stacklevel=4)

    def _checkpoint_more(self, step: int) -> None:
        now = checkpointed_every(self.backbone)  # (0: none; never 1 here, see can_checkpoint_more)
        every = next(r for r in (4, 2, 1) if not now or r < now)
        enable_checkpointing(self.backbone, every)
        which = "every decoder layer" if every == 1 else f"every {every}{'nd' if every == 2 else 'th'} decoder layer"
        warnings.warn(f"step {step + 1} ran out of device memory: gradient checkpointing is now on for {which} "
                      f"for the rest of this run (slower, less memory); --gradient-checkpointing {every} starts "
                      f"there", RuntimeWarning, stacklevel=4)
