"""Gaussian basis sets between PySCF's library and :class:`rholearn.basis.BasisSet`."""

from __future__ import annotations

import warnings
from typing import Dict, Iterable, List

from pyscf import gto
from pyscf.lib.exceptions import BasisNotFoundError

from rholearn.basis import BasisSet, Shell


def basis_set(auxbasis: str, elements: Iterable[str], *, where: str = "basis_set") -> BasisSet:
    """An auxiliary basis of PySCF's library as a :class:`~rholearn.basis.BasisSet`.

    Every contracted radial function becomes one :class:`~rholearn.basis.Shell`:
    a general contraction (several coefficient columns sharing exponents) is split
    into one shell per column, in column order. Shells keep the library's order,
    exponents in Bohr^-2, coefficients as written in the library.

    Parameters
    ----------
    auxbasis : str
        Name of the basis in PySCF's library, e.g. ``"def2-universal-jkfit"``.
    elements : iterable of str
        Element symbols to include.
    where : str
        Named in errors (e.g. the structure being computed).

    Raises
    ------
    KeyError
        An element is not covered by the basis; names ``where``, element and basis.
    """
    shells = {}
    for symbol in sorted(set(elements)):
        try:
            with warnings.catch_warnings():  # suggestion to install basis-set-exchange
                warnings.simplefilter("ignore")
                entries = gto.basis.load(auxbasis, symbol)
        except BasisNotFoundError as error:
            raise KeyError(
                f"{where}: element '{symbol}' not in basis '{auxbasis}' ({error})"
            ) from error
        shells[symbol] = _split_contractions(entries)
    return BasisSet(name=auxbasis, shells=shells)


def pyscf_basis(basis: BasisSet, elements: Iterable[str]) -> Dict[str, list]:
    """The basis in PySCF's input format, one segmented shell per :class:`Shell`.

    Raises ``ValueError`` for numeric (exponent-free) radial functions, which PySCF
    cannot represent.
    """
    basis.check_elements(elements)
    result = {}
    for symbol in sorted(set(elements)):
        shells = basis.shells[symbol]
        if any(not shell.exponents for shell in shells):
            raise ValueError(
                f"basis '{basis.name}' has numeric radial functions for '{symbol}': "
                "only Gaussian bases can be used with PySCF"
            )
        result[symbol] = [
            [shell.l, *([e, c] for e, c in zip(shell.exponents, shell.coefficients))]
            for shell in shells
        ]
    return result


def _split_contractions(entries: list) -> List[Shell]:
    """PySCF library entries ``[l, [exp, c_1, c_2, ...], ...]`` -> one Shell per column."""
    shells = []
    for l, *primitives in entries:
        if not isinstance(primitives[0], list):  # [l, kappa, [..], ...]: drop kappa
            primitives = primitives[1:]
        exponents = tuple(float(p[0]) for p in primitives)
        for column in range(1, len(primitives[0])):
            coefficients = tuple(float(p[column]) for p in primitives)
            shells.append(Shell(l=l, exponents=exponents, coefficients=coefficients))
    return shells
