"""Run each mutant of the method's core (tests/mutants_*.yaml) against the tests meant to catch it.

    python tools/mutation_check.py [NAME ...]      # every mutant, or the named ones

First the union of the ``caught_by`` tests runs unmutated (it must pass); then, per mutant, its
``caught_by`` tests run in a fresh pytest process with ``VLM2REC_MUTANT=<name>`` (conftest.py puts the
mutant in place in memory before the tests are collected). A mutant is caught when at least one of
its tests fails. Prints a line per mutant with the failing tests; exits 1 when a mutant survives or
the unmutated run fails.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's package, not whichever is installed

from mutants import all_mutants, locate  # noqa: E402


def pytest(nodes: list[str], mutant: str | None = None) -> tuple[int, list[str], str]:
    """Run ``nodes`` (default tier) in a fresh process; (exit code, failed node ids, output)."""
    env = {**os.environ, "VLM2REC_MUTANT": mutant or ""}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", *nodes],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    failed = sorted(set(re.findall(r"^FAILED (\S+)", p.stdout, flags=re.M)))
    return p.returncode, [f.split(" - ")[0] for f in failed], p.stdout + p.stderr


def main(argv: list[str]) -> int:
    mutants = all_mutants()
    chosen = [mutants[n] for n in argv] if argv else list(mutants.values())
    for m in chosen:
        locate(m)  # each snippet still found exactly once, in a function or method
    nodes = sorted({n for m in chosen for n in m.caught_by})
    t0 = time.perf_counter()
    code, failed, out = pytest(nodes)
    if code != 0:
        print(out[-3000:])
        print(f"the unmutated run of the {len(nodes)} tests failed: {failed}")
        return 1
    print(f"unmutated: {len(nodes)} test nodes pass ({time.perf_counter() - t0:.0f}s)")
    survived = []
    for m in chosen:
        t0 = time.perf_counter()
        code, failed, out = pytest(list(m.caught_by), m.name)
        if "mutant applied" not in out:
            print(out[-2000:])
            raise SystemExit(f"{m.name}: conftest did not report the mutant applied")
        ok = code != 0 and bool(failed)
        print(f"{'caught  ' if ok else 'SURVIVED'} {m.name} ({time.perf_counter() - t0:.0f}s): {m.why}")
        for f in failed:
            print(f"           fails: {f}")
        if not ok:
            survived.append(m.name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants caught" + (f"; survived: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
