"""RUNS/index.html from hand-made results: thumbnails linking SVGs, failures in a red box,
verdicts and headlines first, everything escaped. No notebook is executed."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from vlm2rec_lab.batch import NotebookResult, write_index


def _figure(folder: Path, name: str, svg: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (200, 30, 30)).save(folder / f"{name}.png")
    if svg:
        (folder / f"{name}.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg' width='8' height='6'/>")


def _result(out: Path, dataset: str, notebook: str, error: str | None = None, **records) -> NotebookResult:
    path = out / dataset / f"{notebook}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    return NotebookResult(dataset, notebook, path, error is None, 12.3, error, records)


@pytest.fixture
def page(tmp_path):
    out = tmp_path / "runs"
    _figure(out / "beauty" / "02_modality_collapse", "fig1a_modality_dropout")
    _figure(out / "beauty" / "02_modality_collapse", "png only", svg=False)
    _figure(out / "beauty" / "98_bad", "before_crash")
    results = [
        _result(out, "beauty", "02_modality_collapse", VLM2Rec_F_S=0.123456, users=40,
                verdict="collapse: v2f at chance", **{"headline:vlm-sft f2f HR@10": "0.556 ± 0.031 (seeds 0,1,2)",
                                                      "headline:p vs SFT": 0.0123456, "a<b & 'c'": 1.5}),
        _result(out, "toys", "02_modality_collapse", VLM2Rec_F_S=0.5),
        _result(out, "beauty", "98_bad", error="cell 2: ValueError: <script>alert('x')</script>"),
    ]
    path = write_index(results, out)
    return out, path.read_text()


def test_figures_are_thumbnails_linking_their_svg_by_relative_paths(page):
    out, text = page
    fig = "beauty/02_modality_collapse/fig1a_modality_dropout"
    assert re.search(f"<a href='{fig}.svg'><img src='{fig}.png' width='320'", text)
    only = "beauty/02_modality_collapse/png%20only.png"  # no SVG: the PNG links itself
    assert f"<a href='{only}'><img src='{only}'" in text
    assert "href='beauty/02_modality_collapse.ipynb'" in text and "href='beauty/02_modality_collapse/'" in text
    assert str(out) not in text  # nothing absolute: the folder can be moved or zipped
    assert "<script" not in text and "http" not in text  # no script, no fetches


def test_a_failing_notebook_shows_its_error_escaped_with_the_figures_it_wrote(page):
    _, text = page
    box = text[text.index("<div class='error'"):]
    assert "cell 2: ValueError: &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in box[:box.index("</div>")]
    assert "<img src='beauty/98_bad/before_crash.png'" in box
    assert ">failed</a> (12s)" in text and "href='#err-0'" in text  # status cell links to the box


def test_verdict_and_headlines_come_first_and_leave_the_notebook_table(page):
    _, text = page
    first_section = text.index("<section class='notebook'>")
    verdict = text.index("<p class='verdict'>collapse: v2f at chance")
    assert verdict < first_section and "(02_modality_collapse)" in text[verdict:first_section]
    head = text.index("<td>vlm-sft f2f HR@10</td><td>0.556 ± 0.031 (seeds 0,1,2)</td>")
    assert verdict < head < first_section
    assert "<td>p vs SFT</td><td>0.0123</td>" in text[:first_section]
    body = text[first_section:]
    assert "headline:" not in body and "verdict" not in body
    assert "<td>VLM2Rec_F_S</td><td>0.1235</td><td>0.5000</td>" in body  # a column per dataset
    assert "<h2>headlines: beauty</h2>" in text and "headlines: toys" not in text  # none for toys


def test_record_keys_are_escaped(page):
    _, text = page
    assert "<td>a&lt;b &amp; &#x27;c&#x27;</td><td>1.5000</td>" in text
    assert "a<b" not in text
