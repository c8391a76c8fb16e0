"""Target generation on cluster engines: a dask.distributed LocalCluster and submitit's
local executor make the dataset files of the process pool, record failures the same
way, and resume; so does ``rhocalc pyscf --executor dask|submitit``."""

import functools
import io
import json
import os
import shutil

import ase
import ase.io
import metatensor
import pytest

from rholearn import layout
from rholearn.dataset import Targets
from rhocalc.batch import run_batch
from rhocalc.cli import build_parser, main
from rhocalc.cli.batch_command import executor_of
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets
from rhocalc.structures import distorted_waters

distributed = pytest.importorskip("distributed")
submitit = pytest.importorskip("submitit")

OPTIONS = PySCFOptions(xc="HF", basis="sto-3g", auxbasis="cc-pvdz-jkfit", grid_level=0)
COMPUTE = functools.partial(compute_targets, options=OPTIONS)
BASIS = basis_set(OPTIONS.auxbasis, ["H", "O"])
TIMINGS = {"scf_seconds", "fit_seconds", "diagnostics_seconds"}
"""Fields of info.json that differ from run to run."""


def structures():
    """Two waters and helium, which is not in cc-pvdz-jkfit (structure 2 fails), as read
    back from an xyz file (positions rounded as the command line reads them)."""
    text = io.StringIO()
    ase.io.write(text, distorted_waters(2, seed=3) + [ase.Atoms("He")], format="extxyz")
    return ase.io.read(io.StringIO(text.getvalue()), index=":", format="extxyz")


@pytest.fixture(scope="module")
def pool_dataset(tmp_path_factory):
    """The reference: the default process pool of two workers."""
    out = str(tmp_path_factory.mktemp("pool") / "dataset")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as dask sets it in its workers
        report = run_batch(structures(), out, COMPUTE, BASIS, n_workers=2, progress=False)
    assert (report.done, report.failed) == ([0, 1], [2])
    return out


def assert_same_dataset(expected: str, found: str) -> None:
    """Same files; same targets to 1e-12; same info.json but for the timings."""
    names = sorted(os.listdir(expected))
    assert sorted(os.listdir(found)) == names
    for name in (layout.BASIS_FILE, layout.STRUCTURES_FILE, layout.FAILURES_FILE):
        with open(os.path.join(expected, name), "rb") as a, open(os.path.join(found, name), "rb") as b:
            assert a.read() == b.read(), name
    for index in (0, 1):
        a = Targets.read(layout.structure_dir(expected, index))
        b = Targets.read(layout.structure_dir(found, index))
        for name in ("coefficients", "projections", "overlap"):
            assert metatensor.allclose(getattr(a, name), getattr(b, name), rtol=0, atol=1e-12)
        assert {k: v for k, v in a.info.items() if k not in TIMINGS} == {
            k: v for k, v in b.info.items() if k not in TIMINGS
        }
    with open(os.path.join(found, layout.FAILURES_FILE)) as f:
        failure = json.load(f)["2"]
    assert failure["structure"] == "He" and failure["error"] == "KeyError"


def assert_resumes(pool_dataset: str, out: str, executor) -> None:
    """A removed structure folder is computed again, the rest skipped, He retried."""
    shutil.rmtree(layout.structure_dir(out, 1))
    report = run_batch(structures(), out, COMPUTE, BASIS, executor=executor, progress=False)
    assert (report.done, report.skipped, report.failed) == ([1], [0], [2])
    assert_same_dataset(pool_dataset, out)


@pytest.mark.slow
def test_dask_local_cluster_makes_the_process_pool_dataset(pool_dataset, tmp_path):
    out = str(tmp_path / "dataset")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with cluster, distributed.Client(cluster) as client:
        executor = client.get_executor()
        report = run_batch(structures(), out, COMPUTE, BASIS, executor=executor, progress=False)
        assert (report.done, report.skipped, report.failed) == ([0, 1], [], [2])
        assert_same_dataset(pool_dataset, out)
        assert_resumes(pool_dataset, out, executor)

        # --scheduler: this cluster's address, or a scheduler file (its "address" is read)
        scheduler_file = str(tmp_path / "scheduler.json")
        with open(scheduler_file, "w") as f:
            json.dump({"address": cluster.scheduler_address}, f)
        workers = set(client.scheduler_info()["workers"])
        for scheduler in (cluster.scheduler_address, scheduler_file):
            args = build_parser().parse_args(
                ["pyscf", "in.xyz", "--out", out, "--executor", "dask", "--scheduler", scheduler]
            )
            with executor_of(args) as executor:
                assert executor.submit(worker_address).result() in workers


def worker_address() -> str:
    return distributed.get_worker().address


@pytest.mark.slow
def test_submitit_local_executor_makes_the_process_pool_dataset(pool_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the local jobs inherit it
    out = str(tmp_path / "dataset")
    executor = submitit.AutoExecutor(str(tmp_path / "jobs"), cluster="local")
    executor.update_parameters(timeout_min=10)
    report = run_batch(structures(), out, COMPUTE, BASIS, executor=executor, progress=False)
    assert (report.done, report.skipped, report.failed) == ([0, 1], [], [2])
    assert_same_dataset(pool_dataset, out)
    assert len(list((tmp_path / "jobs").glob("*_result.pkl"))) == 3  # one job per structure
    assert_resumes(pool_dataset, out, executor)


@pytest.mark.slow
@pytest.mark.parametrize(
    "executor_arguments",
    [["--executor", "dask", "--workers", "2"],
     ["--executor", "submitit", "--submitit-cluster", "local", "--slurm-time", "10"]],
    ids=["dask", "submitit"],
)
def test_the_command_line_executors_make_the_process_pool_dataset(
    pool_dataset, tmp_path, capsys, monkeypatch, executor_arguments
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CLI would set it in this process
    molecules = str(tmp_path / "molecules.xyz")
    ase.io.write(molecules, structures())
    out = str(tmp_path / "dataset")
    arguments = ["pyscf", molecules, "--out", out, "--xc", "HF", "--basis", "sto-3g",
                 "--auxbasis", "cc-pvdz-jkfit", "--grid-level", "0", "--quiet"]
    assert main(arguments + executor_arguments) == 0
    assert "3 structures: 2 computed, 0 already done, 1 failed" in capsys.readouterr().out
    # the CLI also writes settings.json, which run_batch without settings does not
    os.remove(os.path.join(out, "settings.json"))
    assert_same_dataset(pool_dataset, out)
    if "submitit" in executor_arguments:
        assert list(tmp_path.glob("dataset.submitit/*_result.pkl"))  # the default folder


def test_malformed_slurm_options_are_refused(tmp_path):
    arguments = ["pyscf", "in.xyz", "--out", str(tmp_path), "--executor", "submitit",
                 "--submitit-cluster", "local", "--slurm-option", "qos"]
    with pytest.raises(SystemExit, match="--slurm-option expects KEY=VALUE, got 'qos'"):
        with executor_of(build_parser().parse_args(arguments)):
            pass
