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

from .prediction import predict_in_batches

PARITY_PLOT = "parity.png"
"""The parity plot :func:`evaluate` writes with ``out``."""


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
    backend = dataset_backend(folder.root, folder.basis) if real_space else None
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
    }


