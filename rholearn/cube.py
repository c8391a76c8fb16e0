"""Gaussian cube files: the grid around a structure, and the file itself, written
slab by slab with fields that never run together.

The box encloses the atoms plus a margin on every side; each axis has
``ceil(extent / spacing)`` points (at least 2) that include both box edges, so
the actual spacing is a little above the requested one. The grid is given in
Angstrom, as ase gives positions; inside the file, as the format requires,
lengths are in Bohr (ase's Bohr radius, so that ase reads the atoms back where
they were).

The format's fields are fixed-width (``I5`` and ``F12.6`` in the header, ``E13.5``
for the values). A value too wide for its field (a coordinate beyond -999.999999
Bohr, a count of 100000 points, a value below 1e-99 with a three-digit exponent)
would run into its neighbour, so every field here starts with a space: it has
the standard width whenever the value fits, and is wider, still separated,
when it does not.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Tuple

import ase
import ase.units
import numpy as np
import tqdm

from .files import atomic_path

CUBE_MARGIN = 3.0
"""Angstrom of empty space around the atoms on each side of the box."""

MAX_CUBE_POINTS = 10**8
"""A cube above this many points is refused (:func:`cube_grid`): about 1.3 GB
of text and, for a density, hours of basis-function evaluations."""

LARGE_CUBE_POINTS = 5 * 10**6
"""A cube from this many points shows its progress while it is written (by slab)."""


@dataclasses.dataclass(frozen=True)
class CubeGrid:
    """An axis-aligned grid: ``origin + (i, j, k) * step`` for ``i < shape[0]``, ...

    Attributes
    ----------
    origin : numpy.ndarray, shape (3,)
        The first point, in Angstrom.
    step : numpy.ndarray, shape (3,)
        The spacing along x, y and z, in Angstrom.
    shape : tuple of int
        Points along x, y and z.
    """

    origin: np.ndarray
    step: np.ndarray
    shape: Tuple[int, int, int]

    @property
    def n_points(self) -> int:
        return math.prod(self.shape)

    @property
    def voxel_bohr3(self) -> float:
        """The volume of one grid cell in Bohr^3 (a density in electrons/Bohr^3
        summed over the grid times this is an electron count)."""
        return float(np.prod(self.step)) / ase.units.Bohr**3

    def slab(self, i: int) -> np.ndarray:
        """The points with x index ``i``, shape ``(shape[1] * shape[2], 3)``, in
        Angstrom, in the file's order (z fastest)."""
        _, ny, nz = self.shape
        y, z = np.meshgrid(np.arange(ny), np.arange(nz), indexing="ij")
        indices = np.stack([np.full(ny * nz, i), y.ravel(), z.ravel()], axis=1)
        return self.origin + indices * self.step


def cube_grid(
    atoms: ase.Atoms, spacing: float, margin: float = CUBE_MARGIN, where: str = "structure"
) -> CubeGrid:
    """The grid of a cube file around ``atoms`` (positions in Angstrom) with about
    ``spacing`` Angstrom between points and ``margin`` Angstrom of space around the
    atoms (see the module docstring).

    Raises
    ------
    ValueError
        If ``spacing`` is not a finite number > 0 or ``margin`` not >= 0; or, naming
        ``where`` (the structure) and a spacing that would do, if the grid would
        have more than :data:`MAX_CUBE_POINTS` points.
    """
    if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) \
            or not math.isfinite(spacing) or spacing <= 0:
        raise ValueError(f"cube spacing must be a length > 0 (Angstrom), got {spacing!r}")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"cube margin must be a length >= 0 (Angstrom), got {margin!r}")
    low = atoms.positions.min(axis=0) - margin
    extent = atoms.positions.max(axis=0) + margin - low
    counts = np.maximum(2.0, np.ceil(extent / spacing))  # floats: a tiny spacing overflows ints
    log_points = float(np.log10(counts).sum())  # the count itself may overflow
    if log_points > math.log10(MAX_CUBE_POINTS):
        fitting = spacing * 10 ** ((log_points - math.log10(MAX_CUBE_POINTS)) / 3)
        digit = 10.0 ** (math.floor(math.log10(fitting)) - 1)  # rounded up to 2 digits
        shape = " x ".join(f"{n:.4g}" for n in counts)
        points = f"{10**log_points:.3g}" if log_points < 300 else f"about 1e{log_points:.0f}"
        box = " x ".join(f"{length:.4g}" for length in extent)
        raise ValueError(
            f"{where}: a cube of spacing {spacing:g} Angstrom would have {shape} = {points} "
            f"points, more than {MAX_CUBE_POINTS:.0e} (a box of {box} Angstrom): use a "
            f"spacing of at least {math.ceil(fitting / digit) * digit:.2g} Angstrom"
        )
    shape = counts.astype(np.int64)
    step = np.where(extent > 0, extent / (shape - 1), spacing)
    return CubeGrid(origin=low, step=step, shape=tuple(int(n) for n in shape))


def write_cube(
    path: str,
    atoms: ase.Atoms,
    grid: CubeGrid,
    function: Callable[[np.ndarray], np.ndarray],
    comment: str,
    progress: bool = False,
) -> float:
    """Write ``function`` on ``grid`` as a cube file, atomically, one x slab at a time.

    Parameters
    ----------
    path : str
        The file.
    atoms : ase.Atoms
        The structure, positions in Angstrom (written in Bohr).
    grid : CubeGrid
        From :func:`cube_grid`.
    function : callable
        ``function(points)`` with points of shape ``(n, 3)`` in Angstrom returns
        the ``n`` values as the file should hold them (a density in electrons/Bohr^3).
    comment : str
        The first line of the file (line breaks become spaces).
    progress : bool
        Show a progress bar (by slab) on stderr.

    Returns
    -------
    float
        The sum of the values times the cell volume in Bohr^3: the electron count
        of a density in electrons/Bohr^3.
    """
    nx, ny, nz = grid.shape
    bohr = ase.units.Bohr
    header = [
        " ".join(comment.split()),
        "values on an x, y, z grid (z fastest); lengths in Bohr",
        f"{len(atoms):5d}" + _fields(grid.origin / bohr),
        *(f"{n:5d}" + _fields(np.eye(3)[axis] * grid.step[axis] / bohr)
          for axis, n in enumerate(grid.shape)),
        *(f"{int(z):5d}" + _fields([0.0, *position / bohr])
          for z, position in zip(atoms.numbers, atoms.positions)),
    ]
    row = "".join(" %12.5E" * len(part) + "\n" for part in np.array_split(
        np.arange(nz), range(6, nz, 6)))
    total = 0.0
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(header) + "\n")
        for i in tqdm.tqdm(range(nx), desc="cube", unit="slab", disable=not progress):
            values = np.asarray(function(grid.slab(i)), dtype=np.float64).reshape(ny * nz)
            total += float(values.sum())
            f.write((row * ny) % tuple(values.tolist()))
    return total * grid.voxel_bohr3


def _fields(values) -> str:
    """Numbers as ``F12.6`` fields, each starting with a space (wider if needed)."""
    return "".join(f" {float(x):11.6f}" for x in values)
