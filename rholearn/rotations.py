"""Wigner D matrices in the real spherical-harmonic basis of featomic/metatensor.

The matrices are built by coupling the ``l = 1`` representation (the Cartesian
rotation in featomic's ``(y, z, x)`` order) with featomic's own Clebsch-Gordan
coefficients, ``D^l = C^T (D^{l-1} (x) D^1) C``. They are therefore consistent,
sign for sign, with every equivariant product featomic computes.

Convention: a function ``f`` expanded as ``f(r) = sum_m c_m Y_lm(r)`` becomes
``f(R^-1 r)`` after rotating space by ``R``; its coefficients are ``D^l(R) c``.
"""

from __future__ import annotations

from typing import List

import numpy as np
from featomic.clebsch_gordan import calculate_cg_coefficients

# featomic orders the l = 1 real harmonics as (y, z, x)
_YZX = [1, 2, 0]


def wigner_d_matrices(rotation: np.ndarray, max_l: int) -> List[np.ndarray]:
    """Real Wigner D matrices ``D^l(R)`` for ``l = 0 .. max_l``.

    Parameters
    ----------
    rotation : numpy.ndarray, shape (3, 3)
        A proper rotation matrix acting on Cartesian column vectors.
    max_l : int

    Returns
    -------
    list of numpy.ndarray
        ``D[l]`` of shape ``(2l+1, 2l+1)``, rows and columns ordered m = -l..l.
    """
    rotation = np.asarray(rotation, dtype=np.float64)
    if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-10) or np.linalg.det(
        rotation
    ) < 0:
        raise ValueError("wigner_d_matrices needs a proper rotation matrix (det = +1)")
    d_matrices = [np.ones((1, 1))]
    if max_l == 0:
        return d_matrices
    d_one = rotation[np.ix_(_YZX, _YZX)]
    d_matrices.append(d_one)
    cg = calculate_cg_coefficients(max_l, "python-dense", "numpy", np.float64, "cpu")
    for l in range(2, max_l + 1):
        coupling = cg.block({"l1": l - 1, "l2": 1, "lambda": l}).values[0, ..., 0]
        coupling = coupling.reshape(3 * (2 * l - 1), 2 * l + 1)  # (m1 m2, mu)
        product = np.kron(d_matrices[l - 1], d_one)
        # C is an isometry onto the lambda = l subspace: D^l = C^T (D (x) D) C
        norm = coupling.T @ coupling
        d_matrices.append(np.linalg.solve(norm, coupling.T @ product @ coupling))
    return d_matrices


def random_rotation(seed: int) -> np.ndarray:
    """A uniformly random proper rotation matrix, reproducible from ``seed``."""
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=seed).as_matrix()


def rotate_blocks(tensor, rotation: np.ndarray, inversion: bool = False):
    """Apply ``D^l(R)`` to the ``o3_mu`` axis of every block of a spherical TensorMap.

    For ``inversion=True`` the transformation is the improper ``-R`` (a rotation
    followed by inversion): blocks also pick up ``o3_sigma * (-1)^l``.
    Works on metatensor-core (numpy) and metatensor-torch TensorMaps.
    """
    max_l = int(max(tensor.keys.column("o3_lambda")))
    d_matrices = wigner_d_matrices(rotation, max_l)
    if hasattr(tensor.block(0).values, "detach"):
        import metatensor.torch as backend
    else:
        import metatensor as backend
    blocks = []
    for key, block in tensor.items():
        l = int(key["o3_lambda"])
        values = block.values
        d = d_matrices[l]
        if inversion:
            d = d * int(key["o3_sigma"]) * (-1) ** l
        if hasattr(values, "detach"):  # torch
            import torch

            d = torch.as_tensor(d, dtype=values.dtype, device=values.device)
            rotated = torch.einsum("ij,sjp->sip", d, values)
        else:
            rotated = np.einsum("ij,sjp->sip", d, values)
        blocks.append(
            backend.TensorBlock(
                values=rotated,
                samples=block.samples,
                components=block.components,
                properties=block.properties,
            )
        )
    return backend.TensorMap(tensor.keys, blocks)
