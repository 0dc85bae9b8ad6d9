"""Benchmark: `data prepare` on synthetic Amazon 2018 raw files of 1M and 5M review rows.

Prints rows per second, peak memory (of a fresh process per size) and the 5M/1M time ratio; cost
should grow linearly (ratio <= 6). Usage: python bench/prepare.py [--sizes 1000000 5000000] [--keep]
"""
from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson


def make_raw(folder: Path, rows: int, seed: int = 0) -> Path:
    """Reviews (JSON lines, gzip) with Zipf-like item popularity and ~10 rows per user, plus meta."""
    rng = np.random.default_rng(seed)
    n_items = max(200, rows // 50)
    folder.mkdir(parents=True, exist_ok=True)
    lengths = rng.geometric(1 / 6, size=rows // 5 + 1) + 4  # mean 10 rows per user
    n_users = int(np.searchsorted(np.cumsum(lengths), rows)) + 1
    lengths = lengths[:n_users]
    lengths[-1] -= int(lengths.sum()) - rows
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items = rng.choice(n_items, size=int(lengths.sum()), p=pop / pop.sum())
    users = np.repeat(np.arange(n_users), lengths)
    days = rng.integers(0, 3000, size=users.size)
    base = 1_300_000_000
    with gzip.open(folder / "Bench.json.gz", "wb", compresslevel=1) as f:
        chunk = []
        for u, i, d in zip(users.tolist(), items.tolist(), days.tolist()):
            chunk.append(orjson.dumps({"overall": 5.0, "verified": True, "reviewerID": f"A{u:09d}", "asin": f"B{i:09d}",
                                       "unixReviewTime": base + d * 86400, "reviewText": "fine"}))
            if len(chunk) == 100_000:
                f.write(b"\n".join(chunk) + b"\n")
                chunk = []
        if chunk:
            f.write(b"\n".join(chunk) + b"\n")
    with gzip.open(folder / "meta_Bench.json.gz", "wb", compresslevel=1) as f:
        f.write(b"\n".join(orjson.dumps({"asin": f"B{i:09d}", "title": f"Item &amp; thing {i}", "category": ["Bench", f"c{i % 20}"]})
                           for i in range(n_items)) + b"\n")
    return folder


def child(raw: str, out: str) -> None:
    from vlm2rec_lab.config import PrepareConfig
    from vlm2rec_lab.data.dataset import prepare

    cfg = PrepareConfig(format="amazon2018", inputs=[raw], require_images=False)
    t0 = time.perf_counter()
    ds = prepare(cfg, out, progress=False)
    secs = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": secs, "peak_mib": peak_kib / 1024, "raw_rows": ds.manifest["raw_rows"], **ds.stats()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("RAW", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vlm2rec-bench-"))
    results = {}
    try:
        for n in a.sizes:
            t0 = time.perf_counter()
            raw = make_raw(work / f"raw_{n}", n)
            gen = time.perf_counter() - t0
            r = subprocess.run([sys.executable, __file__, "--child", str(raw), str(work / f"ds_{n}")],
                               capture_output=True, text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["rows_per_second"] = res["raw_rows"] / res["seconds"]
            results[n] = res
            print(json.dumps({"rows": n, "generate_s": round(gen, 1), "prepare_s": round(res["seconds"], 2),
                              "rows_per_s": round(res["rows_per_second"]), "peak_mib": round(res["peak_mib"]),
                              "users": res["users"], "items": res["items"], "interactions": res["interactions"]}))
        if len(a.sizes) >= 2:
            lo, hi = min(a.sizes), max(a.sizes)
            ratio = results[hi]["seconds"] / results[lo]["seconds"]
            print(json.dumps({"time_ratio": round(ratio, 2), "rows_ratio": hi / lo,
                              "memory_ratio": round(results[hi]["peak_mib"] / results[lo]["peak_mib"], 2),
                              "linear_enough": ratio <= 6 * (hi / lo) / 5}))
    finally:
        if not a.keep and a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
