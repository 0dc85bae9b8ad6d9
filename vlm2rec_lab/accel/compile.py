"""``torch.compile`` for a backbone's blocks: compiling and uncompiling them in place, choosing the
backend for a run (``SpeedConfig.compile``), and telling the compiler's errors from others (a step
that fails in the compiler is redone eagerly, :mod:`~vlm2rec_lab.accel.recovery`).
"""
from __future__ import annotations

import traceback

from .checkpointing import checkpointed_every

# the bounds of `--compile auto` (compile_backend): where compiling the first step pays for itself
COMPILE_AUTO_MIN_STEPS = 2000
COMPILE_AUTO_MIN_PARAMS = 10**9


def compile_layers(backbone, backend: str = "inductor", vision: bool = False, retained_backward: bool = False) -> int:
    """``torch.compile`` each decoder layer of ``backbone``'s language model in place (dynamic
    shapes, so packed steps of varying length reuse the graphs), and with ``vision`` each vision
    block too: fuses the elementwise work around the matrix products (norms, rotary, SiLU, LoRA
    scaling). The vision tower then attends through the varlen function: its per-segment path is a
    Python loop over the images that a compiled block unrolls, one graph per image count.
    ``retained_backward``: a graph's backward may run more than once (``retain_graph=True``, as the
    gradient-cosine probe's passes do), which AOTAutograd's donated buffers forbid: they are turned
    off, process-wide (``torch._functorch.config.donated_buffer``), for the graphs compiled from
    then on. Call after LoRA is applied. Returns the number of blocks compiled."""
    from ..backbones import unwrap
    from .attention import set_vision_attention

    if retained_backward:
        import torch._functorch.config

        if hasattr(torch._functorch.config, "donated_buffer"):  # (torch 2.5+)
            torch._functorch.config.donated_buffer = False
    layers = backbone.decoder_layers()
    if vision:
        visual = getattr(unwrap(backbone.model), "visual", None)
        if visual is None:
            raise ValueError(f"{backbone.name}: no vision tower to compile")
        set_vision_attention(backbone.model, varlen=True)
        layers += list(visual.blocks)
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
        backbone.engine.compiled_blocks.append(layer)
    return len(layers)


def uncompile_layers(backbone) -> int:
    """The blocks :func:`compile_layers` compiled run their own forward again (the vision
    attention's setting and the donated buffers stay as it left them). Returns how many."""
    engine = backbone.engine
    compiled, engine.compiled_blocks = engine.compiled_blocks, []
    for block in compiled:
        block._compiled_call_impl = None  # (what nn.Module.compile set; __call__ then takes the module's own path)
    return len(compiled)


def compile_backend(setting: bool | str | None, backbone, steps: int) -> str | None:
    """The ``torch.compile`` backend for a run's decoder layers, or None. ``setting`` is
    ``SpeedConfig.compile``: True is inductor, False none, a string that backend, and None ("auto")
    inductor on a CUDA device, for a model of at least :data:`COMPILE_AUTO_MIN_PARAMS` parameters
    and a run of at least :data:`COMPILE_AUTO_MIN_STEPS` optimizer steps (``steps``), unless every
    decoder layer is checkpointed (a checkpointed layer runs uncompiled)."""
    if setting is None:
        big = sum(p.numel() for p in backbone.model.parameters()) >= COMPILE_AUTO_MIN_PARAMS
        every_layer = checkpointed_every(backbone) == 1
        pays = backbone.device.type == "cuda" and big and steps >= COMPILE_AUTO_MIN_STEPS and not every_layer
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
