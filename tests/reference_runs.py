"""The reference numbers the redesign (issue 24) must reproduce: the logged losses of a short tiny
run of every training method, and the item embeddings of one run, on the tests' small synthetic
domain. Recorded once before anything moved (``python tools/record_reference.py``) into
tests/reference/; tests/test_reference.py recomputes them and compares (≤ 1e-6 on the CPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vlm2rec_lab.config import PrepareConfig, SynthConfig, TrainConfig
from vlm2rec_lab.methods import METHODS

HERE = Path(__file__).resolve().parent / "reference"
TRAINING = sorted(name for name, m in METHODS.items() if m.trains)
STEPS = 3
TERMS = ("loss", "info_nce", "wpcl", "crtr", "alpha", "beta")  # what each step logs that must not move


def reference_dataset(root: Path):
    """The tests' small synthetic domain (conftest's ``synth_ds``), prepared the same way."""
    from vlm2rec_lab.data.dataset import prepare
    from vlm2rec_lab.data.synthetic import generate

    raw = generate(SynthConfig(users=300, items=200, seed=3), root / "raw")
    cfg = PrepareConfig(format="amazon2018", inputs=[str(p) for p in sorted(raw.glob("*.json.gz"))], images=str(raw / "images"))
    return prepare(cfg, root / "synth", progress=False)


def short_run(ds, method: str, run_dir: Path) -> tuple[dict[str, list[float]], object]:
    """``STEPS`` steps of ``method`` (16 users, batch 8, seed 0, LoRA dropout 0.2): the logged terms
    per step, and the trainer."""
    from vlm2rec_lab.train import Trainer

    cfg = TrainConfig(method=method, users_k=16, batch_size=8, max_steps=STEPS, seed=0, lora_dropout=0.2,
                      grad_cos_every=0, checkpoint_every=1000)
    tr = Trainer(cfg, ds, run_dir, progress=False)
    tr.train()
    return {k: [float(row[k]) for row in tr.log] for k in TERMS if k in tr.log[0]}, tr


def item_embeddings(tr) -> np.ndarray:
    """The fused item embeddings (T + V) of a trained run's model, dropout off."""
    import torch

    tr.backbone.model.eval()
    with torch.no_grad():
        return (tr.encoder.item_embeddings("T") + tr.encoder.item_embeddings("V")).numpy()
