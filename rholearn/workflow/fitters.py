"""The two ways to fit a model, behind one interface::

    fitter = FITTERS[options.solver](options, resume, seconds)
    record = fitter.fit(model, train, val, run)

- :class:`DirectFit`: the regularised overlap-loss optimum from the normal equations
  (:func:`rholearn.solve.solve_linear`), the regularisation chosen on ``val``
  or, without it, by cross-validation over ``train``;
  records ``solve.json``.
- :class:`GradientFit`: optimiser epochs (:func:`rholearn.train.train`) with
  checkpoints that resume exactly.

``train`` and ``val`` are datasets (:func:`rholearn.data.make_dataset`) with a
``descriptor`` field and the target fields the fitter names in ``targets``; ``val``
is ``None`` without validation structures; ``run`` is the claimed
:class:`~rholearn.run.RunFolder`. Both leave ``model`` with the fitted (best)
weights, save it to ``RUN/model.pt`` and return a record whose ``history`` has one
dict per regularisation strength (direct) or per epoch (gradient).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
from ase.data import chemical_symbols
from metatensor.learn.data import IndexedDataset

from .. import distributed
from ..data import make_dataloader
from ..files import write_json
from ..loss import CoefficientLoss, OverlapLoss, ProjectionLoss
from ..metrics import subtract_baseline
from ..models import DensityModel
from ..overlap import SparseOverlap
from ..run import BEST_CHECKPOINT, MODEL_FILE, SOLVE_FILE, RunFolder
from ..runlog import LOGGER
from ..solve import solve_linear
from ..train import load_checkpoint, train

if TYPE_CHECKING:  # the options are defined with fit, which uses the fitters
    from .fitting import FitOptions

LOSSES = {"coefficient": CoefficientLoss, "overlap": OverlapLoss, "projection": ProjectionLoss}
"""Loss functions by name (see :mod:`rholearn.loss`)."""

LOSS_TARGETS = {
    "coefficient": ("coefficients",),
    "overlap": ("coefficients", "overlap"),
    "projection": ("projections", "overlap"),
}
"""The target files each loss reads."""


class DirectFit:
    """The direct solve (:func:`rholearn.solve.solve_linear`) of a model linear in its
    weights, in ``options.train``'s dtype and device, with ``options.solve``.

    Parameters
    ----------
    options : FitOptions
    resume : bool
        Unused: a direct solve has no state to continue, a resumed run solves again.
    seconds : dict, optional
        Time spent preparing the fit (``references``: the kernel's reference
        environments), recorded in ``solve.json`` next to the solve's own.
    """

    targets: Tuple[str, ...] = ("coefficients", "overlap")

    def __init__(self, options: "FitOptions", resume: bool = False,
                 seconds: Optional[Dict[str, float]] = None):
        self.options = options
        self.seconds = dict(seconds or {})

    def fit(self, model: DensityModel, train_data: IndexedDataset,
            val_data: Optional[IndexedDataset], run: RunFolder) -> Dict[str, Any]:
        """Solve, write ``solve.json`` and ``model.pt``; the record is ``solve.json``'s
        with ``history`` (its ``grid``: one row per regularisation strength)."""
        return self.save(model, self.solve(model, train_data, val_data), run)

    def solve(self, model: DensityModel, train_data: IndexedDataset,
              val_data: Optional[IndexedDataset]) -> Dict[str, Any]:
        """Set the weights of ``model`` to the solution; return the solve's record."""
        solve = self.options.solve
        model.to(device=torch.device(self.options.train.device),
                 dtype=self.options.train.torch_dtype)
        start = time.perf_counter()
        record = solve_linear(
            model, _share_loader(train_data, solve.batch_size),
            None if val_data is None else _share_loader(val_data, solve.batch_size), solve,
        )
        distributed.broadcast_module(model.net)  # every process holds process 0's weights
        record["seconds"]["total"] = time.perf_counter() - start
        record["seconds"].update(self.seconds)
        references = kernel_references(model)
        if references is not None:
            record["references"] = references
        return record

    @staticmethod
    def save(model: DensityModel, record: Dict[str, Any], run: RunFolder) -> Dict[str, Any]:
        """Write ``solve.json`` and ``model.pt`` (process 0), log how the solve went and
        return the record with ``history``."""
        if not distributed.is_main():
            return {**record, "history": record["grid"]}
        write_json(run.file(SOLVE_FILE), record)
        LOGGER.info(f"direct solve in {record['seconds']['total']:.2f} s: {_solve_summary(record)} "
                    f"(record in '{run.file(SOLVE_FILE)}')")
        if record["cv_skipped"]:
            LOGGER.warning(f"{record['cv_skipped']}: give more training structures, or "
                           "validation structures")
        if record["edge"]:
            LOGGER.warning(f"the chosen regularisation is the {record['edge']} value of the grid: "
                           "the optimum may lie beyond it (extend solve.regularisation)")
        if not record["converged"]:
            LOGGER.warning("conjugate gradients stopped unconverged (see 'solves' in "
                           f"'{run.file(SOLVE_FILE)}'): raise solve.cg_max_iterations")
        model.save(run.file(MODEL_FILE))
        return {**record, "history": record["grid"]}


def _share_loader(data: IndexedDataset, batch_size: int):
    """The batches of this process's share of ``data`` (all of it in one process)."""
    if not distributed.active():
        return make_dataloader(data, batch_size)
    return make_dataloader(data, batch_size, sampler=distributed.shard(range(len(data))))


def kernel_references(model: DensityModel) -> Optional[Dict[str, int]]:
    """A kernel model's references per element symbol (elements with none left out);
    ``None`` for other models."""
    if not hasattr(model.net, "fit_references"):
        return None
    counts = model.net.features.references_per_element()
    return {chemical_symbols[z]: n for z, n in sorted(counts.items()) if n}


def _solve_summary(record: Dict[str, Any]) -> str:
    """How the solve went, in one line: solver and why, regularisation and how it was chosen."""
    memory = record["memory"]
    solver = (f"{record['solver']} solver ({record['n_weights']} weights: "
              f"{memory['needed_bytes'] / 2**30:.2f} GiB needed, "
              f"{memory['allowed_bytes'] / 2**30:.2f} GiB allowed)")
    chosen = f"regularisation {record['regularisation']:g}"
    row = next(r for r in record["grid"] if r["regularisation"] == record["regularisation"])
    if record["selection"] == "cross-validation":
        scored = len(record["folds"]), record["folds_scored"]
        details = [] if scored[0] == scored[1] else [f"{scored[1]} folds scored in the time budget"]
        if record["cv_weights"] < record["n_weights"]:
            details.append(f"on the leading {record['cv_weights']} weights, to fit solve.cv_seconds")
        details.append(f"CV RMSE {row['cv_rmse_percent']:.3g} %")
        how = ("leave-one-structure-out cross-validation" if record["cv_method"] == "leave-one-out"
               else f"{scored[0]}-fold cross-validation over the training structures")
        chosen += f" chosen by {how} ({', '.join(details)})"
    elif record["selection"] == "validation":
        chosen += f" chosen on the validation structures (RMSE {row['val_rmse_percent']:.3g} %)"
    return f"{solver}, {chosen}"


class GradientFit:
    """Gradient training (:func:`rholearn.train.train`) with ``options.train`` on the
    loss ``options.loss``; ``model.pt`` gets the weights of the best epoch.

    Parameters
    ----------
    options : FitOptions
    resume : bool
        Continue from the run's ``checkpoint_last.pt``.
    seconds : dict, optional
        Time spent preparing the fit, returned in the record.
    """

    def __init__(self, options: "FitOptions", resume: bool = False,
                 seconds: Optional[Dict[str, float]] = None):
        self.options = options
        self.resume = resume
        self.seconds = dict(seconds or {})
        self.targets: Tuple[str, ...] = LOSS_TARGETS[options.loss]

    def fit(self, model: DensityModel, train_data: IndexedDataset,
            val_data: Optional[IndexedDataset], run: RunFolder) -> Dict[str, Any]:
        """Train; the record has ``history`` (one dict per epoch) and ``seconds``.
        On Ctrl-C, ``model.pt`` gets the best weights so far before
        ``KeyboardInterrupt`` is raised again."""
        spread = None
        if val_data is not None and self.options.loss == "overlap":
            spread = _spread(val_data, model)
        try:
            history = train(model, LOSSES[self.options.loss](), train_data, val_data,
                            self.options.train, run.path, resume=self.resume, val_spread=spread)
        except KeyboardInterrupt:
            if os.path.exists(run.file(BEST_CHECKPOINT)):
                self._save_best(model, run)
                LOGGER.warning(f"'{run.file(MODEL_FILE)}' holds the best weights so far")
            raise
        self._save_best(model, run)
        LOGGER.info(f"model with the weights of the best epoch: {run.file(MODEL_FILE)}")
        return {"history": history, "seconds": self.seconds}

    @staticmethod
    def _save_best(model: DensityModel, run: RunFolder) -> None:
        load_checkpoint(run.file(BEST_CHECKPOINT), model)
        if distributed.is_main():
            model.save(run.file(MODEL_FILE))


FITTERS = {"direct": DirectFit, "gradient": GradientFit}
"""The fitters by ``FitOptions.solver``."""


def _spread(data: IndexedDataset, model: DensityModel) -> float:
    """``sum (c - c_base)^T S (c - c_base)`` over the structures of ``data`` (with
    ``coefficients`` and ``overlap`` fields): the denominator of the % RMSE."""
    means = model.baseline.means
    total = 0.0
    for index in range(len(data)):
        sample = data[index]
        centred = subtract_baseline(sample.coefficients.to(device=means.device), means)
        overlap = sample.overlap.to(device=means.device)
        total += float(SparseOverlap(overlap, centred).quadratic(centred).sum())
    return total
