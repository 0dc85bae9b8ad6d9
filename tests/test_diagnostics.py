import math

import numpy as np
import pytest

from vlm2rec_lab.config import PrepareConfig, SynthConfig, TrainConfig
from vlm2rec_lab.diagnostics import (
    alignment, cold_start, geometry, geometry_table, gradient_cosines, modality_dropout_table, run_embeddings,
    uniformity,
    weak_modality,
)
from vlm2rec_lab.runsets import sweep


def test_identical_embeddings_have_zero_alignment_and_targets_give_zero_a_pos():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    assert alignment(x, x) == pytest.approx(0.0, abs=1e-12)
    assert alignment(x, 3 * x) == pytest.approx(0.0, abs=1e-12)  # scale-free (unit vectors)
    items = rng.normal(size=(20, 8))
    targets = rng.integers(0, 20, 50)
    neg = rng.integers(0, 20, (50, 5))
    g = geometry(items[targets], items, targets, neg)
    assert g["A_pos"] == pytest.approx(0.0, abs=1e-12) and g["S"] > 1e6


def test_uniformity_of_an_orthonormal_set_is_closed_form():
    d = 6
    e = np.eye(d)
    # pairs: same vector (distance 0) with prob 1/d, orthogonal (squared distance 2) otherwise
    expected = math.log(1 / d + (d - 1) / d * math.exp(-4))
    assert uniformity(e, e) == pytest.approx(expected, rel=1e-9)
    assert uniformity(e, e, n_pairs=200_000, seed=1) == pytest.approx(expected, abs=0.02)  # sampled estimate


def test_geometry_of_a_constructed_configuration_is_closed_form():
    # items: the standard basis of R^4; user t's sequence sits at 60 degrees from its target e_t,
    # towards e_{t+1}; its negatives e_{t+2}, e_{t+3} are orthogonal to it
    e = np.eye(4)
    t = np.arange(4)
    seq = 0.5 * e[t] + math.sqrt(3) / 2 * e[(t + 1) % 4]
    neg = np.stack([(t + 2) % 4, (t + 3) % 4], axis=1)
    g = geometry(5 * seq, 0.1 * e, t, neg)  # scale-free: unit vectors throughout
    assert g["A_pos"] == pytest.approx(2 - 2 * 0.5)  # ‖s − i‖² = 2 − 2 cos θ
    assert g["A_neg"] == pytest.approx(2.0)
    assert g["S"] == pytest.approx(2.0, rel=1e-6)
    # all 16 (sequence, item) pairs: per sequence one at distance² 1, one at 2 − √3, two at 2
    assert g["U"] == pytest.approx(math.log((math.exp(-2) + math.exp(-2 * (2 - math.sqrt(3))) + 2 * math.exp(-4)) / 4))
    assert alignment(e, -e) == pytest.approx(4.0)  # antipodal pairs: the largest distance²
    assert alignment(e, e[(t + 1) % 4]) == pytest.approx(2.0)  # orthogonal pairs
    assert uniformity(e[:1], e[:1]) == pytest.approx(0.0, abs=1e-12)  # one pair at distance 0: log 1


def test_separability_orders_sequences_near_their_targets():
    rng = np.random.default_rng(1)
    items = rng.normal(size=(40, 16))
    targets = rng.integers(0, 40, 200)
    neg = rng.integers(0, 40, (200, 10))
    close = geometry(items[targets] + 0.3 * rng.normal(size=(200, 16)), items, targets, neg)
    far = geometry(rng.normal(size=(200, 16)), items, targets, neg)
    assert close["S"] > 1.5 and 0.8 < far["S"] < 1.2


@pytest.fixture(scope="module")
def trained(synth_ds, tiny_path, tmp_path_factory):
    from vlm2rec_lab.runs import run_method

    root = tmp_path_factory.mktemp("diag")
    runs = {}
    for state, method, kw in (("Vanilla", "vlm-vanilla", {}), ("VLM2Rec", "vlm2rec", {"max_steps": 4, "users_k": 32, "batch_size": 8, "grad_cos_every": 2})):
        run_method(synth_ds, TrainConfig(method=method, **kw), root / state, progress=False)
        runs[state] = root / state
    return runs


def test_geometry_and_dropout_tables_have_the_paper_shape(synth_ds, trained):
    t = geometry_table(trained, synth_ds)
    assert list(t.columns) == ["A_pos", "A_neg", "U", "S", "A_pos_std", "A_neg_std", "U_std", "S_std", "seeds"]
    assert set(t.index) == {(s, m) for s in trained for m in ("F", "T", "V")}
    # each cell recomputed here by plain numpy from the run's embedding files (one run per state, its
    # own training seed's negatives; all 300 x 200 sequence-item pairs for U)
    from vlm2rec_lab.runs import load_run_config

    for state, run in trained.items():
        neg = synth_ds.negatives(load_run_config(run).seed)
        for m in ("F", "T", "V"):
            s = np.load(run / "embeddings" / f"seq_test_{m}.npy").astype(np.float64)
            e = np.load(run / "embeddings" / f"item_{m}.npy").astype(np.float64)
            s /= np.linalg.norm(s, axis=1, keepdims=True)
            e /= np.linalg.norm(e, axis=1, keepdims=True)
            a_pos = np.mean([((s[u] - e[i]) ** 2).sum() for u, i in enumerate(synth_ds.targets("test"))])
            a_neg = np.mean([((s[u] - e[neg[u]]) ** 2).sum(1).mean() for u in range(len(s))])  # (as many per user)
            u_all = np.log(np.mean(np.exp(-2 * ((s[:, None, :] - e[None, :, :]) ** 2).sum(-1))))
            row = t.loc[(state, m)]
            assert row["A_pos"] == pytest.approx(a_pos, rel=1e-9) and row["A_neg"] == pytest.approx(a_neg, rel=1e-9)
            assert row["U"] == pytest.approx(u_all, rel=1e-9) and row["S"] == pytest.approx(a_neg / (a_pos + 1e-8), rel=1e-9)
            assert row["seeds"] == 1 and row["S_std"] == 0.0
    d = modality_dropout_table(trained)
    assert set(d.index.get_level_values("view")) == {"f2f", "t2f", "v2f"}


def test_tables_over_training_seeds_are_mean_and_std_of_each_seeds_run(synth_ds, trained):
    # a set of two "runs" (the same folder standing for seeds 0 and 1): each is measured on its own
    # seed's negatives, so the two rows differ by the negatives alone; the table is their mean and std
    sets = {"VLM2Rec": {0: trained["VLM2Rec"], 1: trained["VLM2Rec"]}}
    seq, items = run_embeddings(trained["VLM2Rec"], "V")
    by_hand = [geometry(seq, items, synth_ds.targets("test"), synth_ds.negatives(s), seed=s)["S"] for s in (0, 1)]
    t = geometry_table(sets, synth_ds, modalities=("V",))
    assert t.loc[("VLM2Rec", "V"), "S"] == pytest.approx(np.mean(by_hand))
    assert t.loc[("VLM2Rec", "V"), "S_std"] == pytest.approx(np.std(by_hand, ddof=1))
    assert t.loc[("VLM2Rec", "V"), "seeds"] == 2
    from vlm2rec_lab.evaluate import evaluate
    from vlm2rec_lab.scorers import EmbeddingScorer

    sc = EmbeddingScorer(np.load(trained["VLM2Rec"] / "embeddings" / "seq_test_histories.npy"),
                         np.load(trained["VLM2Rec"] / "embeddings" / "seq_test_V.npy"),
                         np.load(trained["VLM2Rec"] / "embeddings" / "item_F.npy"))
    hr = evaluate(synth_ds, sc, seeds=[0, 1], progress=False).sampled["HR@10"]
    d = modality_dropout_table(sets)
    assert d.loc[("VLM2Rec", "v2f"), "HR@10"] == pytest.approx(hr.mean())
    assert d.loc[("VLM2Rec", "v2f"), "HR@10_std"] == pytest.approx(hr.std(ddof=1))


def test_gradient_cosines_and_weak_modality_from_the_logs(synth_ds, trained):
    import csv

    logs = trained["VLM2Rec"] / "logs"
    g = gradient_cosines(trained["VLM2Rec"])
    assert g["step"].tolist() == [1, 3]  # grad_cos_every 2 over 4 steps
    probed = [r for r in csv.DictReader((logs / "train_log.csv").read_text().splitlines()) if r["cos_total_t"]]
    assert [int(r["step"]) for r in probed] == [1, 3]
    np.testing.assert_allclose(g[["cos_total_t", "cos_total_v"]].to_numpy(),
                               [[float(r["cos_total_t"]), float(r["cos_total_v"])] for r in probed])
    w = weak_modality(trained["VLM2Rec"], synth_ds)
    assert w["over_training"]["step"].tolist() == [1, 2, 3, 4]
    # by hand from the logged rows: the share of image-weak users per step; each user's last
    # recorded weak modality against the category of their last training item
    rows = [(int(r["step"]), int(r["user"]), r["weak"]) for r in csv.DictReader((logs / "weak_modality.csv").read_text().splitlines())]
    for step, share in zip(w["over_training"]["step"], w["over_training"]["image_weak_share"]):
        at = [weak for st, _, weak in rows if st == step]
        assert share == pytest.approx(sum(x == "V" for x in at) / len(at))
    last = {}
    for step, user, weak in sorted(rows):
        last[user] = weak
    cats = synth_ds.items["category"].to_numpy()
    by_cat: dict = {}
    for user, weak in last.items():
        by_cat.setdefault(cats[synth_ds.sequence(user)[-3]], []).append(weak == "V")
    got = w["by_category"]
    assert sorted(got.index) == sorted(by_cat)
    for cat, flags in by_cat.items():
        assert got.loc[cat, "users"] == len(flags) and got.loc[cat, "image_weak_share"] == pytest.approx(np.mean(flags))
    assert w["by_length"]["users"].sum() == w["final_image_weak_share"]["users"].iat[0] == len(last)
    assert w["final_image_weak_share"]["share"].iat[0] == pytest.approx(np.mean([x == "V" for x in last.values()]))
    with pytest.raises((ValueError, FileNotFoundError)):
        gradient_cosines(trained["Vanilla"])


def test_cold_start_buckets_partition_users(synth_ds):
    from vlm2rec_lab.evaluate import evaluate
    from vlm2rec_lab.scorers import PopularityScorer

    ev = evaluate(synth_ds, PopularityScorer(synth_ds), seeds=[0], progress=False)
    cs = cold_start(ev.ranks[0], synth_ds)
    assert cs["users"].sum() == synth_ds.n_users
    # popularity is weakest on the rarest targets
    nonempty = cs[cs["users"] > 0]
    assert nonempty["HR@10"].iloc[0] < nonempty["HR@10"].iloc[-1]


def test_sweep_runs_one_config_per_value(synth_ds, tiny_path, tmp_path):
    base = TrainConfig(method="vlm2rec", max_steps=1, users_k=8, batch_size=4, grad_cos_every=0)
    df = sweep(synth_ds, base, tmp_path, {"lam": [0.1, 1.0]})
    assert sorted(df["value"].unique()) == [0.1, 1.0] and set(df["view"]) == {"f2f", "t2f", "v2f"}
    assert (tmp_path / "lam=0.1" / "config.yaml").read_text().count("lam: 0.1") == 1


def test_cross_domain_embeds_another_domain_with_the_runs_backbone(synth_ds, trained, tmp_path):
    from vlm2rec_lab.data.dataset import prepare
    from vlm2rec_lab.data.synthetic import generate
    from vlm2rec_lab.runs import cross_domain, embed_run

    raw = generate(SynthConfig(users=200, items=300, seed=11), tmp_path / "raw")
    other = prepare(PrepareConfig(format="amazon2018", inputs=[str(raw)], images=str(raw / "images")), tmp_path / "other",
                    progress=False)
    with pytest.raises(ValueError, match="cross_domain"):
        embed_run(trained["VLM2Rec"], other, progress=False)
    res = cross_domain(trained["VLM2Rec"], other, name="seed11")
    assert set(res["views"]) == {"f2f", "t2f", "v2f"}
    emb = np.load(trained["VLM2Rec"] / "cross" / "seed11" / "embeddings" / "item_F.npy")
    assert emb.shape[0] == other.n_items
    from vlm2rec_lab.cli import main

    assert main(["evaluate", "--run", str(trained["VLM2Rec"]), "--data", str(tmp_path / "other"), "--json"]) == 0
    cli = np.load(trained["VLM2Rec"] / "cross" / "other" / "embeddings" / "item_F.npy")
    np.testing.assert_allclose(cli, emb, rtol=1e-5, atol=1e-6)  # the same model, the same domain
