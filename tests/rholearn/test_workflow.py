"""The whole pipeline: PySCF targets -> fit -> evaluate -> predict, and the CLI."""

import functools
import gzip
import json
import os

import ase.build
import ase.io
import numpy as np
import pytest
import torch
import yaml

from rhocalc.batch import run_batch
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets
from rhocalc.pyscf.fit import function_integrals
from rhocalc.pyscf.molecule import aux_molecule
from rhocalc.pyscf.order import vector_to_canonical
from rhocalc.pyscf.realspace import read_cube
from rhocalc.structures import distorted_waters
from rholearn import __version__, cli, layout, workflow
from rholearn.models import DensityModel
from rholearn.options import from_dict, to_dict
from rholearn.run import RunFolder
from rholearn.train import TrainOptions

OPTIONS = PySCFOptions(xc="PBE", basis="def2-svp", auxbasis="def2-universal-jkfit")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 distorted water molecules with PBE/def2-svp targets."""
    out = str(tmp_path_factory.mktemp("water-dataset"))
    report = run_batch(
        distorted_waters(12, seed=1), out, functools.partial(compute_targets, options=OPTIONS),
        basis_set(OPTIONS.auxbasis, ["H", "O"]), progress=False,
    )
    assert report.failed == []
    return out


@pytest.fixture(scope="module")
def fitted(dataset, tmp_path_factory):
    options = workflow.FitOptions(
        model="linear", solver="gradient", n_train=8, n_val=2, n_test=2,  # the training loop
        train=TrainOptions(epochs=4, optimizer="lbfgs", learning_rate=1.0, scheduler=None,
                           verbose=False),
    )
    return workflow.fit(dataset, str(tmp_path_factory.mktemp("run")), options)


def test_fit_writes_a_reproducible_run(fitted, dataset):
    run = fitted.run_dir
    for name in (workflow.MODEL_FILE, workflow.SPLIT_FILE, workflow.OPTIONS_FILE, "log.csv"):
        assert os.path.exists(os.path.join(run, name)), name
    assert not any(os.path.exists(os.path.join(run, name)) for name in ("fit.json", "options.json"))
    # the Python API writes the one options record too, and the resume hint names it
    with open(os.path.join(run, workflow.OPTIONS_FILE)) as f:
        recorded = yaml.safe_load(f)
    assert recorded.pop("dataset") == os.path.abspath(dataset) and recorded.pop("run") == run
    assert to_dict(from_dict(workflow.FitOptions, recorded)) == recorded
    assert recorded["model"] == "linear" and recorded["train"]["optimizer"] == "lbfgs"
    assert os.path.join(run, workflow.OPTIONS_FILE) in RunFolder(run).resume_hint()
    split = fitted.split
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (8, 2, 2)
    assert not set(split["train"]) & set(split["test"])
    # the saved model is the in-memory one
    frames = distorted_waters(12, seed=1)
    reloaded = DensityModel.load(os.path.join(run, workflow.MODEL_FILE))
    for key, block in fitted.model.predict(frames[:2]).items():
        torch.testing.assert_close(block.values, reloaded.predict(frames[:2]).block(key).values,
                                   rtol=0, atol=0)
    # the training loss went down
    losses = [h["train_loss"] for h in fitted.history]
    assert losses[-1] < 0.1 * losses[0]


def test_logged_validation_rmse_is_the_evaluated_one(fitted, dataset):
    """The per-epoch validation % RMSE of log.csv is SALTED's RMSE of the model of that
    epoch on the validation structures, as evaluate computes it."""
    best = min(fitted.history, key=lambda record: record["val_loss"])
    errors = workflow.evaluate(fitted.model, dataset, fitted.split["val"], real_space=False,
                               progress=False)
    assert best["val_rmse_percent"] == pytest.approx(errors["summary"]["rmse_percent"], rel=1e-9)
    with open(os.path.join(fitted.run_dir, "train.log")) as f:
        assert "val RMSE" in f.read()


def test_evaluate_separates_model_and_basis_errors(fitted, dataset):
    errors = workflow.evaluate(fitted.model, dataset, fitted.split["test"], progress=False)
    rows, summary = errors["structures"], errors["summary"]
    assert [row["index"] for row in rows] == fitted.split["test"]
    for row in rows:
        # the fitted basis misses ~1 % of the SCF density (see rhocalc tests)
        assert 0.3 < row["ri_l1_vs_scf_percent"] < 2.0
        assert 0.0 < row["l1_vs_ri_percent"] < 5.0
        # triangle inequality of the L1 norm
        assert row["l1_vs_scf_percent"] <= row["l1_vs_ri_percent"] + row["ri_l1_vs_scf_percent"] + 1e-9
        assert 0.0 < row["relative_l2_percent"] < 5.0
    assert summary["rmse_percent"] < 100.0  # better than the baseline alone
    assert summary["relative_l2_percent"] == pytest.approx(
        np.mean([row["relative_l2_percent"] for row in rows])
    )


def test_predicted_density_has_the_right_electron_count(fitted, tmp_path):
    atoms = distorted_waters(1, seed=99)[0]
    (folder,) = workflow.predict(fitted.model, [atoms], str(tmp_path), cube=True, progress=False)
    coefficients = layout.load(os.path.join(folder, layout.COEFFICIENTS_FILE))
    vector = layout.tensormap_to_vector(coefficients, atoms.numbers, fitted.model.basis)
    aux = aux_molecule(atoms, fitted.model.basis)
    n_electrons = vector_to_canonical(function_integrals(aux), aux) @ vector
    assert abs(n_electrons - 10.0) < 0.05
    density, cube_atoms = read_cube(os.path.join(folder, "density.cube"))
    assert cube_atoms.get_chemical_symbols() == ["O", "H", "H"]
    assert density.max() > 1.0  # electrons / Bohr^3 near the oxygen nucleus


def test_a_run_folder_is_never_shared_by_two_datasets_or_splits(fitted, dataset, tmp_path):
    recorded = {key: value for key, value in RunFolder(fitted.run_dir).options().items()
                if key not in ("dataset", "run")}
    options = from_dict(workflow.FitOptions, {**recorded, "split_seed": 1})
    # the same run folder with another split: refused, nothing overwritten
    with open(os.path.join(fitted.run_dir, workflow.SPLIT_FILE)) as f:
        before = f.read()
    with open(os.path.join(fitted.run_dir, workflow.OPTIONS_FILE)) as f:
        options_before = f.read()
    with pytest.raises(FileExistsError, match="already holds a run"):
        workflow.fit(dataset, fitted.run_dir, options)
    with pytest.raises(ValueError, match=r"other options \(split_seed: 0 there, 1 now; recorded"):
        workflow.fit(dataset, fitted.run_dir, options, resume=True)
    with open(os.path.join(fitted.run_dir, workflow.SPLIT_FILE)) as f:
        assert f.read() == before
    with open(os.path.join(fitted.run_dir, workflow.OPTIONS_FILE)) as f:
        assert f.read() == options_before


def test_evaluate_rejects_empty_or_unfinished_sets(fitted, dataset):
    with pytest.raises(ValueError, match="no structures"):
        workflow.evaluate(fitted.model, dataset, [], progress=False)
    with pytest.raises(ValueError, match="structure 99 is not completed"):
        workflow.evaluate(fitted.model, dataset, [99], progress=False)


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        DensityModel.load(str(tmp_path / "nowhere.pt"))


def test_batched_prediction_equals_one_by_one(fitted, tmp_path):
    frames = distorted_waters(3, seed=7)
    folders = workflow.predict(fitted.model, frames, str(tmp_path), batch_size=2, progress=False)
    for index, (atoms, folder) in enumerate(zip(frames, folders)):
        batched = layout.load(os.path.join(folder, layout.COEFFICIENTS_FILE))
        alone = fitted.model.predict([atoms], [index])
        np.testing.assert_allclose(
            layout.tensormap_to_vector(batched, atoms.numbers, fitted.model.basis),
            layout.tensormap_to_vector(alone, atoms.numbers, fitted.model.basis),
            rtol=0, atol=1e-12,
        )


def test_cli_train_evaluate_predict(dataset, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert cli.main(["train", dataset, "--run", run, "--n-train", "6", "--n-val", "2",
                     "--train.epochs", "2"]) == 0
    assert cli.main(["evaluate", run, "--no-real-space"]) == 0
    output = capsys.readouterr().out
    assert "rmse_percent" in output
    evaluation = os.path.join(run, "evaluation_test")
    with open(os.path.join(evaluation, "errors.json")) as f:
        rows = json.load(f)["structures"]
    assert len(rows) == 4
    with gzip.open(os.path.join(evaluation, "errors.chemiscope.json.gz"), "rt") as f:
        chemiscope_map = json.load(f)
    assert len(chemiscope_map["structures"]) == 4
    assert chemiscope_map["properties"]["relative_l2_percent"]["values"] == pytest.approx(
        [row["relative_l2_percent"] for row in rows]
    )
    shares = chemiscope_map["properties"]["atom_error_share_percent"]["values"]
    assert len(shares) == 3 * 4 and sum(shares) == pytest.approx(100.0 * 4)
    assert min(shares) >= 0.0  # each structure's error split into non-negative shares
    assert all(entry["description"] for entry in chemiscope_map["properties"].values())
    assert os.path.exists(os.path.join(evaluation, "parity.png"))
    for row in rows:  # the predicted coefficients are kept next to the errors
        assert os.path.exists(os.path.join(evaluation, str(row["index"]), "coefficients.mts"))

    structures = str(tmp_path / "new.xyz")
    ase.io.write(structures, distorted_waters(2, seed=5))
    out = str(tmp_path / "predicted")
    assert cli.main(["predict", os.path.join(run, "model.pt"), structures, "--out", out]) == 0
    assert sorted(n for n in os.listdir(out) if n != ".lock") == ["water-0", "water-1"]

    # an element the model never saw: a clear error, naming structure and element
    ase.io.write(structures, [ase.build.molecule("CH4")])
    assert cli.main(["predict", os.path.join(run, "model.pt"), structures, "--out", out]) == 2
    error = capsys.readouterr().err
    assert "structure 0" in error and "'C'" in error and "not trained on" in error


def test_cli_reports_a_missing_dataset(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "nowhere"), "--run", str(tmp_path / "run")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_fit_on_an_explicit_split(dataset, tmp_path):
    split = {"train": [5, 0, 3], "val": [7], "test": [1, 2]}
    options = workflow.FitOptions(
        train=TrainOptions(epochs=1, optimizer="lbfgs", learning_rate=1.0, scheduler=None,
                           verbose=False),
    )
    result = workflow.fit(dataset, str(tmp_path / "run"), options, split=split)
    assert result.split == {"train": [0, 3, 5], "val": [7], "test": [1, 2]}
    with open(os.path.join(result.run_dir, workflow.SPLIT_FILE)) as f:
        assert json.load(f) == result.split
    # the run's options name its split.json: rerunning from them uses the same split
    with open(os.path.join(result.run_dir, workflow.OPTIONS_FILE)) as f:
        recorded = yaml.safe_load(f)
    assert recorded["split_file"] == os.path.join(result.run_dir, workflow.SPLIT_FILE)
    with pytest.raises(ValueError, match="unknown subset 'validation'"):
        workflow.fit(dataset, str(tmp_path / "bad"), options, split={"train": [0], "validation": [1]})


def test_the_log_says_resuming_only_when_there_is_a_run_to_resume(dataset, tmp_path):
    """``resume=True`` on a new folder (as the example script passes) trains anew and says so."""
    options = workflow.FitOptions(n_train=4, n_val=0, n_test=2, search={"seconds": 0},
                                  train=TrainOptions(verbose=False))
    run = str(tmp_path / "run")
    for expected in ("training", "resuming"):
        workflow.fit(dataset, run, options, resume=True)
        with open(os.path.join(run, "train.log")) as f:
            banner = [line for line in f if f"rholearn {__version__} " in line][-1]
        assert f" {expected} in '{run}'" in banner
