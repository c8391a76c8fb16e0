"""Write FHI-aims inputs (``geometry.in``, ``control.in``) of each step, through ase.

Three steps, one run folder each:

``scf``
    Converge the SCF and write the density matrix (``elsi_restart write``).
``ri``
    Restart from that density matrix without a new SCF (``elsi_restart read``,
    ``ri_skip_scf``) and fit the density onto the product basis, writing every
    RI file (``ri_full_output``, ``ri_density_restart write``, overlap as its
    upper triangle with ``ri_ovlp_write_triu``).
``rebuild``
    Read a coefficient vector (``ri_restart_coeffs.out``, ``ri_density_restart
    read 0``) and rebuild its density, so that a predicted density is built and
    scored by aims itself.

Inputs are written for aims >= 240926 (the keywords above). Geometries are in
Angstrom, as in ``geometry.in``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Tuple, Union

import ase
import ase.data
import numpy as np
from ase.calculators.aims import Aims, AimsProfile
from metatensor import TensorMap

from rholearn import layout
from rholearn.basis import BasisSet

from .options import AimsOptions
from .order import AimsOrder, to_aims

STEPS = ("scf", "ri", "rebuild")
REBUILD_COEFFICIENTS = "ri_restart_coeffs.out"
ORBITAL_INFO = "ks_orbital_info.out"
ORBITAL_WEIGHTS = "ks_orbital_weights.in"


def control_parameters(step: str, options: AimsOptions, atoms: ase.Atoms) -> Dict[str, Any]:
    """The ``control.in`` keywords of one step, as ase's aims writer takes them."""
    if step not in STEPS:
        raise ValueError(f"unknown aims step {step!r}, expected one of {STEPS}")
    if atoms.info.get("spin", 0):
        raise ValueError(
            f"{atoms.get_chemical_formula()}: open-shell structures (info['spin'] = "
            f"{atoms.info['spin']}) are not supported by the aims backend"
        )
    parameters: Dict[str, Any] = {
        "xc": options.xc,
        "relativistic": options.relativistic,
        "charge": float(atoms.info.get("charge", 0)),
        "spin": "none",
    }
    if atoms.pbc.any():
        if options.k_grid is None:
            raise ValueError(
                f"{atoms.get_chemical_formula()} is periodic: AimsOptions.k_grid "
                "(--k-grid) is required"
            )
        parameters["k_grid"] = tuple(int(k) for k in options.k_grid)
    prodbas = {"default_prodbas_acc": options.prodbas_acc}
    if options.max_l_prodbas is not None:
        prodbas["default_max_l_prodbas"] = options.max_l_prodbas
    cube = {"output": ["cube total_density"]} if options.cube else {}
    if step == "scf":
        parameters.update({"elsi_restart": "write 1000", **cube})
        if options.orbitals is not None:
            parameters["ri_fit_write_orbital_info"] = True
    elif step == "ri":
        parameters.update({
            "elsi_restart": "read",
            "ri_skip_scf": True,
            "ri_full_output": True,
            "ri_density_restart": "write",
            "ri_ovlp_write_triu": True,
            **prodbas,
        })
        if options.orbitals is not None:
            parameters["ri_fit_field_from_kso_weights"] = True
    else:
        parameters.update({
            "ri_density_restart": "read 0",
            "ri_full_output": True,
            **prodbas,
            **cube,
        })
    parameters.update(options.keywords)
    return parameters


def species_dir_for(atoms: ase.Atoms, options: AimsOptions) -> str:
    """The species-defaults folder, checked to hold a file for every element of ``atoms``."""
    species_dir = options.resolved_species_dir()
    for symbol in sorted(set(atoms.get_chemical_symbols())):
        name = f"{ase.data.atomic_numbers[symbol]:02d}_{symbol}_default"
        if not os.path.isfile(os.path.join(species_dir, name)):
            raise FileNotFoundError(
                f"no FHI-aims species file '{name}' for {symbol} in species directory "
                f"'{species_dir}'"
            )
    return species_dir


def write_inputs(atoms: ase.Atoms, directory: str, step: str, options: AimsOptions) -> None:
    """Write ``geometry.in`` and ``control.in`` of one step into ``directory``.

    Parameters
    ----------
    atoms : ase.Atoms
        The structure, positions in Angstrom; a molecule or a periodic cell.
    directory : str
        The run folder (created if needed).
    step : str
        ``"scf"``, ``"ri"`` or ``"rebuild"``.
    options : AimsOptions
    """
    parameters = control_parameters(step, options, atoms)
    parameters["species_dir"] = species_dir_for(atoms, options)
    # ase's calculator needs a profile; its command is not used to write inputs
    calculator = Aims(profile=AimsProfile(command="aims.x"), directory=directory, **parameters)
    with warnings.catch_warnings():  # ase announces a future move of its aims writers
        warnings.filterwarnings("ignore", message="FHI-aims IO is moving", category=FutureWarning)
        calculator.write_inputfiles(atoms, properties=[])


def write_ri_vector(
    path: str,
    coefficients: Union[np.ndarray, TensorMap],
    atoms: ase.Atoms,
    basis: BasisSet,
    order: Optional[AimsOrder] = None,
) -> None:
    """Write a coefficient vector as aims reads it back (``ri_restart_coeffs.out``).

    Parameters
    ----------
    path : str
    coefficients : numpy.ndarray of shape (N,), or TensorMap
        In canonical order (a flat vector) or the shared block layout (a
        predicted TensorMap of one structure).
    atoms : ase.Atoms
    basis : BasisSet
        The product basis of the structure (from its RI run).
    order : AimsOrder, optional
        aims' order and signs of the target file (default: the canonical order
        of aims >= 240403 files); converted with :func:`rhocalc.aims.order.to_aims`.
    """
    if isinstance(coefficients, np.ndarray):
        vector = coefficients
    else:
        vector = layout.tensormap_to_vector(coefficients, atoms.numbers, basis)
    n = basis.n_functions(atoms.get_chemical_symbols())
    if vector.shape != (n,):
        raise ValueError(
            f"coefficient vector of shape {vector.shape} does not match the {n} functions "
            f"of basis '{basis.name}' on {atoms.get_chemical_formula()}"
        )
    if np.isnan(vector).any():
        raise ValueError(f"coefficients for '{path}' contain NaN")
    order = AimsOrder.identity(n) if order is None else order
    np.savetxt(path, to_aims(vector, order), fmt="%.16e")


def write_orbital_weights(
    directory: str, orbital_info_path: str, orbitals: Tuple[int, int]
) -> None:
    """Write ``ks_orbital_weights.in``: the weight of each Kohn-Sham orbital in the fitted field.

    Orbitals of states ``orbitals[0]..orbitals[1]`` (aims' 1-based state index)
    get their k-point weight, the others 0, so that aims fits the sum of those
    orbital densities. ``ks_orbital_info.out`` (written by the SCF step) has
    one row per orbital: orbital index, state, spin, k-point, k-point weight,
    occupation, energy (eV).
    """
    if not os.path.isfile(orbital_info_path):
        raise FileNotFoundError(
            f"no Kohn-Sham orbital list '{orbital_info_path}' (the SCF step writes it "
            "with ri_fit_write_orbital_info)"
        )
    info = np.loadtxt(orbital_info_path, ndmin=2)
    first, last = orbitals
    states = info[:, 1]
    if not ((states >= first) & (states <= last)).any():
        raise ValueError(
            f"'{orbital_info_path}' has states {int(states.min())}..{int(states.max())}, "
            f"none in the requested window {first}..{last}"
        )
    weights = np.where((states >= first) & (states <= last), info[:, 4], 0.0)
    np.savetxt(os.path.join(directory, ORBITAL_WEIGHTS), weights, fmt="%.16e")
