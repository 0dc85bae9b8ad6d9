"""The main job on the embedded default (``vlm2rec-lab demo``): synthesize and prepare the
planted-modality domain, train the runs every notebook shares (the demo profile: Vanilla, SFT and
VLM2Rec on training seeds 0-2), then run every notebook on it through the papermill batch with the
tiny backbone: figures, tables, runs and ``index.html`` (opening with the verdict) in the output folder.
"""
from __future__ import annotations

import time
from pathlib import Path

from .batch import (DEMO_DOMAIN, DEMO_METHODS, PROFILES, NotebookResult, dataset_names, run_batch,
                    select_notebooks, train_runs)
from .config import PrepareConfig, SynthConfig, parse_seeds


def run_demo(out: str | Path, profile: str = "demo", notebooks: str = "all", users: int | None = None,
             items: int | None = None) -> list[NotebookResult]:
    """Every stage into ``out`` (``raw/``, ``data/``, ``runs/``), a line per stage with its time;
    ``profile``: demo (the demo domain, the shared runs trained up front), quick (smoke runs) or
    full (the default domain, the notebooks' full mode); ``users``, ``items``: the domain's size
    (default: the profile's). Returns the notebooks' results; the verdicts close the output."""
    from .data.dataset import prepare
    from .data.synthetic import generate

    t0 = time.perf_counter()
    stamp = [t0]

    def stage(k: int, what: str) -> None:
        now = time.perf_counter()
        print(f"[{k}/4] {what} ({now - stamp[0]:.0f}s; {now - t0:.0f}s in all)", flush=True)
        stamp[0] = now

    out = Path(out)
    raw, data = out / "raw", out / "data"
    size = {} if profile == "full" else dict(DEMO_DOMAIN)
    size.update({k: v for k, v in (("users", users), ("items", items)) if v is not None})
    generate(SynthConfig(**size), raw, overwrite=True)
    stage(1, f"synthetic domain -> {raw}")
    cfg = PrepareConfig(format="amazon2018", inputs=[str(p) for p in sorted(raw.glob("*.json.gz"))],
                        images=str(raw / "images"))
    ds = prepare(cfg, data, overwrite=True)
    print(ds.stats_table("synthetic").to_string())
    stage(2, f"prepared -> {data}")
    chosen = select_notebooks(notebooks)
    runs_dir = out / "runs" / dataset_names([data])[0] / "runs"  # where run_batch points the notebooks' RUNS_DIR
    if profile == "demo" and any(nb.stem[:2] not in ("00", "01") for nb in chosen):
        seeds = parse_seeds(PROFILES["demo"]["SEEDS"])
        train_runs(data.resolve(), runs_dir.resolve(), DEMO_METHODS, seeds)
        stage(3, f"trained {', '.join(DEMO_METHODS)} on seeds {PROFILES['demo']['SEEDS']} -> {runs_dir}")
    else:
        stage(3, "no runs trained up front (the notebooks train what they need)")
    results = run_batch([data], chosen, out / "runs", profile=profile)
    stage(4, f"notebooks ({profile} profile, backbone tiny) -> {out / 'runs'}")
    failed = [r for r in results if not r.ok]
    for r in results:
        if "verdict" in r.records:
            print(f"\n{r.notebook}: {r.records['verdict']}")
    print(f"\ndone in {time.perf_counter() - t0:.0f}s: {len(results) - len(failed)} notebooks passed, "
          f"{len(failed)} failed; open {out / 'runs' / 'index.html'}")
    return results
