"""The ``rholearn`` command: train, evaluate and predict from the shell.

    rholearn train DATASET --run RUN [--model linear] [--loss overlap] [--n-train N] ...
    rholearn evaluate RUN [--dataset DATASET] [--subset test]
    rholearn predict RUN/model.pt STRUCTURES --out DIR [--cube]

``DATASET`` is a folder written by ``rhocalc``; ``RUN`` a training folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


from rhocalc.batch import read_structures  # the CLI composes both packages

from . import layout, workflow
from .files import write_json
from .models import DensityModel
from .train import TrainOptions
from .visualise import write_chemiscope


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rholearn", description="Train and use equivariant models of electron densities."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (FileNotFoundError, ValueError, KeyError, FileExistsError) as error:
        print(f"rholearn {args.command}: error: {error}", file=sys.stderr)
        return 2


def _add_train(commands) -> None:
    parser = commands.add_parser("train", help="train a model on a rhocalc dataset")
    parser.add_argument("dataset", metavar="DATASET", help="folder written by rhocalc")
    parser.add_argument("--run", required=True, metavar="RUN", help="output folder of the run")
    parser.add_argument("--model", choices=["linear", "nonlinear"], default="linear")
    parser.add_argument("--loss", choices=sorted(workflow.LOSSES), default="overlap")
    parser.add_argument("--n-train", type=int, help="training structures (default 80 %%)")
    parser.add_argument("--n-val", type=int, help="validation structures (default 10 %%)")
    parser.add_argument("--n-test", type=int, help="test structures (default: the rest)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--hypers", metavar="JSON", help="lambda-SOAP hypers file (featomic)")
    parser.add_argument("--optimizer", choices=["adam", "lbfgs"], default="lbfgs")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="default 1.0 for LBFGS, 1e-2 for Adam")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.set_defaults(handler=_train)


def _train(args) -> int:
    hypers = None
    if args.hypers:
        with open(args.hypers) as f:
            hypers = json.load(f)
    learning_rate = args.learning_rate
    if learning_rate is None:
        learning_rate = 1.0 if args.optimizer == "lbfgs" else 1e-2
    options = workflow.FitOptions(
        model=args.model,
        loss=args.loss,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        split_seed=args.split_seed,
        hypers=hypers,
        train=TrainOptions(
            epochs=args.epochs,
            optimizer=args.optimizer,
            learning_rate=learning_rate,
            batch_size=args.batch_size,
            scheduler=None if args.optimizer == "lbfgs" else "plateau",
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
        ),
    )
    result = workflow.fit(args.dataset, args.run, options, resume=args.resume)
    sizes = ", ".join(f"{len(v)} {k}" for k, v in result.split.items())
    print(f"trained on {sizes}; model: {os.path.join(args.run, workflow.MODEL_FILE)}")
    return 0


def _add_evaluate(commands) -> None:
    parser = commands.add_parser("evaluate", help="errors of a trained run on its test set")
    parser.add_argument("run", metavar="RUN", help="folder of a `rholearn train` run")
    parser.add_argument("--dataset", help="dataset folder (default: the one it was trained on)")
    parser.add_argument("--subset", choices=["train", "val", "test", "all"], default="test")
    parser.add_argument("--no-real-space", action="store_true",
                        help="skip the grid (L1) errors, which rerun the SCF")
    parser.add_argument("--grid-level", type=int, default=3)
    parser.set_defaults(handler=_evaluate)


def _evaluate(args) -> int:
    model = DensityModel.load(os.path.join(args.run, workflow.MODEL_FILE))
    with open(os.path.join(args.run, workflow.SPLIT_FILE)) as f:
        split = json.load(f)
    dataset = args.dataset or _trained_dataset(args.run)
    indices = None if args.subset == "all" else split[args.subset]
    errors = workflow.evaluate(
        model, dataset, indices, real_space=not args.no_real_space, grid_level=args.grid_level
    )
    path = os.path.join(args.run, f"errors_{args.subset}.json")
    write_json(path, errors)
    frames = read_structures(os.path.join(dataset, layout.STRUCTURES_FILE))
    map_path = os.path.join(args.run, f"errors_{args.subset}.chemiscope.json.gz")
    rows = errors["structures"]
    write_chemiscope(map_path, [frames[row["index"]] for row in rows], rows, name=args.run)
    for name, value in errors["summary"].items():
        print(f"{name:<24s} {value:.4f}" if isinstance(value, float) else f"{name:<24s} {value}")
    print(f"per-structure errors: {path}; chemiscope map: {map_path}")
    return 0


def _trained_dataset(run: str) -> str:
    path = os.path.join(run, workflow.FIT_FILE)
    with open(path) as f:
        return json.load(f)["dataset"]


def _add_predict(commands) -> None:
    parser = commands.add_parser("predict", help="predict densities of new structures")
    parser.add_argument("model", metavar="MODEL", help="model file (RUN/model.pt)")
    parser.add_argument("structures", metavar="STRUCTURES", help="any file ase reads (Angstrom)")
    parser.add_argument("--out", required=True, help="output folder, one subfolder per structure")
    parser.add_argument("--index", default=":", help="ase slice of the structures")
    parser.add_argument("--cube", action="store_true", help="also write density.cube files")
    parser.add_argument("--spacing", type=float, default=0.2, help="cube spacing (Angstrom)")
    parser.set_defaults(handler=_predict)


def _predict(args) -> int:
    model = DensityModel.load(args.model)
    frames = read_structures(args.structures, args.index)
    folders = workflow.predict(model, frames, args.out, cube=args.cube, cube_spacing=args.spacing)
    print(f"predicted {len(folders)} structures into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
