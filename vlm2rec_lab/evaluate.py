"""Evaluation protocol (docs/method.md §3): ranking metrics, sampled and full ranking, seeds, significance,
and result tables.

A *scorer* is any callable ``scorer(histories, candidates) -> scores``: ``histories`` is an (n, L)
array of item indices, right-aligned and padded with -1 (the last item is column -1);
``candidates`` is (n, M) item indices, or ``None`` for all items, and the scores have the
candidates' shape (or (n, n_items)). A scorer whose result depends on a seed has ``with_seed(seed)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

METRIC_NAMES = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")
COLD_START_EDGES = (0, 5, 10, 20, 50, float("inf"))  # Fig. 3: buckets of the target's training frequency
Scorer = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def ranks_from_scores(pos_scores, neg_scores) -> np.ndarray:
    """0-based rank of each positive among its negatives: strictly higher negatives + half the ties.

    pos ``[N]``, neg ``[N, n_neg]`` -> ``[N]`` (halves where ties occur). NaN scores are an error:
    they would otherwise rank silently.
    """
    pos, neg = _np(pos_scores), _np(neg_scores)
    if pos.ndim != 1 or neg.ndim != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(f"expected pos [N] and neg [N, n_neg], got {pos.shape} and {neg.shape}")
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("scores contain NaN")
    higher = (neg > pos[:, None]).sum(1)
    equal = (neg == pos[:, None]).sum(1)
    return higher + 0.5 * equal


def metrics_from_ranks(ranks, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """HR@K = mean 1[rank < K]; NDCG@K = mean 1[rank < K] / log2(rank + 2) (one relevant item)."""
    r = _np(ranks)
    out: dict[str, float] = {}
    for k in ks:
        hit = r < k
        out[f"HR@{k}"] = float(hit.mean()) if r.size else float("nan")
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0).mean()) if r.size else float("nan")
    return out


def rank_metrics(pos_scores, neg_scores, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """Task 1 metrics from scores: pos ``[N]``, neg ``[N, n_neg]`` -> {HR@k, NDCG@k} means.

    Example:
        >>> rank_metrics([0.9], [[0.1, 0.2, 0.3]])["NDCG@10"]
        1.0
    """
    return metrics_from_ranks(ranks_from_scores(pos_scores, neg_scores), ks)


def chance_metrics(n_negatives: int, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """Expected metrics of a uniformly random ranking among 1 + n_negatives candidates."""
    r = np.arange(n_negatives + 1, dtype=np.float64)
    return metrics_from_ranks(r, ks)


def full_ranks(scores: np.ndarray, targets: np.ndarray, seen_offsets: np.ndarray, seen_items: np.ndarray) -> np.ndarray:
    """Rank of each target among all items, the user's history masked (the target itself never is).

    scores ``[n, n_items]``; ``seen_offsets``/``seen_items``: CSR of the n users' histories.
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    n = scores.shape[0]
    rows = np.arange(n)
    pos = scores[rows, targets].copy()
    lengths = np.diff(seen_offsets)
    scores[np.repeat(rows, lengths), seen_items] = -np.inf
    scores[rows, targets] = pos
    higher = (scores > pos[:, None]).sum(1)
    equal = (scores == pos[:, None]).sum(1) - 1
    return higher + 0.5 * equal


# --------------------------------------------------------------------------- running the protocol


@dataclass
class Evaluation:
    """Per-seed metrics for one method: ``sampled`` (and ``full`` when asked), seeds as the index."""

    name: str
    split: str
    sampled: pd.DataFrame
    full: pd.DataFrame | None = None
    ranks: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # sampled ranks per seed

    def protocol(self, which: str = "sampled") -> pd.DataFrame:
        df = self.sampled if which == "sampled" else self.full
        if df is None:
            raise ValueError(f"no {which!r} metrics in this evaluation")
        return df

    def mean(self, which: str = "sampled") -> pd.Series:
        return self.protocol(which).mean()

    def to_dict(self) -> dict:
        out = {"name": self.name, "split": self.split}
        for which in ("sampled", "full"):
            df = getattr(self, which)
            if df is None:
                continue
            out[which] = {
                "per_seed": {str(s): row.to_dict() for s, row in df.iterrows()},
                "mean": df.mean().to_dict(),
                "std": df.std(ddof=1).fillna(0.0).to_dict() if len(df) > 1 else {k: 0.0 for k in df.columns},
            }
        return out


def evaluate(
    dataset,
    scorer: Scorer,
    split: str = "test",
    seeds: Iterable[int] | None = None,
    ks: Sequence[int] = (10, 20),
    full_ranking: bool = False,
    batch_size: int = 1024,
    name: str | None = None,
    progress: bool = True,
) -> Evaluation:
    """Run the Task 1 protocol for ``scorer`` on ``dataset``'s ``split`` over ``seeds`` (default: all
    prepared seeds, 0–4): sampled ranking against the frozen negatives of each seed, and, with
    ``full_ranking``, ranking over all items with the history masked."""
    from tqdm.auto import tqdm

    seeds = list(dataset.seeds if seeds is None else seeds)
    hist = dataset.histories(split)
    targets = dataset.targets(split)
    n = dataset.n_users
    seen_off, seen_items = dataset.seen_items(split) if full_ranking else (None, None)
    rows_s, rows_f, all_ranks = [], [], {}
    bar = tqdm(total=len(seeds) * n * (2 if full_ranking else 1), desc=f"evaluate {name or ''}".strip(),
               unit="user", disable=not progress or None, leave=False)
    for seed in seeds:
        seeded = scorer.with_seed(seed) if hasattr(scorer, "with_seed") else scorer
        neg = dataset.negatives(seed)
        ranks = np.empty(n)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            cand = np.concatenate([targets[start:stop, None], neg[start:stop]], axis=1)
            s = np.asarray(seeded(hist[start:stop], cand))
            ranks[start:stop] = ranks_from_scores(s[:, 0], s[:, 1:])
            bar.update(stop - start)
        all_ranks[seed] = ranks
        rows_s.append({"seed": seed, **metrics_from_ranks(ranks, ks)})
        if full_ranking:
            franks = np.empty(n)
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                s = np.asarray(seeded(hist[start:stop], None))
                lo, hi = seen_off[start], seen_off[stop]
                franks[start:stop] = full_ranks(s, targets[start:stop], seen_off[start:stop + 1] - lo, seen_items[lo:hi])
                bar.update(stop - start)
            rows_f.append({"seed": seed, **metrics_from_ranks(franks, ks)})
    bar.close()
    sampled = pd.DataFrame(rows_s).set_index("seed")
    full = pd.DataFrame(rows_f).set_index("seed") if full_ranking else None
    return Evaluation(name or getattr(scorer, "name", "scorer"), split, sampled, full, all_ranks)


# --------------------------------------------------------------------------- significance and tables


def paired_ttest(a: pd.DataFrame, b: pd.DataFrame) -> pd.Series:
    """Two-sided paired t-test (scipy ``ttest_rel``) per metric over the seeds both frames share.
    Identical per-seed values give p = 1."""
    from scipy.stats import ttest_rel

    common = a.index.intersection(b.index)
    if len(common) < 2:
        raise ValueError(f"a paired t-test needs at least 2 shared seeds, got {list(common)}")
    out = {}
    for m in a.columns.intersection(b.columns):
        x, y = a.loc[common, m].to_numpy(float), b.loc[common, m].to_numpy(float)
        if np.allclose(x - y, 0.0):
            out[m] = 1.0
        else:
            out[m] = float(ttest_rel(x, y).pvalue)
    return pd.Series(out)


@dataclass
class ResultsTable:
    """Methods x metrics: mean ± std over seeds (training seeds, for trained methods), with p-values
    of a paired t-test against ``baseline`` that pairs the methods by seed.

    Marks: best mean per metric in bold, second underlined, ``*`` where p < ``alpha`` and the
    method's mean beats the baseline's.
    """

    means: pd.DataFrame
    pvalues: pd.DataFrame
    baseline: str | None = None
    alpha: float = 0.05
    digits: int = 4
    stds: pd.DataFrame | None = None  # sample std (ddof 1) over seeds; 0 for a single seed
    seeds: dict[str, list[int]] = field(default_factory=dict)  # the seeds behind each row

    def summary(self) -> pd.DataFrame:
        """Long form: one row per (method, metric) with mean, std, p against the baseline, and n seeds."""
        rows = []
        for method in self.means.index:
            for m in self.means.columns:
                rows.append({"method": method, "metric": m, "mean": self.means.loc[method, m],
                             "std": self.stds.loc[method, m] if self.stds is not None else np.nan,
                             "p": self.pvalues.loc[method, m], "seeds": len(self.seeds.get(method, []))})
        return pd.DataFrame(rows).set_index(["method", "metric"])

    def _cells(self, bold: Callable[[str], str], under: Callable[[str], str], pm: str = " ± ") -> pd.DataFrame:
        cells = pd.DataFrame(index=self.means.index, columns=self.means.columns, dtype=object)
        for m in self.means.columns:
            col = self.means[m]
            order = col.sort_values(ascending=False, kind="stable").dropna()
            best = order.iloc[0] if len(order) else None
            second = next((v for v in order if v < best), None) if best is not None else None
            for method, v in col.items():
                txt = f"{v:.{self.digits}f}"
                if self.stds is not None and len(self.seeds.get(method, [])) > 1:  # (no spread from one seed)
                    txt += f"{pm}{self.stds.loc[method, m]:.{self.digits}f}"
                p = self.pvalues.loc[method, m] if method in self.pvalues.index else np.nan
                if self.baseline is not None and method != self.baseline and p == p and p < self.alpha \
                        and v > self.means.loc[self.baseline, m]:
                    txt += "*"
                if best is not None and v == best:
                    txt = bold(txt)
                elif second is not None and v == second:
                    txt = under(txt)
                cells.loc[method, m] = txt
        return cells

    def to_frame(self) -> pd.DataFrame:
        """Plain strings with '*' marks (no bold/underline), for notebooks and CSV."""
        return self._cells(lambda s: s, lambda s: s)

    def to_markdown(self) -> str:
        cells = self._cells(lambda s: f"**{s}**", lambda s: f"<u>{s}</u>")
        head = "| Method | " + " | ".join(cells.columns) + " |"
        sep = "|---|" + "---:|" * len(cells.columns)
        rows = [f"| {idx} | " + " | ".join(r) + " |" for idx, r in zip(cells.index, cells.to_numpy())]
        note = f"\n\n`*` p < {self.alpha} (paired t-test, pairs by seed) against {self.baseline}." if self.baseline else ""
        if self.stds is not None:
            note = "\n\nmean ± std over seeds." + note.replace("\n\n", " ")
        return "\n".join([head, sep, *rows]) + note

    def to_latex(self) -> str:
        esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")  # noqa: E731
        cells = self._cells(lambda s: rf"\textbf{{{s}}}", lambda s: rf"\underline{{{s}}}", pm=r" $\pm$ ")
        lines = [r"\begin{tabular}{l" + "r" * len(cells.columns) + "}", r"\toprule",
                 "Method & " + " & ".join(esc(c) for c in cells.columns) + r" \\", r"\midrule"]
        lines += [esc(i) + " & " + " & ".join(r) + r" \\" for i, r in zip(cells.index, cells.to_numpy())]
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines)

    def style(self):
        """A pandas Styler with the same marks (bold best, underlined second)."""
        def css(col: pd.Series):
            order = col.sort_values(ascending=False).dropna().unique()
            return ["font-weight: bold" if len(order) and v == order[0] else
                    "text-decoration: underline" if len(order) > 1 and v == order[1] else "" for v in col]
        return self.means.style.apply(css).format(f"{{:.{self.digits}f}}")


def results_table(
    per_seed: Mapping[str, pd.DataFrame],
    baseline: str | None = None,
    metrics: Sequence[str] = METRIC_NAMES,
    alpha: float = 0.05,
    digits: int = 4,
) -> ResultsTable:
    """Build a :class:`ResultsTable` from {method: per-seed metrics (seeds as index)}: mean ± std
    over each method's seeds, p of a paired t-test against ``baseline`` over the seeds both share."""
    if baseline is not None and baseline not in per_seed:
        raise KeyError(f"baseline {baseline!r} is not among the methods {list(per_seed)}")
    means = pd.DataFrame({k: v[list(metrics)].mean() for k, v in per_seed.items()}).T
    stds = pd.DataFrame({k: v[list(metrics)].std(ddof=1) if len(v) > 1 else v[list(metrics)].iloc[0] * 0.0
                         for k, v in per_seed.items()}).T
    pvals = pd.DataFrame(np.nan, index=means.index, columns=means.columns)
    if baseline is not None:
        for k, v in per_seed.items():
            if k != baseline:
                pvals.loc[k] = paired_ttest(v[list(metrics)], per_seed[baseline][list(metrics)])
    seeds = {k: [int(s) for s in v.index] for k, v in per_seed.items()}
    return ResultsTable(means, pvals, baseline, alpha, digits, stds, seeds)


def best_method(per_seed: Mapping[str, pd.DataFrame], exclude: Iterable[str] = (), metric: str = "NDCG@10") -> str:
    """The method with the highest mean ``metric`` among those not excluded (the 'best baseline')."""
    ex = set(exclude)
    cands = {k: v[metric].mean() for k, v in per_seed.items() if k not in ex}
    if not cands:
        raise ValueError("no method left to choose from")
    return max(cands, key=cands.get)


def bucket_metrics(
    ranks, values, edges: Sequence[float], ks: Sequence[int] = (10, 20), label: str = "bucket"
) -> pd.DataFrame:
    """Metrics of ``ranks`` grouped by ``values`` into buckets ``[edges[j], edges[j+1])``.

    For cold-start analysis (Fig. 3): ``values`` = the target item's training frequency per user,
    e.g. ``edges=(0, 5, 10, 20, 50, inf)``. One row per bucket with its user count and metrics.
    """
    r, v = _np(ranks), _np(values)
    if r.shape != v.shape:
        raise ValueError(f"ranks and values differ in shape: {r.shape} vs {v.shape}")
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bucket = (v >= lo) & (v < hi)
        rows.append({label: f"[{lo:g}, {hi:g})", "users": int(in_bucket.sum()), **metrics_from_ranks(r[in_bucket], ks)})
    return pd.DataFrame(rows).set_index(label)
