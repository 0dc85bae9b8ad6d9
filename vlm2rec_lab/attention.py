"""Variable-length attention without flash-attn: one batched SDPA per segment length instead of one
call per segment, for the vision tower's windows and for packed language-model prompts.

Qwen2.5-VL's vision tower attends within windows (and, in a few layers, within whole images), each
a segment of the flattened patch sequence given by ``cu_seqlens``. Without flash-attn, Hugging Face
calls SDPA once per segment: for a batch of 256 images of 224 px that is 1,024 window calls per layer,
and the vision tower runs at a few percent of the GPU's peak. Segments of equal length (all windows of
same-size images) stack into one batch; :func:`varlen_sdpa` does that, grouping by length, so the
result is the same attention, computed in one kernel per distinct length. The same function, causal,
serves prompts packed into one sequence (:func:`packed_language_model`,
``Backbone.forward_packed``); :func:`set_varlen_kernel` can hand both to PyTorch's own
variable-length flash kernel instead.

It is registered with transformers' ``AttentionInterface`` under :data:`NAME` (the name contains
"flash" so that transformers passes ``cu_seqlens`` to it). It is set on the *vision* config (on a
GPU), and on the language model's config only inside :func:`packed_language_model`.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.nn import functional as F

NAME = "sdpa_flash_varlen"  # "flash" in the name: transformers then hands over cu_seqlens


def segment_groups(cu_seqlens: Tensor) -> list[tuple[int, Tensor | None, int]]:
    """``cu_seqlens`` -> [(length, token index or None, count)] per distinct segment length. The index
    lists the tokens of that length's segments in order; None when every segment has that length
    (the whole sequence reshapes without a gather)."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if not lengths:
        return []
    if all(n == lengths[0] for n in lengths):
        return [(lengths[0], None, len(lengths))]
    by_len: dict[int, list[int]] = {}
    for a, n in zip(bounds[:-1], lengths):
        if n > 0:
            by_len.setdefault(n, []).append(a)
    out = []
    for n, starts in by_len.items():
        idx = (torch.tensor(starts)[:, None] + torch.arange(n)[None]).reshape(-1).to(cu_seqlens.device)
        out.append((n, idx, len(starts)))
    return out


_RECENT: list[tuple[Tensor, tuple]] = []  # (cu_seqlens, plan): layers reuse the same boundary tensors


def _plan(cu_seqlens: Tensor) -> tuple[list, Tensor | None]:
    """:func:`segment_groups` and the inverse permutation that puts grouped tokens back in order,
    remembered for the last few boundary tensors (held, so identity is safe): a forward's layers
    share them, and each ``tolist`` is a device sync."""
    for cu, plan in _RECENT:
        if cu is cu_seqlens:
            return plan
    groups = segment_groups(cu_seqlens)
    inverse = None
    if len(groups) > 1 or (groups and groups[0][1] is not None):
        inverse = torch.argsort(torch.cat([idx for _, idx, _ in groups]))
    plan = (groups, inverse)
    _RECENT.insert(0, (cu_seqlens, plan))
    del _RECENT[4:]
    return plan


KERNELS = ("sdpa", "flash")
_kernel = os.environ.get("VLM2REC_VARLEN_KERNEL", "sdpa")


def set_varlen_kernel(name: str) -> str:
    """``sdpa`` (default): one SDPA call per distinct segment length; ``flash``: PyTorch's own
    variable-length flash kernel (``torch.nn.attention.varlen``), one call for all segments, on a GPU
    in bf16/fp16 (elsewhere ``sdpa`` is used). Returns the previous setting."""
    global _kernel
    if name not in KERNELS:
        raise ValueError(f"varlen kernel {name!r}: one of {KERNELS}")
    before, _kernel = _kernel, name
    return before


@functools.cache
def _varlen_kernel():
    """PyTorch's variable-length flash function and its parameter names (looked up once), or (None, ())."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, ()
    return varlen_attn, tuple(inspect.signature(varlen_attn).parameters)


def _flash_varlen(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, max_len: int,
                  scaling: float | None, causal: bool) -> Tensor | None:
    """One variable-length flash call, or None where this torch has no such kernel or it cannot take
    these arguments. Its signature changed across torch releases: both spellings are handled."""
    varlen_attn, params = _varlen_kernel()
    if varlen_attn is None:
        return None
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (total, heads, dim)
    kw: dict = {}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if "window_size" in params:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:
        kw["is_causal"] = causal
    elif causal:
        return None
    if "scale" in params:
        kw["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-9:
        return None
    cu = cu_seqlens.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)[None]


def varlen_sdpa(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, scaling: float | None = None,
                causal: bool = False) -> Tensor:
    """Attention within segments (causal or not). ``query``: (1, heads, total, dim); ``key`` and
    ``value``: (1, kv_heads, total, dim) (grouped-query attention when fewer heads); ``cu_seqlens``:
    (segments + 1,) boundaries. Returns (1, total, heads, dim), the layout transformers' attention
    functions return. The kernel: see :func:`set_varlen_kernel`."""
    _, h, _, d = query.shape
    hk = key.shape[1]
    groups, inverse = _plan(cu_seqlens)
    if _kernel == "flash" and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and groups:
        out = _flash_varlen(query, key, value, cu_seqlens, max(n for n, _, _ in groups), scaling, causal)
        if out is not None:
            return out
    outs = []
    for n, idx, count in groups:
        parts = [t[0] if idx is None else t[0].index_select(1, idx) for t in (query, key, value)]  # (heads, tokens, dim)
        q, k, v = (t.reshape(t.shape[0], count, n, d).transpose(0, 1) for t in parts)  # (segments, heads, n, dim)
        o = F.scaled_dot_product_attention(q, k, v, scale=scaling, is_causal=causal, enable_gqa=hk != h)
        outs.append(o.transpose(1, 2).reshape(count * n, h, d))
    out = outs[0] if inverse is None else torch.cat(outs).index_select(0, inverse)
    return out[None]


@torch.compiler.disable  # Python-side grouping (a device sync): kept out of compiled graphs
def varlen_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask=None,
                             scaling: float | None = None, dropout: float = 0.0, cu_seq_lens_q: Tensor | None = None,
                             cu_seq_lens_k: Tensor | None = None, is_causal: bool | None = None,
                             sliding_window: int | None = None, **kwargs):
    """transformers attention-interface signature around :func:`varlen_sdpa`: the vision tower's
    windows (bidirectional) and packed language-model sequences (causal, the module's own flag)."""
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    if dropout or attention_mask is not None or cu_seq_lens_q is None or sliding_window:
        raise NotImplementedError(f"{NAME}: dropout-free, unmasked, cu_seqlens-delimited attention only "
                                  "(no padding mask, no sliding window)")
    if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
        raise NotImplementedError(f"{NAME}: queries and keys must share their segments")
    return varlen_sdpa(query, key, value, cu_seq_lens_q, scaling, causal), None


@contextmanager
def packed_language_model(model):
    """Within this context the language model of a Qwen2-VL-family model attends through
    :func:`varlen_sdpa` (causal, per packed sequence given by ``cu_seq_lens_q``)."""
    from transformers import AttentionInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = getattr(base, "language_model", None) or base.model.language_model
    cfg = lm.config
    before = cfg._attn_implementation
    AttentionInterface.register(NAME, varlen_attention_forward)
    cfg._attn_implementation = NAME
    try:
        yield
    finally:
        cfg._attn_implementation = before


def set_vision_attention(model, varlen: bool = True) -> bool:
    """Route the vision tower's attention of a Qwen2-VL-family model through :func:`varlen_sdpa`
    (registered once), or back to SDPA's per-segment calls (``varlen=False``, the plain path). Leaves
    models that use flash-attn, or have no vision tower, alone; returns whether it changed anything."""
    from transformers import AttentionInterface

    visual = getattr(model, "visual", None) or getattr(getattr(model, "model", None), "visual", None)
    if visual is None:
        return False
    cfg = visual.config
    current = str(getattr(cfg, "_attn_implementation", ""))
    if "flash" in current and current != NAME:
        return False
    AttentionInterface.register(NAME, varlen_attention_forward)
    cfg._attn_implementation = NAME if varlen else "sdpa"
    return current != cfg._attn_implementation
