"""Fewer passes over memory and faster kernels on the project's compute path (``SpeedEngine.compute``):
module forwards swapped in for the duration of a forward, each the same function as the one it
stands in for.

**LoRA.** PEFT computes a LoRA linear layer as ``base(x) + B(A(dropout(x))) * s``: after the base product, one
full-size output for ``B``'s product, one pass to scale it and one to add it, and the backward pass
scales the full-size gradient once more. Here ``y = addmm(base(x), A(dropout(x)), Bᵀ, alpha=s)``: the
scaling rides on the small product and the addition happens in the matrix product's epilogue, so
the only full-size tensor written is ``y``. The same function of ``x`` and the weights (tested
against PEFT's forward, values and gradients); it removes several memory passes over the
(tokens x out_features) activations of each adapted projection, forward and backward.

**Merged adapters, without gradients.** When nothing needs a gradient and no dropout draws masks
(embedding items and histories with a trained adapter), the update is folded into the weight once,
``W' = W + s·B·A`` (fp32 arithmetic, the base weight's dtype; :func:`merged_weight`), and each
forward is one product with ``W'`` (:func:`merged_forward`): no rank-r products, no second pass
over the (tokens x out_features) output and no casts of the adapter's fp32 weights, per projection
and per forward. ``SpeedEngine.merged_adapters`` makes the merged weights for the duration of an
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
(im2col) algorithm that is slower than the GEMM for some GPU, dtype and version
combinations (transformers issue #45750, sglang PR #21014); ``F.linear`` always takes the GEMM.

**Vision rotary.** Qwen's vision attention rotates queries and keys with Hugging Face's
``apply_rotary_pos_emb_vision``: both copied to fp32, ``rotate_half`` (a negation and a
concatenation), two products, a sum and a cast back. :func:`rotary` computes the same
``x·cos + rotate_half(x)·sin`` half by half into one output of x's dtype: a product and a
multiply-add per half, the arithmetic in fp32 inside each kernel. In fp32 the same
numbers; in bf16 the half's product is rounded once before the multiply-add (HF rounds once at the
end), an error of at most a few units in bf16's last place (``bench/vision_traffic.py`` counts
the memory traffic). :func:`vision_attention_forward` is that attention with this
rotary, swapped in only where the tower attends through the project's varlen function and after a
probe shows it computes the module's own function.

**The last layer's MLP on the rows read.** A packed forward reads one final hidden state per
prompt, its last token's (:func:`~vlm2rec_lab.accel.packing.forward_packed`); the last decoder layer's MLP output of
every other token flows only into hidden states nobody reads. :func:`read_rows_forward` computes
that MLP on the rows read and zero elsewhere: the same numbers where they are read.
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


MERGED = "_vlm2rec_merged"  # where SpeedEngine.merged_adapters keeps a layer's (adapter, scaling, merged weight)


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
    """``x·W'ᵀ + bias`` with the merged weight ``SpeedEngine.merged_adapters`` made for ``layer``. Falls
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


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x·cos + rotate_half(x)·sin`` (rotary position embedding, ``rotate_half(x) = [-x₂, x₁]``)
    in ``x``'s dtype, written half by half: ``[x₁·cos₁ − x₂·sin₁, x₂·cos₂ + x₁·sin₂]``. ``x``: (..., d),
    any strides (a view of a fused qkv output); ``cos``/``sin`` broadcast against it, in any float
    dtype (fp32 from the rotary module: the products are computed in fp32 and rounded to ``x``'s
    dtype). Four elementwise kernels, no fp32 copy of ``x``. Inside a compiled graph, where a
    gradient is wanted (kernels writing into an output take neither), and where ``cos``/``sin``
    broadcast ``x`` to a larger shape, the same halves as one expression rounded once (which a
    compiler fuses into one kernel)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    if (torch.compiler.is_compiling() or torch.broadcast_shapes(x.shape, cos.shape, sin.shape) != x.shape
            or (torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad))):
        return torch.cat((x1 * cos[..., :h] - x2 * sin[..., :h], x2 * cos[..., h:] + x1 * sin[..., h:]), -1).to(x.dtype)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x1, cos[..., :h], out=out[..., :h]).addcmul_(x2, sin[..., :h], value=-1)
    torch.mul(x2, cos[..., h:], out=out[..., h:]).addcmul_(x1, sin[..., h:])
    return out


def vision_attention_forward(attn: nn.Module, hidden_states: Tensor, cu_seqlens: Tensor,
                             position_embeddings: tuple[Tensor, Tensor] | None = None, max_seqlen: int | None = None,
                             **kwargs) -> Tensor:
    """Qwen2/2.5-VL's vision attention (fused qkv, rotary, attention within ``cu_seqlens``'s
    segments, output projection) with :func:`rotary`, attending through the project's varlen
    function. Falls back to the module's own forward where the tower attends otherwise (SDPA per
    window, flash-attn: checked each call, as :func:`~vlm2rec_lab.accel.attention.set_vision_attention`
    switches it), without position embeddings, or with attention dropout in training."""
    from .attention import NAME, varlen_attention_forward

    if (position_embeddings is None or getattr(attn.config, "_attn_implementation", None) != NAME
            or (attn.training and getattr(attn, "attention_dropout", 0.0))):
        return type(attn).forward(attn, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                  max_seqlen=max_seqlen, **kwargs)
    n = hidden_states.shape[0]
    q, k, v = attn.qkv(hidden_states).reshape(n, 3, attn.num_heads, -1).unbind(1)  # (tokens, heads, dim) views
    cos, sin = (t.unsqueeze(-2) for t in position_embeddings)
    q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    out, _ = varlen_attention_forward(attn, *(t.transpose(0, 1)[None] for t in (q, k, v)), scaling=attn.scaling,
                                      cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, is_causal=False, **kwargs)
    return attn.proj(out.reshape(n, -1))


@torch.no_grad()
def is_plain_vision_attention(attn: nn.Module) -> bool:
    """Whether ``attn`` is a vision attention that :func:`vision_attention_forward` stands in for:
    its structure (``qkv`` and ``proj`` linear layers, ``num_heads``, ``scaling``), then its own
    forward against the stand-in's on a probe input of two segments with random rotary angles,
    both attending through the varlen function."""
    from .attention import NAME, plans_kept, register_varlen

    qkv, proj, heads = getattr(attn, "qkv", None), getattr(attn, "proj", None), getattr(attn, "num_heads", None)
    cfg = getattr(attn, "config", None)
    if not (type(attn).__name__.endswith("VisionAttention") and isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
            and isinstance(heads, int) and isinstance(getattr(attn, "scaling", None), float) and cfg is not None
            and qkv.out_features == 3 * qkv.in_features and qkv.weight.device.type != "meta"):
        return False
    before = getattr(cfg, "_attn_implementation", None)
    try:
        with plans_kept():  # (the probe's attention plan must not push out plans primed for a forward)
            register_varlen()
            cfg._attn_implementation = NAME
            g = torch.Generator().manual_seed(0)
            dim, n = qkv.in_features // heads, 6
            w = qkv.weight
            x = torch.randn(n, qkv.in_features, generator=g).to(w.device, w.dtype)
            angles = torch.randn(n, dim, generator=g).to(w.device) * 3
            cu = torch.tensor([0, 2, n], dtype=torch.int32, device=w.device)
            pe = (angles.cos(), angles.sin())
            want = type(attn).forward(attn, x, cu, position_embeddings=pe, max_seqlen=4)
            got = vision_attention_forward(attn, x, cu, position_embeddings=pe, max_seqlen=4)
        tol = 1e-4 if w.dtype == torch.float32 else 2e-2
        return want.shape == got.shape and want.dtype == got.dtype and \
            bool(torch.allclose(want.float(), got.float(), rtol=tol, atol=tol * float(want.float().abs().max())))
    except Exception:  # noqa: BLE001  (an attention of this name that takes other inputs)
        return False
    finally:
        cfg._attn_implementation = before


@torch.compiler.disable  # (eager: the row count, which varies, never enters a compiled graph)
def read_rows_forward(mlp: nn.Module, x: Tensor) -> Tensor:
    """The last decoder layer's MLP inside a packed forward: computed on the rows whose final
    hidden states are read (:func:`~vlm2rec_lab.accel.attention.packed_rows`, each prompt's last token)
    and zero on the others, whose final hidden states nobody reads (the residual stream passes them
    on unchanged). The rows read get exactly the MLP's output; the MLP's matrix work is skipped for
    all tokens but a few. Outside a packed forward (``x`` not one
    packed row, or no rows given) the module's own forward. In a compiled layer it runs eagerly, in
    a graph break: a few rows' products gain nothing from compiling, and a graph would specialise
    on their count."""
    from .attention import packed_rows

    rows = packed_rows()
    if rows is None or x.dim() != 3 or x.shape[0] != 1:
        return type(mlp).forward(mlp, x)
    return torch.zeros_like(x).index_copy(1, rows, type(mlp).forward(mlp, x.index_select(1, rows)))


def fused_forwards(model: nn.Module) -> list[tuple[nn.Module, MethodType]]:
    """(module, forward) for every module of ``model`` that has a fused stand-in: plain LoRA layers
    (:func:`fused_forward`), plain RMSNorms (:func:`rms_norm_forward`), non-overlapping patch
    embeddings (:func:`patch_embed_forward`) and Qwen's vision attention
    (:func:`vision_attention_forward`); ``SpeedEngine.modules`` adds the last layer's MLP
    (:func:`read_rows_forward`). Each forward is bound once as a method: compiled graphs guard on a
    module's ``forward`` by its code, the same for every layer, so the swap costs no recompilation."""
    out = []
    for m in model.modules():
        if fusable(m):
            out.append((m, MethodType(fused_forward, m)))
        elif is_plain_rms_norm(m):
            out.append((m, MethodType(rms_norm_forward, m)))
        elif is_plain_patch_embed(m):
            out.append((m, MethodType(patch_embed_forward, m)))
        elif is_plain_vision_attention(m):
            out.append((m, MethodType(vision_attention_forward, m)))
    return out
