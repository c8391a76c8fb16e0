"""PySCF ``Mole`` objects of an ``ase.Atoms`` structure."""

from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, Tuple, Union

import ase
import numpy as np
from pyscf import gto
from metatensor import TensorMap
from pyscf.lib.exceptions import BasisNotFoundError

from rholearn import layout
from rholearn.basis import BasisSet
from rholearn.dataset import check_positions

from . import order
from .basis import pyscf_basis


def check_structure(atoms: ase.Atoms, where: str = "structure") -> None:
    """Refuse, before any calculation, a structure the PySCF backend cannot compute.

    Raises
    ------
    ValueError
        Naming ``where`` and the cause: periodic; positions that no calculation
        can use (:func:`rholearn.dataset.check_positions`: non-finite, or atoms
        closer than :data:`~rholearn.dataset.MIN_DISTANCE`); a charge or spin that
        is not an integer; no electrons; or an electron count whose parity does
        not match ``atoms.info["spin"]``.
    """
    if atoms.pbc.any():
        raise ValueError(
            f"{where}: periodic structure (pbc={atoms.pbc.tolist()}); the PySCF backend "
            "computes isolated molecules only: set atoms.pbc = False, or use the "
            "FHI-aims backend for periodic systems"
        )
    check_positions(atoms, where)
    charge, spin = charge_and_spin(atoms, where)
    n_electrons = int(atoms.numbers.sum()) - charge  # ECP cores hold even counts
    if n_electrons <= 0:
        raise ValueError(
            f"{where}: {n_electrons} electrons ({int(atoms.numbers.sum())} protons, charge "
            f"{charge}): nothing to compute; check atoms.info['charge']"
        )
    if (n_electrons - spin) % 2:
        raise ValueError(
            f"{where}: {n_electrons} electrons (charge {charge}) cannot have spin {spin} "
            "(the number of unpaired electrons, 2S): set atoms.info['spin'] (1 for a "
            "doublet) or atoms.info['charge']"
        )


def charge_and_spin(atoms: ase.Atoms, where: str = "structure") -> Tuple[int, int]:
    """``atoms.info["charge"]`` and ``atoms.info["spin"]`` (unpaired electrons,
    ``2S``), 0 by default; a value that is not an integer (``0.5``, ``"1"``, NaN) is
    refused with a ``ValueError`` naming ``where``: PySCF computes integer charges
    only, and truncating would compute another molecule."""
    values = []
    for name in ("charge", "spin"):
        value = atoms.info.get(name, 0)
        number = value.item() if isinstance(value, np.generic) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not (
            math.isfinite(number) and float(number).is_integer()
        ):
            raise ValueError(
                f"{where}: atoms.info['{name}'] = {number!r} is not an integer; the PySCF "
                f"backend computes integer {name}s only"
            )
        values.append(int(number))
    return values[0], values[1]


def ecp_of(basis: str, elements: Iterable[str]) -> Dict[str, str]:
    """The effective core potentials that orbital basis ``basis`` defines for
    ``elements``: ``{symbol: basis}`` (e.g. def2 bases beyond Kr), empty for an
    all-electron basis."""
    return {s: basis for s in sorted(set(elements)) if gto.basis.load_ecp(basis, s)}


def ao_molecule(atoms: ase.Atoms, basis: str, where: str = "structure") -> gto.Mole:
    """The molecule with its orbital basis, its ECPs, charge and spin.

    Positions are read from ``atoms`` in Angstrom. The charge is
    ``atoms.info["charge"]`` and the spin (number of unpaired electrons, ``2S``)
    ``atoms.info["spin"]``, both 0 by default. Elements for which ``basis``
    defines an effective core potential get it (:func:`ecp_of`): their core
    electrons are not explicit, ``mol.nelectron`` counts the valence only.

    Raises
    ------
    KeyError
        An element is not in ``basis``; names ``where``, element and basis.
    ValueError
        See :func:`check_structure`.
    """
    check_structure(atoms, where)
    molecule = _molecule(atoms)
    molecule.basis = basis
    molecule.ecp = ecp_of(basis, atoms.get_chemical_symbols())
    molecule.charge, molecule.spin = charge_and_spin(atoms, where)
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


def aux_coefficients(
    atoms: ase.Atoms, coefficients: Union[TensorMap, np.ndarray], basis: BasisSet
) -> Tuple[gto.Mole, np.ndarray]:
    """The auxiliary molecule of ``atoms`` and ``coefficients`` in its PySCF order.

    ``coefficients`` is a TensorMap in the dataset layout or a vector in the
    canonical order (:func:`rholearn.layout.tensormap_to_vector`), shape (n_aux,).
    """
    if not isinstance(coefficients, np.ndarray):
        coefficients = layout.tensormap_to_vector(coefficients, atoms.numbers, basis)
    aux = aux_molecule(atoms, basis)
    return aux, order.vector_to_pyscf(coefficients, aux)


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
