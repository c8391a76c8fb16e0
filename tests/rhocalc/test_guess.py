"""SCFs started from expanded densities (rhocalc.pyscf.guess): fitted and predicted,
through the API, ``rhocalc pyscf --guess`` and ``rholearn evaluate``'s properties."""

import functools
import json
import os

import ase.build
import ase.io
import numpy as np
import pytest

from rhocalc.batch import run_batch
from rhocalc.cli import main
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets, run_scf
from rhocalc.pyscf.guess import ModelGuess, density_guess
from rhocalc.structures import distorted_waters
from rholearn import layout, workflow

OPTIONS = PySCFOptions(conv_tol=1e-10)  # tight: converged energies agree to 1e-8 Hartree


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default model (kernel, direct solve) fitted on 10 distorted waters;
    two more waters of the dataset are left for testing. The dataset's basis also
    covers carbon, which the model is never trained on."""
    dataset = str(tmp_path_factory.mktemp("waters"))
    report = run_batch(
        distorted_waters(12, seed=3), dataset, functools.partial(compute_targets, options=OPTIONS),
        basis_set(OPTIONS.auxbasis, ["H", "C", "O"]), progress=False,
        settings=OPTIONS.dataset_settings(),
    )
    assert report.failed == []
    split = {"train": list(range(9)), "val": [9], "test": [10, 11]}
    result = workflow.fit(dataset, str(tmp_path_factory.mktemp("run")), split=split)
    return dataset, result


def test_the_fitted_density_starts_the_same_scf_in_fewer_cycles(water, water_basis):
    default = run_scf(water, OPTIONS)
    targets = compute_targets(water, OPTIONS)
    guess = density_guess(water, targets.coefficients, water_basis, OPTIONS)
    started = run_scf(water, OPTIONS, dm0=guess.density_matrix)
    assert started.e_tot == pytest.approx(default.e_tot, abs=1e-8)
    assert started.cycles < default.cycles
    assert guess.density_matrix.shape == (default.mol.nao,) * 2
    n_electrons = np.einsum("ij,ji->", guess.density_matrix, started.get_ovlp())
    assert n_electrons == pytest.approx(10, abs=1e-10)  # occupied orbitals: exactly N
    # one diagonalisation in the fitted density's potential: variational and
    # second order in the fit error (~1 % in L1), the Harris energy first order in
    # the core region the fit misses; both measured 3.8e-7 and 8.1e-4 Hartree
    assert 0 <= guess.energy_one_shot - default.e_tot < 1e-5
    assert abs(guess.energy_harris - default.e_tot) < 2e-3
    assert guess.n_electrons == pytest.approx(10, abs=5e-3)  # on the SCF's grid


def test_ecp_elements_start_from_their_valence_density():
    """def2-svp puts an ECP on iodine: the fitted (valence) density and h with the
    ECP give the same SCF (measured 10 -> 5 cycles)."""
    atoms = ase.Atoms("HI", positions=[[0, 0, 0], [0, 0, 1.61]])
    targets = compute_targets(atoms, OPTIONS)
    assert targets.info["ecp"] == {"I": "def2-svp"}
    guess = density_guess(atoms, targets.coefficients, basis_set(OPTIONS.auxbasis, ["H", "I"]), OPTIONS)
    started = run_scf(atoms, OPTIONS, dm0=guess.density_matrix)
    assert started.e_tot == pytest.approx(targets.info["energy_hartree"], abs=1e-8)
    assert started.cycles < targets.info["n_scf_cycles"]
    assert 0 <= guess.energy_one_shot - targets.info["energy_hartree"] < 1e-5


def test_open_shell_guess_is_unrestricted_with_the_structure_s_electrons(water, water_basis):
    cation = water.copy()
    cation.info.update(charge=1, spin=1)
    targets = compute_targets(water, OPTIONS)  # the neutral density: a guess only
    guess = density_guess(cation, targets.coefficients, water_basis, OPTIONS, one_shot=False)
    assert guess.density_matrix.shape[0] == 2
    overlap = run_scf(water, PySCFOptions(max_cycle=1, conv_tol=1e3)).get_ovlp()
    alpha, beta = (np.einsum("ij,ji->", d, overlap) for d in guess.density_matrix)
    assert (alpha, beta) == (pytest.approx(5), pytest.approx(4))
    assert guess.energy_one_shot is None


@pytest.mark.parametrize("xc, kind", [("B3LYP", "hybrid"), ("HF", "Hartree-Fock"), ("TPSS", "MGGA")])
def test_functionals_that_need_orbitals_are_refused_by_name(water, water_basis, xc, kind):
    coefficients = np.zeros(water_basis.n_functions(water.get_chemical_symbols()))
    with pytest.raises(ValueError, match=f"xc='{xc}'.*{kind}"):
        density_guess(water, coefficients, water_basis, PySCFOptions(xc=xc))


def test_a_model_guess_reaches_the_same_energy_in_fewer_cycles(trained):
    dataset, result = trained
    atoms = ase.io.read(os.path.join(dataset, layout.STRUCTURES_FILE), index=11)
    with open(os.path.join(layout.structure_dir(dataset, 11), layout.INFO_FILE)) as f:
        default = json.load(f)
    targets = compute_targets(atoms, OPTIONS, guess=ModelGuess(result.run_dir))
    info = targets.info
    assert default["scf_guess"] == "minao"
    assert info["scf_guess"] == os.path.abspath(result.run_dir)
    assert info["energy_hartree"] == pytest.approx(default["energy_hartree"], abs=1e-8)
    assert info["n_scf_cycles"] < default["n_scf_cycles"]
    assert info["predict_seconds"] > 0 and info["guess_seconds"] > 0
    assert 0 <= info["energy_one_shot_hartree"] - info["energy_hartree"] < 1e-3


def test_structures_with_elements_the_model_has_not_seen_are_refused(trained, tmp_path, capsys):
    _, result = trained
    assert "C" in result.model.basis.elements  # in the basis, but never trained on
    with pytest.raises(ValueError, match=r"CH4O has element\(s\) \['C'\] the model .* "
                       r"was not trained on \(only \['H', 'O'\]\)"):
        ModelGuess(result.run_dir)(ase.build.molecule("CH3OH"), OPTIONS)
    structures = str(tmp_path / "molecules.xyz")
    ase.io.write(structures, [ase.build.molecule("H2O"), ase.build.molecule("CH3OH")])
    out = str(tmp_path / "out")
    assert main(["pyscf", structures, "--out", out, "--guess", result.run_dir, "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "structure 1 (CH4O)" in error and "['C']" in error
    assert main(["pyscf", structures, "--out", out, "--guess", result.run_dir, "--xc", "B3LYP",
                 "--index", "0", "--quiet"]) == 2
    assert "xc='B3LYP'" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_the_command_line_starts_from_the_model_and_records_it(trained, tmp_path):
    dataset, result = trained
    structures = str(tmp_path / "waters.xyz")
    ase.io.write(structures, ase.io.read(os.path.join(dataset, layout.STRUCTURES_FILE), index="10:"))
    out = str(tmp_path / "out")
    arguments = ["pyscf", structures, "--out", out, "--quiet", "--conv-tol", "1e-10"]
    assert main([*arguments, "--guess", result.run_dir]) == 0
    for index in (0, 1):
        with open(os.path.join(layout.structure_dir(out, index), layout.INFO_FILE)) as f:
            info = json.load(f)
        with open(os.path.join(layout.structure_dir(dataset, 10 + index), layout.INFO_FILE)) as f:
            default = json.load(f)
        assert info["scf_guess"] == os.path.abspath(result.run_dir)
        assert info["energy_hartree"] == pytest.approx(default["energy_hartree"], abs=1e-8)
        assert info["n_scf_cycles"] < default["n_scf_cycles"]
        for name in ("predict_seconds", "guess_seconds", "scf_seconds"):
            assert info[name] > 0


def test_evaluate_reports_energy_and_dipole_errors_per_structure(trained):
    dataset, result = trained
    errors = workflow.evaluate(result.model, dataset, [10, 11], grid_level=1, progress=False)
    for row in errors["structures"]:
        assert 0 <= row["energy_one_shot_error_hartree"] < 1e-3
        assert abs(row["energy_harris_error_hartree"]) < 0.05
        assert 0 <= row["dipole_error_debye"] < 0.3
    summary = errors["summary"]
    assert summary["dipole_error_debye"] == pytest.approx(
        np.mean([row["dipole_error_debye"] for row in errors["structures"]])
    )
