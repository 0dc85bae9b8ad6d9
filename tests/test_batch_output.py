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
