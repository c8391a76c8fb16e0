"""PySCF backend of rhocalc: SCF, density fitting onto an auxiliary basis, targets.

Usage::

    from rhocalc.pyscf import PySCFOptions, compute_targets
    targets = compute_targets(ase.build.molecule("H2O"), PySCFOptions(xc="PBE"))
"""

from .basis import basis_set
from .options import PySCFOptions
from .scf import SCFNotConverged, run_scf
from .targets import compute_targets

__all__ = ["PySCFOptions", "SCFNotConverged", "basis_set", "compute_targets", "run_scf"]
