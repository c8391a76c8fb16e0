"""``rholearn predict`` and :func:`rholearn.workflow.predict`: folder names, index
selections, ``info.json`` with the predicted electron count, and the warning for
a cube too coarse for the density. Real PySCF targets (HF/sto-3g, fitted in
def2-universal-jfit) of a few waters and a model trained on them."""

import json
import os

import ase.io
import numpy as np
import pytest

from rhocalc import cli as rhocalc_cli
from rhocalc.pyscf.fit import function_integrals
from rhocalc.pyscf.molecule import aux_molecule
from rhocalc.pyscf.order import vector_to_canonical
from rhocalc.structures import distorted_waters
from rholearn import cli, layout, workflow
from rholearn.models import DensityModel
from rholearn.train import TrainOptions

FAST = ["--xc", "HF", "--basis", "sto-3g", "--auxbasis", "def2-universal-jfit", "--quiet"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A linear model trained on 6 distorted waters."""
    root = tmp_path_factory.mktemp("predict")
    structures = str(root / "waters.xyz")
    ase.io.write(structures, distorted_waters(6, seed=2))
    dataset = str(root / "dataset")
    assert rhocalc_cli.main(["pyscf", structures, "--out", dataset, *FAST]) == 0
    options = workflow.FitOptions(
        model="linear", solver="gradient", n_train=4, n_val=1,
        train=TrainOptions(epochs=4, optimizer="lbfgs", learning_rate=1.0, scheduler=None,
                           verbose=False),
    )
    workflow.fit(dataset, str(root / "run"), options)
    return str(root / "run" / workflow.MODEL_FILE)


@pytest.fixture
def unnamed(tmp_path):
    """6 waters without ``info["name"]``, in a file."""
    frames = distorted_waters(6, seed=11)
    for atoms in frames:
        del atoms.info["name"]
    path = str(tmp_path / "unnamed.xyz")
    ase.io.write(path, frames)
    return path


def visible(folder):
    """The entries of a folder a user sees (not its lock file)."""
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def read_info(folder):
    with open(os.path.join(folder, workflow.PREDICTION_INFO_FILE)) as f:
        return json.load(f)


def exact_electrons(folder, atoms, basis):
    """The predicted density's integral, computed here from the saved coefficients."""
    coefficients = layout.load(os.path.join(folder, layout.COEFFICIENTS_FILE))
    vector = layout.tensormap_to_vector(coefficients, atoms.numbers, basis)
    aux = aux_molecule(atoms, basis)
    return float(vector_to_canonical(function_integrals(aux), aux) @ vector)


def test_names_are_kept_and_info_records_the_electron_count(model_file, tmp_path):
    model = DensityModel.load(model_file)
    frames = distorted_waters(3, seed=9)
    frames[1].info["name"] = "water/../odd name"  # not a safe folder name
    out = str(tmp_path / "out")
    folders = workflow.predict(model, frames, out, progress=False, model_file=model_file)
    names = ["water-0", "water_.._odd_name", "water-2"]
    assert folders == [os.path.join(out, name) for name in names]
    assert visible(out) == sorted(names)
    for index, (atoms, folder) in enumerate(zip(frames, folders)):
        info = read_info(folder)
        assert info["name"] == os.path.basename(folder) and info["index"] == index
        assert (info["model_file"], info["model"], info["basis"]) == (
            model_file, "linear", "def2-universal-jfit")
        assert info["formula"] == "H2O"
        assert info["n_electrons"] == pytest.approx(
            exact_electrons(folder, atoms, model.basis), abs=1e-10)
        assert abs(info["n_electrons"] - 10.0) < 0.1  # the model learnt the electron count
        assert "cube_n_electrons" not in info

    # explicit names win; a second prediction replaces the first as a whole
    folders = workflow.predict(model, frames[:2], out, progress=False, names=["a", "b"])
    assert visible(out) == ["a", "b"]


def test_duplicate_names_are_refused_before_writing(model_file, tmp_path, capsys):
    frames = distorted_waters(3, seed=9)
    frames[0].info["name"] = frames[2].info["name"] = "water"
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"structures \[0, 2\] -> 'water'"):
        workflow.predict(DensityModel.load(model_file), frames, out, progress=False)
    assert not os.path.exists(out)

    structures = str(tmp_path / "twins.xyz")
    ase.io.write(structures, frames)
    assert cli.main(["predict", model_file, structures, "--out", out]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "[0, 2] -> 'water'" in error


@pytest.mark.parametrize("index, expected", [
    ("3:5", ["3", "4"]),
    ("0,4,-1", ["0", "4", "5"]),
    ("-2", ["4"]),
])
def test_cli_folders_are_the_indices_in_the_file(model_file, unnamed, tmp_path, index, expected):
    out = str(tmp_path / "out")
    assert cli.main(["predict", model_file, unnamed, "--out", out, "--index", index]) == 0
    assert visible(out) == expected
    model = DensityModel.load(model_file)
    for name in expected:
        atoms = ase.io.read(unnamed, int(name))
        info = read_info(os.path.join(out, name))
        assert info["index"] == int(name) and info["model_file"] == model_file
        predicted = layout.load(os.path.join(out, name, layout.COEFFICIENTS_FILE))
        alone = model.predict([atoms], [0])
        np.testing.assert_allclose(
            layout.tensormap_to_vector(predicted, atoms.numbers, model.basis),
            layout.tensormap_to_vector(alone, atoms.numbers, model.basis), rtol=0, atol=1e-12)


def test_cli_reads_an_index_file_and_a_run_folder(model_file, unnamed, tmp_path, capsys):
    indices = tmp_path / "indices.txt"
    indices.write_text("1\n2, 5\n")
    out = str(tmp_path / "out")
    run = os.path.dirname(model_file)
    assert cli.main(["predict", run, unnamed, "--out", out, "--index", f"@{indices}"]) == 0
    assert visible(out) == ["1", "2", "5"]
    assert read_info(os.path.join(out, "5"))["model_file"] == os.path.abspath(model_file)

    capsys.readouterr()
    assert cli.main(["predict", run, unnamed, "--out", out, "--index", "0,6"]) == 2
    error = capsys.readouterr().err
    assert "unnamed.xyz' holds 6 structures: no index [6]" in error
    assert cli.main(["predict", run, unnamed, "--out", out, "--index", "0,x"]) == 2
    assert "'0,x' is not a list of integers" in capsys.readouterr().err
    assert visible(out) == ["1", "2", "5"]  # nothing replaced


def test_a_coarse_cube_is_reported_and_a_fine_one_is_not(model_file, unnamed, tmp_path, capsys):
    out = str(tmp_path / "out")
    arguments = ["predict", model_file, unnamed, "--out", out, "--index", "0", "--cube"]
    model = DensityModel.load(model_file)
    atoms = ase.io.read(unnamed, 0)
    counts = {}
    for spacing in (0.3, 0.06):
        assert cli.main([*arguments, "--spacing", str(spacing)]) == 0
        info = read_info(os.path.join(out, "0"))
        assert info["cube_spacing_angstrom"] == spacing
        assert all(abs(v - spacing) < 0.05 * spacing for v in info["cube_voxel_angstrom"])
        assert info["n_electrons"] == pytest.approx(
            exact_electrons(os.path.join(out, "0"), atoms, model.basis), abs=1e-10)
        counts[spacing] = info["cube_n_electrons"] / info["n_electrons"]
        warnings = [line for line in capsys.readouterr().err.splitlines()
                    if "rholearn predict: warning" in line]
        if spacing == 0.3:
            (warning,) = warnings
            assert "cube spacing 0.3 Angstrom under-resolves the density" in warning
            assert "smaller spacing (--spacing)" in warning
        else:
            assert warnings == []
    assert abs(counts[0.3] - 1) > workflow.CUBE_TOLERANCE > abs(counts[0.06] - 1)
