"""Slow tier: what training must show on the embedded default (issue: VLM embedder and objectives).

Each test trains the tiny backbone on a full-size synthetic domain (minutes on 2 cores). The tests
written for the earlier default run on ``REGIMES["independent"]`` (that domain, byte for byte), with
their thresholds unchanged; the collapse test runs on today's default and on the demo's size."""
import pytest

from vlm2rec_lab.config import REGIMES, PrepareConfig, SynthConfig, TrainConfig
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
def independent_domain(tmp_path_factory):
    return _domain(tmp_path_factory, "independent", **REGIMES["independent"])


def test_without_image_signal_sft_ranks_by_text_and_images_stay_at_chance(tmp_path_factory, tmp_path):
    ds = _domain(tmp_path_factory, "noimage", **{**REGIMES["independent"], "image_signal": 0.0})
    res = run_method(ds, TrainConfig(method="vlm-sft"), tmp_path / "sft", progress=False)
    chance = chance_metrics(100)["HR@10"]
    v2f = res["views"]["v2f"]["sampled"]["mean"]["HR@10"]
    t2f = res["views"]["t2f"]["sampled"]["mean"]["HR@10"]
    assert abs(v2f - chance) <= 0.05, v2f
    assert t2f > chance + 0.1, t2f


def test_sft_and_vlm2rec_beat_vanilla_and_popularity(independent_domain, tmp_path):
    ds = independent_domain
    ndcg = {}
    for method in ("vlm-vanilla", "vlm-sft", "vlm2rec"):
        res = run_method(ds, TrainConfig(method=method), tmp_path / method, progress=False)
        ndcg[method] = res["views"]["f2f"]["sampled"]["mean"]["NDCG@10"]
    pop = evaluate(ds, PopularityScorer(ds), progress=False).mean()["NDCG@10"]
    for m in ("vlm-sft", "vlm2rec"):
        assert ndcg[m] > ndcg["vlm-vanilla"] and ndcg[m] > pop, (ndcg, pop)


# Measured (issue 20): the collapse holds at the default size (1000 users x 500 items, 480 steps: SFT v2f
# below vanilla in 5/5 seeds, mean drop 0.023) and at none of the smaller sizes tried, where SFT still
# learns the image within its fewer steps: 400x200 (demo, seeds 0-2: v2f 0.118 -> 0.207), 600x300 (seed 0:
# 0.123 -> 0.114), 400x400, 800x400 (seeds 0-1: 0.134 -> 0.157 / 0.184). Strict: when the demo's size
# starts to collapse, this xfail fails and docs/results.md and the demo's docs must be updated.
_DEMO_SIZE_GAP = pytest.mark.xfail(strict=True, reason="no collapse at the demo's size: SFT still learns the image")


@pytest.mark.parametrize("size", ["default", pytest.param("demo", marks=_DEMO_SIZE_GAP)])
def test_sft_collapses_the_image_side_on_the_default_domain(tmp_path_factory, tmp_path, size):
    """The collapse definition (vlm2rec_lab.collapse) over training seeds 0-2: SFT's v2f HR@10 below
    the untrained model's in every seed and by >= 0.02 on average, SFT's f2f >= untrained + 0.1, the
    image oracle >= chance + 0.1; on the default domain and on the demo profile's smaller one."""
    from vlm2rec_lab.batch import DEMO_DOMAIN
    from vlm2rec_lab.collapse import collapse_check, oracle_table
    from vlm2rec_lab.runsets import ensure_runs

    ds = _domain(tmp_path_factory, size, **({} if size == "default" else DEMO_DOMAIN))
    runs = {m: ensure_runs(ds, TrainConfig(method=m), tmp_path / m, [0, 1, 2]) for m in ("vlm-vanilla", "vlm-sft")}
    oracles = oracle_table(ds, [0, 1, 2])
    check = collapse_check(runs["vlm-vanilla"], runs["vlm-sft"], image_oracle=oracles.loc["oracle-image", "HR@10"],
                           chance=oracles.loc["chance", "HR@10"])
    assert check.holds, (check.reasons(), check.vanilla, check.sft)
