"""LoRA's update folded into the matrix product that adds it (the project's compute path).

PEFT computes a LoRA linear layer as ``base(x) + B(A(dropout(x))) * s``: after the base product, one
full-size output for ``B``'s product, one pass to scale it and one to add it, and the backward pass
scales the full-size gradient once more. Here ``y = addmm(base(x), A(dropout(x)), Bᵀ, alpha=s)``: the
scaling rides on the small product and the addition happens in the matrix product's epilogue, so
the only full-size tensor written is ``y``. The same function of ``x`` and the weights (tested
against PEFT's forward, values and gradients); on an H100 it removes several memory passes over the
(tokens x out_features) activations of each adapted projection, forward and backward.

Layers PEFT configures beyond plain LoRA (DoRA and other variants, several active adapters, merged
weights, LoRA bias, per-call adapter names) keep PEFT's own forward.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def fusable(layer: nn.Module) -> bool:
    """Whether ``layer`` is a plain PEFT LoRA ``Linear`` (one active adapter, no variant, unmerged)."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return False
    if type(layer) is not Linear or not isinstance(layer.get_base_layer(), nn.Linear):
        return False
    active = list(layer.active_adapters)
    return (len(active) == 1 and active[0] in layer.lora_A and active[0] not in getattr(layer, "lora_variant", {})
            and not layer.merged and not layer.disable_adapters and layer.lora_B[active[0]].bias is None)


def fused_forward(layer: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """``base(x) + s * B(A(dropout(x)))`` as one ``addmm`` onto the base output. Falls back to PEFT's
    forward for extra arguments, merged or disabled adapters, and where the input's dtype differs
    from the adapter's outside autocast (PEFT casts there)."""
    name = layer.active_adapters[0]
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if (args or kwargs or layer.merged or layer.disable_adapters
            or (x.dtype != lora_a.weight.dtype and not torch.is_autocast_enabled(x.device.type))):
        return type(layer).forward(layer, x, *args, **kwargs)
    out = layer.base_layer(x)
    u = F.linear(layer.lora_dropout[name](x), lora_a.weight)
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), u.reshape(-1, u.shape[-1]), lora_b.weight.t(),
                       alpha=layer.scaling[name])
    return flat.view(out.shape)


def fused_forwards(layers: list[nn.Module]) -> list:
    """Per tuner layer: a bound :func:`fused_forward` (made once, so compiled graphs that guard on
    the module's ``forward`` see the same object every call), or None where PEFT's forward stays."""
    return [partial(fused_forward, m) if fusable(m) else None for m in layers]
