"""The operational collapse definition and its verdict line, on hand-made per-seed values."""
import json

import pandas as pd
import pytest

from vlm2rec_lab.collapse import CollapseCheck, compare_line, find_latents, verdict


def _frame(f2f, v2f, t2f=None):
    n = len(f2f)
    return pd.DataFrame({"f2f": f2f, "t2f": t2f or [0.1] * n, "v2f": v2f}, index=range(n))


def test_collapse_holds_when_every_seed_drops_enough_and_sft_learns():
    van = _frame([0.12, 0.12, 0.12], [0.14, 0.15, 0.13])
    sft = _frame([0.50, 0.55, 0.52], [0.10, 0.12, 0.11])  # drops 0.04, 0.03, 0.02: mean 0.03
    c = CollapseCheck(van, sft, image_oracle=0.30, chance=0.099)
    assert c.seeds_below == 3 and c.v2f_drop == pytest.approx(0.03) and c.f2f_gain == pytest.approx((0.38 + 0.43 + 0.40) / 3)
    assert c.holds and c.reasons() == []
    assert verdict(c).startswith("collapse: SFT v2f HR@10 below vanilla in 3/3 seeds (Δ -0.030")


@pytest.mark.parametrize("sft_v2f, f2f, oracle, why", [
    ([0.10, 0.16, 0.11], [0.5] * 3, 0.3, "2/3 seeds"),  # one seed up: not every seed
    ([0.13, 0.14, 0.12], [0.5] * 3, 0.3, "mean v2f drop +0.010"),  # every seed down, but by 0.01 on average
    ([0.10, 0.11, 0.10], [0.2] * 3, 0.3, "f2f gain +0.080"),  # SFT did not learn enough
    ([0.10, 0.11, 0.10], [0.5] * 3, 0.15, "image oracle 0.150"),  # the image had nothing to lose
])
def test_collapse_fails_for_each_reason(sft_v2f, f2f, oracle, why):
    van = _frame([0.12] * 3, [0.14, 0.15, 0.13])
    c = CollapseCheck(van, _frame(f2f, sft_v2f), image_oracle=oracle, chance=0.099)
    assert not c.holds
    assert any(why in r for r in c.reasons()), c.reasons()
    assert verdict(c).startswith("no collapse by the definition")


def test_compare_line_counts_seeds_and_pairs_by_seed():
    a = _frame([0.5, 0.6, 0.7], [0.2, 0.2, 0.2])
    b = _frame([0.4, 0.4, 0.4], [0.2, 0.3, 0.1])
    line = compare_line("X", a, b, views=("f2f", "v2f"))
    assert "f2f +0.200 (up in 3/3" in line and "v2f +0.000 (up in 1/3" in line
    # paired by seed: seed-wise differences 0.1, 0.2, 0.3 against 0 give t = 3.46 at df 2, p = 0.074 (by hand)
    line = compare_line("Y", _frame([0.5, 0.7, 0.9], [0, 0, 0]), _frame([0.4, 0.5, 0.6], [0, 0, 0]), views=("f2f",))
    assert line == "Y: f2f +0.200 (up in 3/3, p 0.074)"
    # identical per-seed values: no evidence of a difference (p = 1, as evaluate.paired_ttest says)
    assert "p 1)" in compare_line("Z", a, a, views=("f2f",))


def test_find_latents_follows_the_manifest_sources(tmp_path):
    raw = tmp_path / "raw"
    (raw / "oracle").mkdir(parents=True)
    (raw / "oracle" / "latents.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"sources": [{"path": str(raw / "x.json.gz")}]}))
    assert find_latents(data) == raw / "oracle" / "latents.json"
    (data / "manifest.json").write_text(json.dumps({"sources": [{"path": str(tmp_path / "real" / "x.csv")}]}))
    assert find_latents(data) is None


def test_mean_std_cell_and_state_headlines_show_every_seed():
    from vlm2rec_lab.collapse import mean_std_cell, state_headlines

    v = pd.Series([0.1, 0.2, 0.3], index=[0, 1, 2])
    assert mean_std_cell(v) == "0.200 ± 0.100 (seeds 0, 1, 2: 0.100, 0.200, 0.300)"
    assert mean_std_cell(v.iloc[:1]) == "0.100 (seeds 0: 0.100)"  # one seed: no ±
    h = state_headlines({"SFT": _frame([0.5, 0.7], [0.1, 0.1])})
    assert h["headline:SFT f2f HR@10"].startswith("0.600 ± 0.141") and set(h) == {f"headline:SFT {v} HR@10" for v in ("f2f", "t2f", "v2f")}
