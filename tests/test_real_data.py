"""The real data beside the project (../shared/data/real), through the real readers."""
import numpy as np

from conftest import real_data
from vlm2rec_lab.config import PrepareConfig
from vlm2rec_lab.data.dataset import build, prepare
from vlm2rec_lab.data.formats import read_raw
from vlm2rec_lab.evaluate import evaluate
from vlm2rec_lab.scorers import PopularityScorer, RandomScorer


def test_beauty_through_the_p5_reader(beauty):
    assert beauty.stats()["users"] == 22_363
    assert beauty.stats()["items"] == 12_101
    assert beauty.stats()["interactions"] == 198_502
    # the file is already a 5-core: the iterated k-core removes nothing and stops after one round
    assert beauty.manifest["drops"]["kcore_rows"] == 0 and beauty.manifest["kcore_rounds"] == 1
    assert beauty.lengths.min() >= 5
    assert beauty.manifest["has_titles"] is False


def test_beauty_loads_back_as_built(beauty):
    # the folder read back equals the dataset built in memory from the file (how fast it loads is a
    # benchmark's business, bench/, not a test's)
    src = real_data("amazon2014_beauty") / "user_sequence.txt"
    built = prepare(PrepareConfig(format="p5", inputs=[str(src)], require_images=False), None, progress=False)
    assert beauty.fingerprint == built.fingerprint
    assert np.array_equal(beauty.offsets, built.offsets) and np.array_equal(beauty.seq, built.seq)
    assert np.array_equal(beauty.timestamps, built.timestamps) and list(beauty.user_ids) == list(built.user_ids)
    assert beauty.items["item_id"].tolist() == built.items["item_id"].tolist()
    assert all(np.array_equal(beauty.negatives(s), built.negatives(s)) for s in built.seeds)


def test_beauty_sequences_match_the_file(beauty):
    src = real_data("amazon2014_beauty") / "user_sequence.txt"
    with open(src) as f:
        first = f.readline().split()
    assert beauty.user_ids[0] == first[0]
    ids = beauty.items["item_id"].to_numpy()
    assert list(ids[beauty.sequence(0)]) == first[1:]


def test_popularity_beats_random_on_beauty(beauty):
    pop = evaluate(beauty, PopularityScorer(beauty), progress=False).mean()
    rnd = evaluate(beauty, RandomScorer(beauty.n_items), progress=False).mean()
    assert pop["HR@10"] > rnd["HR@10"] + 0.1 and pop["NDCG@10"] > rnd["NDCG@10"] + 0.05


def test_scientific_through_the_atomic_reader_with_titles(tmp_path):
    src = real_data("amazon2018_scientific")
    ds = prepare(PrepareConfig(format="atomic", inputs=[str(src)], require_images=False), tmp_path / "sci", progress=False)
    s = ds.stats()
    assert (s["users"], s["items"], s["interactions"]) == (8_442, 4_385, 59_427)
    assert ds.manifest["has_titles"] and ds.items["title"].notna().all()
    assert ds.manifest["drops"]["no_title"] == 0 and ds.manifest["drops"]["no_metadata"] == 0
    titles = dict(line.rstrip("\n").split("\t", 1) for line in open(src / "sci.text", encoding="utf-8") if not line.startswith("item_id:"))
    some = ds.items.iloc[0]
    assert some["title"] == " ".join(titles[some["item_id"]].split()[:32])
    # the leave-one-out split reproduces the files' valid and test targets
    idx2item = dict(line.rstrip("\n").split("\t")[::-1] for line in open(src / "sci.item2index"))
    idx2user = dict(line.rstrip("\n").split("\t")[::-1] for line in open(src / "sci.user2index"))
    ids = ds.items["item_id"].to_numpy()
    user_pos = {u: k for k, u in enumerate(ds.user_ids)}
    for split in ("test", "valid"):
        tgt = ds.targets(split)
        lines = open(src / f"sci.{split}.inter").read().splitlines()[1:]
        for line in lines[:500]:
            u, _, item = line.split("\t")
            assert ids[tgt[user_pos[idx2user[u]]]] == idx2item[item]


def test_beauty_kcore_10_shrinks_and_is_a_fixed_point():
    src = real_data("amazon2014_beauty") / "user_sequence.txt"
    raw = read_raw("p5", [str(src)])
    cfg = PrepareConfig(format="p5", inputs=[str(src)], require_images=False, k_core=10, seeds=(0,))
    ds = build(raw, cfg, progress=False)
    assert ds.n_users < 22_363 and ds.lengths.min() >= 10
    assert np.bincount(ds.seq, minlength=ds.n_items).min() >= 10
