"""Task 2 from the tiny backbone's VLM2Rec item embeddings, on the synthetic domain, through the same
pipeline over three training seeds (the embedder's run of seed s initialises SASRec's seed s).

Controls: popularity; random Gaussian vectors of the same shape; an item-shuffled copy of the same
tables (the same vectors, each on another item). A transform that only turned the table into a
random code the Linear could learn like IDs would lift those controls as much as the real table.

The domain is the earlier default's knobs (``REGIMES["independent"]``, at the fast tests' size): the
thresholds below were measured there (issue 20 moved the default to the collapse regime, where
VLM2Rec's fused rows are less alike, mean cosine 0.64 against > 0.8, so the premise does not hold)."""
import numpy as np
import pytest

from vlm2rec_lab.config import REGIMES, PrepareConfig, SynthConfig, TrainConfig
from vlm2rec_lab.task2.config import DownstreamConfig
from vlm2rec_lab.task2.items import ItemEmbeddings, load_run_set_embeddings
from vlm2rec_lab.task2.train import run
from vlm2rec_lab.evaluate import evaluate
from vlm2rec_lab.runsets import ensure_runs
from vlm2rec_lab.scorers import PopularityScorer

pytestmark = pytest.mark.slow  # three full tiny trainings and 15 downstream ones: about 90 s on 2 cores
# (46 min measured on a 2-core machine shared with other jobs)
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def independent_ds(tmp_path_factory):
    from vlm2rec_lab.data.dataset import prepare
    from vlm2rec_lab.data.synthetic import generate

    root = tmp_path_factory.mktemp("independent")
    raw = generate(SynthConfig(users=300, items=200, seed=3, **REGIMES["independent"]), root / "raw")
    return prepare(PrepareConfig(format="amazon2018", inputs=[str(raw)], images=str(raw / "images")), root / "data",
                   progress=False)


@pytest.fixture(scope="module")
def vlm2rec_tables(independent_ds, tmp_path_factory):
    root = tmp_path_factory.mktemp("task2") / "vlm2rec"
    ensure_runs(independent_ds, TrainConfig(method="vlm2rec", grad_cos_every=0, checkpoint_every=0), root, SEEDS)
    return load_run_set_embeddings(independent_ds, root)


def _ndcg(ds, cfg, tables=None) -> float:
    return float(run(ds, cfg, SEEDS, tables).test.sampled["NDCG@10"].mean())


def test_sasrec_from_whitened_vlm2rec_embeddings_learns_beyond_every_control(independent_ds, vlm2rec_tables):
    ds = independent_ds
    assert sorted(vlm2rec_tables) == SEEDS and vlm2rec_tables[0].matrix.shape == (ds.n_items, 128)
    e = vlm2rec_tables[0].matrix / np.linalg.norm(vlm2rec_tables[0].matrix, axis=1, keepdims=True)
    assert (e @ e.T).mean() > 0.8  # the anisotropy the transform is for: the rows share one direction
    cfg = DownstreamConfig(epochs=30, patience=3, batch_size=64)
    assert cfg.init_transform == "whiten"
    by_id = _ndcg(ds, cfg)
    pop = float(evaluate(ds, PopularityScorer(ds), seeds=SEEDS, progress=False).sampled["NDCG@10"].mean())
    init = _ndcg(ds, cfg, vlm2rec_tables)
    gauss = _ndcg(ds, cfg, {s: ItemEmbeddings(np.random.default_rng(s).normal(size=t.matrix.shape).astype(np.float32), "gauss")
                                  for s, t in vlm2rec_tables.items()})
    shuffled = _ndcg(ds, cfg, {s: ItemEmbeddings(t.matrix[np.random.default_rng(100 + s).permutation(len(t.matrix))], "shuffled")
                                     for s, t in vlm2rec_tables.items()})
    l2 = _ndcg(ds, DownstreamConfig(epochs=30, patience=3, batch_size=64, init_transform="l2"), vlm2rec_tables)
    seen = f"ID {by_id:.4f}, popularity {pop:.4f}, whitened {init:.4f}, L2 {l2:.4f}, gauss {gauss:.4f}, shuffled {shuffled:.4f}"
    print(f"\n[Task 2, tiny backbone, SASRec test NDCG@10 over seeds {SEEDS}] {seen}")
    # measured once (seeds 0-2, one run of this test, torch on CPU): ID 0.4694, popularity 0.0682,
    # whitened 0.4111, L2 0.1012, gauss 0.0719, shuffled 0.0602 -- whitened init recovers 0.343 / 0.401
    # = 86% of the popularity-to-ID gap; the controls stay within 0.035 of popularity
    assert by_id > pop, seen
    assert init > max(pop, gauss, shuffled), seen
    assert init - pop >= 0.25 * (by_id - pop), seen  # at least a quarter of the popularity-to-ID gap
    assert init > l2, seen  # L2 normalisation alone leaves the rows too alike for the Linear
