"""The auxiliary overlap as atom-pair blocks, without a dense matrix.

The overlap ``S`` of the auxiliary basis is stored by atom pairs (layout of
:mod:`rholearn.layout`): an ordered pair ``(i, j)`` is kept when its block has
an element above ``threshold`` in absolute value (and always for ``i == j``).
:func:`pair_overlap` computes only the blocks of atom pairs closer than a
distance :func:`pair_cutoffs` beyond which no element can exceed the
threshold, so the memory grows with the number of such pairs, not with the
square of the number of functions. The integrals are computed per atom as one
contiguous strip, from the atom to its farthest in-range later atom: atoms in
between are integrated even when out of range, so the time is linear in the
pairs only for structures whose atoms are ordered in space (as water boxes
are); at worst each of the two passes (:func:`pair_overlap`) integrates the upper
triangle of the dense matrix.

The distance bound
------------------
A normalised function of angular momentum ``l`` on atom ``A`` is
``chi(r) = R(r) Y_lm(r^)`` with ``R(r) = sum_k d_k r^l exp(-a_k r^2)``
(``int R^2 r^2 dr = 1``, ``int Y^2 dOmega = 1``). Real spherical harmonics obey
``sum_m Y_lm^2 = (2l+1) / 4 pi``, so ``|Y_lm| <= sqrt((2l+1) / 4 pi)``, and for
any ``0 < eps < 1``

    r^l exp(-a r^2) <= (l / (2 e eps a))^(l/2) exp(-(1 - eps) a r^2)

(the maximum of ``r^l exp(-eps a r^2)``; no factor for ``l = 0``). Hence
``|chi(r)| <= sum_k B_k exp(-a'_k |r - A|^2)`` with ``a'_k = (1 - eps) a_k`` and
``B_k = sqrt((2l+1) / 4 pi) |d_k| (l / (2 e eps a_k))^(l/2)``, and by the
Gaussian product theorem, for two functions at distance ``R``,

    |S| <= int |chi_1| |chi_2| dr
        <= sum_kk' B_k B'_k' (pi / (a'_k + b'_k'))^(3/2)
           exp(-a'_k b'_k' R^2 / (a'_k + b'_k')).

Each term decreases with ``R``, so the largest bound over the shell pairs of
two elements falls below the threshold beyond one distance, found by
bisection: that is the element pair's cut-off. The most diffuse primitives
dominate it; ``eps`` (:data:`ANGULAR_SLACK`) trades a slightly slower decay
for a smaller polynomial factor. For def2-universal-jkfit and the default
threshold it is 7.2 (H-H), 10.5 (H-O) and 12.8 (O-O) Angstrom, a few percent
beyond the distance where the largest true overlap of the two atoms falls
below the threshold (``tests/rhocalc/test_pyscf_targets.py``).

Units: positions in Angstrom at the ase boundary, Bohr inside the integrals
(PySCF's conversion, :data:`pyscf.data.nist.BOHR`, for the cut-offs too).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import ase
import ase.data
import ase.neighborlist
import numpy as np
from metatensor import TensorMap
from pyscf import gto
from pyscf.data.nist import BOHR

from rholearn import layout
from rholearn.basis import BasisSet

from . import order

ANGULAR_SLACK = 0.1
"""``eps`` of the distance bound: the fraction of each exponent traded to bound ``r^l``."""


def shell_envelopes(aux: gto.Mole, atom: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Gaussian envelopes ``|chi(r)| <= sum_k B_k exp(-a'_k r^2)`` of an atom's radial functions.

    Parameters
    ----------
    aux : pyscf.gto.Mole
        The molecule carrying the auxiliary basis.
    atom : int
        Index of the atom.

    Returns
    -------
    list of (B, a') pairs, one per contracted radial function
        ``B`` (dimensionless, for functions normalised over Bohr^3) and ``a'``
        (Bohr^-2), each of shape ``(n_primitives,)``.
    """
    first, last = aux.aoslice_by_atom()[atom][:2]
    envelopes = []
    for shell in range(first, last):
        l, exponents = aux.bas_angular(shell), aux.bas_exp(shell)
        for column in aux.bas_ctr_coeff(shell).T:  # coefficients of normalised primitives
            weights = column * gto.gto_norm(l, exponents)  # of r^l exp(-a r^2)
            norm = weights @ gto.gaussian_int(2 * l + 2, exponents[:, None] + exponents) @ weights
            weights = np.abs(weights) / np.sqrt(norm)
            slack = ANGULAR_SLACK if l > 0 else 0.0
            factor = (l / (2 * np.e * slack * exponents)) ** (l / 2) if l > 0 else 1.0
            envelopes.append(
                (np.sqrt((2 * l + 1) / (4 * np.pi)) * weights * factor, (1 - slack) * exponents)
            )
    return envelopes


def overlap_bound(envelopes_1, envelopes_2, distance: float) -> float:
    """Upper bound of ``|S|`` over the function pairs of two atoms ``distance`` Bohr apart.

    ``envelopes_1``, ``envelopes_2`` come from :func:`shell_envelopes`.
    """
    return _OverlapBound(envelopes_1, envelopes_2)(distance)


class _OverlapBound:
    """The bound of the module docstring as a function of the distance (Bohr)."""

    def __init__(self, envelopes_1, envelopes_2):
        prefactors, decays, shell_pairs = [], [], []
        for pair, ((b_1, a_1), (b_2, a_2)) in enumerate(
            (e_1, e_2) for e_1 in envelopes_1 for e_2 in envelopes_2
        ):
            total = a_1[:, None] + a_2
            prefactors.append((b_1[:, None] * b_2 * (np.pi / total) ** 1.5).ravel())
            decays.append((a_1[:, None] * a_2 / total).ravel())
            shell_pairs.append(np.full(total.size, pair))
        self.prefactors = np.concatenate(prefactors)
        self.decays = np.concatenate(decays)  # Bohr^-2
        self.shell_pairs = np.concatenate(shell_pairs)

    def __call__(self, distance: float) -> float:
        terms = self.prefactors * np.exp(-self.decays * distance**2)
        return float(np.bincount(self.shell_pairs, weights=terms).max())


def cutoff_distance(envelopes_1, envelopes_2, threshold: float) -> float:
    """Distance (Bohr) beyond which :func:`overlap_bound` is at most ``threshold`` (> 0)."""
    if not threshold > 0:
        raise ValueError(f"the overlap threshold must be > 0 for a cut-off, got {threshold}")
    bound = _OverlapBound(envelopes_1, envelopes_2)
    low, high = 0.0, 1.0
    while bound(high) > threshold:
        low, high = high, 2 * high
    for _ in range(50):  # the bound decreases with the distance
        middle = 0.5 * (low + high)
        low, high = (middle, high) if bound(middle) > threshold else (low, middle)
    return high


def pair_cutoffs(aux: gto.Mole, threshold: float) -> Dict[Tuple[str, str], float]:
    """``(symbol_1, symbol_2) -> distance`` (Angstrom) beyond which no |S| exceeds ``threshold``.

    Covers every ordered element pair of ``aux``; see the module docstring.
    """
    first_atom = {}
    for atom in range(aux.natm):
        first_atom.setdefault(aux.atom_pure_symbol(atom), atom)
    envelopes = {symbol: shell_envelopes(aux, atom) for symbol, atom in first_atom.items()}
    return {
        (s_1, s_2): BOHR * cutoff_distance(envelopes[s_1], envelopes[s_2], threshold)
        for s_1 in envelopes
        for s_2 in envelopes
    }


def _neighbours(atoms: ase.Atoms, aux: gto.Mole, threshold: float) -> List[np.ndarray]:
    """Per atom ``i``, the sorted atoms ``j > i`` whose overlap with it may exceed ``threshold``."""
    n_atoms = len(atoms)
    if threshold > 0:
        cutoffs = pair_cutoffs(aux, threshold)
        first, second = ase.neighborlist.neighbor_list("ij", atoms, cutoffs)
    else:  # every pair
        first, second = np.triu_indices(n_atoms, k=1)
    upper = first < second
    first, second = first[upper], second[upper]
    sorting = np.lexsort((second, first))
    first, second = first[sorting], second[sorting]
    return np.split(second, np.searchsorted(first, np.arange(1, n_atoms)))


class _Strips:
    """Overlap strips ``S[i, i..last]`` of one atom with the later atoms, in canonical order."""

    def __init__(self, aux: gto.Mole, numbers: np.ndarray):
        self.aux = aux
        canonical = order.pyscf_to_canonical(aux)  # canonical position -> PySCF function
        self.slices = aux.aoslice_by_atom()  # shell and function ranges (atom-major)
        self.local_order = {  # element -> PySCF position of each canonical function of an atom
            int(numbers[atom]): canonical[self.slices[atom, 2] : self.slices[atom, 3]]
            - self.slices[atom, 2]
            for atom in np.unique(numbers, return_index=True)[1]
        }

    def __call__(self, i: int, last: int, z: int) -> np.ndarray:
        """Rows: atom ``i``'s functions (canonical order); columns: atoms ``i..last`` (PySCF)."""
        slices = self.slices
        shells = (slices[i, 0], slices[i, 1], slices[i, 0], slices[last, 1])
        return self.aux.intor("int1e_ovlp", shls_slice=shells)[self.local_order[z]]

    def columns(self, begin: int, atoms: np.ndarray, z: int) -> np.ndarray:
        """``(len(atoms), F)`` strip columns of atoms of element ``z``, canonical within each."""
        return (self.slices[atoms, 2] - begin)[:, None] + self.local_order[z]


def pair_overlap(
    atoms: ase.Atoms,
    aux: gto.Mole,
    basis: BasisSet,
    system: int = 0,
    threshold: float = layout.OVERLAP_THRESHOLD,
    coefficients: Optional[np.ndarray] = None,
) -> Tuple[TensorMap, Optional[np.ndarray]]:
    """The auxiliary overlap of a structure as atom-pair blocks, and ``S c``.

    Gives the same TensorMap as ``layout.matrix_to_pair_tensormap`` applied
    to the dense canonical-order overlap (same keys, pairs and order), but
    computes only the blocks of atom pairs within :func:`pair_cutoffs`, with
    PySCF's ``int1e_ovlp`` on shell ranges: per atom, its strip with the later
    atoms (the blocks of ``(j, i)`` are transposes). A first pass finds the
    kept pairs (and ``S c``), a second computes the strips again and writes
    them straight into the final blocks, so memory is the stored blocks and
    one strip: time is about twice the integrals, memory about the output.

    Parameters
    ----------
    atoms : ase.Atoms
        The structure, positions in Angstrom; the atoms of ``aux``.
    aux : pyscf.gto.Mole
        The molecule carrying ``basis`` (:func:`rhocalc.pyscf.molecule.aux_molecule`).
    basis : BasisSet
    system : int
        The ``system`` sample of every block.
    threshold : float
        Pairs whose block has no element above this (absolute value) are
        dropped; ``0.0`` computes and keeps every pair.
    coefficients : numpy.ndarray, shape (n_functions,), optional
        A canonical-order vector ``c``.

    Returns
    -------
    overlap : TensorMap
        Pair layout of :mod:`rholearn.layout`.
    projections : numpy.ndarray or None
        ``S c`` in canonical order (``None`` without ``coefficients``), with
        every pair within the cut-offs (the omitted ones contribute less than
        ``threshold * |c|`` per element).
    """
    numbers = np.asarray(atoms.numbers)
    strips = _Strips(aux, numbers)
    slices = strips.slices
    function_atom = np.repeat(np.arange(len(numbers)), slices[:, 3] - slices[:, 2])
    if coefficients is not None:
        pyscf_coefficients = order.vector_to_pyscf(coefficients, aux)
        rows_part = np.zeros(aux.nao)  # canonical order: sum over j >= i of S_ij c_j
        columns_part = np.zeros(aux.nao)  # PySCF order: sum over i < j of S_ji c_i
    # pass 1: the kept partners of each atom among itself and the later atoms (and S c)
    kept_partners = []
    for i, later in enumerate(_neighbours(atoms, aux, threshold)):
        last = later[-1] if len(later) else i
        begin, end, own = slices[i, 2], slices[last, 3], slices[i, 3] - slices[i, 2]
        strip = strips(i, last, int(numbers[i]))
        partners = np.concatenate([[i], later])  # sorted, i first
        largest = np.maximum.reduceat(np.abs(strip).max(axis=0), slices[i : last + 1, 2] - begin)
        kept_partners.append(partners[(largest[partners - i] > threshold) | (partners == i)])
        if coefficients is not None:
            selected = np.isin(function_atom[begin:end], partners)
            rows_part[begin : begin + own] += strip @ (pyscf_coefficients[begin:end] * selected)
            selected[:own] = False
            columns_part[begin:end] += (strip.T @ coefficients[begin : begin + own]) * selected
    blocks = _empty_blocks(kept_partners, numbers, basis)
    # pass 2: the kept blocks, written into their rows
    for i, partners in enumerate(kept_partners):
        z_1, begin = int(numbers[i]), slices[i, 2]
        strip = strips(i, partners[-1], z_1)
        for z_2 in np.unique(numbers[partners]).tolist():
            js = partners[numbers[partners] == z_2]
            matrices = np.take(strip, strips.columns(begin, js, z_2), axis=1)  # (F_1, k, F_2)
            blocks.write(i, js, z_1, z_2, matrices)
    overlap = layout.pair_tensormap(blocks.finished(), system)
    if coefficients is None:
        return overlap, None
    return overlap, rows_part + order.vector_to_canonical(columns_part, aux)


class _PairBlocks:
    """The final pair blocks of every key, filled atom by atom."""

    def __init__(self, pairs: Dict[Tuple[int, int], np.ndarray], basis: BasisSet):
        self.pairs = pairs  # (z_1, z_2) -> sorted (P, 2)
        self.ids = {key: value[:, 0] * _ID_FACTOR + value[:, 1] for key, value in pairs.items()}
        self.radial = {}  # z -> [(l, first function in an atom's canonical functions, n)]
        for symbol in basis.shells:
            start, entries = 0, []
            for l, count in basis.n_radial(symbol).items():
                entries.append((l, start, count))
                start += count * (2 * l + 1)
            self.radial[ase.data.atomic_numbers[symbol]] = entries
        self.values = {}  # (l_1, l_2, z_1, z_2) -> (P, m_1, m_2, n_1, n_2)
        for (z_1, z_2), element_pairs in pairs.items():
            for l_1, _, n_1 in self.radial[z_1]:
                for l_2, _, n_2 in self.radial[z_2]:
                    shape = (len(element_pairs), 2 * l_1 + 1, 2 * l_2 + 1, n_1, n_2)
                    self.values[(l_1, l_2, z_1, z_2)] = np.empty(shape)

    def _rows(self, z_1: int, z_2: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids[(z_1, z_2)], first * _ID_FACTOR + second)

    def write(self, i: int, js: np.ndarray, z_1: int, z_2: int, matrices: np.ndarray) -> None:
        """Blocks ``S_ij`` and ``S_ji`` from ``matrices`` (F_1, len(js), F_2), canonical order."""
        direct = self._rows(z_1, z_2, np.full(len(js), i), js)
        others = js != i
        transposed = self._rows(z_2, z_1, js[others], np.full(others.sum(), i))
        k = len(js)
        for l_1, start_1, n_1 in self.radial[z_1]:
            m_1 = 2 * l_1 + 1
            for l_2, start_2, n_2 in self.radial[z_2]:
                m_2 = 2 * l_2 + 1
                sub = matrices[start_1 : start_1 + n_1 * m_1, :, start_2 : start_2 + n_2 * m_2]
                sub = sub.reshape(n_1, m_1, k, n_2, m_2)
                self.values[(l_1, l_2, z_1, z_2)][direct] = sub.transpose(2, 1, 4, 0, 3)
                if len(transposed):
                    self.values[(l_2, l_1, z_2, z_1)][transposed] = sub[:, :, others].transpose(
                        2, 4, 1, 3, 0
                    )

    def finished(self):
        """``(l_1, l_2, z_1, z_2) -> (pairs, values)``: for ``layout.pair_tensormap``."""
        return {key: (self.pairs[key[2:]], values) for key, values in self.values.items()}


_ID_FACTOR = 2**31
"""``atom_1 * _ID_FACTOR + atom_2``: one sortable int64 per atom pair."""


def _empty_blocks(
    kept_partners: List[np.ndarray], numbers: np.ndarray, basis: BasisSet
) -> _PairBlocks:
    """Blocks for the pairs ``(i, j)`` and ``(j, i)`` of each atom's kept later partners."""
    first = np.concatenate([np.full(len(js), i) for i, js in enumerate(kept_partners)])
    second = np.concatenate(kept_partners)
    others = first != second
    first, second = (
        np.concatenate([first, second[others]]),
        np.concatenate([second, first[others]]),
    )
    sorting = np.lexsort((second, first))
    first, second = first[sorting], second[sorting]
    pairs = {}
    for z_1 in np.unique(numbers).tolist():
        for z_2 in np.unique(numbers).tolist():
            chosen = (numbers[first] == z_1) & (numbers[second] == z_2)
            if chosen.any():
                pairs[(z_1, z_2)] = np.stack([first[chosen], second[chosen]], axis=1)
    return _PairBlocks(pairs, basis)
