"""The ``rhocalc`` command: compute a target dataset with one of the backends.

Each backend is one subcommand module with ``add_parser(subparsers)``, which
adds its parser and sets ``handler`` (``args -> exit code``) as a default.
Adding a backend is writing such a module and listing it in :data:`SUBCOMMANDS`.

Exit codes
----------
0   the run finished; structures that failed (if any) are listed on stderr and
    in ``OUT/failures.json``, and a rerun retries them
2   bad input: command line, unreadable structure file, output folder holding
    another dataset (the message on stderr names the file at fault)
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from rhocalc.aims import cli as aims_command
from rhocalc.batch import DatasetError

from . import pyscf_command

SUBCOMMANDS = [pyscf_command, aims_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rhocalc",
        description="Compute density-fitting targets (coefficients, projections, "
        "overlaps) of many structures into a resumable dataset folder.",
    )
    subparsers = parser.add_subparsers(title="backends", required=True, metavar="BACKEND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``rhocalc``; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except DatasetError as error:
        print(f"rhocalc: error: {error}", file=sys.stderr)
        return 2
