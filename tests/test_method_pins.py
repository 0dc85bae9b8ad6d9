"""Pins of the method (docs/method.md §2), each proven by a mutant in tests/mutants_method.yaml that fails it.

Every expected value here is computed independently of the library: from closed forms, from
hand-made 2-D cases whose cosines are cosines of angle differences, or from the plain reference
below (Python floats and loops, or float64 torch loops where a gradient is needed). Nothing here
calls the library's loss functions to get an expected value.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from vlm2rec_lab.config import SpeedConfig, TrainConfig
from vlm2rec_lab.losses import ObjectiveConfig, objective, wpcl
from vlm2rec_lab.train import Trainer

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- plain reference
def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def negatives(labels, b: int, use_labels: bool = True) -> list[int]:
    """Row b's in-batch negatives: every other row, less (with labels) those sharing b's target."""
    return [j for j in range(len(labels)) if j != b and not (use_labels and labels[j] == labels[b])]


def by_hand(cos_t, cos_v, cos_f, labels, tau, alpha, beta, *, offset=False, penalty=True, use_labels=True):
    """WPCL (Eq. 6-10) from cosine tables cos_m[b][j] = s(z_b^m, e_j^m) (m = t, v, fused), in floats."""
    B = len(labels)
    m_t, m_v, w, losses, parts = [], [], [], [], []
    for b in range(B):
        neg = negatives(labels, b, use_labels)
        mt = cos_t[b][b] - (sum(cos_t[b][j] for j in neg) / len(neg) if neg else 0.0)
        mv = cos_v[b][b] - (sum(cos_v[b][j] for j in neg) / len(neg) if neg else 0.0)
        gap = max(mt, mv) - min(mt, mv)
        wb = 1.0 + beta * (softplus(alpha * gap) - (LN2 if offset else 0.0)) if penalty else 1.0
        P = math.exp(cos_f[b][b] / tau)
        N = sum(math.exp(cos_f[b][j] / tau) for j in neg)
        m_t.append(mt), m_v.append(mv), w.append(wb), parts.append((P, N, gap))
        losses.append(-math.log(P / (P + wb * N)))
    return {"margin_t": m_t, "margin_v": m_v, "w": w, "loss": sum(losses) / B, "parts": parts}


def crtr_by_hand(cos_t, cos_v, tau_c) -> float:
    """Eq. 11-13: (1/2B) sum_i KL(P^T_i || P^V_i) + KL(P^V_i || P^T_i), P = row softmax of cos / tau_c."""
    def softmax(row):
        ex = [math.exp(x / tau_c) for x in row]
        return [x / sum(ex) for x in ex]

    total = 0.0
    for rt, rv in zip(cos_t, cos_v):
        p, q = softmax(rt), softmax(rv)
        total += sum(a * math.log(a / c) for a, c in zip(p, q)) + sum(c * math.log(c / a) for a, c in zip(p, q))
    return total / (2 * len(cos_t))


def cos_table(z, e) -> list[list[float]]:
    """Cosines of float64 copies, in numpy (not the library's cosine_matrix)."""
    z = np.asarray(z.detach().cpu(), dtype=np.float64)
    e = np.asarray(e.detach().cpu(), dtype=np.float64)
    return [[float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c))) for c in e] for a in z]


def tables(emb):
    zt, zv, et, ev = (emb[k] for k in ("z_t", "z_v", "e_t", "e_v"))
    return cos_table(zt, et), cos_table(zv, ev), cos_table(zt + zv, et + ev)


# --------------------------------------------------------------------------- a hand-made 2-D batch
# Four users; users 0 and 2 share their target item (label 5), so e[2] = e[0] in both modalities.
# Every vector is r·(cos θ, sin θ): the per-modality cosines are cos(θ_z − θ_e), lengths do not matter.
LABELS = [5, 6, 5, 7]
DEG = math.pi / 180
ZT_ANG, ZT_LEN = [10, 80, 40, 190], [1.0, 2.0, 0.5, 1.5]
ET_ANG = [0, 90, 0, 170]
ZV_ANG, ZV_LEN = [60, 100, 300, 150], [0.7, 1.0, 3.0, 1.2]
EV_ANG = [20, 130, 20, 250]


def _vec(angles, lengths=None):
    lengths = lengths or [1.0] * len(angles)
    return torch.tensor([[r * math.cos(a * DEG), r * math.sin(a * DEG)] for a, r in zip(angles, lengths)],
                        dtype=torch.float64)


def hand_case():
    emb = {"z_t": _vec(ZT_ANG, ZT_LEN), "e_t": _vec(ET_ANG), "z_v": _vec(ZV_ANG, ZV_LEN), "e_v": _vec(EV_ANG)}
    cos_t = [[math.cos((a - c) * DEG) for c in ET_ANG] for a in ZT_ANG]
    cos_v = [[math.cos((a - c) * DEG) for c in EV_ANG] for a in ZV_ANG]
    # fused: z_t + z_v against e_t + e_v, components added by hand
    zf = [(rt * math.cos(at * DEG) + rv * math.cos(av * DEG), rt * math.sin(at * DEG) + rv * math.sin(av * DEG))
          for at, rt, av, rv in zip(ZT_ANG, ZT_LEN, ZV_ANG, ZV_LEN)]
    ef = [(math.cos(a * DEG) + math.cos(c * DEG), math.sin(a * DEG) + math.sin(c * DEG)) for a, c in zip(ET_ANG, EV_ANG)]
    cos_f = [[(x[0] * y[0] + x[1] * y[1]) / (math.hypot(*x) * math.hypot(*y)) for y in ef] for x in zf]
    return emb, torch.tensor(LABELS), cos_t, cos_v, cos_f


# --------------------------------------------------------------------------- 1. margins use the labels
def test_wpcl_margins_leave_out_rows_with_the_same_target():
    emb, labels, cos_t, cos_v, cos_f = hand_case()
    tau, alpha, beta = 0.2, 1.5, 0.6
    want = by_hand(cos_t, cos_v, cos_f, LABELS, tau, alpha, beta)
    blind = by_hand(cos_t, cos_v, cos_f, LABELS, tau, alpha, beta, use_labels=False)
    # user 0's margin, written out: its negatives are users 1 and 3 (user 2 shares its target)
    assert want["margin_t"][0] == pytest.approx(math.cos(10 * DEG) - (math.cos(-80 * DEG) + math.cos(-160 * DEG)) / 2)
    # the case tells the two apart: counting user 2's copy of the positive as a negative shrinks the margins
    assert abs(want["margin_t"][0] - blind["margin_t"][0]) > 0.1 and abs(want["margin_v"][2] - blind["margin_v"][2]) > 0.1
    assert abs(want["loss"] - blind["loss"]) > 0.01

    out = wpcl(emb["z_t"], emb["z_v"], emb["e_t"], emb["e_v"], tau, alpha, beta, labels=labels)
    assert out["margin_t"].tolist() == pytest.approx(want["margin_t"], abs=1e-9)
    assert out["margin_v"].tolist() == pytest.approx(want["margin_v"], abs=1e-9)
    assert out["w"].tolist() == pytest.approx(want["w"], rel=1e-9)
    assert out["loss"].item() == pytest.approx(want["loss"], rel=1e-9)


@pytest.mark.parametrize("name", ["sft", "crtr_only", "vlm2rec"])
def test_logged_margins_of_every_objective_leave_out_rows_with_the_same_target(name):
    emb, labels, cos_t, cos_v, cos_f = hand_case()
    want = by_hand(cos_t, cos_v, cos_f, LABELS, 0.2, 1.0, 1.0)
    out = objective(ObjectiveConfig(name=name, tau=0.2), emb, 1.0, 1.0, labels=labels)
    assert out.stats["margin_t"].tolist() == pytest.approx(want["margin_t"], abs=1e-9)
    assert out.stats["margin_v"].tolist() == pytest.approx(want["margin_v"], abs=1e-9)


# --------------------------------------------------------------------------- 4. tau and tau_CRTR (objective)
def test_wpcl_uses_tau_and_crtr_uses_tau_crtr():
    emb, labels, cos_t, cos_v, cos_f = hand_case()
    tau, tau_c, lam, alpha, beta = 0.07, 0.3, 0.4, 0.9, 1.2
    cfg = ObjectiveConfig(name="vlm2rec", tau=tau, tau_crtr=tau_c, lam=lam)
    out = objective(cfg, emb, alpha, beta, labels=labels)
    want_wpcl = by_hand(cos_t, cos_v, cos_f, LABELS, tau, alpha, beta)["loss"]
    want_crtr = lam * crtr_by_hand(cos_t, cos_v, tau_c)
    # the two temperatures give visibly different terms, so a swap shows
    assert abs(by_hand(cos_t, cos_v, cos_f, LABELS, tau_c, alpha, beta)["loss"] - want_wpcl) > 0.05
    assert abs(lam * crtr_by_hand(cos_t, cos_v, tau) - want_crtr) > 0.05
    assert out.terms["wpcl"].item() == pytest.approx(want_wpcl, rel=1e-9)
    assert out.terms["crtr"].item() == pytest.approx(want_crtr, rel=1e-9)
    sft = objective(ObjectiveConfig(name="sft", tau=tau, tau_crtr=tau_c), emb, labels=labels)
    want_sft = by_hand(cos_t, cos_v, cos_f, LABELS, tau, alpha, beta, penalty=False)["loss"]
    assert sft.terms["info_nce"].item() == pytest.approx(want_sft, rel=1e-9)


# --------------------------------------------------------------------------- 3. the stop-gradient
def _margin(z, e, b, neg):  # Eq. 6 in float64 torch, for autograd
    def s(x, y):
        return (x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum())
    return s(z[b], e[b]) - sum(s(z[b], e[j]) for j in neg) / len(neg)


def _stopgrad_case():
    g = torch.Generator().manual_seed(11)
    e_t = torch.randn(5, 6, generator=g, dtype=torch.float64)
    z_t = e_t + 0.3 * torch.randn(5, 6, generator=g, dtype=torch.float64)  # text: strong for every user
    z_v = torch.randn(5, 6, generator=g, dtype=torch.float64)
    e_v = z_v + 1.5 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    return {"z_t": z_t, "z_v": z_v, "e_t": e_t, "e_v": e_v}


def test_no_stopgrad_adds_exactly_the_weights_gradient_on_the_strong_modality():
    emb, labels = _stopgrad_case(), torch.arange(5)
    tau, alpha, beta = 0.2, 1.3, 0.7
    grads, vals = {}, {}
    for name in ("vlm2rec", "no_stopgrad"):
        leaves = {k: v.clone().requires_grad_() for k, v in emb.items()}
        out = objective(ObjectiveConfig(name=name, tau=tau), leaves, alpha, beta, labels=labels)
        vals[name] = out.terms["wpcl"].item()
        grads[name] = dict(zip(leaves, torch.autograd.grad(out.terms["wpcl"], list(leaves.values()))))
    want = by_hand(*tables(emb), list(range(5)), tau, alpha, beta)
    assert all(mt > mv for mt, mv in zip(want["margin_t"], want["margin_v"]))  # text strong for every user
    assert vals["vlm2rec"] == pytest.approx(want["loss"], rel=1e-9) and vals["no_stopgrad"] == pytest.approx(want["loss"], rel=1e-9)

    # dL/dw_b = (1/B) N_b / (P_b + w_b N_b); dw_b/dgap_b = β α σ(α gap_b); without the stop-gradient
    # gap_b = M_t,b − M_v,b also moves with the strong (text) side: the extra gradient is sum_b c_b ∇M_t,b.
    c = [N / (P + w * N) / 5 * beta * alpha / (1 + math.exp(-alpha * gap))
         for (P, N, gap), w in zip(want["parts"], want["w"])]
    zt, et = emb["z_t"].clone().requires_grad_(), emb["e_t"].clone().requires_grad_()
    extra = sum(cb * _margin(zt, et, b, negatives(list(range(5)), b)) for b, cb in enumerate(c))
    extra_zt, extra_et = torch.autograd.grad(extra, (zt, et))
    assert extra_zt.norm() > 1e-3 and extra_et.norm() > 1e-3
    assert torch.allclose(grads["no_stopgrad"]["z_t"] - grads["vlm2rec"]["z_t"], extra_zt, rtol=1e-7, atol=1e-12)
    assert torch.allclose(grads["no_stopgrad"]["e_t"] - grads["vlm2rec"]["e_t"], extra_et, rtol=1e-7, atol=1e-12)
    # the weak (image) side gets the same gradient either way
    for k in ("z_v", "e_v"):
        assert torch.allclose(grads["no_stopgrad"][k], grads["vlm2rec"][k], rtol=1e-9, atol=1e-14), k


def test_with_the_stop_gradient_the_weight_sends_nothing_to_the_strong_modality():
    emb, labels = _stopgrad_case(), torch.arange(5)
    tau, alpha, beta = 0.2, 1.3, 0.7
    w = by_hand(*tables(emb), list(range(5)), tau, alpha, beta)["w"]
    leaves = {k: v.clone().requires_grad_() for k, v in emb.items()}
    out = objective(ObjectiveConfig(name="vlm2rec", tau=tau), leaves, alpha, beta, labels=labels)
    got = torch.autograd.grad(out.terms["wpcl"], [leaves["z_t"], leaves["e_t"]])

    # the same loss with w_b held constant: the text side reaches it only through the fused cosines
    zt, et = emb["z_t"].clone().requires_grad_(), emb["e_t"].clone().requires_grad_()
    zf, ef = zt + emb["z_v"], et + emb["e_v"]
    zf, ef = zf / zf.norm(dim=1, keepdim=True), ef / ef.norm(dim=1, keepdim=True)
    loss = 0.0
    for b in range(5):
        s = [torch.dot(zf[b], ef[j]) / tau for j in range(5)]
        loss = loss - torch.log(torch.exp(s[b]) / (torch.exp(s[b]) + w[b] * sum(torch.exp(s[j]) for j in range(5) if j != b)))
    want = torch.autograd.grad(loss / 5, (zt, et))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-12)


# --------------------------------------------------------------------------- the trainer, one micro-step
# Small runs: batches of 4, no vision cache (the cache would encode all 200 images first).
SMALL = dict(batch_size=4, grad_cos_every=0, checkpoint_every=0, speed=SpeedConfig(cache_vision=False))


def _batch_with_one_shared_target(targets: np.ndarray, size: int = 4) -> np.ndarray:
    """``size`` example indices: two with the same target (first and third), the rest with targets of their own."""
    values, counts = np.unique(targets, return_counts=True)
    shared = values[counts >= 2][0]
    first, second = np.flatnonzero(targets == shared)[:2]
    rest, seen = [], {shared}
    for i, t in enumerate(targets):
        if t not in seen and len(rest) < size - 2:
            rest.append(i), seen.add(t)
    sel = np.array([first, rest[0], second, *rest[1:]])
    assert len(sel) == size and len(set(targets[sel])) == size - 1
    return sel


# distinct temperatures, α, β away from 1, and the penalty offset on: a swap or a dropped setting shows
PINNED = dict(tau=0.05, tau_crtr=0.3, lam=0.5, alpha=0.8, beta=1.3, penalty_offset=True)


@pytest.fixture(scope="module")
def stepped(synth_ds, tiny_path, tmp_path_factory):
    """One micro-step of a vlm2rec Trainer on a batch where two users share their target item."""
    cfg = TrainConfig(method="vlm2rec", max_steps=1, **SMALL, **PINNED)
    tr = Trainer(cfg, synth_ds, tmp_path_factory.mktemp("pins") / "run", progress=False)
    sel = _batch_with_one_shared_target(tr.targets)
    out, emb, labels = tr.micro_step(sel)
    emb = {k: v.detach() for k, v in emb.items()}
    return tr, sel, out, emb, labels


def test_trainer_passes_the_target_items_as_labels(stepped):
    tr, sel, out, emb, labels = stepped
    assert labels.tolist() == tr.targets[sel].tolist()
    lab = tr.targets[sel].tolist()
    args = (PINNED["tau"], PINNED["alpha"], PINNED["beta"])
    want = by_hand(*tables(emb), lab, *args, offset=True)
    blind = by_hand(*tables(emb), lab, *args, offset=True, use_labels=False)
    assert abs(want["loss"] - blind["loss"]) > 1e-3  # the shared target makes a difference
    assert out.terms["wpcl"].item() == pytest.approx(want["loss"], abs=1e-5)
    assert out.stats["margin_t"].tolist() == pytest.approx(want["margin_t"], abs=1e-6)
    assert out.stats["margin_v"].tolist() == pytest.approx(want["margin_v"], abs=1e-6)


def test_trainer_gives_tau_to_wpcl_and_tau_crtr_to_crtr(stepped):
    tr, sel, out, emb, _ = stepped
    lab = tr.targets[sel].tolist()
    cos_t, cos_v, cos_f = tables(emb)
    p = PINNED
    want_wpcl = by_hand(cos_t, cos_v, cos_f, lab, p["tau"], p["alpha"], p["beta"], offset=True)["loss"]
    swapped = by_hand(cos_t, cos_v, cos_f, lab, p["tau_crtr"], p["alpha"], p["beta"], offset=True)["loss"]
    want_crtr = p["lam"] * crtr_by_hand(cos_t, cos_v, p["tau_crtr"])
    assert abs(want_wpcl - swapped) > 1e-3  # far outside the tolerance below
    assert p["lam"] * crtr_by_hand(cos_t, cos_v, p["tau"]) > 10 * want_crtr
    assert out.terms["wpcl"].item() == pytest.approx(want_wpcl, abs=1e-5)
    assert out.terms["crtr"].item() == pytest.approx(want_crtr, rel=1e-3)


def test_trainer_penalty_offset_reaches_the_weight(stepped):
    _, _, out, _, _ = stepped
    a, b = PINNED["alpha"], PINNED["beta"]
    m_t, m_v = out.stats["margin_t"].tolist(), out.stats["margin_v"].tolist()
    want = [1 + b * (softplus(a * abs(t - v)) - LN2) for t, v in zip(m_t, m_v)]
    without = [1 + b * softplus(a * abs(t - v)) for t, v in zip(m_t, m_v)]
    assert out.stats["w"].tolist() == pytest.approx(want, rel=1e-5)
    assert min(x - y for x, y in zip(without, want)) > 0.5  # β ln 2 apart


# --------------------------------------------------------------------------- 5. α and β
PENALISED = {"vlm2rec": True, "vlm2rec-no-crtr": True, "vlm2rec-no-stopgrad": True,
             "vlm-sft": False, "vlm2rec-crtr-only": False, "vlm2rec-no-penalty": False}


def _optimised(tr, p) -> bool:
    return any(q is p for g in tr.opt.param_groups for q in g["params"])


@pytest.mark.parametrize("method", list(PENALISED))
def test_alpha_beta_are_learnable_only_where_the_objective_has_a_penalty(synth_ds, tiny_path, tmp_path, method):
    learns = PENALISED[method]
    for switch in (True, False):  # learn_alpha_beta=False (--fixed-alpha-beta) freezes them everywhere
        tr = Trainer(TrainConfig(method=method, users_k=16, max_steps=1, learn_alpha_beta=switch, **SMALL),
                     synth_ds, tmp_path / str(switch), progress=False)
        for p in (tr.alpha, tr.beta):
            assert p.requires_grad == (learns and switch), (method, switch)
            assert _optimised(tr, p) or not p.requires_grad  # a learnable α or β is stepped


# (where the objective has no penalty, α and β are not in its graph: frozen or not, no step could move
# them, so the structural test above is what pins those; here the two runs where a step would move them)
@pytest.mark.parametrize("learn", [True, False])
def test_alpha_beta_after_a_training_step(synth_ds, tiny_path, tmp_path, learn):
    cfg = TrainConfig(method="vlm2rec", users_k=16, max_steps=1, lr=0.1, alpha=0.8, beta=1.3, learn_alpha_beta=learn,
                      **SMALL)
    tr = Trainer(cfg, synth_ds, tmp_path / "r", progress=False)
    tr.train()
    log = pd.read_csv(tmp_path / "r" / "logs" / "train_log.csv")
    if learn:  # dL/dβ > 0 (a larger weight only raises the loss): AdamW's first step takes β down by lr
        assert log["beta"].tolist() == pytest.approx([1.3 - 0.1], abs=0.01)
        assert log["alpha"].tolist()[0] <= 0.8 + 1e-7
    else:
        assert log["alpha"].tolist() == pytest.approx([0.8], abs=1e-7)
        assert log["beta"].tolist() == pytest.approx([1.3], abs=1e-7)
        assert (tr.alpha.item(), tr.beta.item()) == (pytest.approx(0.8), pytest.approx(1.3))


def test_cli_flags_reach_the_train_config():
    from vlm2rec_lab.cli import _parser, _train_config

    base = ["train", "--data", "d", "--method", "vlm2rec", "--out", "o"]
    plain = _train_config(_parser().parse_args(base))
    assert plain.learn_alpha_beta is True and plain.penalty_offset is False
    cfg = _train_config(_parser().parse_args(base + ["--fixed-alpha-beta", "--penalty-offset", "--tau", "0.07",
                                                     "--tau-crtr", "0.3"]))
    assert cfg.learn_alpha_beta is False and cfg.penalty_offset is True
    assert (cfg.tau, cfg.tau_crtr) == (0.07, 0.3)


# --------------------------------------------------------------------------- 6. which modality is weak
# a training step's margins, replaced by hand-made ones in the statistics the trainer logs: the image
# weaker for users 0 and 3, a tie for user 1 (the text is then labelled weak: "V" only when
# margin_v < margin_t), the text weaker for user 2
HAND_T = [0.30, 0.10, 0.25, -0.10]
HAND_V = [0.10, 0.10, 0.40, -0.30]
HAND_WEAK = ["V", "T", "T", "V"]


def test_the_weak_modality_is_the_one_with_the_smaller_margin(synth_ds, tiny_path, tmp_path, monkeypatch):
    import vlm2rec_lab.train as train_mod

    real = train_mod.objective

    def hand_made_margins(cfg, emb, alpha, beta, labels=None):
        out = real(cfg, emb, alpha, beta, labels=labels)
        out.stats["margin_t"], out.stats["margin_v"] = torch.tensor(HAND_T), torch.tensor(HAND_V)
        return out

    monkeypatch.setattr(train_mod, "objective", hand_made_margins)
    tr = Trainer(TrainConfig(method="vlm2rec", users_k=16, max_steps=1, **SMALL), synth_ds, tmp_path / "r",
                 progress=False)
    sels = []
    step = tr.micro_step
    tr.micro_step = lambda sel, *a, **k: sels.append(sel.copy()) or step(sel, *a, **k)
    tr.train()
    assert len(sels) == 1
    rows = pd.read_csv(tmp_path / "r" / "logs" / "weak_modality.csv")
    assert rows["step"].tolist() == [1] * 4
    assert rows["user"].tolist() == tr.users[sels[0]].tolist()
    assert rows["weak"].tolist() == HAND_WEAK
    log = pd.read_csv(tmp_path / "r" / "logs" / "train_log.csv")
    assert log["image_weak_share"].tolist() == [2 / 4]
