"""Training a model on a dataset: split, baseline, descriptors, direct solve or gradient
training, and a run folder that resumes and records everything (:func:`fit`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Dict, List, Optional, Sequence, Union

import torch
import metatensor.torch as mts
import tqdm
from metatensor.torch import TensorMap

from .. import __version__, layout
from ..descriptors import DEFAULT_HYPERS, DESCRIPTORS
from ..data import StructureDescriptors, TargetFile, make_dataloader, make_dataset, split_indices
from ..dataset import read_dataset
from ..files import differing_keys, recorded_json, remove_stale_files, write_json
from ..loss import CoefficientLoss, OverlapLoss, ProjectionLoss
from ..metrics import subtract_baseline
from ..overlap import SparseOverlap
from ..models import Baseline, DensityModel
from ..models.density_model import DEFAULT_DESCRIPTOR, NETS
from ..options import keyword_options, merge, read_yaml
from ..solve import SolveOptions, solve_linear
from ..runlog import run_log
from ..train import BEST_CHECKPOINT, LAST_CHECKPOINT, TrainOptions, load_checkpoint, train

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
        Passed to the descriptor (``n_channels`` for ``"contracted"``); completed
        with the descriptor's defaults, and a key it does not take is refused.
    model_options : dict
        Passed to the network (kernel: ``n_references``, ``zeta``, ``eigen_cutoff``,
        ``seed``; nonlinear: ``hidden_sizes``, ``width``, ``seed``); completed with
        the network's defaults, and a key it does not take is refused.
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
        self.descriptor_options = keyword_options(
            DESCRIPTORS[self.descriptor], self.descriptor_options or {}, "descriptor_options",
            exclude=("dtype", "device", "target_keys"),
        )
        self.model_options = keyword_options(NETS[self.model], self.model_options or {},
                                             "model_options")
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
        centred = subtract_baseline(files["c"](index), baseline.means)
        total += float(SparseOverlap(files["S"](index), centred).quadratic(centred).sum())
    return total


def _joined(tensors: List[TensorMap]) -> TensorMap:
    """Per-structure descriptors joined along samples (union of keys)."""
    return mts.join(tensors, axis="samples", different_keys="union")


def _solve(
    model, datasets, split, options: FitOptions, run_dir: str, resume: bool, reference_seconds: float
) -> Dict[str, object]:
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
    remove_stale_files(run_dir, subfolders=True)  # what a killed run left, for either solver
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


