"""Time the PySCF targets of single molecules (SCF, density fit, grid check); print a table, write JSON.

Cases: ``--n-waters`` distorted water molecules
(:func:`rhocalc.structures.distorted_waters`) and, optionally, larger molecules
from ase's collection (``--molecules C6H6``). Each one runs
:func:`rhocalc.pyscf.compute_targets` (default PBE/def2-svp, density fitted
onto def2-universal-jkfit) in a pool of ``--workers`` spawned processes with
``--threads`` OpenMP threads each. The timings are those ``compute_targets``
records in ``Targets.info``: ``scf_seconds`` (the SCF), ``fit_seconds`` (the
auxiliary integrals, the fit and the overlap) and ``diagnostics_seconds``
(the real-space check on a grid, not needed for training); also the number
of auxiliary functions, the fitted electron count and the L1 error of the fit
against the SCF density.

Usage::

    python benchmarks/pyscf_targets.py [--n-waters 5] [--molecules C6H6] [--threads 1]
                                       [--output FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import time

import ase.build
import pyscf

from rhocalc.pyscf import PySCFOptions, compute_targets
from rhocalc.pyscf.molecule import ao_molecule
from rhocalc.structures import distorted_waters

INFO_KEYS = (
    "n_scf_cycles", "n_aux_functions", "n_electrons", "n_electrons_fitted",
    "fit_l1_error_percent", "fit_l2_error_percent", "scf_seconds", "fit_seconds",
    "diagnostics_seconds",
)
"""Entries of ``Targets.info`` reported for every molecule."""

WATER_SUMMARY = ("scf_seconds", "fit_seconds", "diagnostics_seconds", "fit_l1_error_percent")
"""Entries summarised over the waters by their median (robust to the first
calculation of a worker, which also loads libraries)."""

OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
"""Git-ignored folder of the benchmarks' results."""


def cases(n_waters: int, molecules, seed: int):
    """``(name, atoms)``: distorted waters, then the named ase molecules (Angstrom)."""
    waters = [(atoms.info["name"], atoms) for atoms in distorted_waters(n_waters, seed)]
    return waters + [(name, ase.build.molecule(name)) for name in molecules]


def compute_all(named_frames, options: PySCFOptions, workers: int, threads: int):
    """``Targets.info`` of every structure, computed in spawned worker processes.

    Returns the infos, the wall time of the whole pool in seconds, and the
    OpenMP threads PySCF reports inside a worker.
    """
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned workers
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        worker_threads = pool.submit(pyscf.lib.num_threads).result()  # also starts the pool
        start = time.perf_counter()
        futures = [
            pool.submit(compute_targets, atoms, options, system, name)
            for system, (name, atoms) in enumerate(named_frames)
        ]
        infos = [future.result().info for future in futures]
        wall_seconds = time.perf_counter() - start
    return infos, wall_seconds, worker_threads


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-waters", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="of the distorted waters")
    parser.add_argument("--molecules", nargs="*", default=[], metavar="NAME",
                        help="more molecules, by ase.build.molecule name (C6H6, CH3CH2OH, ...)")
    parser.add_argument("--xc", default="PBE")
    parser.add_argument("--basis", default="def2-svp")
    parser.add_argument("--auxbasis", default="def2-universal-jkfit")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per process")
    parser.add_argument("--output", default=os.path.join(OUTPUT_DIR, "pyscf_targets.json"))
    args = parser.parse_args()
    options = PySCFOptions(xc=args.xc, basis=args.basis, auxbasis=args.auxbasis)
    named_frames = cases(args.n_waters, args.molecules, args.seed)
    infos, wall_seconds, worker_threads = compute_all(
        named_frames, options, args.workers, args.threads
    )

    results = []
    for (name, atoms), info in zip(named_frames, infos):
        results.append({
            "name": name,
            "formula": atoms.get_chemical_formula(),
            "atoms": len(atoms),
            "n_orbital_functions": int(ao_molecule(atoms, options.basis, name).nao),
            **{key: info[key] for key in INFO_KEYS},
        })
    waters = results[: args.n_waters]
    water_medians = {key: statistics.median(r[key] for r in waters) for key in WATER_SUMMARY}

    print(f"{args.xc}/{args.basis} fitted onto {args.auxbasis} (Coulomb metric); "
          f"{args.workers} worker(s) x {worker_threads} OpenMP thread(s); pyscf {pyscf.__version__}")
    header = ("molecule", "atoms", "n_ao", "n_aux", "cycles", "scf s", "fit s", "grid s",
              "N", "N fitted", "L1 %")
    print("{:>12} {:>5} {:>5} {:>5} {:>6} {:>7} {:>7} {:>7} {:>4} {:>9} {:>6}".format(*header))
    for r in results:
        print(f"{r['name']:>12} {r['atoms']:>5} {r['n_orbital_functions']:>5} "
              f"{r['n_aux_functions']:>5} {r['n_scf_cycles']:>6} {r['scf_seconds']:>7.3f} "
              f"{r['fit_seconds']:>7.3f} {r['diagnostics_seconds']:>7.3f} {r['n_electrons']:>4} "
              f"{r['n_electrons_fitted']:>9.4f} {r['fit_l1_error_percent']:>6.3f}")
    print(f"{'water median':>12} {'':>5} {'':>5} {'':>5} {'':>6} "
          f"{water_medians['scf_seconds']:>7.3f} {water_medians['fit_seconds']:>7.3f} "
          f"{water_medians['diagnostics_seconds']:>7.3f} {'':>4} {'':>9} "
          f"{water_medians['fit_l1_error_percent']:>6.3f}")
    print(f"wall time of the pool: {wall_seconds:.2f} s for {len(results)} molecule(s)")

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(
            {"options": options.to_dict(), "workers": args.workers,
             "omp_threads_per_worker": worker_threads, "cpu_count": os.cpu_count(),
             "pyscf": pyscf.__version__, "wall_seconds": wall_seconds,
             "water_medians": water_medians, "results": results},
            f,
            indent=1,
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
