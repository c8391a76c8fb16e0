"""The ``rhocalc`` command line, end to end with the PySCF backend."""

import json
import os
import subprocess
import sys
import time

import ase.build
import ase.io
import metatensor
import pytest

from rholearn import layout
from rholearn.dataset import Targets, read_failures
from rhocalc.cli import main

# Hartree-Fock in a minimal basis: about a second per molecule
FAST = ["--xc", "HF", "--basis", "sto-3g", "--auxbasis", "cc-pvdz-jkfit", "--quiet"]


def write_molecules(path, names):
    ase.io.write(path, [ase.build.molecule(n) if n != "He" else ase.Atoms("He") for n in names])
    return str(path)


def test_help_of_the_installed_command_and_of_the_subcommand(capsys):
    command = os.path.join(os.path.dirname(sys.executable), "rhocalc")
    result = subprocess.run([command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "pyscf" in result.stdout
    with pytest.raises(SystemExit) as exit_info:
        main(["pyscf", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--out", "--auxbasis", "--metric", "--constrain-electrons", "--workers"):
        assert option in help_text


def test_bad_input_exits_2_naming_what_is_wrong(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["pyscf", str(tmp_path / "nowhere.xyz"), "--out", out, *FAST]) == 2
    assert "nowhere.xyz" in capsys.readouterr().err
    assert not os.path.exists(out)

    molecules = write_molecules(tmp_path / "molecules.xyz", ["H2O"])
    assert main(["pyscf", molecules, "--out", out, *FAST, "--xc", "NOT-A-FUNCTIONAL"]) == 2
    assert "NOT-A-FUNCTIONAL" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_end_to_end_with_a_failed_structure(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # --workers would set it for this process
    molecules = write_molecules(tmp_path / "molecules.xyz", ["H2O", "He", "NH3"])
    out = str(tmp_path / "out")
    # structures 0 and 1 only, in two worker processes; helium is not in cc-pvdz-jkfit
    arguments = ["pyscf", molecules, "--out", out, "--index", "0:2", "--workers", "2", *FAST]
    assert main(arguments) == 0
    captured = capsys.readouterr()
    assert "2 structures: 1 computed, 0 already done, 1 failed" in captured.out
    assert os.path.abspath(out) in captured.out
    assert "structure 1 (He) failed: KeyError" in captured.err
    targets = Targets.read(layout.structure_dir(out, 0))
    assert targets.info["options"]["basis"] == "sto-3g"
    assert list(read_failures(out)) == [1]

    # a rerun on the same folder with other structures is refused
    assert main(["pyscf", molecules, "--out", out, *FAST]) == 2
    assert "structures.xyz" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    names = ["H2O", "NH3", "CH4", "HCN"]
    molecules = write_molecules(tmp_path / "molecules.xyz", names)
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")

    command = [sys.executable, "-m", "rhocalc.cli", "pyscf", molecules, "--out", killed, *FAST]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not os.path.isdir(layout.structure_dir(killed, 0)):
        assert process.poll() is None, "rhocalc exited before writing a structure"
        assert time.monotonic() < deadline, "no structure written within 120 s"
        time.sleep(0.01)
    process.kill()
    process.wait()
    finished = [i for i in range(len(names)) if os.path.isdir(layout.structure_dir(killed, i))]
    assert len(finished) < len(names), "killed too late to test resuming"
    first_mtime = os.stat(os.path.join(killed, "0", layout.COEFFICIENTS_FILE)).st_mtime_ns

    assert main(["pyscf", molecules, "--out", killed, *FAST]) == 0
    assert main(["pyscf", molecules, "--out", clean, *FAST]) == 0

    assert os.stat(os.path.join(killed, "0", layout.COEFFICIENTS_FILE)).st_mtime_ns == first_mtime
    assert sorted(os.listdir(killed)) == sorted(os.listdir(clean))  # no .tmp-* left
    for name in (layout.STRUCTURES_FILE, layout.BASIS_FILE):
        with open(os.path.join(killed, name), "rb") as a:
            with open(os.path.join(clean, name), "rb") as b:
                assert a.read() == b.read()
    for index in range(len(names)):
        a = Targets.read(layout.structure_dir(killed, index))
        b = Targets.read(layout.structure_dir(clean, index))
        for tensors in ((a.coefficients, b.coefficients), (a.projections, b.projections),
                        (a.overlap, b.overlap)):
            assert metatensor.allclose(*tensors, rtol=0, atol=1e-9)


def test_a_rerun_with_another_method_is_refused(tmp_path, capsys):
    molecules = write_molecules(tmp_path / "molecules.xyz", ["H2"])
    out = str(tmp_path / "out")
    assert main(["pyscf", molecules, "--out", out, *FAST]) == 0
    # SCF controls may change (e.g. to retry failures) ...
    assert main(["pyscf", molecules, "--out", out, *FAST, "--max-cycle", "200"]) == 0
    capsys.readouterr()
    # ... the method may not: the dataset would mix HF and PBE targets
    assert main(["pyscf", molecules, "--out", out, *FAST, "--xc", "PBE"]) == 2
    error = capsys.readouterr().err
    assert "settings.json" in error and "xc: 'HF' there, 'PBE' requested" in error


def test_heavy_elements_use_the_effective_core_potential_of_the_basis(tmp_path):
    # HI in PBE/def2-svp: iodine's 28 core electrons are in def2's ECP, 26 are explicit
    structures = str(tmp_path / "hi.xyz")
    ase.io.write(structures, ase.Atoms("HI", positions=[[0, 0, 0], [0, 0, 1.61]]))
    out = str(tmp_path / "out")
    assert main(["pyscf", structures, "--out", out, "--quiet"]) == 0
    with open(os.path.join(out, "settings.json")) as f:
        assert json.load(f)["ecp"] == "def2-svp"
    info = Targets.read(layout.structure_dir(out, 0)).info
    assert info["ecp"] == {"I": "def2-svp"}
    assert info["n_electrons"] == 26 and info["n_core_electrons"] == 28
    assert info["energy_hartree"] == pytest.approx(-298.28, abs=0.01)  # all-electron: -1999.9
    # the fitted density is the valence density
    assert info["n_electrons_fitted"] == pytest.approx(26, abs=0.01)
    assert info["n_electrons_scf_grid"] == pytest.approx(26, abs=0.01)
