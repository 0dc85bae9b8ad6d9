"""The per-dataset batch over what each dataset allows: the synthetic domain (multimodal), the shared
Amazon 2018 Scientific set (titles, no images: text-only) and the shared Beauty set (ids only), side
by side in one quick batch, through the command line a researcher types."""
import glob
import math
from pathlib import Path

import pytest

from conftest import real_data
from vlm2rec_lab.batch import list_notebooks
from vlm2rec_lab.cli import main

ALL = {nb.stem for nb in list_notebooks()}
NEEDS_IMAGES = {"02_modality_collapse", "03_training", "06_ablation_sensitivity", "07_embedding_explorer"}
# the exact notebooks each dataset runs (docs/notebooks.md's notebook x kind table); the rest are skipped
RUNS = {"data": ALL, "sci": ALL - NEEDS_IMAGES, "beauty": ALL - NEEDS_IMAGES}
CHANCE_HR10 = 10 / 101  # a random ranking of 1 target among 101 candidates
MARGIN = 0.05  # the bar: at least this far above the measured random scorer


def _prepare(tmp: Path) -> dict[str, Path]:
    sci_src = real_data("amazon2018_scientific")
    beauty_src = real_data("amazon2014_beauty") / "user_sequence.txt"
    raw = tmp / "raw"
    assert main(["data", "synth", "--out", str(raw), "--users", "400", "--items", "200", "--no-report"]) == 0
    sets = {"data": tmp / "data", "sci": tmp / "sci", "beauty": tmp / "beauty"}
    assert main(["data", "prepare", "--format", "amazon2018", "--input", *sorted(glob.glob(str(raw / "*.json.gz"))),
                 "--images", str(raw / "images"), "--out", str(sets["data"])]) == 0
    assert main(["data", "prepare", "--format", "atomic", "--input", str(sci_src), "--out", str(sets["sci"]),
                 "--require-images", "no"]) == 0
    assert main(["data", "prepare", "--format", "p5", "--input", str(beauty_src), "--out", str(sets["beauty"]),
                 "--require-images", "no"]) == 0
    return sets


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_batch_over_synthetic_scientific_and_beauty(tmp_path, capfd):
    sets = _prepare(tmp_path)
    out = tmp_path / "out"
    code = main(["batch", "--datasets", *map(str, sets.values()), "--out", str(out), "--quick"])
    printed = capfd.readouterr().out
    assert code == 0, printed

    from vlm2rec_lab.notebook import read_records

    ran = {d: {p.stem for p in (out / d).glob("[0-9][0-9]_*.ipynb")} for d in sets}
    assert ran == RUNS, printed
    why = {"sci": "needs images: prepare with --images or image URLs",  # titles, no pixels
           "beauty": "needs titles: prepare from metadata with titles; needs images: prepare with --images or image URLs"}
    for d in sets:
        for nb in sorted(ALL - RUNS[d]):
            assert f"{d}/{nb}: skipped — {why[d]}" in printed, (d, nb)
    assert f"{len(ALL) * 3 - 8} passed, 8 skipped, 0 failed" in printed

    index = (out / "index.html").read_text()
    assert "<th>data</th><th>sci</th><th>beauty</th>" in index  # one column per dataset, side by side
    assert index.count("class='skip'>skipped: needs ") == 8 and "class='fail'" not in index

    task1 = {d: read_records(out / d / "04_task1.ipynb") for d in sets}
    task2 = {d: read_records(out / d / "05_task2.ipynb") for d in sets}
    for d in ("sci", "beauty"):  # thousands of users: the measured random scorer sits at chance
        assert abs(task1[d]["random_HR@10"] - CHANCE_HR10) < 0.01, (d, task1[d])
    # text-only Scientific: the text methods, no VLM method; ids-only Beauty: the scorers alone
    assert {k[: -len("_HR@10")] for k in task1["sci"] if k.endswith("_HR@10")} == \
        {"random", "popularity", "cooccurrence", "llm-vanilla", "llm-sft"}
    assert {k[: -len("_HR@10")] for k in task1["beauty"] if k.endswith("_HR@10")} == {"random", "popularity", "cooccurrence"}
    assert {k[: -len("_HR@10")] for k in task2["sci"] if k.endswith("_HR@10") and "full" not in k} == {"ID", "LLM-SFT init"}
    assert {k[: -len("_HR@10")] for k in task2["beauty"] if k.endswith("_HR@10") and "full" not in k} == {"ID"}

    sci_random, beauty_random = task1["sci"]["random_HR@10"], task1["beauty"]["random_HR@10"]
    assert task1["sci"]["llm-sft_HR@10"] >= sci_random + MARGIN, task1["sci"]
    for scorer in ("popularity", "cooccurrence"):
        assert task1["beauty"][f"{scorer}_HR@10"] >= beauty_random + MARGIN, task1["beauty"]
    assert task2["beauty"]["model"] == "sasrec" and task2["beauty"]["ID_HR@10"] >= beauty_random + MARGIN, task2["beauty"]
    assert all(math.isfinite(v) for r in (*task1.values(), *task2.values()) for v in r.values() if isinstance(v, float))
