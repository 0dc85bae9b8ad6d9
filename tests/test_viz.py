"""Figures that show intervals over training seeds (drawn with seaborn): the interval drawn is the
sample std (ddof=1) over the seeds fed in, computed here by hand."""
import numpy as np
import pandas as pd
import pytest

from vlm2rec_lab.viz import gradient_cosine_curves, modality_dropout_bars

# HR@10 of three training seeds per (state, view); every mean distinct, so a bar is found by its height
PER_SEED = {("Vanilla", "f2f"): [0.30, 0.34, 0.41], ("Vanilla", "v2f"): [0.10, 0.12, 0.20],
            ("VLM2Rec", "f2f"): [0.50, 0.52, 0.57], ("VLM2Rec", "v2f"): [0.40, 0.46, 0.49]}


def hand_mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5


def dropout_table(with_std: bool = True) -> pd.DataFrame:
    """The shape of diagnostics.modality_dropout_table: index (state, view), mean, std, seeds."""
    index = pd.MultiIndex.from_tuples(list(PER_SEED), names=["state", "view"])
    stats = [hand_mean_std(v) for v in PER_SEED.values()]
    table = pd.DataFrame({"HR@10": [m for m, _ in stats], "HR@10_std": [s for _, s in stats], "seeds": 3}, index=index)
    return table if with_std else table.drop(columns="HR@10_std")


def test_dropout_error_bars_span_one_std_over_seeds():
    ax = modality_dropout_bars(dropout_table()).axes[0]
    centres = {round(b.get_height(), 9): b.get_x() + b.get_width() / 2 for c in ax.containers for b in c}
    errorbars = [line.get_xydata() for line in ax.lines if len(line.get_xydata()) > 2]  # caps and stem
    assert len(centres) == len(errorbars) == len(PER_SEED)
    for values in PER_SEED.values():
        mean, std = hand_mean_std(values)
        x = centres[round(mean, 9)]
        (xy,) = [e for e in errorbars if np.nanmean(e[:, 0]) == pytest.approx(x)]
        assert (np.nanmin(xy[:, 1]), np.nanmax(xy[:, 1])) == pytest.approx((mean - std, mean + std))
    assert "mean ± std over 3 training seeds" in ax.get_title()


def test_dropout_bars_without_std_have_no_error_bars():
    ax = modality_dropout_bars(dropout_table(with_std=False), chance=0.1).axes[0]
    assert sorted(b.get_height() for c in ax.containers for b in c) == pytest.approx(sorted(hand_mean_std(v)[0] for v in PER_SEED.values()))
    assert [line.get_label() for line in ax.lines] == ["chance"]


def test_gradient_band_is_one_std_over_seeds_and_absent_for_one_seed():
    steps = [0, 5, 10]
    cos = {0: ([0.9, 0.5, 0.2], [0.1, -0.2, -0.4]), 1: ([0.7, 0.6, 0.1], [0.3, 0.0, -0.1]),
           2: ([0.8, 0.2, 0.3], [0.2, -0.1, -0.6])}
    sft = {seed: pd.DataFrame({"step": steps, "epoch": 0, "cos_total_t": t, "cos_total_v": v}) for seed, (t, v) in cos.items()}
    single = sft[0].assign(cos_total_t=[0.5, 0.5, 0.5])
    ax = gradient_cosine_curves({"SFT": sft, "VLM2Rec": single}).axes[0]
    bands = [c.get_paths()[0].vertices for c in ax.collections if c.get_paths()]
    assert len(bands) == 2  # SFT text and image; one seed draws no band
    for k in (0, 1):  # text, image
        for i, step in enumerate(steps):
            mean, std = hand_mean_std([cos[seed][k][i] for seed in cos])
            assert any(sorted(set(np.round(b[b[:, 0] == step, 1], 9))) == pytest.approx([mean - std, mean + std])
                       for b in bands), (k, step)
    assert "±1 std over 3 seeds" in ax.get_title()
