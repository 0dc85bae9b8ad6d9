"""Shared fixtures: the real data beside the project, and a small synthetic domain built once."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "real"


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
