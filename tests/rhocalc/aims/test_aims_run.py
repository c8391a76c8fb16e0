"""Running aims steps: SLURM jobs, resumable datasets from finished runs, and real aims.

Without an aims binary, "finished" runs are made by writing what aims writes
(a normal end of aims.out, the density-matrix file, RI files from PySCF
targets); the tests that run aims itself skip unless $ASE_AIMS_COMMAND is set.
"""

import os
import subprocess

import ase.io
import numpy as np
import pytest
import torch

import aims_test_files
from rholearn import layout
from rholearn.data import TargetFile
from rholearn.dataset import DatasetError, Targets, exclusive_lock, read_dataset, read_failures
from rholearn.train import TrainOptions
from rholearn.workflow import FitOptions, evaluate, fit
from rholearn.rotations import random_rotation, rotate_blocks
from rhocalc.aims import AimsOptions, AimsRunError, SlurmOptions, parse_dataset, run_dataset
from rhocalc.aims import outputs, rebuild
from rhocalc.aims.run import pending_step, run_aims, step_dir
from rhocalc.cli import main

OPTIONS = AimsOptions(species_dir=aims_test_files.SPECIES_DIR)
AIMS_COMMAND = os.environ.get("ASE_AIMS_COMMAND")
needs_aims = pytest.mark.skipif(
    not AIMS_COMMAND, reason="FHI-aims is not configured: set ASE_AIMS_COMMAND to run aims"
)


@pytest.fixture
def no_aims(monkeypatch):
    monkeypatch.delenv("ASE_AIMS_COMMAND", raising=False)


@pytest.fixture
def structures(water, molecule, water_targets, molecule_targets, water_basis):
    """Two structures and the PySCF targets standing for their aims RI output."""
    return [water, molecule], [water_targets, molecule_targets], water_basis


def finish_step(runs, index, step, atoms=None, targets=None, basis=None, converged=True):
    """Write what a finished aims step leaves behind (test data, not aims output)."""
    directory = step_dir(runs, index, step)
    with open(os.path.join(directory, "aims.out"), "w") as f:
        f.write("  FHI-aims version      : 240926\n")
        if converged:
            f.write("  Self-consistency cycle converged.\n")
        f.write("  Have a nice day.\n")
    if step == "scf":
        open(os.path.join(directory, "D_spin_01_kpt_000001.csc"), "w").close()
    else:
        numbers = atoms.numbers
        aims_test_files.write_2024_run(
            directory, atoms.get_chemical_symbols(), basis,
            layout.tensormap_to_vector(targets.coefficients, numbers, basis),
            layout.tensormap_to_vector(targets.projections, numbers, basis),
            layout.pair_tensormap_to_matrix(targets.overlap, numbers, basis),
            version=None,  # aims.out written above
        )


def read_script(path):
    with open(path) as f:
        return f.read()


def test_slurm_jobs_advance_step_by_step_then_parse(tmp_path, no_aims, structures, capsys):
    atoms, targets, basis = structures
    out = str(tmp_path / "dataset")
    runs = os.path.join(out, "aims-runs")
    slurm = SlurmOptions(sbatch=("--time=01:00:00",), setup=("module load aims",))

    jobs = run_dataset(atoms, out, OPTIONS, slurm=slurm)
    assert list(jobs["scripts"]) == ["scf"] and jobs["failed"] == {}
    script = read_script(jobs["scripts"]["scf"])
    assert "#SBATCH --array=0-1" in script and "#SBATCH --time=01:00:00" in script
    assert "module load aims" in script
    for index in (0, 1):
        assert os.path.isfile(os.path.join(step_dir(runs, index, "scf"), "control.in"))
    # array task i runs in structure i's folder, the command from the node's environment
    environment = {"PATH": os.environ["PATH"], "SLURM_ARRAY_TASK_ID": "1"}
    body = script.replace("module load aims", "")
    finished = subprocess.run(["bash", "-c", body], env=dict(environment, ASE_AIMS_COMMAND="pwd"))
    assert finished.returncode == 0
    with open(os.path.join(step_dir(runs, 1, "scf"), "aims.out")) as f:
        assert f.read().strip() == os.path.realpath(step_dir(runs, 1, "scf"))
    unset = subprocess.run(["bash", "-c", body], env=environment, capture_output=True, text=True)
    assert unset.returncode != 0 and "set ASE_AIMS_COMMAND" in unset.stderr
    with pytest.raises(DatasetError, match="no finished aims RI run .* element"):
        parse_dataset(out, progress=False)

    finish_step(runs, 0, "scf")  # structure 1's SCF is still running
    jobs = run_dataset(atoms, out, OPTIONS, slurm=slurm)
    assert (pending_step(runs, 0), pending_step(runs, 1)) == ("ri", "scf")
    assert "aims-runs/0/ri" in read_script(jobs["scripts"]["ri"])
    assert "aims-runs/1/scf" in read_script(jobs["scripts"]["scf"])
    link = os.path.join(step_dir(runs, 0, "ri"), "D_spin_01_kpt_000001.csc")
    assert os.path.islink(link) and os.path.exists(link)

    finish_step(runs, 0, "ri", atoms[0], targets[0], basis)
    report = parse_dataset(out, progress=False)
    assert (report.done, report.failed) == ([0], [1])
    assert "scf step of structure 1 has not finished" in read_failures(out)[1].reason

    finish_step(runs, 1, "scf")
    run_dataset(atoms, out, OPTIONS, slurm=slurm)
    finish_step(runs, 1, "ri", atoms[1], targets[1], basis)
    assert run_dataset(atoms, out, OPTIONS, slurm=slurm)["scripts"] == {}
    assert main(["aims-parse", out, "--quiet"]) == 0
    assert "2 structures: 1 computed, 1 already done, 0 failed" in capsys.readouterr().out

    dataset = read_dataset(out)  # what rholearn trains on
    assert dataset.indices == [0, 1]
    assert dataset.basis.name == "aims-prodbas(default_prodbas_acc=1e-05)"
    for index in (0, 1):
        parsed = Targets.read(layout.structure_dir(out, index))
        numbers = atoms[index].numbers
        for name in ("coefficients", "projections"):
            assert np.allclose(
                layout.tensormap_to_vector(getattr(parsed, name), numbers, dataset.basis),
                layout.tensormap_to_vector(getattr(targets[index], name), numbers, basis),
                rtol=1e-14, atol=0,
            )
        assert parsed.info["aims_version"] == "240926" and parsed.info["system"] == index
        coefficients = TargetFile(out, layout.COEFFICIENTS_FILE, torch.float64, "cpu")(index)
        assert coefficients.block(0).samples.column("system").unique().tolist() == [index]

    # rholearn trains on the parsed aims dataset unchanged
    fit_options = FitOptions(
        n_train=1, n_val=1, n_test=0,
        train=TrainOptions(epochs=2, optimizer="lbfgs", learning_rate=1.0, scheduler=None,
                           verbose=False),
    )
    result = fit(out, str(tmp_path / "run"), fit_options)
    errors = evaluate(result.model, out, [0, 1], real_space=False, progress=False)
    assert errors["summary"]["n_structures"] == 2
    with pytest.raises(ValueError, match="real-space errors need a Gaussian basis.*aims-prodbas"):
        evaluate(result.model, out, [0], progress=False)


def test_runs_refuse_other_options_or_structures(tmp_path, no_aims, structures):
    atoms, _, _ = structures
    out = str(tmp_path / "dataset")
    run_dataset(atoms, out, OPTIONS, slurm=SlurmOptions())
    with pytest.raises(DatasetError, match="aims runs with other options"):
        run_dataset(atoms, out, AimsOptions(species_dir=OPTIONS.species_dir, xc="pbe0"),
                    slurm=SlurmOptions())
    with pytest.raises(DatasetError, match="other structures"):
        run_dataset(atoms[::-1], out, OPTIONS, slurm=SlurmOptions())


def test_unconverged_scf_is_a_failure_not_targets(tmp_path, no_aims, structures):
    atoms, targets, basis = structures
    out = str(tmp_path / "dataset")
    runs = os.path.join(out, "aims-runs")
    run_dataset(atoms, out, OPTIONS, slurm=SlurmOptions())
    finish_step(runs, 0, "scf")
    finish_step(runs, 1, "scf", converged=False)
    jobs = run_dataset(atoms, out, OPTIONS, slurm=SlurmOptions())
    assert "did not converge" in jobs["failed"][1]  # no RI job on an unconverged density
    assert "aims-runs/1/ri" not in read_script(jobs["scripts"]["ri"])

    for index in (0, 1):  # e.g. an RI job run by hand
        os.makedirs(step_dir(runs, index, "ri"), exist_ok=True)
        finish_step(runs, index, "ri", atoms[index], targets[index], basis)
    report = parse_dataset(out, progress=False)
    assert (report.done, report.failed) == ([0], [1])
    failure = read_failures(out)[1]
    assert failure.error == "AimsRunError"
    scf_output = os.path.join(step_dir(runs, 1, "scf"), "aims.out")
    assert f"SCF of structure 1 did not converge: no 'Self-consistency cycle converged.' " \
        f"in '{scf_output}'" in failure.reason
    info = Targets.read(layout.structure_dir(out, 0)).info
    assert info["converged"] is True
    assert type(info["charge"]) is int and info["charge"] == 0  # as from PySCF


def test_concurrent_run_on_the_same_folder_is_refused(tmp_path, no_aims, structures):
    """The lock covers preparing the runs (and running aims for the basis), not only the
    batch: a second run is refused before it writes anything."""
    atoms, _, _ = structures
    out = str(tmp_path / "dataset")
    os.makedirs(out)
    with exclusive_lock(out):
        with pytest.raises(DatasetError, match="another run is writing"):
            run_dataset(atoms, out, OPTIONS, slurm=SlurmOptions())
        with pytest.raises(DatasetError, match="another run is writing"):
            run_dataset(atoms, out, AimsOptions(species_dir=OPTIONS.species_dir, command="false"))
        assert os.listdir(out) == [".lock"]
    run_dataset(atoms, out, OPTIONS, slurm=SlurmOptions())
    with exclusive_lock(out):
        with pytest.raises(DatasetError, match="another run is writing"):
            parse_dataset(out, progress=False)


@pytest.mark.parametrize("content", ["{\"xc\": \"pbe\"", "{\"no_such_option\": 1}", "[]"])
def test_corrupt_options_file_is_named(tmp_path, no_aims, structures, content):
    atoms, _, _ = structures
    out = str(tmp_path / "dataset")
    run_dataset(atoms, out, OPTIONS, slurm=SlurmOptions())
    path = os.path.join(out, "aims-runs", "options.json")
    with open(path, "w") as f:
        f.write(content)
    with pytest.raises(DatasetError, match=f"cannot read '{path}'"):
        parse_dataset(out, progress=False)
    with pytest.raises(DatasetError, match=f"cannot read '{path}'"):
        run_dataset(atoms, out, OPTIONS, slurm=SlurmOptions())


def test_local_run_without_aims_is_a_clear_error(tmp_path, no_aims, structures):
    atoms, _, _ = structures
    with pytest.raises(AimsRunError, match=r"no FHI-aims command: set \$ASE_AIMS_COMMAND"):
        run_dataset(atoms, str(tmp_path / "dataset"), OPTIONS)


def test_failing_aims_names_the_run_folder(tmp_path):
    (tmp_path / "aims.out").write_text("  Invoking FHI-aims ...\n  * Error: something\n")
    with pytest.raises(AimsRunError, match=f"aims did not finish in '{tmp_path}'"):
        run_aims(str(tmp_path), "false")
    with pytest.raises(AimsRunError, match="FileNotFoundError"):
        run_aims(str(tmp_path), "/no/such/aims.x")


def test_cli(tmp_path, no_aims, structures, capsys):
    atoms, _, _ = structures
    path = str(tmp_path / "structures.xyz")
    ase.io.write(path, atoms)
    out = str(tmp_path / "dataset")
    common = [path, "--out", out, "--species-dir", aims_test_files.SPECIES_DIR, "--quiet"]

    assert main(["aims", *common]) == 2
    assert "no FHI-aims command" in capsys.readouterr().err
    assert main(["aims", *common, "--slurm", "--sbatch=--partition=debug",
                 "--command", "srun aims.x"]) == 0
    assert "sbatch " in capsys.readouterr().out
    script = read_script(os.path.join(out, "aims-runs", "slurm-scf.sh"))
    assert "#SBATCH --partition=debug" in script and "\nsrun aims.x > aims.out" in script
    assert main(["aims", *common, "--slurm", "--k-grid", "[0, 1, 1]"]) == 2
    assert "k_grid must be 3 integers >= 1" in capsys.readouterr().err
    assert main(["aims", *common, "--slurm", "-r", "k_grid=[2, 2]"]) == 2
    assert "option 'k_grid' must be a list of 3" in capsys.readouterr().err
    other = [path, "--out", str(tmp_path / "other"), *common[3:]]
    assert main(["aims", *other, "--slurm", "--command", "srun aims.x",
                 "-r", "keywords.sc_iter_limit=200"]) == 0
    assert "sc_iter_limit" in open(os.path.join(tmp_path, "other", "aims-runs", "0", "scf",
                                                "control.in")).read()
    assert main(["aims-parse", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "holds no aims runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["aims-parse", out, "--workers", "0"])
    assert "must be >= 1, got 0" in capsys.readouterr().err


def test_cli_redirection_in_aims_command_is_an_error(tmp_path, monkeypatch, structures, capsys):
    atoms, _, _ = structures
    path = str(tmp_path / "structures.xyz")
    ase.io.write(path, atoms)
    common = [path, "--out", str(tmp_path / "dataset"), "--species-dir",
              aims_test_files.SPECIES_DIR, "--quiet"]
    monkeypatch.setenv("ASE_AIMS_COMMAND", "aims.x > aims.out")
    for slurm in ([], ["--slurm"]):
        assert main(["aims", *common, *slurm]) == 2
        assert "rhocalc aims: error: $ASE_AIMS_COMMAND = 'aims.x > aims.out': drop the " \
            "redirection" in capsys.readouterr().err


# -------------------------------------------------------------- real aims ---
@needs_aims
def test_real_aims_fit_rebuild_and_rotation(tmp_path, water):
    """SCF, RI fit and rebuild of the fitted vector with aims itself: the rebuilt field
    is the RI field; and a rotated water's coefficients are the Wigner-D rotated ones."""
    species = os.environ.get("AIMS_SPECIES_DIR", aims_test_files.SPECIES_DIR)
    options = AimsOptions(species_dir=species, command=AIMS_COMMAND, max_l_prodbas=4)
    rotation = random_rotation(3)
    rotated = water.copy()
    rotated.positions = water.positions @ rotation.T
    out = str(tmp_path / "dataset")
    report = run_dataset([water, rotated], out, options, progress=False)
    assert report.failed == [], read_failures(out)
    dataset = read_dataset(out)
    first, second = (Targets.read(layout.structure_dir(out, i)) for i in (0, 1))
    assert first.info["fit_l1_error_percent"] < 5
    overlap = layout.pair_tensormap_to_matrix(first.overlap, water.numbers, dataset.basis)
    assert np.linalg.eigvalsh(overlap).min() > 0

    ri_dir = step_dir(os.path.join(out, "aims-runs"), 0, "ri")
    rebuilt = rebuild(water, str(tmp_path / "rebuild"), first.coefficients, dataset.basis,
                      options)
    _, rho_ri = outputs.read_grid_field(os.path.join(ri_dir, "rho_rebuilt_ri.out"))
    _, rho_rebuilt = outputs.read_grid_field(os.path.join(rebuilt, "rho_rebuilt_ri.out"))
    assert np.allclose(rho_rebuilt, rho_ri, rtol=1e-6, atol=1e-8 * np.abs(rho_ri).max())

    expected = rotate_blocks(first.coefficients, rotation)
    for key, block in second.coefficients.items():
        reference = expected.block(key).values
        scale = np.abs(reference).max()
        assert np.allclose(block.values, reference, rtol=0, atol=1e-3 * scale), key

