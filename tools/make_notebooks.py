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
SEEDS: str = "0-4"  # training seeds: one run per method and seed, run s ranked against negative set s
QUICK: bool = False  # a few training steps on a few users (smoke runs)
DEMO: bool = False  # the demo profile: the main methods fully trained; extra methods and grids left to the full mode'''

SETUP = '''from vlm2rec_lab.config import parse_seeds
from vlm2rec_lab.data.dataset import Dataset
from vlm2rec_lab.notebook import record, resolve, save_figure, save_table, train_config

ds = Dataset.load(resolve(DATA_DIR))
out, runs_dir = resolve(OUT_DIR), resolve(RUNS_DIR)
seeds = parse_seeds(SEEDS)
ds.stats_table()'''

def nb(name, title, intro, steps, extra_params="", needs=("ids",)):
    """``needs``: the modalities the notebook cannot run without (the batch skips it, saying why,
    on a dataset that lacks one); a notebook that needs ids only filters its methods by ``ds.kind``."""
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
    n.metadata["vlm2rec"] = {"needs": list(needs)}
    nbf.write(n, Path(__file__).resolve().parents[1] / "notebooks" / f"{name}.ipynb")

nb("00_template", "Template", "Every notebook starts from this one: title, a `parameters` cell of typed UPPER_CASE scalars, set-up, steps, and a last cell that records its key numbers.",
   [("md", "## Steps"), ("code", "stats = ds.stats()\nstats"),
    ("md", "## Record"), ("code", "record(**{k: stats[k] for k in ('users', 'items', 'interactions')})")])

nb("01_data_overview", "Data overview", "Statistics in the format of the paper's Table 3, sequence lengths, item popularity and a grid of sample items.",
   [("md", "## Statistics (Table 3)"), ("code", "table = ds.stats_table()\nsave_table(table, out, 'stats')\ntable"),
    ("md", "## Sequence lengths and popularity"),
    ("code", "from vlm2rec_lab import viz\n\nfig = viz.length_histogram(ds)\nsave_figure(fig, out, 'lengths')"),
    ("code", "fig = viz.popularity_curve(ds)\nsave_figure(fig, out, 'popularity')"),
    ("md", "## Sample items"), ("code", "fig = viz.sample_grid(ds, n=12, seed=seeds[0])\nsave_figure(fig, out, 'samples')"),
    ("md", "## The domain's knobs, its oracles and chance (synthetic data only)\nThe oracles rank by the known latents each modality shows: what a perfect embedder of that modality alone could reach."),
    ("code", "from vlm2rec_lab.collapse import domain_headlines, find_latents, oracle_table\n\noracles = oracle_table(ds, seeds)\nif oracles is not None:\n    save_table(oracles, out, 'oracles')\n    display(oracles.round(4))"),
    ("md", "## Record"), ("code", "record(**ds.stats(), **domain_headlines(find_latents(ds.path), oracles))")])

RUN3 = '''from vlm2rec_lab.runs import ensure_runs

STATES = {"Vanilla": "vlm-vanilla", "SFT": "vlm-sft", "VLM2Rec": "vlm2rec"}
# one run per (method, training seed), shared by every notebook: runs[state][seed]
runs = {state: ensure_runs(ds, train_config(method, BACKBONE, quick=QUICK), runs_dir / method, seeds)
        for state, method in STATES.items()}'''

nb("02_modality_collapse", "Modality collapse: Vanilla vs SFT vs VLM2Rec",
   "The paper's §3 analysis: the modality-dropout test (Fig. 1a), gradient alignment per modality over training (Fig. 1b) and the geometry of each modality's embeddings (Table 1), each as mean ± std over training seeds.",
   [("md", "## Runs"), ("code", RUN3),
    ("md", "## Modality dropout (Fig. 1a)\nf2f: fused history; t2f: text-only history; v2f: image-only history; items fused."),
    ("code", "import pandas as pd\nfrom vlm2rec_lab import diagnostics, viz\nfrom vlm2rec_lab.evaluate import chance_metrics\n\ndropout = diagnostics.modality_dropout_table(runs)\nsave_table(dropout, out, 'modality_dropout')\nfig = viz.modality_dropout_bars(dropout, chance=chance_metrics(100)['HR@10'])\nsave_figure(fig, out, 'fig1a_modality_dropout')\ndropout"),
    ("md", "## Gradient alignment (Fig. 1b)"),
    ("code", "curves = {s: {seed: diagnostics.gradient_cosines(r) for seed, r in runs[s].items()} for s in ('SFT', 'VLM2Rec')}\nfig = viz.gradient_cosine_curves(curves)\nsave_figure(fig, out, 'fig1b_gradient_cosines')"),
    ("md", "## Geometry (Table 1)"),
    ("code", "geometry = diagnostics.geometry_table(runs, ds)\nsave_table(geometry, out, 'table1_geometry')\ngeometry.round(4)"),
    ("md", "## Verdict\nCollapse, operationally (`vlm2rec_lab.collapse`): SFT's v2f HR@10 below the untrained model's in every training seed and by ≥ 0.02 on average, SFT's f2f ≥ the untrained model's + 0.1, the image oracle ≥ chance + 0.1. With few seeds a paired t-test needs large gaps (with 3, t > 4.3 at df 2): read the per-seed values."),
    ("code", "from vlm2rec_lab.collapse import collapse_check, oracle_table, state_headlines, verdict, view_frame\n\noracles = oracle_table(ds, seeds)\nchance = chance_metrics(ds.manifest['config']['num_negatives'])['HR@10']\ncheck = collapse_check(runs['Vanilla'], runs['SFT'], chance=chance,\n                       image_oracle=None if oracles is None else oracles.loc['oracle-image', 'HR@10'])\nframes = {s: view_frame(r) for s, r in runs.items()}\nline = verdict(check, frames['VLM2Rec'])\nprint(line)\npd.concat(frames, names=['state', 'seed']).round(4)"),
    ("md", "## Record"),
    ("code", "record(verdict=line, **state_headlines(frames), seeds=len(seeds), **{f'{s}_{v}_HR@10': dropout.loc[(s, v), 'HR@10'] for s, v in dropout.index},\n       **{f'{s}_{v}_HR@10_std': dropout.loc[(s, v), 'HR@10_std'] for s, v in dropout.index},\n       **{f'{s}_{m}_S': geometry.loc[(s, m), 'S'] for s, m in geometry.index})")],
   needs=("ids", "titles", "images"))

nb("03_training", "Training dynamics", "Loss terms, α, β, the mean penalty weight w, the margins per modality and the share of users whose weak modality is the image, over training steps.",
   [("md", "## Runs"), ("code", RUN3.replace('"Vanilla": "vlm-vanilla", ', "")),
    ("md", "## Curves"),
    ("md", "Curves of the first training seed's runs; the last step's values over every seed below."),
    ("code", "import pandas as pd\nfrom vlm2rec_lab import diagnostics, viz\n\nfirst = seeds[0]\nlogs = {s: {seed: pd.read_csv(r / 'logs' / 'train_log.csv') for seed, r in runs[s].items()} for s in runs}\nfor s in logs:\n    save_figure(viz.training_curves(logs[s][first]), out, f'training_{s}_seed{first}')\nlast = {s: pd.DataFrame({seed: log.iloc[-1] for seed, log in logs[s].items()}).T for s in logs}\nsave_table(last['VLM2Rec'], out, 'last_step_per_seed')\nlast['VLM2Rec'][['loss', 'alpha', 'beta', 'w_mean', 'margin_t_mean', 'margin_v_mean', 'image_weak_share']]"),
    ("md", "## Weak modality per user"),
    ("code", "weak_all = {seed: diagnostics.weak_modality(r, ds) for seed, r in runs['VLM2Rec'].items()}\nshares = pd.Series({seed: float(w['final_image_weak_share']['share'].iloc[0]) for seed, w in weak_all.items()}, name='final image-weak share')\nweak = weak_all[first]\nfor part in ('over_training', 'by_length', 'by_category'):\n    save_table(weak[part], out, f'weak_{part}_seed{first}')\nsave_table(shares.to_frame(), out, 'final_image_weak_share_per_seed')\ndisplay(shares.to_frame(), weak['by_length'])\nweak['by_category']"),
    ("md", "## Record"),
    ("code", "from vlm2rec_lab.collapse import mean_std_cell\n\nmean = last['VLM2Rec'].mean()\nrecord(**{f'headline:{s} image-weak share of users, last step': mean_std_cell(last[s]['image_weak_share']) for s in last},\n       seeds=len(seeds), alpha=mean['alpha'], beta=mean['beta'], w_mean=mean['w_mean'], image_weak_share=mean['image_weak_share'],\n       final_image_weak_share=float(shares.mean()), sft_final_loss=last['SFT']['loss'].mean(), vlm2rec_final_loss=mean['loss'])")],
   needs=("ids", "titles", "images"))

nb("04_task1", "Task 1: direct ranking", "A Table 2-style comparison: reference scorers and the VLM methods under the sampled protocol (100 negatives), mean ± std over training seeds (run s ranked against negative set s), with a paired t-test by seed against the best baseline.",
   [("md", "## Methods"),
    ("code", 'from vlm2rec_lab.evaluate import best_method, evaluate, results_table\nfrom vlm2rec_lab.runs import ensure_runs, seed_metrics\nfrom vlm2rec_lab.scorers import SCORERS, make_scorer\n\n# the methods a dataset allows: VLM methods need titles and images; text-only data gets the text methods\nMETHODS = {"multimodal": ["vlm-vanilla", "vlm-sft", "vlm2rec"] + ([] if QUICK or DEMO else ["vlm-vanilla-internal", "vlm-sft-internal", "llm-sft", "item-mean"]),\n           "text-only": ["llm-vanilla", "llm-sft"]}.get(ds.kind, [])\nprint(ds.kind, "dataset: reference scorers and", METHODS or "no embedder")\nper_seed = {name: evaluate(ds, make_scorer(name, ds), seeds=seeds, name=name, progress=False).sampled for name in SCORERS}\nfor m in METHODS:\n    per_seed[m] = seed_metrics(ensure_runs(ds, train_config(m, BACKBONE, quick=QUICK), runs_dir / m, seeds))'),
    ("md", "## Table"),
    ("code", 'from IPython.display import Markdown\n\nbaseline = best_method(per_seed, exclude=["vlm2rec"])\ntable = results_table(per_seed, baseline=baseline if len(seeds) > 1 else None)\nvs_sft = results_table(per_seed, baseline="vlm-sft" if len(seeds) > 1 and "vlm-sft" in per_seed else None)\nsave_table(table.to_frame(), out, "task1")\nsave_table(vs_sft.to_frame(), out, "task1_vs_sft")\n(out / "task1.tex").write_text(table.to_latex())\nMarkdown(table.to_markdown())'),
    ("md", "## Record"),
    ("code", 'record(baseline=baseline, seeds=len(seeds), **{f"{m}_{k}": table.means.loc[m, k] for m in table.means.index for k in ("HR@10", "NDCG@10")},\n       **{f"{m}_NDCG@10_p": table.pvalues.loc[m, "NDCG@10"] for m in table.means.index if m != baseline and len(seeds) > 1},\n       **{f"{m}_NDCG@10_p_vs_sft": vs_sft.pvalues.loc[m, "NDCG@10"] for m in vs_sft.means.index if m != "vlm-sft" and vs_sft.baseline})')])

nb("06_ablation_sensitivity", "Ablations, sensitivity and few-shot", "Table 5 (ablations of VLM2Rec, mean ± std over training seeds, paired t-tests against SFT), Fig. 5 (sensitivity to τ_WPCL, τ_CRTR and λ over the paper's grids) and Table 7 (few-shot: K training users); the sensitivity and few-shot runs use the first training seed only.",
   [("md", "## Ablations (Table 5)"),
    ("code", 'import pandas as pd\nfrom vlm2rec_lab import diagnostics, viz\nfrom vlm2rec_lab.evaluate import results_table\nfrom vlm2rec_lab.runs import ensure_runs, seed_metrics\n\n# the paper\'s Table 5 rows: full, w/o L_WPCL (CRTR alone), w/o stop-gradient, w/o w_pen, w/o L_CRTR; and SFT\nABLATIONS = ["vlm2rec", "vlm2rec-crtr-only", "vlm2rec-no-stopgrad", "vlm2rec-no-penalty", "vlm2rec-no-crtr", "vlm-sft"]\n# the demo profile leaves this notebook to the full mode: smoke runs, in their own folder\nsmoke = QUICK or DEMO\nhere = runs_dir / "smoke" if DEMO else runs_dir\nchosen = ["vlm2rec", "vlm2rec-crtr-only", "vlm-sft"] if smoke else ABLATIONS\nsets = {m: ensure_runs(ds, train_config(m, BACKBONE, quick=smoke), here / m, seeds) for m in chosen}\ntables = {view: results_table({m: seed_metrics(sets[m], view) for m in chosen}, baseline="vlm-sft" if len(seeds) > 1 else None,\n                              metrics=("HR@10", "NDCG@10")) for view in ("f2f", "t2f", "v2f")}\nablation = pd.concat({view: t.to_frame() for view, t in tables.items()}, axis=1)\nsave_table(ablation, out, "table5_ablation")\nsave_table(pd.concat({view: t.summary() for view, t in tables.items()}, names=["view"]), out, "table5_ablation_summary")\nablation'),
    ("md", "## Sensitivity (Fig. 5) and few-shot (Table 7)"),
    ("code", 'grid = {"lam": [0.1, 1.0]} if smoke else diagnostics.PAPER_GRID\nsens = diagnostics.sweep(ds, train_config("vlm2rec", BACKBONE, seeds[0], smoke), here / f"sweep-seed{seeds[0]}", grid)\nsave_table(sens, out, "fig5_sensitivity")\nsave_figure(viz.sweep_plot(sens), out, "fig5_sensitivity")'),
    ("code", 'ks = [16, 32] if smoke else [50, 100, 200, 500]\nfew = diagnostics.sweep(ds, train_config("vlm2rec", BACKBONE, seeds[0], smoke), here / f"fewshot-seed{seeds[0]}", {"users_k": ks})\nsave_table(few, out, "table7_few_shot")\nfew[few["view"] == "f2f"].round(4)'),
    ("md", "## Record"),
    ("code", 'record(seeds=len(seeds), **{f"{m}_{v}_NDCG@10": t.means.loc[m, "NDCG@10"] for v, t in tables.items() for m in t.means.index},\n       **{f"fewshot_{int(k)}_NDCG@10": v for k, v in few[few["view"] == "f2f"].set_index("value")["NDCG@10"].items()})')],
   needs=("ids", "titles", "images"))

nb("07_embedding_explorer", "Embedding explorer", "A UMAP map of item embeddings per run and modality, coloured by category, popularity, weak modality or split; select an item to see its title, image and nearest neighbours in the other modality's space.",
   [("md", "## Runs"), ("code", RUN3),
    ("md", "## Explorer"),
    ("code", "from vlm2rec_lab.viz import embedding_explorer\n\nexplorer = embedding_explorer({state: r[seeds[0]] for state, r in runs.items()}, ds, sample_size=min(300, ds.n_items), reducer='pca' if QUICK else 'umap')\nexplorer"),
    ("md", "## Record"),
    ("code", "ex = explorer.explorer\nrecord(points=len(ex.points), selected=str(ex.selection['item_id']), neighbours=len(ex.selection['neighbours']['T']))")],
   extra_params="",
   needs=("ids", "titles", "images"))

nb("05_task2", "Task 2: downstream initialisation", "A Table 4-style comparison: SASRec or GRU4Rec with a learnable ID table against item tables initialised from frozen VLM item embeddings (a trainable Linear over them), same split, negatives and metrics; and cold-start buckets by the target item's training frequency (Fig. 3).",
   [("md", "## Embedders whose item embeddings initialise the model"),
    ("code", 'from vlm2rec_lab.runs import ensure_runs\n\n# the embedders a dataset allows: the VLM states on multimodal data, the text embedder on text-only data, none on ids\nINITS = {"multimodal": {"Vanilla": "vlm-vanilla", "SFT": "vlm-sft", "VLM2Rec": "vlm2rec"},\n         "text-only": {"LLM-SFT": "llm-sft"}}.get(ds.kind, {})\n# the embedder\'s run of training seed s initialises the downstream model of seed s\nruns = {k: ensure_runs(ds, train_config(m, BACKBONE, quick=QUICK), runs_dir / m, seeds) for k, m in INITS.items()}'),
    ("md", "## Train the downstream model per seed"),
    ("code", 'from vlm2rec_lab import downstream\n\ncfg = downstream.DownstreamConfig(model=MODEL, epochs=2 if QUICK else 20 if DEMO else 200)\nresults = {"ID": downstream.run(ds, cfg, seeds)}\nfor k, by_seed in runs.items():\n    tables = {s: downstream.load_item_embeddings(ds, r, modality="F") for s, r in by_seed.items()}\n    results[f"{k} init"] = downstream.run(ds, cfg, seeds, tables)'),
    ("md", "## Table 4 and cold start (Fig. 3)"),
    ("code", 'import pandas as pd\nfrom IPython.display import Markdown\nfrom vlm2rec_lab.evaluate import results_table\n\ntable = results_table({k: r.test.sampled for k, r in results.items()}, baseline="ID" if len(seeds) > 1 else None)\nsave_table(table.to_frame(), out, "table4_task2")\ncold = pd.concat({k: r.cold_start for k, r in results.items()}, names=["init"])\nsave_table(cold, out, "fig3_cold_start")\nMarkdown(table.to_markdown())'),
    ("md", "## Record"),
    ("code", 'record(model=MODEL, **{f"{k}_{m}": table.means.loc[k, m] for k in table.means.index for m in ("HR@10", "NDCG@10")},\n       **{f"{k}_full_HR@10": r.test.full["HR@10"].mean() for k, r in results.items()})')],
   extra_params='MODEL: str = "sasrec"  # sasrec or gru4rec')
