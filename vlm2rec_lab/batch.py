"""The papermill batch: every selected notebook, per dataset, into RUNS/<dataset>/<notebook>.ipynb
with its figures and tables, and RUNS/index.html linking every output with the recorded numbers
side by side. A failing cell keeps its notebook, the batch goes on, the index shows the error."""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .notebook import read_records, repo_root


QUICK_SEEDS = "0-1"  # quick mode's training seeds: two, the fewest a paired t-test takes


@dataclass
class NotebookResult:
    dataset: str
    notebook: str
    path: Path
    ok: bool
    seconds: float
    error: str | None = None
    records: dict = field(default_factory=dict)


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


def run_batch(datasets: list[str | Path], notebooks: list[Path], out: str | Path, quick: bool = False,
              params: dict | None = None, kernel: str = "python3") -> list[NotebookResult]:
    import papermill as pm

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: list[NotebookResult] = []
    total = len(datasets) * len(notebooks)
    k = 0
    for data, name in zip(datasets, dataset_names(datasets)):
        data = Path(data).resolve()
        for nb in notebooks:
            k += 1
            dest = out / name / nb.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            p = {"DATA_DIR": str(data), "OUT_DIR": str(out / name / nb.stem), "RUNS_DIR": str(out / name / "runs"),
                 "QUICK": quick, **({"SEEDS": QUICK_SEEDS} if quick else {}), **(params or {})}
            t0 = time.perf_counter()
            error = None
            try:
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
    write_index(results, out)
    return results


def write_index(results: list[NotebookResult], out: Path) -> Path:
    """RUNS/index.html: per notebook, a row per recorded value, a column per dataset."""
    from .io import atomic_write_text

    datasets = list(dict.fromkeys(r.dataset for r in results))
    parts = ["<!doctype html><meta charset='utf-8'><title>vlm2rec_lab batch</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}.fail{background:#fdd}.ok{background:#dfd}</style>",
             "<h1>vlm2rec_lab batch</h1>"]
    for nb in dict.fromkeys(r.notebook for r in results):
        rows = {r.dataset: r for r in results if r.notebook == nb}
        parts.append(f"<h2>{html.escape(nb)}</h2><table><tr><th></th>"
                     + "".join(f"<th>{html.escape(d)}</th>" for d in datasets) + "</tr>")
        parts.append("<tr><td>notebook</td>" + "".join(
            f"<td class='{'ok' if rows[d].ok else 'fail'}'><a href='{html.escape(str(rows[d].path.relative_to(out)))}'>"
            f"{'ok' if rows[d].ok else 'failed'}</a> ({rows[d].seconds:.0f}s)"
            + (f"<br><code>{html.escape(rows[d].error)}</code>" if rows[d].error else "")
            + (f" · <a href='{html.escape(d)}/{html.escape(nb)}/'>outputs</a>" if (out / d / nb).exists() else "")
            + "</td>" if d in rows else "<td></td>" for d in datasets) + "</tr>")
        keys = list(dict.fromkeys(k for r in rows.values() for k in r.records))
        for key in keys:
            cells = []
            for d in datasets:
                v = rows[d].records.get(key, "") if d in rows else ""
                cells.append(f"<td>{v:.4f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>")
            parts.append(f"<tr><td>{html.escape(key)}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    path = out / "index.html"
    atomic_write_text(path, "\n".join(parts))
    return path
