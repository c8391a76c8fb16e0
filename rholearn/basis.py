"""The auxiliary (RI / density-fitting) basis, as plain data shared by every part.

A :class:`BasisSet` lists, per element, its radial functions (:class:`Shell`),
each carrying one angular momentum ``l`` and so ``2l+1`` basis functions.
It fixes the *canonical order* of basis functions in a structure, the order in
which every flat coefficient vector and every dense matrix of rholearn is
written::

    for atom in structure:                 # atoms in the order of the structure
        for l in 0 .. l_max(element):      # angular momentum, ascending
            for n in 0 .. n_radial(l) - 1: # radial functions of that l, in basis order
                for m in -l .. l:          # real spherical harmonics, featomic order

This is FHI-aims' order (atom, l, radial, m); PySCF's order is converted to it
in :mod:`rhocalc.pyscf.order`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import ase.data

from .files import write_json


@dataclasses.dataclass(frozen=True)
class Shell:
    """One radial function of angular momentum ``l``.

    Parameters
    ----------
    l : int
        Angular momentum of the ``2l+1`` functions this radial function carries.
    exponents : tuple of float
        Gaussian exponents in Bohr^-2; empty for numeric radial functions
        (FHI-aims).
    coefficients : tuple of float
        Contraction coefficients, one per exponent, as written in the basis-set
        library (before normalisation); empty for numeric radial functions.
    """

    l: int
    exponents: Tuple[float, ...] = ()
    coefficients: Tuple[float, ...] = ()

    def __post_init__(self):
        if self.l < 0:
            raise ValueError(f"angular momentum must be >= 0, got l={self.l}")
        if len(self.exponents) != len(self.coefficients):
            raise ValueError(
                f"shell with l={self.l} has {len(self.exponents)} exponents but "
                f"{len(self.coefficients)} contraction coefficients"
            )


@dataclasses.dataclass
class BasisSet:
    """An atom-centred auxiliary basis: radial functions per element.

    Parameters
    ----------
    name : str
        Name of the basis (``"def2-universal-jkfit"``, ``"aims-prodbas"``, ...).
    shells : dict of str to list of Shell
        Element symbol -> radial functions. Within one ``l`` the list order
        defines the radial index ``n``.
    """

    name: str
    shells: Dict[str, List[Shell]]

    @property
    def elements(self) -> List[str]:
        """Element symbols covered by the basis, sorted by atomic number."""
        return sorted(self.shells, key=lambda s: ase.data.atomic_numbers[s])

    @property
    def max_l(self) -> int:
        """Largest angular momentum over all elements."""
        return max(shell.l for shells in self.shells.values() for shell in shells)

    def check_elements(self, symbols: Iterable[str], where: str = "structure") -> None:
        """Raise a ``KeyError`` naming ``where`` if an element is not in the basis."""
        missing = sorted(set(symbols) - set(self.shells))
        if missing:
            raise KeyError(
                f"{where}: element(s) {missing} not in auxiliary basis '{self.name}' "
                f"(which covers {self.elements})"
            )

    def n_radial(self, symbol: str) -> Dict[int, int]:
        """Number of radial functions per angular momentum ``l`` for an element."""
        self.check_elements([symbol])
        counts: Dict[int, int] = {}
        for shell in self.shells[symbol]:
            counts[shell.l] = counts.get(shell.l, 0) + 1
        return dict(sorted(counts.items()))

    def n_functions(self, symbols: Sequence[str]) -> int:
        """Number of basis functions on a structure with these element symbols."""
        return sum(
            count * (2 * l + 1)
            for symbol in symbols
            for l, count in self.n_radial(symbol).items()
        )

    def functions(self, symbols: Sequence[str]) -> List[Tuple[int, int, int, int]]:
        """The ``(atom, l, n, m)`` of each basis function, in canonical order."""
        self.check_elements(symbols)
        return [
            (atom, l, n, m)
            for atom, symbol in enumerate(symbols)
            for l, count in self.n_radial(symbol).items()
            for n in range(count)
            for m in range(-l, l + 1)
        ]

    def keys(self, symbols: Optional[Iterable[str]] = None) -> List[Tuple[int, int, int]]:
        """``(o3_lambda, o3_sigma, center_type)`` of every target block.

        Parameters
        ----------
        symbols : iterable of str, optional
            Restrict to these elements (default: all elements of the basis).
        """
        symbols = self.elements if symbols is None else sorted(
            set(symbols), key=lambda s: ase.data.atomic_numbers[s]
        )
        self.check_elements(symbols)
        return sorted(
            (l, 1, ase.data.atomic_numbers[symbol])
            for symbol in symbols
            for l in self.n_radial(symbol)
        )

    # ---------------------------------------------------------------- I/O ---
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "elements": {
                symbol: [dataclasses.asdict(shell) for shell in self.shells[symbol]]
                for symbol in self.elements
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> "BasisSet":
        return cls(
            name=data["name"],
            shells={
                symbol: [
                    Shell(
                        l=int(s["l"]),
                        exponents=tuple(float(x) for x in s.get("exponents", ())),
                        coefficients=tuple(float(x) for x in s.get("coefficients", ())),
                    )
                    for s in shells
                ]
                for symbol, shells in data["elements"].items()
            },
        )

    def save(self, path: str) -> None:
        """Write ``basis.json`` atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "BasisSet":
        """Read a basis written by :meth:`save`; errors name the file."""
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"cannot read basis definition '{path}': {error}") from error
