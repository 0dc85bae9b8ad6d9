"""Variable-length attention without flash-attn: one batched SDPA per segment length instead of one
call per segment, for the vision tower's windows and for packed language-model prompts.

Qwen2.5-VL's vision tower attends within windows (and, in a few layers, within whole images), each
a segment of the flattened patch sequence given by ``cu_seqlens``. Without flash-attn, Hugging Face
calls SDPA once per segment: a call per window per layer. Segments of equal length (all windows of
same-size images) stack into one batch; :func:`varlen_sdpa` does that, grouping by length, so the
result is the same attention, computed in one kernel per distinct length. The same function, causal,
serves prompts packed into one sequence (:func:`packed_language_model`,
:func:`~vlm2rec_lab.accel.packing.forward_packed`). On a GPU in bf16/fp16 both go to PyTorch's own variable-length
flash kernel by default, one call for all segments (:func:`set_varlen_kernel`): with lengths that
vary, as real titles and histories do, the grouped SDPA makes one call per distinct length.
Packed prompts that begin alike can share their common
leading tokens, computed once as a segment of their own (:func:`shared_prefixes`): the segments
that continue it attend to its keys and then their own, causally.

It is registered with transformers' ``AttentionInterface`` under :data:`NAME` (the name contains
"flash" so that transformers passes ``cu_seqlens`` to it). It is set on the *vision* config (on a
GPU), and on the language model's config only inside :func:`packed_language_model`.
"""
from __future__ import annotations

import contextvars
import functools
import os
from contextlib import contextmanager

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.attention.bias import causal_lower_right

from .transfer import to_device

NAME = "sdpa_flash_varlen"  # "flash" in the name: transformers then hands over cu_seqlens


class Group(NamedTuple):
    """Segments of one length (and one shared prefix) attended in one batched call."""

    n: int  # tokens per segment
    q_index: Tensor | None  # their tokens, segment after segment (None: the whole sequence, in order)
    count: int  # how many segments
    n_keys: int  # keys per segment: n, or the prefix's length + n
    k_index: Tensor | None  # per segment, the prefix's tokens then its own (None: as q_index)


def segment_groups(cu_seqlens: Tensor, prefix_of: list[int] | None = None, device=None) -> list[Group]:
    """``cu_seqlens`` -> one entry per distinct (segment length, shared prefix):
    ``(n, q_index, count, n_keys, k_index)``. ``q_index`` lists the tokens of that group's segments
    in order (None when every segment is in one group: the whole sequence reshapes without a
    gather). ``prefix_of`` names, per segment, the segment that is its shared prefix (-1: none): such
    a segment's queries also see all of its prefix's keys, so ``k_index`` lists, per segment, the
    prefix's tokens and then its own (``n_keys`` = prefix length + n); otherwise ``k_index`` is
    ``q_index`` and ``n_keys`` is n. The indices go to ``device`` (default: ``cu_seqlens``'s)."""
    device = cu_seqlens.device if device is None else device
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    tags = list(prefix_of) if prefix_of is not None else [-1] * len(lengths)
    if len(tags) != len(lengths):
        raise ValueError(f"prefix_of names {len(tags)} segments, cu_seqlens delimits {len(lengths)}")
    if not lengths:
        return []
    if all(n == lengths[0] for n in lengths) and all(t < 0 for t in tags):
        return [Group(lengths[0], None, len(lengths), lengths[0], None)]
    by_key: dict[tuple[int, int], list[int]] = {}
    for start, n, tag in zip(bounds[:-1], lengths, tags):
        if n > 0:
            by_key.setdefault((n, tag), []).append(start)
    out = []
    for (n, tag), starts in by_key.items():
        own = torch.tensor(starts)[:, None] + torch.arange(n)[None]
        idx = to_device(own.reshape(-1), device)
        if tag < 0:
            out.append(Group(n, idx, len(starts), n, idx))
            continue
        pre = torch.arange(bounds[tag], bounds[tag + 1])[None].expand(len(starts), -1)
        keys = torch.cat([pre, own], 1)
        out.append(Group(n, idx, len(starts), keys.shape[1], to_device(keys.reshape(-1), device)))
    return out


_RECENT: list[tuple[Tensor, object, tuple]] = []  # (cu_seqlens, prefix_of, plan): a forward's layers share them


def _plan(cu_seqlens: Tensor, prefix_of: list[int] | None = None, bounds: Tensor | None = None
          ) -> tuple[list[Group], Tensor | None, dict]:
    """:func:`segment_groups`, the inverse permutation that puts grouped tokens back in order and a
    memo for kernel-specific layouts, remembered for the last few boundary tensors (held, so
    identity is safe): a forward's layers share them. Reading device boundaries is a device sync;
    given the same ``bounds`` on the CPU (:func:`prime_plan`), the plan is built there instead."""
    for cu, tags, plan in _RECENT:
        if cu is cu_seqlens and tags is prefix_of:
            return plan
    source = cu_seqlens if bounds is None else bounds.cpu()
    cpu_groups = segment_groups(source, prefix_of, device="cpu")
    groups = []
    for g in cpu_groups:
        q = to_device(g.q_index, cu_seqlens.device)
        groups.append(g._replace(q_index=q, k_index=q if g.k_index is g.q_index else to_device(g.k_index, cu_seqlens.device)))
    inverse = None
    if len(groups) > 1 or (groups and groups[0].q_index is not None):
        inverse = to_device(torch.argsort(torch.cat([g.q_index for g in cpu_groups])), cu_seqlens.device)
    plan = (groups, inverse, {"cpu_groups": cpu_groups})
    _RECENT.insert(0, (cu_seqlens, prefix_of, plan))
    del _RECENT[4:]
    return plan


@contextmanager
def plans_kept():
    """The remembered plans as they were on entry, afterwards: plans made inside (a probe's, say)
    do not push out those that forwards about to run have primed."""
    saved = list(_RECENT)
    try:
        yield
    finally:
        _RECENT[:] = saved


def prime_plan(cu_seqlens: Tensor, bounds: Tensor, prefix_of: list[int] | None = None) -> None:
    """Work out the attention plan of the device boundaries ``cu_seqlens`` from the same boundaries
    on the CPU, so that a packed forward's layers find it without reading the device: no device
    sync in the forward. ``prefix_of`` must be the very list the forward's layers will be given."""
    prefixed = prefix_of is not None and any(t >= 0 for t in prefix_of)
    _plan(cu_seqlens, prefix_of if prefixed else None, bounds)


def shared_prefixes(sequences: list[Tensor], positions: list[Tensor], groups: list, stop_ids: tuple[int, ...] = (),
                    min_length: int = 4) -> tuple[list[Tensor], list[Tensor], list[int], int]:
    """Split prompts that begin alike (a chat template's system turn, the prompt's head) into one
    shared prefix per group and the rest of each prompt. Within each group (``groups``: a label per
    sequence) the prefix is the longest run of leading tokens *and* rotary positions common to all
    members, stopped before any token in ``stop_ids`` (image placeholders: equal ids, different
    features) and short of every member's last token; groups of one, or with a prefix under
    ``min_length`` tokens, keep their prompts whole.

    Returns (sequences, positions, prefix_of, n_prefixes): the prefixes first, then every prompt's
    rest in input order; ``prefix_of`` gives each segment its prefix's index (-1 for none), as
    :func:`varlen_sdpa` takes it. Causal attention over [prefix, rest] is attention over the whole
    prompt, so the rest's last hidden state is the prompt's, and each prefix is computed once."""
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    cut = [0] * len(sequences)
    prefixes, pre_pos, owner = [], [], [-1] * len(sequences)
    for rows in members.values():
        if len(rows) < 2:
            continue
        n = min(len(sequences[i]) for i in rows) - 1
        if n < min_length:
            continue
        ids = torch.stack([sequences[i][:n] for i in rows]).cpu()
        pos = torch.stack([positions[i][:, :n] for i in rows]).cpu()  # (members, 3, n)
        same = (ids == ids[0]).all(0) & (pos == pos[0]).all(0).all(0)
        for s in stop_ids:
            same &= ids[0] != s
        p = int(same.long().cumprod(0).sum())
        if p < min_length:
            continue
        for i in rows:
            cut[i], owner[i] = p, len(prefixes)
        prefixes.append(sequences[rows[0]][:p])
        pre_pos.append(positions[rows[0]][:, :p])
    seqs = prefixes + [s[c:] for s, c in zip(sequences, cut)]
    pos = pre_pos + [q[:, c:] for q, c in zip(positions, cut)]
    return seqs, pos, [-1] * len(prefixes) + owner, len(prefixes)


KERNELS = ("sdpa", "flash")
_kernel = os.environ.get("VLM2REC_VARLEN_KERNEL", "flash")


def set_varlen_kernel(name: str) -> str:
    """``flash`` (default; ``VLM2REC_VARLEN_KERNEL`` sets it at import): PyTorch's own
    variable-length flash kernel (``torch.nn.attention.varlen``), one call for all segments, on a GPU
    in bf16/fp16 (:func:`flash_usable`); elsewhere, or where this torch lacks the kernel, ``sdpa`` is
    used: one SDPA call per distinct segment length. Returns the previous setting."""
    global _kernel
    if name not in KERNELS:
        raise ValueError(f"varlen kernel {name!r}: one of {KERNELS}")
    before, _kernel = _kernel, name
    return before


def varlen_kernel() -> str:
    """The variable-length kernel set now (:func:`set_varlen_kernel`)."""
    return _kernel


@functools.cache
def flash_usable(device: torch.device) -> bool:
    """Whether PyTorch's flash kernels run on this CUDA device: NVIDIA, compute capability 8.0
    (Ampere) or newer; on older cards (T4, V100) and on ROCm the grouped SDPA is used instead."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0)


@functools.cache
def _flash_varlen_function():
    """PyTorch's variable-length flash function and its parameter names (looked up once), or (None, ())."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, ()
    return varlen_attn, tuple(inspect.signature(varlen_attn).parameters)


def _flash_varlen(query: Tensor, key: Tensor, value: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                  scaling: float | None, causal: bool) -> Tensor | None:
    """One variable-length flash call, or None where this torch has no such kernel or it cannot take
    these arguments. ``query``: (1, heads, total_q, dim), ``key``/``value``: (1, kv_heads, total_k,
    dim); with ``cu_k`` != ``cu_q`` the causal mask aligns each segment's queries with the *end* of
    its keys (flash-attn's convention), which is what a shared prefix needs. Its signature changed
    across torch releases: both spellings are handled."""
    varlen_attn, params = _flash_varlen_function()
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
    return varlen_attn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, **kw)[None]


def _flash_layout(groups: list[Group], device) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """For :func:`_flash_prefixed`: the key gather index with each segment's keys as [prefix, own]
    in segment order, the query and key bounds, and the longest query and key segment."""
    starts, rows = [], []
    for n, q_idx, count, nk, k_idx in groups:
        starts += q_idx.view(count, n)[:, 0].tolist()
        rows += [(n, r) for r in k_idx.view(count, nk)]
    rows = [rows[i] for i in sorted(range(len(starts)), key=starts.__getitem__)]
    q_len = torch.tensor([n for n, _ in rows])
    k_len = torch.tensor([len(r) for _, r in rows])
    cu_q, cu_k = (to_device(torch.cat([x.new_zeros(1), x.cumsum(0)]), device) for x in (q_len, k_len))
    return to_device(torch.cat([r for _, r in rows]), device), cu_q, cu_k, int(q_len.max()), int(k_len.max())


def _flash_prefixed(query: Tensor, key: Tensor, value: Tensor, plan: tuple, scaling: float | None) -> Tensor | None:
    """Shared prefixes through the flash kernel: one causal call whose key segments are [prefix,
    own] gathered per segment (the layout is worked out once per forward and kept with the plan)."""
    _, _, memo = plan
    if "flash" not in memo:  # from the plan's CPU copy of the groups: no device sync
        memo["flash"] = _flash_layout(memo["cpu_groups"], query.device)
    keys, cu_q, cu_k, max_q, max_k = memo["flash"]
    return _flash_varlen(query, key.index_select(2, keys), value.index_select(2, keys), cu_q, cu_k, max_q, max_k,
                         scaling, causal=True)


def varlen_sdpa(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, scaling: float | None = None,
                causal: bool = False, prefix_of: list[int] | None = None) -> Tensor:
    """Attention within segments (causal or not). ``query``: (1, heads, total, dim); ``key`` and
    ``value``: (1, kv_heads, total, dim) (grouped-query attention when fewer heads); ``cu_seqlens``:
    (segments + 1,) boundaries. ``prefix_of`` (causal only, see :func:`segment_groups`): segments
    that continue a shared prefix segment attend to its keys too, as if it stood before them.
    Returns (1, total, heads, dim), the layout transformers' attention functions return. The
    kernel: see :func:`set_varlen_kernel`."""
    _, h, _, d = query.shape
    hk = key.shape[1]
    prefixed = prefix_of is not None and any(t >= 0 for t in prefix_of)
    if prefixed and not causal:
        raise ValueError("shared prefixes need causal attention")
    plan = _plan(cu_seqlens, prefix_of if prefixed else None)
    groups, inverse, _ = plan
    if (_kernel == "flash" and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and groups
            and flash_usable(query.device)):
        if prefixed:
            out = _flash_prefixed(query, key, value, plan, scaling)
        else:
            longest = max(g.n for g in groups)
            out = _flash_varlen(query, key, value, cu_seqlens, cu_seqlens, longest, longest, scaling, causal)
        if out is not None:
            return out
    outs = []
    for n, q_idx, count, nk, k_idx in groups:
        q = (query[0] if q_idx is None else query[0].index_select(1, q_idx)).reshape(h, count, n, d).transpose(0, 1)
        k, v = ((t[0] if k_idx is None else t[0].index_select(1, k_idx)).reshape(hk, count, nk, d).transpose(0, 1)
                for t in (key, value))  # (segments, heads, tokens, dim)
        if nk == n:
            o = F.scaled_dot_product_attention(q, k, v, scale=scaling, is_causal=causal, enable_gqa=hk != h)
        else:  # [prefix, own] keys: causal, aligned at the end (each query sees the whole prefix); the
            # lower-right causal bias reaches the flash kernel on a GPU, without a dense mask or repeated heads
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, nk), scale=scaling,
                                               enable_gqa=hk != h)
        outs.append(o.transpose(1, 2).reshape(count * n, h, d))
    out = outs[0] if inverse is None else torch.cat(outs).index_select(0, inverse)
    return out[None]


@torch.compiler.disable  # Python-side grouping: kept out of compiled graphs
def varlen_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask=None,
                             scaling: float | None = None, dropout: float = 0.0, cu_seq_lens_q: Tensor | None = None,
                             cu_seq_lens_k: Tensor | None = None, is_causal: bool | None = None,
                             sliding_window: int | None = None, **kwargs):
    """transformers attention-interface signature around :func:`varlen_sdpa`: the vision tower's
    windows (bidirectional) and packed language-model sequences (causal, the module's own flag;
    with the shared prefixes :func:`packed_language_model` was given)."""
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    if dropout or attention_mask is not None or cu_seq_lens_q is None or sliding_window:
        raise NotImplementedError(f"{NAME}: dropout-free, unmasked, cu_seqlens-delimited attention only "
                                  "(no padding mask, no sliding window)")
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
        raise NotImplementedError(f"{NAME}: queries and keys must share their segments")
    return varlen_sdpa(query, key, value, cu_seq_lens_q, scaling, causal, _prefix_of.get() if causal else None), None


# the shared prefixes and read rows of the packed forward that packed_language_model wraps (per
# thread and task), and that context's arguments (for a recomputation under checkpointing to re-enter it)
_prefix_of: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("vlm2rec_prefix_of", default=None)
_rows: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("vlm2rec_rows", default=None)
_packed: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("vlm2rec_packed", default=None)


def packed_state() -> tuple | None:
    """The (model, prefix_of, rows) of the :func:`packed_language_model` context this code runs in, or None."""
    return _packed.get()


def packed_rows() -> Tensor | None:
    """The packed sequence's positions whose final hidden states the packed forward reads (each
    prompt's last token), as :func:`packed_language_model` was given them; None outside it."""
    return _rows.get()


@contextmanager
def packed_language_model(model, prefix_of: list[int] | None = None, rows: Tensor | None = None):
    """Within this context the language model of a Qwen2-VL-family model attends through
    :func:`varlen_sdpa` (causal, per packed sequence given by ``cu_seq_lens_q``; segments that
    continue a shared prefix, per ``prefix_of``, see its keys too: :func:`shared_prefixes`). ``rows``
    (positions in the packed sequence) are the only ones whose final hidden states are read
    (:func:`packed_rows`; the last layer's MLP skips the others, ``fused.read_rows_forward``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = getattr(base, "language_model", None) or base.model.language_model
    cfg = lm.config
    before = cfg._attn_implementation
    register_varlen()
    cfg._attn_implementation = NAME
    token, rows_token, state = _prefix_of.set(prefix_of), _rows.set(rows), _packed.set((model, prefix_of, rows))
    try:
        yield
    finally:
        cfg._attn_implementation = before
        _prefix_of.reset(token)
        _rows.reset(rows_token)
        _packed.reset(state)


def register_varlen() -> None:
    """Register :func:`varlen_attention_forward` with transformers' ``AttentionInterface`` as :data:`NAME`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)


def set_vision_attention(model, varlen: bool = True) -> bool:
    """Route the vision tower's attention of a Qwen2-VL-family model through :func:`varlen_sdpa`
    (registered once), or back to SDPA's per-segment calls (``varlen=False``, the plain path). Leaves
    models that use flash-attn, or have no vision tower, alone; returns whether it changed anything."""
    visual = getattr(model, "visual", None) or getattr(getattr(model, "model", None), "visual", None)
    if visual is None:
        return False
    cfg = visual.config
    current = str(getattr(cfg, "_attn_implementation", ""))
    if "flash" in current and current != NAME:
        return False
    register_varlen()
    cfg._attn_implementation = NAME if varlen else "sdpa"
    return current != cfg._attn_implementation
