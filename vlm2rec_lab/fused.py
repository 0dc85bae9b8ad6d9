"""Fewer passes over memory and faster kernels on the project's compute path (``Backbone.compute``):
module forwards swapped in for the duration of a forward, each the same function as the one it
stands in for.

**LoRA.** PEFT computes a LoRA linear layer as ``base(x) + B(A(dropout(x))) * s``: after the base product, one
full-size output for ``B``'s product, one pass to scale it and one to add it, and the backward pass
scales the full-size gradient once more. Here ``y = addmm(base(x), A(dropout(x)), Bᵀ, alpha=s)``: the
scaling rides on the small product and the addition happens in the matrix product's epilogue, so
the only full-size tensor written is ``y``. The same function of ``x`` and the weights (tested
against PEFT's forward, values and gradients); on an H100 it removes several memory passes over the
(tokens x out_features) activations of each adapted projection, forward and backward.

**Merged adapters, without gradients.** When nothing needs a gradient and no dropout draws masks
(embedding items and histories with a trained adapter), the update is folded into the weight once,
``W' = W + s·B·A`` (fp32 arithmetic, the base weight's dtype; :func:`merged_weight`), and each
forward is one product with ``W'`` (:func:`merged_forward`): no rank-r products, no second pass
over the (tokens x out_features) output and no casts of the adapter's fp32 weights, per projection
and per forward. ``Backbone.merged_adapters`` makes the merged weights for the duration of an
embedding run beside the originals (which stay untouched), as PEFT's ``merge_adapter`` would
without its rounding back on ``unmerge``. In fp32 the same numbers up to rounding; in bf16 ``W'``
is rounded once to the weight's precision, as any merged checkpoint is.

Layers PEFT configures beyond plain LoRA (DoRA and other variants, several active adapters, merged
weights, LoRA bias, per-call adapter names) keep PEFT's own forward.

**RMSNorm.** Hugging Face's RMSNorm upcasts to fp32 and normalizes in about seven elementwise kernels
(copy, square, mean, add, rsqrt, multiply, cast) before the weight; ``torch.nn.functional.rms_norm``
does the same arithmetic (fp32 inside, the input's dtype out) in one fused kernel on a GPU. A norm
is swapped only after a probe shows it computes exactly that (variants such as Gemma's
``1 + weight`` fail the probe and stay as they are).

**Patch embedding.** Qwen's vision towers cut an image into patches and project each with a
``Conv3d`` whose stride equals its kernel: no overlap, so the convolution is one matrix product of
the flattened patches with the flattened kernel. cuDNN runs such a convolution through a generic
(im2col) algorithm that is many times slower than the GEMM for some GPU, dtype and version
combinations (transformers issue #45750, sglang PR #21014); ``F.linear`` always takes the GEMM.
"""
from __future__ import annotations

from types import MethodType

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from peft.tuners.lora.layer import Linear as LoraLinear


def fusable(layer: nn.Module) -> bool:
    """Whether ``layer`` is a plain PEFT LoRA ``Linear`` (one active adapter, no variant, unmerged)."""
    if type(layer) is not LoraLinear or not isinstance(layer.get_base_layer(), nn.Linear):
        return False
    active = layer.active_adapters
    return (len(active) == 1 and active[0] in layer.lora_A and active[0] not in getattr(layer, "lora_variant", {})
            and not layer.merged and not layer.disable_adapters and layer.lora_B[active[0]].bias is None)


def fused_forward(layer: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """``base(x) + s * B(A(dropout(x)))`` as one ``addmm`` onto the base output. Falls back to PEFT's
    forward for extra arguments, for anything but one plain active adapter (checked each call:
    adapters can be switched, merged or disabled after the layer was found fusable), and where the
    input's dtype differs from the adapter's outside autocast (PEFT casts there)."""
    if args or kwargs or not fusable(layer):
        return type(layer).forward(layer, x, *args, **kwargs)
    name = layer.active_adapters[0]
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if x.dtype != lora_a.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return type(layer).forward(layer, x)
    out = layer.base_layer(x)
    u = F.linear(layer.lora_dropout[name](x), lora_a.weight)
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), u.reshape(-1, u.shape[-1]), lora_b.weight.t(),
                       alpha=layer.scaling[name])
    return flat.view(out.shape)


def mergeable(layer: nn.Module) -> bool:
    """Whether ``layer`` is :func:`fusable` with its dropout drawing no masks (evaluation mode or p = 0),
    so that its forward is ``x·(W + s·BA)ᵀ + bias`` exactly."""
    if not fusable(layer):
        return False
    drop = layer.lora_dropout[layer.active_adapters[0]]
    return isinstance(drop, nn.Identity) or not drop.training or getattr(drop, "p", 1.0) == 0


MERGED = "_vlm2rec_merged"  # where Backbone.merged_adapters keeps a layer's (adapter, scaling, merged weight)


@torch.no_grad()
def merged_weight(layer: nn.Module) -> tuple[str, float, Tensor]:
    """(active adapter, its scaling, ``W + s·B·A``) of a :func:`fusable` layer: the weight computed in
    fp32 and returned in ``W``'s dtype on its device (a new tensor; the layer is left as it is)."""
    name = layer.active_adapters[0]
    w = layer.get_base_layer().weight
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    s = layer.scaling[name]
    return name, s, torch.addmm(w.float(), b.float(), a.float(), alpha=s).to(w.dtype)


def merged_forward(layer: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """``x·W'ᵀ + bias`` with the merged weight ``Backbone.merged_adapters`` made for ``layer``. Falls
    back to :func:`fused_forward` where a gradient is wanted, where the layer no longer merges
    (dropout drawing masks, adapters disabled), where the active adapter or its scaling is no longer
    the one merged (checked each call), or where there is no merged weight. The adapter's weights
    themselves are not compared: they must not change while the merged weight is in use."""
    merged = layer.__dict__.get(MERGED)
    if merged is None or args or kwargs or torch.is_grad_enabled() or not mergeable(layer):
        return fused_forward(layer, x, *args, **kwargs)
    name, s, w = merged
    if layer.active_adapters[0] != name or layer.scaling[name] != s:
        return fused_forward(layer, x)
    return F.linear(x, w, layer.get_base_layer().bias)


def rms_norm_forward(norm: nn.Module, x: Tensor) -> Tensor:
    """``weight * rms_norm(x)`` with the normalization in fp32 and its result in ``x``'s dtype, as
    Hugging Face's RMSNorm computes it (autocast kept out: it would change the output dtype)."""
    with torch.autocast(x.device.type, enabled=False):
        return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=norm.variance_epsilon)


@torch.no_grad()
def is_plain_rms_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` computes :func:`rms_norm_forward`'s function: checked on a probe input."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None)
    if not type(norm).__name__.endswith("RMSNorm") or not isinstance(weight, Tensor) or weight.dim() != 1 \
            or not isinstance(eps, float):
        return False
    try:  # a norm that cannot take the probe (offloaded or meta weights, say) is left alone
        x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype) * 3
        want, got = norm(x), rms_norm_forward(norm, x)
        return want.dtype == got.dtype and bool(torch.allclose(want.float(), got.float(), rtol=1e-2, atol=1e-3))
    except Exception:  # noqa: BLE001
        return False


def patch_embed_forward(embed: nn.Module, x: Tensor) -> Tensor:
    """(patches, channels x frames x height x width) -> (patches, embed_dim): the non-overlapping
    ``Conv3d`` as ``F.linear`` with its kernel flattened in the same (C, T, H, W) order."""
    w = embed.proj.weight
    return F.linear(x.reshape(-1, w[0].numel()).to(w.dtype), w.reshape(w.shape[0], -1), embed.proj.bias)


@torch.no_grad()
def is_plain_patch_embed(embed: nn.Module) -> bool:
    """Whether ``embed`` projects flattened patches with a non-overlapping ``Conv3d`` (stride =
    kernel, no padding, dilation or groups), checked against its own forward on a probe input."""
    proj = getattr(embed, "proj", None)
    if not type(embed).__name__.endswith("PatchEmbed") or not isinstance(proj, nn.Conv3d):
        return False
    if not (proj.stride == proj.kernel_size and proj.padding == (0, 0, 0) and proj.dilation == (1, 1, 1)
            and proj.groups == 1 and isinstance(proj.weight, Tensor) and proj.weight.device.type != "meta"):
        return False
    try:
        x = torch.randn(3, proj.weight[0].numel(), generator=torch.Generator().manual_seed(0))
        x = x.to(proj.weight.device, proj.weight.dtype)
        want, got = embed(x), patch_embed_forward(embed, x)
        return want.shape == got.shape and want.dtype == got.dtype and \
            bool(torch.allclose(want.float(), got.float(), rtol=2e-2, atol=2e-2))
    except Exception:  # noqa: BLE001  (a module of this name that takes other inputs)
        return False


def fused_forwards(model: nn.Module) -> list[tuple[nn.Module, MethodType]]:
    """(module, forward) for every module of ``model`` that has a fused stand-in: plain LoRA layers
    (:func:`fused_forward`), plain RMSNorms (:func:`rms_norm_forward`) and non-overlapping patch
    embeddings (:func:`patch_embed_forward`). Each forward is bound once as a method: compiled
    graphs guard on a module's ``forward`` by its code, the same for every layer, so the swap
    costs no recompilation."""
    out = []
    for m in model.modules():
        if fusable(m):
            out.append((m, MethodType(fused_forward, m)))
        elif is_plain_rms_norm(m):
            out.append((m, MethodType(rms_norm_forward, m)))
        elif is_plain_patch_embed(m):
            out.append((m, MethodType(patch_embed_forward, m)))
    return out
