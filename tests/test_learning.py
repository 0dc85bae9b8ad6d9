"""Training learns (default tier): a short vlm-sft run on the small synthetic domain lowers the
loss and ranks the training users' targets better than the untrained model does."""
import numpy as np
import torch
import torch.nn.functional as F

from vlm2rec_lab.config import TrainConfig
from vlm2rec_lab.train import Trainer


def _train_ranks(tr: Trainer) -> np.ndarray:
    """Rank (0 = first) of each training example's target among all items, by the cosine of the
    fused history embedding (T + V) with the fused item embeddings, dropout off."""
    tr.backbone.model.eval()
    with torch.no_grad():
        items = tr.encoder.item_embeddings("T") + tr.encoder.item_embeddings("V")
        z = tr.encoder.sequence_embeddings("T", tr.hist) + tr.encoder.sequence_embeddings("V", tr.hist)
    tr.backbone.model.train()
    s = F.normalize(z, dim=-1) @ F.normalize(items, dim=-1).T
    t = torch.as_tensor(tr.targets)
    return (s > s[torch.arange(len(t)), t][:, None]).sum(1).numpy()


def test_a_short_training_run_learns(synth_ds, tiny_path, tmp_path):
    # 64 users, batch 16: 16 steps are 4 epochs over the same examples. Measured (seed 0, 200 items):
    # loss 2.75 over the first 4 steps, 2.49 over the last 4; HR@10 0.031 -> 0.156, mean rank 72 -> 41.
    cfg = TrainConfig(method="vlm-sft", users_k=64, batch_size=16, max_steps=16, grad_cos_every=0, checkpoint_every=1000)
    tr = Trainer(cfg, synth_ds, tmp_path / "run", progress=False)
    before = _train_ranks(tr)
    tr.train()
    after = _train_ranks(tr)
    loss = np.array([row["loss"] for row in tr.log])
    assert len(loss) == 16
    assert loss[-4:].mean() < loss[:4].mean() - 0.1, loss
    assert (after < 10).mean() >= (before < 10).mean() + 0.08, ((before < 10).mean(), (after < 10).mean())
    assert after.mean() < 0.75 * before.mean(), (before.mean(), after.mean())
