"""Predicting densities of new structures, no quantum chemistry involved: coefficients,
``info.json`` and cube files, one folder per structure (:func:`predict`)."""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import ase
import ase.io.cube
import ase.units
import numpy as np
import tqdm
from metatensor.torch import TensorMap

from .. import layout
from ..descriptors import select_system
from ..backends import basis_backend
from ..files import atomic_folder, remove_stale_files, write_json
from ..models import DensityModel



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
