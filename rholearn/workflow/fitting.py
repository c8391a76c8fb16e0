"""Training a model on a dataset: split, baseline, descriptors, then one of the fitters
(:mod:`~rholearn.workflow.fitters`: direct solve or gradient training) into a run folder
(:mod:`rholearn.run`) that resumes and records everything (:func:`fit`)."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Dict, List, Optional, Sequence, Union

import metatensor.torch as mts
import torch
import tqdm
from metatensor.torch import TensorMap

from .. import __version__, distributed, layout
from ..descriptors import DEFAULT_HYPERS, DESCRIPTORS, check_hypers
from ..data import (
    SPLIT_SUBSETS, StructureDescriptors, TargetFile, check_split, check_trained_elements,
    make_dataset, split_indices,
)
from ..dataset import read_dataset
from ..files import error_line
from ..kinds import check_properties, structure_baseline, target_kind
from ..models import Baseline, DensityModel
from ..models.density_model import DEFAULT_DESCRIPTOR, NETS
from ..reduction import StructureTensor, make_tensor_dataset
from ..options import keyword_options, merge, read_yaml, to_dict
from ..run import SPLIT_FILE, RunFolder, new_run_path
from ..runlog import LOGGER
from ..solve import SolveOptions, linear_parts
from ..train import RESUMABLE_OPTIONS, TrainOptions
from .fitters import FITTERS, LOSSES, DirectFit, kernel_references
from .search import SearchOptions, applicable_space, descriptor_name, search

SOLVERS = tuple(FITTERS)
SUBSETS = SPLIT_SUBSETS


@dataclasses.dataclass
class FitOptions:
    """What to train, on which structures (recorded in ``RUN/options.yaml``).

    Parameters
    ----------
    model : {"kernel", "linear", "nonlinear"}
        Network on the descriptor: the sparse equivariant kernel model (the
        default, the most accurate per training structure: README, "Accuracy and
        speed"), a linear or a nonlinear one (:class:`rholearn.models.DensityModel`).
    solver : {"direct", "gradient"}
        ``"direct"`` (default; kernel and linear models): the regularised
        overlap-loss optimum from the normal equations
        (:func:`rholearn.solve.solve_linear`, options ``solve``), the
        regularisation chosen on the validation structures, or by
        cross-validation over the training structures without them; ``"gradient"``:
        :func:`rholearn.train.train` with ``train`` (any model and loss).
    loss : {"overlap", "projection", "coefficient"}
        ``"overlap"``: the real-space L2 error ``dc^T S dc``; ``"projection"``:
        the same up to a constant, from the projections only; ``"coefficient"``:
        plain squared coefficient errors.
    target : {"density", "dipole", "polarizability"}
        What is learned (:data:`rholearn.kinds.KINDS`): the density
        coefficients, or a molecular tensor of every structure
        (``DATASET/<i>/<target>.mts``, from ``rhocalc pyscf --properties``) as a
        sum of per-atom equivariant contributions, with the direct solve on its
        squared error (``loss`` is then unused).
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
        Passed to the network (kernel: ``n_references``, ``max_weights``, ``zeta``, ``eigen_cutoff``,
        ``seed``; nonlinear: ``hidden_sizes``, ``width``, ``seed``); completed with
        the network's defaults. A key it does not take is refused, unless it holds
        another model's default (left by switching ``model`` in a written-out file).
    train : TrainOptions
        Optimiser, epochs, device, ... (``solver="gradient"``; the direct solve
        uses its dtype and device).
    solve : SolveOptions
        Regularisation grid and linear solver (``solver="direct"``).
    search : SearchOptions
        Hypers chosen by the direct solve's cross-validation (or validation) loss
        within a time budget (:mod:`~rholearn.workflow.search`; ``solver="direct"``
        only): the candidates tried and their scores are in ``solve.json``.
    """

    model: str = "kernel"
    solver: str = "direct"
    loss: str = "overlap"
    target: str = "density"
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
    search: SearchOptions = dataclasses.field(default_factory=SearchOptions)

    def __post_init__(self):
        if self.model not in NETS:
            raise ValueError(f"model must be one of {sorted(NETS)}, got '{self.model}'")
        if self.descriptor not in DESCRIPTORS:
            raise ValueError(f"descriptor must be one of {sorted(DESCRIPTORS)}, got '{self.descriptor}'")
        self.hypers = merge(DEFAULT_HYPERS, self.hypers or {})
        check_hypers(self.hypers)
        self.descriptor_options = keyword_options(
            DESCRIPTORS[self.descriptor], self.descriptor_options or {}, "descriptor_options",
            exclude=("dtype", "device", "target_keys"),
            others=[d for name, d in DESCRIPTORS.items() if name != self.descriptor],
        )
        self.model_options = keyword_options(  # a switched model's defaults are dropped
            NETS[self.model], self.model_options or {}, "model_options",
            others=[net for name, net in NETS.items() if name != self.model],
        )
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
        if target_kind(self.target).is_tensor and self.solver != "direct":
            raise ValueError(f"target '{self.target}' is learned with solver='direct' only")
        if isinstance(self.train, dict):
            self.train = TrainOptions(**self.train)
        if isinstance(self.solve, dict):
            self.solve = SolveOptions(**self.solve)
        if isinstance(self.search, dict):
            self.search = SearchOptions(**self.search)


@dataclasses.dataclass
class FitResult:
    """A trained model (best validation weights), its history and its split."""

    model: DensityModel
    history: List[Dict[str, float]]
    split: Dict[str, List[int]]
    run_dir: str


def fit(
    dataset: str,
    run_dir: Optional[str] = None,
    options: FitOptions = FitOptions(),
    resume: bool = False,
    split: Optional[Dict[str, Sequence[int]]] = None,
    overwrite: bool = False,
) -> FitResult:
    """Train a :class:`DensityModel` on a target dataset written by rhocalc.

    Splits the completed structures, claims the run folder (:meth:`RunFolder.claim
    <rholearn.run.RunFolder.claim>`: refused, before any work, if another process
    uses it, if it is inside the dataset, or if it holds a run that is neither
    resumed nor overwritten), records ``split.json`` and the expanded options in
    ``options.yaml``, fits the invariant baseline on the training targets, computes
    lambda-SOAP descriptors once (cached in ``run_dir/descriptors``), fits
    (:data:`~rholearn.workflow.fitters.FITTERS`), and writes ``run_dir/model.pt``.

    Launched by ``torchrun`` or ``srun`` among several processes
    (:mod:`rholearn.distributed`), the processes share the structures: each computes
    the descriptors of its share and fits on it, the sums over structures are
    all-reduced, process 0 claims and writes the run folder, and every process
    returns the same model.

    Parameters
    ----------
    dataset : str
        Dataset folder written by rhocalc.
    run_dir : str, optional
        The run folder; default a new ``runs/<date>/<time>``.
    options : FitOptions
    resume : bool
        Continue the run in ``run_dir`` exactly where it stopped (gradient
        training), or solve it again (direct); the options may differ only in
        ``train.`` :data:`~rholearn.train.RESUMABLE_OPTIONS`.
    split : dict, optional
        Structure indices under ``"train"``, ``"val"`` and ``"test"`` (a missing
        subset is empty); replaces the random split of ``options``, e.g. to train
        on nested subsets and test on one fixed set. ``options.yaml`` then names
        the run's ``split.json`` as ``split_file``.
    overwrite : bool
        Remove the run in ``run_dir`` (its own files only) and start again.
    """
    distributed.initialise(options.train.device)
    applicable_space(options)  # a search path that is not an option is refused before any work
    folder = read_dataset(dataset)
    run = RunFolder(distributed.broadcast_object(run_dir or new_run_path()))
    if split is not None:
        split = check_split(split, "split", folder)
        options = dataclasses.replace(options, split_file=None)
        options.split_file = run.file(SPLIT_FILE)  # written by the claim, before options.yaml
    elif options.split_file is not None:
        split = check_split(read_yaml(options.split_file), options.split_file, folder)  # or JSON
    else:
        split = dict(zip(SUBSETS, _split(folder.indices, options)))
    if not split["train"]:
        raise ValueError(f"no training structures: {len(folder.indices)} completed in '{dataset}'")
    check_trained_elements(folder, split)
    expanded = {"dataset": os.path.abspath(dataset), "run": run.path, **to_dict(options)}
    may_change = [f"train.{name}" for name in RESUMABLE_OPTIONS]
    existing = run.existing_files()  # before the claim writes split.json and options.yaml
    replaced = existing if overwrite else []
    with distributed.on_main(run.claim(expanded, split, resume, overwrite, may_change)):
        with distributed.rank_log(run.path, console=options.train.verbose) as log:
            if replaced:
                log.info(f"removed the earlier run in '{run.path}': {', '.join(replaced)}")
            try:
                return _fit(folder, run, options, resume and bool(existing), split, log)  # a new run resumes nothing
            except Exception as error:  # the log says how the session ended
                log.error(f"stopped: {error_line(error)}")
                raise


def _fit(folder, run: RunFolder, options: FitOptions, resume: bool, split, log) -> FitResult:
    """:func:`fit` once its split and run folder are settled, logging to ``train.log``."""
    dtype = options.train.torch_dtype
    kind = target_kind(options.target)
    if kind.is_tensor:
        basis, baseline = _tensor_targets(folder, kind, split, dtype)
    else:
        basis = folder.basis
        coefficients = TargetFile(folder.root, layout.COEFFICIENTS_FILE, dtype, torch.device("cpu"))
        baseline = Baseline.from_coefficients(coefficients(i) for i in split["train"])
    log.info(_banner(folder, run, options, split, resume))

    def prepare(candidate: FitOptions, fitter):
        """The model of ``candidate`` with its descriptors and references, and the datasets."""
        cache = run.descriptor_cache if descriptor_name(candidate) == descriptor_name(options) \
            else run.search_cache(descriptor_name(candidate))
        return _prepare(folder, candidate, basis, baseline, kind, split, cache, fitter)

    space = applicable_space(options) if options.solver == "direct" and options.search.seconds > 0 else {}
    if space:
        def solve(candidate: FitOptions):
            fitter = DirectFit(candidate, resume)
            model, datasets = prepare(candidate, fitter)
            return model, fitter.solve(model, datasets["train"], datasets["val"])

        model, record = search(options, space, solve)
        history = DirectFit.save(model, record, run)["history"]
    else:
        fitter = FITTERS[options.solver](options, resume)
        model, datasets = prepare(options, fitter)
        history = fitter.fit(model, datasets["train"], datasets["val"], run)["history"]
    return FitResult(model=model, history=history, split=split, run_dir=run.path)


def _prepare(folder, options: FitOptions, basis, baseline, kind, split, cache: str, fitter):
    """A model of ``options`` on ``basis`` and ``baseline``: its descriptor fitted and
    computed into ``cache`` for the training and validation structures, the kernel
    model's references chosen (their time added to ``fitter.seconds``); and the
    ``train`` and ``val`` datasets of the targets ``fitter`` reads (``val`` ``None``
    without validation structures)."""
    model = DensityModel(
        basis, options.hypers, options.model, baseline, dtype=options.train.torch_dtype,
        descriptor=options.descriptor, descriptor_options=options.descriptor_options,
        target=kind.name, **options.model_options
    )
    model.fit_descriptor([folder.frames[i] for i in split["train"]])  # hashed in the cache settings
    _fill_descriptor_cache(model, folder.frames, split["train"] + split["val"], cache)
    descriptors = StructureDescriptors(model.descriptor, folder.frames, cache)
    start = time.perf_counter()
    if hasattr(model.net, "fit_references"):  # kernel model: references from the training atoms
        model.net.fit_references(_joined([descriptors(i) for i in split["train"]]))
        LOGGER.info("kernel references per element (reference_counts): "
                    + ", ".join(f"{symbol} {n}" for symbol, n in kernel_references(model).items()))
    distributed.broadcast_module(model)  # every process starts from process 0's model
    fitter.seconds["references"] = time.perf_counter() - start
    datasets = {
        name: make_tensor_dataset(folder, kind, basis, split[name], descriptors,
                                  options.train.torch_dtype, options.train.device)
        if kind.is_tensor else
        make_dataset(folder, split[name], descriptors, fitter.targets, options.train.torch_dtype,
                     options.train.device)
        for name in ("train", "val")
    }
    LOGGER.info(f"{_n_weights(model)} weights; device {options.train.device}, {options.train.dtype}")
    return model, {"train": datasets["train"], "val": datasets["val"] if split["val"] else None}


def _tensor_targets(folder, kind, split, dtype):
    """A tensor kind's output basis and baseline (:func:`~rholearn.kinds.structure_baseline`
    of the training tensors), refusing first a dataset without the tensors of every
    split structure (:func:`~rholearn.kinds.check_properties`)."""
    check_properties(folder, kind, [i for name in SUBSETS for i in split[name]])
    train = split["train"]
    tensor = StructureTensor(folder, kind, dtype)
    means = structure_baseline([tensor(i) for i in train], [folder.frames[i] for i in train],
                               folder.basis.elements)
    return kind.output_basis(folder.basis.elements), Baseline(means, dtype)


def _banner(folder, run: RunFolder, options: FitOptions, split, resume: bool) -> str:
    """The first lines of a run's log: what is trained on what, into which folder."""
    sizes = ", ".join(f"{len(split[name])} {name}" for name in SUBSETS)
    return (
        f"rholearn {__version__} {'resuming' if resume else 'training'} in '{run.path}': dataset "
        f"'{os.path.abspath(folder.root)}' ({len(folder.indices)} structures, elements "
        f"{' '.join(folder.basis.elements)}, basis '{folder.basis.name}'); split {sizes}; "
        f"{options.model} model on the {options.descriptor} lambda-SOAP, "
        f"{options.solver} solver, " + (f"{options.target} target" if options.target != "density"
                                         else f"{options.loss} loss")
    )


def _n_weights(model: DensityModel) -> int:
    """The weights a fit determines: for a net linear in them, those on its active
    features (as ``solve.json`` counts them); otherwise every parameter."""
    try:
        _, head, active = linear_parts(model.net)
    except TypeError:  # the nonlinear model
        return sum(parameter.numel() for parameter in model.net.parameters())
    return sum((n + int(m.bias is not None)) * m.out_features
               for m, n in zip(head.module_map.module_list, active))


def _joined(tensors: List[TensorMap]) -> TensorMap:
    """Per-structure descriptors joined along samples (union of keys)."""
    return mts.join(tensors, axis="samples", different_keys="union")


def _fill_descriptor_cache(model, frames, indices, cache_dir, batch_size: int = 16) -> None:
    """Compute the descriptors of ``indices`` in batches (one featomic call per
    batch is much cheaper than one per structure) into the cache folder; across
    processes, each its share of the batches (the same batches as in one process: the
    descriptors are bit for bit the same), process 0 first (it records the cache's settings)."""
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    batches = distributed.shard(batches)
    for turn in (True, False):
        if distributed.is_main() == turn:
            for batch in tqdm.tqdm(batches, desc="lambda-SOAP", unit="batch",
                                   disable=not batches or not turn):
                model.descriptor.compute_cached([frames[i] for i in batch], batch, cache_dir)
        distributed.barrier()


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
