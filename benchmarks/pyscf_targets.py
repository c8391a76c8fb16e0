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

With ``--clusters``, it also times building the auxiliary overlap alone (no
SCF) of water clusters of that many molecules (:func:`water_cluster`), each in
a fresh spawned process, two ways: the sparse build that ``compute_targets``
uses (:func:`rhocalc.pyscf.overlap.pair_overlap`, with ``S c``), and the dense
one it replaced (the whole ``int1e_ovlp`` matrix, reordered, split into pairs
by :func:`rholearn.layout.matrix_to_pair_tensormap`, and ``S @ c``). Memory is
the peak of ``tracemalloc`` (numpy's arrays included) during the build.

Usage::

    python benchmarks/pyscf_targets.py [--n-waters 5] [--molecules C6H6] [--threads 1]
                                       [--clusters 27 64] [--output FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import time
import tracemalloc

import ase
import ase.build
import numpy as np
import pyscf

from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets, order
from rhocalc.pyscf.molecule import ao_molecule, aux_molecule
from rhocalc.pyscf.overlap import pair_overlap
from rhocalc.structures import distorted_waters
from rholearn import layout
from rholearn.rotations import random_rotation

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


WATER_VOLUME = 18.015 / 0.997 / 0.60221  # Angstrom^3 per molecule in liquid water


def water_cluster(n_waters: int, seed: int = 0) -> ase.Atoms:
    """``n_waters`` randomly oriented waters on a cubic grid at liquid density (Angstrom).

    The molecules sit on the first ``n_waters`` points of a ``k x k x k`` grid
    (``k**3 >= n_waters``) of spacing ``WATER_VOLUME ** (1/3)`` (3.1 Angstrom).
    """
    k = int(np.ceil(round(n_waters ** (1 / 3), 9)))
    grid = np.stack(np.meshgrid(*[np.arange(k)] * 3, indexing="ij"), -1).reshape(-1, 3)
    water = ase.build.molecule("H2O")
    water.positions -= water.get_center_of_mass()
    cluster = ase.Atoms()
    for index, point in enumerate(grid[:n_waters] * WATER_VOLUME ** (1 / 3)):
        molecule = water.copy()
        molecule.positions = molecule.positions @ random_rotation(seed + index).T + point
        cluster += molecule
    return cluster


def overlap_build(n_waters: int, method: str, auxbasis: str) -> dict:
    """Seconds and peak traced MiB of one overlap build (``"sparse"`` or ``"dense"``)."""
    atoms = water_cluster(n_waters)
    basis = basis_set(auxbasis, ["H", "O"])
    aux = aux_molecule(atoms, basis)
    coefficients = np.random.default_rng(0).standard_normal(aux.nao)

    def build():
        if method == "sparse":
            return pair_overlap(atoms, aux, basis, 0, layout.OVERLAP_THRESHOLD, coefficients)
        dense = order.matrix_to_canonical(aux.intor("int1e_ovlp", hermi=1), aux)
        pairs = layout.matrix_to_pair_tensormap(dense, atoms.numbers, basis, 0)
        return pairs, dense @ coefficients

    start = time.perf_counter()
    overlap, _ = build()
    seconds = time.perf_counter() - start
    del overlap
    tracemalloc.start()
    overlap, _ = build()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    samples = np.concatenate([block.samples.values for block in overlap.blocks()])
    return {
        "waters": n_waters, "atoms": len(atoms), "n_aux": int(aux.nao), "method": method,
        "seconds": seconds, "peak_mebibytes": peak / 2**20,
        "stored_atom_pairs": len(np.unique(samples[:, 1:], axis=0)),
        "stored_mebibytes": sum(block.values.nbytes for block in overlap.blocks()) / 2**20,
    }


def time_overlaps(clusters, auxbasis: str):
    """:func:`overlap_build` of each cluster size and method, in fresh processes."""
    os.environ["OMP_NUM_THREADS"] = "1"
    context = multiprocessing.get_context("spawn")
    results = []
    for n_waters in clusters:
        for method in ("dense", "sparse"):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                results.append(pool.submit(overlap_build, n_waters, method, auxbasis).result())
    print(f"auxiliary overlap of water clusters ({auxbasis}, 1 process x 1 thread)")
    print("{:>6} {:>6} {:>6} {:>7} {:>9} {:>9} {:>8} {:>11}".format(
        "waters", "atoms", "n_aux", "method", "build s", "peak MiB", "pairs", "stored MiB"))
    for r in results:
        print(f"{r['waters']:>6} {r['atoms']:>6} {r['n_aux']:>6} {r['method']:>7} "
              f"{r['seconds']:>9.2f} {r['peak_mebibytes']:>9.0f} {r['stored_atom_pairs']:>8} "
              f"{r['stored_mebibytes']:>11.0f}")
    return results


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
    parser.add_argument("--clusters", type=int, nargs="*", default=[], metavar="N_WATERS",
                        help="also time the overlap build alone of water clusters of these sizes")
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
    overlaps = time_overlaps(args.clusters, args.auxbasis) if args.clusters else []

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(
            {"options": options.to_dict(), "workers": args.workers,
             "omp_threads_per_worker": worker_threads, "cpu_count": os.cpu_count(),
             "pyscf": pyscf.__version__, "wall_seconds": wall_seconds,
             "water_medians": water_medians, "results": results,
             "overlap_clusters": overlaps},
            f,
            indent=1,
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
