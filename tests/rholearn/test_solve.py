"""Direct solve in the overlap metric: it is the optimum gradient training reaches,
CG agrees with Cholesky, the regularisation is chosen on validation structures,
and ``workflow.fit`` uses it by default."""

import functools
import json
import os

import pytest
import torch

from rholearn import data, workflow
from rholearn.dataset import read_dataset
from rholearn.loss import OverlapLoss
from rholearn.models import Baseline, DensityModel
from rholearn.solve import SolveOptions, linear_parts, solve_linear
from rhocalc.batch import run_batch
from rhocalc.pyscf import basis_set, compute_targets
from rhocalc.structures import distorted_waters

from small_setup import HYPERS, OPTIONS


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("waters"))
    compute = functools.partial(compute_targets, options=OPTIONS)
    run_batch(distorted_waters(12, seed=3), root, compute, basis_set(OPTIONS.auxbasis, ["H", "O"]),
              progress=False)
    return read_dataset(root)


@pytest.fixture(scope="module")
def descriptors(folder):
    return DensityModel(folder.basis, HYPERS).descriptor.compute(folder.frames, folder.indices)


def loaders(folder, descriptors, ids, batch_size=3):
    dataset = data.make_dataset(folder, ids, descriptors, targets=["coefficients", "overlap"])
    return data.make_dataloader(dataset, batch_size)


def make_model(folder, ids, kind="linear", **options):
    coefficients = data.TargetFile(folder.root, "coefficients.mts", torch.float64, torch.device("cpu"))
    baseline = Baseline.from_coefficients(coefficients(i) for i in ids)
    return DensityModel(folder.basis, HYPERS, kind, baseline, **options)


def objective(model, batches, alpha):
    """Overlap loss summed over the structures plus alpha |weights|^2 (every parameter)."""
    loss = sum(OverlapLoss()(model(batch.descriptor), batch) for batch in batches)
    return loss + alpha * sum((p ** 2).sum() for p in model.net.parameters())


def test_direct_solve_is_the_optimum_of_gradient_training(folder, descriptors):
    train_ids = folder.indices[:6]
    batches = list(loaders(folder, descriptors, train_ids))
    solved = make_model(folder, train_ids)
    record = solve_linear(solved, batches, options=SolveOptions(regularisation=0.1, solver="cholesky"))
    assert record["solver"] == "cholesky" and record["n_weights"] > 1000

    trained = make_model(folder, train_ids)
    optimizer = torch.optim.LBFGS(trained.net.parameters(), lr=1.0, max_iter=200,
                                  tolerance_grad=1e-14, tolerance_change=1e-16,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = objective(trained, batches, record["alpha"])
        value.backward()
        return value

    optimizer.step(closure)
    with torch.no_grad():
        optimum = float(objective(solved, batches, record["alpha"]))
        reached = float(objective(trained, batches, record["alpha"]))
    # the solve is the minimum: gradient descent gets down to it, never below
    assert reached >= optimum * (1 - 1e-10)
    assert reached == pytest.approx(optimum, rel=1e-7)
    expected = torch.cat([p.detach().flatten() for p in solved.net.parameters()])
    found = torch.cat([p.detach().flatten() for p in trained.net.parameters()])
    assert float((found - expected).norm()) < 1e-3 * float(expected.norm())
    # the recorded training loss is the overlap loss of the solved weights
    with torch.no_grad():
        loss = sum(float(OverlapLoss()(solved(b.descriptor), b)) for b in batches)
    assert record["grid"][0]["train_loss"] * len(train_ids) == pytest.approx(loss, rel=1e-8)


def test_conjugate_gradients_agree_with_cholesky(folder, descriptors):
    train_ids = folder.indices[:6]
    models, records = {}, {}
    for solver in ("cholesky", "cg"):
        models[solver] = make_model(folder, train_ids)
        records[solver] = solve_linear(
            models[solver], loaders(folder, descriptors, train_ids),
            options=SolveOptions(regularisation=1e-2, solver=solver, cg_tolerance=1e-10),
        )
    assert 0 < records["cg"]["cg_iterations"] < 2000
    with torch.no_grad():
        batch = next(iter(loaders(folder, descriptors, folder.indices[6:], batch_size=6)))
        for key, block in models["cholesky"](batch.descriptor).items():
            expected = block.values
            found = models["cg"](batch.descriptor).block(key).values
            torch.testing.assert_close(found, expected, rtol=0, atol=1e-6 * expected.abs().max())


def test_regularisation_is_chosen_on_the_validation_structures(folder, descriptors):
    train_ids, val_ids = folder.indices[:5], folder.indices[5:9]
    grid = [1e-9, 1e-6, 1e-3, 1e-1]
    chosen = make_model(folder, train_ids, "kernel", n_references=4)
    chosen.net.fit_references(descriptors_of(descriptors, train_ids))
    record = solve_linear(chosen, loaders(folder, descriptors, train_ids),
                          loaders(folder, descriptors, val_ids), SolveOptions(regularisation=grid))
    assert [row["regularisation"] for row in record["grid"]] == sorted(grid)
    # solve each strength alone and measure the validation loss with the loss module
    val_losses = []
    for regularisation in sorted(grid):
        model = make_model(folder, train_ids, "kernel", n_references=4)
        model.net.fit_references(descriptors_of(descriptors, train_ids))
        solve_linear(model, loaders(folder, descriptors, train_ids),
                     options=SolveOptions(regularisation=regularisation))
        with torch.no_grad():
            val_losses.append(sum(
                float(OverlapLoss()(model(b.descriptor), b)) for b in loaders(folder, descriptors, val_ids)
            ) / len(val_ids))
    recorded = [row["val_loss"] for row in record["grid"]]
    assert recorded == pytest.approx(val_losses, rel=1e-8)
    assert len(set(recorded)) == len(grid)  # the grid does matter here
    best = min(range(len(grid)), key=val_losses.__getitem__)
    assert record["regularisation"] == sorted(grid)[best]


def descriptors_of(descriptors, ids):
    import metatensor.torch as mts

    selection = mts.Labels(["system"], torch.tensor([[i] for i in ids], dtype=torch.int32))
    return mts.slice(descriptors, "samples", selection)


def test_nets_that_are_not_linear_are_refused(folder):
    model = DensityModel(folder.basis, HYPERS, "nonlinear")
    with pytest.raises(TypeError, match="not linear in its weights"):
        linear_parts(model.net)
    with pytest.raises(ValueError, match="use solver='gradient'"):
        workflow.FitOptions(model="nonlinear")
    with pytest.raises(ValueError, match="solver must be one of"):
        SolveOptions(solver="lu")


def test_fit_with_default_options_solves_the_kernel_model(folder, tmp_path):
    options = workflow.FitOptions(hypers=HYPERS, n_train=7, n_val=2, n_test=3)
    assert (options.model, options.solver) == ("kernel", "direct")
    result = workflow.fit(folder.root, str(tmp_path / "run"), options)
    with open(os.path.join(result.run_dir, workflow.SOLVE_FILE)) as f:
        record = json.load(f)
    assert record["n_train"] == 7 and record["n_val"] == 2
    assert len(record["grid"]) == len(SolveOptions().grid())
    best = min(record["grid"], key=lambda row: row["val_loss"])
    assert record["regularisation"] == best["regularisation"]
    errors = workflow.evaluate(result.model, folder.root, result.split["test"], real_space=False,
                               progress=False)
    assert errors["summary"]["rmse_percent"] < 50.0  # far better than the baseline alone
    reloaded = DensityModel.load(os.path.join(result.run_dir, workflow.MODEL_FILE))
    frames = [folder.frames[i] for i in result.split["test"]]
    for key, block in result.model.predict(frames).items():
        torch.testing.assert_close(reloaded.predict(frames).block(key).values, block.values,
                                   rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="already holds a solved model"):
        workflow.fit(folder.root, result.run_dir, options)
