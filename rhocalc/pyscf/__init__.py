"""PySCF backend of rhocalc: SCF, density fitting onto an auxiliary basis, targets.

Usage::

    from rhocalc.pyscf import PySCFOptions, compute_targets
    targets = compute_targets(ase.build.molecule("H2O"), PySCFOptions(xc="PBE"))
"""

from .basis import basis_set
from .guess import ModelGuess, density_guess
from .options import PySCFOptions
from .properties import dipole_moment, electrostatic_potential
from .scf import SCFNotConverged, run_scf
from .targets import compute_targets

__all__ = [
    "ModelGuess", "PySCFOptions", "SCFNotConverged", "basis_set", "compute_targets",
    "density_guess", "dipole_moment", "electrostatic_potential", "run_scf",
]
