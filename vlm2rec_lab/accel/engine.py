"""A backbone's compute path: the fused stand-ins of :mod:`~vlm2rec_lab.accel.fused` swapped in
around a forward, autocast to a low-precision model's dtype on a GPU, and LoRA updates merged into
their weights for forwards without gradients. With ``fused`` off the plain Hugging Face / PEFT
forward runs (and casts) as it is.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MethodType

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class FusedModules:
    """What the compute path swaps, found once per model (LoRA wraps the model anew: found again)."""

    model: nn.Module  # the model they were found in
    tuners: list  # PEFT's tuner layers (their input casting switched off under autocast)
    swaps: list  # (module, fused forward) pairs, swapped in for the module's own forward
    dropouts: list  # the model's dropout layers
    per_layer: dict = field(default_factory=dict)  # id(decoder layer) -> (tuners, swaps) within it


class SpeedEngine:
    """The compute path of one :class:`~vlm2rec_lab.backbones.Backbone` and the state of its
    speed switches (``backbone.engine``).

    Args:
        backbone: the backbone whose model it swaps stand-ins into.

    ``fused``: stand-ins, autocast and merged adapters on (False: the plain path); the
    :class:`~vlm2rec_lab.encoder.Encoder` sets it from ``SpeedConfig.fused``.
    """

    def __init__(self, backbone):
        self.backbone = backbone
        self.fused = True
        self.computing = False  # inside compute()
        self.skip_input_cast = False  # PEFT's input casting off in the current compute()
        self.checkpoint_stride = 1  # see accel.checkpointing.enable_checkpointing
        self.compiled_blocks: list[nn.Module] = []  # what accel.compile.compile_layers compiled
        self._found: FusedModules | None = None

    def modules(self) -> FusedModules:
        """The model's PEFT tuner layers, the (module, fused forward) swaps of
        :func:`~vlm2rec_lab.accel.fused.fused_forwards` and its dropout layers, found once per model."""
        model = self.backbone.model
        if self._found is None or self._found.model is not model:
            from peft.tuners.tuners_utils import BaseTunerLayer

            from .fused import fused_forwards, read_rows_forward
            from .packing import can_pack

            tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
            dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
            swaps = fused_forwards(model)
            last = self.backbone.decoder_layers()[-1] if can_pack(self.backbone) else None
            if isinstance(getattr(last, "mlp", None), nn.Module):  # packed forwards read a few final hidden states
                swaps.append((last.mlp, MethodType(read_rows_forward, last.mlp)))
            self._found = FusedModules(model, tuners, swaps, dropouts)
        return self._found

    def forget(self) -> None:
        """Find the swaps again at the next forward (after LoRA went into the model in place)."""
        self._found = None

    @property
    def dropout_active(self) -> bool:
        """Whether a forward now draws dropout masks (a dropout layer with p > 0 in training mode,
        e.g. LoRA's dropout while training)."""
        return any(m.training and m.p > 0 for m in self.modules().dropouts)

    @contextmanager
    def compute(self, autocast: bool = True):
        """The compute path around a forward: fused stand-ins for LoRA layers (the update added
        inside one matrix product), RMSNorms (one kernel) and the vision tower's patch embedding (a
        GEMM, not a Conv3d); and, where a low-precision model runs on a GPU (and ``autocast``),
        autocast to its dtype with PEFT's input casting off, so LoRA's small matrices take bf16
        activations as they are (fp32 master weights kept) instead of copying every activation to
        fp32 and back. Off with ``fused=False``. A checkpointed layer's recomputation re-enters it
        (:mod:`~vlm2rec_lab.accel.checkpointing`)."""
        if self.computing or not self.fused:
            yield  # (nested: the outer context has set things up)
            return
        backbone = self.backbone
        autocast = autocast and backbone.device.type == "cuda" and backbone.dtype in (torch.bfloat16, torch.float16)
        self.skip_input_cast = autocast
        with self.stand_ins(skip_input_cast=autocast):
            if autocast:
                with torch.autocast("cuda", dtype=backbone.dtype):
                    yield
            else:
                yield

    @contextmanager
    def stand_ins(self, skip_input_cast: bool, within: nn.Module | None = None):
        """The fused stand-ins swapped in (for the modules inside ``within``, or all), and with
        ``skip_input_cast`` PEFT's input casting off; everything put back afterwards."""
        found = self.modules()
        tuners, swaps = found.tuners, found.swaps
        if within is not None:
            if id(within) not in found.per_layer:
                inside = set(map(id, within.modules()))
                found.per_layer[id(within)] = ([m for m in tuners if id(m) in inside],
                                               [(m, f) for m, f in swaps if id(m) in inside])
            tuners, swaps = found.per_layer[id(within)]
        saved = [m.__dict__.get("forward") for m, _ in swaps]  # a hook's own forward, say: put back after
        for m, forward in swaps:
            m.forward = forward
        if skip_input_cast:
            for m in tuners:
                m.cast_input_dtype_enabled = False
        self.computing = True
        try:
            yield
        finally:
            self.computing = False
            for (m, _), before in zip(swaps, saved):
                if before is None:
                    del m.forward
                else:
                    m.forward = before
            for m in tuners:
                m.cast_input_dtype_enabled = True

    @contextmanager
    def replaced(self, pick, make):
        """Within: each swap ``(module, forward)`` that ``pick`` accepts becomes ``make(module,
        forward)`` (None: that module runs its own forward); the swaps as before afterwards."""
        found = self.modules()
        kept = list(found.swaps)
        changed = [(m, make(m, f)) if pick(m, f) else (m, f) for m, f in kept]
        found.swaps[:] = [(m, f) for m, f in changed if f is not None]
        found.per_layer.clear()
        try:
            yield sum(pick(m, f) for m, f in kept)
        finally:
            found.swaps[:] = kept
            found.per_layer.clear()

    def without(self, forward):
        """The compute path without one of its stand-ins (``forward``, a function of
        :mod:`~vlm2rec_lab.accel.fused`): the modules it stands in for run their own forward
        inside. Yields how many were left out."""
        return self.replaced(lambda m, f: getattr(f, "__func__", None) is forward, lambda m, f: None)

    @contextmanager
    def merged_adapters(self, budget_bytes: int | None = None):
        """For forwards without gradients inside: each plain LoRA layer whose dropout draws no masks
        computes with its update merged into the weight, ``W + s·B·A`` made once on entry
        (:func:`~vlm2rec_lab.accel.fused.merged_weight`) and dropped on exit; the layer's own weights
        are never touched. The adapters must not change inside. Forwards that want a gradient, and
        layers that stop merging (training mode with dropout, adapters switched), keep the fused
        LoRA forward. The merged weights take as much memory as the adapted base weights: where
        that does not fit in ``budget_bytes`` (default: on a CUDA device, its free memory less a
        margin for the forwards; on other devices no limit) nothing is merged. Off with
        ``fused=False``. Yields the number of layers merged."""
        from .fused import MERGED, fused_forward, merged_forward, merged_weight, mergeable

        if not self.fused or self.computing:
            yield 0
            return
        swaps = self.modules().swaps
        picked = [m for m, f in swaps if f.__func__ is fused_forward and mergeable(m)]
        need = sum(m.get_base_layer().weight.nbytes for m in picked)
        device = self.backbone.device
        if budget_bytes is None and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget_bytes = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) - 4 * 2**30
        if not picked or (budget_bytes is not None and need > budget_bytes):
            if picked:
                log.info("%s: adapters not merged for embedding: %.1f GiB needed, %.1f GiB to spare",
                         self.backbone.name, need / 2**30, max(budget_bytes, 0) / 2**30)
            yield 0
            return

        def merge(m, forward):
            m.__dict__[MERGED] = merged_weight(m)
            return MethodType(merged_forward, m)

        chosen = set(map(id, picked))
        try:
            with self.replaced(lambda m, f: id(m) in chosen, merge) as n:
                yield n
        finally:
            for m in picked:
                m.__dict__.pop(MERGED, None)
