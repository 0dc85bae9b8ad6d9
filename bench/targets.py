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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BEAUTY_ITEMS, BEAUTY_USERS  # noqa: E402

ITEMS_S, EPOCH_MIN, ITEMS_RATIO, EPOCH_RATIO, LOSS_REL = 10.0, 10.0, 6.0, 15.0, 1e-2


def read(path: Path) -> list[dict]:
    """The JSON lines of ``path`` (other lines, e.g. a traceback's, skipped); [] if it is absent. A
    last line cut off mid-way (a step stopped by its timeout) is skipped with a warning; a broken
    line anywhere else is an error (file:line)."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                if n == len(lines) and not text.endswith("\n"):
                    print(f"warning: {path}:{n}: last line cut off, skipped: {line[:80]!r}", file=sys.stderr)
                    continue
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg}): {line[:80]!r}") from None
    return out


def pick(rows: list[dict], figure: str, path: str | None = None, has: str | None = None) -> dict | None:
    """The last row of ``figure`` (and ``path``; with ``has``, only rows with that field: a step that
    ran out of memory or failed to compile has no ``seconds``), or None."""
    hits = [r for r in rows if r.get("figure") == figure and (path is None or r.get("path") == path)
            and (has is None or r.get(has) is not None)]
    return hits[-1] if hits else None


def _epoch_min(seconds_per_step: float) -> float:
    """A Beauty epoch (19,757 training users at batch 8) in minutes."""
    return seconds_per_step * BEAUTY_USERS / 8 / 60


def _num(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def targets(bench: list[dict], pipeline: list[dict] | None = None) -> list[tuple[str, str, str, str, str]]:
    """(target, measured, plain path, ratio, met) per target of the issue. Met or not is decided on
    the finest figures a row has (items/s, seconds a step), not on the rounded Beauty times."""
    out = []
    plain = pick(bench, "item_embedding", "plain", has="items_per_s")
    project = [r for r in bench if r.get("figure") == "item_embedding" and str(r.get("path", "")).startswith("project")
               and r.get("items_per_s")]
    best = max(project, key=lambda r: r["items_per_s"]) if project else None
    if plain and best:
        secs, ratio = BEAUTY_ITEMS / best["items_per_s"], best["items_per_s"] / plain["items_per_s"]
        met = secs <= ITEMS_S and ratio >= ITEMS_RATIO
        out.append((f"Beauty item embedding <= {ITEMS_S:g} s, >= {ITEMS_RATIO:g}x plain",
                    f"{secs:.1f} s ({best['path']})", f"{BEAUTY_ITEMS / plain['items_per_s']:.1f} s", f"{ratio:.2f}x",
                    "yes" if met else "no"))
    ckpt = pick(bench, "train_step", "plain_ckpt", has="seconds")
    epochs = []  # (minutes a Beauty epoch with the probe every 10th step, what gave it)
    if (d := pick(bench, "train_epoch_at_defaults", has="seconds_per_step")) is not None:
        epochs.append((_epoch_min(d["seconds_per_step"]), "defaults, eager"))
    if (c := pick(bench, "train_step", "project_paper_compiled", has="beauty_epoch_min_with_probe")) is not None:
        epochs.append((c["beauty_epoch_min_with_probe"], "defaults, compiled"))
    elif (c := pick(bench, "train_step", "project_paper_compiled", has="beauty_epoch_min_with_probe_est")) is not None:
        epochs.append((c["beauty_epoch_min_with_probe_est"], "defaults, compiled (probe estimated)"))
    if (p := pick(pipeline or [], "pipeline_train_steps", has="mean_step_s")) is not None:
        epochs.append((_epoch_min(p["mean_step_s"]), "the Trainer at its defaults"))
    if epochs:
        minutes, what = min(epochs)
        ratio = _epoch_min(ckpt["seconds"]) / minutes if ckpt else None
        met = minutes <= EPOCH_MIN and ratio is not None and ratio >= EPOCH_RATIO
        out.append((f"Beauty epoch <= {EPOCH_MIN:g} min, >= {EPOCH_RATIO:g}x plain with checkpointing",
                    f"{minutes:.1f} min ({what})", f"{_epoch_min(ckpt['seconds']):.1f} min" if ckpt else "not measured",
                    f"{ratio:.2f}x" if ratio else "", "yes" if met else "no"))
    if (agree := pick(bench, "train_loss_agreement", has="rel_diff")) is not None:
        # the compiled step is compared with the eager one: against plain it is within the sum
        compiled = [r["loss_rel_diff"] for r in bench if r.get("figure") == "train_step" and r.get("loss_rel_diff") is not None]
        bound = agree["rel_diff"] + max(compiled, default=0.0)
        shown = f"{agree['rel_diff']:.4f}" + (f"; compiled {bound:.4f} at most" if compiled else "")
        out.append((f"loss within {LOSS_REL:g} of plain (relative)", shown, f"{agree['plain']}", "",
                    "yes" if bound <= LOSS_REL else "no"))
    paper = pick(bench, "train_step", "project_paper")
    if paper is not None:
        ran = paper.get("seconds") is not None and paper.get("peak_gib") is not None  # (None off a GPU)
        shown = f"{paper['peak_gib']} GiB (defaults)" if ran else "out of memory" if paper.get("oom") else "not reported"
        out.append(("peak memory reported", shown,
                    f"{ckpt['peak_gib']} GiB" if ckpt and ckpt.get("peak_gib") is not None else "", "",
                    "yes" if ran else "no"))
    return out


def levers(bench: list[dict], vary: list[dict]) -> list[tuple[str, str]]:
    """(figure, value) for the decisions the issue leaves open."""
    out = []
    steps = {r["path"]: r for r in bench if r.get("figure") == "train_step" and "seconds" in r}
    vsteps = {r["path"]: r for r in vary if r.get("figure") == "train_step" and "seconds" in r}
    if "project_paper" in steps and "project_paper_probe" in steps:
        out.append(("probed step / step at the defaults",
                    f"{steps['project_paper_probe']['seconds'] / steps['project_paper']['seconds']:.2f}"))
    if (c := steps.get("project_paper_compiled", {})).get("probe_step_vs_step") is not None:
        out.append(("probed step / step at the defaults, compiled", f"{c['probe_step_vs_step']:.2f}"))
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
    hist = {r["path"]: r for r in bench if r.get("figure") == "history_embedding" and "items_per_s" in r}
    if "project" in hist:  # (rates per history item: the two paths' samples differ in length)
        ratio = f", {hist['project']['items_per_s'] / hist['plain']['items_per_s']:.2f}x plain" if "plain" in hist else ""
        out.append(("Beauty's test histories embedded (what `embed` adds to items)", f"{hist['project']['beauty_s']} s{ratio}"))
    if (v := pick(bench, "vision_tower", has="rotary_ratio")) is not None:
        out.append(("vision tower, the stand-in's rotary / Hugging Face's (flash path)",
                    f"{v['rotary_ratio']:.2f} ({v.get('flash_images_per_s')} against {v.get('hf_rotary_images_per_s')} images/s)"))
    if (m := pick(bench, "lora_merge", has="ratio")) is not None:
        out.append(("item embedding with an adapter, merged / unmerged",
                    f"{m['ratio']:.2f} (no adapter / merged {_num(1 / m['vs_no_adapter'] if m.get('vs_no_adapter') else None)}; "
                    f"merge {m.get('merge_s')} s, max rel diff {m.get('max_rel_diff')})"))
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
