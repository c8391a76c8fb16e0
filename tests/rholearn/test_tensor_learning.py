"""Dipoles and polarisabilities learned as sums of per-atom equivariant contributions
(rholearn.kinds, rholearn.reduction): fit, evaluate, predict, rotate, refuse."""

import json
import os
import shutil

import metatensor.torch as mts
import numpy as np
import pytest
import torch

from rholearn import layout, tensors, workflow
from rholearn.data import (TARGET_FILES, StructureDescriptors, TargetFile, make_dataloader,
                           make_dataset)
from rholearn.dataset import read_dataset
from rholearn.kinds import KINDS
from rholearn.models import DensityModel
from rholearn.overlap import SparseOverlap
from rholearn.reduction import atom_targets, make_tensor_dataset, sum_metric
from rholearn.rotations import random_rotation
from rholearn.solve import SolveOptions, solve_linear

from small_setup import HYPERS, tensor_waters

TARGETS = ("dipole", "polarizability")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tensor_waters(str(tmp_path_factory.mktemp("tensors") / "waters"), 8)


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """A kernel model of each tensor fitted on 6 waters at a small fixed regularisation."""
    root = tmp_path_factory.mktemp("runs")
    return {
        target: workflow.fit(dataset, str(root / target), workflow.FitOptions(
            target=target, hypers=HYPERS, model_options={"n_references": 10},
            solve={"regularisation": 1e-10}, train={"verbose": False},
        ), split={"train": list(range(6)), "test": [6, 7]})
        for target in TARGETS
    }


@pytest.mark.parametrize("target", TARGETS)
def test_fit_reproduces_the_training_tensors(runs, dataset, target, tmp_path):
    result = runs[target]
    errors = workflow.evaluate(result.model, dataset, result.split["train"], progress=False,
                               out=str(tmp_path / "evaluation"))
    assert errors["summary"]["rmse_percent"] < 0.1
    assert os.path.isfile(tmp_path / "evaluation" / "parity.png")
    row = errors["structures"][0]
    with open(os.path.join(dataset, str(row["index"]), "info.json")) as f:
        cartesian = np.array(json.load(f)[f"{target}_au"])
    np.testing.assert_allclose(row["reference_au"], cartesian, atol=1e-10)
    np.testing.assert_allclose(row["predicted_au"], cartesian, atol=1e-3 * np.abs(cartesian).max())
    test = workflow.evaluate(result.model, dataset, result.split["test"], progress=False)
    assert 0 < test["summary"]["rmse_percent"] < 100  # learned something beyond the baseline


@pytest.mark.parametrize("target", TARGETS)
def test_saved_model_predicts_cartesian_tensors_in_atomic_units(runs, dataset, target, tmp_path):
    result = runs[target]
    model = DensityModel.load(os.path.join(result.run_dir, workflow.MODEL_FILE))
    assert model.target == target
    frames = read_dataset(dataset).frames[6:8]
    expected = tensors.tensormap_to_cartesian(result.model.predict(frames))
    folders = workflow.predict(model, frames, str(tmp_path / "predictions"), progress=False)
    for folder, values in zip(folders, expected):
        with open(os.path.join(folder, workflow.PREDICTION_INFO_FILE)) as f:
            np.testing.assert_allclose(json.load(f)[f"{target}_au"], values, atol=1e-12)
        assert os.path.isfile(os.path.join(folder, f"{target}.mts"))


@pytest.mark.parametrize("target", TARGETS)
def test_predicted_tensors_rotate_with_the_molecule(runs, dataset, target):
    model = runs[target].model
    atoms = read_dataset(dataset).frames[7]
    rotated = atoms.copy()
    rotation = random_rotation(11)
    rotated.positions = atoms.positions @ rotation.T
    rotated.positions += np.array([0.3, -1.2, 2.0])  # and a translation
    original, turned = tensors.tensormap_to_cartesian(model.predict([atoms, rotated]))
    expected = rotation @ original if target == "dipole" else rotation @ original @ rotation.T
    assert np.abs(original).max() > 0.1
    np.testing.assert_allclose(turned, expected, rtol=0, atol=1e-10)


def test_the_sum_metric_and_atom_targets_give_the_structure_loss(dataset):
    """t^T M t = |y|^2 and R t = y, so the overlap loss in M is the squared tensor error."""
    folder = read_dataset(dataset)
    kind = KINDS["polarizability"]
    numbers = folder.frames[3].numbers
    y = mts.load(os.path.join(dataset, "3", "polarizability.mts")).to(dtype=torch.float64)
    t = atom_targets(y, numbers, 3, kind.output_basis(folder.basis.elements))
    metric = sum_metric(numbers, 3, kind.lambdas, torch.float64)
    norm = SparseOverlap(metric, t).quadratic(t)
    expected = sum(float((block.values ** 2).sum()) for block in y.blocks())
    assert float(norm[0]) == pytest.approx(expected, rel=1e-12)
    summed = {l: sum(float(block.values.sum()) for key, block in t.items()
                     if int(key["o3_lambda"]) == l) for l in kind.lambdas}
    assert summed == pytest.approx({l: float(y.block({"o3_lambda": l}).values.sum())
                                    for l in kind.lambdas})


def test_fit_refuses_a_dataset_without_the_tensor_files(dataset, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(dataset, copy)
    os.remove(os.path.join(copy, "2", "dipole.mts"))
    with pytest.raises(ValueError, match=r"structure 2 of .* has no 'dipole.mts'.*--properties dipole"):
        workflow.fit(copy, str(tmp_path / "run"), workflow.FitOptions(target="dipole", hypers=HYPERS),
                     split={"train": [0, 1, 2], "test": [3]})
    assert not os.path.exists(tmp_path / "run" / workflow.MODEL_FILE)


def test_tensor_files_are_dataset_fields_checked_per_structure(dataset, tmp_path):
    sample = make_dataset(read_dataset(dataset), [1], targets=TARGETS)[0]
    with open(os.path.join(dataset, "1", "info.json")) as f:
        info = json.load(f)
    np.testing.assert_allclose(sample.dipole.block({"o3_lambda": 1}).values.reshape(3).numpy(),
                               tensors.vector_to_spherical(info["dipole_au"]), atol=1e-12)
    assert sorted(int(key["o3_lambda"]) for key in sample.polarizability.keys) == [0, 2]
    copy = str(tmp_path / "copy")
    shutil.copytree(dataset, copy)  # a dipole file without the structure's value
    layout.save(os.path.join(copy, "0", "dipole.mts"),
                tensors.cartesian_to_tensormap(np.zeros((0, 3)), []))
    with pytest.raises(ValueError, match=r"structure 0: '.*dipole.mts'.* holds 0 samples"):
        TargetFile(copy, TARGET_FILES["dipole"], torch.float64, torch.device("cpu"),
                   read_dataset(copy))(0)


def test_tensor_targets_need_the_direct_solver():
    with pytest.raises(ValueError, match="target 'dipole' is learned with solver='direct'"):
        workflow.FitOptions(target="dipole", solver="gradient", model="linear")
    with pytest.raises(ValueError, match="unknown target 'quadrupole'"):
        workflow.FitOptions(target="quadrupole")


def test_direct_solve_equals_explicit_ridge_least_squares(runs, dataset):
    """The solve in the metric R^T R gives the ridge optimum of the structures' tensors,
    formed here explicitly: A[:, k] = R Phi e_k for every head weight k."""
    folder = read_dataset(dataset)
    model = DensityModel.load(os.path.join(runs["polarizability"].run_dir, workflow.MODEL_FILE))
    train = [0, 1, 2, 3, 4]
    data = make_tensor_dataset(folder, KINDS["polarizability"], model.basis, train,
                               StructureDescriptors(model.descriptor, folder.frames))
    record = solve_linear(model, make_dataloader(data, 2), None, SolveOptions(regularisation=1e-6))
    solved = torch.nn.utils.parameters_to_vector(model.net.head.parameters()).detach().clone()

    descriptor = model.descriptor.compute([folder.frames[i] for i in train], train)
    parameters = list(model.net.head.parameters())

    def output(theta):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta, parameters)
            return torch.cat([block.values.reshape(-1) for block in model(descriptor).blocks()])

    base = output(torch.zeros_like(solved))  # the baseline alone
    design = torch.stack([output(column) - base for column in torch.eye(len(solved),
                                                                         dtype=solved.dtype)], 1)
    references = [mts.load(os.path.join(dataset, str(i), "polarizability.mts")) for i in train]
    y = torch.cat([torch.cat([torch.as_tensor(r.block({"o3_lambda": l}).values[:, :, 0]).reshape(-1)
                              for r in references]) for l in (0, 2)]).to(solved.dtype)
    normal = design.T @ design + record["alpha"] * torch.eye(len(solved), dtype=solved.dtype)
    explicit = torch.linalg.solve(normal, design.T @ (y - base))
    active = design.abs().sum(dim=0) > 0  # weights on zero features stay zero in both
    assert int(active.sum()) == record["n_weights"]
    np.testing.assert_allclose(solved[active], explicit[active], rtol=0,
                               atol=1e-8 * float(explicit.abs().max()))
    np.testing.assert_allclose(output(solved), output(explicit), rtol=0, atol=1e-9)


@pytest.mark.parametrize("target", TARGETS)
def test_exported_model_computes_the_tensor_per_system(runs, dataset, target, tmp_path):
    from metatomic.torch import (ModelEvaluationOptions, ModelOutput, load_atomistic_model,
                                 systems_to_torch)
    from vesin.metatomic import neighbor_lists_for_model

    from rholearn.export import TENSOR_UNITS, export_atomistic

    model = runs[target].model
    out = str(tmp_path / "model.pt")
    export_atomistic(model, out, extensions=str(tmp_path / "extensions"))
    loaded = load_atomistic_model(out, extensions_directory=str(tmp_path / "extensions"))
    name = f"rholearn::{target}"
    assert loaded.capabilities().outputs[name].unit == TENSOR_UNITS[target]
    frames = read_dataset(dataset).frames[5:8]
    systems = systems_to_torch(frames, dtype=torch.float64)
    for calculator in neighbor_lists_for_model("angstrom", loaded):
        calculator.add_neighbor_list(systems)
    options = ModelEvaluationOptions(length_unit="angstrom",
                                     outputs={name: ModelOutput(sample_kind="system")})
    exported = loaded(systems, options, check_consistency=True)[name]
    np.testing.assert_allclose(tensors.tensormap_to_cartesian(exported),
                               tensors.tensormap_to_cartesian(model.predict(frames)), atol=1e-12)


def test_command_line_trains_evaluates_and_predicts_a_dipole_model(dataset, tmp_path, capsys):
    import ase.io

    from rholearn import cli

    run = str(tmp_path / "run")
    assert cli.main(["train", dataset, "--run", run, "--target", "dipole", "--n-train", "6",
                     "--n-val", "0", "--hypers", json.dumps(HYPERS), "--no-train.verbose"]) == 0
    assert cli.main(["evaluate", run, "--subset", "test"]) == 0
    assert "rmse_percent_lambda_1" in capsys.readouterr().out
    structures = str(tmp_path / "new.xyz")
    ase.io.write(structures, read_dataset(dataset).frames[:2])
    assert cli.main(["predict", run, structures]) == 0
    printed = capsys.readouterr().out
    model = DensityModel.load(os.path.join(run, workflow.MODEL_FILE))
    first = tensors.tensormap_to_cartesian(model.predict(read_dataset(dataset).frames[:1]))[0]
    line = next(line for line in printed.splitlines() if line.startswith("0: dipole (a.u.) "))
    np.testing.assert_allclose(json.loads(line.split("(a.u.) ")[1]), first, atol=1e-12)
