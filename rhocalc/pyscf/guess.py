"""Put an expanded (predicted) density to work in PySCF: the initial guess of an
SCF and the energies of one Kohn-Sham diagonalisation.

For an input density ``rho_in = sum_P c_P chi_P`` in an auxiliary basis,
:func:`density_guess` builds the Kohn-Sham matrix of that density in the orbital
basis ``phi_i`` and diagonalises it once::

    F = h + J + V_xc
    h          core Hamiltonian (kinetic, nuclei and the ECPs of the orbital basis)
    J_ij       = sum_P (ij|P) c_P                     three-centre Coulomb integrals
    V_xc,ij    = int v_rho phi_i phi_j                 on a DFT grid (default the SCF's)
                 + int 2 v_sigma grad(rho_in) . grad(phi_i phi_j)   (GGA)
    F C = S C e,  D_out = C f C^T  (aufbau occupations f of the structure's
                                    charge and spin, as the SCF itself uses)

with ``rho_in`` and its gradient evaluated on the grid from the auxiliary
functions, ``v_rho = d e_xc / d rho`` and ``v_sigma = d e_xc / d |grad rho|^2``
from libxc through PySCF's ``numint.eval_xc``. ``D_out`` is the initial guess
(``mf.kernel(dm0=D_out)``). An open-shell structure gets the same (spin-
unpolarised) ``F`` for both spins, occupied with its alpha and beta electron counts.

Two total energies come with it, both in Hartree:

- ``energy_one_shot``: ``E_KS[D_out]``, the Kohn-Sham energy functional of the
  density matrix after the one diagonalisation (one more Coulomb and XC build);
- ``energy_harris``: the Harris-Foulkes energy of ``rho_in``, no further build::

      E_H = sum_i f_i e_i - 1/2 (rho_in|rho_in) - int v_xc[rho_in] rho_in
            + E_xc[rho_in] + E_nn

  with ``(rho_in|rho_in) = c^T M c`` (``M`` the ``int2c2e`` Coulomb metric) and
  ``int v_xc rho_in = int v_rho rho_in + 2 v_sigma |grad rho_in|^2`` on the grid.
  It is stationary at the self-consistent density: its error is second order in
  the density error.

Semi-local functionals only (LDA, GGA): the exact exchange of hybrids and the
kinetic-energy density of meta-GGAs need orbitals, which an expanded density does
not have; those (and Hartree-Fock) are refused by name. The density is set to 0
where the expansion is negative (small tails, about 1e-5 electrons/Bohr^3).
With ECPs (def2 beyond Kr) ``h`` holds them and ``rho_in`` must be the valence
density, as datasets computed with them are.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import List, Optional, Tuple, Union

import ase
import numpy as np
from ase.data import chemical_symbols
from metatensor import TensorMap
from pyscf import dft

from rholearn.basis import BasisSet
from rholearn.dataset import structure_name

from .fit import coulomb_matrix
from .molecule import ao_molecule, aux_coefficients
from .options import PySCFOptions
from .scf import make_mean_field

GUESS_GRID_LEVEL = 0
"""The grid level :class:`ModelGuess` builds its guesses on (see :func:`density_guess`):
for a model's prediction of a 4-water cluster, levels 0, 1 and 2 give the same SCF
cycles (7), level 0 at a seventh of level 1's cost (0.18 against 1.33 CPU seconds;
the SCF: 6 s)."""

MAX_MEMORY_MB = 500
"""Memory of the orbital functions' values on one block of grid points."""


@dataclasses.dataclass
class DensityGuess:
    """What :func:`density_guess` returns.

    Attributes
    ----------
    density_matrix : numpy.ndarray
        ``D_out``, shape (nao, nao) for a closed shell, (2, nao, nao) (alpha,
        beta) otherwise; PySCF's AO order, for ``mf.kernel(dm0=...)``.
    energy_one_shot : float or None
        ``E_KS[D_out]``, Hartree (``None`` unless asked for).
    energy_harris : float
        Harris-Foulkes energy of the input density, Hartree.
    n_electrons : float
        Integral of the input density on the DFT grid.
    seconds : float
        Time of the guess build (integrals, grid, diagonalisation; not the
        one-shot energy).
    """

    density_matrix: np.ndarray
    energy_one_shot: Optional[float]
    energy_harris: float
    n_electrons: float
    seconds: float


def density_guess(
    atoms: ase.Atoms,
    coefficients: Union[TensorMap, np.ndarray],
    basis: BasisSet,
    options: PySCFOptions = PySCFOptions(),
    name: Optional[str] = None,
    one_shot: bool = True,
    grid_level: Optional[int] = None,
) -> DensityGuess:
    """Initial density matrix and one-shot energies from an expanded density.

    Parameters
    ----------
    atoms : ase.Atoms
        The structure, positions in Angstrom; ``info["charge"]`` and
        ``info["spin"]`` as in :func:`rhocalc.pyscf.compute_targets`.
    coefficients : TensorMap or numpy.ndarray
        One structure's coefficients in the layout of :mod:`rholearn.layout`
        (metatensor-core or -torch), or a flat canonical-order vector, of a
        density in electrons/Bohr^3 (e.g. a model's prediction).
    basis : BasisSet
        The (Gaussian) basis of ``coefficients``.
    options : PySCFOptions
        Functional and orbital basis; the grid is the SCF's own (PySCF default).
    name : str, optional
        Names the structure in errors; defaults to the formula.
    one_shot : bool
        Compute ``energy_one_shot`` (one more Coulomb and XC build, about one SCF
        cycle); else it is ``None``.
    grid_level : int, optional
        PySCF grid level (0-9) of the exchange-correlation potential of the
        guess and of the Harris energy; default the SCF's own (PySCF's default
        grid). The auxiliary functions on the grid dominate the guess's cost,
        and the prediction's error its quality: see :data:`GUESS_GRID_LEVEL`.

    Raises
    ------
    ValueError
        Hartree-Fock, a hybrid or a meta-GGA functional (naming it); see also
        :func:`rhocalc.pyscf.molecule.check_structure`.
    KeyError
        An element missing from ``basis`` or the orbital basis (naming it).
    """
    where = structure_name(atoms, name)
    check_functional(options.xc, where)
    basis.check_elements(atoms.get_chemical_symbols(), where)
    start = time.perf_counter()
    molecule = ao_molecule(atoms, options.basis, where)
    aux, c = aux_coefficients(atoms, coefficients, basis)

    mean_field = make_mean_field(molecule, options)
    if grid_level is not None:
        mean_field.grids.level = grid_level
    mean_field.grids.build(with_non0tab=True)
    v_xc, e_xc, v_xc_rho, n_electrons = _xc_on_grid(mean_field, aux, c)
    fock = mean_field.get_hcore() + coulomb_matrix(molecule, aux, c) + v_xc
    overlap = mean_field.get_ovlp()
    restricted = molecule.spin == 0
    energies, orbitals = mean_field.eig(fock if restricted else np.array([fock, fock]), overlap)
    occupations = mean_field.get_occ(energies, orbitals)
    density_matrix = mean_field.make_rdm1(orbitals, occupations)
    seconds = time.perf_counter() - start

    hartree = float(c @ aux.intor("int2c2e", hermi=1) @ c)
    harris = (
        float(np.sum(occupations * energies)) - hartree / 2 - v_xc_rho + e_xc
        + molecule.energy_nuc()
    )
    return DensityGuess(
        density_matrix=density_matrix,
        energy_one_shot=(  # on the SCF's own grid
            float(make_mean_field(molecule, options).energy_tot(density_matrix))
            if one_shot else None
        ),
        energy_harris=float(harris),
        n_electrons=n_electrons,
        seconds=seconds,
    )


@dataclasses.dataclass(frozen=True)
class ModelGuess:
    """Start SCFs from a rholearn model's prediction:
    ``compute_targets(atoms, options, guess=ModelGuess("RUN"))``.

    Holds the model's path only (picklable, for worker processes); each process
    loads the model once.

    Parameters
    ----------
    model : str
        A run folder of ``rholearn train`` or a model file (``RUN/model.pt``).
    """

    model: str

    def __call__(
        self, atoms: ase.Atoms, options: PySCFOptions, name: Optional[str] = None
    ) -> Tuple[np.ndarray, dict]:
        """The initial density matrix of ``atoms`` and what to record in ``info.json``:
        ``scf_guess`` (the model's absolute path), ``predict_seconds``,
        ``guess_seconds``, ``energy_one_shot_hartree`` (on the SCF's grid) and
        ``n_electrons_guess`` (the predicted density's integral on the guess's
        coarse grid). The guess is built on a grid of :data:`GUESS_GRID_LEVEL`,
        too coarse for a Harris energy; ``density_guess`` gives it on the SCF's.

        Raises ``ValueError`` naming the element if the model was not trained on
        one of the structure's elements (:func:`trained_elements`).
        """
        model = load_model(self.model)
        unseen = sorted(set(atoms.get_chemical_symbols()) - set(trained_elements(model)))
        if unseen:
            raise ValueError(
                f"{structure_name(atoms, name)} has element(s) {unseen} the model "
                f"'{self.model}' was not trained on (only {trained_elements(model)})"
            )
        start = time.perf_counter()
        prediction = model.predict([atoms])
        predict_seconds = time.perf_counter() - start
        guess = density_guess(
            atoms, prediction, model.basis, options, name, grid_level=GUESS_GRID_LEVEL
        )
        return guess.density_matrix, {
            "scf_guess": os.path.abspath(self.model),
            "predict_seconds": predict_seconds,
            "guess_seconds": guess.seconds,
            "energy_one_shot_hartree": guess.energy_one_shot,
            "n_electrons_guess": guess.n_electrons,
        }


def trained_elements(model) -> List[str]:
    """The elements a :class:`rholearn.models.DensityModel` has training data for:
    those of its baseline (the mean coefficients of the training structures). Its
    basis may cover more (a dataset's basis is chosen for every element it may
    hold), whose predictions would be untrained."""
    return sorted(chemical_symbols[z] for z in model.baseline.center_types)


@functools.lru_cache(maxsize=4)
def load_model(path: str):
    """The :class:`rholearn.models.DensityModel` of a run folder or model file,
    loaded once per process."""
    from rholearn.cli import load_model as load  # the CLI's imports: only when used

    return load(path)


def check_functional(xc: str, where: str) -> None:
    """Raise ``ValueError`` (naming ``where`` and ``xc``) for functionals whose
    potential is not a function of the density and its gradient alone."""
    numint = dft.numint.NumInt()
    if xc.upper() == "HF":
        kind = "Hartree-Fock (its exchange needs orbitals)"
    elif numint.libxc.is_hybrid_xc(xc):
        kind = "a hybrid functional (its exact exchange needs orbitals)"
    elif numint._xc_type(xc) not in ("LDA", "GGA"):
        kind = f"a {numint._xc_type(xc)} functional (it needs more than the density's gradient)"
    else:
        return
    raise ValueError(
        f"{where}: cannot build the Kohn-Sham matrix of an expanded density for xc={xc!r}, "
        f"{kind}: use an LDA or GGA functional (e.g. 'PBE')"
    )


def _xc_on_grid(mean_field, aux, c: np.ndarray) -> Tuple[np.ndarray, float, float, float]:
    """``(V_xc, E_xc, int v_xc rho_in, N)`` of the expanded density on the mean
    field's grid: the matrix in the orbital basis (nao, nao), the energy and the
    double-counting term (Hartree), and the grid's electron count.

    Blocks of grid points and the screening of functions that vanish on a block
    are PySCF's own (``NumInt.block_loop``, ``make_mask``), as in its SCF.
    """
    molecule, grids = mean_field.mol, mean_field.grids
    xc, numint = mean_field.xc, mean_field._numint
    gga = numint._xc_type(xc) == "GGA"
    half = np.zeros((molecule.nao, molecule.nao))  # V_xc = half + half.T
    e_xc = v_xc_rho = n_electrons = 0.0
    ao_loc = molecule.ao_loc_nr()
    blocks = numint.block_loop(molecule, grids, molecule.nao, deriv=1, max_memory=MAX_MEMORY_MB)
    for orbital, mask, weights, points in blocks:  # orbital: (4, n, nao), values and gradient
        aux_mask = dft.numint.make_mask(aux, points)
        rho = dft.numint.eval_ao(aux, points, deriv=1, non0tab=aux_mask) @ c  # (4, n)
        rho[:, rho[0] < 0] = 0.0
        exc, v_xc = numint.eval_xc(xc, rho if gga else rho[0], spin=0, deriv=1)[:2]
        scaled = np.zeros((4, len(weights)))  # d E_xc / d (rho, grad rho), weighted
        scaled[0] = weights * v_xc[0] / 2
        if gga:
            scaled[1:4] = 2 * weights * v_xc[1] * rho[1:4]
        e_xc += weights @ (exc * rho[0])
        v_xc_rho += 2 * scaled[0] @ rho[0] + np.sum(scaled[1:4] * rho[1:4])
        n_electrons += weights @ rho[0]
        kernel = dft.numint._scale_ao(orbital[: 4 if gga else 1], scaled[: 4 if gga else 1])
        half += dft.numint._dot_ao_ao(molecule, orbital[0], kernel, mask, None, ao_loc)
    return half + half.T, float(e_xc), float(v_xc_rho), float(n_electrons)
