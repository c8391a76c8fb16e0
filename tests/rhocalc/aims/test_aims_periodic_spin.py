"""Periodic and spin-polarised aims runs: what the parser reads, and what it refuses.

A periodic run is stood for by a distorted water in a small cubic cell: its
lattice-summed overlap (the overlap of each cell function with every image of
the others, summed over the 27 nearest cells) is computed with PySCF, and the
projections of an overlap-metric fit are ``w = S c``, as aims' RI fit gives.
"""

import os

import ase
import metatensor
import numpy as np
import pytest

import aims_test_files
from rholearn import layout
from rhocalc.aims.aimsout import parse_aims_out
from rhocalc.aims.outputs import AimsOutputError, read_ri_run
from rhocalc.pyscf import order
from rhocalc.pyscf.molecule import aux_molecule

CELL = 5.0
"""Angstrom: small enough that functions of neighbouring cells overlap."""


@pytest.fixture(scope="module")
def crystal(molecule):
    atoms = molecule.copy()
    atoms.cell = np.eye(3) * CELL
    atoms.pbc = True
    return atoms


@pytest.fixture(scope="module")
def cell_overlaps(crystal, molecule_basis):
    """(in-cell overlap, lattice-summed overlap) of the cell's functions, canonical order."""
    shifts = [np.array(s) for s in np.ndindex(3, 3, 3)]
    shifts = [np.zeros(3)] + [s - 1 for s in shifts if np.any(s != 1)]  # the cell itself first
    images = ase.Atoms(
        crystal.get_chemical_symbols() * len(shifts),
        positions=np.concatenate([crystal.positions + s @ crystal.cell[:] for s in shifts]),
    )
    aux = aux_molecule(images, molecule_basis)
    full = order.matrix_to_canonical(aux.intor("int1e_ovlp"), aux)
    n = len(full) // len(shifts)
    in_cell = full[:n, :n]
    summed = sum(full[:n, k * n:(k + 1) * n] for k in range(len(shifts)))
    return in_cell, (summed + summed.T) / 2


def write_periodic_run(directory, crystal, basis, coefficients, overlap, summed, lattice):
    symbols = crystal.get_chemical_symbols()
    aims_test_files.write_2024_run(directory, symbols, basis, coefficients, summed @ coefficients,
                                   overlap)
    aims_test_files.write_aims_out(directory, "240926", lattice=lattice)
    return str(directory)


def test_periodic_run_with_the_lattice_summed_overlap_is_read(tmp_path, crystal, molecule_basis,
                                                              molecule_targets, cell_overlaps):
    in_cell, summed = cell_overlaps
    assert np.abs(summed - in_cell).max() > 1e-3  # the images matter in this cell
    coefficients = layout.tensormap_to_vector(molecule_targets.coefficients, crystal.numbers,
                                              molecule_basis)
    directory = write_periodic_run(tmp_path, crystal, molecule_basis, coefficients, summed,
                                   summed, crystal.cell[:])
    targets, basis = read_ri_run(directory, crystal, overlap_threshold=0)
    metatensor.allclose_raise(targets.coefficients, molecule_targets.coefficients, rtol=1e-14)
    overlap = layout.pair_tensormap_to_matrix(targets.overlap, crystal.numbers, basis)
    np.testing.assert_allclose(overlap, summed, rtol=0, atol=1e-14)
    np.testing.assert_allclose(targets.info["ri_fit"]["lattice_vectors"], crystal.cell[:])


def test_periodic_overlap_of_one_cell_only_is_refused(tmp_path, crystal, molecule_basis,
                                                      molecule_targets, cell_overlaps):
    in_cell, summed = cell_overlaps
    coefficients = layout.tensormap_to_vector(molecule_targets.coefficients, crystal.numbers,
                                              molecule_basis)
    directory = write_periodic_run(tmp_path, crystal, molecule_basis, coefficients, in_cell,
                                   summed, crystal.cell[:])
    with pytest.raises(AimsOutputError, match=r"ri_ovlp.out' of a periodic run does not "
                                              r"reproduce the projections .* lattice-summed"):
        read_ri_run(directory, crystal)


def test_lattice_other_than_the_structure_is_refused(tmp_path, crystal, molecule, molecule_basis,
                                                     molecule_targets, cell_overlaps):
    _, summed = cell_overlaps
    coefficients = layout.tensormap_to_vector(molecule_targets.coefficients, crystal.numbers,
                                              molecule_basis)
    directory = write_periodic_run(tmp_path, crystal, molecule_basis, coefficients, summed,
                                   summed, crystal.cell[:] * 1.1)
    with pytest.raises(AimsOutputError, match=r"aims.out' is a periodic run with lattice "
                                              r"vectors .* but the structure has pbc"):
        read_ri_run(directory, crystal)
    with pytest.raises(AimsOutputError, match=r"pbc=\[False, False, False\]"):
        read_ri_run(directory, molecule)
    aims_test_files.write_aims_out(directory, "240926")  # a molecular run
    with pytest.raises(AimsOutputError, match=r"aims.out' is a run without a unit cell, but "
                                              r"the structure is periodic"):
        read_ri_run(directory, crystal)


def test_spin_polarised_run_is_refused(tmp_path, molecule, molecule_basis, molecule_targets):
    numbers = molecule.numbers
    canonical = (
        layout.tensormap_to_vector(molecule_targets.coefficients, numbers, molecule_basis),
        layout.tensormap_to_vector(molecule_targets.projections, numbers, molecule_basis),
        layout.pair_tensormap_to_matrix(molecule_targets.overlap, numbers, molecule_basis),
    )
    aims_test_files.write_2024_run(tmp_path, molecule.get_chemical_symbols(), molecule_basis,
                                   *canonical)
    aims_test_files.write_aims_out(tmp_path, "240926", n_spin_channels=2)
    with pytest.raises(AimsOutputError, match=r"aims.out' reports 2 spin channels: "
                                              r"spin-polarised RI files are not read"):
        read_ri_run(str(tmp_path), molecule)


def test_unit_cell_of_aims_out(tmp_path):
    lattice = [[4.0, 0.0, 0.0], [0.5, 4.2, 0.0], [0.0, -0.3, 6.1]]
    aims_test_files.write_aims_out(tmp_path, "240926", lattice=lattice)
    summary = parse_aims_out(os.path.join(tmp_path, "aims.out"))
    assert summary["lattice_vectors"] == lattice and summary["n_spin_channels"] == 1
    aims_test_files.write_aims_out(tmp_path, "240926")
    assert "lattice_vectors" not in parse_aims_out(os.path.join(tmp_path, "aims.out"))
    path = tmp_path / "aims.out"
    path.write_text("  | Unit cell:\n  |   4.0 0.0 0.0\n  |   0.0 4.0 0.0\n"
                    "  | Atomic structure:\n")
    with pytest.raises(ValueError, match=r"aims.out', line 2: expected three lattice vectors"):
        parse_aims_out(str(path))
