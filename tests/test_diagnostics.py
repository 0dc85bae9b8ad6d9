import math

import numpy as np
import pytest

from vlm2rec_lab.config import PrepareConfig, SynthConfig, TrainConfig
from vlm2rec_lab.diagnostics import (
    alignment, cold_start, geometry, geometry_table, gradient_cosines, modality_dropout_table, run_embeddings, sweep,
    uniformity,
    weak_modality,
)


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
    assert (t["A_pos"] >= 0).all() and (t["A_pos"] <= 4).all() and (t["U"] <= 0).all()
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
    from vlm2rec_lab.runs import EmbeddingScorer

    sc = EmbeddingScorer(np.load(trained["VLM2Rec"] / "embeddings" / "seq_test_histories.npy"),
                         np.load(trained["VLM2Rec"] / "embeddings" / "seq_test_V.npy"),
                         np.load(trained["VLM2Rec"] / "embeddings" / "item_F.npy"))
    hr = evaluate(synth_ds, sc, seeds=[0, 1], progress=False).sampled["HR@10"]
    d = modality_dropout_table(sets)
    assert d.loc[("VLM2Rec", "v2f"), "HR@10"] == pytest.approx(hr.mean())
    assert d.loc[("VLM2Rec", "v2f"), "HR@10_std"] == pytest.approx(hr.std(ddof=1))


def test_gradient_cosines_and_weak_modality_from_the_logs(synth_ds, trained):
    g = gradient_cosines(trained["VLM2Rec"])
    assert g["step"].tolist() == [1, 3] and g[["cos_total_t", "cos_total_v"]].abs().le(1).all().all()
    w = weak_modality(trained["VLM2Rec"], synth_ds)
    assert w["over_training"]["step"].tolist() == [1, 2, 3, 4]
    assert w["by_length"]["users"].sum() == w["final_image_weak_share"]["users"].iat[0]
    assert w["by_category"]["image_weak_share"].between(0, 1).all()
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
