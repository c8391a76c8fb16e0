"""The examples run as tests (with fewer structures and epochs than by default)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the example and the notebook, end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_water_example_runs_end_to_end(tmp_path):
    out = str(tmp_path / "water")
    command = [
        sys.executable, os.path.join(ROOT, "examples", "water", "run.py"), "--out", out,
        "--n-structures", "14", "--n-train", "8", "--n-val", "2", "--workers", "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "real-space L1 error vs SCF density" in result.stdout
    with open(os.path.join(out, "evaluation", "errors.json")) as f:
        errors = json.load(f)
    assert errors["summary"]["n_structures"] == 4
    assert 0.0 < errors["summary"]["l1_vs_scf_percent"] < 10.0
    for name in ("parity.png", "errors.chemiscope.json.gz"):
        assert os.path.getsize(os.path.join(out, "evaluation", name)) > 1000, name
    assert os.path.getsize(os.path.join(out, "prediction", "new-water", "density.cube")) > 10_000

    # a rerun resumes: no target is recomputed
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "0 computed, 14 already there" in rerun.stdout


def test_tutorial_notebook_runs_headless_and_stores_its_outputs(tmp_path):
    """The notebook executed by a real Jupyter kernel (nbclient, the `notebook` extra),
    as `jupyter execute --inplace examples/water/tutorial.ipynb` does."""
    nbformat = pytest.importorskip("nbformat", reason="install the notebook extra: .[notebook]")
    nbclient = pytest.importorskip("nbclient", reason="install the notebook extra: .[notebook]")
    notebook = nbformat.read(os.path.join(ROOT, "examples", "water", "tutorial.ipynb"), 4)
    assert len([cell for cell in notebook.cells if cell.cell_type == "code"]) >= 5
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert "largest deviation" in text and "rmse_percent" in text and "parity.png" in text
    shown = [kind for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.outputs for kind in output.get("data", {})]
    assert "image/png" in shown  # the parity plot, inline
    assert any("widget" in kind or kind == "text/html" for kind in shown)  # the chemiscope map
