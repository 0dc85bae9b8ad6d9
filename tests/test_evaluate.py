import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import ttest_rel

from vlm2rec_lab.evaluate import (
    best_method, chance_metrics, evaluate, full_ranks, paired_ttest, rank_metrics, ranks_from_scores, results_table,
)
from vlm2rec_lab.scorers import CooccurrenceScorer, PopularityScorer, RandomScorer, make_scorer


def test_rank_metrics_hand_computed():
    pos = [0.5, 0.5, 0.9]
    neg = [[0.9, 0.1, 0.1], [0.5, 0.5, 0.1], [0.1, 0.2, 0.3]]
    assert ranks_from_scores(pos, neg).tolist() == [1.0, 1.0, 0.0]
    m = rank_metrics(pos, neg, ks=(1, 2))
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["NDCG@1"] == pytest.approx(1 / 3)
    assert m["HR@2"] == pytest.approx(1.0)
    assert m["NDCG@2"] == pytest.approx((2 / math.log2(3) + 1) / 3)


def test_rank_metrics_keys_and_torch_input():
    m = rank_metrics(torch.tensor([1.0, 0.0]), torch.tensor([[0.0] * 100, [1.0] * 100]))
    assert list(m) == ["HR@10", "NDCG@10", "HR@20", "NDCG@20"]
    assert m["HR@10"] == 0.5 and m["NDCG@10"] == 0.5


def test_perfect_ranking_gives_one_and_worst_gives_zero():
    rng = np.random.default_rng(0)
    neg = rng.random((50, 100))
    assert rank_metrics(np.full(50, 2.0), neg) == {"HR@10": 1.0, "NDCG@10": 1.0, "HR@20": 1.0, "NDCG@20": 1.0}
    assert rank_metrics(np.full(50, -1.0), neg) == {"HR@10": 0.0, "NDCG@10": 0.0, "HR@20": 0.0, "NDCG@20": 0.0}


def test_constant_scorer_never_beats_chance():
    m = rank_metrics(np.zeros(20), np.zeros((20, 100)))  # mid-rank: 50
    chance = chance_metrics(100)
    assert m["HR@10"] == 0.0 and all(m[k] <= chance[k] for k in m)
    assert chance["HR@10"] == pytest.approx(10 / 101)
    assert chance["NDCG@10"] == pytest.approx(sum(1 / math.log2(r + 2) for r in range(10)) / 101)


def test_nan_scores_are_an_error():
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics([float("nan")], [[0.0]])
    with pytest.raises(ValueError, match="expected pos"):
        rank_metrics([0.0, 1.0], [[0.0]])


def test_full_ranks_mask_history_but_never_the_target():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5],
                       [0.1, 0.9, 0.9, 0.2, 0.3]])
    targets = np.array([3, 2])
    # user 0 saw items 0, 1 and also 3 (a repeat of the target); user 1 saw nothing
    off, items = np.array([0, 3, 3]), np.array([0, 1, 3])
    assert full_ranks(scores, targets, off, items).tolist() == [1.0, 0.5]


def test_random_scorer_is_at_chance_and_popularity_beats_it_on_synthetic(synth_ds):
    chance = chance_metrics(100)
    rnd = evaluate(synth_ds, RandomScorer(synth_ds.n_items), progress=False)
    assert abs(rnd.mean()["HR@10"] - chance["HR@10"]) < 0.03
    pop = evaluate(synth_ds, PopularityScorer(synth_ds), progress=False)
    assert pop.mean()["NDCG@10"] > rnd.mean()["NDCG@10"] + 0.02
    # per-seed rows for every prepared seed; different seeds give different random results
    assert rnd.sampled.index.tolist() == [0, 1, 2, 3, 4]
    assert rnd.sampled["HR@10"].nunique() > 1


def test_full_ranking_agrees_with_a_plain_loop(synth_ds):
    sc = CooccurrenceScorer(synth_ds)
    ev = evaluate(synth_ds, sc, seeds=[0], full_ranking=True, batch_size=97, progress=False)
    hist, tgt = synth_ds.histories("test"), synth_ds.targets("test")
    ranks = []
    for u in range(synth_ds.n_users):
        s = sc(hist[u:u + 1], None)[0]
        seen = set(synth_ds.sequence(u)[:-1]) - {tgt[u]}
        others = np.array([s[i] for i in range(synth_ds.n_items) if i not in seen and i != tgt[u]])
        ranks.append((others > s[tgt[u]]).sum() + 0.5 * (others == s[tgt[u]]).sum())
    ranks = np.array(ranks)
    assert ev.full.loc[0, "HR@10"] == pytest.approx((ranks < 10).mean())
    assert ev.full.loc[0, "NDCG@20"] == pytest.approx(np.where(ranks < 20, 1 / np.log2(ranks + 2), 0).mean())


def test_cooccurrence_counts_training_transitions_only(synth_ds):
    sc = CooccurrenceScorer(synth_ds)
    total_pairs = int((np.maximum(synth_ds.lengths - 3, 0)).sum())
    assert sc.matrix.sum() == total_pairs
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("nope", synth_ds)


def test_evaluation_to_dict(synth_ds):
    d = evaluate(synth_ds, PopularityScorer(synth_ds), seeds=[0, 1], name="pop", progress=False).to_dict()
    assert d["name"] == "pop" and set(d["sampled"]["per_seed"]) == {"0", "1"}
    assert d["sampled"]["mean"]["HR@10"] == pytest.approx(np.mean([d["sampled"]["per_seed"][s]["HR@10"] for s in "01"]))


def _frame(values):
    return pd.DataFrame({"HR@10": values, "NDCG@10": [v / 2 for v in values]}, index=pd.Index(range(len(values)), name="seed"))


def test_paired_ttest_matches_scipy_and_identical_is_one():
    a, b = _frame([0.5, 0.52, 0.55, 0.51, 0.53]), _frame([0.4, 0.45, 0.41, 0.44, 0.40])
    p = paired_ttest(a, b)
    assert p["HR@10"] == pytest.approx(ttest_rel(a["HR@10"], b["HR@10"]).pvalue)
    assert paired_ttest(a, a)["HR@10"] == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        paired_ttest(a.iloc[:1], b.iloc[:1])


def test_results_table_marks_best_second_and_significance():
    per_seed = {
        "base": _frame([0.40, 0.41, 0.42, 0.40, 0.41]),
        "ours": _frame([0.50, 0.52, 0.51, 0.53, 0.50]),
        "meh": _frame([0.39, 0.43, 0.40, 0.42, 0.40]),
    }
    t = results_table(per_seed, baseline="base", metrics=("HR@10", "NDCG@10"))
    cells = t.to_frame()
    # mean ± sample std over the 5 seeds: ours 0.512 ± sqrt(0.00017) = 0.0130
    assert cells.loc["ours", "HR@10"] == "0.5120 ± 0.0130*"
    assert cells.loc["base", "HR@10"] == "0.4080 ± 0.0084" and not cells.loc["meh", "HR@10"].endswith("*")
    md = t.to_markdown()
    assert "| ours | **0.5120 ± 0.0130*** |" in md and "<u>0.4080 ± 0.0084</u>" in md and "mean ± std over seeds" in md
    tex = t.to_latex()
    assert r"\textbf{0.5120 $\pm$ 0.0130*}" in tex and r"\underline{0.4080 $\pm$ 0.0084}" in tex and r"\begin{tabular}{lrr}" in tex
    one = results_table({"a": _frame([0.5]), "b": _frame([0.4])}, metrics=("HR@10",)).to_frame()
    assert one.loc["a", "HR@10"] == "0.5000"  # one seed: no spread to show
    summary = t.summary()
    assert summary.loc[("ours", "HR@10"), "std"] == pytest.approx(np.std([0.50, 0.52, 0.51, 0.53, 0.50], ddof=1))
    assert summary.loc[("ours", "HR@10"), "seeds"] == 5 and np.isnan(summary.loc[("base", "HR@10"), "p"])
    assert best_method(per_seed, exclude=["ours"]) == "base"
    with pytest.raises(KeyError):
        results_table(per_seed, baseline="missing")
    styled = t.style().to_html()
    assert "0.5120" in styled
    # which cells the Styler's CSS marks: bold = the best mean of each metric (ours), underlined = the
    # second best (the largest mean below it: base, and meh where its mean equals base's)
    marked: dict[str, set] = {}
    for sel, props in re.findall(r"((?:#T_\w+_row\d+_col\d+(?:,\s*)?)+)\s*\{([^}]*)\}", styled):
        cells = {(t.means.index[int(r)], t.means.columns[int(c)]) for r, c in re.findall(r"_row(\d+)_col(\d+)", sel)}
        marked.setdefault(props.strip().rstrip(";"), set()).update(cells)
    means = {k: v[["HR@10", "NDCG@10"]].mean() for k, v in per_seed.items()}
    second = {(k, m) for m in ("HR@10", "NDCG@10") for k in per_seed
              if means[k][m] == max(means[j][m] for j in per_seed if j != "ours")}
    assert marked == {"font-weight: bold": {("ours", "HR@10"), ("ours", "NDCG@10")}, "text-decoration: underline": second}
    assert ("base", "HR@10") in second


def test_the_paired_test_pairs_methods_by_seed_not_by_row_order():
    # hand-made per-training-seed values; the second method's rows are stored in another order and
    # it has a seed the first lacks. Pairing by seed: differences 0.10, 0.12, 0.09, 0.14 (seeds 0-3).
    a = pd.DataFrame({"HR@10": [0.50, 0.52, 0.49, 0.56]}, index=pd.Index([0, 1, 2, 3], name="seed"))
    b = pd.DataFrame({"HR@10": [0.42, 0.40, 0.30, 0.40, 0.40]}, index=pd.Index([3, 0, 4, 1, 2], name="seed"))
    t = results_table({"a": a, "b": b}, baseline="b", metrics=("HR@10",))
    d = np.array([0.10, 0.12, 0.09, 0.14])
    t_stat = d.mean() / (d.std(ddof=1) / np.sqrt(4))  # the paired t statistic by hand, df 3
    from scipy.stats import t as student

    assert t.pvalues.loc["a", "HR@10"] == pytest.approx(2 * student.sf(t_stat, 3), rel=1e-9)
    assert t.pvalues.loc["a", "HR@10"] == pytest.approx(ttest_rel([0.50, 0.52, 0.49, 0.56], [0.40, 0.40, 0.40, 0.42]).pvalue)
    assert t.seeds == {"a": [0, 1, 2, 3], "b": [3, 0, 4, 1, 2]}


def test_bucket_metrics_split_users_by_value():
    from vlm2rec_lab.evaluate import bucket_metrics

    ranks = np.array([0, 50, 3, 30, 0])
    freq = np.array([0, 1, 7, 7, 100])
    df = bucket_metrics(ranks, freq, edges=(0, 5, 10, np.inf), ks=(10,))
    assert df["users"].tolist() == [2, 2, 1]
    assert df["HR@10"].tolist() == [0.5, 0.5, 1.0]
    assert df.loc["[5, 10)", "NDCG@10"] == pytest.approx(0.5 / math.log2(5))
    assert df.index.tolist() == ["[0, 5)", "[5, 10)", "[10, inf)"]
