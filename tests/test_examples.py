"""The examples run as tests (with fewer structures and epochs than by default)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_water_example_runs_end_to_end(tmp_path):
    out = str(tmp_path / "water")
    command = [
        sys.executable, os.path.join(ROOT, "examples", "water", "run.py"), "--out", out,
        "--n-structures", "14", "--n-train", "8", "--n-val", "2", "--epochs", "3",
        "--workers", "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "real-space L1 error vs SCF density" in result.stdout
    with open(os.path.join(out, "test_errors.json")) as f:
        errors = json.load(f)
    assert errors["summary"]["n_structures"] == 4
    assert 0.0 < errors["summary"]["l1_vs_scf_percent"] < 10.0
    assert os.path.getsize(os.path.join(out, "prediction", "0", "density.cube")) > 10_000

    # a rerun resumes: no target is recomputed
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "0 computed, 14 already there" in rerun.stdout


def test_tutorial_notebook_runs(tmp_path):
    """The notebook's code cells, in order, as one script (no Jupyter kernel needed)."""
    with open(os.path.join(ROOT, "examples", "water", "tutorial.ipynb")) as f:
        notebook = json.load(f)
    cells = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert len(cells) >= 5
    script = tmp_path / "tutorial.py"
    script.write_text("\n\n".join(cells))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "largest deviation" in result.stdout and "rmse_percent" in result.stdout
