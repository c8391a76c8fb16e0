"""Direct solve in the overlap metric: it is the optimum gradient training reaches,
block-Jacobi CG agrees with the dense solve and reports when it stops unconverged,
the regularisation is chosen by cross-validation (equal to refitting without each
fold) or on validation structures, and ``workflow.fit`` uses it by default."""

import json
import math
import os

import pytest
import torch

from rholearn import data, workflow
from rholearn.dataset import read_dataset
from rholearn.loss import OverlapLoss
from rholearn.models import Baseline, DensityModel
from rholearn.solve import SolveOptions, available_memory, linear_parts, solve_linear

from small_setup import HYPERS, water_dataset, waters_and_methanes


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return read_dataset(water_dataset(str(tmp_path_factory.mktemp("waters")), 12, seed=3))


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
    record = solve_linear(solved, batches, options=SolveOptions(regularisation=0.1, solver="dense"))
    assert record["solver"] == "dense" and record["n_weights"] > 1000
    assert record["selection"] == "single" and record["converged"]
    assert record["solves"][-1]["relative_residual"] < 1e-10

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


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.net.parameters()])


@pytest.mark.parametrize("piece", [64, 4096])  # pieces of head blocks, or whole head blocks
def test_block_jacobi_conjugate_gradients_agree_with_the_dense_solve(folder, descriptors, piece):
    train_ids = folder.indices[:6]
    models, records = {}, {}
    for solver in ("dense", "cg"):
        models[solver] = make_model(folder, train_ids, "kernel", n_references=6)
        models[solver].net.fit_references(descriptors_of(descriptors, train_ids))
        records[solver] = solve_linear(
            models[solver], loaders(folder, descriptors, train_ids),
            options=SolveOptions(regularisation=1e-6, solver=solver, cg_tolerance=1e-12,
                                 preconditioner_block=piece),
        )
    solve = records["cg"]["solves"][-1]
    assert records["cg"]["converged"] and solve["converged"]
    assert 0 < solve["iterations"] < 2000 and solve["relative_residual"] < 1e-11
    expected, found = weights(models["dense"]), weights(models["cg"])
    assert float((found - expected).norm()) < 1e-8 * float(expected.norm())
    with torch.no_grad():
        batch = next(iter(loaders(folder, descriptors, folder.indices[6:], batch_size=6)))
        for key, block in models["dense"](batch.descriptor).items():
            expected = block.values
            found = models["cg"](batch.descriptor).block(key).values
            torch.testing.assert_close(found, expected, rtol=0, atol=1e-8 * expected.abs().max())


def test_unconverged_conjugate_gradients_are_reported(folder, descriptors):
    train_ids = folder.indices[:6]
    model = make_model(folder, train_ids)
    with pytest.warns(UserWarning, match="stopped unconverged"):
        record = solve_linear(model, loaders(folder, descriptors, train_ids),
                              options=SolveOptions(regularisation=1e-6, solver="cg", cg_max_iterations=3))
    assert record["converged"] is False
    assert record["solves"] == [{"fold": None, "regularisation": 1e-6, "iterations": 3,
                                 "relative_residual": record["solves"][0]["relative_residual"],
                                 "converged": False}]
    assert record["solves"][0]["relative_residual"] > 1e-3


def test_auto_solver_decides_from_the_available_memory(folder, descriptors):
    train_ids = folder.indices[:4]
    record = solve_linear(make_model(folder, train_ids), loaders(folder, descriptors, train_ids),
                          options=SolveOptions(regularisation=1e-3))
    memory = record["memory"]
    assert record["solver"] == "dense" and memory["source"] in ("psutil", "/proc/meminfo")
    assert memory["needed_bytes"] == 3 * record["n_weights"] ** 2 * 8 <= memory["allowed_bytes"]
    tiny = SolveOptions(regularisation=1e-3, memory_fraction=memory["needed_bytes"] / memory["available_bytes"] / 10)
    record = solve_linear(make_model(folder, train_ids), loaders(folder, descriptors, train_ids), options=tiny)
    assert record["solver"] == "cg" and record["converged"]


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
    with pytest.raises(FileExistsError, match="already holds a run"):
        workflow.fit(folder.root, result.run_dir, options)


def held_out_loss(model, folder, descriptors, ids):
    with torch.no_grad():
        return sum(float(OverlapLoss()(model(b.descriptor), b)) for b in loaders(folder, descriptors, ids))


@pytest.mark.parametrize("n_train, folds", [(7, 3), (4, None)])  # k-fold; leave-one-out (Woodbury)
def test_cross_validation_equals_refitting_without_each_fold(folder, descriptors, n_train, folds):
    train_ids = folder.indices[:n_train]
    grid = [1e-8, 1e-6, 1e-3, 1e-1]

    def kernel_model():
        model = make_model(folder, train_ids, "kernel", n_references=4)
        model.net.fit_references(descriptors_of(descriptors, train_ids))
        return model

    chosen = kernel_model()
    record = solve_linear(chosen, loaders(folder, descriptors, train_ids),
                          options=SolveOptions(regularisation=grid, folds=folds))
    assert record["selection"] == "cross-validation" and record["solver"] == "dense"
    expected_folds = [[i] for i in train_ids] if folds is None else [train_ids[:3], train_ids[3:5], train_ids[5:]]
    assert record["folds"] == expected_folds
    assert record["cv_method"] == ("leave-one-out" if folds is None else "k-fold")
    # brute force: solve on the other folds with the same absolute alpha, evaluate the held-out fold
    baseline_only = make_model(folder, train_ids)
    with torch.no_grad():
        for parameter in baseline_only.net.parameters():
            parameter.zero_()
    spread = held_out_loss(baseline_only, folder, descriptors, train_ids)  # sum y^T S y
    for row in record["grid"]:
        total = 0.0
        for fold in record["folds"]:
            kept = [i for i in train_ids if i not in fold]
            model = kernel_model()
            scale = solve_linear(model, loaders(folder, descriptors, kept),
                                 options=SolveOptions(regularisation=1.0))["alpha"]
            solve_linear(model, loaders(folder, descriptors, kept),
                         options=SolveOptions(regularisation=row["alpha"] / scale))
            total += held_out_loss(model, folder, descriptors, fold)
        # (to round-off of the cancelling sum theta^T H_f theta - 2 theta^T g_f + y_f^T S y_f)
        assert row["cv_loss"] * n_train == pytest.approx(total, rel=1e-8, abs=1e-10 * spread)
        assert row["cv_rmse_percent"] == pytest.approx(100 * (total / spread) ** 0.5, rel=1e-6)
    losses = [row["cv_loss"] for row in record["grid"]]
    assert len(set(losses)) == len(grid)  # the grid does matter here
    assert record["regularisation"] == grid[losses.index(min(losses))]
    # the returned weights are the solve on every training structure at the chosen strength
    refit = kernel_model()
    solve_linear(refit, loaders(folder, descriptors, train_ids),
                 options=SolveOptions(regularisation=record["regularisation"]))
    # (the folds' chunks sum H in another order: round-off, amplified at small strengths)
    assert float((weights(chosen) - weights(refit)).norm()) < 1e-6 * float(weights(refit).norm())


def test_leave_one_out_scores_a_long_grid_coarse_to_fine(folder, descriptors):
    """Every 4th strength of the default grid first, then the best's neighbours at 2 and
    1 steps: the scored losses are those of a grid of just these strengths."""
    train_ids = folder.indices[:5]
    model = make_model(folder, train_ids, "kernel", n_references=4)
    model.net.fit_references(descriptors_of(descriptors, train_ids))
    batches = list(loaders(folder, descriptors, train_ids))
    record = solve_linear(model, batches)
    assert record["cv_method"] == "leave-one-out"
    grid = [row["regularisation"] for row in record["grid"]]
    scored = [i for i, row in enumerate(record["grid"]) if not math.isnan(row["cv_loss"])]
    best = grid.index(record["regularisation"])
    assert set(range(0, len(grid), 4)) <= set(scored) and len(scored) <= 7 + 4
    assert {best - 1, best + 1} & set(range(len(grid))) <= set(scored)  # the best is a local minimum
    assert all(record["grid"][best]["cv_loss"] <= record["grid"][i]["cv_loss"] for i in scored)
    few = solve_linear(model, batches, options=SolveOptions(regularisation=[grid[i] for i in scored[:6]]))
    for row in few["grid"]:  # 6 strengths: all scored
        assert row["cv_loss"] == pytest.approx(record["grid"][grid.index(row["regularisation"])]["cv_loss"],
                                               rel=1e-10)


def test_leave_one_out_for_molecules_k_fold_for_a_few_large_structures():
    """The plan counts operations: one eigendecomposition plus ``r^2 P`` per structure and
    strength, against one eigendecomposition per fold."""
    from rholearn.solve import _cv_plan

    memory = {"allowed_bytes": 2**34}
    plan = lambda sizes, **given: _cv_plan(SolveOptions(**given), 3000, 5, sizes, 25, True, memory, 3,
                                           torch.float64, torch.device("cpu"))
    assert plan([300] * 100)[0] == "leave-one-out"  # 100 molecules of 300 functions, 3 000 weights
    assert plan([20000] * 4)[0] == "k-fold"  # 4 boxes of 20 000 functions
    assert plan([300] * 100, folds=5)[0] == "k-fold"  # asked for
    _, full, estimate = plan([300] * 100, cv_seconds=math.inf)
    method, size, seconds = plan([300] * 100, cv_seconds=estimate / 8)  # fewer leading weights
    assert full == 3000 and method == "leave-one-out" and 1 < size < full and seconds <= estimate / 8


def test_a_choice_at_the_edge_of_the_grid_is_warned_about(folder, descriptors):
    train_ids = folder.indices[:6]
    model = make_model(folder, train_ids, "kernel", n_references=4)
    model.net.fit_references(descriptors_of(descriptors, train_ids))
    with pytest.warns(UserWarning, match="smallest value of the grid"):
        record = solve_linear(model, loaders(folder, descriptors, train_ids),
                              options=SolveOptions(regularisation=[10.0, 100.0]))
    assert record["regularisation"] == 10.0 and record["edge"] == "smallest"


def test_cross_validation_keeps_to_its_time_budget(folder, descriptors):
    train_ids = folder.indices[:4]
    model = make_model(folder, train_ids, "kernel", n_references=4)
    model.net.fit_references(descriptors_of(descriptors, train_ids))
    batches = list(loaders(folder, descriptors, train_ids))
    grid = [1e-6, 1e-3, 1e-1]
    full = solve_linear(model, batches, options=SolveOptions(regularisation=grid, folds=4))
    record = solve_linear(model, batches, options=SolveOptions(regularisation=grid, folds=4, cv_seconds=0))
    assert (full["folds_scored"], record["folds_scored"]) == (4, 1)  # 4 folds, then the first only
    assert record["cv_method"] == "k-fold"
    assert record["cv_weights"] < full["cv_weights"] == full["n_weights"]  # the fewest weights
    # fold 0's held-out loss is the same in both; the full run averages over the 4
    assert record["grid"][0]["cv_loss"] != full["grid"][0]["cv_loss"]


def test_cross_validation_beyond_the_budget_scores_the_leading_features(folder, descriptors):
    """Without room for every weight (matrix-free solver, memory for a third of them), the
    folds are scored on the leading features of every block; all weights are then solved
    with the chosen strength."""
    train_ids = folder.indices[:4]
    model = make_model(folder, train_ids, "kernel", n_references=4)
    model.net.fit_references(descriptors_of(descriptors, train_ids))
    batches = list(loaders(folder, descriptors, train_ids))
    grid = [1e-6, 1e-3, 1e-1]
    full = solve_linear(model, batches, options=SolveOptions(regularisation=grid))
    n_weights = full["n_weights"]
    available, _ = available_memory(torch.device("cpu"))
    fraction = 3 * (n_weights // 3) ** 2 * 8 / available  # three dense copies of P/3 weights
    record = solve_linear(model, batches, options=SolveOptions(
        regularisation=grid, solver="cg", memory_fraction=fraction))
    assert record["solver"] == "cg" and record["selection"] == "cross-validation"
    assert 0 < record["cv_weights"] <= n_weights // 3 + 1 and record["folds_scored"] == 4
    best = min(record["grid"], key=lambda row: row["cv_loss"])
    assert record["regularisation"] == best["regularisation"] and record["converged"]
    # a different (smaller) model was cross-validated: other held-out losses
    assert all(a["cv_loss"] != b["cv_loss"] for a, b in zip(record["grid"], full["grid"]))
    # with room for every weight, the matrix-free solver cross-validates the same problem
    same = solve_linear(model, batches, options=SolveOptions(regularisation=grid, solver="cg"))
    assert same["cv_weights"] == n_weights
    for a, b in zip(same["grid"], full["grid"]):
        assert a["cv_loss"] == pytest.approx(b["cv_loss"], rel=1e-8)


def test_fit_without_validation_structures_cross_validates(folder, tmp_path):
    options = workflow.FitOptions(hypers=HYPERS, n_train=8, n_val=0, n_test=4)
    result = workflow.fit(folder.root, str(tmp_path / "run"), options)
    with open(os.path.join(result.run_dir, workflow.SOLVE_FILE)) as f:
        record = json.load(f)
    assert record["selection"] == "cross-validation" and record["converged"]
    train = sorted(result.split["train"])  # small waters: leave-one-structure-out is cheapest
    assert record["cv_method"] == "leave-one-out" and record["folds"] == [[i] for i in train]
    assert len(record["grid"]) == len(SolveOptions().grid())
    best = min((row for row in record["grid"] if not math.isnan(row["cv_loss"])),
               key=lambda row: row["cv_loss"])
    assert record["regularisation"] == best["regularisation"]
    with open(os.path.join(result.run_dir, "train.log")) as f:
        log = f.read()
    assert f"regularisation {record['regularisation']:g} chosen by leave-one-structure-out" in log
    assert f"CV RMSE {best['cv_rmse_percent']:.3g} %" in log
    # the references per element, every training atom here (8 waters: 8 O, 16 H)
    assert record["references"] == {"H": 16, "O": 8}
    assert "kernel references per element (reference_counts): H 16, O 8" in log


def test_the_log_says_when_cross_validation_ran_on_the_leading_features(folder, tmp_path):
    available, _ = available_memory(torch.device("cpu"))
    fraction = 3 * 100**2 * 8 / available  # dense room for about 100 weights: CG, CV on fewer
    options = workflow.FitOptions(hypers=HYPERS, n_train=6, n_val=0, n_test=2,
                                  solve=SolveOptions(solver="cg", memory_fraction=fraction))
    result = workflow.fit(folder.root, str(tmp_path / "run"), options)
    with open(os.path.join(result.run_dir, workflow.SOLVE_FILE)) as f:
        record = json.load(f)
    assert record["solver"] == "cg" and record["converged"]
    assert 0 < record["cv_weights"] <= 101 < record["n_weights"]
    with open(os.path.join(result.run_dir, "train.log")) as f:
        assert f"on the leading {record['cv_weights']} weights, to fit solve.cv_seconds" in f.read()


def test_cross_validation_over_structures_with_different_elements(tmp_path):
    """Folds cut batches of waters and methanes: a fold's share lacks some elements."""
    mixed = read_dataset(waters_and_methanes(str(tmp_path / "mixed"), 4, 2, 0.05))
    descriptors = DensityModel(mixed.basis, HYPERS).descriptor.compute(mixed.frames, mixed.indices)
    model = make_model(mixed, mixed.indices, "kernel", n_references=2)
    model.net.fit_references(descriptors)
    record = solve_linear(model, loaders(mixed, descriptors, mixed.indices, batch_size=4),
                          options=SolveOptions(regularisation=[1e-6, 1e-3, 1e-1]))
    assert record["selection"] == "cross-validation" and record["folds_scored"] == 4
    assert all(row["cv_loss"] > 0 for row in record["grid"])


def test_one_training_structure_falls_back_instead_of_cross_validating(folder, descriptors):
    train_ids = folder.indices[:1]  # no fold to hold out: every strength would score alike
    model = make_model(folder, train_ids, "kernel", n_references=4)
    model.net.fit_references(descriptors_of(descriptors, train_ids))
    with pytest.warns(UserWarning, match="it needs 2 training structures or more"):
        record = solve_linear(model, loaders(folder, descriptors, train_ids), options=SolveOptions(
            regularisation=[1e-6, 1e-3], fallback_regularisation=1e-3))
    assert record["selection"] == "fallback" and record["regularisation"] == 1e-3
