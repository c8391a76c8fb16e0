"""Figures to look at after training and evaluation (matplotlib, written as PNG).

- :func:`plot_training_curves`: per-structure training and validation losses of a
  run's ``log.csv`` against the epoch;
- :func:`plot_parity`: predicted against reference coefficients, one panel per
  angular momentum ``l``;
- :func:`plot_learning_curve`: test error against the number of training
  structures, log-log, one line per method.

Each function writes one PNG atomically and returns the numbers it drew, so a
caller (or a test) can check them.
"""

from __future__ import annotations

import csv
import math
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np

from .files import atomic_path


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(figure)


def read_log(path: str) -> Dict[str, np.ndarray]:
    """Columns of a training ``log.csv`` as float arrays (empty cells are NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"training log '{path}' has no epochs")
    return {
        name: np.array([float(row[name]) if row[name] not in ("", None) else math.nan for row in rows])
        for name in rows[0]
    }


def plot_training_curves(log_path: str, path: str) -> Dict[str, np.ndarray]:
    """Training (and validation) loss per structure against the epoch, log scale.

    Parameters
    ----------
    log_path : str
        A run's ``log.csv`` (:mod:`rholearn.train`).
    path : str
        Output PNG.

    Returns
    -------
    dict
        The columns drawn: ``epoch``, ``train_loss`` and ``val_loss``.
    """
    log = read_log(log_path)
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.5))
    axes.plot(log["epoch"], log["train_loss"], label="training")
    if np.isfinite(log["val_loss"]).any():
        axes.plot(log["epoch"], log["val_loss"], label="validation")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss per structure")
    axes.set_yscale("log")
    axes.legend()
    axes.set_title(f"training curves ({log_path})", fontsize=8)
    _save(figure, path)
    return {name: log[name] for name in ("epoch", "train_loss", "val_loss")}


def coefficients_by_l(tensors: Iterable) -> Dict[int, np.ndarray]:
    """All coefficient values of each ``o3_lambda``, flattened in a fixed order.

    ``tensors`` are coefficient TensorMaps (metatensor-core or -torch) in the
    layout of :mod:`rholearn.layout`; blocks are visited sorted by key and
    samples in stored order, so two lists of aligned TensorMaps give aligned
    arrays.
    """
    values: Dict[int, List[np.ndarray]] = {}
    for tensor in tensors:
        items = sorted(
            ((tuple(int(x) for x in key.values), block) for key, block in tensor.items()),
            key=lambda item: item[0],
        )
        for key, block in items:
            array = block.values
            array = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
            values.setdefault(key[0], []).append(array.reshape(-1))
    return {l: np.concatenate(arrays) for l, arrays in sorted(values.items())}


def plot_parity(predicted: Sequence, reference: Sequence, path: str) -> Dict[int, float]:
    """Predicted against reference coefficients, one panel per ``l``.

    Parameters
    ----------
    predicted, reference : sequence of TensorMap
        Aligned coefficient TensorMaps (same structures, blocks and samples);
        dimensionless density coefficients.
    path : str
        Output PNG.

    Returns
    -------
    dict
        ``l`` -> root-mean-square difference of the coefficients of that ``l``.
    """
    pred, ref = coefficients_by_l(predicted), coefficients_by_l(reference)
    if sorted(pred) != sorted(ref) or any(pred[l].shape != ref[l].shape for l in ref):
        raise ValueError("predicted and reference coefficients have different blocks or samples")
    plt = _pyplot()
    figure, panels = plt.subplots(1, len(ref), figsize=(3.0 * len(ref), 3.0), squeeze=False,
                                  layout="constrained")
    rmse = {}
    for axes, l in zip(panels[0], sorted(ref)):
        rmse[l] = float(np.sqrt(np.mean((pred[l] - ref[l]) ** 2)))
        low, high = float(min(ref[l].min(), pred[l].min())), float(max(ref[l].max(), pred[l].max()))
        axes.plot([low, high], [low, high], color="grey", linewidth=0.8)
        axes.scatter(ref[l], pred[l], s=3, alpha=0.5)
        axes.set_title(f"l = {l}  (RMSE {rmse[l]:.2e})", fontsize=8)
        axes.set_xlabel("reference")
    panels[0][0].set_ylabel("predicted")
    _save(figure, path)
    return rmse


def plot_learning_curve(
    curves: Mapping[str, Sequence[Tuple[int, float]]], path: str, ylabel: str = "test % RMSE"
) -> Dict[str, float]:
    """Test error against the number of training structures, log-log.

    Parameters
    ----------
    curves : mapping of str to sequence of (n_train, error)
        One line per method, e.g. ``{"kernel": [(10, 4.1), (30, 1.5), (100, 0.8)]}``.
    path : str
        Output PNG.
    ylabel : str
        Label of the error axis (its unit included).

    Returns
    -------
    dict
        Method -> fitted log-log slope of the error against ``n_train`` (NaN
        with fewer than two points).
    """
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.5, 3.5))
    slopes = {}
    for name, points in curves.items():
        n, error = (np.array(column, dtype=float) for column in zip(*sorted(points)))
        slopes[name] = float(np.polyfit(np.log(n), np.log(error), 1)[0]) if len(n) > 1 else math.nan
        axes.plot(n, error, marker="o", label=name)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("training structures")
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=8)
    _save(figure, path)
    return slopes
