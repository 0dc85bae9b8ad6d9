"""The redesign changes no number (issue 24): the same short runs give the logged losses and the
item embeddings recorded before anything moved (tests/reference/, tools/record_reference.py)."""
import json

import numpy as np
import pytest

from reference_runs import HERE, TRAINING, item_embeddings, short_run

RECORDED = json.loads((HERE / "losses.json").read_text())


def test_every_training_method_is_recorded():
    assert sorted(RECORDED) == TRAINING


# vlm2rec in the default tier (its losses and its item embeddings); every other method in the slow tier
@pytest.mark.parametrize("method", ["vlm2rec", *[pytest.param(m, marks=pytest.mark.slow) for m in TRAINING if m != "vlm2rec"]])
def test_a_short_run_logs_the_recorded_losses(synth_ds, tiny_path, tmp_path, method):
    got, tr = short_run(synth_ds, method, tmp_path / "run")
    want = RECORDED[method]
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.allclose(got[k], want[k], rtol=0, atol=1e-6), (method, k, got[k], want[k])
    if method == "vlm2rec":
        assert np.allclose(item_embeddings(tr), np.load(HERE / "vlm2rec_item_F.npy"), rtol=0, atol=1e-6)
