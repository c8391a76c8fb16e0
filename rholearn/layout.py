"""The metatensor layout every part of rholearn and rhocalc agrees on.

Coefficients and projections (one structure or many)
    keys        ``o3_lambda, o3_sigma, center_type`` (``o3_sigma`` is 1, ``center_type``
                the atomic number)
    samples     ``system, atom`` (``atom`` is the 0-based index in the structure)
    components  ``o3_mu`` (m = -l..l, featomic/metatensor real-harmonic order)
    properties  ``n`` (radial index within that l, as in :class:`~rholearn.basis.BasisSet`)

Overlap matrix, sparse by atom pairs
    keys        ``o3_lambda_1, o3_lambda_2, center_type_1, center_type_2``
    samples     ``system, atom_1, atom_2``
    components  ``o3_mu_1``, ``o3_mu_2``
    properties  ``n_1, n_2``
    values      shape ``(n_pairs, 2 l_1 + 1, 2 l_2 + 1, n_radial_1 * n_radial_2)``

All *ordered* atom pairs ``(i, j)`` (both ``(i, j)`` and ``(j, i)``, and ``i == j``)
are stored whose overlap block has an element larger than ``threshold`` in absolute
value (:data:`OVERLAP_THRESHOLD` by default). Pairs of distant atoms are dropped, so
memory grows linearly with system size. A dense matrix is only ever built for tests.

Units: coefficients are dimensionless expansion coefficients of a density in
electrons / Bohr^3; overlaps are integrals over Bohr^3 of products of basis
functions; projections ``w = S c`` carry the same units as the overlaps.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import ase.data
import numpy as np
import metatensor
from metatensor import Labels, TensorBlock, TensorMap

from .basis import BasisSet
from .files import atomic_path

KEY_NAMES = ["o3_lambda", "o3_sigma", "center_type"]
SAMPLE_NAMES = ["system", "atom"]
COMPONENT_NAME = "o3_mu"
PROPERTY_NAME = "n"

PAIR_KEY_NAMES = ["o3_lambda_1", "o3_lambda_2", "center_type_1", "center_type_2"]
PAIR_SAMPLE_NAMES = ["system", "atom_1", "atom_2"]
PAIR_COMPONENT_NAMES = ["o3_mu_1", "o3_mu_2"]
PAIR_PROPERTY_NAMES = ["n_1", "n_2"]

OVERLAP_THRESHOLD = 1e-10
"""Default: an atom pair is kept if any |S_ij| of its block exceeds this."""

# Files of a target dataset (its rules: :mod:`rholearn.dataset`)
BASIS_FILE = "basis.json"
STRUCTURES_FILE = "structures.xyz"
FAILURES_FILE = "failures.json"
COEFFICIENTS_FILE = "coefficients.mts"
PROJECTIONS_FILE = "projections.mts"
OVERLAP_FILE = "overlap.mts"
INFO_FILE = "info.json"


def structure_dir(root: str, index: int) -> str:
    """The folder of structure ``index`` in a dataset."""
    return os.path.join(root, str(index))


def _symbols(atomic_numbers: Sequence[int]) -> List[str]:
    return [ase.data.chemical_symbols[int(z)] for z in atomic_numbers]


def _offsets(
    atomic_numbers: Sequence[int], basis: BasisSet
) -> Dict[Tuple[int, int], Tuple[int, int]]:
    """``(atom, l) -> (first index in the canonical vector, n_radial)``."""
    offsets = {}
    start = 0
    for atom, symbol in enumerate(_symbols(atomic_numbers)):
        for l, count in basis.n_radial(symbol).items():
            offsets[(atom, l)] = (start, count)
            start += count * (2 * l + 1)
    return offsets


def _atoms_of_type(atomic_numbers: Sequence[int], z: int) -> List[int]:
    return [i for i, zi in enumerate(atomic_numbers) if int(zi) == z]


def _block_indices(atoms, l, offsets):
    """Indices into the canonical vector, shape (n_atoms, 2l+1, n_radial)."""
    count = offsets[(atoms[0], l)][1]
    index = np.empty((len(atoms), 2 * l + 1, count), dtype=np.int64)
    for i, atom in enumerate(atoms):
        start = offsets[(atom, l)][0]
        # canonical order within (atom, l) is n-major, m-minor
        index[i] = start + np.arange(count * (2 * l + 1)).reshape(count, 2 * l + 1).T
    return index


def vector_to_tensormap(
    vector: np.ndarray,
    atomic_numbers: Sequence[int],
    basis: BasisSet,
    system: int = 0,
) -> TensorMap:
    """Split a canonical-order vector (coefficients or projections) into blocks.

    Parameters
    ----------
    vector : numpy.ndarray, shape (n_functions,)
        Values in the canonical order of :mod:`rholearn.basis`.
    atomic_numbers : sequence of int
        Atomic numbers of the structure's atoms, in order.
    basis : BasisSet
    system : int
        Value of the ``system`` sample dimension (the structure's dataset index).
    """
    vector = np.asarray(vector, dtype=np.float64)
    n_expected = basis.n_functions(_symbols(atomic_numbers))
    if vector.shape != (n_expected,):
        raise ValueError(
            f"system {system}: vector of shape {vector.shape} does not match the "
            f"{n_expected} functions of basis '{basis.name}' on this structure"
        )
    offsets = _offsets(atomic_numbers, basis)
    keys, blocks = [], []
    for l, sigma, z in basis.keys(_symbols(atomic_numbers)):
        atoms = _atoms_of_type(atomic_numbers, z)
        index = _block_indices(atoms, l, offsets)
        keys.append([l, sigma, z])
        blocks.append(
            TensorBlock(
                values=vector[index],
                samples=Labels(SAMPLE_NAMES, np.array([[system, a] for a in atoms])),
                components=[
                    Labels([COMPONENT_NAME], np.arange(-l, l + 1).reshape(-1, 1))
                ],
                properties=Labels([PROPERTY_NAME], np.arange(index.shape[2]).reshape(-1, 1)),
            )
        )
    return TensorMap(Labels(KEY_NAMES, np.array(keys)), blocks)


def tensormap_to_vector(
    tensor: TensorMap, atomic_numbers: Sequence[int], basis: BasisSet
) -> np.ndarray:
    """Inverse of :func:`vector_to_tensormap` for one structure.

    Works for metatensor-core and metatensor-torch TensorMaps; returns numpy.
    Missing blocks or atoms raise a ``KeyError`` naming them.
    """
    offsets = _offsets(atomic_numbers, basis)
    vector = np.full(basis.n_functions(_symbols(atomic_numbers)), np.nan)
    for l, sigma, z in basis.keys(_symbols(atomic_numbers)):
        try:
            block = tensor.block({"o3_lambda": l, "o3_sigma": sigma, "center_type": z})
        except (ValueError, RuntimeError) as error:
            raise KeyError(f"no block for o3_lambda={l}, center_type={z}") from error
        values = np.asarray(_to_numpy(block.values))
        atoms = [int(a) for a in _to_numpy(block.samples.column("atom"))]
        expected = _atoms_of_type(atomic_numbers, z)
        if sorted(atoms) != expected:
            raise KeyError(
                f"block o3_lambda={l}, center_type={z} has atoms {atoms}, expected {expected}"
            )
        vector[_block_indices(atoms, l, offsets)] = values
    return vector


def matrix_to_pair_tensormap(
    matrix: np.ndarray,
    atomic_numbers: Sequence[int],
    basis: BasisSet,
    system: int = 0,
    threshold: float = OVERLAP_THRESHOLD,
) -> TensorMap:
    """Split a dense canonical-order matrix (the overlap) into atom-pair blocks.

    Parameters
    ----------
    matrix : numpy.ndarray, shape (n_functions, n_functions)
    threshold : float
        Atom pairs whose block has no element above this (absolute value) are
        dropped. ``0.0`` keeps every pair.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    n = basis.n_functions(_symbols(atomic_numbers))
    if matrix.shape != (n, n):
        raise ValueError(
            f"system {system}: matrix of shape {matrix.shape} does not match the "
            f"{n} functions of basis '{basis.name}' on this structure"
        )
    offsets = _offsets(atomic_numbers, basis)
    n_atoms = len(atomic_numbers)
    # keep the atom pairs whose whole (all l) block passes the threshold
    atom_ranges = []
    start = 0
    for symbol in _symbols(atomic_numbers):
        size = basis.n_functions([symbol])
        atom_ranges.append(slice(start, start + size))
        start += size
    kept = {
        (i, j)
        for i in range(n_atoms)
        for j in range(n_atoms)
        if np.abs(matrix[atom_ranges[i], atom_ranges[j]]).max(initial=0.0) > threshold
        or i == j
    }
    blocks = {}
    for l1, _, z1 in basis.keys(_symbols(atomic_numbers)):
        for l2, _, z2 in basis.keys(_symbols(atomic_numbers)):
            pairs = [
                (i, j)
                for i in _atoms_of_type(atomic_numbers, z1)
                for j in _atoms_of_type(atomic_numbers, z2)
                if (i, j) in kept
            ]
            if not pairs:
                continue
            rows = _block_indices([i for i, _ in pairs], l1, offsets)  # (P, m1, n1)
            cols = _block_indices([j for _, j in pairs], l2, offsets)  # (P, m2, n2)
            blocks[(l1, l2, z1, z2)] = (
                np.array(pairs),
                matrix[rows[:, :, None, :, None], cols[:, None, :, None, :]],  # (P, m1, m2, n1, n2)
            )
    return pair_tensormap(blocks, system)


def pair_tensormap(
    blocks: Dict[Tuple[int, int, int, int], Tuple[np.ndarray, np.ndarray]], system: int = 0
) -> TensorMap:
    """The pair-layout TensorMap of blocks given as arrays.

    Parameters
    ----------
    blocks : dict
        ``(o3_lambda_1, o3_lambda_2, center_type_1, center_type_2) -> (pairs,
        values)``: ``pairs`` of shape ``(P, 2)`` (``atom_1, atom_2``) and
        ``values`` of shape ``(P, 2 l_1 + 1, 2 l_2 + 1, n_1, n_2)``. Keys
        without pairs are left out; the others are ordered as
        :func:`matrix_to_pair_tensormap` orders them, by ``(o3_lambda_1,
        center_type_1)`` then ``(o3_lambda_2, center_type_2)``.
    system : int
        The ``system`` sample of every block.
    """
    keys = sorted((key for key, (pairs, _) in blocks.items() if len(pairs)),
                  key=lambda key: (key[0], key[2], key[1], key[3]))
    tensor_blocks = []
    for key in keys:
        pairs, values = blocks[key]
        n_pairs, m_1, m_2, n_1, n_2 = values.shape
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        tensor_blocks.append(
            TensorBlock(
                values=np.ascontiguousarray(values).reshape(n_pairs, m_1, m_2, n_1 * n_2),
                samples=Labels(
                    PAIR_SAMPLE_NAMES,
                    np.concatenate([np.full((n_pairs, 1), system, dtype=np.int64), pairs], 1),
                ),
                components=[
                    Labels(["o3_mu_1"], np.arange(-(m_1 // 2), m_1 // 2 + 1).reshape(-1, 1)),
                    Labels(["o3_mu_2"], np.arange(-(m_2 // 2), m_2 // 2 + 1).reshape(-1, 1)),
                ],
                properties=Labels(
                    PAIR_PROPERTY_NAMES,
                    np.array([[a, b] for a in range(n_1) for b in range(n_2)]).reshape(-1, 2),
                ),
            )
        )
    return TensorMap(Labels(PAIR_KEY_NAMES, np.array(keys).reshape(-1, 4)), tensor_blocks)


def pair_tensormap_to_matrix(
    tensor: TensorMap, atomic_numbers: Sequence[int], basis: BasisSet
) -> np.ndarray:
    """Dense canonical-order matrix from pair blocks (dropped pairs are zero).

    Only meant for tests and small structures: memory is quadratic.
    """
    offsets = _offsets(atomic_numbers, basis)
    n = basis.n_functions(_symbols(atomic_numbers))
    matrix = np.zeros((n, n))
    for key, block in tensor.items():
        l1, l2 = int(key["o3_lambda_1"]), int(key["o3_lambda_2"])
        samples = np.asarray(_to_numpy(block.samples.values))
        if len(samples) == 0:  # e.g. after slicing one system out of a batch
            continue
        rows = _block_indices([int(i) for i in samples[:, 1]], l1, offsets)
        cols = _block_indices([int(j) for j in samples[:, 2]], l2, offsets)
        values = np.asarray(_to_numpy(block.values)).reshape(
            len(samples), 2 * l1 + 1, 2 * l2 + 1, rows.shape[2], cols.shape[2]
        )
        matrix[rows[:, :, None, :, None], cols[:, None, :, None, :]] = values
    return matrix


def save(path: str, tensor: TensorMap) -> None:
    """Write a TensorMap atomically: a temporary file renamed into place.

    Accepts metatensor-core or metatensor-torch TensorMaps; the file format
    (``.mts``) is the same for both.
    """
    with atomic_path(path) as tmp:
        if isinstance(tensor, TensorMap):
            metatensor.save(tmp, tensor)
        else:  # metatensor.torch.TensorMap
            import metatensor.torch as metatensor_torch

            metatensor_torch.save(tmp, tensor)


def load(path: str) -> TensorMap:
    """Read a metatensor-core TensorMap; the error names the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such TensorMap file: '{path}'")
    try:
        return metatensor.load(path)
    except Exception as error:  # metatensor raises its own error types
        raise ValueError(f"cannot read TensorMap file '{path}': {error}") from error


def _to_numpy(array):
    """numpy view of a numpy array or (CPU copy of a) torch tensor."""
    if hasattr(array, "detach"):
        return array.detach().cpu().numpy()
    return np.asarray(array)
