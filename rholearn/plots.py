"""Figures to look at after training and evaluation (matplotlib, written as PNG).

- :func:`plot_training_curves`: the training and validation loss of a run's
  ``log.csv`` against the epoch, and the validation % RMSE;
- :func:`plot_parity`: predicted against reference coefficients, ``l = 0`` and
  ``l > 0`` in separate panels, coloured by element;
- :func:`plot_learning_curve`: test error against the number of training
  structures, log-log, one line per method.

Each function writes one PNG atomically and returns the numbers it drew, so a
caller (or a test) can check them.
"""

from __future__ import annotations

import csv
import math
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import ase.data
import numpy as np

from .files import atomic_path

COEFFICIENT_UNIT = "e/Bohr$^3$ on normalised functions"
"""How the coefficient axes are labelled (see :mod:`rholearn.layout`)."""


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


def plot_training_curves(log_path: str, path: str, loss: str = "overlap") -> Dict[str, np.ndarray]:
    """Training and validation loss per structure against the epoch (log scale) and,
    where the log has it, the validation % RMSE in a second panel.

    Parameters
    ----------
    log_path : str
        A run's ``log.csv`` (:mod:`rholearn.train`).
    path : str
        Output PNG.
    loss : str
        Name of the loss the run minimised (:data:`rholearn.workflow.LOSSES`),
        shown on the axis.

    Returns
    -------
    dict
        The columns drawn: ``epoch``, ``train_loss``, ``val_loss`` and
        ``val_rmse_percent`` (NaN where the log has none).
    """
    from matplotlib.ticker import MaxNLocator

    log = read_log(log_path)
    rmse = log.get("val_rmse_percent", np.full(len(log["epoch"]), math.nan))
    plt = _pyplot()
    panels = 2 if np.isfinite(rmse).any() else 1
    figure, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.5), squeeze=False,
                                layout="constrained")
    losses = axes[0][0]
    losses.plot(log["epoch"], log["train_loss"], label="training")
    if np.isfinite(log["val_loss"]).any():
        losses.plot(log["epoch"], log["val_loss"], label="validation")
    losses.set_ylabel(f"{loss} loss per structure")
    losses.set_yscale("log")
    drawn = np.concatenate([log["train_loss"], log["val_loss"]])
    drawn = drawn[np.isfinite(drawn) & (drawn > 0)]
    if len(drawn):
        _plain_log_axis(losses.yaxis, drawn, "")
    losses.legend()
    if panels == 2:
        axes[0][1].plot(log["epoch"], rmse, color="C1")
        axes[0][1].set_ylabel("validation % RMSE")
    for panel in axes[0]:
        panel.set_xlabel("epoch")
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(figure, path)
    return {"epoch": log["epoch"], "train_loss": log["train_loss"], "val_loss": log["val_loss"],
            "val_rmse_percent": rmse}


def coefficients_by_l(tensors: Iterable) -> Dict[Tuple[int, int], np.ndarray]:
    """All coefficient values of each ``(o3_lambda, center_type)``, flattened in a
    fixed order.

    ``tensors`` are coefficient TensorMaps (metatensor-core or -torch) in the
    layout of :mod:`rholearn.layout`; blocks are visited sorted by key and
    samples in stored order, so two lists of aligned TensorMaps give aligned
    arrays.
    """
    values: Dict[Tuple[int, int], List[np.ndarray]] = {}
    for tensor in tensors:
        items = sorted(
            ((tuple(int(x) for x in key.values), block) for key, block in tensor.items()),
            key=lambda item: item[0],
        )
        for (l, _, z), block in items:
            array = block.values
            array = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
            values.setdefault((l, z), []).append(array.reshape(-1))
    return {key: np.concatenate(arrays) for key, arrays in sorted(values.items())}


def plot_parity(predicted: Sequence, reference: Sequence, path: str) -> Dict[str, Dict[str, float]]:
    """Predicted against reference coefficients: ``l = 0`` (which holds the
    electrons, and the largest values) and ``l > 0`` in two panels, each element
    in its colour.

    Parameters
    ----------
    predicted, reference : sequence of TensorMap
        Aligned coefficient TensorMaps (same structures, blocks and samples), of
        a density in electrons / Bohr^3 on normalised basis functions.
    path : str
        Output PNG.

    Returns
    -------
    dict
        ``"l=0"`` and ``"l>0"`` -> element symbol -> root-mean-square difference
        of those coefficients (same unit).
    """
    pred, ref = coefficients_by_l(predicted), coefficients_by_l(reference)
    if sorted(pred) != sorted(ref) or any(pred[key].shape != ref[key].shape for key in ref):
        raise ValueError("predicted and reference coefficients have different blocks or samples")
    groups = {"l=0": [key for key in ref if key[0] == 0], "l>0": [key for key in ref if key[0] > 0]}
    groups = {name: keys for name, keys in groups.items() if keys}
    elements = sorted({z for _, z in ref})
    colours = {z: f"C{i % 10}" for i, z in enumerate(elements)}
    plt = _pyplot()
    figure, panels = plt.subplots(1, len(groups), figsize=(4.0 * len(groups), 3.8),
                                  squeeze=False, layout="constrained")
    rmse: Dict[str, Dict[str, float]] = {}
    for axes, (name, keys) in zip(panels[0], groups.items()):
        rmse[name] = {}
        every = np.concatenate([np.concatenate([ref[key], pred[key]]) for key in keys])
        low, high = float(every.min()), float(every.max())
        axes.plot([low, high], [low, high], color="grey", linewidth=0.8, zorder=0)
        for z in elements:
            mine = [key for key in keys if key[1] == z]
            if not mine:
                continue
            x = np.concatenate([ref[key] for key in mine])
            y = np.concatenate([pred[key] for key in mine])
            symbol = ase.data.chemical_symbols[z]
            rmse[name][symbol] = float(np.sqrt(np.mean((y - x) ** 2)))
            axes.scatter(x, y, s=4, alpha=0.5, color=colours[z], linewidths=0,
                         label=f"{symbol} (RMSE {rmse[name][symbol]:.1e})")
        axes.set_title("l = 0" if name == "l=0" else "l > 0", fontsize=9)
        axes.set_xlabel(f"reference coefficient\n({COEFFICIENT_UNIT})", fontsize=8)
        axes.set_ylabel("predicted coefficient", fontsize=8)
        axes.locator_params(nbins=5)
        axes.ticklabel_format(style="sci", scilimits=(-2, 3))
        axes.tick_params(labelsize=8)
        axes.legend(fontsize=7, markerscale=2, loc="upper left")
    _save(figure, path)
    return rmse


def plot_learning_curve(
    curves: Mapping[str, Sequence[Tuple[int, float]]], path: str, ylabel: str = "test % RMSE"
) -> Dict[str, float]:
    """Test error against the number of training structures, log-log, with plain
    tick labels (``10``, ``30``, ``100`` structures; ``0.5 %``, ``1 %``, ``2 %``).

    Parameters
    ----------
    curves : mapping of str to sequence of (n_train, error)
        One line per method, e.g. ``{"kernel": [(10, 4.1), (30, 1.5), (100, 0.8)]}``;
        errors in %.
    path : str
        Output PNG.
    ylabel : str
        Label of the error axis.

    Returns
    -------
    dict
        Method -> fitted log-log slope of the error against ``n_train`` (NaN
        with fewer than two points).
    """
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.5, 3.5), layout="constrained")
    slopes = {}
    sizes, errors = [], []
    for name, points in curves.items():
        n, error = (np.array(column, dtype=float) for column in zip(*sorted(points)))
        slopes[name] = float(np.polyfit(np.log(n), np.log(error), 1)[0]) if len(n) > 1 else math.nan
        axes.plot(n, error, marker="o", label=f"{name} (slope {slopes[name]:.2f})"
                  if len(n) > 1 else name)
        sizes.extend(n)
        errors.extend(error)
    axes.set_xscale("log")
    axes.set_yscale("log")
    _plain_log_axis(axes.xaxis, sizes, "")
    _plain_log_axis(axes.yaxis, errors, " %")
    axes.set_xlabel("training structures")
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=8)
    _save(figure, path)
    return slopes


def _plain_log_axis(axis, values: Sequence[float], unit: str) -> None:
    """Ticks of a log axis at :func:`nice_ticks`, labelled ``2``, ``0.5 %``, ..."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    axis.set_major_locator(FixedLocator(nice_ticks(min(values), max(values))))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}{unit}"))


def nice_ticks(low: float, high: float) -> List[float]:
    """Ticks at 1, 2 and 5 times powers of ten covering ``[low, high]`` (positive),
    at most about 8 of them, for plain labels on a log axis."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for steps in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0**e for e in range(first, last + 1) for m in steps]
        inside = [t for t in ticks if low / 1.5 <= t <= high * 1.5]
        if len(inside) <= 8:
            return inside or [low, high]
    return inside
