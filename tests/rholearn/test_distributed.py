"""Fitting across processes: ``torchrun --nproc_per_node 2`` (gloo, CPU) of ``rholearn
train`` gives the run of one process, for gradient training (the same loss curve,
also across a resume) and for the direct solve (the same weights to 1e-10)."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from rholearn import workflow
from rholearn.distributed import ShardedBatchSampler, _environment
from rholearn.models import DensityModel
from rholearn.options import to_dict, write_yaml
from rholearn.solve import SolveOptions
from rholearn.train import TrainOptions

from small_setup import HYPERS, waters_and_methanes

ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Ten rattled waters and methanes."""
    return waters_and_methanes(str(tmp_path_factory.mktemp("dataset")), 10, 3, 0.1)


def rholearn_train(dataset, run_dir, options, processes, *flags):
    """``rholearn train OPTIONS.yaml`` in one process, or under ``torchrun``."""
    path = f"{run_dir}.yaml"
    write_yaml(path, {"dataset": dataset, "run": run_dir, **to_dict(options)})
    command = [sys.executable, "-m", "rholearn.cli", "train", path, *flags]
    if processes > 1:
        command[1:3] = ["-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={processes}", "-m", "rholearn.cli"]
    result = subprocess.run(command, capture_output=True, text=True, env=ENVIRONMENT,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def epochs(run_dir):
    with open(os.path.join(run_dir, "log.csv")) as f:
        return list(csv.DictReader(f))


def weights(run_dir):
    return DensityModel.load(os.path.join(run_dir, "model.pt")).state_dict()


def assert_same_weights(state, reference, tolerance):
    assert state.keys() == reference.keys()
    tensors = [name for name, value in reference.items() if isinstance(value, torch.Tensor)]
    assert tensors
    for name in tensors:
        torch.testing.assert_close(state[name], reference[name], rtol=tolerance, atol=tolerance,
                                   msg=name)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_two_processes_train_as_one_and_resume_exactly(dataset, tmp_path, optimizer):
    # 7 training structures in batches of 3: the second process's share of the
    # last batch is empty; 3 validation structures are shared 2 + 1
    options = workflow.FitOptions(
        model="linear", solver="gradient", hypers=HYPERS, n_train=7, n_val=3, n_test=0,
        descriptor="stock",
        train=TrainOptions(epochs=4, batch_size=3, optimizer=optimizer, learning_rate=0.05,
                           lbfgs_max_iter=3, checkpoint_every=2, verbose=False),
    )
    one = str(tmp_path / "one")
    rholearn_train(dataset, one, options, 1)
    two = str(tmp_path / "two")  # stopped after 2 epochs, resumed to 4
    stopped = dataclasses.replace(options, train=dataclasses.replace(options.train, epochs=2))
    rholearn_train(dataset, two, stopped, 2)
    assert len(epochs(two)) == 2
    result = rholearn_train(dataset, two, options, 2, "--resume")
    assert result.stdout.count("trained on") == 1  # printed by process 0 only

    reference, distributed = epochs(one), epochs(two)
    assert [row["epoch"] for row in distributed] == ["1", "2", "3", "4"]
    for row, expected in zip(distributed, reference):
        for column in ("train_loss", "val_loss", "val_rmse_percent", "learning_rate"):
            assert float(row[column]) == pytest.approx(float(expected[column]), rel=1e-9), column
    assert float(reference[-1]["train_loss"]) < float(reference[0]["train_loss"])
    assert_same_weights(weights(two), weights(one), 1e-8)
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # one process wrote the run


@pytest.mark.parametrize("n_val", [0, 1, 2])
def test_two_processes_solve_as_one(dataset, tmp_path, n_val):
    """Cross-validated (leave-one-structure-out over 8 structures) or chosen on validation
    structures (with 1, one process has none); the kernel model fits its references from
    every training structure."""
    options = workflow.FitOptions(hypers=HYPERS, n_train=8, n_val=n_val, n_test=10 - 8 - n_val,
                                  solve=SolveOptions(regularisation=[1e-8, 1e-5, 1e-2],
                                                     batch_size=1))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    rholearn_train(dataset, one, options, 1)
    rholearn_train(dataset, two, options, 2)
    assert_same_weights(weights(two), weights(one), 1e-10)
    records = []
    for run_dir in (one, two):
        with open(os.path.join(run_dir, "solve.json")) as f:
            records.append(json.load(f))
    for name in ("n_train", "n_val", "selection", "folds", "regularisation"):
        assert records[1][name] == records[0][name], name
    for row, expected in zip(records[1]["grid"], records[0]["grid"]):
        for column, tolerance in (("cv_loss", 1e-6), ("val_loss", 1e-8)):
            # (leave-one-out at strength 1e-8 amplifies the round-off of H summed in another order)
            assert row[column] == pytest.approx(expected[column], rel=tolerance, nan_ok=True)


def test_the_shares_of_the_processes_make_the_batches_of_one(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    batches = list(torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(range(7), generator=generator), 3, drop_last=False))
    shares = {}
    for rank in (0, 1):
        monkeypatch.setattr("rholearn.distributed.rank", lambda: rank)
        monkeypatch.setattr("rholearn.distributed.world_size", lambda: 2)
        generator = torch.Generator().manual_seed(3)
        shares[rank] = list(ShardedBatchSampler(7, 3, True, generator))
    assert [sorted(a + b) for a, b in zip(shares[0], shares[1])] == [sorted(b) for b in batches]
    assert [len(share) for share in shares[1]] == [1, 1, 0]  # the last batch: 1 structure


def test_the_processes_are_read_from_torchrun_or_srun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert _environment() == (0, 1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "8")  # a batch script: the allocation, no launch
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert _environment() == (0, 1, 0)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # a task started by srun -n 4
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert _environment() == (3, 4, 1)
    monkeypatch.setenv("RANK", "1")  # torchrun (also under srun) wins
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _environment() == (1, 2, 0)
