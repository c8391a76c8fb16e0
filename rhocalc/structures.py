"""Small built-in structure sets for examples, tests and benchmarks."""

from __future__ import annotations

from typing import List

import ase
import numpy as np

from rholearn.rotations import random_rotation


def distorted_waters(n: int, seed: int = 0) -> List[ase.Atoms]:
    """``n`` randomly distorted and oriented water molecules, reproducible from ``seed``.

    O-H bonds are drawn uniformly from 0.90-1.05 Angstrom and the H-O-H angle from
    95-115 degrees; each molecule is then rotated by a random rotation. Positions
    in Angstrom; ``atoms.info["name"]`` is ``"water-<i>"``.
    """
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        r1, r2 = rng.uniform(0.90, 1.05, size=2)
        angle = np.radians(rng.uniform(95.0, 115.0))
        positions = np.array(
            [[0.0, 0.0, 0.0], [r1, 0.0, 0.0], [r2 * np.cos(angle), r2 * np.sin(angle), 0.0]]
        )
        atoms = ase.Atoms("OH2", positions=positions @ random_rotation(seed * 100003 + i).T)
        atoms.info["name"] = f"water-{i}"
        frames.append(atoms)
    return frames
