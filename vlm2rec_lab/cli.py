"""`vlm2rec-lab` command line. Flags become typed configs here, once."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .config import FORMATS, REGIMES, PrepareConfig, SynthConfig, parse_seeds


def _yes_no(v: str) -> bool:
    if v.lower() in ("yes", "y", "true", "1"):
        return True
    if v.lower() in ("no", "n", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {v!r}")


def _seeds(v: str) -> list[int]:
    try:
        return parse_seeds(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _synth_knobs(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`SynthConfig` knob (``--text-signal`` for ``text_signal``), its default
    shown; ``--regime`` sets the mechanism's knobs to a named setting, which given flags override."""
    p.add_argument("--regime", choices=sorted(REGIMES), default="collapse",
                   help="collapse: the default (modality collapse planted); independent: two independent latents "
                        "(the earlier default): " + ", ".join(f"{k} {v}" for k, v in REGIMES["independent"].items()))
    for f in dataclasses.fields(SynthConfig):
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" |")[0], int)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                       help=f"default: {REGIMES['independent'].get(f.name, f.default)} under --regime independent, "
                            f"else {f.default}" if f.name in REGIMES["independent"] else f"default: {f.default}")


def synth_config(a: argparse.Namespace) -> SynthConfig:
    """The :class:`SynthConfig` of ``data synth``'s flags: the regime's knobs, then the given flags."""
    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(SynthConfig) if getattr(a, f.name) is not None}
    return SynthConfig(**{**REGIMES[a.regime], **given})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm2rec-lab", description="VLM2Rec lab: modality collapse in VLM embedders for sequential recommendation.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="synthesize, prepare and describe datasets").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="write the synthetic planted-modality domain (Amazon 2018 raw + PNG images)")
    s.add_argument("--out", required=True)
    _synth_knobs(s)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--no-report", action="store_true", help="skip the oracle report")

    pr = data.add_parser("prepare", help="raw files -> processed dataset folder")
    pr.add_argument("--format", required=True, choices=FORMATS)
    pr.add_argument("--input", nargs="+", required=True, help="files or folders")
    pr.add_argument("--out", required=True)
    pr.add_argument("--images", help="folder of images named by item id")
    pr.add_argument("--image-cache", help="cache folder for images fetched by URL")
    pr.add_argument("--offline", action="store_true", help="never fetch images; use the folder and the cache only")
    pr.add_argument("--k-core", type=int, default=5)
    pr.add_argument("--max-len", type=int, default=10)
    pr.add_argument("--max-title-tokens", type=int, default=32)
    pr.add_argument("--require-images", type=_yes_no, default=True, metavar="yes|no")
    pr.add_argument("--require-titles", choices=("auto", "yes", "no"), default="auto")
    pr.add_argument("--train-examples", choices=("last", "all_prefixes"), default="last")
    pr.add_argument("--num-negatives", type=int, default=100)
    pr.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3, 4])
    pr.add_argument("--skip-bad-lines", action="store_true", help="count and report malformed lines instead of stopping")
    pr.add_argument("--integer-ids", action="store_true",
                    help="--format p5: every id is an integer (P5's indexed files); a line with another token is malformed")
    pr.add_argument("--overwrite", action="store_true")

    st = data.add_parser("stats", help="statistics of a processed dataset (the paper's Table 3)")
    st.add_argument("dir")
    st.add_argument("--json", action="store_true")

    ev = sub.add_parser("evaluate", help="Task 1 metrics of a run (--run) or of a reference scorer (--data, --scorer)")
    ev.add_argument("--run", help="a run folder: f2f, t2f, v2f from its embeddings (`vlm2rec-lab embed` first)")
    ev.add_argument("--data", help="a prepared dataset; with --run: zero-shot cross-domain (Table 6), written "
                                   "under RUN/cross/<data folder name>/")
    ev.add_argument("--scorer", help="random, popularity, cooccurrence, or oracle-{text,image,both,latent} (synthetic data, with --latents)")
    ev.add_argument("--latents", help="a synthetic domain's raw folder (or its oracle/latents.json), for the oracle scorers")
    ev.add_argument("--split", choices=("test", "valid"), default="test")
    ev.add_argument("--seeds", type=_seeds, default=None,
                    help="negative sets to rank against (default: a run's own training seed's; a scorer's: all prepared)")
    ev.add_argument("--full-ranking", action="store_true", help="also rank over all items, history masked")
    ev.add_argument("--json", action="store_true")

    tr = sub.add_parser("train", help="train a method (LoRA) into a run folder; zero-shot methods just make the folder")
    tr.add_argument("--data", required=True)
    tr.add_argument("--backbone", default="tiny", help="tiny, a Hugging Face id, or a local path")
    tr.add_argument("--method", required=True, help="e.g. vlm2rec, vlm-sft, vlm-vanilla, llm-sft, item-mean")
    tr.add_argument("--out", required=True, help="the run folder")
    tr.add_argument("--epochs", type=int, default=None)
    tr.add_argument("--max-steps", type=int, default=None)
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--batch-size", type=int, default=None)
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--seed", type=int, default=None, help="the training seed (LoRA init, data order, dropout; default 0)")
    tr.add_argument("--seeds", type=_seeds, default=None, metavar="0-4",
                    help="train one run per seed into OUT/seed{s} (a run set; each evaluated on its own seed's "
                         "negatives), then print mean ± std over the seeds; `compare` tests two sets")
    tr.add_argument("--users-k", type=int, default=None, help="few-shot: train on K sampled users")
    tr.add_argument("--tau", type=float, default=0.1)
    tr.add_argument("--tau-crtr", type=float, default=0.1)
    tr.add_argument("--lam", type=float, default=0.5)
    tr.add_argument("--alpha", type=float, default=1.0)
    tr.add_argument("--beta", type=float, default=1.0)
    tr.add_argument("--fixed-alpha-beta", action="store_true", help="keep alpha and beta fixed instead of learning them")
    tr.add_argument("--penalty-offset", action="store_true", help="w = 1 + beta (softplus - ln 2): w -> 1 when balanced")
    tr.add_argument("--gradient-checkpointing", type=int, nargs="?", const=1, default=0, metavar="EVERY",
                    help="checkpoint every EVERY-th decoder layer (default 1: all) from the first step; without it, "
                         "layers are checkpointed only once a step runs out of device memory (every 4th, then 2nd, then all)")
    tr.add_argument("--no-vision-cache", action="store_true")
    tr.add_argument("--no-packing", action="store_true", help="one padded forward per prompt set (the plain path)")
    tr.add_argument("--share-prefix", choices=["auto", "on", "off"], default="auto",
                    help="packed prompts' common leading tokens computed once: auto = where it changes nothing "
                         "(not while LoRA dropout is on); on = also then (prompts share the prefix's dropout mask)")
    tr.add_argument("--compile", choices=["auto", "on", "off"], nargs="?", const="on", default="auto",
                    help="torch.compile the language model's decoder layers: auto = on a CUDA device for a model of "
                         "1B+ parameters with 2,000+ steps to run, not checkpointing every layer (where it was measured to pay "
                         "for the first step's compiling); "
                         "in one process a step it fails on is redone uncompiled, with a warning")
    tr.add_argument("--max-pixels", type=int, default=None,
                    help="largest image the processor keeps, in pixels (50176 = 224 x 224 = 64 visual tokens in "
                         "Qwen2.5-VL); default: the backbone's own policy")
    tr.add_argument("--checkpoint-every", type=int, default=50)
    tr.add_argument("--grad-cos-every", type=int, default=10,
                    help="the gradient-cosine probe every M steps (0: never); a probed step embeds its histories and "
                         "targets in forwards of their own, so with LoRA dropout the masks (not their distribution) "
                         "depend on M")
    tr.add_argument("--device", default=None)
    tr.add_argument("--config", help="a YAML TrainConfig; flags given explicitly are ignored in favour of it")
    tr.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    tr.add_argument("--fresh", action="store_true",
                    help="with --resume: a run with no folder or no checkpoint trains from step 1 instead of stopping")
    tr.add_argument("--no-embed", action="store_true", help="skip embedding and evaluation after training")

    cp = sub.add_parser("compare", help="Task 1 over run sets: mean ± std over training seeds, paired t-tests by seed")
    cp.add_argument("sets", nargs="+", help="run sets (folders of seed{s}/ runs, as `train --seeds` writes) or run folders")
    cp.add_argument("--against", help="the set the others are tested against (default: the first)")
    cp.add_argument("--views", default="f2f,t2f,v2f", help="comma list of f2f, t2f, v2f (a view a method lacks is left out)")
    cp.add_argument("--metrics", default="HR@10,NDCG@10,HR@20,NDCG@20")
    cp.add_argument("--split", choices=("test", "valid"), default="test")
    cp.add_argument("--per-seed", action="store_true", help="also print each training seed's values")
    cp.add_argument("--json", action="store_true")

    em = sub.add_parser("embed", help="item and sequence embeddings per modality (T, V, F) into RUN/embeddings")
    em.add_argument("run")
    em.add_argument("--batch-size", type=int, default=128, help="prompts per forward (packed, their shared prefix computed once a batch)")
    em.add_argument("--compile", action="store_true",
                    help="torch.compile the decoder layers and vision blocks first (GPU; minutes of compiling)")
    em.add_argument("--device", default=None, help="cpu or cuda (default: the run's, else cuda when available)")

    ds = sub.add_parser("downstream", help="Task 2: SASRec / GRU4Rec with ID or VLM-initialised item embeddings")
    ds.add_argument("--data", required=True)
    ds.add_argument("--model", required=True, choices=("sasrec", "gru4rec"))
    ds.add_argument("--init", default="id", help="id, a run folder (its embeddings/), a run set (seed s's run "
                                                  "initialises seed s), or FILE.npy (with --item-ids)")
    ds.add_argument("--init-transform", choices=("whiten", "standardize", "l2", "raw"), default=None,
                    help="the frozen table before the trainable Linear (default whiten: centred, whitened with shrinkage)")
    ds.add_argument("--init-eps", type=float, default=None, help="its epsilon, relative to the mean variance")
    ds.add_argument("--item-ids", help="text file, one item id per line, rows of the .npy")
    ds.add_argument("--modality", choices=("F", "T", "V"), default="F", help="which embeddings of a run folder")
    ds.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3, 4])
    ds.add_argument("--max-len", type=int, default=None, help="default: the dataset's max_len")
    ds.add_argument("--loss", choices=("ce", "bce"), default="ce", help="full-softmax cross-entropy or BCE with one sampled negative")
    ds.add_argument("--epochs", type=int, default=200, help="upper bound; early stopping on validation NDCG@10")
    ds.add_argument("--patience", type=int, default=None)
    ds.add_argument("--batch-size", type=int, default=None)
    ds.add_argument("--lr", type=float, default=None)
    ds.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ds.add_argument("--threads", type=int, default=None, help="CPU threads (1 on a machine shared with other work)")
    ds.add_argument("--on-missing", choices=("error", "mean"), default="error",
                    help="dataset items absent from the embedding file: stop (default) or use the mean vector")
    ds.add_argument("--out", default=None, help="folder for per-seed metrics, cold-start buckets and the model")
    ds.add_argument("--json", action="store_true")

    b = sub.add_parser("batch", help="run the notebooks with papermill per dataset, and write RUNS/index.html")
    b.add_argument("--datasets", nargs="+", required=True, help="prepared dataset folders")
    b.add_argument("--notebooks", default="all", help="all, or e.g. 01,02")
    b.add_argument("--out", required=True)
    b.add_argument("--quick", action="store_true", help="a few training steps on a few users (--profile quick)")
    b.add_argument("--profile", choices=("full", "demo", "quick"), default="full",
                   help="the notebooks' parameters: full (as written), demo (main methods, seeds 0-2), quick (smoke)")
    b.add_argument("-p", dest="params", action="append", default=[], metavar="KEY=VALUE", help="notebook parameter")

    d = sub.add_parser("demo", help="the main job on the embedded default: synthesize, prepare, train, run every notebook")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--profile", choices=("demo", "quick", "full"), default="demo",
                   help="demo: a smaller default domain, Vanilla/SFT/VLM2Rec fully trained on seeds 0-2 (minutes); "
                        "quick: smoke runs; full: the notebooks' full mode on the full-size domain (hours on a CPU)")
    d.add_argument("--users", type=int, help="domain size (default: the profile's)")
    d.add_argument("--items", type=int, help="domain size (default: the profile's)")
    d.add_argument("--notebooks", default="all", help="all, or e.g. 01,02")
    return p


def _scorer(name: str, ds, latents: str | None):
    from .scorers import make_scorer

    if name.startswith("oracle-"):
        from .data.synthetic import OracleScorer

        if not latents:
            raise ValueError(f"--scorer {name} needs --latents (the synthetic domain's raw folder)")
        return OracleScorer(latents, ds.items["item_id"], name.split("-", 1)[1])
    return make_scorer(name, ds)


def _print_eval(ev, as_json: bool) -> None:
    if as_json:
        print(json.dumps(ev.to_dict(), indent=2))
        return
    for which in ("sampled", "full"):
        df = getattr(ev, which)
        if df is None:
            continue
        print(f"{ev.name} — {ev.split}, {which} ranking")
        table = df.copy()
        table.loc["mean"] = df.mean()
        print(table.round(4).to_string())


def cmd_synth(a) -> int:
    from .data.synthetic import generate

    cfg = synth_config(a)
    t0 = time.perf_counter()
    out = generate(cfg, a.out, overwrite=a.overwrite)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s ({cfg.users} users, {cfg.items} items)")
    if not a.no_report:
        print(oracle_report(out).round(4).to_string())
    return 0


def oracle_report(raw_dir: str | Path):
    """Oracle Task 1 metrics per modality of a synthetic domain, through the default preparation
    (:func:`~vlm2rec_lab.collapse.oracle_table` over every prepared seed)."""
    from .collapse import oracle_table
    from .data.dataset import prepare, save

    raw_dir = Path(raw_dir)
    cfg = PrepareConfig(format="amazon2018", inputs=[str(p) for p in sorted(raw_dir.glob("*.json.gz"))],
                        images=str(raw_dir / "images"))
    ds = prepare(cfg, None, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        save(ds, Path(tmp) / "ds")
        return oracle_table(ds, seeds=None, latents=raw_dir)


def cmd_prepare(a) -> int:
    from .data.dataset import prepare

    cfg = PrepareConfig(format=a.format, inputs=a.input, images=a.images, image_cache=a.image_cache,
                        require_images=a.require_images, require_titles=a.require_titles, k_core=a.k_core,
                        max_len=a.max_len, max_title_tokens=a.max_title_tokens, train_examples=a.train_examples,
                        num_negatives=a.num_negatives, seeds=tuple(a.seeds), skip_bad_lines=a.skip_bad_lines,
                        offline=a.offline, integer_ids=a.integer_ids)
    t0 = time.perf_counter()
    ds = prepare(cfg, a.out, overwrite=a.overwrite)
    m = ds.manifest
    print(f"prepared {a.out} in {time.perf_counter() - t0:.1f}s from {m['raw_rows']:,} rows")
    drops = {k: v for k, v in m["drops"].items() if v}
    named = m.get("drop_examples", {})
    print("dropped: " + (", ".join(f"{k} {v:,}" + (f" (e.g. {', '.join(named[k])})" if named.get(k) else "")
                                   for k, v in drops.items()) if drops else "nothing"))
    for path, rec in m["bad_lines"].items():
        print(f"skipped {rec['count']} bad line(s) in {path}: " + "; ".join(rec["examples"][:3]))
    print(ds.stats_table(Path(a.out).name).to_string())
    return 0


def cmd_stats(a) -> int:
    from .data.dataset import Dataset

    ds = Dataset.load(a.dir)
    if a.json:
        print(json.dumps(ds.stats(), indent=2))
    else:
        print(ds.stats_table(Path(a.dir).name).to_string())
    return 0


def _launcher_warnings() -> None:
    """Rank 0 names the launcher settings this project does not read (once for all processes)."""
    from .accel import distributed as dist

    if dist.rank() == 0:
        for note in dist.launcher_warnings():
            print(f"warning: {note}", file=sys.stderr)


def _train_config(a):
    from .config import AUTO_ON_OFF, SpeedConfig, TrainConfig, load_yaml

    if a.config:
        return load_yaml(TrainConfig, a.config)
    return TrainConfig(method=a.method, backbone=a.backbone, epochs=a.epochs, max_steps=a.max_steps, lr=a.lr,
                       batch_size=a.batch_size, grad_accum=a.grad_accum, seed=a.seed or 0, users_k=a.users_k, tau=a.tau,
                       tau_crtr=a.tau_crtr, lam=a.lam, alpha=a.alpha, beta=a.beta,
                       learn_alpha_beta=not a.fixed_alpha_beta, penalty_offset=a.penalty_offset,
                       speed=SpeedConfig(gradient_checkpointing=a.gradient_checkpointing, cache_vision=not a.no_vision_cache,
                                         packed=not a.no_packing, compile=a.compile, share_prefix=AUTO_ON_OFF[a.share_prefix]),
                       checkpoint_every=a.checkpoint_every, grad_cos_every=a.grad_cos_every, device=a.device,
                       max_pixels=a.max_pixels)


def _train_one(a, cfg, ds, run: Path, embeddings_from: Path | None = None, fresh: bool = False) -> dict | None:
    """Train (where the method trains), embed and evaluate one run; its Task 1 results on rank 0.
    ``embeddings_from``: a zero-shot method's run of another seed (the same model): its embeddings
    are copied instead of embedding again. ``fresh``: with ``--resume``, a run with nothing to
    resume starts from step 1 (``--fresh``)."""
    import shutil

    from .accel import distributed as dist
    from .methods import get_method
    from .runs import create_run, embed_run, evaluate_run
    from .train import Trainer

    if dist.rank() == 0:
        create_run(run, cfg, ds, resume=a.resume, fresh=fresh)
        if embeddings_from is not None:
            shutil.copytree(embeddings_from / "embeddings", run / "embeddings", dirs_exist_ok=True)
    dist.barrier()
    if embeddings_from is not None:
        return evaluate_run(run, ds) if dist.rank() == 0 else None
    bb = None
    if get_method(cfg.method).trains:
        t = Trainer(cfg, ds, run)
        last = t.train(resume=a.resume, fresh=fresh)
        if dist.rank() == 0:
            print(f"trained {cfg.method} (seed {cfg.seed}) for {t.step} steps -> {run}; last step: " +
                  ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float)))
        bb = t.backbone
    if a.no_embed:
        return None
    embed_run(run, ds, backbone=bb)
    if dist.rank() != 0:
        return None
    res = evaluate_run(run, ds)
    for view, r in res["views"].items():
        print(f"{view} (seed {cfg.seed}'s negatives): " + ", ".join(f"{k} {v:.4f}" for k, v in r["sampled"]["mean"].items()))
    return res


def cmd_train(a) -> int:
    import dataclasses

    from .accel import distributed as dist
    from .data.dataset import Dataset
    from .evaluate import METRIC_NAMES
    from .methods import get_method
    from .runs import VIEWS, check_seed, is_finished, seed_dir
    from .checkpoint import ResumeError

    dist.init_from_env()
    _launcher_warnings()
    if a.seeds is not None and a.seed is not None:
        raise ValueError("--seed and --seeds: give one (--seeds trains one run per seed)")
    ds = Dataset.load(a.data)
    cfg = _train_config(a)
    if a.seeds is None:
        if not a.no_embed:
            check_seed(ds, cfg.seed, "--seed: a run")
        _train_one(a, cfg, ds, Path(a.out), fresh=a.fresh)
        return 0
    # resuming a run set: the seeds not started yet start, the others resume from their checkpoints
    # (decided before any folder is made here, the same on every process)
    started = {s: seed_dir(a.out, s).exists() for s in a.seeds}
    if a.resume and not a.fresh and not any(started.values()):
        raise ResumeError(f"{a.out}: --resume, but none of the runs of seeds {a.seeds} is here (no seed<N> folder): "
                          f"check --out, or add --fresh to start them")
    if not a.no_embed:
        for seed in a.seeds:
            check_seed(ds, seed, "--seeds: the run")
    t0 = time.perf_counter()
    first = None  # a zero-shot method's first run: the other seeds hold the same model
    for k, seed in enumerate(a.seeds):
        run, seed_cfg = seed_dir(a.out, seed), dataclasses.replace(cfg, seed=seed)
        if a.resume and is_finished(run, seed_cfg, ds):
            if dist.rank() == 0:
                print(f"[seed {seed}: {k + 1}/{len(a.seeds)}] {run} is finished: kept")
        else:
            if dist.rank() == 0:
                print(f"[seed {seed}: {k + 1}/{len(a.seeds)}, {time.perf_counter() - t0:.0f}s] -> {run}")
            reuse = first if (first is not None and not a.no_embed and not get_method(cfg.method).trains) else None
            _train_one(a, seed_cfg, ds, run, embeddings_from=reuse, fresh=a.fresh or not started[seed])
        first = first or run
    if dist.rank() == 0 and not a.no_embed:
        print(f"{len(a.seeds)} runs in {time.perf_counter() - t0:.0f}s; over training seeds {a.seeds}:")
        _print_comparison(compare_sets([a.out], None, tuple(VIEWS), METRIC_NAMES, seeds=a.seeds))
    return 0


def compare_sets(sets: list[str | Path], against: str | Path | None, views, metrics, split: str = "test",
                 seeds=None) -> dict:
    """{view: (ResultsTable, {set: per-seed frame})} over run sets named by their folders, tested
    against ``against`` (default: none when one set, else the first where every set shares 2+
    training seeds with it), pairing runs by training seed; ``seeds`` keeps those training seeds only."""
    from .batch import dataset_names
    from .evaluate import results_table
    from .runs import MissingViewError, find_runs, seed_metrics

    paths = [Path(p) for p in sets]
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        raise ValueError("compare: a run set is listed twice")
    if against is not None and Path(against).resolve() not in resolved:
        paths.append(Path(against))
    names = dict(zip([p.resolve() for p in paths], dataset_names(paths)))
    base = names[Path(against or paths[0]).resolve()] if len(paths) > 1 else None
    runs = {names[p.resolve()]: {s: r for s, r in find_runs(p).items() if seeds is None or s in seeds} for p in paths}
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


def _print_comparison(tables: dict, per_seed: bool = False) -> None:
    for view, (table, frames) in tables.items():
        cells = table.to_frame()
        for m in table.means.columns:
            if table.baseline is not None:
                cells[f"p {m}"] = [("" if k == table.baseline else f"{table.pvalues.loc[k, m]:.3g}") for k in cells.index]
        cells["seeds"] = [",".join(map(str, table.seeds[k])) for k in cells.index]
        against = f", p: paired t-test by training seed against {table.baseline}" if table.baseline else ""
        print(f"\n{view} — mean ± std over training seeds{against}")
        print(cells.to_string())
        if per_seed:
            for name, df in frames.items():
                print(f"  {name}, per training seed:\n" + df.round(4).to_string().replace("\n", "\n    ").join(["    ", ""]))


def cmd_compare(a) -> int:
    from .evaluate import METRIC_NAMES
    from .runs import VIEWS

    views = [v.strip() for v in a.views.split(",") if v.strip()]
    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise ValueError(f"--views: {bad} are not among {', '.join(VIEWS)}")
    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]

    if any(m not in METRIC_NAMES for m in metrics):
        raise ValueError(f"--metrics: expected some of {', '.join(METRIC_NAMES)}, got {a.metrics!r}")
    tables = compare_sets(a.sets, a.against, views, metrics, a.split)
    if a.json:
        out = {view: {"baseline": t.baseline, "summary": t.summary().reset_index().to_dict(orient="records"),
                      "per_seed": {k: {str(s): row.to_dict() for s, row in df.iterrows()} for k, df in frames.items()}}
               for view, (t, frames) in tables.items()}
        print(json.dumps(out, indent=2, default=float))
    else:
        _print_comparison(tables, a.per_seed)
    return 0


def cmd_embed(a) -> int:
    from .accel import distributed as dist
    from .runs import embed_run

    dist.init_from_env()
    _launcher_warnings()
    out = embed_run(a.run, batch_size=a.batch_size, compile=a.compile, device=a.device)
    if dist.rank() != 0:
        return 0
    print(f"wrote {len(out)} arrays to {Path(a.run) / 'embeddings'}: " + ", ".join(sorted(out)))
    return 0


def cmd_evaluate(a) -> int:
    from .data.dataset import Dataset
    from .evaluate import evaluate

    if a.run:
        from .runs import cross_domain, evaluate_run

        if a.data:  # Table 6: zero-shot on another prepared dataset, embedded with the run's model
            res = cross_domain(a.run, Dataset.load(a.data), name=Path(a.data).resolve().name, seeds=a.seeds)
        else:
            res = evaluate_run(a.run, split=a.split, seeds=a.seeds, full_ranking=a.full_ranking)
        if a.json:
            print(json.dumps(res, indent=2))
        else:
            for view, r in res["views"].items():
                for which in ("sampled", "full"):
                    if which in r:
                        print(f"{res['method']} {view} ({which}): " + ", ".join(f"{k} {v:.4f}" for k, v in r[which]["mean"].items()))
        return 0
    if not a.data or not a.scorer:
        raise ValueError("evaluate needs --run RUN, or --data DIR with --scorer NAME")
    ds = Dataset.load(a.data)
    sc = _scorer(a.scorer, ds, a.latents)
    ev = evaluate(ds, sc, split=a.split, seeds=a.seeds, full_ranking=a.full_ranking, name=a.scorer)
    _print_eval(ev, a.json)
    return 0


def cmd_demo(a) -> int:
    """The main job on the embedded default: synthesize and prepare the planted-modality domain,
    train the runs every notebook shares (the demo profile: Vanilla, SFT and VLM2Rec on training
    seeds 0-2), then run every notebook on it through the papermill batch with the tiny backbone:
    figures, tables, runs and ``index.html`` (opening with the verdict) in the output folder."""
    from .batch import DEMO_DOMAIN, DEMO_METHODS, PROFILES, dataset_names, run_batch, select_notebooks, train_runs
    from .data.dataset import prepare
    from .data.synthetic import generate

    t0 = time.perf_counter()
    stamp = [t0]

    def stage(k: int, what: str) -> None:
        now = time.perf_counter()
        print(f"[{k}/4] {what} ({now - stamp[0]:.0f}s; {now - t0:.0f}s in all)", flush=True)
        stamp[0] = now

    out = Path(a.out)
    raw, data = out / "raw", out / "data"
    size = {} if a.profile == "full" else dict(DEMO_DOMAIN)
    size.update({k: v for k, v in (("users", a.users), ("items", a.items)) if v is not None})
    generate(SynthConfig(**size), raw, overwrite=True)
    stage(1, f"synthetic domain -> {raw}")
    cfg = PrepareConfig(format="amazon2018", inputs=[str(p) for p in sorted(raw.glob("*.json.gz"))], images=str(raw / "images"))
    ds = prepare(cfg, data, overwrite=True)
    print(ds.stats_table("synthetic").to_string())
    stage(2, f"prepared -> {data}")
    notebooks = select_notebooks(a.notebooks)
    runs_dir = out / "runs" / dataset_names([data])[0] / "runs"  # where run_batch points the notebooks' RUNS_DIR
    if a.profile == "demo" and any(nb.stem[:2] not in ("00", "01") for nb in notebooks):
        seeds = parse_seeds(PROFILES["demo"]["SEEDS"])
        train_runs(data.resolve(), runs_dir.resolve(), DEMO_METHODS, seeds)
        stage(3, f"trained {', '.join(DEMO_METHODS)} on seeds {PROFILES['demo']['SEEDS']} -> {runs_dir}")
    else:
        stage(3, "no runs trained up front (the notebooks train what they need)")
    results = run_batch([data], notebooks, out / "runs", profile=a.profile)
    stage(4, f"notebooks ({a.profile} profile, backbone tiny) -> {out / 'runs'}")
    failed = [r for r in results if not r.ok]
    for r in results:
        if "verdict" in r.records:
            print(f"\n{r.notebook}: {r.records['verdict']}")
    print(f"\ndone in {time.perf_counter() - t0:.0f}s: {len(results) - len(failed)} notebooks passed, "
          f"{len(failed)} failed; open {out / 'runs' / 'index.html'}")
    return 1 if failed else 0


def cmd_batch(a) -> int:
    from .batch import parse_params, run_batch, select_notebooks

    if a.quick and a.profile != "full":
        raise ValueError(f"--quick is --profile quick; it conflicts with --profile {a.profile}")
    results = run_batch(a.datasets, select_notebooks(a.notebooks), a.out, profile="quick" if a.quick else a.profile,
                        params=parse_params(a.params))
    failed = [r for r in results if not r.ok]
    skipped = [r for r in results if r.skipped]
    print(f"{len(results) - len(failed) - len(skipped)} passed, {len(skipped)} skipped, {len(failed)} failed; "
          f"index: {Path(a.out) / 'index.html'}")
    return 1 if failed else 0


def cmd_downstream(a) -> int:
    from .downstream import run_cli

    return run_cli(a)


def main(argv: list[str] | None = None) -> int:
    from .accel import distributed
    from .data.images import ImagesOfflineError
    from .io import DataFormatError
    from .train import TrainingDiverged

    a = _parser().parse_args(argv)
    if distributed.launched() and a.command not in ("train", "embed"):
        print(f"error: {a.command} runs in one process: of the commands, train and embed run under torchrun or "
              f"accelerate launch (here WORLD_SIZE={os.environ['WORLD_SIZE']}); run it without a launcher", file=sys.stderr)
        return 2
    handler = {"synth": cmd_synth, "prepare": cmd_prepare, "stats": cmd_stats}.get(getattr(a, "data_command", None)) \
        or {"evaluate": cmd_evaluate, "demo": cmd_demo, "downstream": cmd_downstream, "train": cmd_train,
           "embed": cmd_embed, "batch": cmd_batch, "compare": cmd_compare}[a.command]
    try:
        with _reader_may_leave():
            code = handler(a)
    except (DataFormatError, ImagesOfflineError, OSError, ValueError, KeyError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    return distributed.finish(code)  # under torchrun: leave the process group and exit here


@contextlib.contextmanager
def _reader_may_leave():
    """A command whose output is piped into a reader that stops early (``| head``) finishes its
    work rather than dying in a BrokenPipeError: printing stops, one line on stderr says so."""
    real = sys.stdout

    class Guarded(io.TextIOBase):
        gone = False

        def write(self, s: str) -> int:
            if not self.gone:
                try:
                    real.write(s)
                    real.flush()
                except BrokenPipeError:
                    self.gone = True
                    print("note: standard output was closed by its reader (a pipe such as | head); the command "
                          "goes on without printing", file=sys.stderr)
            return len(s)

        def flush(self) -> None:
            if not self.gone:
                with contextlib.suppress(BrokenPipeError):
                    real.flush()

        def isatty(self) -> bool:
            return real.isatty()

        def fileno(self) -> int:
            return real.fileno()

    guarded = sys.stdout = Guarded()
    try:
        yield
    finally:
        sys.stdout = real
        if guarded.gone:  # (else the interpreter's last flush at exit raises it again)
            os.dup2(os.open(os.devnull, os.O_WRONLY), real.fileno())


if __name__ == "__main__":
    sys.exit(main())
