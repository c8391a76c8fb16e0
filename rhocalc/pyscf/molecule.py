"""PySCF ``Mole`` objects of an ``ase.Atoms`` structure."""

from __future__ import annotations

import warnings

import ase
from pyscf import gto
from pyscf.lib.exceptions import BasisNotFoundError

from rholearn.basis import BasisSet

from .basis import pyscf_basis


def ao_molecule(atoms: ase.Atoms, basis: str, where: str = "structure") -> gto.Mole:
    """The molecule with its orbital basis, charge and spin.

    Positions are read from ``atoms`` in Angstrom. The charge is
    ``atoms.info["charge"]`` and the spin (number of unpaired electrons, ``2S``)
    ``atoms.info["spin"]``, both 0 by default.

    Raises
    ------
    KeyError
        An element is not in ``basis``; names ``where``, element and basis.
    ValueError
        Charge and spin are inconsistent with the number of electrons, or the
        structure is periodic (this backend is molecular only).
    """
    if atoms.pbc.any():
        raise ValueError(
            f"{where}: periodic structure (pbc={atoms.pbc.tolist()}); the PySCF backend "
            "computes isolated molecules only: set atoms.pbc = False, or use the "
            "FHI-aims backend for periodic systems"
        )
    molecule = _molecule(atoms)
    molecule.basis = basis
    molecule.charge = int(atoms.info.get("charge", 0))
    molecule.spin = int(atoms.info.get("spin", 0))
    try:
        with warnings.catch_warnings():  # suggestion to install basis-set-exchange
            warnings.simplefilter("ignore")
            return molecule.build()
    except BasisNotFoundError as error:
        raise KeyError(f"{where}: {error}") from error
    except RuntimeError as error:  # PySCF's message for an impossible spin
        raise ValueError(
            f"{where}: charge {molecule.charge} and spin {molecule.spin}: {error}"
        ) from error


def aux_molecule(atoms: ase.Atoms, basis: BasisSet) -> gto.Mole:
    """The molecule carrying a (Gaussian) :class:`~rholearn.basis.BasisSet`.

    Each :class:`~rholearn.basis.Shell` becomes one PySCF shell, so any
    BasisSet with exponents works, not only PySCF library names. Positions are
    read from ``atoms`` in Angstrom. Only the basis functions are meant to be
    used: the electron count is that of the neutral atoms, with the lowest spin.
    """
    return _neutral_molecule(atoms, pyscf_basis(basis, atoms.get_chemical_symbols()))


def atoms_molecule(atoms: ase.Atoms) -> gto.Mole:
    """The atoms (positions in Angstrom) with a single s function each.

    For what uses only the atoms, such as integration grids.
    """
    unit_s_function = [[0, [1.0, 1.0]]]
    return _neutral_molecule(
        atoms, {symbol: unit_s_function for symbol in set(atoms.get_chemical_symbols())}
    )


def _neutral_molecule(atoms: ase.Atoms, basis: dict) -> gto.Mole:
    molecule = _molecule(atoms)
    molecule.basis = basis
    molecule.spin = int(atoms.numbers.sum()) % 2
    return molecule.build()


def _molecule(atoms: ase.Atoms) -> gto.Mole:
    """An unbuilt Mole with the atoms (Angstrom), quiet."""
    molecule = gto.Mole()
    molecule.atom = [
        (symbol, tuple(position))
        for symbol, position in zip(atoms.get_chemical_symbols(), atoms.positions)
    ]
    molecule.unit = "Angstrom"
    molecule.verbose = 0
    return molecule
