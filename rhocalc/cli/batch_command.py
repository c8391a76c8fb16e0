"""What every backend subcommand shares: dataset arguments, the run, the summary."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import sys
from typing import Dict, Iterator, List, Optional

import ase

from rholearn import layout
from rholearn.basis import BasisSet
from rholearn.dataset import read_failures, read_structures
from rhocalc.batch import BatchReport, Compute, run_batch


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Input structures, output folder and parallelism options."""
    parser.add_argument(
        "structures", metavar="STRUCTURES",
        help="structure file in any format ase reads (extxyz, xyz, cif, ...), Angstrom",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR",
        help="dataset folder; rerunning on it skips finished structures and retries "
        "failed ones",
    )
    parser.add_argument(
        "--index", default=":", metavar="SLICE",
        help="which structures of the file, in ase syntax (':' all, '0:10', '::2'); "
        "they are numbered 0, 1, ... in the dataset",
    )
    add_execution_arguments(parser)


def add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how many structures are computed at once, and progress output."""
    parser.add_argument(
        "--workers", type=positive_int, default=1, metavar="N",
        help="parallel workers: local processes, each with CPUs/N OpenMP threads unless "
        "OMP_NUM_THREADS is set (default: 1, in this process); with --executor dask and "
        "no --scheduler, the processes of a local dask cluster; with --executor submitit, "
        "the jobs running at once",
    )
    parser.add_argument(
        "--executor", choices=EXECUTORS, default="process",
        help="where structures are computed: 'process' local processes; 'dask' a "
        "dask.distributed cluster; 'submitit' one job per structure through submitit (SLURM "
        "job arrays, or local processes where SLURM is absent). This process writes the "
        "dataset and must run until the end",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    cluster = parser.add_argument_group(
        "cluster executors", "need the 'cluster' extra: pip install 'rholearn[cluster]'"
    )
    cluster.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="dask: address of a running scheduler (tcp://host:8786) or its scheduler file "
        "(`dask scheduler --scheduler-file FILE`); default: a local cluster of --workers "
        "processes with one thread each",
    )
    cluster.add_argument(
        "--submitit-folder", metavar="DIR",
        help="submitit: job scripts, logs and pickled results, on a file system the compute "
        "nodes share (default: OUT.submitit)",
    )
    cluster.add_argument(
        "--submitit-cluster", choices=["slurm", "local"],
        help="submitit: where jobs run (default: slurm where its commands are found, else "
        "local processes)",
    )
    cluster.add_argument("--slurm-partition", metavar="NAME", help="submitit: SLURM partition")
    cluster.add_argument("--slurm-account", metavar="NAME", help="submitit: SLURM account")
    cluster.add_argument(
        "--slurm-time", type=positive_int, default=60, metavar="MINUTES",
        help="submitit: time limit of the job of one structure",
    )
    cluster.add_argument(
        "--slurm-cpus", type=positive_int, default=1, metavar="N",
        help="submitit: CPUs per job (OpenMP threads of its calculation)",
    )
    cluster.add_argument("--slurm-mem-gb", type=float, metavar="GB", help="submitit: memory per job")
    cluster.add_argument(
        "--slurm-option", action="append", default=[], metavar="KEY=VALUE",
        help="submitit: any other sbatch option, e.g. qos=short or constraint=cpu (repeatable)",
    )


def structures_of(args: argparse.Namespace) -> List[ase.Atoms]:
    """The structures selected by the ``STRUCTURES`` and ``--index`` arguments."""
    return read_structures(args.structures, args.index)


def run_and_summarise(
    args: argparse.Namespace,
    structures: List[ase.Atoms],
    compute: Compute,
    basis: BasisSet,
    settings: Optional[dict] = None,
    locked: bool = False,
) -> int:
    """Run the batch, print a summary (failures on stderr); the exit code.

    ``settings`` and ``locked`` are those of :func:`rhocalc.batch.run_batch`."""
    if args.executor == "submitit":  # SLURM jobs and local processes inherit it
        os.environ.setdefault("OMP_NUM_THREADS", str(args.slurm_cpus))
    elif args.workers > 1:  # the worker processes inherit this environment
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    with executor_of(args) as executor:
        report = run_batch(
            structures, args.out, compute, basis, executor=executor, n_workers=args.workers,
            progress=not args.quiet, settings=settings, locked=locked,
        )
    print(_summary(args.out, len(structures), report))
    failures = read_failures(args.out)
    for index in report.failed:
        failure = failures[index]
        print(
            f"  structure {index} ({failure.structure}) failed: {failure.error}: "
            f"{failure.reason}",
            file=sys.stderr,
        )
    return 0


EXECUTORS = ["process", "dask", "submitit"]
"""Choices of ``--executor``."""


@contextlib.contextmanager
def executor_of(args: argparse.Namespace) -> Iterator[Optional[concurrent.futures.Executor]]:
    """The executor chosen by ``--executor`` and its options, open for the ``with`` block.

    ``None`` for ``process`` (:func:`rhocalc.batch.run_batch` then starts its own
    pool of ``--workers`` processes); dask's ``client.get_executor()`` for
    ``dask``; a ``submitit.AutoExecutor`` for ``submitit``.
    """
    if args.executor == "process":
        yield None
    elif args.executor == "dask":
        distributed = _import_extra("distributed", args.executor)
        if args.scheduler is None:
            cluster = distributed.LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True,
                dashboard_address=None,
            )
            with cluster, distributed.Client(cluster) as client:
                yield client.get_executor()
        else:
            where = (
                {"scheduler_file": args.scheduler} if os.path.isfile(args.scheduler)
                else {"address": args.scheduler}
            )
            with distributed.Client(**where) as client:
                yield client.get_executor()
    else:
        submitit = _import_extra("submitit", args.executor)
        folder = args.submitit_folder or os.path.normpath(args.out) + ".submitit"
        executor = submitit.AutoExecutor(folder, cluster=args.submitit_cluster)
        executor.update_parameters(
            name="rhocalc", timeout_min=args.slurm_time, cpus_per_task=args.slurm_cpus,
            slurm_array_parallelism=args.workers, slurm_partition=args.slurm_partition,
            slurm_account=args.slurm_account,
            slurm_additional_parameters=_key_values(args.slurm_option),
            **({} if args.slurm_mem_gb is None else {"mem_gb": args.slurm_mem_gb}),
        )
        yield executor


def _import_extra(module: str, executor: str):
    try:
        return __import__(module)
    except ImportError as error:
        raise SystemExit(
            f"rhocalc: error: --executor {executor} needs the '{module}' package: "
            f"pip install 'rholearn[cluster]' ({error})"
        ) from error


def _key_values(options: List[str]) -> Dict[str, str]:
    """``["qos=short", ...]`` as ``{"qos": "short", ...}``."""
    pairs = {}
    for option in options:
        key, equals, value = option.partition("=")
        if not equals or not key:
            raise SystemExit(f"rhocalc: error: --slurm-option expects KEY=VALUE, got '{option}'")
        pairs[key] = value
    return pairs


def _summary(out: str, n_structures: int, report: BatchReport) -> str:
    n_failed = len(report.failed)
    lines = [
        f"{n_structures} structures: {len(report.done)} computed, "
        f"{len(report.skipped)} already done, {n_failed} failed",
        f"dataset: {os.path.abspath(out)}  "
        f"({layout.STRUCTURES_FILE}, {layout.BASIS_FILE}, <index>/)",
    ]
    if n_failed:
        lines.append(
            f"failures: {os.path.join(os.path.abspath(out), layout.FAILURES_FILE)} "
            "(rerun the same command to retry them)"
        )
    return "\n".join(lines)


def positive_int(text: str) -> int:
    """argparse type of a count: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
