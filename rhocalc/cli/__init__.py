"""The ``rhocalc`` command: compute a target dataset with one of the backends.

Each backend is one subcommand module with ``add_parser(subparsers)``, which
adds its parser and sets ``handler`` (``args -> exit code``) as a default.
Adding a backend is writing such a module and listing it in :data:`SUBCOMMANDS`.

Exit codes
----------
0   the run finished; structures that failed (if any) are listed on stderr and
    in ``OUT/failures.json``, and a rerun retries them
2   bad input: command line, unreadable structure file, a structure that
    cannot be computed (overlapping atoms, electron count and spin), output
    folder holding another dataset, a file or folder that cannot be read or
    written (one line on stderr names the file, structure or atoms at fault)
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from rholearn import __version__
from rholearn.dataset import DatasetError
from rholearn.files import error_line
from rholearn.options import dump_yaml, to_dict

from . import aims_command, pyscf_command

SUBCOMMANDS = [pyscf_command, aims_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rhocalc",
        description="Compute density-fitting targets (coefficients, projections, "
        "overlaps) of many structures into a resumable dataset folder.",
    )
    parser.add_argument("--version", action="version", version=f"rhocalc {__version__}")
    subparsers = parser.add_subparsers(title="backends", required=True, metavar="BACKEND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    defaults = subparsers.add_parser(
        "defaults", help="print a backend's options with their defaults (YAML), to edit and "
        "pass back with --options FILE",
    )
    defaults.add_argument("backend", choices=sorted(_with_options()))
    defaults.set_defaults(handler=_print_defaults)
    return parser


def _with_options() -> dict:
    """Backend name -> options dataclass, for the subcommands that define one."""
    return {m.__name__.split(".")[-1].replace("_command", ""): m.OPTIONS
            for m in SUBCOMMANDS if hasattr(m, "OPTIONS")}


def _print_defaults(args: argparse.Namespace) -> int:
    print(dump_yaml(to_dict(_with_options()[args.backend]())), end="")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``rhocalc``; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (DatasetError, OSError) as error:
        print(f"rhocalc: error: {error_line(error)}", file=sys.stderr)
        return 2
