"""Task 2 training and evaluation (docs/method.md §4; the paper's Table 4 and Fig. 3): one
:mod:`~vlm2rec_lab.task2.models` model per seed, over ID or VLM-initialised item tables.

* Training (:func:`train`): SASRec-style sequence-to-sequence targets (one forward per window
  predicts every next item), full-softmax cross-entropy by default or BCE with one sampled
  negative, early stopping on validation NDCG@10 (sampled protocol, the seed's frozen negatives).
* Evaluation (:func:`run`): :func:`vlm2rec_lab.evaluate.evaluate` on the test split with the seed's
  frozen 100 negatives and full ranking, and cold-start buckets by the target item's training
  frequency (Fig. 3).

The dataset's histories are right-aligned and -1 padded; the models take RecBole's layout
(:func:`left_align`: ids + 1, left-aligned, 0 = padding).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from ..config import to_dict
from ..evaluate import COLD_START_EDGES, Evaluation, bucket_metrics, evaluate
from .config import DownstreamConfig
from .items import ItemEmbeddings
from ..accel.softmax_ce import matmul_dtype
from .models import SeqRec, build_model

EVAL_BATCH = 512  # users per scoring call: the (B, 101, H) candidate gather stays small


# --------------------------------------------------------------------------- sequences


def left_align(histories: np.ndarray, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned, -1 padded item indices (the dataset's layout) -> the model's layout:
    ids + 1, left-aligned, 0 padded, and the lengths. Keeps the last ``max_len`` items."""
    h = np.asarray(histories)
    if max_len is not None and h.shape[1] > max_len:
        h = h[:, -max_len:]
    n, L = h.shape
    lens = (h >= 0).sum(1)
    cols = np.arange(L)[None, :]
    src = np.minimum(cols + (L - lens)[:, None], L - 1)  # row r's items sit in its last lens[r] columns
    out = np.where(cols < lens[:, None], np.take_along_axis(h, src, axis=1) + 1, 0)
    return out.astype(np.int64), lens.astype(np.int64)


def training_windows(dataset, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """SASRec-style training pairs from the training items (all but the last two) of every user.

    Returns ``inputs`` and ``targets`` (M, max_len), model layout (ids + 1, left-aligned, 0 pad):
    position t of a window is item j of a user and predicts item j + 1 from the window's first
    t + 1 items (causal attention). Each user's training items are cut into windows of ``max_len``
    targets from the end backwards, so every training item but the first is a target exactly once
    (ours: the original SASRec keeps only the last window, dropping the rest of long histories).
    """
    starts = dataset.offsets[:-1]
    n_targets = np.maximum(dataset.offsets[1:] - 2 - starts - 1, 0)  # training items but the first
    n_win = -(-n_targets // max_len)
    user = np.repeat(np.arange(starts.size), n_win)
    k = np.arange(n_win.sum()) - np.repeat(np.cumsum(n_win) - n_win, n_win)  # window k from the end
    t_end = starts[user] + 1 + n_targets[user] - k * max_len  # exclusive end of the window's targets
    t_start = np.maximum(starts[user] + 1, t_end - max_len)
    pos = t_start[:, None] + np.arange(max_len)[None, :]
    valid = pos < t_end[:, None]
    seq = dataset.seq.astype(np.int64)
    targets = np.where(valid, seq[np.where(valid, pos, 0)] + 1, 0)
    inputs = np.where(valid, seq[np.where(valid, pos - 1, 0)] + 1, 0)
    return inputs, targets

class ModelScorer:
    """A :class:`SeqRec` as an evaluation scorer ``(histories, candidates) -> scores`` (docs/method.md §4)."""

    def __init__(self, model: SeqRec, max_len: int, device: str = "cpu", name: str = "model"):
        self.model, self.max_len, self.device, self.name = model, max_len, device, name

    @torch.no_grad()
    def __call__(self, histories: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        seq, lens = left_align(histories, self.max_len)
        batch = {"item_seq": torch.as_tensor(seq, device=self.device),
                 "seq_len": torch.as_tensor(lens, device=self.device)}
        if candidates is not None:
            batch["candidates"] = torch.as_tensor(np.asarray(candidates, dtype=np.int64) + 1, device=self.device)
        scores = self.model.predict(batch).float().cpu().numpy()
        self.model.train(was_training)
        return scores


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """A trained model (restored to its best validation epoch) and how training went."""

    model: SeqRec
    seed: int
    best_epoch: int
    best_valid_ndcg: float
    epochs: int  # epochs run
    train_seconds: float  # wall time of the whole loop, validations included
    seconds_to_best: float  # wall time until the best validation was measured
    history: list[dict] = field(default_factory=list)  # per epoch: loss, seconds, valid NDCG@10

    def summary(self) -> dict:
        epoch_s = [h["train_seconds"] for h in self.history]
        return {"seed": self.seed, "epochs": self.epochs, "best_epoch": self.best_epoch,
                "best_valid_NDCG@10": self.best_valid_ndcg, "train_seconds": round(self.train_seconds, 2),
                "seconds_to_best": round(self.seconds_to_best, 2),
                "seconds_per_epoch": round(float(np.mean(epoch_s)), 3) if epoch_s else None}


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return device


def with_max_len(dataset, max_len: int):
    """A shallow view of ``dataset`` whose histories keep ``max_len`` items (for the protocol)."""
    if max_len == dataset.max_len:
        return dataset
    manifest = {**dataset.manifest, "config": {**dataset.manifest["config"], "max_len": max_len}}
    return dataclasses.replace(dataset, manifest=manifest)


def _bce_negatives(targets: np.ndarray, n_items: int, rng: np.random.Generator) -> np.ndarray:
    """One uniform negative per target position (ids + 1), redrawn where it equals the target."""
    neg = rng.integers(1, n_items + 1, size=targets.shape)
    clash = neg == targets
    while clash.any():
        neg[clash] = rng.integers(1, n_items + 1, size=int(clash.sum()))
        clash = neg == targets
    return neg


def validate(model: SeqRec, dataset, seed: int, max_len: int, device: str) -> float:
    """Validation NDCG@10, sampled protocol with the seed's frozen negatives (vectorised)."""
    ev = evaluate(with_max_len(dataset, max_len), ModelScorer(model, max_len, device), split="valid",
                  seeds=[seed], batch_size=EVAL_BATCH, progress=False)
    return float(ev.sampled.loc[seed, "NDCG@10"])


def train(dataset, cfg: DownstreamConfig, seed: int = 0, embeddings: np.ndarray | None = None,
          log=None) -> TrainResult:
    """Train one model with ``seed`` (torch and numpy seeded here; same seed => same numbers on CPU).

    Each epoch visits every training window once in a seeded order; validation every
    ``cfg.eval_every`` epochs; stops after ``cfg.patience`` validations without improvement and
    restores the best weights. ``log(dict)`` receives one record per epoch.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    L = cfg.max_len or dataset.max_len
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(cfg, dataset.n_items, L, embeddings).to(device)
    model.ce_dtype = matmul_dtype(device, cfg.matmul)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    inputs, targets = training_windows(dataset, L)
    if inputs.shape[0] == 0:
        raise ValueError("no training windows: every user has a single training item")
    best, best_state, best_epoch, to_best, stale = -1.0, None, 0, 0.0, 0  # stale: validations since the best
    history: list[dict] = []
    t0 = time.perf_counter()
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        order = rng.permutation(inputs.shape[0])
        total, steps = 0.0, 0
        for start in range(0, order.size, cfg.batch_size):
            windows = order[start:start + cfg.batch_size]
            batch = {"item_seq": torch.as_tensor(inputs[windows], device=device),
                     "targets": torch.as_tensor(targets[windows], device=device)}
            if cfg.loss == "bce":
                batch["negatives"] = torch.as_tensor(_bce_negatives(targets[windows], dataset.n_items, rng),
                                                     device=device)
            loss = model.calculate_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.detach().item(), steps + 1
        rec = {"epoch": epoch, "loss": total / steps, "train_seconds": time.perf_counter() - epoch_start}
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            score = validate(model, dataset, seed, L, device)
            rec["valid_NDCG@10"] = score
            if score > best:
                best, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                to_best = time.perf_counter() - t0
            else:
                stale += 1
        rec["seconds"] = time.perf_counter() - t0
        history.append(rec)
        if log is not None:
            log(rec)
        if stale >= cfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, seed, best_epoch, best, epoch, time.perf_counter() - t0, to_best, history)


# --------------------------------------------------------------------------- the whole of Task 2


@dataclass
class DownstreamResult:
    """Per-seed test (sampled + full) and validation metrics, cold-start buckets, training records."""

    test: Evaluation
    valid: Evaluation
    cold_start: pd.DataFrame  # bucket x (users, metrics), mean over seeds, sampled protocol
    runs: list[dict]  # per seed: TrainResult.summary()
    config: DownstreamConfig
    init: dict
    models: dict[int, SeqRec] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        test = self.test.to_dict()
        return {"model": self.config.model, "init": self.init, "config": to_dict(self.config),
                "test": {k: test[k] for k in ("sampled", "full") if k in test},
                "valid": {"sampled": self.valid.to_dict()["sampled"]},
                "cold_start": {str(b): {k: int(v) if k == "users" else float(v) for k, v in row.items()}
                               for b, row in self.cold_start.iterrows()},
                "runs": self.runs}


def _concat(evals: list[Evaluation], name: str, split: str) -> Evaluation:
    full = [e.full for e in evals if e.full is not None]
    return Evaluation(name, split, pd.concat([e.sampled for e in evals]),
                      pd.concat(full) if full else None, {s: r for e in evals for s, r in e.ranks.items()})


def run(dataset, cfg: DownstreamConfig, seeds=(0, 1, 2, 3, 4),
        embeddings: ItemEmbeddings | Mapping[int, ItemEmbeddings] | None = None, log=None) -> DownstreamResult:
    """Train one model per seed, evaluate each with that seed's frozen negatives (test: sampled and
    full ranking; valid: sampled), and bucket the test ranks by the target's training frequency.

    ``embeddings``: one frozen table for every seed, or {seed: table} so that the embedder's run of
    training seed s initialises the downstream model of seed s (docs/method.md §4: a seed is a training run)."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("at least one seed is needed")
    per_seed = embeddings if isinstance(embeddings, Mapping) else {s: embeddings for s in seeds}
    lacking = [s for s in seeds if s not in per_seed]
    if lacking:
        raise ValueError(f"no item embeddings for seeds {lacking} (an embedder run per training seed is needed)")
    missing = [s for s in seeds if s not in dataset.seeds]
    if missing:
        raise ValueError(f"seeds {missing} have no frozen negatives in {dataset.path}; prepared seeds: {dataset.seeds}")
    L = cfg.max_len or dataset.max_len
    view = with_max_len(dataset, L)
    device = resolve_device(cfg.device)
    name = f"{cfg.model}-{'id' if embeddings is None else 'init'}"
    tests, valids, summaries, models = [], [], [], {}
    for s in seeds:
        res = train(dataset, cfg, s, None if per_seed[s] is None else per_seed[s].matrix,
                    log=None if log is None else (lambda rec, s=s: log({"seed": s, **rec})))
        scorer = ModelScorer(res.model, L, device, name)
        tests.append(evaluate(view, scorer, "test", [s], full_ranking=True, batch_size=EVAL_BATCH, name=name,
                              progress=False))
        valids.append(evaluate(view, scorer, "valid", [s], batch_size=EVAL_BATCH, name=name, progress=False))
        summaries.append(res.summary())
        models[s] = res.model
    test, valid = _concat(tests, name, "test"), _concat(valids, name, "valid")
    freq = dataset.train_item_counts()[dataset.targets("test")]
    buckets = [bucket_metrics(test.ranks[s], freq, COLD_START_EDGES) for s in seeds]
    cold = pd.concat(buckets).groupby(level=0, sort=False).mean()
    cold["users"] = cold["users"].astype(int)
    if embeddings is None:
        init = {"kind": "id"}
    elif isinstance(embeddings, Mapping):
        init = {"kind": "embeddings", "per_seed": {str(s): per_seed[s].summary() for s in seeds},
                "transform": cfg.init_transform, "eps": cfg.init_eps}
    else:
        init = {"kind": "embeddings", **embeddings.summary(), "transform": cfg.init_transform, "eps": cfg.init_eps}
    return DownstreamResult(test, valid, cold, summaries, cfg, init, models)


def save_result(result: DownstreamResult, out: str | Path) -> Path:
    """Write ``result.json``, per-seed metrics CSV, cold-start CSV and one state dict per seed,
    each file atomically."""
    from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "result.json", result.to_dict())
    frames = [result.test.sampled.assign(protocol="sampled"), result.test.full.assign(protocol="full")]
    atomic_write_text(out / "metrics.csv", pd.concat(frames).reset_index().to_csv(index=False))
    atomic_write_text(out / "cold_start.csv", result.cold_start.reset_index().to_csv(index=False))
    for s, model in result.models.items():
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        atomic_write_bytes(out / f"model_seed{s}.pt", buf.getvalue())
    return out

