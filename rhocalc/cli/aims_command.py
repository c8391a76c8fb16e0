"""``rhocalc aims`` and ``rhocalc aims-parse``: targets from FHI-aims runs.

``rhocalc aims STRUCTURES --out DIR`` runs aims (SCF, then RI fit) for every
structure and writes the dataset; with ``--slurm`` it writes the inputs of each
structure's next step and SLURM array job scripts instead (rerun it after the
jobs to prepare the next step). ``rhocalc aims-parse DIR`` turns finished runs
into the dataset without running aims.
"""

from __future__ import annotations

import argparse
import os
import sys

from rholearn.dataset import exclusive_lock
from rholearn.options import HelpFormatter, add_options_arguments, options_from_arguments
from rhocalc import aims

from . import batch_command

OPTIONS = aims.AimsOptions
"""The options of this backend (``--options FILE``, ``-r``, flags; ``rhocalc defaults aims``)."""


def add_parser(subparsers) -> None:
    """Add the ``aims`` and ``aims-parse`` subcommands to the ``rhocalc`` parser."""
    parser = subparsers.add_parser(
        "aims",
        help="FHI-aims SCF and RI fit onto its product basis (runs aims, or writes SLURM jobs)",
        description="Run FHI-aims on every structure (SCF, then an RI fit of its density "
        "onto aims' product basis, restarted from the SCF density matrix) and write the "
        "targets. aims runs where --command or $ASE_AIMS_COMMAND is set; with --slurm, "
        "the inputs of each structure's next step and SLURM array job scripts are written "
        "instead: submit them, rerun this command to prepare the next step, and run "
        "`rhocalc aims-parse DIR` when all have finished. Structures may carry "
        "info['charge'] (0 by default). See docs/aims.md.",
        formatter_class=HelpFormatter,
    )
    batch_command.add_dataset_arguments(parser)
    add_options_arguments(parser, OPTIONS)
    parser.add_argument(
        "--slurm", action="store_true",
        help="write SLURM array job scripts (DIR/aims-runs/slurm-<step>.sh) instead of "
        "running aims",
    )
    parser.add_argument(
        "--sbatch", action="append", default=[], metavar="ARG",
        help="extra #SBATCH argument of the job scripts, e.g. --sbatch=--time=01:00:00 "
        "(repeatable)",
    )
    parser.add_argument(
        "--setup", action="append", default=[], metavar="LINE",
        help="shell line run before aims in the job scripts, e.g. 'module load aims' "
        "(repeatable)",
    )
    parser.set_defaults(handler=run)

    parse = subparsers.add_parser(
        "aims-parse",
        help="write the dataset from finished FHI-aims runs (of `rhocalc aims`)",
        description="Turn the finished aims runs of a `rhocalc aims` dataset folder into "
        "its targets (basis.json, <index>/), without running aims. Structures whose runs "
        "have not finished are listed as failed; rerun after more runs finish.",
    )
    parse.add_argument("out", metavar="DIR", help="dataset folder of `rhocalc aims`")
    batch_command.add_execution_arguments(parse)
    parse.set_defaults(handler=run_parse)


def run(args: argparse.Namespace) -> int:
    """Handler of ``rhocalc aims``; returns the exit code."""
    try:
        options = options_from_arguments(OPTIONS, args)
        options.resolved_command()  # a bad $ASE_AIMS_COMMAND is an error here, not later
    except ValueError as error:
        print(f"rhocalc aims: error: {error}", file=sys.stderr)
        return 2
    structures = batch_command.structures_of(args)
    if args.slurm:
        jobs = aims.run_dataset(
            structures, args.out, options,
            slurm=aims.SlurmOptions(sbatch=tuple(args.sbatch), setup=tuple(args.setup)),
        )
        for step, path in jobs["scripts"].items():
            print(f"{step} step: submit `sbatch {path}`")
        if not jobs["scripts"]:
            print(f"all aims runs have finished: run `rhocalc aims-parse {args.out}`")
        for index, reason in jobs["failed"].items():
            print(f"  structure {index}: next step not prepared: {reason}", file=sys.stderr)
        return 0
    os.makedirs(args.out, exist_ok=True)
    with exclusive_lock(args.out):  # held from preparing the runs to the last target
        try:
            compute, basis = aims.run.dataset_compute(structures, args.out, options, run=True)
        except aims.AimsRunError as error:
            print(f"rhocalc aims: error: {error}", file=sys.stderr)
            return 2
        return batch_command.run_and_summarise(
            args, structures, compute, basis, settings=aims.run.DATASET_SETTINGS, locked=True
        )


def run_parse(args: argparse.Namespace) -> int:
    """Handler of ``rhocalc aims-parse``; returns the exit code."""
    structures, options = aims.run.read_runs(args.out)
    with exclusive_lock(args.out):  # held from reading the runs to the last target
        compute, basis = aims.run.dataset_compute(structures, args.out, options, run=False)
        return batch_command.run_and_summarise(
            args, structures, compute, basis, settings=aims.run.DATASET_SETTINGS, locked=True
        )
