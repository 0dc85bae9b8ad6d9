"""Fallback ladders. A training step that runs out of device memory is redone with more gradient
checkpointing (none -> every 4th -> every 2nd -> every decoder layer); one that fails inside
torch.compile is redone with the layers uncompiled. Each is redone from the step's start with the
random state rewound, so the run equals one that had the final setting from the start; both only
in one process (ranks cannot agree on a retry midway through their collectives). Embedding without
gradients (:func:`embed_in_batches`) steps down from merged adapters to unmerged ones, then to
smaller batches.
"""
from __future__ import annotations

import gc
import logging
import warnings
from contextlib import nullcontext
from functools import partial
from typing import Callable, Sequence, TypeVar

import torch
from torch import Tensor

from . import distributed as dist
from .checkpointing import checkpointed_every, enable_checkpointing
from .compile import compile_backend, compile_error, compile_layers, uncompile_layers

T = TypeVar("T")
log = logging.getLogger(__name__)


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
        self.backend = compile_backend(setting, self.backbone, steps)
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
                      f"the model's own, the step redone raises it again): {why}", RuntimeWarning, stacklevel=3)

    def _checkpoint_more(self, step: int) -> None:
        now = checkpointed_every(self.backbone)  # (0: none; never 1 here, see can_checkpoint_more)
        every = next(r for r in (4, 2, 1) if not now or r < now)
        enable_checkpointing(self.backbone, every)
        which = "every decoder layer" if every == 1 else f"every {every}{'nd' if every == 2 else 'th'} decoder layer"
        warnings.warn(f"step {step + 1} ran out of device memory: gradient checkpointing is now on for {which} "
                      f"for the rest of this run (slower, less memory); --gradient-checkpointing {every} starts "
                      f"there", RuntimeWarning, stacklevel=3)


def embed_in_batches(backbone, embed: Callable[[Sequence[int]], Tensor], order: Sequence[int], batch_size: int,
                     merge: bool, on_rows: Callable[[int], None] = lambda n: None,
                     what: str = "prompts", too_large: Callable[[int], str] = lambda row: "") -> list[Tensor]:
    """``embed(rows)`` over ``order`` in batches of ``batch_size`` -> the batches' outputs in order;
    with each LoRA update of ``backbone`` merged into its weight meanwhile where ``merge``
    (:meth:`~vlm2rec_lab.accel.engine.SpeedEngine.merged_adapters`). Where a batch runs out of
    device memory it is redone, and the rest embedded, first without the merged weights (their
    copies take memory), then in batches half as large, down to one row (a warning says so; a row's
    output must not depend on its batch). Out of memory with one row a batch is an error naming
    ``too_large(row)``; other errors pass through. ``on_rows(n)`` follows progress."""
    parts: list[Tensor] = []
    done, bs = 0, batch_size
    while done < len(order):
        failed = None
        try:
            with backbone.engine.merged_adapters() if merge else nullcontext():
                while done < len(order):
                    rows = order[done:done + bs]
                    parts.append(embed(rows))
                    done += len(rows)
                    on_rows(len(rows))
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not out_of_memory(e):
                raise
            if not merge and bs == 1:
                raise torch.OutOfMemoryError(
                    f"embedding {what}: out of device memory with one prompt a batch ({too_large(order[done])}): use a "
                    f"device with more memory, or smaller images (fewer visual tokens)") from e
            failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if failed is None:
            break
        # out of memory: outside the handler, which held the failed batch's tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if merge:
            merge = False
            log.warning("embedding %s ran out of memory with the adapters merged (%s): going on unmerged", what, failed)
        else:
            bs = max(1, bs // 2)
            log.warning("embedding %s ran out of memory (%s): going on in batches of %d", what, failed, bs)
    return parts
