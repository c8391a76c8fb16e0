"""Compute the targets of many structures into a resumable dataset folder.

The driver is backend-agnostic: it takes a ``compute(atoms, system=index)``
callable returning :class:`~rholearn.dataset.Targets` and writes a dataset
folder by the rules of :mod:`rholearn.dataset`::

    OUT/
      basis.json       the auxiliary basis
      structures.xyz   all input structures, in order (extended xyz, Angstrom)
      settings.json    the method and the backend that computed it
      failures.json    index -> {"structure", "error", "reason"} of failed structures
      0/ 1/ ...        one complete folder per computed structure

Every file is written to a temporary name and renamed, so a killed run leaves
only complete folders (and ``.tmp-*`` leftovers, removed by the next run). A
rerun on the same folder skips the structures that have a folder and retries
the failed ones; a rerun with other structures or another basis is refused.

Results are written by the calling (parent) process as they arrive: workers
only compute. This works with executors whose workers run on other machines
without a shared file system (a dask cluster; SLURM through submitit shares only
submitit's job folder), keeps ``failures.json`` with a single writer, and lets a
worker crash without leaving partial files.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import ase
import tqdm

from rholearn import layout
from rholearn.basis import BasisSet
from rholearn.dataset import (
    DatasetError, Failure, Targets, claim, exclusive_lock, is_complete, read_failures,
    structure_name, write_failures,
)
from rholearn.files import remove_stale_files

Compute = Callable[..., Targets]
"""``compute(atoms, system=index) -> Targets``; must be picklable for parallel runs."""

_POLL_SECONDS = 0.1
_MAX_POLL_SECONDS = 5.0
"""Polling of jobs that are not ``concurrent.futures`` futures (submitit's) starts every
``_POLL_SECONDS`` and backs off to this while none finishes: each poll of a SLURM job
may query the scheduler."""
_PARENT_POLL_SECONDS = 0.5
_ARRAY_SIZE = 1000
"""Structures per submitit job array (SLURM's default ``MaxArraySize`` is 1001)."""


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
        :func:`rholearn.dataset.read_failures`.
    """

    done: List[int]
    skipped: List[int]
    failed: List[int]


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
        an object with ``done()``, ``result()`` and ``cancel()`` (a
        ``ProcessPoolExecutor``, dask's ``client.get_executor()``, a submitit
        executor, whose submissions are grouped into job arrays of at most 1000
        structures with its ``batch()``). It is used, not shut down; this process
        must stay alive until the run ends, as it writes the results. Default: a
        ``ProcessPoolExecutor`` (spawned processes) of ``n_workers`` if
        ``n_workers > 1``, else in this process, one by one.
    n_workers : int
        Number of processes of the default executor.
    progress : bool
        Show a progress bar on stderr.
    settings : dict, optional
        JSON-serialisable settings that define the targets (functional, basis,
        metric, ...; e.g. ``PySCFOptions.dataset_settings()``) and ``"backend"``,
        the name rholearn finds the computing code under
        (:mod:`rholearn.backends`), written to
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
    RuntimeError
        If called while a spawned worker process imports the calling script: a
        script that calls ``run_batch`` with ``n_workers > 1`` must do so under
        ``if __name__ == "__main__":``.
    """
    _refuse_reentry_in_worker()
    if len(structures) == 0:
        raise DatasetError(f"no structures to compute into '{out}'")
    os.makedirs(out, exist_ok=True)
    with contextlib.nullcontext() if locked else exclusive_lock(out):
        claim(out, structures, basis, settings)
        remove_stale_files(out)
        todo = [i for i in range(len(structures)) if not is_complete(out, i)]
        skipped = sorted(set(range(len(structures))) - set(todo))
        # a structure completed by a run killed before it updated failures.json
        failures = {i: f for i, f in read_failures(out).items() if i in todo}
        write_failures(out, failures)
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
                write_failures(out, failures)
                bar.set_postfix(failed=len(report.failed), refresh=False)
                bar.update()
    report.done.sort()
    report.failed.sort()
    return report


# ----------------------------------------------------------------- helpers ---
def _refuse_reentry_in_worker() -> None:
    """Raise if a spawned worker is importing the main script (which calls us).

    A spawned process re-runs the parent's script as ``__mp_main__`` to find its
    functions; multiprocessing marks that phase with ``_inheriting`` on the
    current process (its own check for a missing main guard uses the same flag).
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            "rhocalc.batch.run_batch was called again in a worker process while it "
            "imported the calling script: put the code that calls run_batch under "
            "`if __name__ == \"__main__\":` (worker processes re-import the script)"
        )


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this process as soon as its parent ``parent`` dies.

    A daemon thread polls the parent's pid (a killed parent's children are
    adopted by another process); ``os._exit`` ends the worker even in the middle
    of a calculation, so no worker outlives a ``kill -9`` of the run.
    """

    def watch():
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


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
        return Failure.of(atoms, error)


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
        pool = concurrent.futures.ProcessPoolExecutor(
            n_workers, mp_context=context, initializer=_exit_with_parent, initargs=(os.getpid(),)
        )
        with pool:
            yield from _outcomes(structures, todo, compute, pool, n_workers)
        return
    pending: List[Tuple[int, Any]] = []
    try:
        _submit(structures, todo, compute, executor, pending)
        yield from _as_completed(structures, pending)
    finally:  # also on KeyboardInterrupt, even during submission: leave no queued work behind
        for _, future in pending:
            if not future.done():
                future.cancel()


def _submit(
    structures: Sequence[ase.Atoms],
    todo: List[int],
    compute: Compute,
    executor: concurrent.futures.Executor,
    pending: List[Tuple[int, Any]],
) -> None:
    """Submit every index of ``todo``, appending ``(index, future)`` to ``pending`` as
    soon as it is submitted, so that an interrupted submission cancels what it submitted.

    A submitit executor gets job arrays of at most :data:`_ARRAY_SIZE` structures
    (its ``batch()``), each submitted when its block ends (dropped if interrupted).
    """
    batch = getattr(executor, "batch", None)
    for start in range(0, len(todo), _ARRAY_SIZE):
        chunk = todo[start : start + _ARRAY_SIZE]
        if batch is None:
            for index in chunk:
                pending.append(
                    (index, executor.submit(_compute_or_failure, compute, structures[index], index))
                )
            continue
        jobs = []
        with batch():
            for index in chunk:
                jobs.append(
                    (index, executor.submit(_compute_or_failure, compute, structures[index], index))
                )
        pending += jobs  # real jobs once the array is submitted


def _as_completed(structures, pending) -> Iterator[Tuple[int, Union[Targets, Failure]]]:
    """``(index, outcome)`` of ``pending`` as they finish: ``concurrent.futures``
    futures (process pool, dask's executor) are waited for; other jobs (submitit's)
    are polled with ``done()``, less often while none finishes (up to
    :data:`_MAX_POLL_SECONDS`)."""
    delay = _POLL_SECONDS
    while pending:
        futures = [future for _, future in pending]
        waitable = all(isinstance(future, concurrent.futures.Future) for future in futures)
        if waitable:
            concurrent.futures.wait(
                futures, timeout=_MAX_POLL_SECONDS, return_when=concurrent.futures.FIRST_COMPLETED
            )
        finished, running = [], []
        for index, future in pending:
            (finished if future.done() else running).append((index, future))
        pending = running
        if finished:
            delay = _POLL_SECONDS
        elif not waitable:
            time.sleep(delay)
            delay = min(2 * delay, _MAX_POLL_SECONDS)
        for index, future in finished:
            try:
                yield index, future.result()
            except Exception as error:  # the worker itself died or was cancelled
                failure = Failure.of(structures[index], error)
                if isinstance(error, concurrent.futures.process.BrokenProcessPool):
                    failure.reason += (
                        " (a worker process died: killed, out of memory, or it failed while "
                        "importing the calling script; its error is printed above)"
                    )
                yield index, failure
