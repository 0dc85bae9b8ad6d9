"""Modality-collapse diagnostics (docs/method.md §5; paper §3, Table 1, Fig. 1, Fig. 3).

Geometry per modality after Wang & Isola (2020), "Understanding Contrastive Representation Learning
through Alignment and Uniformity on the Hypersphere" (github.com/SsnL/align_uniform), with φ the L2
normalisation (for F: normalised after summing T and V):

    A_pos = E ‖φ(s) − φ(i+)‖²                 (sequence vs its target)
    A_neg = E_s E_{i−} ‖φ(s) − φ(i−)‖²        (vs the evaluation negatives)
    U     = log E exp(−2 ‖φ(s) − φ(i)‖²)      (uniformly drawn sequence–item pairs)
    S     = A_neg / (A_pos + ε)               (separability: > 1 when targets sit closer than negatives)
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .evaluate import COLD_START_EDGES, bucket_metrics
from .methods import MODALITIES


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def alignment(seq: np.ndarray, items: np.ndarray) -> float:
    """Mean squared distance between paired unit vectors (rows of ``seq`` and ``items``)."""
    return float(((_unit(seq) - _unit(items)) ** 2).sum(-1).mean())


def uniformity(seq: np.ndarray, items: np.ndarray, n_pairs: int = 100_000, seed: int = 0, t: float = 2.0) -> float:
    """log E exp(−t ‖φ(s) − φ(i)‖²) over uniformly drawn (sequence, item) pairs: all pairs exactly
    when there are at most ``n_pairs`` of them, else ``n_pairs`` drawn with ``seed``."""
    s, e = _unit(seq), _unit(items)
    if len(s) * len(e) <= n_pairs:
        d2 = np.maximum(2.0 - 2.0 * (s @ e.T), 0.0).ravel()
    else:
        rng = np.random.default_rng(seed)
        d2 = ((s[rng.integers(0, len(s), n_pairs)] - e[rng.integers(0, len(e), n_pairs)]) ** 2).sum(-1)
    m = (-t * d2).max()
    return float(m + np.log(np.exp(-t * d2 - m).mean()))


def geometry(seq: np.ndarray, items: np.ndarray, targets: np.ndarray, negatives: np.ndarray,
             n_pairs: int = 100_000, seed: int = 0, eps: float = 1e-8) -> dict[str, float]:
    """A_pos, A_neg, U, S of one modality. ``seq`` (U, d) per user, ``items`` (I, d) per item,
    ``targets`` (U,) and ``negatives`` (U, n_neg) item indices."""
    s, e = _unit(seq), _unit(items)
    a_pos = float(((s - e[targets]) ** 2).sum(-1).mean())
    a_neg = float(((s[:, None, :] - e[negatives]) ** 2).sum(-1).mean())
    return {"A_pos": a_pos, "A_neg": a_neg, "U": uniformity(seq, items, n_pairs, seed), "S": a_neg / (a_pos + eps)}


def run_embeddings(run_dir: str | Path, modality: str, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(sequence, item) embeddings of one modality from a run folder (F: T + V when both exist)."""
    from .runs import load_embeddings

    return load_embeddings(run_dir, f"seq_{split}_{modality}"), load_embeddings(run_dir, f"item_{modality}")


RunSets = Mapping[str, "Mapping[int, str | Path] | str | Path"]  # state -> {training seed: run} (or one run)


def _by_seed(runs: RunSets) -> dict[str, dict[int, Path]]:
    """Each state's runs by training seed; a single run folder stands for its own seed."""
    from .runs import load_run_config

    out = {}
    for state, r in runs.items():
        out[state] = ({int(k): Path(v) for k, v in r.items()} if isinstance(r, Mapping)
                      else {int(load_run_config(r).seed): Path(r)})
    return out


def _mean_std(per_seed: pd.DataFrame, keys: list[str], values: Sequence[str]) -> pd.DataFrame:
    """Mean, sample std (0 for one seed) and seed count of ``values`` over the seeds of each ``keys`` group."""
    g = per_seed.groupby(keys, sort=False)[list(values)]
    out = g.mean()
    std = g.std(ddof=1).fillna(0.0)
    for v in values:
        out[f"{v}_std"] = std[v]
    out["seeds"] = g.size()
    return out


def geometry_per_seed(runs: RunSets, dataset, split: str = "test",
                      modalities: Sequence[str] = MODALITIES) -> pd.DataFrame:
    """Table 1 per training seed: rows (state, modality, seed) with A_pos, A_neg, U, S; run s measured
    against negative set s. Modalities a run lacks (internal fusion has no T/V split) are skipped."""
    targets = dataset.targets(split)
    rows = []
    for state, by_seed in _by_seed(runs).items():
        for seed, run in by_seed.items():
            negatives = dataset.negatives(seed)
            for m in modalities:
                try:
                    seq, items = run_embeddings(run, m, split)
                except FileNotFoundError:
                    continue
                rows.append({"state": state, "modality": m, "seed": seed,
                             **geometry(seq, items, targets, negatives, seed=seed)})
    return pd.DataFrame(rows)


def geometry_table(runs: RunSets, dataset, split: str = "test", modalities: Sequence[str] = MODALITIES) -> pd.DataFrame:
    """Table 1: one row per (state, modality) — e.g. states Vanilla, SFT, VLM2Rec — with A_pos, A_neg,
    U, S as mean over training seeds, their std (``S_std``, …) and the number of seeds."""
    per_seed = geometry_per_seed(runs, dataset, split, modalities)
    return _mean_std(per_seed, ["state", "modality"], ["A_pos", "A_neg", "U", "S"])


def modality_dropout_per_seed(runs: RunSets, split: str = "test",
                              metrics: Sequence[str] = ("HR@10", "NDCG@10")) -> pd.DataFrame:
    """Fig. 1a per training seed: rows (state, view, seed) with f2f / t2f / v2f Task 1 metrics, run s
    on negative set s (:func:`vlm2rec_lab.runsets.seed_metrics`)."""
    from .runs import VIEWS, MissingViewError
    from .runsets import seed_metrics

    frames = []
    for state, by_seed in _by_seed(runs).items():
        for view in VIEWS:
            try:
                df = seed_metrics(by_seed, view, split)
            except MissingViewError:
                continue
            frames.append(df[list(metrics)].reset_index().assign(state=state, view=view))
    return pd.concat(frames, ignore_index=True)[["state", "view", "seed", *metrics]]


def modality_dropout_table(runs: RunSets, split: str = "test",
                           metrics: Sequence[str] = ("HR@10", "NDCG@10")) -> pd.DataFrame:
    """Fig. 1a: f2f / t2f / v2f Task 1 metrics of each state, mean and std over training seeds."""
    return _mean_std(modality_dropout_per_seed(runs, split, metrics), ["state", "view"], metrics)


def gradient_cosines(run_dir: str | Path) -> pd.DataFrame:
    """Fig. 1b: cos(g_total, g_T) and cos(g_total, g_V) at the probed steps of a run."""
    log = pd.read_csv(Path(run_dir) / "logs" / "train_log.csv")
    cols = [c for c in ("cos_total_t", "cos_total_v") if c in log.columns]
    if not cols:
        raise ValueError(f"{run_dir}: no gradient cosines were logged (external fusion with grad_cos_every > 0)")
    return log.dropna(subset=cols)[["step", "epoch", *cols]].reset_index(drop=True)


def cold_start(ranks: np.ndarray, dataset, split: str = "test",
               edges: Sequence[float] = COLD_START_EDGES) -> pd.DataFrame:
    """Fig. 3: metrics bucketed by the target item's training frequency."""

    freq = dataset.train_item_counts()[dataset.targets(split)]
    return bucket_metrics(ranks, freq, edges, label="target train frequency")


def last_weak_modality(weak_log: pd.DataFrame, dataset) -> pd.DataFrame:
    """Each user's last recorded weak modality (rows of a run's ``logs/weak_modality.csv``: step,
    user, weak) and their last training item (the item before the validation target), in column
    ``last_item``. Index: user."""
    last = weak_log.sort_values("step").groupby("user").tail(1).set_index("user")
    return last.assign(last_item=dataset.seq[dataset.offsets[1:][last.index.to_numpy()] - 3])


def weak_modality(run_dir: str | Path, dataset, length_edges: Sequence[float] = (0, 5, 8, 12, 20, np.inf)) -> dict[str, pd.DataFrame]:
    """Per-user weak modality (docs/method.md §5): ``over_training`` (share of image-weak users per step),
    ``by_length`` and ``by_category`` (each user's last recorded weak modality against the length of
    their sequence and the category of their last training item)."""
    weak_log = pd.read_csv(Path(run_dir) / "logs" / "weak_modality.csv")
    if weak_log.empty:
        raise ValueError(f"{run_dir}: no per-user weak modality was logged (external fusion methods only)")
    over = (weak_log.assign(image_weak=weak_log["weak"].eq("V")).groupby("step")["image_weak"].mean()
            .rename("image_weak_share").reset_index())
    last = last_weak_modality(weak_log, dataset)
    users = last.index.to_numpy()
    lengths = dataset.lengths[users]
    last_item = last["last_item"].to_numpy()
    category = (dataset.items["category"].to_numpy()[last_item] if "category" in dataset.items
                else np.full(len(users), None))
    per_user = pd.DataFrame({"image_weak": last["weak"].eq("V").to_numpy(), "length": lengths, "category": category})
    per_user["length_bucket"] = pd.cut(per_user["length"], bins=list(length_edges), right=False)
    share = {"mean": "image_weak_share", "size": "users"}
    by_len = per_user.groupby("length_bucket", observed=True)["image_weak"].agg(["mean", "size"]).rename(columns=share)
    by_cat = per_user.groupby("category", dropna=False)["image_weak"].agg(["mean", "size"]).rename(columns=share)
    return {"over_training": over, "by_length": by_len, "by_category": by_cat,
            "final_image_weak_share": pd.DataFrame({"share": [per_user["image_weak"].mean()], "users": [len(per_user)]})}
