"""``rhocalc pyscf``: targets from PySCF SCF calculations, density-fitted."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import List

import ase

from rholearn.basis import BasisSet

from . import batch_command


def add_parser(subparsers) -> None:
    """Add the ``pyscf`` subcommand to the ``rhocalc`` parser."""
    parser = subparsers.add_parser(
        "pyscf",
        help="SCF with PySCF, density fitted onto an auxiliary basis",
        description="Run a PySCF SCF on every structure and fit its density onto "
        "an auxiliary basis from PySCF's library. Structures may carry "
        "info['charge'] and info['spin'] (unpaired electrons), 0 by default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    batch_command.add_dataset_arguments(parser)
    parser.add_argument("--xc", default="PBE", help="functional (libxc name), or HF")
    parser.add_argument("--basis", default="def2-svp", help="orbital basis")
    parser.add_argument(
        "--auxbasis", default="def2-universal-jkfit", help="auxiliary (fitting) basis"
    )
    parser.add_argument(
        "--metric", choices=["coulomb", "overlap"], default="coulomb",
        help="density-fitting metric",
    )
    parser.add_argument(
        "--constrain-electrons", action="store_true",
        help="fitted density integrates exactly to the number of electrons",
    )
    parser.add_argument("--max-cycle", type=int, default=100, help="maximum SCF cycles")
    parser.add_argument(
        "--conv-tol", type=float, default=1e-9, help="SCF energy convergence (Hartree)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``rhocalc pyscf``; returns the exit code."""
    from rhocalc import pyscf  # imported here: `rhocalc --help` stays fast

    try:
        options = pyscf.PySCFOptions(
            xc=args.xc, basis=args.basis, auxbasis=args.auxbasis, metric=args.metric,
            constrain_electrons=args.constrain_electrons, max_cycle=args.max_cycle,
            conv_tol=args.conv_tol,
        )
    except ValueError as error:
        print(f"rhocalc pyscf: error: {error}", file=sys.stderr)
        return 2
    structures = batch_command.structures_of(args)
    basis = _covered_basis(options.auxbasis, structures)
    compute = functools.partial(pyscf.compute_targets, options=options)
    return batch_command.run_and_summarise(
        args, structures, compute, basis, options.dataset_settings()
    )


def _covered_basis(auxbasis: str, structures: List[ase.Atoms]) -> BasisSet:
    """The auxiliary basis of the elements it covers; the others are reported on
    stderr, and the structures containing them will fail (named in failures.json)."""
    from rhocalc import pyscf

    shells, missing = {}, []
    for symbol in sorted({s for atoms in structures for s in atoms.get_chemical_symbols()}):
        try:
            shells[symbol] = pyscf.basis_set(auxbasis, [symbol]).shells[symbol]
        except KeyError:
            missing.append(symbol)
    if missing:
        print(
            f"rhocalc pyscf: warning: element(s) {missing} not in auxiliary basis "
            f"'{auxbasis}': structures containing them will fail",
            file=sys.stderr,
        )
    return BasisSet(name=auxbasis, shells=shells)
