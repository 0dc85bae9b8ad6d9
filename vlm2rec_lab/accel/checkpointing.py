"""Gradient checkpointing of the language model's decoder layers that works with the compute path:
each recomputation in the backward pass re-enters the state its forward ran in (stand-ins, PEFT's
input casting, a packed forward's attention and shared prefixes). Hugging Face's
``activation_checkpointing_enable`` does not set that up: a packed forward's backward then fails
with a ``CheckpointError``.
"""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from functools import partial

from torch import nn


def enable_checkpointing(backbone, every: int = 1) -> None:
    """Recompute the activations of every ``every``-th decoder layer of ``backbone``'s language
    model in the backward pass instead of keeping them (non-reentrant): less memory for more
    compute in those layers (``every`` > 1 trades part of the saving back for speed)."""
    from torch.utils.checkpoint import checkpoint

    if every < 1:
        raise ValueError(f"checkpoint every {every}-th layer: need at least 1")
    for i, layer in enumerate(backbone.decoder_layers()):
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False,
                                                     context_fn=partial(_contexts, backbone, layer))
        layer.gradient_checkpointing = i % every == 0
    backbone.engine.checkpoint_stride = every


def checkpointed_every(backbone) -> int:
    """Every how many decoder layers one is checkpointed (:func:`enable_checkpointing`); 0: off.
    (Read from the layers, should something else have switched their checkpointing.)"""
    flags = [bool(getattr(layer, "gradient_checkpointing", False)) for layer in backbone.decoder_layers()]
    if not any(flags):
        return 0
    stride = backbone.engine.checkpoint_stride
    if flags == [i % stride == 0 for i in range(len(flags))]:
        return stride
    on = [i for i, f in enumerate(flags) if f]
    return on[1] - on[0] if len(on) > 1 else len(flags)


def _contexts(backbone, layer: nn.Module) -> tuple:
    """``torch.utils.checkpoint``'s ``context_fn`` for ``layer``, called as its forward starts: the
    forward runs as it is; its recomputation (outside the compute path and the packed forward by
    then) re-enters the state this forward runs in. Checkpointing itself restores autocast and the
    random state, so the recomputation draws the same dropout masks."""
    from .attention import packed_state

    engine = backbone.engine
    return nullcontext(), LayerReplay(engine, layer, engine.computing, engine.skip_input_cast, packed_state())


class LayerReplay:
    """The state a checkpointed layer's forward ran in, re-entered around each recomputation of it.
    Re-enterable: a layer is recomputed once per backward pass through it, three times in a step
    with the gradient-cosine probe (two gradient passes that keep the graph, then the step's)."""

    def __init__(self, engine, layer: nn.Module, computing: bool, skip_input_cast: bool, packed: tuple | None):
        self.engine, self.layer, self.computing, self.skip_input_cast, self.packed = engine, layer, computing, skip_input_cast, packed
        self._open: list[ExitStack] = []

    def __enter__(self):
        from .attention import packed_language_model, packed_state

        stack = ExitStack()
        try:
            if self.computing and not self.engine.computing:
                stack.enter_context(self.engine.stand_ins(self.skip_input_cast, within=self.layer))
            if self.packed is not None and packed_state() is None:
                stack.enter_context(packed_language_model(*self.packed))
        except BaseException:
            stack.close()
            raise
        self._open.append(stack)
        return self

    def __exit__(self, *exc) -> bool:
        return self._open.pop().__exit__(*exc)
