"""Errors of a model on structures of a dataset: coefficient-space, per atom and in real
space, with the predicted coefficients and a parity plot (:func:`evaluate`)."""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Sequence

import tqdm
from metatensor.torch import TensorMap

from .. import layout
from ..backends import dataset_backend
from ..data import TargetFile, check_completed
from ..dataset import read_dataset
from ..metrics import atom_error_shares, error_summary, overlap_norms
from ..overlap import align_samples
from ..plots import plot_parity
from ..models import DensityModel
from ..run import PARITY_PLOT

from .prediction import predict_in_batches
from .tensor_evaluation import evaluate_tensors


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
    - with ``real_space``, where the backend computes them (PySCF, LDA/GGA) and
      the structure's ``info.json`` records the reference: the errors of the
      predicted density's one-shot energy (after one Kohn-Sham diagonalisation in
      its potential) and Harris-Foulkes energy against the converged SCF energy
      (``energy_one_shot_error_hartree``, ``energy_harris_error_hartree``) and of
      its dipole, ``|mu_ML - mu_SCF|`` (``dipole_error_debye``);
      :meth:`rholearn.backends.Backend.density_properties`; summarised as means
      of absolute values;
    - ``atom_error_share_percent``: each atom's share of its structure's
      ``dc^T S dc``, non-negative and summing to 100 % (:func:`rholearn.metrics.atom_error_shares`).

    With ``out``, the predicted coefficients are written to
    ``out/<index>/coefficients.mts`` and a parity plot of predicted against
    reference coefficients per ``l`` to ``out/parity.png``.

    A model of a molecular tensor (``model.target`` ``"dipole"`` or
    ``"polarizability"``) is evaluated by
    :func:`~rholearn.workflow.tensor_evaluation.evaluate_tensors` (no real-space part).

    Returns
    -------
    dict
        ``structures``: one dict per structure; ``summary``: means (and the set
        RMSE); ``seconds``: prediction and real-space timings.
    """
    if model.target != "density":
        return evaluate_tensors(model, dataset, indices, progress=progress, out=out)
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
    backend = dataset_backend(folder.root, folder.basis) if real_space else None
    levels = None if backend is None else backend.grid_levels
    if levels is not None and grid_level not in levels:
        raise ValueError(f"grid level {grid_level} is not one of the {backend.name} backend's "
                         f"levels, {levels.start} (coarse) to {levels.stop - 1} (fine)")
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
        shares = atom_error_shares(prediction, reference, overlap, atoms.numbers, folder.basis)
        row = {
            "index": index,
            "formula": atoms.get_chemical_formula(),
            "atom_error_share_percent": shares.tolist(),
        }
        if out is not None:
            _write_evaluated(out, index, prediction, reference, parity)
        if real_space:
            start = time.perf_counter()
            row.update(_real_space_errors(
                backend, atoms, prediction, reference, folder, index, grid_level
            ))
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
    for name in PROPERTY_ERRORS:
        values = [abs(row[name]) for row in rows if name in row]
        if values:
            aggregate[name] = sum(values) / len(values)
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


def _real_space_errors(
    backend, atoms, prediction, reference, folder, index, grid_level
) -> Dict[str, float]:
    """L1 errors (%) of the predicted density against the RI and SCF densities, on
    the grid of ``backend``, the one that computed the dataset (:mod:`rholearn.backends`),
    which reruns the SCF with the options in the structure's ``info.json``."""
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
        **_property_errors(backend, atoms, prediction, folder.basis, info),
    }


PROPERTY_ERRORS = ("energy_one_shot_error_hartree", "energy_harris_error_hartree",
                   "dipole_error_debye")
"""The property errors of :func:`evaluate`, where the backend computes them."""


def _property_errors(backend, atoms, prediction, basis, info) -> Dict[str, float]:
    """Energy (Hartree) and dipole (Debye) errors of the predicted density against
    the SCF values recorded in ``info`` (a structure's ``info.json``)."""
    predicted = backend.density_properties(atoms, prediction, basis, info["options"])
    errors = {}
    for name in ("energy_one_shot", "energy_harris"):
        if predicted.get(f"{name}_hartree") is not None and "energy_hartree" in info:
            errors[f"{name}_error_hartree"] = predicted[f"{name}_hartree"] - info["energy_hartree"]
    if "dipole_debye" in predicted and "dipole_debye" in info:
        difference = [a - b for a, b in zip(predicted["dipole_debye"], info["dipole_debye"])]
        errors["dipole_error_debye"] = sum(x * x for x in difference) ** 0.5
    return errors


