"""Compute the targets of many structures into a resumable dataset folder.

The driver is backend-agnostic: it takes a ``compute(atoms, system=index)``
callable returning :class:`~rhocalc.targets.Targets` and writes the dataset
layout of :mod:`rholearn.layout`::

    OUT/
      basis.json       the auxiliary basis
      structures.xyz   all input structures, in order (extended xyz, Angstrom)
      failures.json    index -> {"structure", "error", "reason"} of failed structures
      0/ 1/ ...        one complete folder per computed structure

Every file is written to a temporary name and renamed, so a killed run leaves
only complete folders (and ``.tmp-*`` leftovers, removed by the next run). A
rerun on the same folder skips the structures that have a folder and retries
the failed ones; a rerun with other structures or another basis is refused.

Results are written by the calling (parent) process as they arrive: workers
only compute. This works with executors whose workers run on other machines
without a shared file system (dask, SLURM), keeps ``failures.json`` with a
single writer, and lets a worker crash without leaving partial files.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import fcntl
import glob
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import ase
import ase.io
import numpy as np
import tqdm

from rholearn import layout
from rholearn.basis import BasisSet
from rholearn.layout import Failure
from rholearn.files import atomic_path, differing_keys, recorded_json

from .structures import structure_name
from .targets import Targets

Compute = Callable[..., Targets]
"""``compute(atoms, system=index) -> Targets``; must be picklable for parallel runs."""

SETTINGS_FILE = "settings.json"
"""Settings that define a dataset's targets (see :func:`run_batch`)."""

POSITION_TOLERANCE = 1e-6
"""Angstrom: structures.xyz stores 8 decimals, so a resumed dataset matches to this."""

_LOCK_FILE = ".lock"
_STALE_PATTERN = ".tmp-*"  # what rholearn.files.atomic_path and Targets.write leave
_POLL_SECONDS = 0.1


class DatasetError(ValueError):
    """Bad input for a dataset: unreadable structures, or a folder holding another dataset."""


def failure_of(atoms: ase.Atoms, error: Exception) -> Failure:
    """The :class:`~rholearn.layout.Failure` of computing ``atoms`` with this exception."""
    # str(KeyError("...")) adds quotes around the message
    single_message = len(error.args) == 1 and isinstance(error.args[0], str)
    reason = error.args[0] if single_message else str(error)
    return Failure(structure=structure_name(atoms), error=type(error).__name__, reason=reason)


@dataclasses.dataclass
class BatchReport:
    """Outcome of :func:`run_batch`, as sorted lists of dataset indices.

    Attributes
    ----------
    done : list of int
        Computed and written by this run.
    skipped : list of int
        Already complete in the output folder before this run.
    failed : list of int
        Failed in this run (which retries earlier failures, so these are all the
        failures of the dataset); the reasons are in ``failures.json``, see
        :func:`read_failures`.
    """

    done: List[int]
    skipped: List[int]
    failed: List[int]


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


def read_failures(out: str) -> Dict[int, Failure]:
    """The failed structures of a dataset folder (:func:`rholearn.layout.read_failures`),
    a corrupt file being a :class:`DatasetError`."""
    try:
        return layout.read_failures(out)
    except ValueError as error:
        raise DatasetError(str(error)) from error


def run_batch(
    structures: Sequence[ase.Atoms],
    out: str,
    compute: Compute,
    basis: BasisSet,
    executor: Optional[concurrent.futures.Executor] = None,
    n_workers: int = 1,
    progress: bool = True,
    settings: Optional[dict] = None,
    locked: bool = False,
) -> BatchReport:
    """Compute and write the targets of every structure not yet in ``out``.

    Parameters
    ----------
    structures : sequence of ase.Atoms
        Structures, positions in Angstrom. Structure ``i`` goes to ``out/i/``
        and is computed as ``compute(structures[i], system=i)``.
    out : str
        Dataset folder, created if needed. If it already holds a dataset, it
        must have the same structures and basis (the run then resumes).
    compute : callable
        ``compute(atoms, system=index) -> Targets``, for instance
        ``functools.partial(rhocalc.pyscf.compute_targets, options=options)``.
        Any exception it raises marks that structure as failed. For parallel
        runs it must be picklable: a module-level function or a
        ``functools.partial`` of one, not a lambda or a local function.
    basis : BasisSet
        The auxiliary basis of the targets, written to ``out/basis.json``.
    executor : concurrent.futures.Executor, optional
        Where to compute: anything with ``submit(fn, *args, **kwargs)`` returning
        an object with ``done()`` and ``result()`` (a ``ProcessPoolExecutor``,
        dask's ``client.get_executor()``, a submitit executor). It is used, not
        shut down. Default: a ``ProcessPoolExecutor`` (spawned processes) of
        ``n_workers`` if ``n_workers > 1``, else in this process, one by one.
    n_workers : int
        Number of processes of the default executor.
    progress : bool
        Show a progress bar on stderr.
    settings : dict, optional
        JSON-serialisable settings that define the targets (functional, basis,
        metric, ...; e.g. ``PySCFOptions.dataset_settings()``), written to
        ``out/settings.json``. A rerun with other settings is refused, so that
        one dataset never mixes targets of different methods. Settings that do
        not change converged targets (``max_cycle``, ...) should be left out, so
        that failed structures can be retried with them changed.
    locked : bool
        The caller already holds :func:`exclusive_lock` on ``out`` (to prepare
        the inputs of ``compute`` under the same lock); else it is taken here.

    Raises
    ------
    DatasetError
        If ``out`` holds another dataset, or another run is writing to it.
    """
    if len(structures) == 0:
        raise DatasetError(f"no structures to compute into '{out}'")
    os.makedirs(out, exist_ok=True)
    with contextlib.nullcontext() if locked else exclusive_lock(out):
        _prepare(out, structures, basis, settings)
        _remove_stale_files(out)
        todo = [i for i in range(len(structures)) if not _is_complete(out, i)]
        skipped = sorted(set(range(len(structures))) - set(todo))
        # a structure completed by a run killed before it updated failures.json
        failures = {i: f for i, f in read_failures(out).items() if i in todo}
        layout.write_failures(out, failures)
        report = BatchReport(done=[], skipped=skipped, failed=[])
        bar = tqdm.tqdm(
            total=len(structures), initial=len(skipped), unit="structure",
            file=sys.stderr, disable=not progress,
        )
        with bar:
            compute = _check_elements(compute, basis)
            for index, outcome in _outcomes(structures, todo, compute, executor, n_workers):
                if isinstance(outcome, Targets):
                    outcome.write(layout.structure_dir(out, index))
                    failures.pop(index, None)
                    report.done.append(index)
                else:
                    failures[index] = outcome
                    report.failed.append(index)
                layout.write_failures(out, failures)
                bar.set_postfix(failed=len(report.failed), refresh=False)
                bar.update()
    report.done.sort()
    report.failed.sort()
    return report


# ----------------------------------------------------------------- helpers ---
def _compute_or_failure(
    compute: Compute, atoms: ase.Atoms, system: int
) -> Union[Targets, Failure]:
    """Run ``compute`` on one structure in a worker; an exception becomes a :class:`Failure`.

    Catching in the worker keeps the error type and message across any
    executor (exceptions of some types cannot be pickled back).
    """
    try:
        targets = compute(atoms, system=system)
        if not isinstance(targets, Targets):
            raise TypeError(f"compute returned {type(targets).__name__}, not Targets")
        json.dumps(targets.info)  # info.json must be writable, or the parent fails later
        return targets
    except Exception as error:
        return failure_of(atoms, error)


def _check_elements(compute: Compute, basis: BasisSet) -> Compute:
    """Wrap ``compute`` so a structure with an element missing from the dataset's
    basis fails (naming it) before any calculation."""
    return functools.partial(_compute_in_basis, compute, basis)


def _compute_in_basis(compute: Compute, basis: BasisSet, atoms: ase.Atoms, system: int):
    where = f"structure {system} ({structure_name(atoms)})"
    basis.check_elements(atoms.get_chemical_symbols(), where=where)
    return compute(atoms, system=system)


def _outcomes(
    structures: Sequence[ase.Atoms],
    todo: List[int],
    compute: Compute,
    executor: Optional[concurrent.futures.Executor],
    n_workers: int,
) -> Iterator[Tuple[int, Union[Targets, Failure]]]:
    """``(index, Targets or Failure)`` for every index of ``todo``, as they finish."""
    if executor is None and n_workers <= 1:
        for index in todo:
            yield index, _compute_or_failure(compute, structures[index], index)
        return
    if executor is None:
        context = multiprocessing.get_context("spawn")  # no fork of OpenMP/BLAS state
        with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=context) as pool:
            yield from _outcomes(structures, todo, compute, pool, n_workers)
        return
    pending = [
        (index, executor.submit(_compute_or_failure, compute, structures[index], index))
        for index in todo
    ]
    try:
        yield from _as_completed(structures, pending)
    finally:  # also on KeyboardInterrupt: don't leave queued work behind
        for _, future in pending:
            future.cancel()


def _as_completed(structures, pending) -> Iterator[Tuple[int, Union[Targets, Failure]]]:
    """Poll ``done()``: unlike ``concurrent.futures.as_completed`` this also
    accepts job objects that are not ``concurrent.futures.Future`` (submitit)."""
    while pending:
        finished, running = [], []
        for index, future in pending:
            (finished if future.done() else running).append((index, future))
        pending = running
        if not finished:
            time.sleep(_POLL_SECONDS)
        for index, future in finished:
            try:
                yield index, future.result()
            except Exception as error:  # the worker itself died or was cancelled
                yield index, failure_of(structures[index], error)


def _is_complete(out: str, index: int) -> bool:
    return os.path.isdir(layout.structure_dir(out, index))


def _prepare(
    out: str, structures: Sequence[ase.Atoms], basis: BasisSet, settings: Optional[dict]
) -> None:
    """Check structures.xyz, basis.json and settings.json match those in ``out``;
    write the missing."""
    basis_path = os.path.join(out, layout.BASIS_FILE)
    settings_path = os.path.join(out, SETTINGS_FILE)
    write_or_check_structures(out, structures)
    if os.path.exists(basis_path):
        _check_same_basis(basis_path, basis)
    if settings is not None:
        _check_same_settings(settings_path, settings)
    if not os.path.exists(basis_path):
        basis.save(basis_path)


def write_or_check_structures(out: str, structures: Sequence[ase.Atoms]) -> None:
    """Write ``out/structures.xyz``, or check that the one there holds the same
    structures (raising a :class:`DatasetError` naming the first that differs)."""
    path = os.path.join(out, layout.STRUCTURES_FILE)
    if os.path.exists(path):
        _check_same_structures(read_structures(path), structures, path)
    else:
        with atomic_path(path) as tmp:
            ase.io.write(tmp, list(structures), format="extxyz")


def _check_same_settings(path: str, requested: dict) -> None:
    """Record ``requested`` in ``path``, or check it equals what is recorded there."""
    requested = json.loads(json.dumps(requested))  # as it reads back (tuples -> lists)
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


def _check_same_basis(path: str, requested: BasisSet) -> None:
    try:
        existing = BasisSet.load(path)
    except ValueError as error:
        raise DatasetError(str(error)) from error
    if existing.to_dict() != requested.to_dict():
        raise DatasetError(
            f"'{path}' holds another auxiliary basis ('{existing.name}' for "
            f"{existing.elements}, requested '{requested.name}' for {requested.elements}); "
            "use another output folder to avoid mixing datasets"
        )


def _same_structure(a: ase.Atoms, b: ase.Atoms) -> bool:
    """Same atoms, periodicity, cell, positions (to :data:`POSITION_TOLERANCE`),
    charge and spin."""
    return (
        all(a.info.get(key, 0) == b.info.get(key, 0) for key in ("charge", "spin"))
        and np.array_equal(a.numbers, b.numbers)
        and np.array_equal(a.pbc, b.pbc)
        and np.allclose(a.cell.array, b.cell.array, rtol=0, atol=POSITION_TOLERANCE)
        and np.allclose(a.positions, b.positions, rtol=0, atol=POSITION_TOLERANCE)
    )


def _check_same_structures(existing, requested, path: str) -> None:
    where = None
    if len(existing) != len(requested):
        where = f"{len(existing)} structures there, {len(requested)} requested"
    else:
        for index, (a, b) in enumerate(zip(existing, requested)):
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


def _remove_stale_files(out: str) -> None:
    """Remove temporary files and folders a killed run left behind."""
    for path in glob.glob(os.path.join(out, _STALE_PATTERN)):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


@contextlib.contextmanager
def exclusive_lock(out: str):
    """Hold an exclusive ``flock`` on ``out/.lock``; the kernel releases it when
    the process dies, so a killed run never blocks the next one."""
    path = os.path.join(out, _LOCK_FILE)
    with open(path, "w") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            raise DatasetError(
                f"another run is writing to '{out}' (it holds a lock on '{path}')"
            ) from error
        yield
