"""Shared fixtures: the real data beside the project, and a small synthetic domain built once."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Built tiny backbones are cached across test sessions here (never in the user's home during tests).
os.environ.setdefault("VLM2REC_CACHE", str(Path(tempfile.gettempdir()) / "vlm2rec_lab_test_cache"))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "real"


def pytest_configure(config):
    """Under ``VLM2REC_MUTANT=<name>`` (tools/mutation_check.py), put that mutant of the method's
    core in place, in memory, before any test is collected (tests/mutants.py)."""
    name = os.environ.get("VLM2REC_MUTANT")
    if name:
        from mutants import apply_named

        m = apply_named(name)
        print(f"\nmutant applied: {m.name} ({m.module})", file=sys.stderr)


def real_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data not found at {path} (expected ../shared/data beside the project)")
    return path


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory):
    from vlm2rec_lab.config import SynthConfig
    from vlm2rec_lab.data.synthetic import generate

    return generate(SynthConfig(users=300, items=200, seed=3), tmp_path_factory.mktemp("synth") / "raw")


@pytest.fixture(scope="session")
def synth_ds(synth_raw, tmp_path_factory):
    from vlm2rec_lab.config import PrepareConfig
    from vlm2rec_lab.data.dataset import Dataset, prepare

    cfg = PrepareConfig(format="amazon2018", inputs=[str(p) for p in sorted(synth_raw.glob("*.json.gz"))],
                        images=str(synth_raw / "images"))
    out = tmp_path_factory.mktemp("prepared") / "synth"
    prepare(cfg, out, progress=False)
    return Dataset.load(out)


@pytest.fixture(scope="session")
def beauty(tmp_path_factory):
    from vlm2rec_lab.config import PrepareConfig
    from vlm2rec_lab.data.dataset import Dataset, prepare

    src = real_data("amazon2014_beauty") / "user_sequence.txt"
    out = tmp_path_factory.mktemp("beauty") / "beauty"
    prepare(PrepareConfig(format="p5", inputs=[str(src)], require_images=False), out, progress=False)
    return Dataset.load(out)


@pytest.fixture(scope="session")
def tiny_path(synth_ds):
    from vlm2rec_lab.tiny import build_tiny

    return build_tiny(synth_ds, seed=0, progress=False)


@pytest.fixture()
def tiny(synth_ds, tiny_path):
    """A freshly loaded tiny backbone (LoRA mutates it, so one per test)."""
    from vlm2rec_lab.backbones import load_backbone

    return load_backbone("tiny", dataset=synth_ds, device="cpu")
