"""`vlm2rec-lab` command line. Flags become typed configs here, once."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from .config import FORMATS, REGIMES, PrepareConfig, SynthConfig, parse_seeds
from .methods import MODALITIES
from .task2.config import INIT_TRANSFORMS, LOSSES, MODELS


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


def synth_config(args: argparse.Namespace) -> SynthConfig:
    """The :class:`SynthConfig` of ``data synth``'s flags: the regime's knobs, then the given flags."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig) if getattr(args, f.name) is not None}
    return SynthConfig(**{**REGIMES[args.regime], **given})


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
                         "1B+ parameters with 2,000+ steps to run, not checkpointing every layer; in one process a "
                         "step it fails on is redone uncompiled, with a warning")
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
                    help="torch.compile the decoder layers and vision blocks first (for a GPU)")
    em.add_argument("--device", default=None, help="cpu or cuda (default: the run's, else cuda when available)")

    ds = sub.add_parser("downstream", help="Task 2: SASRec / GRU4Rec with ID or VLM-initialised item embeddings")
    ds.add_argument("--data", required=True)
    ds.add_argument("--model", required=True, choices=MODELS)
    ds.add_argument("--init", default="id", help="id, a run folder (its embeddings/), a run set (seed s's run "
                                                  "initialises seed s), or FILE.npy (with --item-ids)")
    ds.add_argument("--init-transform", choices=INIT_TRANSFORMS, default=None,
                    help="the frozen table before the trainable Linear (default whiten: centred, whitened with shrinkage)")
    ds.add_argument("--init-eps", type=float, default=None, help="its epsilon, relative to the mean variance")
    ds.add_argument("--item-ids", help="text file, one item id per line, rows of the .npy")
    ds.add_argument("--modality", choices=MODALITIES, default="F", help="which embeddings of a run folder")
    ds.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3, 4])
    ds.add_argument("--max-len", type=int, default=None, help="default: the dataset's max_len")
    ds.add_argument("--loss", choices=LOSSES, default="ce", help="full-softmax cross-entropy or BCE with one sampled negative")
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
                   help="demo: a smaller default domain, Vanilla/SFT/VLM2Rec fully trained on seeds 0-2; "
                        "quick: smoke runs; full: the notebooks' full mode on the full-size domain")
    d.add_argument("--users", type=int, help="domain size (default: the profile's)")
    d.add_argument("--items", type=int, help="domain size (default: the profile's)")
    d.add_argument("--notebooks", default="all", help="all, or e.g. 01,02")
    return p


def cmd_synth(args) -> int:
    from .collapse import oracle_report
    from .data.synthetic import generate

    cfg = synth_config(args)
    t0 = time.perf_counter()
    out = generate(cfg, args.out, overwrite=args.overwrite)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s ({cfg.users} users, {cfg.items} items)")
    if not args.no_report:
        print(oracle_report(out).round(4).to_string())
    return 0


def cmd_prepare(args) -> int:
    from .console import print_prepared
    from .data.dataset import prepare

    cfg = PrepareConfig(format=args.format, inputs=args.input, images=args.images, image_cache=args.image_cache,
                        require_images=args.require_images, require_titles=args.require_titles, k_core=args.k_core,
                        max_len=args.max_len, max_title_tokens=args.max_title_tokens,
                        train_examples=args.train_examples, num_negatives=args.num_negatives, seeds=tuple(args.seeds),
                        skip_bad_lines=args.skip_bad_lines, offline=args.offline, integer_ids=args.integer_ids)
    t0 = time.perf_counter()
    ds = prepare(cfg, args.out, overwrite=args.overwrite)
    print_prepared(ds, args.out, time.perf_counter() - t0)
    return 0


def cmd_stats(args) -> int:
    from .data.dataset import Dataset

    ds = Dataset.load(args.dir)
    if args.json:
        print(json.dumps(ds.stats(), indent=2))
    else:
        print(ds.stats_table(Path(args.dir).name).to_string())
    return 0


def _launcher_warnings() -> None:
    """Rank 0 names the launcher settings this project does not read (once for all processes)."""
    from .accel import distributed as dist

    if dist.rank() == 0:
        for note in dist.launcher_warnings():
            print(f"warning: {note}", file=sys.stderr)


def _train_config(args):
    from .config import AUTO_ON_OFF, SpeedConfig, TrainConfig, load_yaml

    if args.config:
        return load_yaml(TrainConfig, args.config)
    speed = SpeedConfig(gradient_checkpointing=args.gradient_checkpointing, cache_vision=not args.no_vision_cache,
                        packed=not args.no_packing, compile=args.compile, share_prefix=AUTO_ON_OFF[args.share_prefix])
    return TrainConfig(method=args.method, backbone=args.backbone, epochs=args.epochs, max_steps=args.max_steps,
                       lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed or 0,
                       users_k=args.users_k, tau=args.tau, tau_crtr=args.tau_crtr, lam=args.lam, alpha=args.alpha,
                       beta=args.beta, learn_alpha_beta=not args.fixed_alpha_beta, penalty_offset=args.penalty_offset,
                       speed=speed, checkpoint_every=args.checkpoint_every, grad_cos_every=args.grad_cos_every,
                       device=args.device, max_pixels=args.max_pixels)


def cmd_train(args) -> int:
    from .accel import distributed as dist
    from .console import print_comparison
    from .data.dataset import Dataset
    from .evaluate import METRIC_NAMES
    from .runs import VIEWS, run_method
    from .runsets import compare_sets, train_run_set

    dist.init_from_env()
    _launcher_warnings()
    if args.seeds is not None and args.seed is not None:
        raise ValueError("--seed and --seeds: give one (--seeds trains one run per seed)")
    ds = Dataset.load(args.data)
    cfg = _train_config(args)
    if args.seeds is None:
        run_method(ds, cfg, args.out, resume=args.resume, fresh=args.fresh, train_only=args.no_embed, log=print)
        return 0
    t0 = time.perf_counter()
    train_run_set(ds, cfg, args.out, args.seeds, resume=args.resume, fresh=args.fresh, train_only=args.no_embed,
                  log=print)
    if dist.rank() == 0 and not args.no_embed:
        print(f"{len(args.seeds)} runs in {time.perf_counter() - t0:.0f}s; over training seeds {args.seeds}:")
        print_comparison(compare_sets(_named_sets([args.out])[0], VIEWS, METRIC_NAMES, seeds=args.seeds))
    return 0


def _named_sets(sets: list[str], against: str | None = None) -> tuple[dict, str | None]:
    """Run set folders by a distinct name each (their folder names, as the batch names datasets),
    ``against`` added where it is not among them; and ``against``'s name."""
    from .batch import dataset_names

    paths = [Path(p) for p in sets]
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        raise ValueError("compare: a run set is listed twice")
    if against is not None and Path(against).resolve() not in resolved:
        paths.append(Path(against))
    names = dataset_names(paths)
    name_of = dict(zip([p.resolve() for p in paths], names))
    return dict(zip(names, paths)), (name_of[Path(against).resolve()] if against is not None else None)


def _comma_list(flag: str, value: str, known) -> list[str]:
    """``value``'s comma-separated entries, each one of ``known``."""
    entries = [v.strip() for v in value.split(",") if v.strip()]
    if any(v not in known for v in entries):
        raise ValueError(f"{flag}: expected some of {', '.join(known)}, got {value!r}")
    return entries


def cmd_compare(args) -> int:
    from .console import print_comparison
    from .evaluate import METRIC_NAMES
    from .runs import VIEWS
    from .runsets import compare_sets

    views, metrics = _comma_list("--views", args.views, VIEWS), _comma_list("--metrics", args.metrics, METRIC_NAMES)
    sets, against = _named_sets(args.sets, args.against)
    print_comparison(compare_sets(sets, views, metrics, against=against, split=args.split), args.per_seed, args.json)
    return 0


def cmd_embed(args) -> int:
    from .accel import distributed as dist
    from .runs import embed_run

    dist.init_from_env()
    _launcher_warnings()
    out = embed_run(args.run, batch_size=args.batch_size, compile=args.compile, device=args.device)
    if dist.rank() != 0:
        return 0
    print(f"wrote {len(out)} arrays to {Path(args.run) / 'embeddings'}: " + ", ".join(sorted(out)))
    return 0


def cmd_evaluate(args) -> int:
    from .console import print_evaluation, print_run_results
    from .data.dataset import Dataset
    from .evaluate import evaluate
    from .runs import cross_domain, evaluate_run
    from .scorers import make_scorer

    if args.run and args.data:  # Table 6: zero-shot on another prepared dataset, embedded with the run's model
        res = cross_domain(args.run, Dataset.load(args.data), name=Path(args.data).resolve().name, seeds=args.seeds)
        print_run_results(res, args.json)
    elif args.run:
        print_run_results(evaluate_run(args.run, split=args.split, seeds=args.seeds, full_ranking=args.full_ranking),
                          args.json)
    elif not args.data or not args.scorer:
        raise ValueError("evaluate needs --run RUN, or --data DIR with --scorer NAME")
    else:
        ds = Dataset.load(args.data)
        scorer = make_scorer(args.scorer, ds, latents=args.latents)
        print_evaluation(evaluate(ds, scorer, split=args.split, seeds=args.seeds, full_ranking=args.full_ranking,
                                  name=args.scorer), args.json)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    results = run_demo(args.out, args.profile, args.notebooks, users=args.users, items=args.items)
    return 1 if any(not r.ok for r in results) else 0


def cmd_batch(args) -> int:
    from .batch import parse_params, run_batch, select_notebooks

    if args.quick and args.profile != "full":
        raise ValueError(f"--quick is --profile quick; it conflicts with --profile {args.profile}")
    results = run_batch(args.datasets, select_notebooks(args.notebooks), args.out,
                        profile="quick" if args.quick else args.profile, params=parse_params(args.params))
    failed = [r for r in results if not r.ok]
    skipped = [r for r in results if r.skipped]
    print(f"{len(results) - len(failed) - len(skipped)} passed, {len(skipped)} skipped, {len(failed)} failed; "
          f"index: {Path(args.out) / 'index.html'}")
    return 1 if failed else 0


def _downstream_config(args):
    """``downstream``'s flags -> :class:`~vlm2rec_lab.task2.config.DownstreamConfig` (flags not
    given keep the config's defaults)."""
    from .task2.config import DownstreamConfig

    given = {"model": args.model, "max_len": args.max_len, "loss": args.loss, "epochs": args.epochs,
             "patience": args.patience, "batch_size": args.batch_size, "lr": args.lr, "device": args.device,
             "threads": args.threads, "init_transform": args.init_transform, "init_eps": args.init_eps}
    return DownstreamConfig(**{k: v for k, v in given.items() if v is not None})


def cmd_downstream(args) -> int:
    from .console import print_downstream, print_epoch
    from .data.dataset import Dataset
    from .task2.items import load_init
    from .task2.train import run, save_result

    cfg = _downstream_config(args)
    ds = Dataset.load(args.data)
    tables = load_init(ds, args.init, args.item_ids, args.modality, args.on_missing, seeds=args.seeds)
    result = run(ds, cfg, args.seeds, tables, log=print_epoch)
    if args.out:
        save_result(result, args.out)
    print_downstream(result, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .accel import distributed
    from .console import reader_may_leave
    from .data.images import ImagesOfflineError
    from .io import DataFormatError
    from .train import TrainingDiverged

    args = _parser().parse_args(argv)
    if distributed.launched() and args.command not in ("train", "embed"):
        print(f"error: {args.command} runs in one process: of the commands, train and embed run under torchrun or "
              f"accelerate launch (here WORLD_SIZE={os.environ['WORLD_SIZE']}); run it without a launcher", file=sys.stderr)
        return 2
    handler = {"synth": cmd_synth, "prepare": cmd_prepare, "stats": cmd_stats}.get(getattr(args, "data_command", None)) \
        or {"evaluate": cmd_evaluate, "demo": cmd_demo, "downstream": cmd_downstream, "train": cmd_train,
           "embed": cmd_embed, "batch": cmd_batch, "compare": cmd_compare}[args.command]
    try:
        with reader_may_leave():
            code = handler(args)
    except (DataFormatError, ImagesOfflineError, OSError, ValueError, KeyError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    return distributed.finish(code)  # under torchrun: leave the process group and exit here


if __name__ == "__main__":
    sys.exit(main())
