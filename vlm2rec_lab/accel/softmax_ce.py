"""Task 2's full-softmax cross-entropy over the whole catalogue, computed in row chunks so that the
(P, N) logits are never stored whole, with the matmuls in a chosen precision (:func:`matmul_dtype`).
In float32 it equals ``F.cross_entropy(h @ W.T, targets)`` (tested); it is how the loss is computed,
not what it is."""
from __future__ import annotations

from pathlib import Path

import torch


class _SoftmaxCE(torch.autograd.Function):
    """Mean cross-entropy of ``h @ W.T`` against ``t`` in row chunks: matmuls in ``dtype``, softmax
    in float32; the (P, N) logits are never stored whole — backward recomputes each chunk (one
    extra matmul), which on CPU beats allocating and page-faulting a P x N buffer every step."""

    @staticmethod
    def forward(ctx, h, W, t, dtype):
        hd, Wd = h.to(dtype), W.to(dtype)
        chunk = max(8, _CE_CHUNK // W.shape[0])  # rows of h per chunk
        lse, pos = h.new_empty(h.shape[0], dtype=torch.float32), h.new_empty(h.shape[0], dtype=torch.float32)
        for start in range(0, h.shape[0], chunk):
            part = slice(start, start + chunk)
            logits = (hd[part] @ Wd.T).float()  # (chunk, N)
            lse[part] = torch.logsumexp(logits, 1)
            pos[part] = logits.gather(1, t[part, None]).squeeze(1)
        ctx.save_for_backward(h, W, t, lse)
        ctx.dtype, ctx.chunk = dtype, chunk
        return (lse - pos).mean()

    @staticmethod
    def backward(ctx, grad):
        h, W, t, lse = ctx.saved_tensors
        hd, Wd, chunk = h.to(ctx.dtype), W.to(ctx.dtype), ctx.chunk
        gh, gW = torch.empty_like(h), torch.zeros(W.shape, dtype=torch.float32, device=W.device)
        scale = grad / h.shape[0]
        for start in range(0, h.shape[0], chunk):
            part = slice(start, start + chunk)
            p = (hd[part] @ Wd.T).float().sub_(lse[part, None]).exp_()  # softmax (chunk, N)
            p[torch.arange(p.shape[0], device=p.device), t[part]] -= 1.0
            g = p.mul_(scale).to(ctx.dtype)
            gh[part] = g @ Wd
            gW += (g.T @ hd[part]).float()
        return gh, gW.to(W.dtype), None, None


_CE_CHUNK = 3_000_000  # logits per chunk (12 MB in float32): stays in the allocator's heap and cache


def softmax_ce(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Full-softmax cross-entropy over all items: ``mean_p -log softmax(h_p W^T)[t_p]``.

    Args:
        h: (P, H) sequence states at target positions.
        W: (N, H) item vectors (no padding row).
        targets: (P,) item index in [0, N).
        dtype: matmul precision (``torch.bfloat16``: ours, for CPUs with bf16 units; the softmax
            stays float32). Equals ``F.cross_entropy(h @ W.T, targets)`` in float32.
    """
    return _SoftmaxCE.apply(h, W, targets, dtype)


def matmul_dtype(device: str, setting: str = "auto") -> torch.dtype:
    """``auto``: bfloat16 on a CPU with native bf16 (avx512_bf16 / amx_bf16), else float32."""
    if setting != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]
    if not device.startswith("cpu"):
        return torch.float32
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32
