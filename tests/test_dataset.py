import json

import numpy as np
import pytest

from vlm2rec_lab.config import PrepareConfig
from vlm2rec_lab.data.cleaning import clean_title, kcore
from vlm2rec_lab.data.dataset import Dataset, build, pad_right_aligned, prepare, save
from vlm2rec_lab.data.negatives import sample_negatives
from vlm2rec_lab.data.formats import read_raw
from vlm2rec_lab.io import DataFormatError


def test_clean_title():
    assert clean_title("  Rose &amp;amp; Gold <b>Serum</b>\n 30ml ") == "Rose & Gold Serum 30ml"
    assert clean_title(" ".join(map(str, range(50))), max_tokens=4) == "0 1 2 3"
    assert clean_title("   ") is None
    assert clean_title(None) is None
    assert clean_title(["not", "a", "string"]) is None


def test_kcore_is_iterated_until_stable():
    # Item z has 2 users; dropping it leaves user w with 1 row, which drops item y below 2, ...
    # A single pass at k=2 keeps rows that the fixed point removes.
    pairs = [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y"), ("w", "y"), ("w", "z"), ("c", "z")]
    users = {u: k for k, u in enumerate(dict.fromkeys(p[0] for p in pairs))}
    items = {i: k for k, i in enumerate(dict.fromkeys(p[1] for p in pairs))}
    u = np.array([users[p[0]] for p in pairs])
    i = np.array([items[p[1]] for p in pairs])
    keep, rounds = kcore(u, i, 2)
    kept = {pairs[k] for k in np.flatnonzero(keep)}
    assert kept == {("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")}
    assert rounds >= 2
    for arr in (u[keep], i[keep]):
        assert np.bincount(arr)[np.unique(arr)].min() >= 2


def test_kcore_random_fixed_point():
    rng = np.random.default_rng(0)
    u, i = rng.integers(0, 300, 4000), rng.zipf(1.6, 4000) % 400
    keep, _ = kcore(u, i, 5)
    assert np.bincount(u[keep])[np.unique(u[keep])].min() >= 5
    assert np.bincount(i[keep])[np.unique(i[keep])].min() >= 5
    keep2, rounds2 = kcore(u[keep], i[keep], 5)
    assert keep2.all() and rounds2 == 1


def test_pad_right_aligned():
    flat = np.arange(10)
    out = pad_right_aligned(flat, np.array([0, 5, 9]), np.array([4, 8, 9]), 3)
    assert out.tolist() == [[1, 2, 3], [5, 6, 7], [-1, -1, -1]]
    assert pad_right_aligned(flat, np.array([0]), np.array([2]), 0).tolist() == [[0, 1]]


FILLER = [("zz", x, t) for t, x in enumerate("pqrstuvw")]  # widens the catalogue so negatives exist


def _prep(tmp_path, lines, **kw):
    lines = lines + FILLER
    p = tmp_path / "reviews.json"
    p.write_text("\n".join(json.dumps(dict(zip(("reviewerID", "asin", "unixReviewTime"), r))) for r in lines) + "\n")
    cfg = PrepareConfig(format="amazon2018", inputs=[str(p)], require_images=False, **{"k_core": 1, "num_negatives": 2, "seeds": (0,), **kw})
    return build(read_raw("amazon2018", [str(p)]), cfg, progress=False)


def test_chronological_order_ties_keep_file_order_and_duplicates_drop(tmp_path):
    lines = [("u", "c", 30), ("u", "b", 10), ("u", "a", 10), ("u", "b", 10), ("u", "d", 40), ("u", "e", 40),
             ("v", "a", 1), ("v", "b", 2), ("v", "c", 3), ("v", "d", 4), ("v", "e", 5)]
    ds = _prep(tmp_path, lines)
    ids = ds.items["item_id"].tolist()
    assert [ids[k] for k in ds.sequence(0)] == ["b", "a", "c", "d", "e"]
    assert ds.manifest["drops"]["duplicate_rows"] == 1
    assert ds.n_interactions == 10 + len(FILLER)


def test_leave_one_out_split_and_training_examples(tmp_path):
    lines = [("u", x, t) for t, x in enumerate("abcdef")] + [("v", x, t) for t, x in enumerate("fed")]
    ds = _prep(tmp_path, lines, max_len=3)
    ids = np.array(ds.items["item_id"].tolist())
    name = lambda arr: ["".join(ids[r[r >= 0]]) for r in arr]  # noqa: E731
    assert list(ids[ds.targets("test")]) == ["f", "d", "w"]
    assert list(ids[ds.targets("valid")]) == ["e", "e", "v"]
    assert name(ds.histories("test")) == ["cde", "fe", "tuv"]
    assert name(ds.histories("valid", max_len=0)) == ["abcd", "f", "pqrstu"]
    users, hist, tgt = ds.train_examples("last")
    assert users.tolist() == [0, 2] and name(hist) == ["abc", "rst"] and list(ids[tgt]) == ["d", "u"]
    users, hist, tgt = ds.train_examples("all_prefixes")
    assert users.tolist() == [0, 0, 0] + [2] * 5
    assert name(hist)[:3] == ["a", "ab", "abc"] and "".join(ids[tgt]) == "bcd" + "qrstu"
    off, seen = ds.seen_items("test")
    assert off.tolist()[:3] == [0, 5, 7] and "".join(ids[seen[:7]]) == "abcdefe"
    assert ds.train_item_counts()[list(ids).index("a")] == 1


def test_negatives_are_unseen_distinct_deterministic_and_uniform():
    rng = np.random.default_rng(1)
    n_users, n_items = 400, 150
    lengths = rng.integers(3, 40, n_users)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    seq = np.concatenate([rng.choice(n_items, size=L, replace=False) for L in lengths]).astype(np.int32)
    neg = sample_negatives(offsets, seq, n_items, 100, seeds=(0,))[0]
    assert neg.shape == (n_users, 100)
    for u in range(n_users):
        assert len(set(neg[u])) == 100
        assert not set(neg[u]) & set(seq[offsets[u]:offsets[u + 1]])
    both = sample_negatives(offsets, seq, n_items, 100, seeds=(1, 0))
    assert np.array_equal(neg, both[0])  # a seed's draw does not depend on the other seeds
    assert not np.array_equal(neg, both[1])
    # uniform over the complement: each unseen item is drawn with prob 100 / (n_items - len)
    counts = np.zeros(n_items)
    expected = np.zeros(n_items)
    for u in range(n_users):
        counts[neg[u]] += 1
        unseen = np.setdiff1d(np.arange(n_items), seq[offsets[u]:offsets[u + 1]])
        expected[unseen] += 100 / unseen.size
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 2 * n_items  # ~n_items degrees of freedom


def test_negatives_error_when_a_user_saw_too_much():
    offsets = np.array([0, 8])
    seq = np.arange(8, dtype=np.int32)
    with pytest.raises(ValueError, match="fewer than 5 unseen items"):
        sample_negatives(offsets, seq, 10, 5)


def test_require_titles_auto_and_drop_counts(tmp_path):
    p = tmp_path / "reviews.json"
    lines = [("u%d" % u, x, t) for u in range(3) for t, x in enumerate("abcde")] + FILLER
    p.write_text("\n".join(json.dumps(dict(zip(("reviewerID", "asin", "unixReviewTime"), r))) for r in lines) + "\n")
    (tmp_path / "meta_x.json").write_text('{"asin": "a", "title": "A"}\n{"asin": "b", "title": " "}\n{"asin": "c", "title": "C"}\n{"asin": "e", "title": "E"}\n'
                                        + "".join(f'{{"asin": "{x}", "title": "{x}"}}\n' for x in "pqrstuvw"))
    cfg = PrepareConfig(format="amazon2018", inputs=[str(tmp_path)], require_images=False, k_core=1, num_negatives=1, seeds=(0,))
    ds = build(read_raw("amazon2018", cfg.inputs), cfg, progress=False)
    assert ds.manifest["drops"]["no_title"] == 1 and ds.manifest["drops"]["no_metadata"] == 1
    assert sorted(ds.items["item_id"])[:3] == ["a", "c", "e"] and ds.n_items == 11
    # Without metadata (auto): titles are not required and nothing is dropped
    cfg2 = PrepareConfig(format="amazon2018", inputs=[str(p)], require_images=False, k_core=1, num_negatives=1, seeds=(0,))
    assert build(read_raw("amazon2018", cfg2.inputs), cfg2, progress=False).n_items == 13
    cfg3 = PrepareConfig(format="amazon2018", inputs=[str(p)], require_images=False, require_titles="yes", k_core=1)
    with pytest.raises(DataFormatError, match="no item metadata"):
        build(read_raw("amazon2018", cfg3.inputs), cfg3, progress=False)


def test_save_load_round_trip(synth_ds, tmp_path):
    ds = synth_ds
    again = Dataset.load(ds.path)
    assert again.fingerprint == ds.fingerprint
    assert np.array_equal(again.seq, ds.seq) and np.array_equal(again.offsets, ds.offsets)
    assert again.items["title"].tolist() == ds.items["title"].tolist()
    assert again.negatives(4).shape == (ds.n_users, 100)
    with pytest.raises(FileNotFoundError, match="prepared seeds"):
        again.negatives(9)
    s = ds.stats()
    assert s["avg_length"] == pytest.approx(s["interactions"] / s["users"])
    assert s["sparsity"] == pytest.approx(1 - s["interactions"] / (s["users"] * s["items"]))


def test_prepare_is_deterministic(synth_raw, synth_ds, tmp_path):
    cfg = PrepareConfig(format="amazon2018", inputs=[str(p) for p in sorted(synth_raw.glob("*.json.gz"))],
                        images=str(synth_raw / "images"))
    ds = prepare(cfg, None, progress=False)
    assert ds.manifest["fingerprint"] == synth_ds.fingerprint


def test_failed_prepare_leaves_no_folder(tmp_path):
    p = tmp_path / "reviews.json"
    p.write_text('{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}\nbroken\n')
    out = tmp_path / "out"
    cfg = PrepareConfig(format="amazon2018", inputs=[str(p)], require_images=False)
    with pytest.raises(DataFormatError, match="reviews.json:2"):
        prepare(cfg, out, progress=False)
    assert not out.exists()


def test_load_rejects_non_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        Dataset.load(tmp_path)


def test_save_copies_every_seed_and_refuses_to_clobber(synth_ds, tmp_path):
    ds = Dataset.load(synth_ds.path)  # negatives not read yet: saving must still copy them all
    out = tmp_path / "copy"
    save(ds, out)
    assert sorted(p.name for p in (out / "negatives").iterdir()) == [f"seed_{s}.npy" for s in range(5)]
    assert Dataset.load(out).fingerprint == synth_ds.fingerprint
    with pytest.raises(FileExistsError):
        save(ds, out)
