"""Structures per second of target generation on each executor; print a table, write JSON.

Runs :func:`rhocalc.batch.run_batch` (PySCF, ``--xc``/``--basis``, density fitted on
def2-universal-jkfit, grid check at level 0) on ``--n-waters`` distorted waters
(:func:`rhocalc.structures.distorted_waters`) into a fresh dataset folder with

- ``process pool N``: the default pool of N spawned processes (``n_workers=N``;
  ``n_workers=1`` computes in this process, ``in process``);
- ``dask N``: a dask.distributed ``LocalCluster`` of N worker processes with one
  thread each (``client.get_executor()``);
- ``submitit local`` (with ``--submitit``): submitit's local executor, one process
  per structure, all started at once.

Every worker runs one OpenMP thread. ``start s`` is the time to start the pool or
cluster (for the process pool it is part of the run: workers start on first use);
``run s`` the ``run_batch`` call; ``structures/s`` is ``n / run s``. On a shared
machine the numbers move with the load: compare rows of one run.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/target_generation.py [--n-waters 16] [--workers 1 2]
                                                              [--submitit] [--output FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time

from rhocalc.batch import run_batch
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets
from rhocalc.structures import distorted_waters

OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")


def timed_run(structures, out, compute, basis, executor=None, n_workers=1) -> float:
    start = time.perf_counter()
    report = run_batch(structures, out, compute, basis, executor=executor, n_workers=n_workers,
                       progress=False)
    seconds = time.perf_counter() - start
    if report.failed:
        raise RuntimeError(f"structures {report.failed} failed: see {out}/failures.json")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-waters", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--xc", default="PBE")
    parser.add_argument("--basis", default="def2-svp")
    parser.add_argument("--submitit", action="store_true", help="also submitit's local executor")
    parser.add_argument("--output", default=os.path.join(OUTPUT_DIR, "target_generation.json"))
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every worker
    import distributed

    options = PySCFOptions(xc=args.xc, basis=args.basis, grid_level=0)
    compute = functools.partial(compute_targets, options=options)
    basis = basis_set(options.auxbasis, ["H", "O"])
    structures = distorted_waters(args.n_waters, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        def out(name):
            return os.path.join(scratch, name.replace(" ", "-"))

        for n in args.workers:
            name = "in process" if n == 1 else f"process pool {n}"  # run_batch's n_workers
            print(name, flush=True)
            rows.append({"executor": name, "start_s": None,
                         "run_s": timed_run(structures, out(name), compute, basis, n_workers=n)})
        for n in args.workers:
            name = f"dask {n}"
            print(name, flush=True)
            start = time.perf_counter()
            cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                               dashboard_address=None)
            with cluster, distributed.Client(cluster) as client:
                started = time.perf_counter() - start
                seconds = timed_run(structures, out(name), compute, basis, client.get_executor())
            rows.append({"executor": name, "start_s": started, "run_s": seconds})
        if args.submitit:
            import submitit

            print("submitit local", flush=True)
            executor = submitit.AutoExecutor(out("submitit-jobs"), cluster="local")
            executor.update_parameters(timeout_min=60)
            rows.append({"executor": "submitit local", "start_s": None,
                         "run_s": timed_run(structures, out("submitit"), compute, basis, executor)})

    print(f"\n{args.n_waters} distorted waters, {args.xc}/{args.basis}, def2-universal-jkfit, "
          f"{os.cpu_count()} CPUs, 1 thread per worker")
    print(f"{'executor':18}{'start s':>10}{'run s':>10}{'structures/s':>15}")
    for row in rows:
        row["structures_per_s"] = args.n_waters / row["run_s"]
        start = "-" if row["start_s"] is None else f"{row['start_s']:.1f}"
        print(f"{row['executor']:18}{start:>10}{row['run_s']:>10.1f}{row['structures_per_s']:>15.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"n_waters": args.n_waters, "xc": args.xc, "basis": args.basis,
                   "cpus": os.cpu_count(), "rows": rows}, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
