import math

import pytest
import torch

from vlm2rec_lab.losses import ObjectiveConfig, crtr, info_nce, objective, wpcl

R = 1 / math.sqrt(2)
# 3x3 examples with exact cosines
Z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
E = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
COS = [[1, R, 0], [0, R, 1], [R, 1, R]]  # COS[b][j] = s(Z_b, E_j)


def nce_by_hand(cos, tau, allowed):
    total = 0.0
    for b in range(3):
        den = sum(math.exp(cos[b][j] / tau) for j in range(3) if allowed(b, j))
        total += -math.log(math.exp(cos[b][b] / tau) / den)
    return total / 3


def test_info_nce_hand_computed():
    assert info_nce(Z, E, tau=0.5).item() == pytest.approx(nce_by_hand(COS, 0.5, lambda b, j: True), rel=1e-6)
    # rows 0 and 2 share a target item: each is masked from the other's negatives
    labels = torch.tensor([7, 8, 7])
    allowed = lambda b, j: j == b or labels[j] != labels[b]  # noqa: E731
    assert info_nce(Z, E, tau=0.5, labels=labels).item() == pytest.approx(nce_by_hand(COS, 0.5, allowed), rel=1e-6)


def test_info_nce_is_low_for_perfect_alignment():
    z = torch.eye(4)
    assert info_nce(z, z, 0.05).item() < 1e-6
    assert info_nce(z, z.roll(1, 0), 0.05).item() > 10


# WPCL: text side = (Z, E) above; image side = (ZV, EV) with its own exact cosines
ZV = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
EV = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
COSV = [[R, 0, 1], [R, 1, 0], [R, 0, 1]]


def test_wpcl_hand_computed():
    tau, alpha, beta = 0.5, 2.0, 0.7
    out = wpcl(Z, ZV, E, EV, tau, alpha, beta)
    m_t = [COS[b][b] - sum(COS[b][j] for j in range(3) if j != b) / 2 for b in range(3)]
    m_v = [COSV[b][b] - sum(COSV[b][j] for j in range(3) if j != b) / 2 for b in range(3)]
    gap = [max(a, b) - min(a, b) for a, b in zip(m_t, m_v)]
    w = [1 + beta * math.log1p(math.exp(alpha * g)) for g in gap]
    zf, ef = Z + ZV, E + EV
    cosf = [[float(torch.nn.functional.cosine_similarity(zf[b], ef[j], dim=0)) for j in range(3)] for b in range(3)]
    loss = 0.0
    for b in range(3):
        pos = math.exp(cosf[b][b] / tau)
        loss += -math.log(pos / (pos + w[b] * sum(math.exp(cosf[b][j] / tau) for j in range(3) if j != b)))
    assert out["margin_t"].tolist() == pytest.approx(m_t, abs=1e-6)
    assert out["margin_v"].tolist() == pytest.approx(m_v, abs=1e-6)
    assert out["gap"].tolist() == pytest.approx(gap, abs=1e-6)
    assert out["w"].tolist() == pytest.approx(w, rel=1e-6)
    assert out["loss"].item() == pytest.approx(loss / 3, rel=1e-6)


def test_penalty_off_reduces_wpcl_to_info_nce():
    g = torch.Generator().manual_seed(0)
    zt, zv, et, ev = (torch.randn(6, 5, generator=g) for _ in range(4))
    labels = torch.tensor([0, 1, 2, 0, 3, 4])
    out = wpcl(zt, zv, et, ev, 0.2, 1.0, 1.0, penalty=False, labels=labels)
    assert out["loss"].item() == pytest.approx(info_nce(zt + zv, et + ev, 0.2, labels).item(), rel=1e-6)
    assert torch.all(out["w"] == 1)


def test_stop_gradient_keeps_the_penalty_off_the_strong_modality():
    g = torch.Generator().manual_seed(1)
    # text strong for every user: text embeddings aligned with their targets, image ones noisy
    et = torch.randn(5, 8, generator=g)
    zt = (et + 0.05 * torch.randn(5, 8, generator=g)).requires_grad_()
    zv = torch.randn(5, 8, generator=g).requires_grad_()
    ev = torch.randn(5, 8, generator=g)
    out = wpcl(zt, zv, et, ev, 0.1, 1.0, 1.0, stop_grad=True)
    assert torch.all(out["margin_t"] > out["margin_v"])
    gt, gv = torch.autograd.grad(out["w"].sum(), (zt, zv), retain_graph=True)
    assert torch.all(gt == 0) and gv.abs().sum() > 0  # the weight only moves the weak modality
    out2 = wpcl(zt, zv, et, ev, 0.1, 1.0, 1.0, stop_grad=False)
    gt2, _ = torch.autograd.grad(out2["w"].sum(), (zt, zv))
    assert gt2.abs().sum() > 0
    # the loss itself still trains both (through the fused similarities)
    lt, lv = torch.autograd.grad(out["loss"], (zt, zv))
    assert lt.abs().sum() > 0 and lv.abs().sum() > 0


def test_penalty_offset_makes_balanced_weight_one():
    z, e = torch.randn(4, 3), torch.randn(4, 3)
    assert wpcl(z, z, e, e, 0.1, 1.0, 2.0)["w"].tolist() == pytest.approx([1 + 2 * math.log(2)] * 4)
    assert wpcl(z, z, e, e, 0.1, 1.0, 2.0, penalty_offset=True)["w"].tolist() == pytest.approx([1.0] * 4)


def test_crtr_hand_computed_zero_and_symmetric():
    tau = 0.5

    def softmax(row):
        ex = [math.exp(x / tau) for x in row]
        return [x / sum(ex) for x in ex]

    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))  # noqa: E731
    expected = sum(kl(softmax(COS[i]), softmax(COSV[i])) + kl(softmax(COSV[i]), softmax(COS[i])) for i in range(3)) / 6
    assert crtr(Z, ZV, E, EV, tau).item() == pytest.approx(expected, rel=1e-6)
    assert crtr(Z, Z, E, E, tau).item() == pytest.approx(0.0, abs=1e-7)
    assert crtr(ZV, Z, EV, E, tau).item() == pytest.approx(crtr(Z, ZV, E, EV, tau).item(), rel=1e-6)


def test_objective_variants_name_their_terms():
    g = torch.Generator().manual_seed(2)
    emb = {k: torch.randn(6, 4, generator=g) for k in ("z_t", "z_v", "e_t", "e_v")}
    names = {}
    for v in ("sft", "vlm2rec", "no_stopgrad", "no_penalty", "no_crtr", "crtr_only"):
        out = objective(ObjectiveConfig(name=v, lam=0.5), emb, alpha=1.0, beta=1.0)
        names[v] = sorted(out.terms)
        assert torch.isfinite(out.total)
        assert set(out.stats) >= {"margin_t", "margin_v"}  # every external objective logs the margins
    assert names == {"sft": ["info_nce"], "vlm2rec": ["crtr", "wpcl"], "no_stopgrad": ["crtr", "wpcl"],
                     "no_penalty": ["crtr", "wpcl"], "no_crtr": ["wpcl"], "crtr_only": ["crtr"]}
    single = objective(ObjectiveConfig(name="sft"), {"z": emb["z_t"], "e": emb["e_t"]})
    assert single.total.item() == pytest.approx(info_nce(emb["z_t"], emb["e_t"], 0.1).item())
    with pytest.raises(ValueError, match="external fusion"):
        objective(ObjectiveConfig(name="vlm2rec"), {"z": emb["z_t"], "e": emb["e_t"]})
    with pytest.raises(ValueError):
        ObjectiveConfig(name="nope")


# --------------------------------------------------------------------------- Table 5, pinned
# An independent definition of each row, written row by row in float64 from the paper's equations
# (Eq. 3, 6-14), with the false-negative mask of docs/method.md §2. Nothing here calls the library's losses.

def _cos(a, b):
    return (a @ b) / (a.norm() * b.norm())


def _reference(name, z_t, z_v, e_t, e_v, labels, tau, tau_crtr, lam, alpha, beta):
    B = len(z_t)
    negs = [[j for j in range(B) if j != b and labels[j] != labels[b]] for b in range(B)]

    def margin(z, e, b):  # Eq. 6
        return _cos(z[b], e[b]) - sum(_cos(z[b], e[j]) for j in negs[b]) / max(len(negs[b]), 1)

    def contrastive(b, w):  # Eq. 10 (w = 1: Eq. 3's InfoNCE) on fused embeddings
        zf, ef = z_t[b] + z_v[b], [e_t[j] + e_v[j] for j in range(B)]
        pos = torch.exp(_cos(zf, ef[b]) / tau)
        return -torch.log(pos / (pos + w * sum(torch.exp(_cos(zf, ef[j]) / tau) for j in negs[b])))

    def penalty(b, stop_grad):  # Eq. 7-9
        m_t, m_v = margin(z_t, e_t, b), margin(z_v, e_v, b)
        strong, weak = (m_t, m_v) if m_t >= m_v else (m_v, m_t)
        gap = (strong.detach() if stop_grad else strong) - weak
        return 1 + beta * torch.log1p(torch.exp(alpha * gap))

    def crtr_ref():  # Eq. 11-13
        total = 0.0
        for i in range(B):
            p_t = torch.softmax(torch.stack([_cos(z_t[i], e_t[j]) for j in range(B)]) / tau_crtr, 0)
            p_v = torch.softmax(torch.stack([_cos(z_v[i], e_v[j]) for j in range(B)]) / tau_crtr, 0)
            total = total + (p_t * (p_t / p_v).log()).sum() + (p_v * (p_v / p_t).log()).sum()
        return total / (2 * B)

    mean = lambda xs: sum(xs) / B  # noqa: E731
    if name == "sft":
        return mean([contrastive(b, 1.0) for b in range(B)])
    if name == "crtr_only":  # "w/o L_WPCL": no contrastive term at all
        return lam * crtr_ref()
    if name == "no_penalty":  # "w/ WPCL w/o w_pen": w = 1
        return mean([contrastive(b, 1.0) for b in range(B)]) + lam * crtr_ref()
    stop_grad = name != "no_stopgrad"
    wpcl_ref = mean([contrastive(b, penalty(b, stop_grad)) for b in range(B)])
    return wpcl_ref if name == "no_crtr" else wpcl_ref + lam * crtr_ref()


TABLE5 = ("vlm2rec", "crtr_only", "no_stopgrad", "no_penalty", "no_crtr")


def _table5_case():
    g = torch.Generator().manual_seed(5)
    emb = {k: torch.randn(6, 4, generator=g, dtype=torch.float64) for k in ("z_t", "z_v", "e_t", "e_v")}
    labels = torch.tensor([3, 1, 3, 4, 5, 1])  # two shared targets: the false-negative mask matters
    # distinct temperatures and λ, α, β away from 1, so that a swapped hyperparameter shows
    hp = {"tau": 0.2, "tau_crtr": 0.7, "lam": 0.3, "alpha": 1.7, "beta": 0.6}
    return emb, labels, hp


@pytest.mark.parametrize("name", TABLE5 + ("sft",))
def test_each_objective_equals_its_definition_in_value_and_gradient(name):
    emb, labels, hp = _table5_case()
    leaves = {k: v.clone().requires_grad_(True) for k, v in emb.items()}
    cfg = ObjectiveConfig(name=name, tau=hp["tau"], tau_crtr=hp["tau_crtr"], lam=hp["lam"])
    got = objective(cfg, leaves, hp["alpha"], hp["beta"], labels=labels).total
    got_grad = torch.autograd.grad(got, list(leaves.values()))
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in emb.items()}
    want = _reference(name, ref_leaves["z_t"], ref_leaves["z_v"], ref_leaves["e_t"], ref_leaves["e_v"],
                      labels.tolist(), **hp)
    want_grad = torch.autograd.grad(want, list(ref_leaves.values()))
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    for k, a, b in zip(leaves, got_grad, want_grad):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10), (name, k)


def test_the_five_table5_objectives_are_five_different_objectives():
    emb, labels, hp = _table5_case()
    outs = {}
    for name in TABLE5:
        leaves = {k: v.clone().requires_grad_(True) for k, v in emb.items()}
        cfg = ObjectiveConfig(name=name, tau=hp["tau"], tau_crtr=hp["tau_crtr"], lam=hp["lam"])
        total = objective(cfg, leaves, hp["alpha"], hp["beta"], labels=labels).total
        outs[name] = (total.item(), torch.cat([g.ravel() for g in torch.autograd.grad(total, list(leaves.values()))]))
    for i, a in enumerate(TABLE5):
        for b in TABLE5[i + 1:]:
            same_value = outs[a][0] == pytest.approx(outs[b][0], rel=1e-9)
            same_grad = torch.allclose(outs[a][1], outs[b][1], rtol=1e-7, atol=1e-10)
            assert not (same_value and same_grad), f"{a} and {b} are the same objective"
    # the stop-gradient changes the gradient only: the value is the same with and without it
    assert outs["vlm2rec"][0] == pytest.approx(outs["no_stopgrad"][0], rel=1e-12)


def test_learnable_alpha_beta_receive_gradients():
    emb = {k: torch.randn(6, 4) for k in ("z_t", "z_v", "e_t", "e_v")}
    alpha, beta = torch.tensor(1.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    out = objective(ObjectiveConfig(name="vlm2rec"), emb, alpha, beta)
    ga, gb = torch.autograd.grad(out.total, (alpha, beta))
    assert gb > 0  # a larger weight only raises the loss (docs/method.md §2): descent pushes beta down
    assert ga >= 0
