"""Cost of the molecular tensor targets (``rhocalc pyscf --properties``) against the SCF.

For small molecules (``ase.build.molecule`` names) and each functional, one process
times the converged SCF (:func:`rhocalc.pyscf.run_scf`, def2-svp, ``conv_tol``
1e-10), the dipole and the analytic polarisability
(:mod:`rhocalc.pyscf.tensors`), and reports the polarisability's isotropic mean
(a.u.) and its time as a multiple of the SCF's. Set ``OMP_NUM_THREADS`` for the
thread count.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/tensor_targets.py --molecules H2O NH3 CH3OH
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import ase.build
import numpy as np

from rhocalc.pyscf import PySCFOptions, run_scf
from rhocalc.pyscf.tensors import dipole, polarizability


def measure(name: str, xc: str) -> dict:
    """SCF, dipole and polarisability times (s) of one molecule and functional."""
    atoms = ase.build.molecule(name)
    start = time.perf_counter()
    scf = run_scf(atoms, PySCFOptions(xc=xc, conv_tol=1e-10))
    scf_seconds = time.perf_counter() - start
    start = time.perf_counter()
    dipole(scf)
    dipole_seconds = time.perf_counter() - start
    start = time.perf_counter()
    alpha = polarizability(scf)
    polarizability_seconds = time.perf_counter() - start
    return {
        "molecule": name, "xc": xc, "n_atoms": len(atoms), "scf_seconds": scf_seconds,
        "dipole_seconds": dipole_seconds, "polarizability_seconds": polarizability_seconds,
        "polarizability_over_scf": polarizability_seconds / scf_seconds,
        "isotropic_polarizability_au": float(np.trace(alpha) / 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", nargs="+", default=["H2O", "NH3", "CH3OH"])
    parser.add_argument("--xc", nargs="+", default=["HF", "PBE"])
    parser.add_argument("--out",
                        default=os.path.join("benchmarks", "output", "tensor_targets.json"))
    args = parser.parse_args()
    rows = [measure(name, xc) for xc in args.xc for name in args.molecules]
    print(f"{'molecule':>9} {'xc':>4} {'SCF s':>7} {'dipole s':>9} {'alpha s':>8} "
          f"{'alpha/SCF':>9} {'alpha_iso a.u.':>14}")
    for row in rows:
        print(f"{row['molecule']:>9} {row['xc']:>4} {row['scf_seconds']:7.2f} "
              f"{row['dipole_seconds']:9.4f} {row['polarizability_seconds']:8.2f} "
              f"{row['polarizability_over_scf']:9.2f} {row['isotropic_polarizability_au']:14.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.node(), "threads": os.environ.get("OMP_NUM_THREADS"),
                   "basis": "def2-svp", "rows": rows}, f, indent=1)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
