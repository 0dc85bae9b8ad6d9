"""Modality collapse, operationally, and the verdict line that reports it (docs/method.md §5).

Collapse (ours, from the paper's §3 and Table 1: "v2f performance degrades below even its Vanilla
baseline"), over a set of training seeds, each run ranked against its own seed's negatives:

* SFT's v2f HR@10 is below the untrained model's in **every** seed, and by at least
  :data:`MIN_V2F_DROP` on average;
* SFT's f2f HR@10 beats the untrained model's by at least :data:`MIN_F2F_GAIN` (SFT did learn);
* the image oracle is at least chance + :data:`MIN_IMAGE_ORACLE_MARGIN` (the image side had a
  signal to lose), where the domain has one (synthetic data).

:func:`collapse_check` measures it from run sets; :func:`verdict` writes the one line a person reads
first (the demo's index page, the notebooks' records).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

MIN_V2F_DROP = 0.02
MIN_F2F_GAIN = 0.10
MIN_IMAGE_ORACLE_MARGIN = 0.10


def _ttest_p(a: pd.Series, b: pd.Series) -> float:
    """:func:`~vlm2rec_lab.evaluate.paired_ttest` of two per-seed series (nan with fewer than 2 shared seeds)."""
    from .evaluate import paired_ttest

    if len(a.index.intersection(b.index)) < 2:
        return float("nan")
    return float(paired_ttest(a.to_frame("x"), b.to_frame("x"))["x"])


def _fmt_p(p: float) -> str:
    return "p n/a" if not np.isfinite(p) else f"p {p:.2g}"


@dataclass
class CollapseCheck:
    """Per-seed HR@10 (or ``metric``) of the untrained model and SFT in the f2f and v2f views."""

    vanilla: pd.DataFrame  # index: training seed; columns: f2f, v2f
    sft: pd.DataFrame
    metric: str = "HR@10"
    image_oracle: float | None = None
    chance: float | None = None

    @property
    def seeds(self) -> list[int]:
        return sorted(self.vanilla.index.intersection(self.sft.index))

    def _delta(self, view: str) -> pd.Series:
        s = self.seeds
        return self.sft.loc[s, view] - self.vanilla.loc[s, view]

    @property
    def v2f_drop(self) -> float:
        """Mean over seeds of vanilla v2f − SFT v2f (positive: SFT lost image-only ranking)."""
        return float(-self._delta("v2f").mean())

    @property
    def seeds_below(self) -> int:
        return int((self._delta("v2f") < 0).sum())

    @property
    def f2f_gain(self) -> float:
        return float(self._delta("f2f").mean())

    @property
    def p_v2f(self) -> float:
        return _ttest_p(self.sft["v2f"], self.vanilla["v2f"])

    @property
    def oracle_ok(self) -> bool | None:
        if self.image_oracle is None or self.chance is None:
            return None
        return self.image_oracle >= self.chance + MIN_IMAGE_ORACLE_MARGIN

    @property
    def holds(self) -> bool:
        return (len(self.seeds) > 0 and self.seeds_below == len(self.seeds) and self.v2f_drop >= MIN_V2F_DROP
                and self.f2f_gain >= MIN_F2F_GAIN and self.oracle_ok is not False)

    def reasons(self) -> list[str]:
        """What fails in the definition (empty when it holds)."""
        out = []
        n = len(self.seeds)
        if self.seeds_below < n or n == 0:
            out.append(f"SFT v2f below vanilla in {self.seeds_below}/{n} seeds, not all")
        if self.v2f_drop < MIN_V2F_DROP:
            out.append(f"mean v2f drop {self.v2f_drop:+.3f} < {MIN_V2F_DROP}")
        if self.f2f_gain < MIN_F2F_GAIN:
            out.append(f"f2f gain {self.f2f_gain:+.3f} < {MIN_F2F_GAIN}")
        if self.oracle_ok is False:
            out.append(f"image oracle {self.image_oracle:.3f} < chance {self.chance:.3f} + {MIN_IMAGE_ORACLE_MARGIN}")
        return out

    def summary(self) -> str:
        n = len(self.seeds)
        return (f"SFT v2f {self.metric} below vanilla in {self.seeds_below}/{n} seeds "
                f"(Δ {-self.v2f_drop:+.3f}, {_fmt_p(self.p_v2f)}); f2f {self.f2f_gain:+.3f}")


def view_frame(run_set: Mapping[int, str | Path], views=("f2f", "t2f", "v2f"), metric: str = "HR@10",
               split: str = "test") -> pd.DataFrame:
    """One metric per training seed (rows) and view (columns) of a run set ``{seed: run folder}``."""
    from .runsets import seed_metrics

    return pd.DataFrame({v: seed_metrics(dict(run_set), v, split)[metric] for v in views})


def collapse_check(vanilla: Mapping[int, str | Path], sft: Mapping[int, str | Path], metric: str = "HR@10",
                   image_oracle: float | None = None, chance: float | None = None, split: str = "test") -> CollapseCheck:
    """:class:`CollapseCheck` of run sets ``{seed: run folder}`` of the untrained model and of SFT."""
    return CollapseCheck(view_frame(vanilla, metric=metric, split=split), view_frame(sft, metric=metric, split=split),
                         metric, image_oracle, chance)


def compare_line(name: str, per_seed: pd.DataFrame, reference: pd.DataFrame, views=("f2f", "t2f", "v2f")) -> str:
    """``name`` (its ``per_seed`` metric by view) against ``reference`` per view: mean Δ, how many
    seeds went up, paired p."""
    parts = []
    for v in views:
        common = per_seed.index.intersection(reference.index)
        delta = per_seed.loc[common, v] - reference.loc[common, v]
        p = _fmt_p(_ttest_p(per_seed[v], reference[v]))
        parts.append(f"{v} {delta.mean():+.3f} (up in {int((delta > 0).sum())}/{len(common)}, {p})")
    return f"{name}: " + ", ".join(parts)


def verdict(check: CollapseCheck, method: pd.DataFrame | None = None, name: str = "VLM2Rec") -> str:
    """The line the demo's index opens with: the collapse (or its absence), then ``method`` against SFT."""
    head = ("collapse: " if check.holds else "no collapse by the definition: ") + check.summary()
    rest = [r for r in check.reasons() if not r.startswith("SFT v2f below vanilla")]  # the summary says it
    if rest:
        head += " — " + "; ".join(rest)
    if method is not None:
        head += "; " + compare_line(f"{name} against SFT", method, check.sft)
    return head


def find_latents(dataset_dir: str | Path) -> Path | None:
    """The synthetic latents (``oracle/latents.json``) of a prepared dataset, from its manifest's
    source files' folder, or None for real data."""
    import json

    manifest = Path(dataset_dir) / "manifest.json"
    if not manifest.exists():
        return None
    for src in json.loads(manifest.read_text()).get("sources", []):
        p = Path(src["path"]).parent / "oracle" / "latents.json"
        if p.exists():
            return p
    return None


def oracle_table(dataset, seeds=(0,), latents: str | Path | None = None) -> pd.DataFrame | None:
    """Task 1 metrics of each oracle (text, image, both, latent) and of chance on a synthetic
    dataset, mean over the negative sets of ``seeds`` (None: every prepared seed); None where the
    dataset has no latents."""
    from .data.synthetic import OracleScorer
    from .evaluate import chance_metrics, evaluate

    latents = latents or find_latents(dataset.path)
    if latents is None:
        return None
    rows = {f"oracle-{m}": evaluate(dataset, OracleScorer(latents, dataset.items["item_id"], m), seeds=seeds,
                                    progress=False).sampled.mean() for m in OracleScorer.MODALITIES}
    rows["chance"] = pd.Series(chance_metrics(dataset.manifest["config"]["num_negatives"]))
    return pd.DataFrame(rows).T


def oracle_report(raw_dir: str | Path) -> pd.DataFrame | None:
    """:func:`oracle_table` of a synthetic domain's raw folder, through the default preparation,
    over every prepared seed."""
    import tempfile

    from .config import PrepareConfig
    from .data.dataset import prepare, save

    raw_dir = Path(raw_dir)
    cfg = PrepareConfig(format="amazon2018", inputs=[str(p) for p in sorted(raw_dir.glob("*.json.gz"))],
                        images=str(raw_dir / "images"))
    ds = prepare(cfg, None, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        save(ds, Path(tmp) / "ds")
        return oracle_table(ds, seeds=None, latents=raw_dir)


def mean_std_cell(values: pd.Series) -> str:
    """``0.123 ± 0.004 (seeds 0, 1, 2: 0.120, 0.121, 0.128)``: the headline format, per-seed values shown."""
    per = ", ".join(f"{v:.3f}" for v in values)
    seeds = ", ".join(str(s) for s in values.index)
    spread = f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""
    return f"{values.mean():.3f}{spread} (seeds {seeds}: {per})"


KNOBS = ("text_signal", "image_signal", "shared", "shortcut", "stay", "noise", "categories", "styles", "users", "items")


def domain_headlines(latents: str | Path | None, oracles: pd.DataFrame | None, metric: str = "HR@10") -> dict:
    """Headline records of a synthetic domain: its knobs, each oracle's and chance's ``metric``."""
    if latents is None or oracles is None:
        return {}
    from .data.synthetic import load_latents

    cfg = load_latents(latents)["config"]
    out = {"headline:domain knobs": ", ".join(f"{k} {cfg[k]}" for k in KNOBS if k in cfg)}
    out.update({f"headline:{name} {metric}": float(oracles.loc[name, metric]) for name in oracles.index})
    return out


def state_headlines(frames: Mapping[str, pd.DataFrame], metric: str = "HR@10") -> dict:
    """Headline records ``{state} {view} {metric}`` -> "mean ± std (seeds …: per-seed values)"."""
    return {f"headline:{state} {view} {metric}": mean_std_cell(df[view]) for state, df in frames.items() for view in df}
