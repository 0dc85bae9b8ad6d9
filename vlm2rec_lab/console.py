"""What the command line prints (:mod:`vlm2rec_lab.cli` turns flags into configs and calls these):
evaluation and comparison tables, a prepared dataset's report, Task 2's results; and standard
output guarded against a reader that leaves early."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path


def print_evaluation(ev, as_json: bool = False) -> None:
    """An :class:`~vlm2rec_lab.evaluate.Evaluation`: per seed and mean, per protocol (or JSON)."""
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


def print_run_results(res: dict, as_json: bool = False) -> None:
    """A run's Task 1 results (:func:`~vlm2rec_lab.runs.evaluate_run`): one line per view and protocol."""
    if as_json:
        print(json.dumps(res, indent=2))
        return
    for view, r in res["views"].items():
        for which in ("sampled", "full"):
            if which in r:
                print(f"{res['method']} {view} ({which}): " + ", ".join(f"{k} {v:.4f}" for k, v in r[which]["mean"].items()))


def print_comparison(tables: dict, per_seed: bool = False, as_json: bool = False) -> None:
    """:func:`~vlm2rec_lab.runsets.compare_sets`' tables: mean ± std per set, p against the baseline,
    the seeds (``per_seed``: and each seed's values), or JSON."""
    if as_json:
        out = {view: {"baseline": t.baseline, "summary": t.summary().reset_index().to_dict(orient="records"),
                      "per_seed": {k: {str(s): row.to_dict() for s, row in df.iterrows()} for k, df in frames.items()}}
               for view, (t, frames) in tables.items()}
        print(json.dumps(out, indent=2, default=float))
        return
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


def print_prepared(ds, out: str | Path, seconds: float) -> None:
    """What preparing ``out`` dropped and skipped, and its statistics."""
    m = ds.manifest
    print(f"prepared {out} in {seconds:.1f}s from {m['raw_rows']:,} rows")
    drops = {k: v for k, v in m["drops"].items() if v}
    named = m.get("drop_examples", {})
    print("dropped: " + (", ".join(f"{k} {v:,}" + (f" (e.g. {', '.join(named[k])})" if named.get(k) else "")
                                   for k, v in drops.items()) if drops else "nothing"))
    for path, rec in m["bad_lines"].items():
        print(f"skipped {rec['count']} bad line(s) in {path}: " + "; ".join(rec["examples"][:3]))
    print(ds.stats_table(Path(out).name).to_string())


def print_epoch(rec: dict) -> None:
    """A Task 2 epoch record that has a validation, on stderr."""
    if "valid_NDCG@10" in rec:
        print(f"seed {rec['seed']} epoch {rec['epoch']:3d} loss {rec['loss']:.4f} "
              f"valid NDCG@10 {rec['valid_NDCG@10']:.4f} ({rec['seconds']:.0f}s)", file=sys.stderr, flush=True)


def print_downstream(result, as_json: bool = False) -> None:
    """A :class:`~vlm2rec_lab.task2.train.DownstreamResult`: test metrics per protocol, the training
    records per seed and the cold-start buckets (or JSON)."""
    import pandas as pd

    if as_json:
        print(json.dumps(result.to_dict(), indent=2, default=float))
        return
    print_evaluation(result.test)
    print(pd.DataFrame(result.runs).set_index("seed").to_string())
    print("cold start (sampled, mean over seeds):")
    print(result.cold_start.round(4).to_string())


@contextlib.contextmanager
def reader_may_leave():
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
