"""The embedding explorer, driven headless from Python: the plot data and the selection panel
follow the controls."""
import io

import numpy as np
import pytest
from PIL import Image

from vlm2rec_lab.config import TrainConfig
from vlm2rec_lab.runs import run_method
from vlm2rec_lab.viz import embedding_explorer, reduce_2d


@pytest.fixture(scope="module")
def runs(synth_ds, tiny_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer")
    run_method(synth_ds, TrainConfig(method="vlm-vanilla"), root / "vanilla", progress=False)
    run_method(synth_ds, TrainConfig(method="vlm2rec", max_steps=2, users_k=16, batch_size=8), root / "vlm2rec", progress=False)
    return {"Vanilla": root / "vanilla", "VLM2Rec": root / "vlm2rec"}


def test_controls_drive_the_map_and_the_selection(synth_ds, runs):
    w = embedding_explorer(runs, synth_ds, sample_size=60, reducer="pca")
    ex = w.explorer
    assert len(ex.points) == 60 and set(ex.points.columns) >= {"x", "y", "item_idx", "colour"}
    first = ex.points[["x", "y"]].to_numpy().copy()
    ex.modality_w.value = "V"
    assert not np.allclose(first, ex.points[["x", "y"]].to_numpy())  # another modality, another map
    assert list(ex.selection["neighbours"]) == ["T"]  # neighbours in the other modality's space
    ex.colour_w.value = "popularity"
    counts = synth_ds.train_item_counts()[ex.points["item_idx"].to_numpy()]
    assert np.allclose(ex.points["colour"].astype(float), np.log1p(counts))
    ex.colour_w.value = "split"
    assert set(ex.points["colour"]) <= {"test target", "valid target", "train only"}
    ex.run_w.value = "VLM2Rec"
    ex.colour_w.value = "weak modality"
    assert set(ex.points["colour"]) <= {"image weak", "text weak", "no user"}
    target = ex.item_w.options[7][1]
    ex.item_w.value = target
    assert ex.selection["item_idx"] == target
    assert synth_ds.items["title"].iat[target] in ex.title_w.value
    assert len(ex.image_w.value) > 0 and "<ol>" in ex.neigh_w.value
    ex.sample_w.value = 40
    assert len(ex.points) == 40


def map_title(png: bytes) -> str:
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.width > 300
        return im.info["Title"]


def test_every_control_redraws_the_map(synth_ds, runs):
    """The map is a PNG in an Image widget, replaced on each change: each control (and a picked item,
    which the map rings) gives new image bytes, whose title names the controls."""
    ex = embedding_explorer(runs, synth_ds, sample_size=60, reducer="pca").explorer
    assert map_title(ex.plot_w.value) == "Vanilla · F · 60 items · by category"
    for ctrl, value in ((ex.run_w, "VLM2Rec"), (ex.modality_w, "V"), (ex.colour_w, "popularity"), (ex.sample_w, 40)):
        before = ex.plot_w.value
        ctrl.value = value
        assert ex.plot_w.value != before, ctrl.description
    assert map_title(ex.plot_w.value) == "VLM2Rec · V · 40 items · by popularity"
    before = ex.plot_w.value
    ex.item_w.value = ex.item_w.options[3][1]
    assert ex.plot_w.value != before and map_title(ex.plot_w.value) == "VLM2Rec · V · 40 items · by popularity"


def test_reduce_2d_pca_keeps_the_main_axis():
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(0, 10, 200), rng.normal(0, 1, (200, 4))]
    xy = reduce_2d(x, "pca")
    assert xy.shape == (200, 2) and abs(np.corrcoef(xy[:, 0], x[:, 0])[0, 1]) > 0.99
