"""Molecular tensors (dipole, polarisability) as Cartesian arrays and as spherical
TensorMaps: the one place converting between the two.

Spherical layout of one or many structures' tensors (per structure, no atoms)
    keys        ``o3_lambda, o3_sigma`` (``o3_sigma`` is 1: both are proper tensors)
    samples     ``system``
    components  ``o3_mu`` (m = -l..l, featomic/metatensor real-harmonic order)
    properties  ``n`` (:data:`rholearn.layout.PROPERTY_NAME`), one entry ``0``, so a
                per-atom model output summed over atoms has the same properties

The conversions are orthogonal (they keep the Frobenius norm, so squared errors
are the same in both forms) and consistent with featomic's Clebsch-Gordan
coefficients, hence with :func:`rholearn.rotations.wigner_d_matrices`:

- a vector ``v`` (the dipole) is ``o3_lambda = 1`` with ``m = (-1, 0, 1) = (y, z, x)``;
- a symmetric rank-2 tensor ``T`` (the polarisability) is ``o3_lambda = 0``:
  ``tr(T) / sqrt(3)``, and ``o3_lambda = 2``: ``m = -2 .. 2`` =
  ``(sqrt(2) T_xy, sqrt(2) T_yz, (2 T_zz - T_xx - T_yy) / sqrt(6), sqrt(2) T_xz,
  (T_xx - T_yy) / sqrt(2))``; its antisymmetric part (``o3_lambda = 1``,
  ``o3_sigma = -1``) is dropped.

The ``o3_lambda = 2`` part is featomic's ``cartesian_to_spherical``; its
``o3_lambda = 0`` part is ``-tr(T) / sqrt(3)``, the opposite sign: here the
isotropic part is positive for a positive-definite polarisability. Units are
the caller's (the arrays' units are the TensorMap's).
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from metatensor import Labels, TensorBlock, TensorMap

from . import layout

KEY_NAMES = ["o3_lambda", "o3_sigma"]
SAMPLE_NAMES = ["system"]

RANKS: Dict[str, int] = {"dipole": 1, "polarizability": 2}
"""The molecular tensors rhocalc computes and rholearn learns, by name, with
their Cartesian rank (dipole: a vector; polarizability: a symmetric 3x3 tensor)."""

LAMBDAS: Dict[int, tuple] = {1: (1,), 2: (0, 2)}
"""The ``o3_lambda`` blocks of a tensor of each Cartesian rank."""

_YZX = [1, 2, 0]  # featomic's m = -1, 0, 1 as Cartesian axes

_R2 = np.sqrt(0.5)
_SYMMETRIC_BASIS = {  # orthonormal symmetric tensors B_m: s_m = sum_ab B_m[a, b] T[a, b]
    0: np.eye(3)[None] / np.sqrt(3.0),
    2: np.array(
        [
            [[0, _R2, 0], [_R2, 0, 0], [0, 0, 0]],  # m = -2: xy
            [[0, 0, 0], [0, 0, _R2], [0, _R2, 0]],  # m = -1: yz
            np.diag([-1.0, -1.0, 2.0]) / np.sqrt(6.0),  # m = 0: 3 z^2 - r^2
            [[0, 0, _R2], [0, 0, 0], [_R2, 0, 0]],  # m = 1: xz
            np.diag([_R2, -_R2, 0.0]),  # m = 2: x^2 - y^2
        ]
    ),
}


def vector_to_spherical(vectors: np.ndarray) -> np.ndarray:
    """Cartesian vectors, shape (..., 3) as (x, y, z), to ``o3_lambda = 1``
    components, shape (..., 3) as m = -1, 0, 1."""
    return np.asarray(vectors, dtype=np.float64)[..., _YZX]


def spherical_to_vector(components: np.ndarray) -> np.ndarray:
    """Inverse of :func:`vector_to_spherical`."""
    vectors = np.empty_like(np.asarray(components, dtype=np.float64))
    vectors[..., _YZX] = components
    return vectors


def symmetric_to_spherical(tensors: np.ndarray) -> Dict[int, np.ndarray]:
    """Symmetric parts of Cartesian rank-2 tensors, shape (..., 3, 3), to
    ``{0: shape (..., 1), 2: shape (..., 5)}`` (the module's conventions)."""
    tensors = np.asarray(tensors, dtype=np.float64)
    return {l: np.einsum("mab,...ab->...m", basis, tensors)
            for l, basis in _SYMMETRIC_BASIS.items()}


def spherical_to_symmetric(components: Dict[int, np.ndarray]) -> np.ndarray:
    """Inverse of :func:`symmetric_to_spherical`: symmetric tensors, shape (..., 3, 3)."""
    return sum(np.einsum("mab,...m->...ab", _SYMMETRIC_BASIS[l], components[l]) for l in (0, 2))


def cartesian_to_tensormap(cartesian: np.ndarray, systems: Sequence[int]) -> TensorMap:
    """Spherical TensorMap of Cartesian tensors, one per structure.

    Parameters
    ----------
    cartesian : numpy.ndarray
        Shape (n, 3) for vectors, (n, 3, 3) for symmetric rank-2 tensors (only their
        symmetric part is kept), in ``x, y, z`` order; any units.
    systems : sequence of int
        The ``system`` sample of each of the ``n`` tensors.

    Returns
    -------
    TensorMap
        Blocks ``o3_lambda = 1`` (vectors), or ``0`` and ``2`` (rank 2), same units.
    """
    cartesian = np.asarray(cartesian, dtype=np.float64)
    systems = np.asarray(systems, dtype=np.int64).reshape(-1, 1)
    if cartesian.shape[1:] == (3,):
        components = {1: vector_to_spherical(cartesian)}
    elif cartesian.shape[1:] == (3, 3):
        components = symmetric_to_spherical(cartesian)
    else:
        raise ValueError(
            f"Cartesian tensors must have shape (n, 3) or (n, 3, 3), got {cartesian.shape}"
        )
    if len(systems) != len(cartesian):
        raise ValueError(f"{len(cartesian)} tensors but {len(systems)} systems")
    blocks = [
        TensorBlock(
            values=values[..., None],
            samples=Labels(SAMPLE_NAMES, systems),
            components=[Labels([layout.COMPONENT_NAME], np.arange(-l, l + 1).reshape(-1, 1))],
            properties=Labels([layout.PROPERTY_NAME], np.zeros((1, 1), dtype=np.int64)),
        )
        for l, values in components.items()
    ]
    keys = np.array([[l, 1] for l in components], dtype=np.int64)
    return TensorMap(Labels(KEY_NAMES, keys), blocks)


def tensormap_to_cartesian(tensor: TensorMap) -> np.ndarray:
    """Inverse of :func:`cartesian_to_tensormap`: shape (n, 3) from an
    ``o3_lambda = 1`` block, (n, 3, 3) from ``o3_lambda = 0`` and ``2`` blocks,
    rows in the order of the blocks' samples (the same in every block).

    Works for metatensor-core and metatensor-torch TensorMaps; returns numpy.
    """
    values, samples = {}, None
    for key, block in tensor.items():
        l = int(key["o3_lambda"])
        block_samples = layout._to_numpy(block.samples.values)
        if samples is None:
            samples = block_samples
        elif not np.array_equal(samples, block_samples):
            raise ValueError(
                f"o3_lambda={l} block has other samples than the first block: the "
                "blocks of one tensor must list the same structures in the same order"
            )
        values[l] = layout._to_numpy(block.values)[..., 0]
    lambdas = tuple(sorted(values))
    if lambdas == LAMBDAS[1]:
        return spherical_to_vector(values[1])
    if lambdas == LAMBDAS[2]:
        return spherical_to_symmetric(values)
    raise ValueError(
        f"a tensor needs blocks o3_lambda={LAMBDAS[1]} (vector) or {LAMBDAS[2]} "
        f"(symmetric rank 2), got {lambdas}"
    )
