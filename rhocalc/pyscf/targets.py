"""Learning targets of one structure from PySCF: SCF, density fit, diagnostics."""

from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

import ase
import numpy as np

from rholearn import layout
from rholearn.basis import BasisSet
from rholearn.dataset import Targets, structure_name

from . import order, realspace
from .basis import basis_set
from .fit import fit_density, function_integrals
from .molecule import aux_molecule
from .options import PySCFOptions
from .overlap import pair_overlap
from .scf import run_scf, total_density_matrix
from .tensors import UNITS as TENSOR_UNITS
from .tensors import tensor_targets

Guess = Callable[[ase.Atoms, PySCFOptions, str], Tuple[np.ndarray, dict]]
"""``guess(atoms, options, name) -> (initial density matrix, entries of info)``."""

UNITS = {
    "positions": "Angstrom",
    "energy_hartree": "Hartree",
    "dipole_debye": "Debye",
    "density": "electrons/Bohr^3",
    "coefficients": "dimensionless, of a density in electrons/Bohr^3 on normalised functions",
    "overlap": "Bohr^3 integrals of products of normalised functions (dimensionless)",
    "timings": "seconds",
    **TENSOR_UNITS,
}


def compute_targets(
    atoms: ase.Atoms,
    options: PySCFOptions = PySCFOptions(),
    system: int = 0,
    name: Optional[str] = None,
    guess: Optional[Guess] = None,
) -> Targets:
    """Run the SCF of a structure and fit its density onto the auxiliary basis.

    Parameters
    ----------
    atoms : ase.Atoms
        The structure, positions in Angstrom. ``atoms.info["charge"]`` and
        ``atoms.info["spin"]`` (unpaired electrons, ``2S``; non-zero runs an
        unrestricted SCF) default to 0.
    options : PySCFOptions
    system : int
        Value of the ``system`` sample of every TensorMap.
    name : str, optional
        Names the structure in errors and ``info``; defaults to its formula.
    guess : callable, optional
        ``guess(atoms, options, name) -> (dm0, info)``: the SCF's initial density
        matrix and entries for ``info`` (e.g. :class:`rhocalc.pyscf.guess.ModelGuess`,
        a model's prediction); default PySCF's own guess.

    Returns
    -------
    Targets
        Coefficients ``c`` of the fit (see :mod:`rhocalc.pyscf.fit`),
        projections ``w = S c`` and overlap ``S`` of the auxiliary basis
        (always the overlap, whatever the fit metric), in the canonical
        layout, and ``info``:

        - ``energy_hartree``, ``converged``, ``n_scf_cycles``, ``dipole_debye``
          (``mf.dip_moment()``, origin at the coordinates' origin): the SCF;
        - ``scf_guess``: PySCF's guess (``"minao"``) or the ``guess``'s record,
          which for :class:`~rhocalc.pyscf.guess.ModelGuess` adds
          ``predict_seconds``, ``guess_seconds`` and the one-shot energy
          (``None`` without a guess: the default guess is part of ``scf_seconds``);
        - ``n_electrons``: electrons of the SCF (explicit ones, with ECPs);
        - ``ecp``: ``{element: basis}`` of the effective core potentials used (the
          orbital basis's own, e.g. def2 beyond Kr), and ``n_core_electrons`` they
          replace: the fitted density is then the valence density;
        - ``n_electrons_fitted``: exact integral of the fitted density;
        - ``n_electrons_scf_grid``, ``n_electrons_fitted_grid``: the same on the grid;
        - ``fit_l1_error_percent``: ``100 * integral |rho_fit - rho_scf| / N``;
        - ``fit_l2_error_percent``: ``100 * ||rho_fit - rho_scf|| / ||rho_scf||``
          with ``||f||^2 = integral f^2`` (the overlap metric);
        - ``scf_seconds``, ``fit_seconds`` (integrals and solve),
          ``diagnostics_seconds`` (the grid);

        both errors integrated on the PySCF grid of level ``options.grid_level``;
        also ``name``, ``formula``, ``system``, ``charge``, ``spin``,
        ``n_aux_functions``, ``options`` and ``units``.

        With ``options.properties``, the molecular tensors of the SCF
        (:func:`rhocalc.pyscf.tensors.tensor_targets`): ``properties`` holds them as
        spherical TensorMaps (atomic units), ``info`` their Cartesian values
        (``dipole_au``, ``polarizability_au``) and ``tensors_seconds``.

    Raises
    ------
    KeyError
        An element is missing from the orbital or auxiliary basis (names the
        structure, element and basis).
    SCFNotConverged
        Names the structure and the number of cycles.
    """
    where = structure_name(atoms, name)
    basis = basis_set(options.auxbasis, atoms.get_chemical_symbols(), where=where)

    guess_info = {"predict_seconds": None, "guess_seconds": None}
    dm0 = None
    if guess is not None:
        dm0, record = guess(atoms, options, where)
        guess_info.update(record)
    start = time.perf_counter()
    scf = run_scf(atoms, options, name, dm0=dm0)
    scf_seconds = time.perf_counter() - start
    guess_info.setdefault("scf_guess", scf.init_guess)

    start = time.perf_counter()
    aux = aux_molecule(atoms, basis)
    pyscf_coefficients = fit_density(
        scf.mol, total_density_matrix(scf), aux, options.metric, options.constrain_electrons
    )
    coefficients = order.vector_to_canonical(pyscf_coefficients, aux)
    overlap, projections = pair_overlap(
        atoms, aux, basis, system, options.overlap_threshold, coefficients
    )
    n_electrons_fitted = float(function_integrals(aux) @ pyscf_coefficients)
    fit_seconds = time.perf_counter() - start

    start = time.perf_counter()
    diagnostics = fit_diagnostics(scf, coefficients, atoms, basis, options.grid_level)
    diagnostics_seconds = time.perf_counter() - start

    properties, properties_info = {}, {}
    if options.properties:
        properties, properties_info = tensor_targets(scf, options.properties, system)

    numbers = atoms.numbers
    info = {
        "name": where,
        "formula": atoms.get_chemical_formula(),
        "system": system,
        "charge": int(scf.mol.charge),
        "spin": int(scf.mol.spin),
        "energy_hartree": float(scf.e_tot),
        "converged": bool(scf.converged),
        "n_scf_cycles": int(scf.cycles),
        "dipole_debye": scf.dip_moment(unit="Debye", verbose=0).tolist(),
        **guess_info,
        "n_electrons": int(scf.mol.nelectron),
        "ecp": dict(scf.mol.ecp),  # {symbol: basis} of the elements with an ECP
        "n_core_electrons": int(sum(scf.mol.atom_nelec_core(i) for i in range(scf.mol.natm))),
        "n_electrons_fitted": n_electrons_fitted,
        **diagnostics,
        "n_aux_functions": int(aux.nao),
        "scf_seconds": scf_seconds,
        "fit_seconds": fit_seconds,
        "diagnostics_seconds": diagnostics_seconds,
        **properties_info,
        "options": options.to_dict(),
        "units": UNITS,
    }
    return Targets(
        coefficients=layout.vector_to_tensormap(coefficients, numbers, basis, system),
        projections=layout.vector_to_tensormap(projections, numbers, basis, system),
        overlap=overlap,
        info=info,
        properties=properties,
    )


def fit_diagnostics(
    scf, coefficients: np.ndarray, atoms: ase.Atoms, basis: BasisSet, grid_level: int
) -> dict:
    """Real-space errors of a fitted density against the SCF density on a grid.

    ``coefficients`` are canonical-order; the keys are those listed in
    :func:`compute_targets`.
    """
    points, weights = realspace.integration_grid(atoms, grid_level)
    rho_scf = realspace.scf_density_at_points(scf, points)
    rho_fit = realspace.density_at_points(coefficients, atoms, basis, points)
    n_electrons = scf.mol.nelectron
    return {
        "n_electrons_scf_grid": realspace.electrons_on_grid(rho_scf, weights),
        "n_electrons_fitted_grid": realspace.electrons_on_grid(rho_fit, weights),
        "fit_l1_error_percent": realspace.real_space_l1_percent(
            rho_fit, rho_scf, weights, n_electrons
        ),
        "fit_l2_error_percent": realspace.real_space_l2_percent(rho_fit, rho_scf, weights),
    }
