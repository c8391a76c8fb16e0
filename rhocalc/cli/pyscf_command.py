"""``rhocalc pyscf``: targets from PySCF SCF calculations, density-fitted."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import List

import ase

from rholearn.basis import BasisSet
from rholearn.dataset import structure_name
from rholearn.options import HelpFormatter, add_options_arguments, options_from_arguments
from rhocalc import pyscf
from rhocalc.pyscf.guess import ModelGuess, check_functional, load_model, trained_elements
from rhocalc.pyscf.molecule import check_structure

from . import batch_command

OPTIONS = pyscf.PySCFOptions
"""The options of this backend (``--options FILE``, ``-r``, flags; ``rhocalc defaults pyscf``)."""


def add_parser(subparsers) -> None:
    """Add the ``pyscf`` subcommand to the ``rhocalc`` parser."""
    parser = subparsers.add_parser(
        "pyscf",
        help="SCF with PySCF, density fitted onto an auxiliary basis",
        description="Run a PySCF SCF on every structure and fit its density onto "
        "an auxiliary basis from PySCF's library. Structures may carry "
        "info['charge'] and info['spin'] (unpaired electrons), 0 by default.",
        formatter_class=HelpFormatter,
    )
    batch_command.add_dataset_arguments(parser)
    parser.add_argument(
        "--guess", metavar="RUN_OR_MODEL",
        help="start every SCF from the density predicted by this rholearn model (a run "
        "folder or model file) instead of PySCF's 'minao' guess; info.json records the "
        "guess, SCF cycles and the prediction, guess and SCF times (LDA/GGA functionals)",
    )
    add_options_arguments(parser, OPTIONS)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``rhocalc pyscf``; returns the exit code."""
    try:
        options = options_from_arguments(OPTIONS, args)
    except ValueError as error:
        print(f"rhocalc pyscf: error: {error}", file=sys.stderr)
        return 2
    structures = batch_command.structures_of(args)
    try:  # before any SCF: a bad structure is bad input, not a failure to retry
        for index, atoms in enumerate(structures):
            check_structure(atoms, f"structure {index} ({structure_name(atoms)})")
    except ValueError as error:
        print(f"rhocalc pyscf: error: {args.structures}: {error}", file=sys.stderr)
        return 2
    guess = None
    if args.guess is not None:
        try:  # before any SCF: a model that cannot start every SCF is bad input
            guess = _model_guess(args.guess, options, structures)
        except (ValueError, FileNotFoundError) as error:
            print(f"rhocalc pyscf: error: --guess {args.guess}: {error}", file=sys.stderr)
            return 2
    basis = _covered_basis(options.auxbasis, structures)
    compute = functools.partial(pyscf.compute_targets, options=options, guess=guess)
    return batch_command.run_and_summarise(
        args, structures, compute, basis, options.dataset_settings()
    )


def _model_guess(path: str, options, structures: List[ase.Atoms]) -> ModelGuess:
    """The guess of the model at ``path``, checked against the functional and every
    structure's elements (``ValueError`` naming the structure and element)."""
    check_functional(options.xc, "--xc")
    model = load_model(path)
    trained = trained_elements(model)
    for index, atoms in enumerate(structures):
        unseen = sorted(set(atoms.get_chemical_symbols()) - set(trained))
        if unseen:
            raise ValueError(
                f"structure {index} ({structure_name(atoms)}) has element(s) {unseen} the "
                f"model was not trained on (only {trained})"
            )
    return ModelGuess(os.path.abspath(path))  # workers may run in another directory


def _covered_basis(auxbasis: str, structures: List[ase.Atoms]) -> BasisSet:
    """The auxiliary basis of the elements it covers; the others are reported on
    stderr, and the structures containing them will fail (named in failures.json)."""
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
