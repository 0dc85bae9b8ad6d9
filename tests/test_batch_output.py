"""What the batch prints: the kernels' known noise dropped, everything else kept."""
import json

import nbformat
import papermill as pm
import pytest

from vlm2rec_lab.batch import filtered_stderr, KERNEL_NOISE, run_batch

NOISE = "Kernel is running over TCP without encryption"


def _notebook(path):
    cells = [nbformat.v4.new_code_cell("import os, warnings\nos.write(2, b'raw line from the kernel\\n')\n"
                                       "warnings.warn('my own warning')"),
             nbformat.v4.new_code_cell("raise ValueError('my own error')")]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_the_kernels_transport_warning_is_dropped_and_the_notebooks_own_output_kept(synth_ds, tmp_path, capfd):
    nb = _notebook(tmp_path / "x.ipynb")
    # the premise: without the filter a kernel prints the warning on the terminal
    with pytest.raises(pm.PapermillExecutionError, match="my own error"):
        pm.execute_notebook(str(nb), str(tmp_path / "plain.ipynb"), kernel_name="python3", progress_bar=False)
    assert NOISE in capfd.readouterr().err
    results = run_batch([synth_ds.path], [nb], tmp_path / "out", profile="quick")
    out, err = capfd.readouterr()
    assert NOISE not in out + err
    assert "raw line from the kernel" in err  # any other line a kernel writes still reaches the terminal
    assert "my own error" in results[0].error and "FAILED" in out  # the notebook's exception is reported
    cells = json.loads(results[0].path.read_text())["cells"]
    shown = "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))
    assert "my own warning" in shown  # and its warning kept in the executed notebook


def test_filtered_stderr_keeps_order_and_partial_lines(tmp_path, capfd):
    import os
    import re

    with filtered_stderr((re.compile("drop me"),)):
        os.write(2, b"first\nplease drop me\nsecond\nno newline at the end")
    assert capfd.readouterr().err == "first\nsecond\nno newline at the end"
    assert KERNEL_NOISE[0].search(f"[IPKernelApp] WARNING | {NOISE}. All communication")


def test_a_notebook_a_dataset_cannot_feed_is_skipped_with_its_reason(synth_raw, tmp_path, capsys):
    """Text-only data (the synthetic reviews and titles without the images): the collapse notebook is
    skipped, said in the output and the index, and not counted as a failure; the template runs."""
    from vlm2rec_lab.batch import select_notebooks
    from vlm2rec_lab.cli import main
    from vlm2rec_lab.config import PrepareConfig
    from vlm2rec_lab.data.dataset import prepare

    ds = prepare(PrepareConfig(format="amazon2018", inputs=[str(synth_raw)], require_images=False), tmp_path / "text",
                 progress=False)
    assert ds.modalities == ("ids", "titles") and ds.kind == "text-only"
    code = main(["batch", "--datasets", str(ds.path), "--notebooks", "00,02", "--out", str(tmp_path / "out"), "--quick"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "text/02_modality_collapse: skipped — needs images: prepare with --images or image URLs" in out
    assert "1 passed, 1 skipped, 0 failed" in out
    index = (tmp_path / "out" / "index.html").read_text()
    assert "<td class='skip'>skipped: needs images: prepare with --images or image URLs</td>" in index
    assert "1 of 2 notebook runs ok; skipped 1" in index
    assert [str(p.name) for p in select_notebooks("02")] == ["02_modality_collapse.ipynb"]


def test_every_notebook_skipped_is_said_plainly(synth_raw, tmp_path, capsys):
    from vlm2rec_lab.batch import select_notebooks
    from vlm2rec_lab.config import PrepareConfig
    from vlm2rec_lab.data.dataset import prepare

    ds = prepare(PrepareConfig(format="amazon2018", inputs=[str(synth_raw)], require_images=False), tmp_path / "text",
                 progress=False)
    results = run_batch([ds.path], select_notebooks("02,07"), tmp_path / "out", profile="quick")
    assert all(r.ok and r.skipped for r in results)
    assert "text: every requested notebook was skipped (it offers ids, titles)" in capsys.readouterr().out
