"""Real-space densities, grids, errors and cube files."""

import ase
import metatensor.torch
import numpy as np
import pytest
from pyscf import gto
from pyscf.data.nist import BOHR
from pyscf.tools.cubegen import Cube

from rholearn import layout
from rholearn.basis import BasisSet, Shell
from rhocalc.pyscf import realspace
from rhocalc.pyscf import order
from rhocalc.pyscf.molecule import aux_molecule


def test_single_gaussian_has_the_documented_units():
    """One normalised s Gaussian, coefficient 1: (2a/pi)^(3/4) exp(-a r^2), r in
    Bohr, value in electrons/Bohr^3, for points given in Angstrom."""
    exponent = 0.7  # Bohr^-2
    basis = BasisSet("one-s", {"He": [Shell(0, (exponent,), (1.0,))]})
    atoms = ase.Atoms("He", positions=[[0.1, -0.2, 0.3]])
    distances = np.array([0.0, 0.3, 1.0])  # Angstrom
    points = atoms.positions[0] + distances[:, None] * np.array([0.0, 0.6, 0.8])
    expected = (2 * exponent / np.pi) ** 0.75 * np.exp(
        -exponent * (distances / BOHR) ** 2
    )
    values = realspace.density_at_points(np.array([1.0]), atoms, basis, points)
    np.testing.assert_allclose(values, expected, rtol=1e-12)


def test_grid_integrates_the_scf_density_to_the_electron_count(water, water_scf):
    points, weights = realspace.integration_grid(water, level=3)
    assert points.shape == (len(weights), 3)
    assert np.all(weights >= 0)
    rho = realspace.scf_density_at_points(water_scf, points)
    assert realspace.electrons_on_grid(rho, weights) == pytest.approx(10, abs=1e-4)
    # an error of 100 %: nothing against the whole density
    zero = np.zeros_like(rho)
    assert realspace.real_space_l1_percent(zero, rho, weights, 10) == pytest.approx(100, abs=1e-3)
    assert realspace.real_space_l2_percent(zero, rho, weights) == pytest.approx(100)
    assert realspace.real_space_l1_percent(rho, rho, weights, 10) == 0.0


def test_fitted_density_matches_scf_density(water, water_basis, water_scf, water_targets):
    points, weights = realspace.integration_grid(water, level=3)
    rho_scf = realspace.scf_density_at_points(water_scf, points)
    rho_fit = realspace.density_at_points(water_targets.coefficients, water, water_basis, points)
    l1 = realspace.real_space_l1_percent(rho_fit, rho_scf, weights, 10)
    assert 0 < l1 < 2
    assert l1 == pytest.approx(water_targets.info["fit_l1_error_percent"], rel=1e-6)


def test_tensormap_and_vector_give_the_same_density(
    tmp_path, water, water_basis, water_targets
):
    points = water.positions + 0.1
    vector = layout.tensormap_to_vector(water_targets.coefficients, water.numbers, water_basis)
    expected = realspace.density_at_points(vector, water, water_basis, points)
    path = str(tmp_path / "coefficients.mts")
    layout.save(path, water_targets.coefficients)
    torch_tensor = metatensor.torch.load(path)  # as a torch model predicts
    for tensor in (water_targets.coefficients, torch_tensor):
        np.testing.assert_array_equal(
            realspace.density_at_points(tensor, water, water_basis, points), expected
        )


def test_density_matches_pyscf_library_basis(water, water_basis, water_targets):
    """The BasisSet-built molecule evaluates as PySCF's own library-basis molecule."""
    points = np.random.default_rng(0).normal(size=(50, 3))  # Angstrom
    library = gto.M(
        atom=[(s, p) for s, p in zip(water.get_chemical_symbols(), water.positions)],
        basis=water_basis.name,
        verbose=0,
    )
    vector = layout.tensormap_to_vector(water_targets.coefficients, water.numbers, water_basis)
    expected = library.eval_gto("GTOval_sph", points / BOHR) @ order.vector_to_pyscf(
        vector, library
    )
    np.testing.assert_allclose(
        realspace.density_at_points(vector, water, water_basis, points), expected, atol=1e-12
    )


def test_cube_file_round_trip(tmp_path, water, water_basis, water_targets):
    path = str(tmp_path / "water.cube")
    realspace.write_cube(path, water, water_targets.coefficients, water_basis, spacing=0.3)
    values, atoms = realspace.read_cube(path)
    np.testing.assert_allclose(atoms.positions, water.positions, atol=1e-5)
    assert list(atoms.numbers) == list(water.numbers)
    cube = Cube(
        aux_molecule(water, water_basis),
        resolution=0.3 / BOHR,
        margin=3.0 / BOHR,
    )
    assert values.shape == (cube.nx, cube.ny, cube.nz)
    expected = realspace.density_at_points(
        water_targets.coefficients, water, water_basis, cube.get_coords() * BOHR
    )
    np.testing.assert_allclose(values.ravel(), expected, rtol=1e-4, atol=1e-10)
    assert [p.name for p in tmp_path.iterdir()] == ["water.cube"]  # no temporary left


def test_chunked_evaluation_equals_one_chunk(
    monkeypatch, water, water_basis, water_targets, water_scf
):
    points, _ = realspace.integration_grid(water, level=0)
    rho_fit = realspace.density_at_points(water_targets.coefficients, water, water_basis, points)
    rho_scf = realspace.scf_density_at_points(water_scf, points)
    # 106 points a chunk for the 113 aux functions, 500 for the 24 orbitals
    monkeypatch.setattr(realspace, "CHUNK_BYTES", 8 * 24 * 500)
    np.testing.assert_allclose(
        realspace.density_at_points(water_targets.coefficients, water, water_basis, points),
        rho_fit,
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        realspace.scf_density_at_points(water_scf, points), rho_scf, rtol=1e-12
    )
    assert len(points) > 2000
