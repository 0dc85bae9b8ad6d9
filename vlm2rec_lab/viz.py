"""Figures of the paper's analysis, and the widget embedding explorer (built here, displayed by the
notebook). Every plotting function returns its matplotlib Figure."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from .diagnostics import last_weak_modality
from .methods import MODALITIES


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() == "agg" or not _in_notebook():
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None
    except ImportError:
        return False


# --------------------------------------------------------------------------- data overview


def length_histogram(dataset):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(dataset.lengths, bins=np.arange(dataset.lengths.min(), min(dataset.lengths.max(), 100) + 2) - 0.5)
    ax.set(xlabel="sequence length", ylabel="users", title="Sequence lengths")
    return fig


def popularity_curve(dataset):
    plt = _plt()
    counts = np.sort(np.bincount(dataset.seq, minlength=dataset.n_items))[::-1]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.loglog(np.arange(1, counts.size + 1), np.maximum(counts, 1))
    ax.set(xlabel="item rank", ylabel="interactions", title="Item popularity")
    return fig


def sample_grid(dataset, n: int = 12, seed: int = 0, cols: int = 6):
    """A grid of sample items: image (when there is one) and title."""
    from PIL import Image

    plt = _plt()
    idx = np.random.default_rng(seed).choice(dataset.n_items, size=min(n, dataset.n_items), replace=False)
    rows = int(np.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), idx):
        item = dataset.items.iloc[int(i)]
        img = item.get("image")
        if isinstance(img, str) and Path(img).exists():
            with Image.open(img) as im:
                ax.imshow(im.convert("RGB"))
        title = item["title"] if isinstance(item["title"], str) else item["item_id"]
        ax.set_title("\n".join([title[k:k + 22] for k in range(0, min(len(title), 66), 22)]), fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- collapse analysis


def modality_dropout_bars(table: pd.DataFrame, metric: str = "HR@10", chance: float | None = None):
    """Fig. 1a: grouped bars of f2f / t2f / v2f per state (from diagnostics.modality_dropout_table),
    the mean over training seeds with ±1 std error bars where the table has ``{metric}_std``."""
    import seaborn as sns

    plt = _plt()
    has_std = f"{metric}_std" in table
    # The table holds each bar's mean and std over seeds, not the seeds: seaborn is given the two ends
    # of the interval, mean - std and mean + std, whose mean is the bar and whose range the error bar.
    df = table.reset_index()
    std = df[f"{metric}_std"] if has_std else 0.0
    ends = pd.concat([df.assign(**{metric: df[metric] - std}), df.assign(**{metric: df[metric] + std})])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    sns.barplot(data=ends, x="state", y=metric, hue="view", order=list(dict.fromkeys(df["state"])),
                hue_order=list(dict.fromkeys(df["view"])), errorbar=("pi", 100) if has_std else None,
                capsize=0.15, err_kws={"linewidth": 1}, ax=ax)
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    seeds = f", mean ± std over {int(table['seeds'].max())} training seeds" if "seeds" in table else ""
    ax.set(ylabel=metric, xlabel="", title=f"Modality dropout ({metric}{seeds})")
    ax.legend(fontsize=8)
    return fig


def gradient_cosine_curves(curves: Mapping[str, "pd.DataFrame | Mapping[int, pd.DataFrame]"]):
    """Fig. 1b: cos(g_total, g_T) and cos(g_total, g_V) over training steps, one colour per state;
    a state given as {training seed: curve} draws the mean over seeds with a band of ±1 std."""
    import seaborn as sns

    plt = _plt()
    long = pd.concat([
        frame.melt(id_vars="step", value_vars=["cos_total_t", "cos_total_v"], var_name="modality", value_name="cosine")
        .assign(state=name, seed=seed)
        for name, runs in curves.items()
        for seed, frame in (runs.items() if isinstance(runs, Mapping) else [(0, runs)])
    ], ignore_index=True)
    long["modality"] = long["modality"].map({"cos_total_t": "text", "cos_total_v": "image"})
    fig, ax = plt.subplots(figsize=(6, 3.2))
    # errorbar="sd": the sample std (ddof=1) over seeds at each step; a single seed draws no band
    sns.lineplot(data=long, x="step", y="cosine", hue="state", style="modality", style_order=["text", "image"],
                 errorbar="sd", err_kws={"alpha": 0.15, "linewidth": 0}, ax=ax)
    ax.axhline(0, color="grey", lw=0.8)
    n = int(long.groupby("state")["seed"].nunique().max())
    ax.set(xlabel="step", ylabel="cosine with the total gradient",
           title="Gradient alignment per modality" + (f" (band: ±1 std over {n} seeds)" if n > 1 else ""))
    ax.legend(fontsize=7)
    return fig


def training_curves(log: pd.DataFrame):
    """Loss terms, α and β, mean w, margins per modality and the image-weak share over steps."""
    plt = _plt()
    panels = [
        ("loss terms", [c for c in ("info_nce", "wpcl", "crtr", "loss") if c in log]),
        ("alpha, beta", [c for c in ("alpha", "beta") if c in log]),
        ("mean w", [c for c in ("w_mean",) if c in log]),
        ("margins", [c for c in ("margin_t_mean", "margin_v_mean") if c in log]),
        ("image-weak share", [c for c in ("image_weak_share",) if c in log]),
    ]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, (title, cols) in zip(axes[0], panels):
        for c in cols:
            ax.plot(log["step"], log[c].rolling(5, min_periods=1).mean(), label=c)
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sweep_plot(df: pd.DataFrame, metric: str = "NDCG@10", view: str = "f2f"):
    """Fig. 5 / Table 7: a metric against each swept parameter's values (from runsets.sweep)."""
    plt = _plt()
    params = list(dict.fromkeys(df["param"]))
    fig, axes = plt.subplots(1, len(params), figsize=(3.2 * len(params), 2.8), squeeze=False)
    for ax, p in zip(axes[0], params):
        d = df[(df["param"] == p) & (df["view"] == view)]
        ax.plot(range(len(d)), d[metric], marker="o")
        ax.set_xticks(range(len(d)), [str(v) for v in d["value"]])
        ax.set(title=p, ylabel=metric)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the explorer


def reduce_2d(x: np.ndarray, method: str = "umap", seed: int = 0) -> np.ndarray:
    """(n, d) -> (n, 2) by UMAP (cosine metric) or PCA."""
    x = np.asarray(x, dtype=np.float64)
    if method == "pca" or len(x) < 10:
        xc = x - x.mean(0)
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        return xc @ vt[:2].T
    import umap

    return umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_neighbors=min(15, len(x) - 1)).fit_transform(x)


class EmbeddingExplorer:
    """UMAP map of a run's item embeddings with ipywidgets controls (run, modality, colour, sample
    size) and a selection panel: the item's title, image and nearest neighbours in the other
    modality's space. ``points`` and ``selection`` hold what is shown (tests read them).

    The map is a PNG in an ``ipywidgets.Image`` (``plot_w``, DOM class ``explorer-map``) whose value
    is replaced, after the selection panel, on every change of a control or of the selected item
    (which it rings); its title, naming the controls, is also the PNG's ``Title`` metadata."""

    COLOURS = ("category", "popularity", "weak modality", "split")
    OTHER = {"T": ("V",), "V": ("T",), "F": ("T", "V")}

    def __init__(self, runs: Mapping[str, str | Path], dataset, sample_size: int = 400, reducer: str = "umap",
                 seed: int = 0, neighbours: int = 5):
        import ipywidgets as w

        if not runs:
            raise ValueError("no runs to explore")
        self.runs = {k: Path(v) for k, v in runs.items()}
        self.ds, self.reducer, self.seed, self.k = dataset, reducer, seed, neighbours
        self._maps: dict = {}
        self.points = pd.DataFrame()
        self.selection: dict = {}
        self.run_w = w.Dropdown(options=list(self.runs), description="run")
        self.modality_w = w.ToggleButtons(options=list(MODALITIES), description="modality")
        self.colour_w = w.Dropdown(options=list(self.COLOURS), description="colour by")
        self.sample_w = w.IntSlider(value=min(sample_size, dataset.n_items), min=min(20, dataset.n_items),
                                    max=dataset.n_items, step=10, description="sample")
        self.item_w = w.Dropdown(options=[], description="item")
        self.plot_w = w.Image(format="png")
        self.plot_w.add_class("explorer-map")
        self.title_w = w.HTML()
        self.image_w = w.Image(format="png", width=128, height=128)
        self.neigh_w = w.HTML()
        self._refreshing = False  # refresh() sets the item list, then selects once
        for ctrl in (self.run_w, self.modality_w, self.colour_w, self.sample_w):
            ctrl.observe(lambda _: self.refresh(), names="value")
        self.item_w.observe(lambda ch: None if self._refreshing else self.select(ch["new"]), names="value")
        self.widget = w.VBox([w.HBox([self.run_w, self.colour_w]), self.modality_w, self.sample_w,
                              w.HBox([self.plot_w, w.VBox([self.item_w, self.title_w, self.image_w, self.neigh_w])])])
        self.widget.explorer = self
        self.refresh()

    # ---------------------------------------------------------------- data
    def _emb(self, run: str, m: str) -> np.ndarray:
        from .runs import load_embeddings

        return load_embeddings(self.runs[run], f"item_{m}")

    def _colour_values(self, idx: np.ndarray) -> pd.Series:
        kind = self.colour_w.value
        if kind == "category":
            vals = self.ds.items["category"].to_numpy()[idx] if "category" in self.ds.items else np.full(len(idx), None)
            return pd.Series(vals).fillna("unknown").astype(str)
        if kind == "popularity":
            return pd.Series(np.log1p(self.ds.train_item_counts()[idx]))
        if kind == "split":
            test, valid = set(self.ds.targets("test").tolist()), set(self.ds.targets("valid").tolist())
            return pd.Series(["test target" if i in test else "valid target" if i in valid else "train only" for i in idx])
        # weak modality: the last recorded weak modality of users whose training target is the item
        weak_log = self.runs[self.run_w.value] / "logs" / "weak_modality.csv"
        if not weak_log.exists():
            return pd.Series(["n/a (not trained)"] * len(idx))
        last = last_weak_modality(pd.read_csv(weak_log), self.ds)
        share = pd.Series(last["weak"].eq("V").to_numpy(), index=last["last_item"].to_numpy()).groupby(level=0).mean()
        return pd.Series(["image weak" if share.get(i, np.nan) >= 0.5 else "text weak" if i in share.index else "no user"
                          for i in idx])

    def refresh(self) -> None:
        run, m, n = self.run_w.value, self.modality_w.value, self.sample_w.value
        key = (run, m, n)
        idx = np.sort(np.random.default_rng(self.seed).choice(self.ds.n_items, size=n, replace=False))
        if key not in self._maps:
            self._maps[key] = reduce_2d(self._emb(run, m)[idx], self.reducer, self.seed)
        xy = self._maps[key]
        self.points = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "item_idx": idx, "colour": self._colour_values(idx).to_numpy()})
        titles = self.ds.items["title"].fillna(self.ds.items["item_id"]).to_numpy()
        options = [(f"{str(titles[i])[:40]} ({self.ds.items['item_id'].iat[int(i)]})", int(i)) for i in idx]
        current = self.item_w.value
        self._refreshing = True
        try:
            self.item_w.options = options
            self.item_w.value = current if current in idx else int(idx[0])
        finally:
            self._refreshing = False
        self.select(self.item_w.value)

    def _draw(self) -> None:
        """Render the map (the selected item ringed) to PNG bytes in ``plot_w``."""
        import io

        from matplotlib.figure import Figure  # no pyplot: nothing for a notebook backend to show twice

        fig = Figure(figsize=(5.5, 4.5))
        ax = fig.subplots()
        c = self.points["colour"]
        if pd.api.types.is_numeric_dtype(c):
            sc = ax.scatter(self.points["x"], self.points["y"], c=c, s=8, cmap="viridis")
            fig.colorbar(sc, ax=ax, label=self.colour_w.value)
        else:
            for k, (name, grp) in enumerate(self.points.groupby("colour")):
                ax.scatter(grp["x"], grp["y"], s=8, color=f"C{k % 10}", label=str(name)[:20])
            ax.legend(fontsize=6, markerscale=2, loc="best")
        selected = self.points[self.points["item_idx"] == self.selection.get("item_idx")]
        ax.scatter(selected["x"], selected["y"], s=80, facecolors="none", edgecolors="black")
        title = f"{self.run_w.value} · {self.modality_w.value} · {len(self.points)} items · by {self.colour_w.value}"
        ax.set(title=title, xticks=[], yticks=[])
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Title": title})
        self.plot_w.value = buf.getvalue()

    def select(self, item_idx) -> None:
        """Show an item's title, image and nearest neighbours in the other modality's space."""
        import io

        from PIL import Image

        if item_idx is None:  # nothing selected: the map still follows the controls
            self._draw()
            return
        i = int(item_idx)
        item = self.ds.items.iloc[i]
        neigh = {}
        for other in self.OTHER[self.modality_w.value]:
            e = self._emb(self.run_w.value, other)
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            sims = e @ e[i]
            sims[i] = -np.inf
            top = np.argsort(-sims)[: self.k]
            neigh[other] = [(int(j), str(self.ds.items["title"].iat[int(j)]), float(sims[j])) for j in top]
        self.selection = {"item_idx": i, "item_id": item["item_id"], "title": item["title"], "neighbours": neigh}
        self.title_w.value = f"<b>{item['title']}</b><br><small>{item['item_id']} · {item.get('category')}</small>"
        img = item.get("image")
        if isinstance(img, str) and Path(img).exists():
            buf = io.BytesIO()
            with Image.open(img) as im:
                im.convert("RGB").resize((128, 128)).save(buf, format="PNG")
            self.image_w.value = buf.getvalue()
        rows = "".join(f"<li>[{m}] {t[:50]} <small>({s:.3f})</small></li>" for m, lst in neigh.items() for _, t, s in lst)
        self.neigh_w.value = f"<b>nearest in {'/'.join(neigh)} space</b><ol>{rows}</ol>"
        self._draw()


def embedding_explorer(runs: Mapping[str, str | Path], dataset, **kw):
    """The explorer's widget (``widget.explorer`` is the :class:`EmbeddingExplorer`)."""
    return EmbeddingExplorer(runs, dataset, **kw).widget
