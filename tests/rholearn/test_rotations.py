"""Real Wigner D matrices in featomic's convention."""

import ase.build
import numpy as np
import pytest
import torch
import featomic.torch
from featomic.torch.clebsch_gordan import EquivariantPowerSpectrum
from metatomic.torch import systems_to_torch

from rholearn.rotations import random_rotation, rotate_blocks, wigner_d_matrices


@pytest.mark.parametrize("seed", [0, 1])
def test_wigner_d_is_a_representation(seed):
    r1, r2 = random_rotation(seed), random_rotation(seed + 100)
    d1, d2, d12 = (wigner_d_matrices(r, 6) for r in (r1, r2, r1 @ r2))
    for l in range(7):
        np.testing.assert_allclose(d1[l] @ d1[l].T, np.eye(2 * l + 1), atol=1e-12)
        np.testing.assert_allclose(d1[l] @ d2[l], d12[l], atol=1e-12)


def test_improper_rotation_is_rejected():
    with pytest.raises(ValueError, match="proper rotation"):
        wigner_d_matrices(-np.eye(3), 2)


def test_featomic_spherical_expansion_rotates_with_wigner_d():
    """Pins the convention against featomic's own real spherical harmonics."""
    hypers = {
        "cutoff": {"radius": 4.0, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
        "density": {"type": "Gaussian", "width": 0.3},
        "basis": {"type": "TensorProduct", "max_angular": 4, "radial": {"type": "Gto", "max_radial": 2}},
    }
    calculator = EquivariantPowerSpectrum(
        featomic.torch.SphericalExpansion(**hypers), dtype=torch.float64
    )
    atoms = ase.build.molecule("CH3CH2OH")
    rotation = random_rotation(7)

    def compute(frame):
        system = systems_to_torch([frame], dtype=torch.float64)
        return calculator.compute(system, neighbors_to_properties=True)

    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    inverted = atoms.copy()
    inverted.positions = -rotated.positions
    reference = compute(atoms)
    for frame, inversion in ((rotated, False), (inverted, True)):
        expected = rotate_blocks(reference, rotation, inversion=inversion)
        actual = compute(frame)
        for key, block in actual.items():
            torch.testing.assert_close(
                block.values, expected.block(key).values, atol=1e-10, rtol=0
            )
