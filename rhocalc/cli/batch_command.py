"""What every backend subcommand shares: dataset arguments, the run, the summary."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

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
    parser.add_argument(
        "--workers", type=positive_int, default=1, metavar="N",
        help="parallel worker processes; each gets CPUs/N OpenMP threads unless "
        "OMP_NUM_THREADS is set (default: 1, in this process)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


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
    if args.workers > 1:  # the worker processes inherit this environment
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    report = run_batch(
        structures, args.out, compute, basis, n_workers=args.workers, progress=not args.quiet,
        settings=settings, locked=locked,
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
