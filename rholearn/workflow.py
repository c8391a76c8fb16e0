"""The whole pipeline in three calls: fit, evaluate, predict.

This module is the top layer of rholearn. The real-space errors and cube files
need the quantum-chemistry basis functions and the SCF density: they come from
the dataset's backend (:mod:`rholearn.backends`, registered by rhocalc), so
rholearn itself imports no quantum-chemistry code.

Typical use, after ``rhocalc pyscf structures.xyz --out dataset``::

    from rholearn import workflow
    result = workflow.fit("dataset", "run", workflow.FitOptions(n_train=80, n_val=10))
    errors = workflow.evaluate(result.model, "dataset", result.split["test"])
    workflow.predict(result.model, new_frames, "predictions")
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import time
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import ase
import ase.io.cube
import ase.units
import numpy as np
import torch
import metatensor.torch as mts
import tqdm
from metatensor.torch import TensorMap

from . import __version__, layout
from .descriptors import DEFAULT_HYPERS, DESCRIPTORS, select_system
from .backends import basis_backend, dataset_backend
from .data import (
    StructureDescriptors, TargetFile, check_completed, make_dataloader, make_dataset, split_indices,
)
from .dataset import read_dataset
from .files import atomic_folder, differing_keys, recorded_json, remove_stale_files, write_json
from .loss import CoefficientLoss, OverlapLoss, ProjectionLoss
from .metrics import atom_error_shares, error_summary, overlap_norms
from .overlap import align_samples
from .plots import plot_parity
from .models import Baseline, DensityModel
from .models.density_model import DEFAULT_DESCRIPTOR, NETS
from .options import merge, read_yaml
from .solve import SolveOptions, solve_linear
from .runlog import run_log
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
SOLVE_FILE = "solve.json"
"""The direct solve's record: chosen regularisation, validation curve, timings."""
SOLVERS = ("direct", "gradient")
SUBSETS = ("train", "val", "test")
PARITY_PLOT = "parity.png"


@dataclasses.dataclass
class FitOptions:
    """What to train, on which structures (written to ``run_dir/fit.json``).

    Parameters
    ----------
    model : {"kernel", "linear", "nonlinear"}
        See :class:`rholearn.models.DensityModel`. Default ``"kernel"``, the
        sparse equivariant kernel model, the most accurate per training
        structure (README, "Accuracy and speed").
    solver : {"direct", "gradient"}
        ``"direct"`` (default; kernel and linear models): the regularised
        overlap-loss optimum from the normal equations
        (:func:`rholearn.solve.solve_linear`, options ``solve``), the
        regularisation chosen on the validation structures; ``"gradient"``:
        :func:`rholearn.train.train` with ``train`` (any model and loss).
    loss : {"overlap", "projection", "coefficient"}
        ``"overlap"``: the real-space L2 error ``dc^T S dc``; ``"projection"``:
        the same up to a constant, from the projections only; ``"coefficient"``:
        plain squared coefficient errors.
    n_train, n_val, n_test : int or float, optional
        Split sizes: counts, or fractions of the completed structures (a float
        between 0 and 1); ``n_train`` defaults to 80 %, ``n_val`` to 10 % (at
        most what the others leave), ``n_test`` to the rest.
    split_file : str, optional
        A JSON or YAML file of structure indices under ``train``, ``val`` and
        ``test`` (e.g. another run's ``split.json``); replaces the random split.
    split_seed : int
        Seed of the random split.
    hypers : dict
        lambda-SOAP hypers (featomic ``SphericalExpansion``, Angstrom): the keys
        given are merged into :data:`rholearn.descriptors.DEFAULT_HYPERS`, so
        ``{"cutoff": {"radius": 3.0}}`` changes the cutoff only.
    descriptor : {"contracted", "stock"}
        Lambda-SOAP calculator (:data:`rholearn.descriptors.DESCRIPTORS`); a
        contracted one is fitted on the training structures.
    descriptor_options : dict
        Passed to the descriptor (``n_channels`` for ``"contracted"``).
    model_options : dict
        Passed to the network (``seed``, ``hidden_sizes``, ...).
    train : TrainOptions
        Optimiser, epochs, device, ... (``solver="gradient"``; the direct solve
        uses its dtype and device).
    solve : SolveOptions
        Regularisation grid and linear solver (``solver="direct"``).
    """

    model: str = "kernel"
    solver: str = "direct"
    loss: str = "overlap"
    n_train: Optional[Union[int, float]] = None
    n_val: Optional[Union[int, float]] = None
    n_test: Optional[Union[int, float]] = None
    split_file: Optional[str] = None
    split_seed: int = 0
    hypers: dict = dataclasses.field(default_factory=lambda: copy.deepcopy(DEFAULT_HYPERS))
    descriptor: str = DEFAULT_DESCRIPTOR
    descriptor_options: dict = dataclasses.field(default_factory=dict)
    model_options: dict = dataclasses.field(default_factory=dict)
    train: TrainOptions = dataclasses.field(default_factory=TrainOptions)
    solve: SolveOptions = dataclasses.field(default_factory=SolveOptions)

    def __post_init__(self):
        if self.model not in NETS:
            raise ValueError(f"model must be one of {sorted(NETS)}, got '{self.model}'")
        if self.descriptor not in DESCRIPTORS:
            raise ValueError(f"descriptor must be one of {sorted(DESCRIPTORS)}, got '{self.descriptor}'")
        self.hypers = merge(DEFAULT_HYPERS, self.hypers or {})
        for name in ("n_train", "n_val", "n_test"):
            size = getattr(self, name)
            if isinstance(size, float) and not 0.0 <= size <= 1.0:
                raise ValueError(f"{name} must be a count or a fraction in [0, 1], got {size}")
            if isinstance(size, int) and size < 0:
                raise ValueError(f"{name} must be >= 0, got {size}")
        if self.split_file is not None and not os.path.isfile(self.split_file):
            raise FileNotFoundError(f"no such split file: '{self.split_file}'")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got '{self.loss}'")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got '{self.solver}'")
        if self.solver == "direct" and self.model == "nonlinear":
            raise ValueError("the nonlinear model is not linear in its weights: use solver='gradient'")
        if self.solver == "direct" and self.loss == "coefficient":
            raise ValueError("the direct solve minimises the overlap loss: use loss='overlap'")
        if isinstance(self.train, dict):
            self.train = TrainOptions(**self.train)
        if isinstance(self.solve, dict):
            self.solve = SolveOptions(**self.solve)


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
    if split is None and options.split_file is not None:
        split = _explicit_split(read_yaml(options.split_file))  # YAML reads JSON too
    if split is None:
        split = dict(zip(SUBSETS, _split(folder.indices, options)))
    else:
        split = _explicit_split(split)
    if not split["train"]:
        raise ValueError(f"no training structures: {len(folder.indices)} completed in '{dataset}'")
    _claim_run_dir(run_dir, dataset, options, split, resume)
    with run_log(run_dir, console=options.train.verbose) as log:
        return _fit(folder, run_dir, options, resume, split, log)


def _fit(folder, run_dir: str, options: FitOptions, resume: bool, split, log) -> FitResult:
    """:func:`fit` once its split and run folder are settled, logging to ``train.log``."""
    dtype = options.train.torch_dtype
    coefficients = TargetFile(folder.root, layout.COEFFICIENTS_FILE, dtype, torch.device("cpu"))
    baseline = Baseline.from_coefficients(coefficients(i) for i in split["train"])
    model = DensityModel(
        folder.basis, options.hypers, options.model, baseline, dtype=dtype,
        descriptor=options.descriptor, descriptor_options=options.descriptor_options,
        **options.model_options
    )
    log.info(_banner(folder, options, split, resume))
    model.fit_descriptor([folder.frames[i] for i in split["train"]])  # hashed in the cache settings
    cache = os.path.join(run_dir, DESCRIPTOR_CACHE)
    _fill_descriptor_cache(model, folder.frames, split["train"] + split["val"], cache)
    descriptors = StructureDescriptors(model.descriptor, folder.frames, cache)
    start = time.perf_counter()
    if hasattr(model.net, "fit_references"):  # kernel model: references from the training atoms
        model.net.fit_references(_joined([descriptors(i) for i in split["train"]]))
    reference_seconds = time.perf_counter() - start
    direct = options.solver == "direct"
    targets = ("coefficients", "overlap") if direct else LOSS_TARGETS[options.loss]
    datasets = {
        name: make_dataset(folder, split[name], descriptors, targets, dtype, options.train.device)
        for name in ("train", "val")
    }
    log.info(f"{_n_weights(model)} weights; device {options.train.device}, "
             f"{options.train.dtype}")
    if direct:
        if not split["val"]:
            log.warning("no validation structures: the first regularisation strength is used "
                        f"({options.solve.grid()[0]:g}) and nothing measures overfitting")
        record = _solve(model, datasets, split, options, run_dir, resume, reference_seconds)
        history = record["grid"]
        log.info(f"direct solve in {record['seconds']['total']:.2f} s: regularisation "
                 f"{record['regularisation']:g} (record in '{os.path.join(run_dir, SOLVE_FILE)}')")
        model.save(os.path.join(run_dir, MODEL_FILE))
        return FitResult(model=model, history=history, split=split, run_dir=run_dir)
    val_spread = None
    if split["val"] and options.loss == "overlap":
        val_spread = _spread(folder, split["val"], model.baseline, dtype)
    try:
        history = train(
            model,
            LOSSES[options.loss](),
            datasets["train"],
            datasets["val"] if split["val"] else None,
            options.train,
            run_dir,
            resume=resume,
            val_spread=val_spread,
        )
    except KeyboardInterrupt:
        if os.path.exists(os.path.join(run_dir, BEST_CHECKPOINT)):
            load_checkpoint(os.path.join(run_dir, BEST_CHECKPOINT), model)
            model.save(os.path.join(run_dir, MODEL_FILE))
            log.warning(f"'{os.path.join(run_dir, MODEL_FILE)}' holds the best weights so far")
        raise
    load_checkpoint(os.path.join(run_dir, BEST_CHECKPOINT), model)
    model.save(os.path.join(run_dir, MODEL_FILE))
    log.info(f"model with the weights of the best epoch: {os.path.join(run_dir, MODEL_FILE)}")
    return FitResult(model=model, history=history, split=split, run_dir=run_dir)


def _banner(folder, options: FitOptions, split, resume: bool) -> str:
    """The first lines of a run's log: what is trained on what."""
    sizes = ", ".join(f"{len(split[name])} {name}" for name in SUBSETS)
    return (
        f"rholearn {__version__} {'resuming' if resume else 'training'}: dataset "
        f"'{os.path.abspath(folder.root)}' ({len(folder.indices)} structures, elements "
        f"{' '.join(folder.basis.elements)}, basis '{folder.basis.name}'); split {sizes}; "
        f"{options.model} model on the {options.descriptor} lambda-SOAP, "
        f"{options.solver} solver, {options.loss} loss"
    )


def _n_weights(model: DensityModel) -> int:
    return sum(parameter.numel() for parameter in model.net.parameters())


def _spread(folder, indices: Sequence[int], baseline: Baseline, dtype) -> float:
    """``sum (c - c_base)^T S (c - c_base)`` over structures (denominator of the % RMSE)."""
    files = {
        name: TargetFile(folder.root, file_name, dtype, torch.device("cpu"))
        for name, file_name in (("c", layout.COEFFICIENTS_FILE), ("S", layout.OVERLAP_FILE))
    }
    total = 0.0
    for index in indices:
        reference = files["c"](index)
        norms = overlap_norms(reference, reference, files["S"](index), baseline.means)
        total += float(norms.spreads.sum())
    return total


def _joined(tensors: List[TensorMap]) -> TensorMap:
    """Per-structure descriptors joined along samples (union of keys)."""
    return mts.join(tensors, axis="samples", different_keys="union")


def _solve(
    model, datasets, split, options: FitOptions, run_dir: str, resume: bool, reference_seconds: float
) -> List[dict]:
    """Direct solve (:func:`rholearn.solve.solve_linear`); writes ``solve.json``
    (with ``seconds``: ``references`` for fitting the kernel references,
    ``total`` for the solve) and returns that record (its ``grid``: one row
    per regularisation strength)."""
    path = os.path.join(run_dir, SOLVE_FILE)
    if os.path.exists(path) and not resume:
        raise FileExistsError(
            f"'{run_dir}' already holds a solved model ('{path}'); pass resume=True "
            "(--resume) to solve it again or choose another run folder"
        )
    model.to(device=torch.device(options.train.device), dtype=options.train.torch_dtype)
    size = options.solve.batch_size
    loaders = {name: make_dataloader(datasets[name], size) for name in ("train", "val")}
    start = time.perf_counter()
    record = solve_linear(model, loaders["train"], loaders["val"] if split["val"] else None,
                          options.solve)
    record["seconds"]["total"] = time.perf_counter() - start
    record["seconds"]["references"] = reference_seconds
    write_json(path, record)
    return record


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
    """Train / val / test indices: a size not given defaults to 80 % (train), 10 %
    (val, at most what the given sizes leave) or the rest (test)."""
    n = len(indices)
    n_train, n_val, n_test = (
        int(size * n) if isinstance(size, float) else size
        for size in (options.n_train, options.n_val, options.n_test)
    )
    given_test = n_test
    n_test = n_test or 0
    if n_train is None:
        n_train = max(0, min(int(0.8 * n), n - (n_val or 0) - n_test))
    if n_val is None:
        n_val = max(0, min(int(0.1 * n), n - n_train - n_test))
    return split_indices(indices, n_train, n_val, given_test, seed=options.split_seed)


def _explicit_split(split: Dict[str, Sequence[int]]) -> Dict[str, List[int]]:
    if not isinstance(split, dict):
        raise ValueError(f"a split maps {SUBSETS} to lists of structure indices, got {split!r}")
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
    out: Optional[str] = None,
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
      ``ri_l1_vs_scf_percent``, so the model's error can be told from the basis's;
    - ``atom_error_share_percent``: each atom's share of its structure's
      ``dc^T S dc`` (:func:`rholearn.metrics.atom_error_shares`).

    With ``out``, the predicted coefficients are written to
    ``out/<index>/coefficients.mts`` and a parity plot of predicted against
    reference coefficients per ``l`` to ``out/parity.png``.

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
    parity: Dict[str, List[TensorMap]] = {"predicted": [], "reference": []}
    seconds = {"predict": 0.0, "real_space": 0.0}
    predictions = predict_in_batches(model, folder.frames, indices, seconds)
    bar = tqdm.tqdm(predictions, total=len(indices), desc="evaluate", unit="structure",
                    disable=not progress)
    for index, prediction in bar:
        atoms = folder.frames[index]
        reference = files["coefficients"](index)
        model.check_targets(reference, where=f"structure {index}")
        overlap = files["overlap"](index)
        norms.append(overlap_norms(prediction, reference, overlap, model.baseline.means))
        shares = atom_error_shares(prediction, reference, overlap)
        row = {
            "index": index,
            "formula": atoms.get_chemical_formula(),
            "atom_error_share_percent": [shares[(index, atom)] for atom in range(len(atoms))],
        }
        if out is not None:
            _write_evaluated(out, index, prediction, reference, parity)
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
    if out is not None:
        plot_parity(parity["predicted"], parity["reference"], os.path.join(out, PARITY_PLOT))
    return {"structures": rows, "summary": aggregate, "seconds": seconds}


def _write_evaluated(out, index, prediction, reference, parity) -> None:
    """Save a structure's predicted coefficients and keep it for the parity plot."""
    folder = layout.structure_dir(out, index)
    os.makedirs(folder, exist_ok=True)
    layout.save(os.path.join(folder, layout.COEFFICIENTS_FILE), prediction)
    parity["predicted"].append(prediction)
    parity["reference"].append(align_samples(reference, prediction, "reference"))


def _real_space_errors(atoms, prediction, reference, folder, index, grid_level) -> Dict[str, float]:
    """L1 errors (%) of the predicted density against the RI and SCF densities, on
    the grid of the backend that computed the dataset (:mod:`rholearn.backends`),
    which reruns the SCF with the options in the structure's ``info.json``."""
    backend = dataset_backend(folder.root, folder.basis)
    with open(os.path.join(layout.structure_dir(folder.root, index), layout.INFO_FILE)) as f:
        info = json.load(f)
    points, weights = backend.integration_grid(atoms, grid_level)
    rho_ml = backend.density_at_points(prediction, atoms, folder.basis, points)
    rho_ri = backend.density_at_points(reference, atoms, folder.basis, points)
    rho_scf, n_electrons = backend.reference_density(
        atoms, info["options"], points, name=f"structure {index}"
    )
    l1 = backend.real_space_l1_percent
    return {
        "l1_vs_ri_percent": l1(rho_ml, rho_ri, weights, n_electrons),
        "l1_vs_scf_percent": l1(rho_ml, rho_scf, weights, n_electrons),
        "ri_l1_vs_scf_percent": l1(rho_ri, rho_scf, weights, n_electrons),
    }


def predict(
    model: DensityModel,
    frames: Sequence[ase.Atoms],
    out: str,
    cube: bool = False,
    cube_spacing: float = 0.1,
    progress: bool = True,
    batch_size: int = 16,
    names: Optional[Sequence[str]] = None,
    indices: Optional[Sequence[int]] = None,
    model_file: Optional[str] = None,
) -> List[str]:
    """Predict coefficients for new structures; no quantum chemistry involved.

    Writes, for each structure, ``out/<name>/coefficients.mts`` (the shared
    layout, ``system`` = position in ``frames``), ``out/<name>/info.json`` and,
    with ``cube``, ``out/<name>/density.cube`` (Gaussian bases only; grid spacing
    ``cube_spacing`` in Angstrom, density in electrons/Bohr^3 as the cube format
    uses). Returns the structure folders. Structures are predicted
    ``batch_size`` at a time (:func:`predict_in_batches`): one descriptor call
    per batch is much cheaper than one per structure.

    ``<name>`` is ``names[i]`` if given, else ``atoms.info["name"]`` if set, else
    the structure's index (``indices[i]``, its index in the file it was read
    from; default its position in ``frames``); made a safe folder name
    (characters other than letters, digits and ``._+=-`` become ``_``, leading
    dots are dropped). Two structures with the same folder name are refused
    before anything is written.

    ``info.json`` records the model (``model_file``, kind, basis), the
    structure (name, index, formula), ``n_electrons``: the electron count of the
    predicted density, exact (each basis function's integral, from the basis's
    backend, times its coefficient; ``null`` if no installed backend handles
    the basis) and, with ``cube``, the requested and actual spacing (Angstrom)
    and ``cube_n_electrons``, the density summed over the cube times the voxel
    volume. A cube whose count is more than :data:`CUBE_TOLERANCE` off the exact
    one under-resolves the density: one :class:`CubeResolutionWarning` names the worst structure.

    Each ``out/<name>`` is written to a temporary folder and renamed, replacing
    the folder of an earlier prediction as a whole (no stale ``density.cube`` is
    left beside new coefficients); prediction folders of an earlier prediction
    that this one does not write are removed, so ``out`` holds this prediction
    only (:func:`earlier_predictions` lists what will be replaced). A folder
    holding a dataset (``basis.json``) is refused.

    Raises
    ------
    ValueError
        Duplicate or empty folder names (naming the structures), ``names`` or
        ``indices`` of another length than ``frames``.
    """
    if os.path.isfile(os.path.join(out, layout.BASIS_FILE)):
        raise FileExistsError(
            f"'{out}' holds a dataset ('{layout.BASIS_FILE}'); predict into another folder"
        )
    indices = list(range(len(frames)) if indices is None else indices)
    folder_names = _prediction_names(frames, indices, names)
    try:
        backend = basis_backend(model.basis)
    except ValueError:
        if cube:
            raise
        backend = None  # no electron count: the coefficients need no backend
    stale = [name for name in earlier_predictions(out) if name not in folder_names]
    os.makedirs(out, exist_ok=True)
    remove_stale_files(out)
    predictions = predict_in_batches(model, frames, range(len(frames)), batch_size=batch_size)
    bar = tqdm.tqdm(predictions, total=len(frames), desc="predict", unit="structure",
                    disable=not progress)
    info = {"model_file": model_file, "model": model.model_type, "basis": model.basis.name}
    counts = []
    for position, coefficients in bar:
        info.update(name=folder_names[position], index=indices[position])
        counts.append(_write_prediction(
            model, frames[position], info, coefficients, out, backend,
            cube_spacing if cube else None,
        ))
    for name in stale:
        shutil.rmtree(os.path.join(out, name))
    if cube:
        _warn_under_resolved(folder_names, counts, cube_spacing)
    return [os.path.join(out, name) for name in folder_names]


CUBE_FILE = "density.cube"
"""A prediction's cube file."""

PREDICTION_INFO_FILE = "info.json"
"""A prediction's record of model, structure and electron counts."""

CUBE_TOLERANCE = 0.05
"""Relative difference between a cube's electron count and the exact one above
which :func:`predict` warns that the cube spacing is too coarse (the nuclear cusps
dominate it: a water cube is 2 % off at 0.1 Angstrom, 10 % at 0.2)."""


class CubeResolutionWarning(UserWarning):
    """A cube file's grid is too coarse for the density it holds (:func:`predict`)."""


def _prediction_names(frames, indices, names) -> List[str]:
    """Safe, unique folder names of the structures (see :func:`predict`)."""
    if len(indices) != len(frames) or (names is not None and len(names) != len(frames)):
        raise ValueError(f"{len(frames)} structures, but {len(indices)} indices and "
                         f"{'no' if names is None else len(names)} names")
    if names is None:
        names = [atoms.info.get("name", index) for atoms, index in zip(frames, indices)]
    folders = [re.sub(r"[^A-Za-z0-9._+=-]", "_", str(name)).lstrip(".") for name in names]
    for index, name, folder in zip(indices, names, folders):
        if not folder:
            raise ValueError(f"structure {index}: name {str(name)!r} gives no folder name")
    by_folder: Dict[str, List[int]] = {}
    for index, folder in zip(indices, folders):
        by_folder.setdefault(folder, []).append(index)
    duplicates = {folder: found for folder, found in by_folder.items() if len(found) > 1}
    if duplicates:
        clashes = "; ".join(f"structures {found} -> '{folder}'"
                            for folder, found in sorted(duplicates.items()))
        raise ValueError(f"structures share a prediction folder name ({clashes}); give each "
                         "a unique atoms.info['name'] (or names=)")
    return folders


def _warn_under_resolved(names, counts, spacing: float) -> None:
    """One warning if some cube's electron count is off by more than
    :data:`CUBE_TOLERANCE`; ``counts`` holds ``(exact, cube)`` pairs."""
    off = [(abs(cube - exact) / abs(exact), name, exact, cube)
           for name, (exact, cube) in zip(names, counts) if exact is not None and exact != 0]
    bad = [item for item in off if item[0] > CUBE_TOLERANCE]
    if bad:
        error, name, exact, cube = max(bad)
        warnings.warn(
            f"the cube spacing {spacing:g} Angstrom under-resolves the density of {len(bad)} "
            f"structure(s) (worst '{name}': {cube:.3f} electrons on the cube, {exact:.3f} "
            f"exact, {100 * error:.1f} % off); use a smaller spacing (--spacing)",
            CubeResolutionWarning, stacklevel=3,
        )


def earlier_predictions(out: str) -> List[str]:
    """Names of the prediction folders (those holding ``coefficients.mts``) already
    in ``out``, sorted."""
    if not os.path.isdir(out):
        return []
    return sorted(
        entry.name for entry in os.scandir(out)
        if entry.is_dir() and not entry.name.startswith(".")
        and os.path.isfile(os.path.join(entry.path, layout.COEFFICIENTS_FILE))
    )


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


def _write_prediction(model, atoms, info, coefficients, out, backend, cube_spacing):
    """Write one structure's coefficients, ``info.json`` (``info`` and the counts)
    and, if ``cube_spacing`` (Angstrom) is given, cube file into
    ``out/<info["name"]>``, atomically (:func:`~rholearn.files.atomic_folder`).
    Returns the electron counts ``(exact, cube)``, each ``None`` if not computed."""
    info = {**info, "formula": atoms.get_chemical_formula()}
    exact = cube_count = None
    if backend is not None:
        vector = layout.tensormap_to_vector(coefficients, atoms.numbers, model.basis)
        exact = float(backend.function_integrals(atoms, model.basis) @ vector)
    info["n_electrons"] = exact
    with atomic_folder(os.path.join(out, info["name"])) as tmp:
        layout.save(os.path.join(tmp, layout.COEFFICIENTS_FILE), coefficients)
        if cube_spacing is not None:
            path = os.path.join(tmp, CUBE_FILE)
            backend.write_cube(path, atoms, coefficients, model.basis, spacing=cube_spacing)
            with open(path) as f:
                cube = ase.io.cube.read_cube(f)
            voxel = np.abs(np.linalg.det(cube["spacing"])) / ase.units.Bohr**3  # Bohr^3
            cube_count = float(cube["data"].sum() * voxel)
            info.update(cube_spacing_angstrom=cube_spacing,
                        cube_voxel_angstrom=np.linalg.norm(cube["spacing"], axis=1).tolist(),
                        cube_n_electrons=cube_count)
        write_json(os.path.join(tmp, PREDICTION_INFO_FILE), info)
    return exact, cube_count
