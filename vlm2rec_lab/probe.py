"""The gradient-cosine probe (docs/method.md §5): how the objective's gradient on the LoRA weights θ lines
up with each modality's InfoNCE gradient, cos(g_total, g_T) and cos(g_total, g_V), where
g_m = ∇θ InfoNCE(z^m, e^F), computed while training (:func:`vlm2rec_lab.diagnostics.gradient_cosines`
reads them back from a run's step log).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .accel import distributed as dist
from .losses import info_nce

# The prompt sets of an external-fusion step (text and image histories, text and image targets:
# Trainer.requests) grouped into the forwards a probed micro-batch gives them: g_T needs the text
# histories and the targets, g_V the image histories and the targets, so with the three in forwards
# of their own each gradient pass runs backward over those tokens alone instead of the whole step's
# (the step's own backward covers all three). With LoRA dropout on, three forwards draw their masks
# separately, so a run's trajectory depends on --grad-cos-every as it does on the seed (the same
# distribution, other draws).
PROBE_FORWARDS = ((0,), (1,), (2, 3))


def flat_cosine(grad_a: list, grad_b: list) -> float:
    """Cosine between two gradients given as lists of tensors (None: no gradient, skipped), read
    back from the device once."""
    pairs = [(x, y) for x, y in zip(grad_a, grad_b) if x is not None and y is not None]
    if not pairs:
        return 0.0
    sums = torch.stack([torch.stack([(x * y).sum(), (x * x).sum(), (y * y).sum()]) for x, y in pairs])
    dot, na, nb = sums.double().sum(0).tolist()
    return dot / max(np.sqrt(na * nb), 1e-30)


def modality_gradients(emb: dict[str, Tensor], labels: Tensor, params: list, tau: float) -> tuple[list, list]:
    """g_T and g_V of docs/method.md §5: g_m = ∇θ InfoNCE(z^m, e^F) over ``params`` (θ = LoRA), averaged over
    processes; the graph is kept for the step's own backward."""
    e_f = emb["e_t"] + emb["e_v"]
    grad = lambda loss: torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)  # noqa: E731
    return (dist.average_tensors(grad(info_nce(emb["z_t"], e_f, tau, labels)), like=params),
            dist.average_tensors(grad(info_nce(emb["z_v"], e_f, tau, labels)), like=params))


def objective_modality_cosines(g_mod: tuple[list, list], g_total: list) -> dict[str, float]:
    """docs/method.md §5: cos(g_total, g_T) and cos(g_total, g_V). ``g_total`` is the objective's gradient as
    the step's backward leaves it in ``.grad`` (scaled by 1 / grad_accum, which no cosine sees)
    rather than a third gradient pass of its own; averaged over processes here."""
    g_total = dist.average_tensors(g_total, like=g_mod[0])  # (a weight without gradient: zeros)
    return {"cos_total_t": flat_cosine(g_total, g_mod[0]), "cos_total_v": flat_cosine(g_total, g_mod[1])}
