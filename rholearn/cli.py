"""The ``rholearn`` command: train, evaluate, predict and export from the shell.

    rholearn defaults > options.yaml                 every training option, with its default
    rholearn train options.yaml [-r train.epochs=20] [--model kernel] ...
    rholearn train DATASET [--run RUN] [--n-train N] ...   (default RUN: runs/DATE/TIME)
    rholearn train RUN --resume                       continue a run (or --overwrite)
    rholearn evaluate RUN [--dataset DATASET] [--subset test]
    rholearn predict RUN STRUCTURES [--out DIR] [--index 0,4,7] [--cube --spacing 0.1]
    rholearn export RUN [--out model-atomistic.pt]

``DATASET`` is a folder written by ``rhocalc``; ``RUN`` a training folder
(:mod:`rholearn.run`).

Exit codes: 0 done; 2 bad input, a file that cannot be read or written, or a
training run that diverged (one line on stderr naming the file, argument or
structure at fault); 130 interrupted
(Ctrl-C: a training run keeps its best weights in ``model.pt`` and says how to
resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional, Tuple

import torch
from ase.io.formats import string2index

from . import __version__, distributed, layout, workflow
from .dataset import read_structures
from .export import OUTPUT_NAME, export_atomistic
from .files import error_line, write_json
from .models import DensityModel
from .options import (
    HelpFormatter,
    OptionsError,
    add_flags,
    apply_override,
    dump_yaml,
    flag_overrides,
    from_dict,
    parse_override,
    read_yaml,
    to_dict,
)
from .plots import plot_training_curves
from .run import (
    CHEMISCOPE_FILE,
    CURVES_PLOT,
    EPOCH_LOG_FILE,
    ERRORS_FILE,
    EXPORTED_FILE,
    MODEL_FILE,
    OPTIONS_FILE,
    PARITY_PLOT,
    RunFolder,
)
from .visualise import write_chemiscope


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rholearn", description="Train and use equivariant models of electron densities.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rholearn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_defaults(commands)
    _add_train(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    _add_export(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (OSError, ValueError, KeyError, FloatingPointError) as error:  # the last: diverged
        print(f"rholearn {args.command}: error: {error_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rholearn {args.command}: interrupted", file=sys.stderr)
        return 130


def _subparser(commands, name: str, help_text: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=help_text, description=help_text,
        formatter_class=HelpFormatter,
    )


# ------------------------------------------------------------------ options ---
RUN_KEYS = {"dataset": None, "run": None}
"""Options of ``rholearn train`` besides :class:`~rholearn.workflow.FitOptions`:
the dataset folder (required) and the run folder (default: a new
``runs/<date>/<time>``, :func:`rholearn.run.new_run_path`)."""


def _add_defaults(commands) -> None:
    parser = _subparser(commands, "defaults", "print every training option with its default, "
                        "as YAML (rholearn defaults > options.yaml)")
    parser.set_defaults(handler=_defaults)


def _defaults(args) -> int:
    data = {"dataset": "dataset", "run": RUN_KEYS["run"], **to_dict(workflow.FitOptions())}
    print(dump_yaml(data), end="")
    return 0


def _add_train(commands) -> None:
    parser = _subparser(commands, "train", "train a model on a rhocalc dataset")
    parser.add_argument(
        "source", metavar="OPTIONS_OR_DATASET", nargs="?",
        help="an options file (YAML, see `rholearn defaults`) or a dataset folder",
    )
    parser.add_argument("--dataset", default=argparse.SUPPRESS,
                        help="dataset folder written by rhocalc (overrides the options file)")
    parser.add_argument("--run", metavar="RUN", default=argparse.SUPPRESS,
                        help="output folder of the run (default: the options file's, else a "
                        "new runs/DATE/TIME)")
    parser.add_argument("-r", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="set any option, e.g. -r train.epochs=20 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in RUN (options from RUN/options.yaml; only "
                        "train.epochs, train.learning_rate, ... may change)")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove the run in RUN (its own files only) and start again")
    add_flags(parser, workflow.FitOptions)
    parser.set_defaults(handler=_train)


def read_train_options(args) -> Tuple[str, Optional[str], "workflow.FitOptions"]:
    """The dataset, run folder (``None``: a new one) and options of ``rholearn train``,
    from (in order of precedence) flags, ``-r`` overrides, the options file and the
    defaults. Every problem is raised before any work starts, naming the option or file.
    """
    data: dict = {}
    if args.source and os.path.isfile(os.path.join(args.source, OPTIONS_FILE)):
        data = _run_folder_options(args.source, args.resume or args.overwrite)
    elif args.source and os.path.isdir(args.source):
        data["dataset"] = args.source
    elif args.source:
        data = read_yaml(args.source)
    elif args.resume and os.path.exists(os.path.join(getattr(args, "run", ""), OPTIONS_FILE)):
        data = read_yaml(os.path.join(args.run, OPTIONS_FILE))
    overrides = [parse_override(text) for text in args.override] + flag_overrides(args)
    for name in RUN_KEYS:
        if getattr(args, name, None):
            overrides.append(([name], getattr(args, name)))
    for path, value in overrides:
        apply_override(data, path, value)
    run_keys = {name: data.pop(name, default) for name, default in RUN_KEYS.items()}
    if not run_keys["dataset"]:
        raise ValueError("no dataset: give a dataset folder, --dataset, or 'dataset:' in the options file")
    for name, value in run_keys.items():
        if not isinstance(value, str) and (name == "dataset" or value is not None):
            raise OptionsError(f"option '{name}' must be a path (str), got {value!r}")
    if not os.path.isdir(run_keys["dataset"]):
        raise FileNotFoundError(f"no such dataset folder: '{run_keys['dataset']}'")
    if (args.resume or args.overwrite) and run_keys["run"] is None:
        flag = "--resume" if args.resume else "--overwrite"
        raise OptionsError(f"{flag} needs the run folder: rholearn train RUN {flag} "
                           f"(or --run RUN, or RUN/{OPTIONS_FILE})")
    options = from_dict(workflow.FitOptions, data)
    return run_keys["dataset"], run_keys["run"], options


def _run_folder_options(run: str, resumed: bool) -> dict:
    """The options recorded in the run folder ``run`` (given where a dataset or options
    file is expected), with ``run`` as the run folder; only to resume or overwrite it."""
    if not resumed:
        raise OptionsError(
            f"'{run}' is a run folder, not a dataset: continue it with `rholearn train {run} "
            f"--resume`, start it again with `rholearn train {run} --overwrite`, or repeat it "
            f"in another folder with `rholearn train {os.path.join(run, OPTIONS_FILE)} --run NEW`"
        )
    return {**read_yaml(os.path.join(run, OPTIONS_FILE)), "run": run}


def _train(args) -> int:
    dataset, run, options = read_train_options(args)
    result = workflow.fit(dataset, run, options, resume=args.resume, overwrite=args.overwrite)
    sizes = ", ".join(f"{len(v)} {k}" for k, v in result.split.items())
    if distributed.is_main():  # under torchrun / srun, process 0 speaks for all
        print(f"trained on {sizes}; model: {os.path.join(result.run_dir, MODEL_FILE)}")
    return 0


def _add_evaluate(commands) -> None:
    parser = _subparser(commands, "evaluate", "errors of a trained run on a subset of its "
                        "dataset, with plots and a chemiscope map")
    parser.add_argument("run", metavar="RUN", help="folder of a `rholearn train` run")
    parser.add_argument("--dataset", help="dataset folder (default: the one it was trained on)")
    parser.add_argument("--subset", choices=["train", "val", "test", "all"], default="test",
                        help="structures of the run's split to evaluate")
    parser.add_argument("--no-real-space", action="store_true",
                        help="skip the grid (L1) errors, which rerun the SCF, and the "
                        "one-shot energy and dipole errors of the predicted densities")
    parser.add_argument("--grid-level", type=int, default=3, help="PySCF grid level of the L1 errors")
    parser.set_defaults(handler=_evaluate)


def _evaluate(args) -> int:
    run = RunFolder(args.run)
    model = load_model(args.run)
    with run.locked():  # no training claim or cleanup while the evaluation is written
        return _write_evaluation(args, run, model)


def _write_evaluation(args, run: RunFolder, model: DensityModel) -> int:
    dataset = args.dataset or run.dataset()
    indices = None if args.subset == "all" else run.split()[args.subset]
    out = run.evaluation_dir(args.subset)
    errors = workflow.evaluate(
        model, dataset, indices, real_space=not args.no_real_space, grid_level=args.grid_level,
        out=out,
    )
    path = os.path.join(out, ERRORS_FILE)
    write_json(path, errors)
    frames = read_structures(os.path.join(dataset, layout.STRUCTURES_FILE))
    map_path = os.path.join(out, CHEMISCOPE_FILE)
    rows = errors["structures"]
    summary = errors["summary"]
    write_chemiscope(
        map_path, [frames[row["index"]] for row in rows], rows,
        name=f"rholearn {model.model_type} model: {args.subset} errors ({len(rows)} structures)",
        description=(
            f"run '{os.path.abspath(args.run)}', dataset '{os.path.abspath(dataset)}', basis "
            f"'{model.basis.name}'; set % RMSE {summary.get('rmse_percent', float('nan')):.3f}"
        ),
    )
    log = run.file(EPOCH_LOG_FILE)
    if os.path.exists(log):  # gradient training (the direct solve has no epochs)
        plot_training_curves(log, os.path.join(out, CURVES_PLOT),
                             loss=run.options().get("loss", "overlap"))
    for name, value in summary.items():
        print(f"{name:<24s} {value:.4f}" if isinstance(value, float) else f"{name:<24s} {value}")
    predicted = "coefficients" if model.target == "density" else f"{model.target} (a.u.)"
    print(f"results in {out}: {ERRORS_FILE}, {CHEMISCOPE_FILE}, {PARITY_PLOT}, "
          f"predicted {predicted} per structure")
    return 0


def load_model(path: str) -> DensityModel:
    """A model from a model file or a run folder (its ``model.pt``)."""
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    return DensityModel.load(path)


def _add_export(commands) -> None:
    parser = _subparser(commands, "export", "write a run's model as a metatomic AtomisticModel "
                        "and the TorchScript extensions it needs; "
                        "metatomic.torch.load_atomistic_model(FILE, extensions_directory=DIR) "
                        "loads it without rholearn or featomic")
    parser.add_argument("run", metavar="RUN", help="run folder or model file")
    parser.add_argument("--out", help=f"output file (default: RUN/{EXPORTED_FILE})")
    parser.add_argument("--extensions", metavar="DIR",
                        help="folder for the extensions, replaced if it holds only "
                        "libraries (default: 'extensions' beside the output file)")
    parser.add_argument("--author", action="append", default=[], metavar="NAME",
                        help="author recorded in the model's metadata (repeatable)")
    parser.add_argument("--dtype", choices=["float64", "float32"], default=None,
                        help="precision of the exported model (default: the model's)")
    parser.add_argument("--expansion", choices=["torch", "featomic"], default=None,
                        help="spherical expansion of a contracted descriptor in the export "
                        "(default: the model's); torch: no featomic extension needed")
    parser.set_defaults(handler=_export)


def _export(args) -> int:
    model = load_model(args.run)
    if args.dtype:
        model = model.to(dtype=getattr(torch, args.dtype))
    folder = args.run if os.path.isdir(args.run) else os.path.dirname(args.run)
    out = args.out or os.path.join(folder, EXPORTED_FILE)
    extensions = export_atomistic(model, out, extensions=args.extensions, authors=args.author,
                                  expansion=args.expansion)
    output = OUTPUT_NAME if model.target == "density" else f"rholearn::{model.target}"
    print(f"exported {out} (output '{output}') and its extensions in {extensions}; load "
          f"with metatomic.torch.load_atomistic_model('{out}', "
          f"extensions_directory='{extensions}')")
    return 0


def _add_predict(commands) -> None:
    parser = _subparser(commands, "predict", "predict densities of new structures: one folder "
                        "per structure (named by atoms.info['name'], else its index in the file) "
                        "with coefficients.mts, info.json and, with --cube, density.cube")
    parser.add_argument("model", metavar="MODEL", help="run folder or model file (RUN/model.pt)")
    parser.add_argument("structures", metavar="STRUCTURES", help="any file ase reads (Angstrom)")
    parser.add_argument("--out", help="output folder, one subfolder per structure; it holds one "
                        "prediction: folders of an earlier one are replaced, anything else in "
                        f"the way is refused (default: RUN/{PREDICTIONS_FOLDER}, or "
                        f"{PREDICTIONS_FOLDER}/ beside a model file)")
    parser.add_argument("--index", default=":", help="which structures: an ase slice ('3:5', "
                        "'::2', '-1'), a comma list ('0,4,7') or @FILE (indices in a text file)")
    parser.add_argument("--cube", action="store_true", help="also write density.cube files")
    parser.add_argument("--spacing", type=float, default=0.1, help="cube spacing (Angstrom)")
    parser.set_defaults(handler=_predict)


def _predict(args) -> int:
    model = load_model(args.model)
    frames, indices = _select_structures(args.structures, args.index)
    model_file = os.path.abspath(
        os.path.join(args.model, workflow.MODEL_FILE) if os.path.isdir(args.model) else args.model
    )
    out = args.out or os.path.join(os.path.dirname(model_file), PREDICTIONS_FOLDER)
    earlier = workflow.earlier_predictions(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", workflow.CubeResolutionWarning)
        folders = workflow.predict(model, frames, out, cube=args.cube,
                                   cube_spacing=args.spacing, indices=indices,
                                   model_file=model_file)
    for warning in caught:  # ours as one line, the others as Python shows them
        if issubclass(warning.category, workflow.CubeResolutionWarning):
            print(f"rholearn predict: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)
    if model.target != "density":  # the Cartesian tensors, atomic units
        for folder in folders:
            with open(os.path.join(folder, workflow.PREDICTION_INFO_FILE)) as f:
                values = json.load(f)[f"{model.target}_au"]
            print(f"{os.path.basename(folder)}: {model.target} (a.u.) {values}")
    print(f"predicted {len(folders)} structures into {out}")
    if earlier:
        print(f"replaced the {len(earlier)} earlier prediction folder(s) in {out}")
    return 0


PREDICTIONS_FOLDER = "predictions"
"""``rholearn predict``'s output folder beside the model (``RUN/predictions``)."""


def _select_structures(path: str, index: str) -> Tuple[List, List[int]]:
    """The structures of ``path`` that ``index`` selects (an ase slice or single
    index, a comma list, or ``@FILE`` of whitespace- or comma-separated indices)
    and their (non-negative) indices in the file."""
    if index.startswith("@"):
        try:
            with open(index[1:]) as f:
                index = ",".join(f.read().replace(",", " ").split())
        except OSError as error:
            raise ValueError(f"cannot read the index file '{index[1:]}': {error.strerror}")
    frames = read_structures(path)
    if "," in index or index.strip().lstrip("-").isdigit():
        try:
            selected = [int(i) for i in index.split(",") if i.strip()]
        except ValueError as error:
            raise ValueError(f"--index '{index}' is not a list of integers") from error
        outside = [i for i in selected if not -len(frames) <= i < len(frames)]
        if outside:
            raise ValueError(f"'{path}' holds {len(frames)} structures: no index {outside}")
        indices = [i % len(frames) for i in selected]
    else:
        try:
            indices = list(range(len(frames)))[string2index(index)]
        except (ValueError, TypeError) as error:
            raise ValueError(f"--index '{index}' is not an ase slice or a list of integers") \
                from error
    if not indices:
        raise ValueError(f"no structures in '{path}' at index '{index}'")
    return [frames[i] for i in indices], indices


if __name__ == "__main__":
    sys.exit(main())
