"""Errors of a molecular-tensor model (dipole, polarisability) on structures of a
dataset, with the predicted Cartesian tensors and a parity plot (:func:`evaluate_tensors`,
called by :func:`rholearn.workflow.evaluate` for a tensor model)."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import tqdm

from .. import layout, tensors
from ..dataset import PROPERTY_FILES, read_dataset
from ..kinds import check_properties, target_kind
from ..metrics import OverlapNorms, error_summary
from ..models import DensityModel
from ..plots import _pyplot
from ..reduction import StructureTensor
from ..run import PARITY_PLOT
from .prediction import predict_in_batches


def evaluate_tensors(
    model: DensityModel,
    dataset: str,
    indices: Optional[Sequence[int]] = None,
    progress: bool = True,
    out: Optional[str] = None,
) -> Dict[str, object]:
    """Errors of a tensor model's predictions, in % and atomic units.

    With ``dy`` the error of a structure's tensor (spherical components, the
    same norm as the Cartesian symmetric tensor's Frobenius norm) and ``y_base``
    the model's baseline (the per-element ``o3_lambda = 0`` contributions summed
    over the structure; zero for a dipole):

    - ``relative_l2_percent`` per structure: ``100 |dy| / |y|``;
    - ``rmse_percent``: ``100 sqrt(sum |dy|^2 / sum |y - y_base|^2)``, the error
      relative to the targets' spread around the baseline (100 %: predicting the
      baseline), and ``rmse_percent_lambda_<l>`` per ``o3_lambda`` block;
    - ``rmse_au``: ``sqrt(sum |dy|^2 / n)`` (e Bohr for dipoles, Bohr^3 for
      polarisabilities).

    Each structure's row holds the predicted and reference Cartesian tensors
    (``predicted_au``, ``reference_au``). With ``out``, the predicted tensor is
    written to ``out/<index>/<kind>.mts`` and a parity plot of the Cartesian
    components to ``out/parity.png``.
    """
    kind = target_kind(model.target)
    folder = read_dataset(dataset)
    indices = list(folder.indices if indices is None else indices)
    if not indices:
        raise ValueError(f"no structures of '{dataset}' to evaluate")
    check_properties(folder, kind, indices)
    reference_of = StructureTensor(folder, kind, model.dtype, model.device)
    means = {z: values[0] for z, values in model.baseline.to_dict().items()}
    seconds = {"predict": 0.0}
    rows, squared, norms, spreads = [], [], [], []
    per_lambda: Dict[int, List[np.ndarray]] = {l: [] for l in kind.lambdas}
    bar = tqdm.tqdm(predict_in_batches(model, folder.frames, indices, seconds),
                    total=len(indices), desc="evaluate", unit="structure", disable=not progress)
    for index, prediction in bar:
        reference = reference_of(index)
        predicted, wanted = _components(prediction), _components(reference)
        base = {l: np.zeros_like(wanted[l]) for l in kind.lambdas}
        if 0 in base:
            base[0][:] = sum(means.get(int(z), 0.0) for z in folder.frames[index].numbers)
        for l in kind.lambdas:
            per_lambda[l].append(np.array([((predicted[l] - wanted[l]) ** 2).sum(),
                                           ((wanted[l] - base[l]) ** 2).sum()]))
        squared.append(sum(((predicted[l] - wanted[l]) ** 2).sum() for l in kind.lambdas))
        norms.append(sum((wanted[l] ** 2).sum() for l in kind.lambdas))
        spreads.append(sum(((wanted[l] - base[l]) ** 2).sum() for l in kind.lambdas))
        rows.append({
            "index": index,
            "formula": folder.frames[index].get_chemical_formula(),
            "predicted_au": tensors.tensormap_to_cartesian(prediction).tolist()[0],
            "reference_au": tensors.tensormap_to_cartesian(reference).tolist()[0],
        })
        if out is not None:
            os.makedirs(layout.structure_dir(out, index), exist_ok=True)
            layout.save(os.path.join(layout.structure_dir(out, index), PROPERTY_FILES[kind.name]),
                        prediction)
    summary = error_summary(OverlapNorms(torch.tensor(indices), *(
        torch.tensor(values, dtype=torch.float64) for values in (squared, norms, spreads))))
    for row in rows:
        row["relative_l2_percent"] = summary["relative_l2_percent"]["per_structure"][row["index"]]
    aggregate = {
        "n_structures": len(rows),
        "target": kind.name,
        "relative_l2_percent": summary["relative_l2_percent"]["mean"],
        "rmse_percent": summary["rmse_percent"],
        "rmse_au": float(np.sqrt(sum(squared) / len(rows))),
    }
    for l, values in per_lambda.items():
        error, spread = np.sum(values, axis=0)
        aggregate[f"rmse_percent_lambda_{l}"] = float(100 * np.sqrt(error / spread))
    seconds["predict_per_structure"] = seconds["predict"] / len(rows)
    if out is not None:
        plot_tensor_parity(rows, kind.name, os.path.join(out, PARITY_PLOT))
    return {"structures": rows, "summary": aggregate, "seconds": seconds}


def _components(tensor) -> Dict[int, np.ndarray]:
    """``o3_lambda -> values`` of a one-structure tensor, shape ``(2 lambda + 1,)``."""
    return {int(key["o3_lambda"]): layout._to_numpy(block.values).reshape(-1)
            for key, block in tensor.items()}


def plot_tensor_parity(rows: List[dict], name: str, path: str) -> None:
    """Predicted against reference Cartesian components (atomic units) of
    :func:`evaluate_tensors`' rows, one colour per component, to a PNG."""
    predicted = np.array([row["predicted_au"] for row in rows]).reshape(len(rows), -1)
    reference = np.array([row["reference_au"] for row in rows]).reshape(len(rows), -1)
    labels = ["x", "y", "z"] if predicted.shape[1] == 3 else [
        a + b for a in "xyz" for b in "xyz"]
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.2, 4.0), layout="constrained")
    for column, label in enumerate(labels):
        if predicted.shape[1] == 9 and label[0] > label[1]:
            continue  # symmetric: the lower triangle repeats the upper one
        axes.scatter(reference[:, column], predicted[:, column], s=8, label=label)
    low, high = float(reference.min()), float(reference.max())
    axes.plot([low, high], [low, high], color="grey", linewidth=0.8)
    axes.set_xlabel(f"reference {name} (a.u.)")
    axes.set_ylabel(f"predicted {name} (a.u.)")
    axes.legend(fontsize=7, ncol=2)
    figure.savefig(path, dpi=150)
    plt.close(figure)
