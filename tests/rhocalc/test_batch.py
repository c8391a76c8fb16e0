"""The resumable batch driver, run with the PySCF backend on small molecules."""

import concurrent.futures
import fcntl
import functools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import ase.build
import ase.io
import metatensor
import numpy as np
import pytest

from rholearn import layout
from rholearn.basis import BasisSet
from rholearn.dataset import DatasetError, Targets, read_failures, read_structures
from rhocalc.batch import run_batch
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets
from rhocalc.structures import distorted_waters

# Hartree-Fock in minimal bases: the SCF costs a fraction of a second
OPTIONS = PySCFOptions(xc="HF", basis="sto-3g", auxbasis="cc-pvdz-jkfit", grid_level=0)
COMPUTE = functools.partial(compute_targets, options=OPTIONS)
MOLECULES = ["H2O", "NH3", "CH4"]
BASIS = basis_set(OPTIONS.auxbasis, ["H", "C", "N", "O"])


def molecules():
    return [ase.build.molecule(name) for name in MOLECULES]


def dataset_files(out):
    """Relative path -> (bytes, mtime) of every file of a dataset, lock file aside."""
    files = {}
    for folder, _, names in os.walk(out):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, out)] = (f.read(), os.stat(path).st_mtime_ns)
    files.pop(".lock")
    return files


def assert_same_targets(out_a, out_b, index):
    a = Targets.read(layout.structure_dir(out_a, index))
    b = Targets.read(layout.structure_dir(out_b, index))
    for name in ("coefficients", "projections", "overlap"):
        # threads may change the last digits of the SCF, nothing else
        assert metatensor.allclose(getattr(a, name), getattr(b, name), rtol=0, atol=1e-9)
    assert a.info["energy_hartree"] == pytest.approx(b.info["energy_hartree"], abs=1e-10)


@pytest.fixture(scope="module")
def serial_dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serial") / "dataset")
    report = run_batch(molecules(), out, COMPUTE, BASIS, progress=False)
    return out, report


def test_writes_the_dataset_layout(serial_dataset):
    out, report = serial_dataset
    assert (report.done, report.skipped, report.failed) == ([0, 1, 2], [], [])
    assert BasisSet.load(os.path.join(out, layout.BASIS_FILE)) == BASIS
    written = read_structures(os.path.join(out, layout.STRUCTURES_FILE))
    for atoms, expected in zip(written, molecules(), strict=True):
        assert atoms.get_chemical_formula() == expected.get_chemical_formula()
        np.testing.assert_allclose(atoms.positions, expected.positions, atol=1e-8)
    for index, atoms in enumerate(molecules()):
        targets = Targets.read(layout.structure_dir(out, index))
        vector = layout.tensormap_to_vector(targets.coefficients, atoms.numbers, BASIS)
        assert np.isfinite(vector).all()
        systems = targets.coefficients.block(0).samples.column("system")
        assert set(systems.tolist()) == {index}
        assert targets.info["formula"] == atoms.get_chemical_formula()
    assert not os.path.exists(os.path.join(out, layout.FAILURES_FILE))
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]


def test_rerun_skips_everything_and_changes_no_file(serial_dataset):
    out, _ = serial_dataset
    before = dataset_files(out)
    report = run_batch(molecules(), out, COMPUTE, BASIS, progress=False)
    assert (report.done, report.skipped, report.failed) == ([], [0, 1, 2], [])
    assert dataset_files(out) == before


def test_refuses_other_structures_or_basis(serial_dataset):
    out, _ = serial_dataset
    before = dataset_files(out)
    with pytest.raises(DatasetError, match="structures.xyz.*structure 0 is H2O there"):
        run_batch(molecules()[::-1], out, COMPUTE, BASIS, progress=False)
    with pytest.raises(DatasetError, match="3 structures there, 2 requested"):
        run_batch(molecules()[:2], out, COMPUTE, BASIS, progress=False)
    moved = molecules()
    moved[1].positions[0, 0] += 1e-3
    with pytest.raises(DatasetError, match="structure 1"):
        run_batch(moved, out, COMPUTE, BASIS, progress=False)
    charged = molecules()
    charged[2].info["charge"] = 1
    with pytest.raises(DatasetError, match="structure 2"):
        run_batch(charged, out, COMPUTE, BASIS, progress=False)
    other_basis = basis_set("def2-universal-jkfit", ["H", "C", "N", "O"])
    with pytest.raises(DatasetError, match="another auxiliary basis"):
        run_batch(molecules(), out, COMPUTE, other_basis, progress=False)
    assert dataset_files(out) == before


@pytest.mark.slow
def test_process_pool_gives_the_serial_results(serial_dataset, tmp_path):
    out, _ = serial_dataset
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        report = run_batch(
            molecules(), str(tmp_path), COMPUTE, BASIS, executor=pool, progress=False
        )
    assert (report.done, report.failed) == ([0, 1, 2], [])
    for index in range(len(MOLECULES)):
        assert_same_targets(out, str(tmp_path), index)


def test_failures_are_recorded_and_retried(tmp_path):
    out = str(tmp_path)
    # helium is not in cc-pvdz-jkfit
    structures = [ase.build.molecule("H2O"), ase.Atoms("He"), ase.build.molecule("NH3")]
    not_converging = functools.partial(
        compute_targets, options=PySCFOptions(**{**OPTIONS.to_dict(), "max_cycle": 1})
    )
    report = run_batch(structures, out, not_converging, BASIS, progress=False)
    assert (report.done, report.failed) == ([], [0, 1, 2])
    failures = read_failures(out)
    assert failures[0].structure == "H2O"
    assert failures[0].error == "SCFNotConverged"
    assert "H2O" in failures[0].reason and "max_cycle=1" in failures[0].reason

    # the rerun retries all three: two succeed and leave failures.json
    report = run_batch(structures, out, COMPUTE, BASIS, progress=False)
    assert (report.done, report.skipped, report.failed) == ([0, 2], [], [1])
    failures = read_failures(out)
    assert list(failures) == [1]
    assert failures[1].structure == "He"
    assert failures[1].error == "KeyError"
    assert failures[1].reason.startswith("structure 1 (He): element(s) ['He'] not in")
    assert "cc-pvdz-jkfit" in failures[1].reason
    with open(os.path.join(out, layout.FAILURES_FILE)) as f:
        assert json.load(f)["1"]["structure"] == "He"
    assert sorted(os.listdir(out)) == sorted(
        [".lock", "0", "2", layout.BASIS_FILE, layout.STRUCTURES_FILE, layout.FAILURES_FILE]
    )


def test_element_missing_from_the_dataset_basis_fails_before_computing(tmp_path):
    """F is in PySCF's cc-pvdz-jkfit, but not in this dataset's basis.json."""
    structures = [ase.build.molecule("H2O"), ase.build.molecule("HF")]
    assert "F" not in BASIS.shells
    report = run_batch(structures, str(tmp_path), COMPUTE, BASIS, progress=False)
    assert (report.done, report.failed) == ([0], [1])
    failure = read_failures(str(tmp_path))[1]
    assert failure.error == "KeyError"
    assert "structure 1 (HF)" in failure.reason and "['F']" in failure.reason


def test_a_failure_left_by_a_killed_run_for_a_completed_structure_is_dropped(tmp_path):
    out = str(tmp_path)
    run_batch(molecules()[:1], out, COMPUTE, BASIS, progress=False)
    # as if killed after writing 0/ but before updating failures.json
    with open(os.path.join(out, layout.FAILURES_FILE), "w") as f:
        json.dump({"0": {"structure": "H2O", "error": "X", "reason": "stale"}}, f)
    report = run_batch(molecules()[:1], out, COMPUTE, BASIS, progress=False)
    assert (report.skipped, report.failed) == ([0], [])
    assert read_failures(out) == {}


def _unwritable_info(atoms, system):
    targets = compute_targets(atoms, OPTIONS, system)
    targets.info["energy"] = object()  # not JSON
    return targets


def test_unwritable_results_are_recorded_failures(tmp_path):
    report = run_batch(molecules()[:1], str(tmp_path), _unwritable_info, BASIS, progress=False)
    assert report.failed == [0]
    failure = read_failures(str(tmp_path))[0]
    assert failure.error == "TypeError" and "JSON" in failure.reason
    report = run_batch(molecules()[:1], str(tmp_path), lambda atoms, system: None, BASIS,
                       progress=False)
    assert "compute returned NoneType, not Targets" in read_failures(str(tmp_path))[0].reason


def test_removes_stale_temporary_folders(tmp_path):
    out = str(tmp_path)
    structures = [ase.build.molecule("H2")]
    basis = basis_set(OPTIONS.auxbasis, ["H"])
    os.makedirs(os.path.join(out, ".tmp-0-12345"))  # as a killed Targets.write leaves it
    report = run_batch(structures, out, COMPUTE, basis, progress=False)
    assert report.done == [0]
    assert sorted(os.listdir(out)) == [".lock", "0", layout.BASIS_FILE, layout.STRUCTURES_FILE]


class CtrlCAtSubmission(concurrent.futures.ThreadPoolExecutor):
    """A one-thread pool where Ctrl-C arrives while submitting task ``interrupt_at``."""

    def __init__(self, interrupt_at: int):
        super().__init__(max_workers=1)
        self.interrupt_at = interrupt_at
        self.submitted = []

    def submit(self, fn, *args, **kwargs):
        if len(self.submitted) == self.interrupt_at:
            raise KeyboardInterrupt
        future = super().submit(fn, *args, **kwargs)
        self.submitted.append(future)
        return future


def test_an_interrupted_submission_cancels_what_it_submitted(tmp_path):
    """Ctrl-C while structure 2 is submitted: structure 1, queued behind the running 0,
    is cancelled and never computed; nothing is written after the interruption."""
    started, release = [], threading.Event()

    def held(atoms, system):
        started.append(system)
        release.wait(60)
        return COMPUTE(atoms, system=system)

    with CtrlCAtSubmission(interrupt_at=2) as pool:
        with pytest.raises(KeyboardInterrupt):
            run_batch(molecules(), str(tmp_path), held, BASIS, executor=pool, progress=False)
        release.set()
    assert started == [0]
    assert len(pool.submitted) == 2 and pool.submitted[1].cancelled()
    assert not any(os.path.exists(layout.structure_dir(str(tmp_path), i)) for i in range(3))


def test_refuses_a_folder_another_run_is_writing(tmp_path):
    with open(tmp_path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(DatasetError, match="another run is writing"):
            run_batch(molecules(), str(tmp_path), COMPUTE, BASIS, progress=False)


def test_unreadable_structure_files_are_named(tmp_path):
    missing = str(tmp_path / "missing.xyz")
    with pytest.raises(DatasetError, match="missing.xyz"):
        read_structures(missing)
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is not\nan xyz file\n")
    with pytest.raises(DatasetError, match="garbage.xyz"):
        read_structures(str(garbage))
    ase.io.write(tmp_path / "two.xyz", molecules()[:2])
    assert len(read_structures(str(tmp_path / "two.xyz"), index="1")) == 1
    with pytest.raises(DatasetError, match="two.xyz"):
        read_structures(str(tmp_path / "two.xyz"), index="5")


def test_deleted_settings_are_rebuilt_from_the_structures(serial_dataset, tmp_path):
    out = str(tmp_path / "dataset")
    run_batch(molecules()[:1], out, COMPUTE, BASIS, progress=False,
              settings=OPTIONS.dataset_settings())
    os.remove(os.path.join(out, "settings.json"))
    other = PySCFOptions(xc="PBE", basis="sto-3g", auxbasis="cc-pvdz-jkfit", grid_level=0)
    with pytest.raises(DatasetError, match=r"0/info.json' was made with other settings \(xc: "
                                           r"'HF' there, 'PBE' requested"):
        run_batch(molecules()[:1], out, functools.partial(compute_targets, options=other),
                  BASIS, progress=False, settings=other.dataset_settings())
    assert not os.path.exists(os.path.join(out, "settings.json"))
    # the same settings pass, and are recorded again
    run_batch(molecules()[:1], out, COMPUTE, BASIS, progress=False,
              settings=OPTIONS.dataset_settings())
    with open(os.path.join(out, "settings.json")) as f:
        assert json.load(f) == json.loads(json.dumps(OPTIONS.dataset_settings()))


NO_MAIN_GUARD = """
import functools, sys
import ase.build
from rhocalc.batch import run_batch
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets
from rhocalc.structures import distorted_waters

options = PySCFOptions(xc="HF", basis="sto-3g", auxbasis="cc-pvdz-jkfit", grid_level=0)
report = run_batch(
    [ase.build.molecule("H2O"), ase.build.molecule("NH3")], sys.argv[1],
    functools.partial(compute_targets, options=options),
    basis_set(options.auxbasis, ["H", "N", "O"]), n_workers=2, progress=False,
)
print("failed:", report.failed)
"""


@pytest.mark.slow
def test_a_script_without_main_guard_is_told_to_add_one(tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(NO_MAIN_GUARD)
    out = str(tmp_path / "dataset")
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script), out], capture_output=True, text=True,
                            timeout=300, env=environment)
    assert "run_batch was called again in a worker process" in result.stderr
    assert 'if __name__ == "__main__":' in result.stderr
    assert "failed: [0, 1]" in result.stdout  # the parent records them, with the hint
    for failure in read_failures(out).values():
        assert failure.error == "BrokenProcessPool" and "calling script" in failure.reason


def children(pid):
    """Pids of the live (not zombie) processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")
def test_workers_end_when_their_parent_is_killed(tmp_path):
    molecules_file = str(tmp_path / "molecules.xyz")
    ase.io.write(molecules_file, [ase.build.molecule(n) for n in ["C6H6"] * 6])
    out = str(tmp_path / "out")
    command = [sys.executable, "-m", "rhocalc.cli", "pyscf", molecules_file, "--out", out,
               "--workers", "2", "--xc", "HF", "--basis", "sto-3g", "--auxbasis",
               "cc-pvdz-jkfit", "--quiet"]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=environment)
    deadline = time.monotonic() + 120
    workers = []
    while len(workers) < 2:  # two workers (and multiprocessing's resource tracker)
        assert process.poll() is None, "rhocalc exited before starting its workers"
        assert time.monotonic() < deadline, "no workers started within 120 s"
        time.sleep(0.1)
        workers = children(process.pid)
    time.sleep(1.0)  # into their imports or calculations
    workers = children(process.pid)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if alive(pid)]
    for pid in survivors:  # don't leave them behind if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"worker processes {survivors} outlived their parent"


@pytest.mark.slow
def test_the_readme_python_example_runs_as_a_script(tmp_path):
    readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    with open(readme) as f:
        section = f.read().split("## Python\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.py").write_text(code)
    ase.io.write(str(tmp_path / "structures.xyz"), distorted_waters(10, seed=4))
    ase.io.write(str(tmp_path / "new.xyz"), distorted_waters(1, seed=5))
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert "relative_l2_percent" in result.stdout
    assert read_failures(str(tmp_path / "dataset")) == {}
    assert os.path.exists(tmp_path / "predictions" / "water-0" / "density.cube")  # info["name"]
