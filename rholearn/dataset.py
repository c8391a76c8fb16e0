"""The dataset folder: every rule about what it holds, how it is written and read.

A dataset is written by a backend (``rhocalc.batch.run_batch``) and read by
:func:`read_dataset`; file names are in :mod:`rholearn.layout`::

    DATASET/
      basis.json       the auxiliary basis (:class:`~rholearn.basis.BasisSet`)
      structures.xyz   all input structures, in order (extended xyz, Angstrom)
      settings.json    the method, with the ``"backend"`` that computed it
      failures.json    index -> {"structure", "error", "reason"} of failed structures
      0/ 1/ ...        one folder per completed structure (:class:`Targets`):
                       coefficients.mts  projections.mts  overlap.mts  info.json
                       and the molecular tensors computed (:data:`PROPERTY_FILES`)

A structure folder is written to a temporary folder and renamed
(:func:`rholearn.files.atomic_folder`), so a folder that exists is complete.
A folder holds one dataset only: :func:`check_structures`,
:func:`check_settings` and :func:`check_same_basis` refuse other structures,
settings or basis.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, ContextManager, Dict, Iterator, List, NamedTuple, Optional, Sequence

import ase
import ase.io
import numpy as np
import scipy.spatial
from metatensor import TensorMap

from . import files, layout, tensors
from .basis import BasisSet
from .files import atomic_folder, atomic_path, differing_keys, recorded_json, write_json

SETTINGS_FILE = "settings.json"
"""Settings that define a dataset's targets, with the ``"backend"`` that computed them."""

PROPERTY_FILES = {name: f"{name}.mts" for name in tensors.RANKS}
"""``dipole.mts``, ``polarizability.mts``: per-structure molecular tensors
(:mod:`rholearn.tensors`), in a structure's folder when its backend computed them."""

POSITION_TOLERANCE = 1e-6
"""Angstrom: structures.xyz stores 8 decimals, so a resumed dataset matches to this."""


class DatasetError(ValueError):
    """Bad input for a dataset: unreadable structures or files, or a folder
    holding another dataset."""


# --------------------------------------------------------------- structures ---
def structure_name(atoms: ase.Atoms, name: Optional[str] = None) -> str:
    """How errors and ``info.json`` name a structure: ``name`` if given, else
    ``atoms.info["name"]``, else the chemical formula."""
    if name is not None:
        return str(name)
    return str(atoms.info.get("name", atoms.get_chemical_formula()))


MIN_DISTANCE = 0.3
"""Angstrom: atoms closer than this are refused as overlapping. The shortest
chemical bond (H2) is 0.74 Angstrom; strongly distorted training structures may
come closer, but nuclei nearer than this make an orbital basis nearly linearly
dependent (an SCF then fails with a singular matrix) and no model was trained on
them: they are a unit or input error."""


def check_positions(atoms: ase.Atoms, where: str = "structure") -> None:
    """Refuse a structure whose positions no calculation or model can use.

    Raises
    ------
    ValueError
        Naming ``where`` and the cause: no atoms; a NaN or infinite position
        (naming the atom); two atoms closer than :data:`MIN_DISTANCE` Angstrom
        (naming both, with their distance).
    """
    if len(atoms) == 0:
        raise ValueError(f"{where}: no atoms")
    bad = np.flatnonzero(~np.isfinite(atoms.positions).all(axis=1))
    if len(bad):
        raise ValueError(
            f"{where}: atom {bad[0]} ({atoms.get_chemical_symbols()[bad[0]]}) has a non-finite "
            f"position {atoms.positions[bad[0]].tolist()}"
        )
    if len(atoms) < 2:
        return
    distances, neighbours = scipy.spatial.cKDTree(atoms.positions).query(atoms.positions, k=2)
    first = int(np.argmin(distances[:, 1]))
    if distances[first, 1] < MIN_DISTANCE:
        i, j = sorted((first, int(neighbours[first, 1])))
        symbols = atoms.get_chemical_symbols()
        raise ValueError(
            f"{where}: atoms {i} ({symbols[i]}) and {j} ({symbols[j]}) are "
            f"{distances[first, 1]:.3f} Angstrom apart, closer than {MIN_DISTANCE} Angstrom: "
            "overlapping atoms (positions in Angstrom?)"
        )


def read_structures(path: str, index: str = ":") -> List[ase.Atoms]:
    """Read structures (positions in Angstrom) from any file ``ase.io.read`` knows.

    Parameters
    ----------
    path : str
        Structure file (extxyz, xyz, cif, POSCAR, ...; format from the extension).
    index : str
        Which structures, in ase syntax: ``":"`` (all), ``"0:10"``, ``"::2"``, ``"-1"``.

    Raises
    ------
    DatasetError
        Naming ``path`` if it is missing, unreadable, or holds no structure.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"cannot read structures: no such file '{path}'")
    try:
        structures = ase.io.read(path, index=index)
    except Exception as error:  # ase raises many types, depending on the format
        raise DatasetError(
            f"cannot read structures from '{path}' (index '{index}'): "
            f"{type(error).__name__}: {error}"
        ) from error
    if isinstance(structures, ase.Atoms):
        structures = [structures]
    if not structures:
        raise DatasetError(f"no structures in '{path}' at index '{index}'")
    return structures


def check_structures(out: str, structures: Sequence[ase.Atoms]) -> None:
    """Write ``out/structures.xyz``, or check that the one there holds the same
    structures (raising a :class:`DatasetError` naming the first that differs):
    same atoms, periodicity, cell, positions (to :data:`POSITION_TOLERANCE`),
    charge and spin."""
    path = os.path.join(out, layout.STRUCTURES_FILE)
    if not os.path.exists(path):
        with atomic_path(path) as tmp:
            ase.io.write(tmp, list(structures), format="extxyz")
        return
    existing = read_structures(path)
    where = None
    if len(existing) != len(structures):
        where = f"{len(existing)} structures there, {len(structures)} requested"
    else:
        for index, (a, b) in enumerate(zip(existing, structures)):
            if not _same_structure(a, b):
                where = (
                    f"structure {index} is {a.get_chemical_formula()} there, "
                    f"{b.get_chemical_formula()} (or other positions) requested"
                )
                break
    if where is not None:
        raise DatasetError(
            f"'{path}' holds other structures ({where}); use another output folder "
            "to avoid mixing datasets"
        )


def _same_structure(a: ase.Atoms, b: ase.Atoms) -> bool:
    return (
        all(a.info.get(key, 0) == b.info.get(key, 0) for key in ("charge", "spin"))
        and np.array_equal(a.numbers, b.numbers)
        and np.array_equal(a.pbc, b.pbc)
        and np.allclose(a.cell.array, b.cell.array, rtol=0, atol=POSITION_TOLERANCE)
        and np.allclose(a.positions, b.positions, rtol=0, atol=POSITION_TOLERANCE)
    )


# ----------------------------------------------------------------- failures ---
@dataclasses.dataclass
class Failure:
    """Why one structure of a dataset has no targets (an entry of ``failures.json``).

    Attributes
    ----------
    structure : str
        The structure's name (``atoms.info["name"]``) or chemical formula.
    error : str
        Type name of the exception (``"SCFNotConverged"``, ``"KeyError"``, ...).
    reason : str
        The exception's message.
    """

    structure: str
    error: str
    reason: str

    def __str__(self) -> str:
        return f"{self.structure}, {self.error}: {self.reason}"

    @classmethod
    def of(cls, atoms: ase.Atoms, error: Exception) -> "Failure":
        """The failure of computing ``atoms`` with this exception."""
        # str(KeyError("...")) adds quotes around the message
        single_message = len(error.args) == 1 and isinstance(error.args[0], str)
        reason = error.args[0] if single_message else str(error)
        return cls(structure=structure_name(atoms), error=type(error).__name__, reason=reason)


def read_failures(root: str) -> Dict[int, Failure]:
    """The failed structures of a dataset folder, by index ({} if none); an
    unreadable ``failures.json`` is a :class:`DatasetError` naming it."""
    path = os.path.join(root, layout.FAILURES_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return {int(index): Failure(**record) for index, record in json.load(f).items()}
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise DatasetError(f"cannot read failures file '{path}': {error}") from error


def write_failures(root: str, failures: Dict[int, Failure]) -> None:
    """Write ``failures.json`` atomically (removed when there are no failures)."""
    path = os.path.join(root, layout.FAILURES_FILE)
    if failures:
        write_json(path, {str(i): dataclasses.asdict(failures[i]) for i in sorted(failures)})
    elif os.path.exists(path):
        os.remove(path)


# ------------------------------------------------------------ settings, basis ---
def check_settings(out: str, requested: Dict[str, Any]) -> None:
    """Record ``requested`` in ``out/settings.json``, or check it equals what is
    recorded there.

    Without ``settings.json`` (deleted), the guard is rebuilt from the
    ``options`` that the completed structures record in their ``info.json``
    (the keys both have); a structure recording none is refused.
    """
    path = os.path.join(out, SETTINGS_FILE)
    requested = json.loads(json.dumps(requested))  # as it reads back (tuples -> lists)
    if not os.path.exists(path):
        for info_path, options in _recorded_structure_options(out):
            if not isinstance(options, dict):
                raise DatasetError(
                    f"'{path}' is missing and '{info_path}' does not record the options of "
                    "its structure, so the settings cannot be checked; use another output folder"
                )
            differing = [k for k in requested if k in options and options[k] != requested[k]]
            if differing:
                details = ", ".join(
                    f"{k}: {options[k]!r} there, {requested[k]!r} requested" for k in differing
                )
                raise DatasetError(
                    f"'{info_path}' was made with other settings ({details}; '{path}' "
                    "is missing); use another output folder to avoid mixing datasets"
                )
    try:
        existing = recorded_json(path, requested)
    except ValueError as error:
        raise DatasetError(str(error)) from error
    differing = differing_keys(existing, requested)
    if differing:
        details = ", ".join(
            f"{name}: {existing.get(name)!r} there, {requested.get(name)!r} requested"
            for name in differing
        )
        raise DatasetError(
            f"'{path}' was made with other settings ({details}); use another output "
            "folder to avoid mixing datasets"
        )


def read_recorded_options(root: str) -> Dict[str, Any]:
    """What a dataset records about its method: ``settings.json``, or (a dataset
    without one) the ``info.json`` options of its first completed structure;
    ``{}`` if neither exists."""
    path = os.path.join(root, SETTINGS_FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                return dict(json.load(f))
        except (OSError, ValueError, TypeError) as error:
            raise DatasetError(f"cannot read '{path}': {error}") from error
    for _, options in _recorded_structure_options(root):
        return dict(options) if isinstance(options, dict) else {}
    return {}


def _recorded_structure_options(root: str) -> Iterator[tuple]:
    """``(info.json path, its "options" or None)`` of each completed structure."""
    for name in sorted(os.listdir(root), key=lambda n: (len(n), n)):
        if not (name.isdigit() and os.path.isdir(os.path.join(root, name))):
            continue
        info_path = os.path.join(root, name, layout.INFO_FILE)
        try:
            with open(info_path) as f:
                options = json.load(f).get("options")
        except (OSError, ValueError, AttributeError):  # missing, not JSON, not a dict
            options = None
        yield info_path, options


def check_same_basis(
    expected: BasisSet, found: BasisSet, where: str, expected_by: str = "the one requested"
) -> None:
    """Raise a :class:`DatasetError` naming both bases and their first difference.

    Parameters
    ----------
    expected : BasisSet
        The basis asked for (a model's, or a rerun's).
    found : BasisSet
        The basis recorded in ``where`` (a dataset's ``basis.json``).
    expected_by : str
        Whose ``expected`` is, in the message (``"the model's"``).
    """
    if expected == found:
        return
    if expected.name != found.name:
        difference = "the names differ"
    elif expected.elements != found.elements:
        difference = f"elements {found.elements} instead of {expected.elements}"
    else:
        symbol = next(s for s in expected.elements if expected.shells[s] != found.shells[s])
        difference = (
            f"element {symbol} has radial functions per l {found.n_radial(symbol)} "
            f"instead of {expected.n_radial(symbol)}, or different exponents"
        )
    raise DatasetError(
        f"'{where}' holds another auxiliary basis ('{found.name}' for {found.elements}) "
        f"than {expected_by} ('{expected.name}' for {expected.elements}): {difference}; "
        "use another dataset or output folder to avoid mixing bases"
    )


def claim(
    out: str, structures: Sequence[ase.Atoms], basis: BasisSet, settings: Optional[dict]
) -> None:
    """Check that ``structures``, ``basis`` and ``settings`` match the dataset
    in ``out`` (:func:`check_structures`, :func:`check_same_basis`,
    :func:`check_settings`); write those it does not hold yet."""
    basis_path = os.path.join(out, layout.BASIS_FILE)
    check_structures(out, structures)
    if os.path.exists(basis_path):
        try:
            existing = BasisSet.load(basis_path)
        except ValueError as error:
            raise DatasetError(str(error)) from error
        check_same_basis(basis, existing, basis_path)
    if settings is not None:
        check_settings(out, settings)
    if not os.path.exists(basis_path):
        basis.save(basis_path)


def exclusive_lock(out: str) -> ContextManager[None]:
    """Hold an exclusive ``flock`` on ``out/.lock`` (:func:`rholearn.files.exclusive_lock`):
    a second writer is refused with a :class:`DatasetError`."""
    return files.exclusive_lock(out, lambda path: DatasetError(
        f"another run is writing to '{out}' (it holds a lock on '{path}')"
    ))


# ------------------------------------------------------------------ targets ---
@dataclasses.dataclass
class Targets:
    """Density-fitting targets of one structure, in the shared layout.

    Attributes
    ----------
    coefficients : TensorMap
        Expansion coefficients ``c`` of the fitted density (layout of
        :mod:`rholearn.layout`).
    projections : TensorMap
        Projections ``w = S c`` of the density onto the auxiliary functions.
    overlap : TensorMap
        Auxiliary-basis overlap ``S`` as sparse atom-pair blocks.
    info : dict
        JSON-serialisable diagnostics: SCF energy (Hartree), electron counts,
        fit errors, timings (s), options used.
    properties : dict
        ``name -> TensorMap`` of the molecular tensors computed (keys of
        :data:`PROPERTY_FILES`; layout of :mod:`rholearn.tensors`), often none.
    """

    coefficients: TensorMap
    projections: TensorMap
    overlap: TensorMap
    info: Dict[str, Any]
    properties: Dict[str, TensorMap] = dataclasses.field(default_factory=dict)

    def write(self, folder: str) -> None:
        """Write the files into ``folder`` atomically
        (:func:`~rholearn.files.atomic_folder`): a folder that exists is complete."""
        with atomic_folder(folder) as tmp:
            layout.save(os.path.join(tmp, layout.COEFFICIENTS_FILE), self.coefficients)
            layout.save(os.path.join(tmp, layout.PROJECTIONS_FILE), self.projections)
            layout.save(os.path.join(tmp, layout.OVERLAP_FILE), self.overlap)
            for name, tensor in self.properties.items():
                layout.save(os.path.join(tmp, PROPERTY_FILES[name]), tensor)
            with open(os.path.join(tmp, layout.INFO_FILE), "w") as f:
                json.dump(self.info, f, indent=1)

    @classmethod
    def read(cls, folder: str) -> "Targets":
        """Read targets written by :meth:`write`; errors name the file at fault."""
        info_path = os.path.join(folder, layout.INFO_FILE)
        try:
            with open(info_path) as f:
                info = json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read '{info_path}': {error}") from error
        properties = {
            name: layout.load(os.path.join(folder, file))
            for name, file in PROPERTY_FILES.items()
            if os.path.exists(os.path.join(folder, file))
        }
        return cls(
            coefficients=layout.load(os.path.join(folder, layout.COEFFICIENTS_FILE)),
            projections=layout.load(os.path.join(folder, layout.PROJECTIONS_FILE)),
            overlap=layout.load(os.path.join(folder, layout.OVERLAP_FILE)),
            info=info,
            properties=properties,
        )


def is_complete(root: str, index: int) -> bool:
    """Whether structure ``index`` of the dataset ``root`` has its (complete) folder."""
    return os.path.isdir(layout.structure_dir(root, index))


# ------------------------------------------------------------------ reading ---
class DatasetFolder(NamedTuple):
    """What a dataset folder holds, as read by :func:`read_dataset`."""

    root: str
    frames: List[ase.Atoms]
    """Every input structure, in file order (positions in Angstrom)."""
    basis: BasisSet
    indices: List[int]
    """Completed structures, ascending."""
    failures: Dict[int, str]
    """Failed structures (without a folder) and why, from ``failures.json``."""


def read_dataset(root: str, basis: Optional[BasisSet] = None) -> DatasetFolder:
    """Read a dataset folder's structures, basis and list of completed structures.

    Failed structures (listed in ``failures.json`` and without a folder) are
    skipped with a warning naming them and their reason.

    Parameters
    ----------
    root : str
        The dataset folder.
    basis : BasisSet, optional
        The basis a model was built for; if given, the dataset's ``basis.json``
        must be identical to it.

    Raises
    ------
    FileNotFoundError
        If the folder, ``basis.json`` or ``structures.xyz`` is missing.
    ValueError
        If no structure is completed, the basis differs from ``basis``, or there
        are structure folders beyond the structures of ``structures.xyz`` (a
        :class:`DatasetError`: the file was cut short or replaced).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no such dataset folder: '{root}'")
    basis_path = existing_file(os.path.join(root, layout.BASIS_FILE))
    dataset_basis = BasisSet.load(basis_path)
    if basis is not None:
        check_same_basis(basis, dataset_basis, where=basis_path, expected_by="the model's")
    structures_path = existing_file(os.path.join(root, layout.STRUCTURES_FILE))
    frames = read_structures(structures_path)
    beyond = sorted(int(name) for name in os.listdir(root) if name.isdigit()
                    and int(name) >= len(frames) and os.path.isdir(os.path.join(root, name)))
    if beyond:
        raise DatasetError(
            f"'{structures_path}' holds {len(frames)} structures, but '{root}' has structure "
            f"folders {_listed(beyond)} beyond them: {layout.STRUCTURES_FILE} was cut short or "
            "replaced; restore it (or remove those folders)"
        )
    indices = [i for i in range(len(frames)) if is_complete(root, i)]
    failures = {
        i: str(failure)  # "name, error: reason"
        for i, failure in read_failures(root).items()
        if i not in indices
    }
    if failures:
        warnings.warn(
            f"{len(failures)} of {len(frames)} structures in '{root}' failed and are "
            f"skipped: {_summarise(failures)}",
            stacklevel=2,
        )
    if not indices:
        raise ValueError(f"no completed structures in '{root}'")
    return DatasetFolder(root, frames, dataset_basis, indices, failures)


def existing_file(path: str) -> str:
    """``path``, or a ``FileNotFoundError`` naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"missing file '{path}'")
    return path


def _listed(indices: List[int], shown: int = 5) -> str:
    """``[4, 5, 6]``, or ``[4, 5, 6, 7, 8, ... (12 in all)]`` for long lists."""
    text = ", ".join(str(i) for i in indices[:shown])
    return f"[{text}, ... ({len(indices)} in all)]" if len(indices) > shown else f"[{text}]"


def _summarise(failures: Dict[int, str], shown: int = 5) -> str:
    text = "; ".join(f"{i}: {reason}" for i, reason in list(failures.items())[:shown])
    if len(failures) > shown:
        text += f"; and {len(failures) - shown} more"
    return text
