"""Small helpers the notebooks share: paths anchored at the repository, recording key numbers
into the executed notebook (read back by tests and the batch index), saving figures and tables.

``record`` displays the values under a private MIME type, so they live in the notebook file's
outputs (its stored record) without any extra package; ``read_records`` reads them back.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

MIME = "application/vnd.vlm2rec.record+json"


def repo_root() -> Path:
    """The repository root (the folder holding pyproject.toml), for paths in notebooks."""
    here = Path(__file__).resolve()
    for p in [here, *here.parents]:
        if (p / "pyproject.toml").exists():
            return p
    return Path.cwd()


def resolve(path: str | Path) -> Path:
    """Absolute paths stay; relative ones are anchored at the repository root (never ``../..``)."""
    p = Path(path)
    return p if p.is_absolute() else repo_root() / p


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def record(**values) -> None:
    """Record key numbers in the executed notebook (one display output holding them)."""
    from IPython.display import display

    data = {k: _plain(v) for k, v in values.items()}
    display({MIME: data, "text/plain": "recorded: " + ", ".join(f"{k}={v}" for k, v in data.items())}, raw=True)


def read_records(notebook: str | Path) -> dict:
    """Every value recorded in an executed notebook (later records win)."""
    nb = json.loads(Path(notebook).read_text())
    out: dict = {}
    for cell in nb.get("cells", []):
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if MIME in data:
                out.update(data[MIME])
    return out


def save_figure(fig, out_dir: str | Path, name: str) -> list[Path]:
    """Save a matplotlib figure as PNG and SVG into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def save_table(df, out_dir: str | Path, name: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"{name}.csv")
    return out / f"{name}.csv"


QUICK_TRAIN = {"max_steps": 6, "users_k": 64, "batch_size": 8, "grad_cos_every": 2, "checkpoint_every": 0}


def train_config(method: str, backbone: str = "tiny", seed: int = 0, quick: bool = False, **overrides):
    """The notebooks' TrainConfig: the method's defaults, or a few steps on a few users when ``quick``."""
    from .config import TrainConfig

    return TrainConfig(method=method, backbone=backbone, seed=seed, **{**(QUICK_TRAIN if quick else {}), **overrides})
