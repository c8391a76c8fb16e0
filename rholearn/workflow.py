"""The whole pipeline in three calls: fit, evaluate, predict.

This module is the top layer: it composes the learning modules of rholearn with
:mod:`rhocalc` (for the real-space errors, which need the quantum-chemistry
basis functions and the SCF density). Everything below it stays free of
quantum-chemistry codes.

Typical use, after ``rhocalc pyscf structures.xyz --out dataset``::

    from rholearn import workflow
    result = workflow.fit("dataset", "run", workflow.FitOptions(n_train=80, n_val=10))
    errors = workflow.evaluate(result.model, "dataset", result.split["test"])
    workflow.predict(result.model, new_frames, "predictions")
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import ase
import torch
import tqdm
from metatensor.torch import TensorMap

from . import layout
from .descriptors import select_system
from .data import (
    StructureDescriptors, TargetFile, check_completed, make_dataset, read_dataset, split_indices,
)
from .files import differing_keys, recorded_json, write_json
from .loss import CoefficientLoss, OverlapLoss, ProjectionLoss
from .metrics import error_summary, overlap_norms
from .models import Baseline, DensityModel
from .train import BEST_CHECKPOINT, LAST_CHECKPOINT, TrainOptions, load_checkpoint, train

LOSSES = {"coefficient": CoefficientLoss, "overlap": OverlapLoss, "projection": ProjectionLoss}
"""Loss functions by name (see :mod:`rholearn.loss`)."""

LOSS_TARGETS = {
    "coefficient": ("coefficients",),
    "overlap": ("coefficients", "overlap"),
    "projection": ("projections", "overlap"),
}
"""The target files each loss reads."""

MODEL_FILE = "model.pt"
SPLIT_FILE = "split.json"
FIT_FILE = "fit.json"
"""The dataset, model options and split of a run (training options: ``options.json``)."""
DESCRIPTOR_CACHE = "descriptors"
SUBSETS = ("train", "val", "test")


@dataclasses.dataclass
class FitOptions:
    """What to train, on which structures (written to ``run_dir/fit.json``).

    Parameters
    ----------
    model : {"linear", "nonlinear"}
        See :class:`rholearn.models.DensityModel`.
    loss : {"overlap", "projection", "coefficient"}
        ``"overlap"``: the real-space L2 error ``dc^T S dc``; ``"projection"``:
        the same up to a constant, from the projections only; ``"coefficient"``:
        plain squared coefficient errors.
    n_train, n_val, n_test : int, optional
        Split sizes (``n_test`` defaults to the rest); without them 80/10/10 %.
    split_seed : int
        Seed of the random split.
    hypers : dict, optional
        lambda-SOAP hypers (featomic ``SphericalExpansion``, Angstrom); default
        :data:`rholearn.descriptors.DEFAULT_HYPERS`.
    model_options : dict
        Passed to the network (``seed``, ``hidden_sizes``, ...).
    train : TrainOptions
        Optimiser, epochs, device, ...
    """

    model: str = "linear"
    loss: str = "overlap"
    n_train: Optional[int] = None
    n_val: Optional[int] = None
    n_test: Optional[int] = None
    split_seed: int = 0
    hypers: Optional[dict] = None
    model_options: dict = dataclasses.field(default_factory=dict)
    train: TrainOptions = dataclasses.field(default_factory=TrainOptions)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got '{self.loss}'")
        if isinstance(self.train, dict):
            self.train = TrainOptions(**self.train)


@dataclasses.dataclass
class FitResult:
    """A trained model (best validation weights), its history and its split."""

    model: DensityModel
    history: List[Dict[str, float]]
    split: Dict[str, List[int]]
    run_dir: str


def fit(
    dataset: str,
    run_dir: str,
    options: FitOptions = FitOptions(),
    resume: bool = False,
    split: Optional[Dict[str, Sequence[int]]] = None,
) -> FitResult:
    """Train a :class:`DensityModel` on a target dataset written by rhocalc.

    Splits the completed structures, fits the invariant baseline on the
    training targets, computes lambda-SOAP descriptors once (cached in
    ``run_dir/descriptors``), trains, and writes ``run_dir/model.pt`` with the
    weights of the best validation epoch. ``resume=True`` continues an
    interrupted run in the same ``run_dir`` exactly where it stopped.

    ``split`` (structure indices under ``"train"``, ``"val"`` and ``"test"``;
    a missing subset is empty) replaces the random split of ``options``, e.g.
    to train on nested subsets and test on one fixed set.
    """
    folder = read_dataset(dataset)
    if split is None:
        split = dict(zip(SUBSETS, _split(folder.indices, options)))
    else:
        split = _explicit_split(split)
    if not split["train"]:
        raise ValueError(f"no training structures: {len(folder.indices)} completed in '{dataset}'")
    _claim_run_dir(run_dir, dataset, options, split, resume)

    dtype = options.train.torch_dtype
    coefficients = TargetFile(folder.root, layout.COEFFICIENTS_FILE, dtype, torch.device("cpu"))
    baseline = Baseline.from_coefficients(coefficients(i) for i in split["train"])
    model = DensityModel(
        folder.basis, options.hypers, options.model, baseline, dtype=dtype, **options.model_options
    )
    cache = os.path.join(run_dir, DESCRIPTOR_CACHE)
    _fill_descriptor_cache(model, folder.frames, split["train"] + split["val"], cache)
    descriptors = StructureDescriptors(model.descriptor, folder.frames, cache)
    targets = LOSS_TARGETS[options.loss]
    datasets = {
        name: make_dataset(folder, split[name], descriptors, targets, dtype, options.train.device)
        for name in ("train", "val")
    }
    history = train(
        model,
        LOSSES[options.loss](),
        datasets["train"],
        datasets["val"] if split["val"] else None,
        options.train,
        run_dir,
        resume=resume,
    )
    load_checkpoint(os.path.join(run_dir, BEST_CHECKPOINT), model)
    model.save(os.path.join(run_dir, MODEL_FILE))
    return FitResult(model=model, history=history, split=split, run_dir=run_dir)


def _claim_run_dir(run_dir: str, dataset: str, options: FitOptions, split, resume: bool) -> None:
    """Write ``fit.json`` and ``split.json``, or check that a run already in
    ``run_dir`` trained the same model on the same data, so that a resumed run
    (and its cached descriptors) never mixes two datasets, splits or models."""
    record = {
        "dataset": os.path.abspath(dataset),
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "train"},
        "split": split,
    }
    fit_path = os.path.join(run_dir, FIT_FILE)
    if os.path.exists(os.path.join(run_dir, LAST_CHECKPOINT)) and not resume:
        raise FileExistsError(
            f"'{run_dir}' already holds a training run; pass resume=True (--resume) to "
            "continue it or choose another run folder"
        )
    os.makedirs(run_dir, exist_ok=True)
    differing = differing_keys(recorded_json(fit_path, record), json.loads(json.dumps(record)))
    if differing:
        raise ValueError(
            f"'{run_dir}' holds a run with another {', '.join(differing)} ('{fit_path}'); "
            "choose another run folder"
        )
    write_json(os.path.join(run_dir, SPLIT_FILE), split)


def _fill_descriptor_cache(model, frames, indices, cache_dir, batch_size: int = 16) -> None:
    """Compute the descriptors of ``indices`` in batches (one featomic call per
    batch is much cheaper than one per structure) into the cache folder."""
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    for batch in tqdm.tqdm(batches, desc="lambda-SOAP", unit="batch", disable=not batches):
        model.descriptor.compute_cached([frames[i] for i in batch], batch, cache_dir)


def _split(indices: Sequence[int], options: FitOptions):
    if options.n_train is None and options.n_val is None:  # 80 / 10 / the rest
        n_train, n_val = int(0.8 * len(indices)), int(0.1 * len(indices))
        return split_indices(indices, n_train, n_val, seed=options.split_seed)
    return split_indices(
        indices, options.n_train, options.n_val, options.n_test, seed=options.split_seed
    )


def _explicit_split(split: Dict[str, Sequence[int]]) -> Dict[str, List[int]]:
    unknown = sorted(set(split) - set(SUBSETS))
    if unknown:
        raise ValueError(f"split has unknown subsets {unknown}, expected some of {SUBSETS}")
    return {name: sorted(int(i) for i in split.get(name, ())) for name in SUBSETS}


def evaluate(
    model: DensityModel,
    dataset: str,
    indices: Optional[Sequence[int]] = None,
    real_space: bool = True,
    grid_level: int = 3,
    progress: bool = True,
) -> Dict[str, object]:
    """Errors of a model's predictions on structures of a dataset, in %.

    Per structure, and aggregated over ``indices`` (default: all completed):

    - ``relative_l2_percent``: ``100 sqrt(dc^T S dc / c^T S c)`` against the
      fitted (RI) coefficients;
    - ``rmse_percent``: SALTED's ``100 sqrt(sum dc^T S dc / sum (c - c_base)^T S
      (c - c_base))``, the error relative to the spread around the baseline;
    - with ``real_space`` (Gaussian bases, i.e. PySCF targets): the real-space
      L1 error ``100 int |rho_ML - rho| / N`` on a PySCF grid of ``grid_level``,
      against the RI density (``l1_vs_ri_percent``) and the SCF density
      (``l1_vs_scf_percent``, the SCF is rerun with the options stored in
      the structure's ``info.json``), and the basis's own error
      ``ri_l1_vs_scf_percent``, so the model's error can be told from the basis's.

    Returns
    -------
    dict
        ``structures``: one dict per structure; ``summary``: means (and the set
        RMSE); ``seconds``: prediction and real-space timings.
    """
    folder = read_dataset(dataset, basis=model.basis)
    indices = list(folder.indices if indices is None else indices)
    if not indices:
        raise ValueError(f"no structures of '{dataset}' to evaluate")
    check_completed(folder, indices)
    numeric = [s for s, shells in folder.basis.shells.items() if not all(x.exponents for x in shells)]
    if real_space and numeric:
        raise ValueError(
            f"real-space errors need a Gaussian basis, but basis '{folder.basis.name}' of "
            f"'{dataset}' has numeric radial functions (elements {numeric}): pass "
            "real_space=False, or rebuild the density with FHI-aims (rhocalc.aims.rebuild)"
        )
    files = {
        name: TargetFile(folder.root, file_name, model.dtype, model.device)
        for name, file_name in (
            ("coefficients", layout.COEFFICIENTS_FILE),
            ("overlap", layout.OVERLAP_FILE),
        )
    }
    rows, norms = [], []
    seconds = {"predict": 0.0, "real_space": 0.0}
    predictions = predict_in_batches(model, folder.frames, indices, seconds)
    bar = tqdm.tqdm(predictions, total=len(indices), desc="evaluate", unit="structure",
                    disable=not progress)
    for index, prediction in bar:
        atoms = folder.frames[index]
        reference = files["coefficients"](index)
        model.check_targets(reference, where=f"structure {index}")
        norm = overlap_norms(prediction, reference, files["overlap"](index), model.baseline.means)
        norms.append(norm)
        row = {"index": index, "formula": atoms.get_chemical_formula()}
        if real_space:
            start = time.perf_counter()
            row.update(_real_space_errors(atoms, prediction, reference, folder, index, grid_level))
            seconds["real_space"] += time.perf_counter() - start
        rows.append(row)
    summary = error_summary(norms)
    for row in rows:
        row["relative_l2_percent"] = summary["relative_l2_percent"]["per_structure"][row["index"]]
    aggregate = {
        "n_structures": len(rows),
        "relative_l2_percent": summary["relative_l2_percent"]["mean"],
        "rmse_percent": summary.get("rmse_percent"),
    }
    for name in ("l1_vs_ri_percent", "l1_vs_scf_percent", "ri_l1_vs_scf_percent"):
        if rows and name in rows[0]:
            aggregate[name] = sum(row[name] for row in rows) / len(rows)
    seconds["predict_per_structure"] = seconds["predict"] / max(len(rows), 1)
    return {"structures": rows, "summary": aggregate, "seconds": seconds}


def _real_space_errors(atoms, prediction, reference, folder, index, grid_level) -> Dict[str, float]:
    """L1 errors (%) of the predicted density against the RI and SCF densities."""
    from rhocalc.pyscf import PySCFOptions, run_scf
    from rhocalc import realspace

    with open(os.path.join(layout.structure_dir(folder.root, index), layout.INFO_FILE)) as f:
        info = json.load(f)
    points, weights = realspace.integration_grid(atoms, grid_level)
    rho_ml = realspace.density_at_points(prediction, atoms, folder.basis, points)
    rho_ri = realspace.density_at_points(reference, atoms, folder.basis, points)
    scf = run_scf(atoms, PySCFOptions(**info["options"]), name=f"structure {index}")
    rho_scf = realspace.scf_density_at_points(scf, points)
    n_electrons = scf.mol.nelectron
    return {
        "l1_vs_ri_percent": realspace.real_space_l1_percent(rho_ml, rho_ri, weights, n_electrons),
        "l1_vs_scf_percent": realspace.real_space_l1_percent(rho_ml, rho_scf, weights, n_electrons),
        "ri_l1_vs_scf_percent": realspace.real_space_l1_percent(rho_ri, rho_scf, weights, n_electrons),
    }


def predict(
    model: DensityModel,
    frames: Sequence[ase.Atoms],
    out: str,
    cube: bool = False,
    cube_spacing: float = 0.2,
    progress: bool = True,
    batch_size: int = 16,
) -> List[str]:
    """Predict coefficients for new structures; no quantum chemistry involved.

    Writes ``out/<i>/coefficients.mts`` (the shared layout, ``system = i``) and,
    with ``cube``, ``out/<i>/density.cube`` (Gaussian bases only; grid spacing
    ``cube_spacing`` in Angstrom, density in electrons/Bohr^3 as the cube format
    uses). Returns the structure folders. Structures are predicted
    ``batch_size`` at a time (:func:`predict_in_batches`): one descriptor call
    per batch is much cheaper than one per structure.
    """
    predictions = predict_in_batches(model, frames, range(len(frames)), batch_size=batch_size)
    bar = tqdm.tqdm(predictions, total=len(frames), desc="predict", unit="structure",
                    disable=not progress)
    return [
        _write_prediction(model, frames[index], index, coefficients, out, cube, cube_spacing)
        for index, coefficients in bar
    ]


def predict_in_batches(
    model: DensityModel,
    frames: Sequence[ase.Atoms],
    indices: Sequence[int],
    seconds: Optional[Dict[str, float]] = None,
    batch_size: int = 16,
) -> Iterator[Tuple[int, TensorMap]]:
    """``(index, coefficients of frames[index])`` for each of ``indices``, predicted
    ``batch_size`` structures per descriptor call; the time spent predicting is
    added to ``seconds["predict"]`` if given."""
    indices = list(indices)
    for first in range(0, len(indices), batch_size):
        batch_indices = indices[first : first + batch_size]
        start = time.perf_counter()
        batch = model.predict([frames[i] for i in batch_indices], batch_indices)
        if seconds is not None:
            seconds["predict"] += time.perf_counter() - start
        for index in batch_indices:
            yield index, select_system(batch, index)


def _write_prediction(model, atoms, index, coefficients, out, cube, cube_spacing) -> str:
    """Write one structure's coefficients (and cube file) into ``out/<index>``."""
    folder = layout.structure_dir(out, index)
    os.makedirs(folder, exist_ok=True)
    layout.save(os.path.join(folder, layout.COEFFICIENTS_FILE), coefficients)
    if cube:
        from rhocalc.realspace import write_cube

        write_cube(
            os.path.join(folder, "density.cube"), atoms, coefficients, model.basis,
            spacing=cube_spacing,
        )
    return folder

