"""Run sets (docs/method.md §3): one method trained once per training seed, ``SET/seed{s}/`` holding the run
(:mod:`vlm2rec_lab.runs`) trained with seed s and evaluated on negative set s. Tables over seeds
report mean ± std over these runs, and paired t-tests pair two sets by training seed.

Also the sweeps that train one run per value of a parameter (Fig. 5, Table 7).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from .accel import distributed as dist
from .config import TrainConfig
from .methods import get_method
from .runs import (VIEWS, MissingViewError, check_seed, config_diff, ensure_run, evaluate_run, is_finished,
                   load_run_config, run_method)

PAPER_GRID = {"tau": [0.05, 0.1, 0.5, 1.0], "tau_crtr": [0.001, 0.01, 0.1, 1.0], "lam": [0.1, 0.5, 1.0]}


def seed_dir(run_set: str | Path, seed: int) -> Path:
    """Where a run set keeps the run trained with ``seed``."""
    return Path(run_set) / f"seed{int(seed)}"


def ensure_runs(dataset, cfg: TrainConfig, run_set: str | Path, seeds, progress: bool = False) -> dict[int, Path]:
    """One run of ``cfg`` per training seed, ``run_set/seed{s}`` trained with seed s (each reused
    when finished with the same config and data, see :func:`ensure_run`). Returns {seed: run}."""
    seeds = [int(s) for s in seeds]
    for s in seeds:
        check_seed(dataset, s, f"{run_set}: the run")
    runs: dict[int, Path] = {}
    for s in seeds:
        # a zero-shot method's runs hold the same model: embedded once, ranked against each seed's negatives
        first = next(iter(runs.values()), None) if not get_method(cfg.method).trains else None
        runs[s] = seed_dir(run_set, s)
        ensure_run(dataset, dataclasses.replace(cfg, seed=s), runs[s], progress=progress, embeddings_from=first)
    return runs


def train_run_set(dataset, cfg: TrainConfig, run_set: str | Path, seeds, resume: bool = False, fresh: bool = False,
                  train_only: bool = False, log: Callable[[str], None] | None = None) -> dict[int, Path]:
    """Train (embed and evaluate, unless ``train_only``) one run of ``cfg`` per training seed into
    ``run_set/seed{s}`` (:func:`~vlm2rec_lab.runs.run_method`); returns {seed: run}. Every seed's
    negatives are checked before anything trains. With ``resume``, finished runs are kept, started
    ones resume from their checkpoints and the others start (none started: an error unless
    ``fresh``). A zero-shot method is embedded once; the other seeds copy its embeddings."""
    from .checkpoint import ResumeError

    seeds = [int(s) for s in seeds]
    say = log if log is not None and dist.rank() == 0 else (lambda line: None)
    # decided before any folder is made here, the same on every process
    started = {s: seed_dir(run_set, s).exists() for s in seeds}
    if resume and not fresh and not any(started.values()):
        raise ResumeError(f"{run_set}: --resume, but none of the runs of seeds {seeds} is here (no seed<N> folder): "
                          f"check --out, or add --fresh to start them")
    if not train_only:
        for s in seeds:
            check_seed(dataset, s, f"{run_set}: the run")
    t0 = time.perf_counter()
    runs: dict[int, Path] = {}
    first = None  # a zero-shot method's first run: the other seeds hold the same model
    for k, seed in enumerate(seeds):
        run, seed_cfg = seed_dir(run_set, seed), dataclasses.replace(cfg, seed=seed)
        if resume and is_finished(run, seed_cfg, dataset):
            say(f"[seed {seed}: {k + 1}/{len(seeds)}] {run} is finished: kept")
        else:
            say(f"[seed {seed}: {k + 1}/{len(seeds)}, {time.perf_counter() - t0:.0f}s] -> {run}")
            run_method(dataset, seed_cfg, run, resume=resume, fresh=fresh or not started[seed], train_only=train_only,
                       embeddings_from=None if train_only else first, log=log)
        first = first or run
        runs[seed] = run
    return runs


def find_runs(path: str | Path) -> dict[int, Path]:
    """The runs of a run set by training seed: ``path`` itself when it is a run folder, else the run
    folders directly inside it (each one's seed read from its config). Two runs of one seed, runs
    that differ in more than the seed (device and compiling aside), or no run at all are errors."""
    path = Path(path)
    if (path / "manifest.json").exists():
        folders = [path]
    else:
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such run folder or run set")
        folders = sorted(p for p in path.iterdir() if (p / "manifest.json").exists())
        if not folders:
            raise FileNotFoundError(f"{path}: neither a run folder nor a folder of runs (no manifest.json in it "
                                    f"or in its subfolders; `vlm2rec-lab train --seeds 0-4 --out {path}` makes one)")
    runs: dict[int, Path] = {}
    first = None
    for f in folders:
        cfg = load_run_config(f)
        if cfg.seed in runs:
            raise ValueError(f"{path}: two runs with training seed {cfg.seed}: {runs[cfg.seed]} and {f}")
        runs[int(cfg.seed)] = f
        # where and whether compiled it ran is not what the run is; everything else must agree
        same = dataclasses.replace(cfg, seed=0, device=None, speed=dataclasses.replace(cfg.speed, compile=None))
        if first is None:
            first = (f, same)
        elif same != first[1]:
            diff = config_diff(first[1], same)
            raise ValueError(f"{path}: its runs differ in more than the seed ({first[0].name} against {f.name}: {diff}); "
                             f"a run set is one config trained once per seed")
    return dict(sorted(runs.items()))


def seed_metrics(runs: dict[int, Path], view: str = "f2f", split: str = "test", protocol: str = "sampled",
                 dataset=None) -> pd.DataFrame:
    """Task 1 metrics of a run set, one row per training seed: run s on negative set s (evaluated
    now where its stored metrics lack that seed). Index: the training seed. A view the runs have
    no embeddings for raises :class:`MissingViewError`."""
    rows = {}
    for seed, run in runs.items():
        if not (Path(run) / "embeddings" / f"seq_{split}_{VIEWS[view]}.npy").exists():
            raise MissingViewError(f"{run}: no {view} view (no embeddings/seq_{split}_{VIEWS[view]}.npy; "
                                   f"only external fusion has t2f and v2f; `vlm2rec-lab embed` a run first)")
        f = Path(run) / "metrics" / f"task1_{split}.json"
        res = json.loads(f.read_text()) if f.exists() else None
        have = res is not None and str(seed) in res["views"].get(view, {}).get(protocol, {}).get("per_seed", {})
        if not have:
            res = evaluate_run(run, dataset, split=split, seeds=[seed], full_ranking=protocol == "full")
        rows[seed] = res["views"][view][protocol]["per_seed"][str(seed)]
    return pd.DataFrame(rows).T.rename_axis("seed").astype(float)


def compare_sets(sets: Mapping[str, str | Path], views, metrics, against: str | None = None, split: str = "test",
                 seeds=None) -> dict:
    """{view: (ResultsTable, {set: per-seed frame})} over run sets ``{name: folder}``, pairing runs by
    training seed, tested against the set named ``against`` (default: none when one set, else the
    first where every set shares 2+ training seeds with it); ``seeds`` keeps those training seeds only."""
    from .evaluate import results_table

    base = (against or next(iter(sets))) if len(sets) > 1 else None
    runs = {name: {s: r for s, r in find_runs(p).items() if seeds is None or s in seeds} for name, p in sets.items()}
    out = {}
    for view in views:
        per_seed = {}
        for name, by_seed in runs.items():
            try:
                per_seed[name] = seed_metrics(by_seed, view, split)[list(metrics)]
            except MissingViewError:
                continue
        if not per_seed:
            continue
        with_base = base if base in per_seed else None
        too_few = with_base is not None and any(len(v.index.intersection(per_seed[base].index)) < 2
                                                for k, v in per_seed.items() if k != base)
        if too_few and against is None:  # the implicit test against the first set: skipped, not an error
            with_base = None
        elif too_few:
            raise ValueError(f"a paired t-test needs 2+ training seeds shared with {base}: "
                             + ", ".join(f"{k} has {list(v.index)}" for k, v in per_seed.items()))
        out[view] = (results_table(per_seed, baseline=with_base, metrics=metrics), per_seed)
    return out


# --------------------------------------------------------------------------- sweeps (Table 7; Fig. 5)


def sweep(dataset, base: TrainConfig, out_root: str | Path, grid: Mapping[str, Sequence],
          progress: bool = False) -> pd.DataFrame:
    """Train and evaluate one run per value of each parameter in ``grid`` (one at a time, the others
    at ``base``): hyperparameter sensitivity (Fig. 5: tau, tau_crtr, lam; :data:`PAPER_GRID`) and the
    few-shot curve (Table 7: ``{"users_k": [...]}``). One training seed (``base.seed``), each run
    ranked against that seed's negative set. Returns a tidy frame: param, value, view, metrics."""
    rows = []
    for param, values in grid.items():
        for value in values:
            cfg = dataclasses.replace(base, **{param: value})
            res = run_method(dataset, cfg, Path(out_root) / f"{param}={value}", progress=progress)
            for view, r in res["views"].items():
                rows.append({"param": param, "value": value, "view": view, **r["sampled"]["mean"]})
    return pd.DataFrame(rows)
