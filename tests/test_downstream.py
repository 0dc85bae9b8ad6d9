"""Task 2 (docs/method.md §4): SASRec / GRU4Rec with ID or embedding-initialised items.

Unit: layouts, causality and padding, loading embeddings. Integration: training on the synthetic
domain beats popularity, is deterministic, and initialisation uses each item's own vector. Acceptance (slow):
the Beauty reproduction against the bar set by pmixer/SASRec.pytorch.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlm2rec_lab.cli import main
from vlm2rec_lab.data.synthetic import load_latents
from vlm2rec_lab.task2.config import DownstreamConfig
from vlm2rec_lab.task2.items import ItemEmbeddings, load_item_embeddings
from vlm2rec_lab.task2.models import GRU4Rec, ItemTable, SASRec, build_model, gather_rows, prepare_init_table
from vlm2rec_lab.task2.train import ModelScorer, left_align, run, train, training_windows
from vlm2rec_lab.evaluate import evaluate
from vlm2rec_lab.scorers import PopularityScorer

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine two OpenMP
    threads per process can be many times slower than one; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FAST = dict(hidden=32, heads=2, epochs=12, patience=3, batch_size=64, lr=5e-3, dropout=0.2, device="cpu")


def _write_run(folder, item_ids, mats: dict) -> None:
    """A run folder following the embedder's contract: embeddings/item_{F,T,V}.npy + item_ids.txt."""
    (folder / "embeddings").mkdir(parents=True)
    (folder / "embeddings" / "item_ids.txt").write_text("\n".join(item_ids) + "\n")
    for m, x in mats.items():
        np.save(folder / "embeddings" / f"item_{m}.npy", x.astype(np.float32))


def _latent_embeddings(synth_raw, item_ids, d: int = 48, noise: float = 0.3, seed: int = 0) -> dict:
    """Stand-in for the tiny backbone's item embeddings (the embedder has not landed): what a text
    and an image encoder could see — one-hot of the *shown* category / style, randomly projected,
    plus noise. F = T + V (external fusion, Eq. 2)."""
    lat = load_latents(synth_raw)
    row = {a: k for k, a in enumerate(lat["asin"])}
    idx = np.array([row[i] for i in item_ids])
    rng = np.random.default_rng(seed)
    c = np.eye(max(lat["shown_category"]) + 1)[np.asarray(lat["shown_category"])[idx]]
    s = np.eye(max(lat["shown_style"]) + 1)[np.asarray(lat["shown_style"])[idx]]
    T = c @ rng.normal(size=(c.shape[1], d)) + noise * rng.normal(size=(len(idx), d))
    V = s @ rng.normal(size=(s.shape[1], d)) + noise * rng.normal(size=(len(idx), d))
    return {"T": T, "V": V, "F": T + V}


# --------------------------------------------------------------------------- layouts


def test_left_align_round_trip():
    h = np.array([[-1, -1, 4, 5], [1, 2, 3, 0], [-1, -1, -1, 7]])
    seq, lens = left_align(h)
    assert seq.tolist() == [[5, 6, 0, 0], [2, 3, 4, 1], [8, 0, 0, 0]] and lens.tolist() == [2, 4, 1]
    seq, lens = left_align(h, max_len=2)
    assert seq.tolist() == [[5, 6], [4, 1], [8, 0]] and lens.tolist() == [2, 2, 1]


def test_training_windows_predict_every_training_item_once(synth_ds):
    inp, tgt = training_windows(synth_ds, 4)
    assert inp.shape == tgt.shape and inp.shape[1] == 4
    # next-item pairs: each input is followed by its target in some user's training items
    n_train = synth_ds.lengths - 2
    assert (tgt > 0).sum() == (n_train - 1).sum()
    pairs = set()
    for u in range(synth_ds.n_users):
        s = synth_ds.sequence(u)[: n_train[u]]
        pairs.update(zip(s[:-1].tolist(), s[1:].tolist()))
    m = tgt > 0
    assert set(zip((inp[m] - 1).tolist(), (tgt[m] - 1).tolist())) <= pairs
    # left-aligned: padding only after the items; targets shift the inputs by one
    assert ((inp > 0) == m).all() and (np.diff(m.astype(int), axis=1) <= 0).all()
    assert (inp[:, 1:][m[:, 1:]] == tgt[:, :-1][m[:, 1:]]).all()
    assert (inp[:, 0] > 0).all()  # no empty window


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("model", ["sasrec", "gru4rec"])
@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_interface_shapes_and_loss(model, loss):
    torch.manual_seed(0)
    cfg = DownstreamConfig(model=model, loss=loss, hidden=16, heads=2)
    m = build_model(cfg, n_items=30, max_len=6).eval()
    assert isinstance(m, {"sasrec": SASRec, "gru4rec": GRU4Rec}[model])
    seq = torch.tensor([[3, 4, 5, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    lens = torch.tensor([3, 6])
    assert m(seq, lens).shape == (2, 16)
    assert m.predict({"item_seq": seq, "seq_len": lens}).shape == (2, 30)
    cand = torch.tensor([[1, 2, 3], [4, 5, 6]])
    full = m.predict({"item_seq": seq, "seq_len": lens})
    torch.testing.assert_close(m.predict({"item_seq": seq, "seq_len": lens, "candidates": cand}),
                               full.gather(1, cand - 1))
    batch = {"item_seq": seq, "targets": torch.tensor([[4, 5, 6, 0, 0, 0], [2, 3, 4, 5, 6, 7]]),
             "negatives": torch.tensor([[9, 9, 9, 0, 0, 0], [9, 9, 9, 9, 9, 9]])}
    out = m.calculate_loss(batch)
    assert out.ndim == 0 and torch.isfinite(out)
    if loss == "ce":  # a fresh model with near-zero item vectors is close to uniform: log(30)
        assert out.detach().item() == pytest.approx(np.log(30), rel=0.05)


@pytest.mark.parametrize("model", ["sasrec", "gru4rec"])
def test_causal_and_padding_do_not_leak(model):
    """The state at position t ignores later items, padding content and the padded width."""
    torch.manual_seed(0)
    m = build_model(DownstreamConfig(model=model, hidden=16, heads=2, dropout=0.0), n_items=40, max_len=8).eval()
    seq = torch.tensor([[5, 9, 2, 7, 0, 0, 0, 0]])
    lens = torch.tensor([4])
    ref = m(seq, lens)
    later = seq.clone()
    later[0, 4:] = torch.tensor([11, 12, 13, 14])  # garbage where the padding was
    torch.testing.assert_close(m(later, lens), ref)
    torch.testing.assert_close(m(seq[:, :5], lens), ref)  # a narrower padded width
    states = m.states(torch.tensor([[5, 9, 2, 7, 3, 1, 4, 6]]))
    torch.testing.assert_close(states[:, 3], ref)  # the full sequence's state at t = 3
    with torch.no_grad():  # the padding row of an ID table is zero and stays out of real positions
        assert m.items.weight()[0].abs().sum() == 0


def test_item_gather_backward_is_reproducible_with_two_threads():
    """Advanced indexing's backward on CPU can accumulate repeated rows (the padding row above all)
    in a thread-dependent order; ``gather_rows`` (index_select) must give bit-identical gradients."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5000, 128, generator=g, requires_grad=True)
    idx = torch.randint(0, 5000, (256, 10), generator=g)
    idx[torch.rand(256, 10, generator=g) < 0.5] = 0  # the padding row, repeated as in short histories
    up = torch.randn(256, 10, 128, generator=g)
    grads = []
    for _ in range(10):
        w.grad = None
        (gather_rows(w, idx) * up).sum().backward()
        grads.append(w.grad.clone())
    assert all(torch.equal(grads[0], x) for x in grads[1:])
    torch.testing.assert_close(gather_rows(w, idx), w[idx])


def test_scorer_matches_dataset_layout(synth_ds):
    torch.manual_seed(0)
    m = SASRec(DownstreamConfig(hidden=16, heads=2), synth_ds.n_items, max_len=10).eval()
    hist = synth_ds.histories("test")[:5]
    cand = synth_ds.negatives(0)[:5]
    sc = ModelScorer(m, 10)(hist, cand)
    seq, lens = left_align(hist)
    with torch.no_grad():
        want = m.predict({"item_seq": torch.as_tensor(seq), "seq_len": torch.as_tensor(lens)}).numpy()
    np.testing.assert_allclose(sc, np.take_along_axis(want, cand, axis=1), rtol=1e-5, atol=1e-6)


def test_item_table_from_embeddings_is_a_trainable_projection_of_frozen_vectors():
    e = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    t = ItemTable(7, 4, e)
    names = {n for n, _ in t.named_parameters()}
    assert names == {"proj.weight", "proj.bias"} and "frozen" in dict(t.named_buffers())
    w = t.weight()
    assert w.shape == (8, 4) and w[0].abs().sum() == 0
    torch.testing.assert_close(w[1:], t.proj(t.frozen))
    # the default: centred and whitened with shrinkage ε = 1, by hand through the SVD c = U S V^T
    # (eigenvalues S²/n); compared as Gram matrices, which do not depend on the eigenvectors' signs
    c = e.astype(np.float64) - e.mean(0)
    u, sv, _ = np.linalg.svd(c, full_matrices=False)
    lam = sv ** 2 / len(c)
    by_hand = u * sv / np.sqrt(lam + 1.0 * lam.sum() / c.shape[1])
    frozen = t.frozen.double().numpy()
    np.testing.assert_allclose(frozen @ frozen.T, by_hand @ by_hand.T, atol=1e-5)
    st = ItemTable(7, 4, e, transform="standardize", eps=1e-6).frozen.double().numpy()
    np.testing.assert_allclose(st, c / np.sqrt(c.var(0) + 1e-6 * c.var(0).mean()), atol=1e-5)
    raw = ItemTable(7, 4, e, transform="raw")
    torch.testing.assert_close(raw.weight()[1:], raw.proj(torch.as_tensor(e)))
    l2 = ItemTable(7, 4, e, transform="l2")
    torch.testing.assert_close(l2.weight()[1:], l2.proj(torch.nn.functional.normalize(torch.as_tensor(e), dim=1)))


def test_per_seed_tables_initialise_the_downstream_model_of_their_seed(synth_ds, monkeypatch):
    import vlm2rec_lab.task2.train as task2_train

    seen = {}
    real_train = task2_train.train

    def recording_train(dataset, cfg, seed=0, embeddings=None, log=None):
        seen[seed] = None if embeddings is None else float(embeddings[0, 0])
        return real_train(dataset, cfg, seed, embeddings, log)

    monkeypatch.setattr(task2_train, "train", recording_train)
    rng = np.random.default_rng(0)
    tables = {s: ItemEmbeddings(np.full((synth_ds.n_items, 4), float(s)) + rng.normal(size=(synth_ds.n_items, 4)) * 1e-3, f"s{s}")
              for s in (0, 1)}
    tables = {s: ItemEmbeddings(t.matrix.astype(np.float32), t.source) for s, t in tables.items()}
    cfg = DownstreamConfig(epochs=1, batch_size=64)
    res = run(synth_ds, cfg, [1, 0], tables)
    assert seen == {1: pytest.approx(float(tables[1].matrix[0, 0])), 0: pytest.approx(float(tables[0].matrix[0, 0]))}
    assert res.init["per_seed"]["1"]["source"] == "s1"
    with pytest.raises(ValueError, match=r"no item embeddings for seeds \[2\]"):
        run(synth_ds, cfg, [0, 2], tables)


def test_init_transforms_undo_a_shared_direction():
    # 50 items in a narrow cone, as VLM item embeddings are: one shared direction plus small spread
    rng = np.random.default_rng(1)
    spread = rng.normal(size=(50, 8)) * np.array([1, 1, 1, 1, 0.5, 0.5, 0.1, 0.1])
    e = (np.full(8, 30.0) + spread).astype(np.float32)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    assert (unit @ unit.T).mean() > 0.99  # L2 normalisation alone leaves the rows nearly identical
    st = prepare_init_table(e, "standardize", eps=1e-6).astype(np.float64)
    np.testing.assert_allclose(st.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(st.std(0), 1.0, rtol=1e-4)
    wh = prepare_init_table(e, "whiten", eps=1e-6).astype(np.float64)
    np.testing.assert_allclose(wh.T @ wh / len(wh), np.eye(8), atol=1e-4)  # identity covariance (full rank, small ε)
    # with shrinkage ε, direction k's variance is λ_k / (λ_k + ε·mean λ): near 1 for the strong, λ-proportional for the weak
    shrunk = prepare_init_table(e, "whiten", eps=1.0).astype(np.float64)
    lam = np.linalg.eigvalsh(np.cov((e - e.mean(0)).T, bias=True))
    np.testing.assert_allclose(np.sort(shrunk.var(0)), np.sort(lam / (lam + lam.mean())), rtol=1e-3)
    for x in (st, wh):
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        assert abs((u @ u.T)[~np.eye(50, dtype=bool)].mean()) < 0.05  # the shared direction is gone
    # ε is relative: a scaled table gives the same standardised table
    np.testing.assert_allclose(prepare_init_table(e * 1e-3, "standardize"), prepare_init_table(e, "standardize"), atol=1e-4)
    np.testing.assert_allclose(np.abs(prepare_init_table(e * 1e-3)), np.abs(prepare_init_table(e)), atol=1e-4)
    # a constant dimension stays 0 instead of dividing by zero
    const = e.copy()
    const[:, 0] = 7.0
    assert np.isfinite(prepare_init_table(const, "standardize")).all() and np.abs(prepare_init_table(const, "standardize")[:, 0]).max() == 0
    assert np.isfinite(prepare_init_table(const)).all()
    np.testing.assert_array_equal(prepare_init_table(e, "raw"), e)
    with pytest.raises(ValueError, match="init_transform"):
        DownstreamConfig(init_transform="pca")


# --------------------------------------------------------------------------- embeddings on disk


def test_load_embeddings_from_npy_and_ids_follows_the_id_order(synth_ds, tmp_path):
    ids = synth_ds.items["item_id"].tolist()
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(ids))
    x = rng.normal(size=(len(ids), 6)).astype(np.float32)
    np.save(tmp_path / "e.npy", x[perm])
    (tmp_path / "ids.txt").write_text("\n".join(ids[k] for k in perm) + "\n\n")
    emb = load_item_embeddings(synth_ds, tmp_path / "e.npy", tmp_path / "ids.txt")
    np.testing.assert_array_equal(emb.matrix, x)
    assert emb.missing == [] and emb.summary()["dim"] == 6
    with pytest.raises(ValueError, match="needs --item-ids"):
        load_item_embeddings(synth_ds, tmp_path / "e.npy")


def test_missing_items_are_reported_not_zero_filled(synth_ds, tmp_path):
    ids = synth_ds.items["item_id"].tolist()
    keep = ids[3:] + ["not-in-dataset"]
    x = np.random.default_rng(0).normal(size=(len(keep), 4)).astype(np.float32)
    _write_run(tmp_path / "run", keep, {"F": x})
    with pytest.raises(KeyError, match=rf"3 of {len(ids)} dataset items have no embedding \(e.g. {ids[0]}, {ids[1]}"):
        load_item_embeddings(synth_ds, tmp_path / "run")
    with pytest.warns(UserWarning, match="filled with the mean"):
        emb = load_item_embeddings(synth_ds, tmp_path / "run", on_missing="mean")
    assert emb.missing == ids[:3] and emb.extra == 1 and emb.summary()["missing"] == 3
    np.testing.assert_allclose(emb.matrix[0], x[:-1].mean(0), rtol=1e-5)  # the mean, never zeros
    with pytest.raises(FileNotFoundError, match="no item embeddings for modality V"):
        load_item_embeddings(synth_ds, tmp_path / "run", modality="V")


def test_bad_embedding_files_say_which_file(synth_ds, tmp_path):
    ids = synth_ds.items["item_id"].tolist()
    np.save(tmp_path / "e.npy", np.zeros((len(ids) - 1, 3), dtype=np.float32))
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    with pytest.raises(ValueError, match=rf"e.npy: {len(ids) - 1} rows but .*ids.txt lists {len(ids)}"):
        load_item_embeddings(synth_ds, tmp_path / "e.npy", tmp_path / "ids.txt")
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="dup.txt:3: item id 'a' repeats line 1"):
        load_item_embeddings(synth_ds, tmp_path / "e.npy", tmp_path / "dup.txt")


# --------------------------------------------------------------------------- training on the synthetic domain


def test_sasrec_beats_popularity_and_is_deterministic(synth_ds):
    cfg = DownstreamConfig(**FAST)
    a = run(synth_ds, cfg, seeds=[0])
    pop = evaluate(synth_ds, PopularityScorer(synth_ds), seeds=[0], progress=False).sampled.loc[0]
    assert a.test.sampled.loc[0, "NDCG@10"] > pop["NDCG@10"] + 0.05
    assert a.runs[0]["best_epoch"] >= 1 and a.test.full is not None
    b = run(synth_ds, cfg, seeds=[0])
    assert a.test.sampled.equals(b.test.sampled) and a.test.full.equals(b.test.full)
    assert a.cold_start["users"].sum() == synth_ds.n_users


def test_gru4rec_bce_trains_and_beats_popularity(synth_ds):
    r = train(synth_ds, DownstreamConfig(**{**FAST, "model": "gru4rec", "loss": "bce", "epochs": 40, "patience": 10}), seed=1)
    assert r.history[0]["loss"] > r.history[r.best_epoch - 1]["loss"]
    sc = ModelScorer(r.model, synth_ds.max_len)
    got = evaluate(synth_ds, sc, seeds=[1], progress=False).sampled.loc[1, "NDCG@10"]
    pop = evaluate(synth_ds, PopularityScorer(synth_ds), seeds=[1], progress=False).sampled.loc[1, "NDCG@10"]
    assert got > pop + 0.05


def test_embedding_init_uses_each_items_own_vector(synth_ds, synth_raw, tmp_path):
    """Initialisation from a run folder learns far beyond popularity, and through what each item's
    vector says: the same vectors shuffled across items (each on another item) fall to about
    popularity, since a frozen table under a trainable Linear cannot be turned into free ID codes.

    Measured once (seeds 0 and 1, test NDCG@10, one CPU thread): popularity 0.1555, init(F) 0.3874,
    the shuffled F 0.1329 (also: ID 0.4275, Gaussian vectors 0.1789, T alone 0.4158, V alone
    0.2864). ID beating init(F) here belongs to this domain and these stand-in vectors; not asserted."""
    ids = synth_ds.items["item_id"].tolist()
    _write_run(tmp_path / "run", ids, _latent_embeddings(synth_raw, ids))
    cfg = DownstreamConfig(**FAST)
    seeds = [0, 1]
    table = load_item_embeddings(synth_ds, tmp_path / "run", modality="F")
    assert table.summary()["dim"] == 48 and table.missing == []
    init = run(synth_ds, cfg, seeds, table)
    assert init.init["kind"] == "embeddings" and init.init["dim"] == 48
    perm = np.random.default_rng(100).permutation(len(ids))
    shuffled = run(synth_ds, cfg, seeds, ItemEmbeddings(table.matrix[perm], "shuffled"))
    a, b = init.test.mean()["NDCG@10"], shuffled.test.mean()["NDCG@10"]
    pop = evaluate(synth_ds, PopularityScorer(synth_ds), seeds=seeds, progress=False).mean()["NDCG@10"]
    seen = f"init(F) {a:.4f}, shuffled {b:.4f}, popularity {pop:.4f}"
    assert a > pop + 0.15, seen
    assert a > b + 0.15, seen
    assert b < pop + 0.05, seen  # no better than popularity, give or take


def test_cli_downstream_json(synth_ds, synth_raw, tmp_path, capsys):
    ids = synth_ds.items["item_id"].tolist()
    x = _latent_embeddings(synth_raw, ids)["T"]
    np.save(tmp_path / "t.npy", x)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    common = ["--data", synth_ds.path, "--seeds", "0-1", "--epochs", "2", "--batch-size", "128", "--json"]
    code = main([str(v) for v in ["downstream", "--model", "gru4rec", "--init", tmp_path / "t.npy", "--item-ids",
                                  tmp_path / "ids.txt", "--out", tmp_path / "out", *common]])
    out, _ = capsys.readouterr()
    assert code == 0
    res = json.loads(out)
    for which in ("sampled", "full"):
        assert set(res["test"][which]["per_seed"]) == {"0", "1"}
        assert set(res["test"][which]["mean"]) == {"HR@10", "NDCG@10", "HR@20", "NDCG@20"}
    assert res["init"]["kind"] == "embeddings" and [r["seed"] for r in res["runs"]] == [0, 1]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "result.json", "metrics.csv", "cold_start.csv", "model_seed0.pt", "model_seed1.pt"}
    code = main([str(v) for v in ["downstream", "--model", "sasrec", "--init", tmp_path / "t.npy", *common]])
    assert code == 2 and "needs --item-ids" in capsys.readouterr().err
    code = main([str(v) for v in ["downstream", "--model", "sasrec", "--init", tmp_path / "nowhere", *common]])
    assert code == 2 and "must be 'id', a run folder or a .npy" in capsys.readouterr().err
    _write_run(tmp_path / "run", ids[1:], {"F": x[1:]})
    code = main([str(v) for v in ["downstream", "--model", "sasrec", "--init", tmp_path / "run", *common]])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {tmp_path / 'run'}/embeddings/item_F.npy: 1 of {len(ids)} dataset items have no embedding (e.g. {ids[0]})" in err
    code = main([str(v) for v in ["downstream", "--model", "sasrec", "--init", tmp_path / "run", "--on-missing", "mean",
                                  "--threads", "1", *common[:-3], "--json"]])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["config"]["threads"] == 1 and res["init"]["missing"] == 1, res["init"]


# --------------------------------------------------------------------------- Beauty reproduction (slow)

BEAUTY_SEEDS = [0, 1]


def _report(r, capsys) -> None:
    with capsys.disabled():
        print(f"\n[Task 2, Beauty] {r.test.name}\n{r.test.sampled.round(4)}\n{r.test.full.round(4)}\n{r.runs}")


@pytest.mark.slow
def test_beauty_sasrec_matches_the_pytorch_port(beauty, capsys):
    """Bar: pmixer/SASRec.pytorch on this file, maxlen 10, 100 negatives: HR@10 0.48-0.49, NDCG@10
    0.31-0.32 after ~3 minutes on 2 cores. Full-softmax CE SASRec should match or beat it.
    Runs on one thread (the autouse fixture): the numbers equal docs/task2.md's OMP_NUM_THREADS=1 table."""
    r = run(beauty, DownstreamConfig(model="sasrec", max_len=10), BEAUTY_SEEDS)
    _report(r, capsys)
    mean = r.test.mean()
    assert mean["HR@10"] >= 0.48 and mean["NDCG@10"] >= 0.31, r.test.sampled
    # wall time depends on the machine's load; the epoch count does not (the port needs ~40)
    assert all(x["best_epoch"] <= 25 for x in r.runs), r.runs


@pytest.mark.slow
def test_beauty_gru4rec(beauty, capsys):
    r = run(beauty, DownstreamConfig(model="gru4rec", max_len=10), [0])
    _report(r, capsys)
    assert r.test.mean()["HR@10"] >= 0.40, r.test.sampled
