"""The papermill batch: every selected notebook, per dataset, into RUNS/<dataset>/<notebook>.ipynb
with its figures and tables, and RUNS/index.html linking every output with the recorded numbers
side by side. A failing cell keeps its notebook, the batch goes on, the index shows the error.

The index shows every figure a notebook saved (``save_figure``'s PNG as a thumbnail linking its SVG)
and puts the answers first. Two record keys are read as headlines rather than as table rows:

- ``verdict`` (a string): a prominent line at the top of the page for its dataset, naming the
  notebook it came from, e.g. ``record(verdict="collapse: v2f HR@10 at chance, f2f not")``;
- ``headline:<label>`` (a string or a number): a row ``<label> | value | notebook`` in the compact
  headline table at the top of the page for its dataset, e.g.
  ``record(**{"headline:vlm-sft f2f HR@10": "0.556 ± 0.031 (seeds 0,1,2)"})``.

Every other record stays a row in its notebook's table (floats to 4 decimals)."""
from __future__ import annotations

import html
import json
import os
import re
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import yaml

from .data.dataset import manifest_modalities
from .notebook import read_records, repo_root


QUICK_SEEDS = "0-1"  # quick mode's training seeds: two, the fewest a paired t-test takes
DEMO_SEEDS = "0-2"  # the demo's training seeds

# the notebooks' parameters per profile (given parameters win)
PROFILES = {
    # smoke runs: a few training steps on a few users, two seeds (tests, quick batch checks)
    "quick": {"QUICK": True, "SEEDS": QUICK_SEEDS},
    # the demo: Vanilla, SFT and VLM2Rec fully trained on three seeds; the extra Task 1 methods,
    # the ablations, sensitivity and few-shot grids and Task 2's long training left to the full mode
    "demo": {"QUICK": False, "DEMO": True, "SEEDS": DEMO_SEEDS},
    # everything as the notebooks define it (training seeds 0-4, every grid)
    "full": {},
}


@dataclass
class NotebookResult:
    dataset: str
    notebook: str
    path: Path
    ok: bool  # did not fail (a skipped notebook is ok)
    seconds: float
    error: str | None = None
    records: dict = field(default_factory=dict)
    skipped: str | None = None  # why the notebook did not run on this dataset


# what a dataset must offer for a notebook that needs it, and how to get it
_HOW = {"titles": "prepare from metadata with titles", "images": "prepare with --images or image URLs"}


def notebook_needs(path: Path) -> tuple[str, ...]:
    """The modalities a notebook needs (its metadata's ``vlm2rec.needs``; ids alone when unsaid)."""
    meta = json.loads(Path(path).read_text()).get("metadata", {})
    return tuple(meta.get("vlm2rec", {}).get("needs", ["ids"]))


def skip_reason(needs: tuple[str, ...], offers: tuple[str, ...]) -> str | None:
    """Why a notebook cannot run on a dataset (None when it can)."""
    missing = [m for m in needs if m not in offers]
    return "; ".join(f"needs {m}: {_HOW.get(m, m)}" for m in missing) or None


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def list_notebooks() -> list[Path]:
    return sorted(notebooks_dir().glob("[0-9][0-9]_*.ipynb"))


def select_notebooks(spec: str) -> list[Path]:
    """``all`` or a comma list of numbers/names (``01,02`` or ``01_data_overview``)."""
    nbs = list_notebooks()
    if spec == "all":
        return nbs
    chosen = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        match = [nb for nb in nbs if nb.stem == part or nb.stem.split("_")[0] == part.zfill(2)]
        if not match:
            raise ValueError(f"no notebook {part!r}; known: {', '.join(nb.stem for nb in nbs)}")
        chosen += match
    return chosen


def parse_params(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs, values read as YAML scalars (``3`` -> int, ``true`` -> bool)."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"-p expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def dataset_names(datasets: list[str | Path]) -> list[str]:
    """A distinct output name per dataset folder: its name, or, where names clash (``a/data`` and
    ``b/data``), as many parent folders as it takes (``a_data``, ``b_data``)."""
    parts = [Path(d).resolve().parts for d in datasets]
    if len(set(parts)) < len(parts):
        raise ValueError("the same dataset folder is listed twice")
    names = []
    for p in parts:
        d = 1
        while d < len(p) and any(q != p and q[-d:] == p[-d:] for q in parts):
            d += 1
        names.append("_".join(x.strip("/") for x in p[-d:] if x.strip("/")))
    return names


# Lines a healthy kernel prints to the terminal that a researcher would read as something wrong; only
# these are dropped from the batch's output (a notebook's own errors and warnings are kept).
KERNEL_NOISE = (
    # ipykernel >= 7 on jupyter_client's default local TCP transport
    re.compile(r"\[IPKernelApp\] WARNING \| Kernel is running over TCP without encryption"),
)


@contextmanager
def filtered_stderr(patterns: tuple[re.Pattern, ...]):
    """Route file descriptor 2 (which kernels and other child processes inherit) through a pipe
    that drops the lines matching ``patterns`` and passes every other line on, in order."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    forward = os.dup(saved)  # the pump's own copy of the real stderr

    def pump() -> None:
        with os.fdopen(read_end, "rb") as src, os.fdopen(forward, "wb", buffering=0) as dst:
            for line in src:
                if not any(p.search(line.decode("utf-8", "replace")) for p in patterns):
                    dst.write(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes our copy of the pipe's write end: the pump ends when the kernels' do
        os.close(saved)
        thread.join(timeout=10)


def run_batch(datasets: list[str | Path], notebooks: list[Path], out: str | Path, profile: str = "full",
              params: dict | None = None, kernel: str = "python3") -> list[NotebookResult]:
    import papermill as pm

    if profile not in PROFILES:
        raise ValueError(f"profile: {profile!r} is not one of {sorted(PROFILES)}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: list[NotebookResult] = []
    offers_of: dict[str, tuple[str, ...]] = {}
    total = len(datasets) * len(notebooks)
    k = 0
    for data, name in zip(datasets, dataset_names(datasets)):
        data = Path(data).resolve()
        try:
            offers = offers_of[name] = manifest_modalities(json.loads((data / "manifest.json").read_text()))
        except (OSError, ValueError) as e:  # the other datasets still run; this one fails every notebook
            why = (f"{data}: not a prepared dataset (no manifest.json): prepare it with `vlm2rec-lab data prepare`, "
                   f"or check --datasets" if not (data / "manifest.json").is_file() else f"{data / 'manifest.json'}: unreadable ({e})")
            results += [NotebookResult(name, nb.stem, out / name / nb.name, False, 0.0, error=why) for nb in notebooks]
            k += len(notebooks)
            print(f"[{k}/{total}] {name}: FAILED, none of its {len(notebooks)} notebooks run — {why}", flush=True)
            continue
        for nb in notebooks:
            k += 1
            dest = out / name / nb.name
            reason = skip_reason(notebook_needs(nb), offers)
            if reason:
                results.append(NotebookResult(name, nb.stem, dest, True, 0.0, skipped=reason))
                print(f"[{k}/{total}] {name}/{nb.stem}: skipped — {reason}", flush=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            p = {"DATA_DIR": str(data), "OUT_DIR": str(out / name / nb.stem), "RUNS_DIR": str(out / name / "runs"),
                 **PROFILES[profile], **(params or {})}
            t0 = time.perf_counter()
            error = None
            try:
                with filtered_stderr(KERNEL_NOISE):
                    pm.execute_notebook(str(nb), str(dest), parameters=p, kernel_name=kernel, progress_bar=False,
                                        cwd=str(dest.parent))
            except pm.PapermillExecutionError as e:
                error = f"cell {e.exec_count}: {e.ename}: {e.evalue}"
            except Exception as e:  # a kernel that dies, a notebook that cannot be read  # noqa: BLE001
                error = f"{type(e).__name__}: {e}"
            secs = time.perf_counter() - t0
            recs = read_records(dest) if dest.exists() else {}
            results.append(NotebookResult(name, nb.stem, dest, error is None, secs, error, recs))
            print(f"[{k}/{total}] {name}/{nb.stem}: {'ok' if error is None else 'FAILED'} ({secs:.1f}s)"
                  + (f" — {error}" if error else ""), flush=True)
    for name in dict.fromkeys(r.dataset for r in results):
        if all(r.skipped for r in results if r.dataset == name):
            print(f"{name}: every requested notebook was skipped (it offers {', '.join(offers_of[name])})", flush=True)
    write_index(results, out)
    return results


_CSS = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
        ".fail{background:#fdd}.ok{background:#dfd}.skip{background:#eee;color:#555}"
        ".verdict{font-size:1.25em;font-weight:bold;border-left:6px solid #36c;padding:4px 10px;margin:.5em 0}"
        ".src{font-weight:normal;font-size:.75em;color:#666}"
        ".error{border:2px solid #c00;background:#fee;color:#900;padding:6px 10px;margin:.5em 0}"
        ".error pre{white-space:pre-wrap;margin:.3em 0 0}"
        ".figs{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}"
        "figcaption{font-size:12px;color:#444;max-width:320px;overflow-wrap:anywhere}img{border:1px solid #ddd}")


def _href(path: Path, out: Path) -> str:
    """A relative, URL-quoted and HTML-escaped link from ``out/index.html`` to ``path``."""
    rel = Path(os.path.relpath(Path(path).resolve(), Path(out).resolve())).as_posix()
    return html.escape(quote(rel))


def _value(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def _is_headline(key: str) -> bool:
    return key == "verdict" or key.startswith("headline:")


def _headlines(results: list[NotebookResult], datasets: list[str], out: Path) -> list[str]:
    """Per dataset: its verdicts as prominent lines, then a table of its ``headline:`` records."""
    parts = []
    for d in datasets:
        of_dataset = [r for r in results if r.dataset == d]
        verdicts = [(r, r.records["verdict"]) for r in of_dataset if "verdict" in r.records]
        heads = [(r, k, v) for r in of_dataset for k, v in r.records.items() if k.startswith("headline:")]
        if not verdicts and not heads:
            continue
        parts.append(f"<section class='headlines'><h2>headlines: {html.escape(d)}</h2>")
        parts += [f"<p class='verdict'>{html.escape(str(v))} <span class='src'>({html.escape(r.notebook)})</span></p>"
                  for r, v in verdicts]
        if heads:
            parts.append("<table><tr><th>headline</th><th>value</th><th>notebook</th></tr>")
            parts += [f"<tr><td>{html.escape(k[len('headline:'):].strip())}</td><td>{_value(v)}</td>"
                      f"<td><a href='{_href(r.path, out)}'>{html.escape(r.notebook)}</a></td></tr>"
                      for r, k, v in heads]
            parts.append("</table>")
        parts.append("</section>")
    return parts


def _figures(r: NotebookResult, out: Path, err_id: str) -> list[str]:
    """The run's error (red box) and every PNG in ``out/<dataset>/<notebook>/`` as a thumbnail
    linking to its SVG, or to itself where there is no SVG."""
    parts = []
    if not r.ok:
        parts.append(f"<div class='error' id='{err_id}'><b>{html.escape(r.notebook)} failed on "
                     f"{html.escape(r.dataset)}</b><pre>{html.escape(r.error or 'no error text')}</pre></div>")
    pngs = sorted((out / r.dataset / r.notebook).glob("*.png"))
    if pngs:
        parts.append("<div class='figs'>")
        for png in pngs:
            svg = png.with_suffix(".svg")
            parts.append(f"<figure><a href='{_href(svg if svg.exists() else png, out)}'>"
                         f"<img src='{_href(png, out)}' width='320' alt='{html.escape(png.stem)}' loading='lazy'></a>"
                         f"<figcaption>{html.escape(png.stem)}</figcaption></figure>")
        parts.append("</div>")
    return parts


def write_index(results: list[NotebookResult], out: Path) -> Path:
    """RUNS/index.html, one static page (no script, no fetches, relative links only).

    At the top, per dataset, its ``verdict`` records as prominent lines and its ``headline:<label>``
    records in a compact table (see the module docstring). Then per notebook: a table with a column
    per dataset, a row with the run's status (ok/failed, linking the executed notebook, its seconds
    and its outputs folder, or why it was skipped) and a row per other recorded value (floats to 4 decimals); below it, per
    dataset, a failed run's error in a red box and every figure the run wrote, a PNG thumbnail
    linking to its SVG. Every text from results or records is HTML-escaped."""
    from .io import atomic_write_text

    out = Path(out)
    datasets = list(dict.fromkeys(r.dataset for r in results))
    failed = [r for r in results if not r.ok]
    skipped = [r for r in results if r.skipped]
    err_id = {id(r): f"err-{i}" for i, r in enumerate(failed)}
    failed_links = ", ".join(f"<a href='#{err_id[id(r)]}'>{html.escape(r.dataset)}/{html.escape(r.notebook)}</a>"
                             for r in failed)
    parts = ["<!doctype html><meta charset='utf-8'><title>vlm2rec_lab batch</title>",
             f"<style>{_CSS}</style>", "<h1>vlm2rec_lab batch</h1>",
             f"<p>{len(results) - len(failed) - len(skipped)} of {len(results)} notebook runs ok"
             + (f"; skipped {len(skipped)} (what their datasets do not offer, said below)" if skipped else "")
             + (f"; failed: {failed_links}" if failed else "") + "</p>"]
    parts += _headlines(results, datasets, out)
    for nb in dict.fromkeys(r.notebook for r in results):
        rows = {r.dataset: r for r in results if r.notebook == nb}
        parts.append(f"<section class='notebook'><h2>{html.escape(nb)}</h2><table><tr><th></th>"
                     + "".join(f"<th>{html.escape(d)}</th>" for d in datasets) + "</tr>")
        cells = []
        for d in datasets:
            r = rows.get(d)
            if r is None:
                cells.append("<td></td>")
                continue
            if r.skipped:
                cells.append(f"<td class='skip'>skipped: {html.escape(r.skipped)}</td>")
                continue
            status = 'ok' if r.ok else 'failed'
            cells.append(f"<td class='{'ok' if r.ok else 'fail'}'>"
                         + (f"<a href='{_href(r.path, out)}'>{status}</a>" if r.path.exists() else status)
                         + f" ({r.seconds:.0f}s)"
                         + (f" · <a href='#{err_id[id(r)]}'>error</a>" if not r.ok else "")
                         + (f" · <a href='{_href(out / d / nb, out)}/'>outputs</a>" if (out / d / nb).exists() else "")
                         + "</td>")
        parts.append("<tr><td>notebook</td>" + "".join(cells) + "</tr>")
        keys = [k for k in dict.fromkeys(k for r in rows.values() for k in r.records) if not _is_headline(k)]
        for key in keys:
            parts.append(f"<tr><td>{html.escape(key)}</td>"
                         + "".join(f"<td>{_value(rows[d].records.get(key, ''))}</td>" if d in rows else "<td></td>"
                                   for d in datasets) + "</tr>")
        parts.append("</table>")
        for d in datasets:
            figs = _figures(rows[d], out, err_id.get(id(rows[d]), "")) if d in rows else []
            if figs:
                parts += [f"<h3>{html.escape(d)}</h3>", *figs]
        parts.append("</section>")
    path = out / "index.html"
    atomic_write_text(path, "\n".join(parts))
    return path


# --------------------------------------------------------------------------- training the shared runs up front

DEMO_DOMAIN = {"users": 400, "items": 200}  # the demo profile's domain size (the default knobs otherwise)
DEMO_METHODS = ("vlm-vanilla", "vlm-sft", "vlm2rec")  # the three states every demo notebook reads


def _train_one(job: tuple[str, str, str, int]) -> tuple[str, int, float]:
    import torch

    from .data.dataset import Dataset
    from .notebook import train_config
    from .runsets import ensure_runs

    data, runs_dir, method, seed = job
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # once per worker, not per run
    t0 = time.perf_counter()
    ensure_runs(Dataset.load(data), train_config(method, "tiny"), Path(runs_dir) / method, [seed])
    return method, seed, time.perf_counter() - t0


def train_runs(data: str | Path, runs_dir: str | Path, methods, seeds, workers: int | None = None) -> None:
    """Train (or find finished) the notebooks' run of each (method, training seed) with the tiny
    backbone, ``workers`` processes of one thread each (default: one per core, at most 4), so that
    the notebooks then reuse them: the same folders and configs as their ``ensure_runs`` calls."""
    import multiprocessing as mp

    from tqdm.auto import tqdm

    from .backbones import load_backbone
    from .data.dataset import Dataset

    load_backbone("tiny", dataset=Dataset.load(data))  # built once, before the workers read its cache
    jobs = [(str(data), str(runs_dir), m, int(s)) for s in seeds for m in methods]
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with mp.get_context("spawn").Pool(workers) as pool:
        for m, s, secs in tqdm(pool.imap_unordered(_train_one, jobs), total=len(jobs), desc="training runs"):
            print(f"  {m} seed {s}: {secs:.0f}s", flush=True)
