"""The GPU issue's targets read off a device check's figures, as a Markdown table: each target
with the measured value, the plain path's figure from the same run, the ratio and whether it is
met; then the figures the open decisions rest on (the probe's cost, shared prefixes and compiling
with varying lengths, the host's share of a step, device syncs).

Usage: python bench/targets.py [OUT_DIR]   (default device_out; reads bench.jsonl, and
bench_vary.jsonl and pipeline.jsonl where present, as bench/device_check.sh writes them)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ITEMS_S, EPOCH_MIN, ITEMS_RATIO, EPOCH_RATIO, LOSS_REL = 10.0, 10.0, 6.0, 15.0, 1e-2


def read(path: Path) -> list[dict]:
    """The JSON lines of ``path`` (other lines, e.g. a traceback's, skipped); [] if it is absent."""
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg}): {line[:80]!r}") from None
    return out


def pick(rows: list[dict], figure: str, path: str | None = None) -> dict | None:
    """The last row of ``figure`` (and ``path``), or None."""
    hits = [r for r in rows if r.get("figure") == figure and (path is None or r.get("path") == path)]
    return hits[-1] if hits else None


def _num(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def targets(bench: list[dict], pipeline: list[dict] | None = None) -> list[tuple[str, str, str, str, str]]:
    """(target, measured, plain path, ratio, met) per target of the issue."""
    out = []
    plain = pick(bench, "item_embedding", "plain")
    project = [r for r in bench if r.get("figure") == "item_embedding" and str(r.get("path", "")).startswith("project")]
    best = min(project, key=lambda r: r["beauty_s"]) if project else None
    if plain and best:
        ratio = plain["beauty_s"] / best["beauty_s"]
        met = best["beauty_s"] <= ITEMS_S and ratio >= ITEMS_RATIO
        out.append((f"Beauty item embedding <= {ITEMS_S:g} s, >= {ITEMS_RATIO:g}x plain",
                    f"{best['beauty_s']} s ({best['path']})", f"{plain['beauty_s']} s", f"{ratio:.2f}x", "yes" if met else "no"))
    ckpt = pick(bench, "train_step", "plain_ckpt")
    epochs = []  # (minutes a Beauty epoch with the probe every 10th step, what gave it)
    if (d := pick(bench, "train_epoch_at_defaults")) is not None:
        epochs.append((d["beauty_epoch_min"], "defaults, eager"))
    if (c := pick(bench, "train_step", "project_paper_compiled")) is not None and "beauty_epoch_min_with_probe_est" in c:
        epochs.append((c["beauty_epoch_min_with_probe_est"], "defaults, compiled (probe estimated)"))
    if (p := pick(pipeline or [], "pipeline_train_steps")) is not None:
        epochs.append((p["beauty_epoch_min"], "the Trainer at its defaults"))
    if ckpt and epochs:
        minutes, what = min(epochs)
        ratio = ckpt["beauty_epoch_min"] / minutes
        met = minutes <= EPOCH_MIN and ratio >= EPOCH_RATIO
        out.append((f"Beauty epoch <= {EPOCH_MIN:g} min, >= {EPOCH_RATIO:g}x plain with checkpointing",
                    f"{minutes} min ({what})", f"{ckpt['beauty_epoch_min']} min", f"{ratio:.2f}x", "yes" if met else "no"))
    if (agree := pick(bench, "train_loss_agreement")) is not None:
        diffs = [agree["rel_diff"]] + [r["loss_rel_diff"] for r in bench
                                       if r.get("figure") == "train_step" and "loss_rel_diff" in r]
        out.append((f"loss within {LOSS_REL:g} of plain (relative)", f"{max(diffs):.4f} (largest)", f"{agree['plain']}",
                    "", "yes" if max(diffs) <= LOSS_REL else "no"))
    if (paper := pick(bench, "train_step", "project_paper")) is not None:
        peak = paper.get("peak_gib")  # (None off a GPU)
        out.append(("peak memory reported", f"{peak} GiB (defaults)" if peak is not None else "not reported",
                    f"{ckpt['peak_gib']} GiB" if ckpt and ckpt.get("peak_gib") is not None else "", "",
                    "yes" if peak is not None else "no"))
    return out


def levers(bench: list[dict], vary: list[dict]) -> list[tuple[str, str]]:
    """(figure, value) for the decisions the issue leaves open."""
    out = []
    steps = {r["path"]: r for r in bench if r.get("figure") == "train_step" and "seconds" in r}
    vsteps = {r["path"]: r for r in vary if r.get("figure") == "train_step" and "seconds" in r}
    if "project_paper" in steps and "project_paper_probe" in steps:
        out.append(("probed step / step at the defaults",
                    f"{steps['project_paper_probe']['seconds'] / steps['project_paper']['seconds']:.2f}"))
    for name, table in (("fixed lengths", steps), ("varying lengths", vsteps)):
        if "project" in table and "project_packed" in table:
            out.append((f"shared prefixes, {name}: step without / with",
                        f"{table['project_packed']['seconds'] / table['project']['seconds']:.2f}"))
        if "project_paper_compiled" in table and "vs_eager" in table["project_paper_compiled"]:
            c = table["project_paper_compiled"]
            out.append((f"compiled / eager speed at the defaults, {name}",
                        f"{c['vs_eager']} (first step {c.get('first_step_s')} s)"))
    shares = [f"{p} {_num(r['host_share'])}" for p, r in steps.items() if r.get("host_share") is not None]
    if shares:
        out.append(("host's share of a step (queueing its work), by path", ", ".join(shares)))
    syncs = [f"{p} {r['syncs']}" for p, r in steps.items() if r.get("syncs") is not None]
    if syncs:
        out.append(("device syncs a step, by path", ", ".join(syncs)))
    items = {r["path"]: r for r in bench if r.get("figure") == "item_embedding" and "items_per_s" in r}
    if "project" in items and "project_packed" in items:
        out.append(("item embedding, shared prefixes / none",
                    f"{items['project']['items_per_s'] / items['project_packed']['items_per_s']:.2f}"))
    if "project_compiled" in items and "project" in items:
        out.append(("item embedding, compiled / eager",
                    f"{items['project_compiled']['items_per_s'] / items['project']['items_per_s']:.2f}"))
    return out


def table(head: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "device_out")
    bench = read(out / "bench.jsonl")
    if not bench:
        sys.exit(f"{out / 'bench.jsonl'}: no figures (run bench/device_check.sh first)")
    env = pick(bench, "env") or {}
    print(f"# Targets ({env.get('torch', '?')}, transformers {env.get('transformers', '?')})\n")
    print(table(("target", "measured", "plain path", "ratio", "met"), targets(bench, read(out / "pipeline.jsonl"))))
    print("\n# Open decisions\n")
    print(table(("figure", "value"), levers(bench, read(out / "bench_vary.jsonl"))))


if __name__ == "__main__":
    main()
