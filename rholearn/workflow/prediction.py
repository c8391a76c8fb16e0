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
import tqdm
from metatensor.torch import TensorMap

from .. import layout, tensors
from ..descriptors import select_system
from ..backends import basis_backend
from ..cube import LARGE_CUBE_POINTS, CubeGrid, cube_grid
from ..dataset import PROPERTY_FILES, check_positions
from ..files import atomic_folder, exclusive_lock, remove_stale_files, write_json
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
    layout, ``system`` = position in ``frames``; a tensor model (``model.target``):
    ``out/<name>/<target>.mts``, :mod:`rholearn.tensors` layout, and the Cartesian
    tensor in atomic units as ``<target>_au`` in ``info.json``), ``out/<name>/info.json`` and,
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
    Cubes are written slab by slab (:func:`rholearn.cube.write_cube`), with a
    progress bar from :data:`~rholearn.cube.LARGE_CUBE_POINTS` points.

    Each prediction folder holds a marker file, :data:`PREDICTION_MARKER`, and
    only marked folders are ever replaced or removed. Each ``out/<name>`` is
    written to a temporary folder and renamed, replacing the folder of an earlier
    prediction as a whole (no stale ``density.cube`` is left beside new
    coefficients); prediction folders of an earlier prediction that this one does
    not write are removed, so ``out`` holds this prediction only
    (:func:`earlier_predictions` lists what will be replaced). One prediction at a
    time writes into ``out`` (it holds ``out/.lock``).

    Everything is checked before anything is written: a folder holding a dataset
    (``basis.json``), a file, symlink or unmarked folder in the way of a structure's
    folder, positions that no model was trained on
    (:func:`rholearn.dataset.check_positions`: non-finite, or atoms closer than
    :data:`~rholearn.dataset.MIN_DISTANCE`), elements outside the model's basis,
    a cube spacing that is not > 0 or a cube above
    :data:`~rholearn.cube.MAX_CUBE_POINTS` points.

    Raises
    ------
    ValueError
        Naming the structure, folder or setting at fault: see above; duplicate or
        empty folder names, ``names`` or ``indices`` of another length than
        ``frames``, another prediction writing into ``out``.
    FileExistsError
        ``out`` holds a dataset, or something other than a prediction folder where
        a structure's folder goes.
    """
    if cube and model.target != "density":
        raise ValueError(f"a {model.target} model predicts no density: no cube files")
    if os.path.isfile(os.path.join(out, layout.BASIS_FILE)):
        raise FileExistsError(
            f"'{out}' holds a dataset ('{layout.BASIS_FILE}'); predict into another folder"
        )
    indices = list(range(len(frames)) if indices is None else indices)
    folder_names = _prediction_names(frames, indices, names)
    _check_structures(model, frames, indices, folder_names)
    try:
        backend = basis_backend(model.basis)
    except ValueError:
        if cube:
            raise
        backend = None  # no electron count: the coefficients need no backend
    grids = _cube_grids(frames, indices, folder_names, cube_spacing) if cube else None
    os.makedirs(out, exist_ok=True)
    with exclusive_lock(out, lambda path: ValueError(
        f"another prediction is writing into '{out}' (it holds a lock on '{path}')"
    )):
        _check_folders(out, folder_names)
        stale = [name for name in earlier_predictions(out) if name not in folder_names]
        remove_stale_files(out)
        predictions = predict_in_batches(model, frames, range(len(frames)),
                                         batch_size=batch_size)
        bar = tqdm.tqdm(predictions, total=len(frames), desc="predict", unit="structure",
                        disable=not progress)
        info = {"model_file": model_file, "model": model.model_type, "basis": model.basis.name}
        counts = []
        for position, coefficients in bar:
            info.update(name=folder_names[position], index=indices[position])
            counts.append(_write_prediction(
                model, frames[position], info, coefficients, out, backend,
                None if grids is None else (cube_spacing, grids[position]), progress,
            ))
        for name in stale:
            shutil.rmtree(os.path.join(out, name))
    if cube:
        _warn_under_resolved(folder_names, counts, cube_spacing)
    return [os.path.join(out, name) for name in folder_names]


CUBE_FILE = "density.cube"
"""A prediction's cube file."""

PREDICTION_MARKER = ".rholearn-prediction"
"""The file that marks a folder as written by :func:`predict`: only marked folders
are replaced or removed by a later prediction."""

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


def _check_structures(model: DensityModel, frames, indices, names) -> None:
    """Refuse, naming the structure, positions no model was trained on and
    elements outside the model's basis."""
    for atoms, index, name in zip(frames, indices, names):
        where = f"structure {index} ('{name}')"
        check_positions(atoms, where)
        model.check_elements(atoms, where)


def _cube_grids(frames, indices, names, spacing: float) -> List[CubeGrid]:
    """Each structure's cube grid, refusing a bad spacing or a cube too large."""
    return [cube_grid(atoms, spacing, where=f"structure {index} ('{name}')")
            for atoms, index, name in zip(frames, indices, names)]


def _check_folders(out: str, names: Sequence[str]) -> None:
    """Refuse anything but a prediction folder (:data:`PREDICTION_MARKER`) where a
    structure's folder goes: it would be replaced."""
    for name in names:
        path = os.path.join(out, name)
        if not os.path.lexists(path) or _is_prediction(path):
            continue
        kind = ("a symlink" if os.path.islink(path) else "a folder not written by rholearn "
                f"predict (no '{PREDICTION_MARKER}' in it)" if os.path.isdir(path) else "a file")
        raise FileExistsError(
            f"'{path}' is {kind}; the prediction of structure '{name}' would replace it: "
            "move it away or predict into another folder (--out)"
        )


def _is_prediction(path: str) -> bool:
    """A real folder (not a symlink) with :data:`PREDICTION_MARKER`."""
    return (os.path.isdir(path) and not os.path.islink(path)
            and os.path.isfile(os.path.join(path, PREDICTION_MARKER)))


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
    """Names of the prediction folders (holding :data:`PREDICTION_MARKER`, not
    symlinks) already in ``out``, sorted."""
    if not os.path.isdir(out):
        return []
    return sorted(entry.name for entry in os.scandir(out)
                  if not entry.name.startswith(".") and _is_prediction(entry.path))


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


def _write_prediction(model, atoms, info, coefficients, out, backend, cube, progress):
    """Write one structure's coefficients, ``info.json`` (``info`` and the counts),
    the marker and, if ``cube`` (spacing in Angstrom, :class:`~rholearn.cube.CubeGrid`)
    is given, cube file into ``out/<info["name"]>``, atomically
    (:func:`~rholearn.files.atomic_folder`). Returns the electron counts
    ``(exact, cube)``, each ``None`` if not computed."""
    info = {**info, "formula": atoms.get_chemical_formula()}
    exact = cube_count = None
    if model.target != "density":  # a molecular tensor: Cartesian values in info.json
        info[f"{model.target}_au"] = tensors.tensormap_to_cartesian(coefficients).tolist()[0]
    elif backend is not None:
        vector = layout.tensormap_to_vector(coefficients, atoms.numbers, model.basis)
        exact = float(backend.function_integrals(atoms, model.basis) @ vector)
    info["n_electrons"] = exact
    with atomic_folder(os.path.join(out, info["name"])) as tmp:
        with open(os.path.join(tmp, PREDICTION_MARKER), "w") as f:
            f.write("written by rholearn predict: replaced by the next prediction into "
                    "this folder's parent\n")
        file_name = PROPERTY_FILES.get(model.target, layout.COEFFICIENTS_FILE)
        layout.save(os.path.join(tmp, file_name), coefficients)
        if cube is not None:
            spacing, grid = cube
            cube_count = backend.write_cube(
                os.path.join(tmp, CUBE_FILE), atoms, coefficients, model.basis, spacing,
                progress=progress and grid.n_points >= LARGE_CUBE_POINTS,
            )
            info.update(cube_spacing_angstrom=spacing, cube_voxel_angstrom=grid.step.tolist(),
                        cube_shape=list(grid.shape), cube_n_electrons=cube_count)
        write_json(os.path.join(tmp, PREDICTION_INFO_FILE), info)
    return exact, cube_count
