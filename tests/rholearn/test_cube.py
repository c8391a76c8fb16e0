"""Cube files (:mod:`rholearn.cube`): the grid around a structure, fields that never
run together, the size limit and the progress bar. Read back with ase's reader."""

import math

import ase
import ase.io.cube
import ase.units
import numpy as np
import pytest

from rholearn import cube


def gaussian(points):
    """A unit Gaussian at the origin (points in Angstrom), negative on the x < 0 side."""
    return np.sign(points[:, 0] + 1e-12) * np.exp(-np.sum(points**2, axis=1))


def test_the_grid_encloses_the_atoms_with_the_margin():
    atoms = ase.Atoms("H2", positions=[[0, 0, 0], [1.0, 0.5, 0]])
    grid = cube.cube_grid(atoms, spacing=0.3, margin=2.0)
    np.testing.assert_allclose(grid.origin, [-2.0, -2.0, -2.0])
    last = grid.origin + (np.array(grid.shape) - 1) * grid.step
    np.testing.assert_allclose(last, [3.0, 2.5, 2.0])
    assert grid.shape == (math.ceil(5 / 0.3), math.ceil(4.5 / 0.3), math.ceil(4 / 0.3))
    assert all(0.3 <= step < 0.33 for step in grid.step)


@pytest.mark.parametrize("spacing", [0.0, -0.1, float("nan"), float("inf"), True])
def test_a_spacing_that_is_not_a_positive_length_is_refused(spacing):
    with pytest.raises(ValueError, match="cube spacing must be a length > 0"):
        cube.cube_grid(ase.Atoms("H"), spacing)


@pytest.mark.parametrize("spacing, points, advice", [
    (0.01, r"674 x 600 x 600 = 2\.43e\+08", "0.014"),
    (1e-300, r"6\.74e\+300 x 6e\+300 x 6e\+300 = about 1e902", "0.014"),  # no overflow
])
def test_a_cube_above_the_limit_is_refused_naming_the_structure(spacing, points, advice):
    atoms = ase.Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])
    with pytest.raises(ValueError, match=rf"^structure 7: a cube of spacing {spacing:g} Angstrom "
                       rf"would have {points} points.*at least {advice} Angstrom"):
        cube.cube_grid(atoms, spacing, where="structure 7")
    assert cube.cube_grid(atoms, 0.014).n_points <= cube.MAX_CUBE_POINTS


def test_far_coordinates_and_tiny_values_stay_separate(tmp_path, capsys):
    """Coordinates below -1000 Bohr and values below 1e-99 (three-digit exponents)
    fill a fixed-width field: each field still starts with a space."""
    atoms = ase.Atoms("HeNe", positions=[[-900.0, 0, 0], [0.0, 0.2, 0.1]])
    grid = cube.CubeGrid(origin=np.array([-903.0, -2.0, -2.0]), step=np.array([1.5, 0.5, 0.5]),
                         shape=(605, 9, 11))  # 11 values along z: one line of 6, one of 5

    def values(points):
        result = gaussian(points)
        result[::7] = -1.5e-150
        return result

    path = str(tmp_path / "far.cube")
    count = cube.write_cube(path, atoms, grid, values, "far\napart", progress=True)
    assert "cube" in capsys.readouterr().err  # the progress bar, by slab

    read, read_atoms = ase.io.cube.read_cube_data(path)
    expected = np.concatenate([values(grid.slab(i)) for i in range(grid.shape[0])])
    np.testing.assert_allclose(read.ravel(), expected, rtol=1e-5, atol=0)
    np.testing.assert_allclose(read_atoms.positions, atoms.positions, atol=1e-5)
    assert count == pytest.approx(expected.sum() * grid.voxel_bohr3, rel=1e-12)
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == "far apart"
    assert [len(line.split()) for line in lines[2:8]] == [4, 4, 4, 4, 5, 5]
    assert lines[6].split()[2] == f"{-900 / ase.units.Bohr:.6f}"  # below -1000 Bohr
    data = lines[8:]
    assert [len(line.split()) for line in data[:2]] == [6, 5]
    assert len(data) == 2 * grid.shape[0] * grid.shape[1]
    assert all(token.count("E") == 1 for line in data for token in line.split())
