"""Molecular tensor targets from PySCF: dipole and polarisability, their files,
the option that asks for them, and their equivariance under rotations."""

import json
import os

import ase
import ase.build
import ase.io
import numpy as np
import pytest

from rholearn import layout, tensors
from rholearn.dataset import PROPERTY_FILES, Targets
from rholearn.rotations import random_rotation, rotate_blocks
from rhocalc.cli import main
from rhocalc.pyscf import PySCFOptions, compute_targets, run_scf
from rhocalc.pyscf.molecule import ao_molecule
from rhocalc.pyscf.properties import DEBYE
from rhocalc.pyscf.scf import SCFNotConverged, make_mean_field
from rhocalc.pyscf.tensors import COMPUTE, dipole, polarizability, tensor_targets

# Hartree-Fock has no XC grid: rotated molecules give the same tensors to the SCF tolerance
TIGHT_HF = PySCFOptions(xc="HF", conv_tol=1e-12)

FIELD = 1e-3
"""Hartree / (e Bohr): the finite field of the reference polarisability."""


def _finite_field_polarizability(atoms, options, reference):
    """Central differences of the SCF dipole in fields +-FIELD along x, y, z, shape (3, 3):
    the electrons' Hamiltonian gets ``+F.r`` (the energy of charge -1 in field F)."""
    molecule = ao_molecule(atoms, options.basis)
    hcore = reference.get_hcore()
    with molecule.with_common_orig((0.0, 0.0, 0.0)):
        positions = molecule.intor_symmetric("int1e_r", comp=3)
    columns = []
    for axis in range(3):
        dipoles = []
        for sign in (1, -1):
            mean_field = make_mean_field(molecule, options)
            field = sign * FIELD * np.eye(3)[axis]
            mean_field.get_hcore = lambda *_, f=field: hcore + np.einsum("x,xij->ij", f, positions)
            # the dipole's convergence error is divided by 2 FIELD: converge the orbitals tightly
            mean_field.conv_tol_grad = 1e-7
            mean_field.kernel(dm0=reference.make_rdm1())
            if not mean_field.converged:  # DIIS can stall on an open shell: second-order steps
                mean_field = mean_field.newton()
                mean_field.kernel(dm0=mean_field.make_rdm1())
            if not mean_field.converged:
                raise SCFNotConverged(f"{atoms.get_chemical_formula()} in field {field}")
            dipoles.append(dipole(mean_field))
        columns.append((dipoles[0] - dipoles[1]) / (2 * FIELD))
    return np.array(columns).T  # alpha[a, b] = d mu_a / d F_b


def _rotated(atoms, rotation):
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T  # r -> R r
    return rotated


def test_every_known_tensor_is_computed():
    assert set(COMPUTE) == set(tensors.RANKS) == set(PROPERTY_FILES)


def test_restricted_kohn_sham_polarizability_matches_finite_field(water, water_scf):
    analytic = polarizability(water_scf)
    np.testing.assert_allclose(analytic, analytic.T, atol=1e-10)
    # water: def2-svp PBE gives about 3.2, 7.4, 5.6 a.u. along x, y, z (molecule in the yz plane)
    assert np.all(np.linalg.eigvalsh(analytic) > 3)
    finite_field = _finite_field_polarizability(water, PySCFOptions(conv_tol=1e-11), water_scf)
    np.testing.assert_allclose(finite_field, analytic, atol=2e-4)


def test_unrestricted_polarizability_matches_finite_field():
    # NH2 (2B1): one unpaired electron in a non-degenerate orbital (OH's 2Pi, a degenerate
    # pair, made the finite-field SCFs oscillate between the two in some runs)
    radical = ase.Atoms("NH2", positions=[[0.0, 0.0, 0.0], [0.3, 0.2, 0.98], [0.85, 0.45, -0.35]],
                        info={"spin": 1})
    options = PySCFOptions(xc="HF", conv_tol=1e-11)
    scf = run_scf(radical, options)
    analytic = polarizability(scf)
    np.testing.assert_allclose(analytic, analytic.T, atol=1e-10)
    np.testing.assert_allclose(_finite_field_polarizability(radical, options, scf), analytic,
                               atol=2e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_spherical_tensors_rotate_with_the_molecule(seed):
    """Rotate the molecule, rerun the SCF: the spherical dipole and polarisability
    are the Wigner-D rotated ones (to the SCF and response convergence)."""
    molecule = ase.build.molecule("CH3OH")  # no symmetry axis along x, y or z
    rotation = random_rotation(seed)
    names = list(tensors.RANKS)
    original, _ = tensor_targets(run_scf(molecule, TIGHT_HF), names)
    rotated, _ = tensor_targets(run_scf(_rotated(molecule, rotation), TIGHT_HF), names)
    for name in names:
        expected = rotate_blocks(original[name], rotation)
        for key, block in rotated[name].items():
            assert np.abs(block.values).max() > 0.1  # not trivially zero
            np.testing.assert_allclose(block.values, expected.block(key).values, atol=1e-6)


def test_targets_with_properties_write_files_and_cartesian_values(
    tmp_path, water, water_basis, water_targets
):
    targets = compute_targets(water, PySCFOptions(properties="dipole,polarizability"), system=4)
    info = targets.info
    assert sorted(targets.properties) == ["dipole", "polarizability"]
    np.testing.assert_allclose(np.array(info["dipole_au"]) * DEBYE, info["dipole_debye"])
    for name, tensor in targets.properties.items():
        assert tensor.block(0).samples.values.tolist() == [[4]]
        np.testing.assert_allclose(tensors.tensormap_to_cartesian(tensor)[0], info[f"{name}_au"],
                                   atol=1e-14)
    # the isotropic part is trace / sqrt(3) of the (positive) polarisability, in a.u.
    isotropic = targets.properties["polarizability"].block({"o3_lambda": 0}).values.item()
    assert isotropic == pytest.approx(np.trace(info["polarizability_au"]) / np.sqrt(3))
    assert 8 < isotropic < 12
    assert "Bohr" in info["units"]["polarizability_au"] and info["tensors_seconds"] > 0
    # the density targets do not change
    np.testing.assert_allclose(
        layout.tensormap_to_vector(targets.coefficients, water.numbers, water_basis),
        layout.tensormap_to_vector(water_targets.coefficients, water.numbers, water_basis),
        atol=1e-7,
    )

    targets.write(str(tmp_path / "4"))
    assert sorted(os.listdir(tmp_path / "4")) == sorted(
        [layout.COEFFICIENTS_FILE, layout.PROJECTIONS_FILE, layout.OVERLAP_FILE,
         layout.INFO_FILE, "dipole.mts", "polarizability.mts"]
    )
    read = Targets.read(str(tmp_path / "4"))
    for name, tensor in targets.properties.items():
        np.testing.assert_array_equal(tensors.tensormap_to_cartesian(read.properties[name]),
                                      tensors.tensormap_to_cartesian(tensor))
    assert "dipole" not in water_targets.properties and "dipole_au" not in water_targets.info


def test_properties_option_reads_lists_and_comma_separated_names():
    assert PySCFOptions(properties="polarizability, dipole").properties == (
        "dipole", "polarizability")
    assert PySCFOptions(properties=["polarizability"]).properties == ("polarizability",)
    assert PySCFOptions().properties == ()
    with pytest.raises(ValueError, match=r"properties: unknown \['quadrupole'\]"):
        PySCFOptions(properties="dipole,quadrupole")
    # recorded in the dataset's settings only when asked for
    assert "properties" not in PySCFOptions().dataset_settings()
    assert PySCFOptions(properties="dipole").dataset_settings()["properties"] == ["dipole"]


FAST = ["--xc", "HF", "--basis", "sto-3g", "--auxbasis", "cc-pvdz-jkfit", "--quiet"]


def test_command_line_writes_the_tensors_and_refuses_a_rerun_without_them(tmp_path, capsys):
    molecules = str(tmp_path / "molecules.xyz")
    ase.io.write(molecules, [ase.build.molecule("H2O"), ase.build.molecule("NH3")])
    out = str(tmp_path / "out")
    assert main(["pyscf", molecules, "--out", out, *FAST, "--properties", "dipole,quadrupole"]) == 2
    assert "unknown ['quadrupole']" in capsys.readouterr().err
    assert not os.path.exists(out)
    assert main(["pyscf", molecules, "--out", out, *FAST,
                 "--properties", "dipole,polarizability"]) == 0
    for index in range(2):
        folder = layout.structure_dir(out, index)
        assert os.path.exists(os.path.join(folder, "dipole.mts"))
        with open(os.path.join(folder, layout.INFO_FILE)) as f:
            info = json.load(f)
        assert info["options"]["properties"] == ["dipole", "polarizability"]
        polarizability_au = np.array(info["polarizability_au"])
        np.testing.assert_allclose(polarizability_au, polarizability_au.T, atol=1e-10)
        tensor = layout.load(os.path.join(folder, "polarizability.mts"))
        np.testing.assert_allclose(tensors.tensormap_to_cartesian(tensor)[0], polarizability_au,
                                   atol=1e-12)
    with open(os.path.join(out, "settings.json")) as f:
        assert json.load(f)["properties"] == ["dipole", "polarizability"]
    capsys.readouterr()
    # the completed folders hold the tensors: a rerun asking for fewer would mix datasets
    assert main(["pyscf", molecules, "--out", out, *FAST]) == 2
    assert "properties" in capsys.readouterr().err
