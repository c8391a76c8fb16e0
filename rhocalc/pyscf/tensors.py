"""Molecular tensors of a converged SCF: dipole moment and static polarisability.

Both in atomic units:

- dipole: ``mf.dip_moment(unit="AU")``, in e Bohr, of the nuclei and the SCF
  density, origin at the origin of the coordinates (which matters for charged
  structures only); times :data:`rhocalc.pyscf.properties.DEBYE` for Debye;
- static polarisability ``alpha_ab = d mu_a / d F_b``, in e^2 Bohr^2 / Hartree
  (the atomic unit, often written Bohr^3; 1 a.u. = 0.148185 Angstrom^3): the
  analytic linear response of the SCF (coupled-perturbed Hartree-Fock / Kohn-Sham,
  with the functional's kernel) of the ``pyscf-properties`` extension
  (``pyscf.prop.polarizability``), symmetric by construction.

:func:`tensor_targets` turns them into spherical TensorMaps
(:mod:`rholearn.tensors`: dipole ``o3_lambda = 1``; polarisability
``o3_lambda = 0`` (trace / sqrt(3)) and ``2``), for a dataset's ``dipole.mts``
and ``polarizability.mts``.
"""

from __future__ import annotations

import time
import warnings
from typing import Dict, Sequence, Tuple

import numpy as np
from metatensor import TensorMap
from pyscf import scf

from rholearn import tensors

with warnings.catch_warnings():  # pyscf-properties warns that its modules are "under testing"
    warnings.simplefilter("ignore")
    from pyscf.prop.polarizability import rhf as restricted_response
    from pyscf.prop.polarizability import uhf as unrestricted_response

CPHF_TOLERANCE = 1e-10
"""Convergence threshold of the coupled-perturbed (Krylov) solver of the polarisability."""

CPHF_MAX_CYCLE = 100
"""Krylov iterations of the polarisability's coupled-perturbed equations, at most."""

UNITS = {
    "dipole_au": "e Bohr",
    "polarizability_au": "e^2 Bohr^2 / Hartree (Bohr^3)",
    "dipole.mts": "e Bohr, o3_lambda = 1, m = (-1, 0, 1) = (y, z, x)",
    "polarizability.mts": "e^2 Bohr^2 / Hartree, o3_lambda = 0 (trace / sqrt(3)) and 2",
}
"""Units of the entries :func:`tensor_targets` adds to ``info.json``, and of the files."""


def dipole(mean_field: scf.hf.SCF) -> np.ndarray:
    """Dipole moment of a converged SCF, shape (3,), e Bohr (x, y, z)."""
    return np.asarray(mean_field.dip_moment(unit="AU", verbose=0), dtype=np.float64)


def polarizability(mean_field: scf.hf.SCF) -> np.ndarray:
    """Static dipole polarisability of a converged SCF, shape (3, 3),
    e^2 Bohr^2 / Hartree: the analytic coupled-perturbed response of
    ``pyscf.prop.polarizability`` (restricted or unrestricted, Hartree-Fock or
    Kohn-Sham, density-fitted or not)."""
    module = unrestricted_response if isinstance(mean_field, scf.uhf.UHF) else restricted_response
    response = module.Polarizability(mean_field)
    response.conv_tol = CPHF_TOLERANCE
    response.max_cycle_cphf = CPHF_MAX_CYCLE
    response.verbose = 0
    return np.asarray(response.polarizability(), dtype=np.float64)


COMPUTE = {"dipole": dipole, "polarizability": polarizability}
"""How each of :data:`rholearn.tensors.RANKS` is computed from a converged SCF."""


def tensor_targets(
    mean_field: scf.hf.SCF, names: Sequence[str], system: int = 0
) -> Tuple[Dict[str, TensorMap], Dict[str, object]]:
    """The tensors ``names`` of a converged SCF, spherical, and their Cartesian values.

    Parameters
    ----------
    mean_field : pyscf.scf.hf.SCF
        A converged SCF (:func:`rhocalc.pyscf.scf.run_scf`).
    names : sequence of str
        Keys of :data:`COMPUTE` (``"dipole"``, ``"polarizability"``).
    system : int
        The ``system`` sample of the TensorMaps.

    Returns
    -------
    tensors : dict
        ``name -> TensorMap`` in the layout of :mod:`rholearn.tensors`, atomic units.
    info : dict
        ``<name>_au``: the Cartesian tensor as nested lists (x, y, z), and
        ``tensors_seconds``: the time spent computing them.
    """
    start = time.perf_counter()
    spherical, info = {}, {}
    for name in names:
        cartesian = COMPUTE[name](mean_field)
        spherical[name] = tensors.cartesian_to_tensormap(cartesian[None], [system])
        info[f"{name}_au"] = cartesian.tolist()
    info["tensors_seconds"] = time.perf_counter() - start
    return spherical, info
