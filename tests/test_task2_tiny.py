"""Task 2 with the tiny backbone's own item embeddings (a run folder) against an ID table, on the
synthetic domain: both train and evaluate; which wins is reported, not asserted."""
import math

from vlm2rec_lab.config import TrainConfig
from vlm2rec_lab.downstream import DownstreamConfig, load_item_embeddings, run
from vlm2rec_lab.runs import run_method


def test_tiny_backbone_init_vs_id(synth_ds, tiny_path, tmp_path, capsys):
    run_method(synth_ds, TrainConfig(method="vlm2rec", max_steps=6, users_k=64, batch_size=8), tmp_path / "vlm2rec",
               progress=False)
    emb = load_item_embeddings(synth_ds, tmp_path / "vlm2rec", modality="F")
    assert emb.matrix.shape == (synth_ds.n_items, 128)
    cfg = DownstreamConfig(epochs=8, patience=3, batch_size=64, threads=None)
    by_id = run(synth_ds, cfg, [0, 1])
    init = run(synth_ds, cfg, [0, 1], emb)
    a, b = by_id.test.mean()["NDCG@10"], init.test.mean()["NDCG@10"]
    assert math.isfinite(a) and math.isfinite(b) and init.init["kind"] == "embeddings"
    assert set(init.test.full.index) == {0, 1}
    with capsys.disabled():
        print(f"\n[Task 2, tiny backbone] test NDCG@10 ID {a:.4f} vs VLM2Rec init(F) {b:.4f}: {'init' if b > a else 'ID'} wins")
