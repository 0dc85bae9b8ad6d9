"""Slow tier: what training must show on the embedded default (issue: VLM embedder and objectives).

Each test trains the tiny backbone on a full-size synthetic domain (minutes on 2 cores)."""
import pytest

from vlm2rec_lab.config import PrepareConfig, SynthConfig, TrainConfig
from vlm2rec_lab.data.dataset import prepare
from vlm2rec_lab.data.synthetic import generate
from vlm2rec_lab.evaluate import chance_metrics, evaluate
from vlm2rec_lab.runs import run_method
from vlm2rec_lab.scorers import PopularityScorer

pytestmark = pytest.mark.slow


def _domain(tmp_path_factory, name, **kw):
    root = tmp_path_factory.mktemp(name)
    raw = generate(SynthConfig(**kw), root / "raw")
    return prepare(PrepareConfig(format="amazon2018", inputs=[str(raw)], images=str(raw / "images")), root / "data",
                   progress=False)


@pytest.fixture(scope="module")
def default_domain(tmp_path_factory):
    return _domain(tmp_path_factory, "default")


def test_without_image_signal_sft_ranks_by_text_and_images_stay_at_chance(tmp_path_factory, tmp_path):
    ds = _domain(tmp_path_factory, "noimage", image_signal=0.0)
    res = run_method(ds, TrainConfig(method="vlm-sft"), tmp_path / "sft", progress=False)
    chance = chance_metrics(100)["HR@10"]
    v2f = res["views"]["v2f"]["sampled"]["mean"]["HR@10"]
    t2f = res["views"]["t2f"]["sampled"]["mean"]["HR@10"]
    assert abs(v2f - chance) <= 0.05, v2f
    assert t2f > chance + 0.1, t2f


def test_sft_and_vlm2rec_beat_vanilla_and_popularity(default_domain, tmp_path):
    ds = default_domain
    ndcg = {}
    for method in ("vlm-vanilla", "vlm-sft", "vlm2rec"):
        res = run_method(ds, TrainConfig(method=method), tmp_path / method, progress=False)
        ndcg[method] = res["views"]["f2f"]["sampled"]["mean"]["NDCG@10"]
    pop = evaluate(ds, PopularityScorer(ds), progress=False).mean()["NDCG@10"]
    for m in ("vlm-sft", "vlm2rec"):
        assert ndcg[m] > ndcg["vlm-vanilla"] and ndcg[m] > pop, (ndcg, pop)
