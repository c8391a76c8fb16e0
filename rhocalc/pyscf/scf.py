"""Self-consistent field calculation of one structure."""

from __future__ import annotations

from typing import Optional

import ase
import numpy as np
from pyscf import dft, gto, scf

from rholearn.dataset import structure_name

from .molecule import ao_molecule
from .options import PySCFOptions


class SCFNotConverged(RuntimeError):
    """The SCF did not converge within ``PySCFOptions.max_cycle`` cycles."""


def run_scf(
    atoms: ase.Atoms,
    options: PySCFOptions = PySCFOptions(),
    name: Optional[str] = None,
    dm0: Optional[np.ndarray] = None,
) -> scf.hf.SCF:
    """Run a converged Hartree-Fock or Kohn-Sham calculation.

    Restricted for ``spin == 0``, unrestricted otherwise (charge and spin from
    ``atoms.info``). Elements for which the orbital basis defines an effective
    core potential (def2 beyond Kr) get it, so ``mf.mol.nelectron`` counts the
    valence electrons only (see :func:`~rhocalc.pyscf.molecule.ao_molecule`).

    Parameters
    ----------
    atoms : ase.Atoms
        The structure, positions in Angstrom.
    options : PySCFOptions
    name : str, optional
        Named in errors; defaults to the chemical formula.
    dm0 : numpy.ndarray, optional
        Initial AO density matrix, shape (nao, nao) (restricted) or (2, nao, nao)
        (unrestricted), e.g. from :func:`rhocalc.pyscf.guess.density_guess`;
        default PySCF's own initial guess (``mf.init_guess``, ``"minao"``).

    Returns
    -------
    pyscf.scf.hf.SCF
        The converged mean-field object (``.mol``, ``.make_rdm1()``, ``.e_tot``
        in Hartree, ``.cycles``).

    Raises
    ------
    SCFNotConverged
        Naming the structure and the number of cycles.
    KeyError
        An element is missing from ``options.basis``.
    ValueError
        Before any SCF: overlapping atoms, or charge and spin that do not fit the
        electron count (:func:`~rhocalc.pyscf.molecule.check_structure`).
    """
    where = structure_name(atoms, name)
    molecule = ao_molecule(atoms, options.basis, where)
    mean_field = make_mean_field(molecule, options)
    mean_field.kernel(dm0=dm0)
    if not mean_field.converged:
        raise SCFNotConverged(
            f"{where}: {options.xc}/{options.basis} SCF not converged after "
            f"{mean_field.cycles} cycles (max_cycle={options.max_cycle}, "
            f"conv_tol={options.conv_tol})"
        )
    return mean_field


def total_density_matrix(mean_field: scf.hf.SCF) -> np.ndarray:
    """Spin-summed AO density matrix, shape (nao, nao), PySCF order."""
    density_matrix = mean_field.make_rdm1()
    return density_matrix.sum(axis=0) if density_matrix.ndim == 3 else density_matrix


def make_mean_field(molecule: gto.Mole, options: PySCFOptions) -> scf.hf.SCF:
    """The (not yet run) mean-field object of ``options`` for a built molecule:
    RHF/RKS for ``molecule.spin == 0``, else UHF/UKS, with the convergence controls."""
    restricted = molecule.spin == 0
    if options.is_hartree_fock:
        mean_field = scf.RHF(molecule) if restricted else scf.UHF(molecule)
    else:
        mean_field = dft.RKS(molecule) if restricted else dft.UKS(molecule)
        mean_field.xc = options.xc
    if options.scf_density_fit:
        mean_field = mean_field.density_fit(auxbasis=options.auxbasis)
    mean_field.conv_tol = options.conv_tol
    mean_field.max_cycle = options.max_cycle
    return mean_field
