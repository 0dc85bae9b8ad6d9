"""Writes notebooks/*.ipynb from one template (title, typed parameters cell, set-up, steps, record).

Run `python tools/make_notebooks.py` after changing a notebook here; cell ids are stable, so an
unchanged notebook gives no diff. The notebooks stay thin: logic belongs in vlm2rec_lab.
"""
import nbformat as nbf
from pathlib import Path

PARAMS = '''DATA_DIR: str = "demo_out/data"  # prepared dataset folder (absolute, or relative to the repository root)
OUT_DIR: str = "notebook_out/{name}"  # this notebook's figures and tables
RUNS_DIR: str = "notebook_out/runs"  # run folders, shared by the notebooks
BACKBONE: str = "tiny"  # "tiny", a Hugging Face id, or a local path
SEED: int = 0  # training seed
QUICK: bool = False  # a few training steps on a few users (smoke runs)'''

SETUP = '''from vlm2rec_lab.data.dataset import Dataset
from vlm2rec_lab.notebook import record, resolve, save_figure, save_table, train_config

ds = Dataset.load(resolve(DATA_DIR))
out, runs_dir = resolve(OUT_DIR), resolve(RUNS_DIR)
ds.stats_table()'''

def nb(name, title, intro, steps, extra_params=""):
    cells = [nbf.v4.new_markdown_cell(f"# {title}\n\n{intro}")]
    p = nbf.v4.new_code_cell(PARAMS.format(name=name) + (("\n" + extra_params) if extra_params else ""))
    p.metadata["tags"] = ["parameters"]
    cells += [nbf.v4.new_markdown_cell("## Parameters"), p, nbf.v4.new_markdown_cell("## Set-up"), nbf.v4.new_code_cell(SETUP)]
    for kind, src in steps:
        cells.append(nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src))
    for k, c in enumerate(cells):
        c["id"] = f"{name[:2]}-{k:02d}"  # stable ids: regenerating gives no diff
    n = nbf.v4.new_notebook(cells=cells)
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    n.metadata["language_info"] = {"name": "python"}
    nbf.write(n, Path(__file__).resolve().parents[1] / "notebooks" / f"{name}.ipynb")

nb("00_template", "Template", "Every notebook starts from this one: title, a `parameters` cell of typed UPPER_CASE scalars, set-up, steps, and a last cell that records its key numbers.",
   [("md", "## Steps"), ("code", "stats = ds.stats()\nstats"),
    ("md", "## Record"), ("code", "record(**{k: stats[k] for k in ('users', 'items', 'interactions')})")])

nb("01_data_overview", "Data overview", "Statistics in the format of the paper's Table 3, sequence lengths, item popularity and a grid of sample items.",
   [("md", "## Statistics (Table 3)"), ("code", "table = ds.stats_table()\nsave_table(table, out, 'stats')\ntable"),
    ("md", "## Sequence lengths and popularity"),
    ("code", "from vlm2rec_lab import viz\n\nfig = viz.length_histogram(ds)\nsave_figure(fig, out, 'lengths')"),
    ("code", "fig = viz.popularity_curve(ds)\nsave_figure(fig, out, 'popularity')"),
    ("md", "## Sample items"), ("code", "fig = viz.sample_grid(ds, n=12, seed=SEED)\nsave_figure(fig, out, 'samples')"),
    ("md", "## Record"), ("code", "record(**ds.stats())")])

RUN3 = '''from vlm2rec_lab.runs import ensure_run

STATES = {"Vanilla": "vlm-vanilla", "SFT": "vlm-sft", "VLM2Rec": "vlm2rec"}
runs = {state: runs_dir / f"{method}-seed{SEED}" for state, method in STATES.items()}
results = {state: ensure_run(ds, train_config(method, BACKBONE, SEED, QUICK), runs[state]) for state, method in STATES.items()}'''

nb("02_modality_collapse", "Modality collapse: Vanilla vs SFT vs VLM2Rec",
   "The paper's §3 analysis: the modality-dropout test (Fig. 1a), gradient alignment per modality over training (Fig. 1b) and the geometry of each modality's embeddings (Table 1).",
   [("md", "## Runs"), ("code", RUN3),
    ("md", "## Modality dropout (Fig. 1a)\nf2f: fused history; t2f: text-only history; v2f: image-only history; items fused."),
    ("code", "from vlm2rec_lab import diagnostics, viz\nfrom vlm2rec_lab.evaluate import chance_metrics\n\ndropout = diagnostics.modality_dropout_table(runs)\nsave_table(dropout, out, 'modality_dropout')\nfig = viz.modality_dropout_bars(dropout, chance=chance_metrics(100)['HR@10'])\nsave_figure(fig, out, 'fig1a_modality_dropout')\ndropout"),
    ("md", "## Gradient alignment (Fig. 1b)"),
    ("code", "curves = {s: diagnostics.gradient_cosines(runs[s]) for s in ('SFT', 'VLM2Rec')}\nfig = viz.gradient_cosine_curves(curves)\nsave_figure(fig, out, 'fig1b_gradient_cosines')"),
    ("md", "## Geometry (Table 1)"),
    ("code", "geometry = diagnostics.geometry_table(runs, ds)\nsave_table(geometry, out, 'table1_geometry')\ngeometry.round(4)"),
    ("md", "## Record"),
    ("code", "record(**{f'{s}_{v}_HR@10': dropout.loc[(s, v), 'HR@10'] for s, v in dropout.index},\n       **{f'{s}_{m}_S': geometry.loc[(s, m), 'S'] for s, m in geometry.index})")])

nb("03_training", "Training dynamics", "Loss terms, α, β, the mean penalty weight w, the margins per modality and the share of users whose weak modality is the image, over training steps.",
   [("md", "## Runs"), ("code", RUN3.replace('"Vanilla": "vlm-vanilla", ', "")),
    ("md", "## Curves"),
    ("code", "import pandas as pd\nfrom vlm2rec_lab import diagnostics, viz\n\nlogs = {s: pd.read_csv(runs[s] / 'logs' / 'train_log.csv') for s in runs}\nfor s, log in logs.items():\n    save_figure(viz.training_curves(log), out, f'training_{s}')"),
    ("md", "## Weak modality per user"),
    ("code", "weak = diagnostics.weak_modality(runs['VLM2Rec'], ds)\nfor part in ('over_training', 'by_length', 'by_category', 'final_image_weak_share'):\n    save_table(weak[part], out, f'weak_{part}')\ndisplay(weak['final_image_weak_share'], weak['by_length'])\nweak['by_category']"),
    ("md", "## Record"),
    ("code", "last = logs['VLM2Rec'].iloc[-1]\nrecord(alpha=last['alpha'], beta=last['beta'], w_mean=last['w_mean'], image_weak_share=last['image_weak_share'],\n       final_image_weak_share=float(weak['final_image_weak_share']['share'].iloc[0]),\n       sft_final_loss=logs['SFT'].iloc[-1]['loss'], vlm2rec_final_loss=last['loss'])")])

nb("04_task1", "Task 1: direct ranking", "A Table 2-style comparison: reference scorers and the VLM methods under the sampled protocol (100 negatives, seeds 0–4), with a paired t-test against the best baseline.",
   [("md", "## Methods"),
    ("code", 'from vlm2rec_lab.evaluate import best_method, evaluate, results_table\nfrom vlm2rec_lab.runs import ensure_run, per_seed_frame\nfrom vlm2rec_lab.scorers import SCORERS, make_scorer\n\nMETHODS = ["vlm-vanilla", "vlm-sft", "vlm2rec"] + ([] if QUICK else ["vlm-vanilla-internal", "vlm-sft-internal", "llm-sft", "item-mean"])\nper_seed = {name: evaluate(ds, make_scorer(name, ds), name=name, progress=False).sampled for name in SCORERS}\nfor m in METHODS:\n    res = ensure_run(ds, train_config(m, BACKBONE, SEED, QUICK), runs_dir / f"{m}-seed{SEED}")\n    per_seed[m] = per_seed_frame(res)'),
    ("md", "## Table"),
    ("code", 'from IPython.display import Markdown\n\nbaseline = best_method(per_seed, exclude=["vlm2rec"])\ntable = results_table(per_seed, baseline=baseline)\nsave_table(table.to_frame(), out, "task1")\n(out / "task1.tex").write_text(table.to_latex())\nMarkdown(table.to_markdown())'),
    ("md", "## Record"),
    ("code", 'record(baseline=baseline, **{f"{m}_NDCG@10": table.means.loc[m, "NDCG@10"] for m in table.means.index})')])

nb("06_ablation_sensitivity", "Ablations, sensitivity and few-shot", "Table 5 (ablations of VLM2Rec), Fig. 5 (sensitivity to τ_WPCL, τ_CRTR and λ over the paper's grids) and Table 7 (few-shot: K training users).",
   [("md", "## Ablations (Table 5)"),
    ("code", 'import pandas as pd\nfrom vlm2rec_lab import diagnostics, viz\nfrom vlm2rec_lab.runs import ensure_run\n\nABLATIONS = ["vlm2rec", "vlm2rec-no-stopgrad", "vlm2rec-no-penalty", "vlm2rec-no-crtr", "vlm2rec-crtr-only", "vlm-sft"]\nrows = {}\nfor m in ABLATIONS[:2] if QUICK else ABLATIONS:\n    res = ensure_run(ds, train_config(m, BACKBONE, SEED, QUICK), runs_dir / f"{m}-seed{SEED}")\n    rows[m] = {v: r["sampled"]["mean"]["NDCG@10"] for v, r in res["views"].items()}\nablation = pd.DataFrame(rows).T\nsave_table(ablation, out, "table5_ablation")\nablation.round(4)'),
    ("md", "## Sensitivity (Fig. 5) and few-shot (Table 7)"),
    ("code", 'grid = {"lam": [0.1, 1.0]} if QUICK else diagnostics.PAPER_GRID\nsens = diagnostics.sweep(ds, train_config("vlm2rec", BACKBONE, SEED, QUICK), runs_dir / f"sweep-seed{SEED}", grid)\nsave_table(sens, out, "fig5_sensitivity")\nsave_figure(viz.sweep_plot(sens), out, "fig5_sensitivity")'),
    ("code", 'ks = [16, 32] if QUICK else [50, 100, 200, 500]\nfew = diagnostics.sweep(ds, train_config("vlm2rec", BACKBONE, SEED, QUICK), runs_dir / f"fewshot-seed{SEED}", {"users_k": ks})\nsave_table(few, out, "table7_few_shot")\nfew[few["view"] == "f2f"].round(4)'),
    ("md", "## Record"),
    ("code", 'record(**{f"{m}_f2f_NDCG@10": ablation.loc[m, "f2f"] for m in ablation.index},\n       **{f"fewshot_{int(k)}_NDCG@10": v for k, v in few[few["view"] == "f2f"].set_index("value")["NDCG@10"].items()})')])

nb("07_embedding_explorer", "Embedding explorer", "A UMAP map of item embeddings per run and modality, coloured by category, popularity, weak modality or split; select an item to see its title, image and nearest neighbours in the other modality's space.",
   [("md", "## Runs"), ("code", RUN3),
    ("md", "## Explorer"),
    ("code", "from vlm2rec_lab.viz import embedding_explorer\n\nexplorer = embedding_explorer(runs, ds, sample_size=min(300, ds.n_items), reducer='pca' if QUICK else 'umap')\nexplorer"),
    ("md", "## Record"),
    ("code", "ex = explorer.explorer\nrecord(points=len(ex.points), selected=str(ex.selection['item_id']), neighbours=len(ex.selection['neighbours']['T']))")],
   extra_params="")

nb("05_task2", "Task 2: downstream initialisation", "A Table 4-style comparison: SASRec or GRU4Rec with a learnable ID table against item tables initialised from frozen VLM item embeddings (a trainable Linear over them), same split, negatives and metrics; and cold-start buckets by the target item's training frequency (Fig. 3).",
   [("md", "## Embedders whose item embeddings initialise the model"),
    ("code", 'from vlm2rec_lab.runs import ensure_run\n\nINITS = {"Vanilla": "vlm-vanilla", "SFT": "vlm-sft", "VLM2Rec": "vlm2rec"}\nruns = {k: runs_dir / f"{m}-seed{SEED}" for k, m in INITS.items()}\nfor k, m in INITS.items():\n    ensure_run(ds, train_config(m, BACKBONE, SEED, QUICK), runs[k])'),
    ("md", "## Train the downstream model per seed"),
    ("code", 'from vlm2rec_lab import downstream\n\ncfg = downstream.DownstreamConfig(model=MODEL, epochs=2 if QUICK else 200)\nseeds = [SEED] if QUICK else [0, 1, 2, 3, 4]\nresults = {"ID": downstream.run(ds, cfg, seeds)}\nfor k, run in runs.items():\n    results[f"{k} init"] = downstream.run(ds, cfg, seeds, downstream.load_item_embeddings(ds, run, modality="F"))'),
    ("md", "## Table 4 and cold start (Fig. 3)"),
    ("code", 'import pandas as pd\nfrom IPython.display import Markdown\nfrom vlm2rec_lab.evaluate import results_table\n\ntable = results_table({k: r.test.sampled for k, r in results.items()}, baseline="ID" if len(seeds) > 1 else None)\nsave_table(table.to_frame(), out, "table4_task2")\ncold = pd.concat({k: r.cold_start for k, r in results.items()}, names=["init"])\nsave_table(cold, out, "fig3_cold_start")\nMarkdown(table.to_markdown())'),
    ("md", "## Record"),
    ("code", 'record(model=MODEL, **{f"{k}_NDCG@10": table.means.loc[k, "NDCG@10"] for k in table.means.index},\n       **{f"{k}_full_HR@10": r.test.full["HR@10"].mean() for k, r in results.items()})')],
   extra_params='MODEL: str = "sasrec"  # sasrec or gru4rec')
