"""The mutation check stays true as code moves: every mutant still finds its snippet in one function
or method and names tests that exist (default tier); the slow tier runs the whole check."""
import subprocess
import sys
from pathlib import Path

import pytest

from mutants import all_mutants, locate

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = all_mutants()


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_each_mutant_applies_and_names_existing_tests(name):
    m = MUTANTS[name]
    locate(m)  # raises where the snippet is not found exactly once inside a function or method
    assert m.caught_by
    for node in m.caught_by:
        path, _, func = node.partition("::")
        assert (ROOT / path).is_file() and f"def {func.split('[')[0]}(" in (ROOT / path).read_text(), node


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_mutant_is_caught():
    p = subprocess.run([sys.executable, "tools/mutation_check.py"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "SURVIVED" not in p.stdout
