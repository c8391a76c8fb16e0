"""What learning needs from the code that computed a dataset: its backend.

rholearn learns and predicts coefficients without any quantum-chemistry code.
Two things need one: the real-space errors and properties (energies, dipoles) of
:func:`rholearn.workflow.evaluate` (basis functions on a grid, the reference SCF
density, which is rerun, and a Kohn-Sham matrix of the predicted density) and
the cube files and electron counts of :func:`rholearn.workflow.predict`. A :class:`Backend`
provides them. Backends are found through the Python entry-point group
:data:`ENTRY_POINT_GROUP`; a package registers one in its ``pyproject.toml``::

    [project.entry-points."rholearn.backends"]
    pyscf = "rhocalc.pyscf.backend:PySCFBackend"

so rholearn never imports the package that made the targets. Which backend a
dataset needs is named in its ``settings.json`` (``"backend"``); a dataset
written before that entry existed is claimed by the installed backend whose
:meth:`Backend.wrote` recognises its options (:func:`dataset_backend`). A model
file without a dataset picks the backend from its basis (:func:`basis_backend`).
"""

from __future__ import annotations

import abc
import functools
import importlib.metadata
from typing import Dict, List, Optional, Tuple

import ase
import numpy as np
from metatensor import TensorMap

from .basis import BasisSet
from .dataset import read_recorded_options

ENTRY_POINT_GROUP = "rholearn.backends"
"""Entry-point group under which backends are registered (name -> Backend class)."""

INSTALL_HINT = (
    "install a package that registers one under the entry-point group "
    f"'{ENTRY_POINT_GROUP}' (rhocalc, shipped with rholearn, registers 'pyscf', "
    "which needs `pip install pyscf`)"
)


class Backend(abc.ABC):
    """The real-space machinery of one quantum-chemistry code.

    Units as at every ase boundary: points in Angstrom, integration weights in
    Angstrom^3, densities in electrons/Bohr^3.
    """

    name: str = ""
    """The name the backend is registered under and datasets record."""

    grid_levels: Optional[range] = None
    """The levels :meth:`integration_grid` takes (``None``: any integer)."""

    @abc.abstractmethod
    def handles_basis(self, basis: BasisSet) -> bool:
        """Whether densities expanded in ``basis`` can be evaluated in real space."""

    @abc.abstractmethod
    def wrote(self, options: Dict[str, object], basis: BasisSet) -> bool:
        """Whether a dataset with these recorded ``options`` (``settings.json``
        without ``"backend"``, or a structure's ``info.json["options"]``) and this
        basis was written by this backend."""

    @abc.abstractmethod
    def integration_grid(self, atoms: ase.Atoms, level: int) -> Tuple[np.ndarray, np.ndarray]:
        """Integration points (Angstrom, shape ``(n, 3)``) and non-negative weights
        (Angstrom^3, shape ``(n,)``) of a molecular grid of ``level``."""

    @abc.abstractmethod
    def density_at_points(
        self, coefficients: TensorMap, atoms: ase.Atoms, basis: BasisSet, points: np.ndarray
    ) -> np.ndarray:
        """An expanded density (one structure's coefficients, layout of
        :mod:`rholearn.layout`) at ``points`` (Angstrom): shape ``(n,)``."""

    @abc.abstractmethod
    def function_integrals(self, atoms: ase.Atoms, basis: BasisSet) -> np.ndarray:
        """The integral over all space of each basis function of ``atoms``, exact
        (no grid), in the canonical order of :func:`rholearn.layout.tensormap_to_vector`:
        shape ``(n_functions,)``. A density's electron count is this dotted with its
        coefficients."""

    @abc.abstractmethod
    def reference_density(
        self, atoms: ase.Atoms, options: Dict[str, object], points: np.ndarray, name: str
    ) -> Tuple[np.ndarray, float]:
        """The reference (SCF) density of ``atoms`` computed with ``options`` (as a
        structure's ``info.json`` records them) at ``points``, and its electron
        count; ``name`` names the structure in errors."""

    @abc.abstractmethod
    def real_space_l1_percent(
        self, density_a: np.ndarray, density_b: np.ndarray, weights: np.ndarray,
        n_electrons: float,
    ) -> float:
        """``100 * integral |a - b| / N`` on a grid of :meth:`integration_grid`."""

    def density_properties(
        self, atoms: ase.Atoms, coefficients: TensorMap, basis: BasisSet,
        options: Dict[str, object],
    ) -> Dict[str, object]:
        """Properties of an expanded density, computed with ``options`` (as a
        structure's ``info.json`` records them): ``energy_one_shot_hartree`` (the
        total energy after one Kohn-Sham diagonalisation in the density's
        potential), ``energy_harris_hartree`` (its Harris-Foulkes energy), each
        ``None`` where the method cannot, and ``dipole_debye`` (3 floats). The
        default: none (an empty dict)."""
        return {}

    @abc.abstractmethod
    def write_cube(
        self, path: str, atoms: ase.Atoms, coefficients: TensorMap, basis: BasisSet,
        spacing: float, progress: bool = False,
    ) -> float:
        """Write an expanded density as a cube file, atomically, on the grid of
        :func:`rholearn.cube.cube_grid` (spacing in Angstrom) with
        :func:`rholearn.cube.write_cube` (``progress``: a progress bar); returns the
        electrons on the cube (the density summed times the cell volume)."""


def installed_backends() -> List[str]:
    """Names of the registered backends, sorted."""
    return sorted({entry.name for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})


@functools.lru_cache(maxsize=None)
def load_backend(name: str) -> Backend:
    """The backend registered as ``name``.

    Raises
    ------
    ValueError
        If none is registered under ``name``, or it cannot be imported (its
        quantum-chemistry code is missing); the message says what to install.
    """
    entries = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP).select(name=name)
    if not entries:
        raise ValueError(
            f"no rholearn backend '{name}' is installed (installed: "
            f"{installed_backends() or 'none'}); {INSTALL_HINT}"
        )
    entry = next(iter(entries))
    try:
        backend = entry.load()()
    except ImportError as error:
        raise ValueError(
            f"rholearn backend '{name}' ({entry.value}) cannot be loaded: "
            f"{type(error).__name__}: {error}; {INSTALL_HINT}"
        ) from error
    if not isinstance(backend, Backend):
        raise ValueError(f"entry point '{name}' = '{entry.value}' is not a rholearn Backend")
    return backend


def dataset_backend(root: str, basis: BasisSet) -> Backend:
    """The backend that wrote the dataset folder ``root`` (with basis ``basis``).

    ``settings.json`` names it; a dataset without that entry is claimed by the
    installed backend that recognises its recorded options (:meth:`Backend.wrote`).
    """
    options = read_recorded_options(root)
    name = options.get("backend")
    if name is not None:
        return load_backend(str(name))
    claimed = [n for n in installed_backends() if _wrote(n, options, basis)]
    if not claimed:
        raise ValueError(
            f"'{root}' does not name its backend (no 'backend' in its settings.json) and "
            f"no installed backend ({installed_backends() or 'none'}) recognises its options "
            f"{sorted(options)}; {INSTALL_HINT}, or add \"backend\" to its settings.json"
        )
    return load_backend(claimed[0])


def basis_backend(basis: BasisSet) -> Backend:
    """The first installed backend (by name) that evaluates densities in ``basis``."""
    for name in installed_backends():
        try:
            backend = load_backend(name)
        except ValueError:  # registered, but its code is missing: try the others
            continue
        if backend.handles_basis(basis):
            return backend
    raise ValueError(
        f"no installed rholearn backend ({installed_backends() or 'none'}) evaluates "
        f"densities in basis '{basis.name}' in real space; {INSTALL_HINT}"
    )


def _wrote(name: str, options: Dict[str, object], basis: BasisSet) -> bool:
    try:
        return load_backend(name).wrote(options, basis)
    except ValueError:
        return False
