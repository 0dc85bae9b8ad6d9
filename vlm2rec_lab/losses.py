"""VLM2Rec objectives as pure functions of embeddings (docs/method.md §2; paper §2.4, §4.2).

Conventions (docs/method.md §2): similarity s(·,·) is cosine; in-batch negatives — row b's positive is
``e[b]``, its negatives the other rows' targets, masking rows whose target item equals b's
(false-negative mask, ours); losses are means over the batch (ours: the paper writes sums).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

LN2 = math.log(2.0)


def cosine_matrix(z: Tensor, e: Tensor) -> Tensor:
    """(B, d), (B, d) -> (B, B) cosine similarities s(z_b, e_j)."""
    return F.normalize(z, dim=-1) @ F.normalize(e, dim=-1).T


def negative_mask(batch: int, labels: Tensor | None, device=None) -> Tensor:
    """(B, B) True where column j is a negative for row b: j != b and (with labels) label_j != label_b."""
    eye = torch.eye(batch, dtype=torch.bool, device=device)
    if labels is None:
        return ~eye
    labels = labels.to(device)
    return (labels[:, None] != labels[None, :]) & ~eye


def info_nce(z: Tensor, e: Tensor, tau: float, labels: Tensor | None = None) -> Tensor:
    """InfoNCE over in-batch negatives (Eq. 3): −mean_b log softmax_j(s(z_b, e_j)/τ)[b].

    Args:
        z: sequence embeddings ``[B, d]``; e: target item embeddings ``[B, d]`` (row b is b's positive).
        tau: temperature τ.
        labels: target item ids ``[B]``; columns whose target equals row b's are not negatives.

    Example:
        >>> z = torch.eye(3); info_nce(z, z, tau=0.1) < 1e-3
        tensor(True)
    """
    logits = cosine_matrix(z, e) / tau
    keep = negative_mask(len(z), labels, z.device) | torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(~keep, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(z), device=z.device))


def modality_margins(z: Tensor, e: Tensor, neg: Tensor) -> Tensor:
    """Eq. 6: M_b = s(z_b, e_b) − mean over b's negatives j of s(z_b, e_j). ``[B]``."""
    s = cosine_matrix(z, e)
    n = neg.sum(1).clamp(min=1)
    return s.diagonal() - (s * neg).sum(1) / n


def wpcl(
    z_t: Tensor, z_v: Tensor, e_t: Tensor, e_v: Tensor, tau: float,
    alpha: Tensor | float, beta: Tensor | float,
    stop_grad: bool = True, penalty: bool = True, penalty_offset: bool = False,
    labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """Weak-modality Penalised Contrastive Learning (Eq. 6–10).

    Per user b and modality m ∈ {T, V}: margin M_{b,m} (Eq. 6); strong = max, weak = min (Eq. 7);
    gap Δ_b = sg[M_strong] − M_weak ≥ 0 (Eq. 8, stop-gradient on the strong modality); weight
    w_b = 1 + β·softplus(α·Δ_b) (Eq. 9); loss (Eq. 10) on fused embeddings z = z_t + z_v,
    e = e_t + e_v: −mean_b log( e^{s_b+/τ} / (e^{s_b+/τ} + w_b Σ_{j∈neg(b)} e^{s_bj/τ}) ).
    The gradient reaches M_weak through w_b; the stop-gradient keeps it off M_strong.

    Switches: ``stop_grad=False`` (ablation), ``penalty=False`` (w_b = 1: plain InfoNCE on fused
    embeddings), ``penalty_offset=True`` uses softplus − ln 2 so that w → 1 when the modalities
    balance (softplus(0) = ln 2 makes the paper's w → 1 + β ln 2).

    Returns: dict with ``loss`` (scalar), ``w``, ``margin_t``, ``margin_v``, ``gap`` (each ``[B]``).
    """
    B = len(z_t)
    neg = negative_mask(B, labels, z_t.device)
    m_t = modality_margins(z_t, e_t, neg.float())
    m_v = modality_margins(z_v, e_v, neg.float())
    strong, weak = torch.maximum(m_t, m_v), torch.minimum(m_t, m_v)
    gap = (strong.detach() if stop_grad else strong) - weak
    if penalty:
        sp = F.softplus(alpha * gap)
        w = 1.0 + beta * (sp - LN2 if penalty_offset else sp)
    else:
        w = torch.ones_like(gap)
    s = cosine_matrix(z_t + z_v, e_t + e_v) / tau  # (B, B)
    pos = s.diagonal()
    neg_logits = (s + torch.log(w).unsqueeze(1)).masked_fill(~neg, float("-inf"))
    denom = torch.logsumexp(torch.cat([pos.unsqueeze(1), neg_logits], dim=1), dim=1)
    return {"loss": (denom - pos).mean(), "w": w, "margin_t": m_t, "margin_v": m_v, "gap": gap}


def crtr(z_t: Tensor, z_v: Tensor, e_t: Tensor, e_v: Tensor, tau: float) -> Tensor:
    """Cross-modal Relational Topology Regularisation (Eq. 11–13).

    S^m_{i,j} = s(z_i^m, e_j^m)/τ over the batch's targets j; P^m = row softmax;
    loss = (1/2B) Σ_i [KL(P^T_i ‖ P^V_i) + KL(P^V_i ‖ P^T_i)]. Zero when the two modalities'
    similarity structures agree; symmetric in T and V.
    """
    log_p_t = F.log_softmax(cosine_matrix(z_t, e_t) / tau, dim=1)
    log_p_v = F.log_softmax(cosine_matrix(z_v, e_v) / tau, dim=1)
    kl_tv = (log_p_t.exp() * (log_p_t - log_p_v)).sum(1)
    kl_vt = (log_p_v.exp() * (log_p_v - log_p_t)).sum(1)
    return (kl_tv + kl_vt).sum() / (2 * len(z_t))


# --------------------------------------------------------------------------- objectives

OBJECTIVES = ("sft", "vlm2rec", "no_stopgrad", "no_penalty", "no_crtr", "crtr_only")


@dataclass
class ObjectiveConfig:
    """Hyperparameters of the objectives (defaults of docs/method.md §2, ours where the paper is silent)."""

    name: str = "vlm2rec"
    tau: float = 0.1  # τ_WPCL (and τ of InfoNCE)
    tau_crtr: float = 0.1
    lam: float = 0.5  # λ of Eq. 14
    penalty_offset: bool = False

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.name!r}")


@dataclass
class ObjectiveOutput:
    """Named loss terms (summed into the total) and detached statistics for the logs."""

    terms: dict[str, Tensor]
    stats: dict[str, Tensor] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        return sum(self.terms.values())


def objective(
    cfg: ObjectiveConfig, emb: dict[str, Tensor], alpha: Tensor | float = 1.0, beta: Tensor | float = 1.0,
    labels: Tensor | None = None,
) -> ObjectiveOutput:
    """One of the Table 5 variants, as named terms.

    ``emb`` holds ``z_t, z_v, e_t, e_v`` (external fusion), or only ``z, e`` for a single embedding
    per side (internal fusion, or a text-only LLM), which only ``sft`` accepts.

    - ``sft``: InfoNCE (Eq. 3) on fused embeddings.
    - ``vlm2rec``: WPCL + λ·CRTR (Eq. 14).
    - ``no_stopgrad``: WPCL without the stop-gradient + λ·CRTR.
    - ``no_penalty`` ("→ w/ WPCL w/o w_pen"): WPCL with w_b = 1, i.e. InfoNCE on fused embeddings,
      + λ·CRTR.
    - ``no_crtr`` ("w/o L_CRTR"): WPCL alone.
    - ``crtr_only`` ("w/o L_WPCL"): λ·CRTR alone, no contrastive term at all. The paper's Table 5
      reports this row as its sharpest drop, "confirming [WPCL's] fundamental role in injecting CF
      signals", which only a row without any contrastive term can show.

    The five Table 5 rows (``vlm2rec``, ``crtr_only``, ``no_stopgrad``, ``no_penalty``,
    ``no_crtr``) are five different objectives in value or in gradient. Objectives without a
    contrastive WPCL term still report the per-modality margins (``stats``) for the logs.
    """
    if "z" in emb:
        if cfg.name != "sft":
            raise ValueError(f"objective {cfg.name!r} needs separate text and image embeddings (external fusion)")
        return ObjectiveOutput({"info_nce": info_nce(emb["z"], emb["e"], cfg.tau, labels)})
    z_t, z_v, e_t, e_v = emb["z_t"], emb["z_v"], emb["e_t"], emb["e_v"]
    terms: dict[str, Tensor] = {}
    stats: dict[str, Tensor] = {}
    if cfg.name in ("sft", "crtr_only"):
        if cfg.name == "sft":
            terms["info_nce"] = info_nce(z_t + z_v, e_t + e_v, cfg.tau, labels)
        with torch.no_grad():
            neg = negative_mask(len(z_t), labels, z_t.device).float()
            stats["margin_t"] = modality_margins(z_t, e_t, neg)
            stats["margin_v"] = modality_margins(z_v, e_v, neg)
    else:
        out = wpcl(z_t, z_v, e_t, e_v, cfg.tau, alpha, beta,
                   stop_grad=cfg.name != "no_stopgrad", penalty=cfg.name != "no_penalty",
                   penalty_offset=cfg.penalty_offset, labels=labels)
        terms["wpcl"] = out["loss"]
        stats.update({k: out[k].detach() for k in ("w", "margin_t", "margin_v", "gap")})
    if cfg.name not in ("sft", "no_crtr"):
        terms["crtr"] = cfg.lam * crtr(z_t, z_v, e_t, e_v, cfg.tau_crtr)
    return ObjectiveOutput(terms, stats)
