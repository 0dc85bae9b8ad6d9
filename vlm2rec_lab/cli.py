"""`vlm2rec-lab` command line. Flags become typed configs here, once."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .config import FORMATS, PrepareConfig, SynthConfig


def _yes_no(v: str) -> bool:
    if v.lower() in ("yes", "y", "true", "1"):
        return True
    if v.lower() in ("no", "n", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {v!r}")


def _seeds(v: str) -> list[int]:
    out: list[int] = []
    try:
        for part in v.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds: expected e.g. 0-4 or 0,2,3, got {v!r}") from None
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlm2rec-lab", description="VLM2Rec lab: modality collapse in VLM embedders for sequential recommendation.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="synthesize, prepare and describe datasets").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="write the synthetic planted-modality domain (Amazon 2018 raw + PNG images)")
    s.add_argument("--out", required=True)
    s.add_argument("--users", type=int, default=SynthConfig.users)
    s.add_argument("--items", type=int, default=SynthConfig.items)
    s.add_argument("--categories", type=int, default=SynthConfig.categories)
    s.add_argument("--styles", type=int, default=SynthConfig.styles)
    s.add_argument("--text-signal", type=float, default=SynthConfig.text_signal)
    s.add_argument("--image-signal", type=float, default=SynthConfig.image_signal)
    s.add_argument("--seed", type=int, default=SynthConfig.seed)
    s.add_argument("--image-size", type=int, default=SynthConfig.image_size)
    s.add_argument("--name", default=SynthConfig.name)
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
    pr.add_argument("--overwrite", action="store_true")

    st = data.add_parser("stats", help="statistics of a processed dataset (the paper's Table 3)")
    st.add_argument("dir")
    st.add_argument("--json", action="store_true")

    ev = sub.add_parser("evaluate", help="Task 1 metrics of a reference scorer on a processed dataset")
    ev.add_argument("--data", required=True)
    ev.add_argument("--scorer", required=True, help="random, popularity, cooccurrence, or oracle-{text,image,both,latent} (synthetic data, with --latents)")
    ev.add_argument("--latents", help="a synthetic domain's raw folder (or its oracle/latents.json), for the oracle scorers")
    ev.add_argument("--split", choices=("test", "valid"), default="test")
    ev.add_argument("--seeds", type=_seeds, default=None)
    ev.add_argument("--full-ranking", action="store_true", help="also rank over all items, history masked")
    ev.add_argument("--json", action="store_true")

    ds = sub.add_parser("downstream", help="Task 2: SASRec / GRU4Rec with ID or VLM-initialised item embeddings")
    ds.add_argument("--data", required=True)
    ds.add_argument("--model", required=True, choices=("sasrec", "gru4rec"))
    ds.add_argument("--init", default="id", help="id, a run folder (its embeddings/), or FILE.npy (with --item-ids)")
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
    ds.add_argument("--out", default=None, help="folder for per-seed metrics, cold-start buckets and the model")
    ds.add_argument("--json", action="store_true")

    d = sub.add_parser("demo", help="the main job on the embedded default: synthesize, prepare, describe, evaluate")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--users", type=int, default=SynthConfig.users)
    d.add_argument("--items", type=int, default=SynthConfig.items)
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

    cfg = SynthConfig(users=a.users, items=a.items, categories=a.categories, styles=a.styles,
                      text_signal=a.text_signal, image_signal=a.image_signal, seed=a.seed,
                      image_size=a.image_size, name=a.name)
    t0 = time.perf_counter()
    out = generate(cfg, a.out, overwrite=a.overwrite)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s ({cfg.users} users, {cfg.items} items)")
    if not a.no_report:
        print(oracle_report(out).round(4).to_string())
    return 0


def oracle_report(raw_dir: str | Path):
    """Oracle Task 1 metrics per modality of a synthetic domain, through the default preparation."""
    import pandas as pd

    from .data.dataset import prepare
    from .data.synthetic import OracleScorer
    from .evaluate import chance_metrics, evaluate

    raw_dir = Path(raw_dir)
    cfg = PrepareConfig(format="amazon2018", inputs=[str(raw_dir)], images=str(raw_dir / "images"))
    cfg.inputs = [str(p) for p in sorted(raw_dir.glob("*.json.gz"))]
    ds = prepare(cfg, None, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        from .data.dataset import save

        save(ds, Path(tmp) / "ds")
        rows = {}
        for m in OracleScorer.MODALITIES:
            sc = OracleScorer(raw_dir, ds.items["item_id"], m)
            rows[f"oracle-{m}"] = evaluate(ds, sc, progress=False).mean()
    rows["chance"] = pd.Series(chance_metrics(cfg.num_negatives))
    return pd.DataFrame(rows).T


def cmd_prepare(a) -> int:
    from .data.dataset import prepare

    cfg = PrepareConfig(format=a.format, inputs=a.input, images=a.images, image_cache=a.image_cache,
                        require_images=a.require_images, require_titles=a.require_titles, k_core=a.k_core,
                        max_len=a.max_len, max_title_tokens=a.max_title_tokens, train_examples=a.train_examples,
                        num_negatives=a.num_negatives, seeds=tuple(a.seeds), skip_bad_lines=a.skip_bad_lines,
                        offline=a.offline)
    t0 = time.perf_counter()
    ds = prepare(cfg, a.out, overwrite=a.overwrite)
    m = ds.manifest
    print(f"prepared {a.out} in {time.perf_counter() - t0:.1f}s from {m['raw_rows']:,} rows")
    drops = {k: v for k, v in m["drops"].items() if v}
    print("dropped: " + (", ".join(f"{k} {v:,}" for k, v in drops.items()) if drops else "nothing"))
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


def cmd_evaluate(a) -> int:
    from .data.dataset import Dataset
    from .evaluate import evaluate

    ds = Dataset.load(a.data)
    sc = _scorer(a.scorer, ds, a.latents)
    ev = evaluate(ds, sc, split=a.split, seeds=a.seeds, full_ranking=a.full_ranking, name=a.scorer)
    _print_eval(ev, a.json)
    return 0


def cmd_demo(a) -> int:
    """Until the trainer and notebooks land: synthesize, prepare, describe, evaluate the references."""
    from .data.dataset import prepare
    from .data.synthetic import OracleScorer, generate
    from .evaluate import evaluate, results_table
    from .scorers import SCORERS, make_scorer

    t0 = time.perf_counter()
    out = Path(a.out)
    raw, data = out / "raw", out / "data"
    generate(SynthConfig(users=a.users, items=a.items), raw, overwrite=True)
    print(f"[1/3] synthetic domain -> {raw} ({time.perf_counter() - t0:.1f}s)")
    cfg = PrepareConfig(format="amazon2018", inputs=[str(p) for p in sorted(raw.glob("*.json.gz"))], images=str(raw / "images"))
    ds = prepare(cfg, data, overwrite=True)
    print(f"[2/3] prepared -> {data} ({time.perf_counter() - t0:.1f}s); dropped {ds.manifest['drops']}")
    print(ds.stats_table("synthetic").to_string())
    per_seed = {}
    for name in SCORERS:
        per_seed[name] = evaluate(ds, make_scorer(name, ds), name=name).sampled
    for m in OracleScorer.MODALITIES:
        per_seed[f"oracle-{m}"] = evaluate(ds, OracleScorer(raw, ds.items["item_id"], m)).sampled
    table = results_table(per_seed, baseline="popularity")
    print(f"[3/3] Task 1 (test split, 100 sampled negatives, mean over seeds {ds.seeds}):")
    print(table.to_markdown())
    (out / "task1.md").write_text(table.to_markdown() + "\n")
    print(f"done in {time.perf_counter() - t0:.1f}s; table also in {out / 'task1.md'}")
    return 0


def cmd_downstream(a) -> int:
    from .downstream import run_cli

    return run_cli(a)


def main(argv: list[str] | None = None) -> int:
    from .data.images import ImagesOfflineError
    from .io import DataFormatError

    a = _parser().parse_args(argv)
    handler = {"synth": cmd_synth, "prepare": cmd_prepare, "stats": cmd_stats}.get(getattr(a, "data_command", None)) \
        or {"evaluate": cmd_evaluate, "demo": cmd_demo, "downstream": cmd_downstream}[a.command]
    try:
        return handler(a)
    except (DataFormatError, ImagesOfflineError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
