"""Settings of a PySCF target calculation."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Sequence, Tuple, Union

from ase.data import chemical_symbols

from pyscf import dft, gto
from pyscf.lib.exceptions import BasisNotFoundError

from rholearn.layout import OVERLAP_THRESHOLD
from rholearn.options import to_dict as options_to_dict
from rholearn.tensors import RANKS

METRICS = ("coulomb", "overlap")


@dataclasses.dataclass(frozen=True)
class PySCFOptions:
    """How to run the SCF and fit its density onto the auxiliary basis.

    Plain data, picklable, so it can be sent to worker processes.

    Parameters
    ----------
    xc : str
        Exchange-correlation functional known to libxc (``"PBE"``, ``"B3LYP"``,
        ...); ``"HF"`` runs Hartree-Fock.
    basis : str
        Orbital basis from PySCF's library.
    auxbasis : str
        Auxiliary basis from PySCF's library, onto which the density is fitted.
    metric : str
        Fit metric: ``"coulomb"`` minimises ``(rho - rho_fit | 1/r12 | rho - rho_fit)``,
        ``"overlap"`` minimises ``||rho - rho_fit||^2`` (L2).
    constrain_electrons : bool
        Add a Lagrange multiplier so the fitted density integrates exactly to the
        number of electrons.
    conv_tol : float
        SCF energy convergence threshold (Hartree).
    max_cycle : int
        Maximum number of SCF cycles; more raises ``SCFNotConverged``.
    overlap_threshold : float
        Atom pairs whose auxiliary overlap block has no element above this are not
        stored (see :func:`rholearn.layout.matrix_to_pair_tensormap`).
    grid_level : int
        PySCF integration-grid level (0-9) of the fit diagnostics.
    scf_density_fit : bool
        Run the SCF itself with density fitting (``mf.density_fit``) in ``auxbasis``.
    properties : str or tuple of str
        Molecular tensors to write besides the density, by default none: ``dipole``,
        ``polarizability`` or both, comma-separated (``dipole,polarizability``) or a list;
        files ``dipole.mts``, ``polarizability.mts`` in atomic units
        (:mod:`rhocalc.pyscf.tensors`). Stored as a tuple in the order of
        :data:`rholearn.tensors.RANKS`.
    """

    xc: str = "PBE"
    basis: str = "def2-svp"
    auxbasis: str = "def2-universal-jkfit"
    metric: str = "coulomb"
    constrain_electrons: bool = False
    conv_tol: float = 1e-9
    max_cycle: int = 100
    overlap_threshold: float = OVERLAP_THRESHOLD
    grid_level: int = 3
    scf_density_fit: bool = False
    properties: Union[str, Tuple[str, ...]] = ()

    def __post_init__(self):
        object.__setattr__(self, "properties", _property_names(self.properties))
        if self.metric not in METRICS:
            raise ValueError(f"PySCFOptions.metric must be one of {METRICS}, got {self.metric!r}")
        if not self.is_hartree_fock:
            try:
                dft.libxc.parse_xc(self.xc)
            except KeyError as error:
                raise ValueError(f"PySCFOptions.xc: unknown functional {self.xc!r}") from error
        for name in ("basis", "auxbasis"):
            _check_library_basis(name, getattr(self, name))
        if not self.conv_tol > 0:
            raise ValueError(f"PySCFOptions.conv_tol must be > 0, got {self.conv_tol}")
        if not (isinstance(self.max_cycle, int) and self.max_cycle >= 1):
            raise ValueError(
                f"PySCFOptions.max_cycle must be an integer >= 1, got {self.max_cycle!r}"
            )
        if not self.overlap_threshold >= 0:
            raise ValueError(
                f"PySCFOptions.overlap_threshold must be >= 0, got {self.overlap_threshold}"
            )
        if self.grid_level not in range(10):
            raise ValueError(f"PySCFOptions.grid_level must be in 0..9, got {self.grid_level!r}")

    @property
    def is_hartree_fock(self) -> bool:
        return self.xc.upper() == "HF"

    def to_dict(self) -> dict:
        """The options as a JSON-serialisable dict (as it reads back: tuples as lists)."""
        return options_to_dict(self)

    @property
    def ecp(self) -> Optional[str]:
        """The effective core potentials used: ``basis``'s own, for the elements it
        defines them for (def2 bases: beyond Kr); ``None`` for an all-electron basis."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if any(gto.basis.load_ecp(self.basis, s) for s in chemical_symbols[1:]):
                return self.basis
        return None

    def dataset_settings(self) -> dict:
        """The options that define converged targets, for ``run_batch(settings=...)``:
        all but the SCF convergence controls (``conv_tol``, ``max_cycle``) and the
        diagnostics grid, which may change between reruns of a dataset; and the
        ECPs (:attr:`ecp`)."""
        settings = self.to_dict()
        for name in ("conv_tol", "max_cycle", "grid_level"):
            del settings[name]
        if not self.properties:  # recorded when asked for: datasets made before it match
            del settings["properties"]
        return {"backend": "pyscf", **settings, "ecp": self.ecp}


def _property_names(properties: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """``"dipole,polarizability"`` or a sequence of names, checked, as a tuple in the
    order of :data:`~rholearn.tensors.RANKS`."""
    if isinstance(properties, str):
        properties = [name.strip() for name in properties.split(",") if name.strip()]
    unknown = sorted(set(properties) - set(RANKS))
    if unknown:
        raise ValueError(
            f"PySCFOptions.properties: unknown {unknown}; known: {', '.join(RANKS)}"
        )
    return tuple(name for name in RANKS if name in properties)


def _check_library_basis(option: str, name: str) -> None:
    """Raise ``ValueError`` unless PySCF's library knows basis ``name``.

    Loads hydrogen's entry; a known basis that lacks hydrogen passes (missing
    elements are reported per structure, naming it).
    """
    try:
        with warnings.catch_warnings():  # suggestion to install basis-set-exchange
            warnings.simplefilter("ignore")
            gto.basis.load(name, "H")
    except BasisNotFoundError as error:
        if "Unknown basis" in str(error):
            raise ValueError(
                f"PySCFOptions.{option}: basis {name!r} not in PySCF's library"
            ) from error
