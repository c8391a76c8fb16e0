"""Run the FHI-aims steps of many structures, locally or as SLURM array jobs.

Runs live next to the dataset they feed::

    OUT/
      aims-runs/
        options.json          the AimsOptions of these runs
        slurm-scf.sh ...      array job scripts, when asked for
        0/scf/  0/ri/         one run folder per structure and step
        1/scf/  ...
      structures.xyz          the structures, in dataset order (Angstrom)
      basis.json  0/  1/ ...  the dataset (rholearn.layout), from the RI runs

A step is done when its ``aims.out`` ends normally; a structure advances one
step at a time (``scf`` then ``ri``), so reruns resume where runs stopped.
Locally, :func:`run_dataset` runs the missing steps and writes the targets
through :func:`rhocalc.batch.run_batch`. On a cluster, it writes the inputs of
each structure's next step and one array job script per step instead; rerun it
after the jobs to prepare the next step, then :func:`parse_dataset`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import glob
import json
import os
import shlex
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import ase
import ase.io
from ase.calculators.aims import AimsProfile

from rhocalc.batch import BatchReport, Compute, run_batch
from rholearn import layout
from rholearn.dataset import (
    DatasetError, Targets, check_structures, exclusive_lock, read_structures, structure_name,
)
from rholearn.basis import BasisSet
from rholearn.files import write_json

from . import aimsout, inputs, outputs
from .options import COMMAND_VARIABLE, AimsOptions

UNITS = {
    "positions": "Angstrom",
    "energy_hartree": "Hartree",
    "energies in aims.out summaries (scf, ri_fit)": "eV",
    "coefficients": "dimensionless, of a density in electrons/Bohr^3",
    "overlap": "Bohr^3 integrals of products of aims' product-basis functions",
    "timings": "seconds",
}

RUNS_DIR = "aims-runs"
OPTIONS_FILE = "options.json"
TARGET_STEPS = ("scf", "ri")
"""The steps that make targets, in order (``rebuild`` is separate: :func:`rebuild`)."""
DATASET_SETTINGS = {"backend": "aims"}
"""The dataset's ``settings.json``: the method is guarded by ``aims-runs/options.json``."""


class AimsRunError(RuntimeError):
    """aims is not configured, failed, or a step's inputs are missing; names the run folder."""


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """What goes into a SLURM array job script besides the aims command.

    Parameters
    ----------
    sbatch : tuple of str
        Extra ``#SBATCH`` arguments, e.g. ``("--time=01:00:00", "--ntasks=16")``.
    setup : tuple of str
        Shell lines run before aims, e.g. ``("module load intel",)``.
    """

    sbatch: Tuple[str, ...] = ()
    setup: Tuple[str, ...] = ()


def step_dir(runs: str, index: int, step: str) -> str:
    """Run folder of one structure and step."""
    return os.path.join(runs, str(index), step)


def pending_step(runs: str, index: int) -> Optional[str]:
    """The first target step of structure ``index`` not yet done, or ``None``."""
    for step in TARGET_STEPS:
        if not aimsout.aims_finished(os.path.join(step_dir(runs, index, step), "aims.out")):
            return step
    return None


def prepare_step(atoms: ase.Atoms, runs: str, index: int, step: str, options: AimsOptions) -> str:
    """Write the inputs of one step of structure ``index``; returns its run folder.

    The ``ri`` step (only after a converged SCF, see :func:`check_scf_converged`)
    links the SCF density matrix (``D_*.csc``) and, when fitting orbitals,
    writes their weights from the SCF's orbital list.
    """
    directory = step_dir(runs, index, step)
    inputs.write_inputs(atoms, directory, step, options)
    if step == "ri":
        check_scf_converged(runs, index)
        scf = step_dir(runs, index, "scf")
        matrices = sorted(glob.glob(os.path.join(scf, "D_*.csc")))
        if not matrices:
            raise AimsRunError(
                f"SCF run '{scf}' wrote no density-matrix restart file D_*.csc "
                "(elsi_restart write) for the RI step to read"
            )
        for matrix in matrices:
            link = os.path.join(directory, os.path.basename(matrix))
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(os.path.relpath(matrix, directory), link)
        if options.orbitals is not None:
            inputs.write_orbital_weights(
                directory, os.path.join(scf, inputs.ORBITAL_INFO), options.orbitals
            )
    return directory


def check_scf_converged(runs: str, index: int) -> None:
    """Raise :class:`AimsRunError` naming its ``aims.out`` if the finished SCF of
    structure ``index`` did not converge (its density makes no targets)."""
    output = os.path.join(step_dir(runs, index, "scf"), "aims.out")
    if not aimsout.parse_aims_out(output)["scf_converged"]:
        raise AimsRunError(
            f"the SCF of structure {index} did not converge: no "
            f"'{aimsout.SCF_CONVERGED}' in '{output}'"
        )


def run_aims(directory: str, command: str) -> None:
    """Run aims in ``directory`` (inputs written), its output in ``aims.out``.

    Raises
    ------
    AimsRunError
        If aims exits with an error or its output does not end normally,
        quoting the end of ``aims.out``.
    """
    profile = AimsProfile(command=command)
    try:
        profile.run(Path(directory), None, "aims.out", errorfile="aims.err")
        failure = None
    except Exception as error:  # CalledProcessError, or the command is not found
        failure = f"{type(error).__name__}: {error}"
    output = os.path.join(directory, "aims.out")
    if failure is None and aimsout.aims_finished(output):
        return
    tail = ""
    if os.path.isfile(output):
        with open(output, errors="replace") as f:
            tail = "".join(f.readlines()[-10:])
    raise AimsRunError(
        f"aims did not finish in '{directory}' ({failure or 'no normal end in aims.out'}); "
        f"last lines of aims.out:\n{tail}"
    )


def run_structure(atoms: ase.Atoms, runs: str, index: int, options: AimsOptions) -> None:
    """Run the missing target steps of structure ``index`` with the configured aims."""
    command = _required_command(options)
    while (step := pending_step(runs, index)) is not None:
        run_aims(prepare_step(atoms, runs, index, step, options), command)


def compute_targets(
    atoms: ase.Atoms,
    options: AimsOptions,
    system: int = 0,
    runs: str = RUNS_DIR,
    basis: Optional[BasisSet] = None,
    run: bool = True,
) -> Targets:
    """Targets of structure ``system`` from its aims runs, running the missing steps.

    The ``compute`` of :func:`rhocalc.batch.run_batch` (as a ``functools.partial``).

    Parameters
    ----------
    atoms : ase.Atoms
        The structure, positions in Angstrom.
    options : AimsOptions
    system : int
        Dataset index: runs in ``runs/<system>/``, ``system`` sample value.
    runs : str
        Folder of the runs of all structures.
    basis : BasisSet, optional
        The dataset's product basis; a run with another basis is an error.
    run : bool
        Run missing steps (aims must be configured); if false, only read.
    """
    if run and pending_step(runs, system) is not None:
        run_structure(atoms, runs, system, options)
    step = pending_step(runs, system)
    if step is not None:
        raise AimsRunError(
            f"the {step} step of structure {system} has not finished: no normal end in "
            f"'{os.path.join(step_dir(runs, system, step), 'aims.out')}'"
        )
    check_scf_converged(runs, system)
    targets, run_basis = outputs.read_ri_run(
        step_dir(runs, system, "ri"), atoms, system, overlap_threshold=options.overlap_threshold
    )
    if basis is not None and run_basis.to_dict() != basis.to_dict():
        raise outputs.AimsOutputError(
            f"'{step_dir(runs, system, 'ri')}' has product basis {_describe(run_basis)}, "
            f"but the dataset has {_describe(basis)}"
        )
    scf = aimsout.parse_aims_out(os.path.join(step_dir(runs, system, "scf"), "aims.out"))
    ri_fit = targets.info.get("ri_fit", {})
    charge = float(atoms.info.get("charge", 0))  # aims allows fractional charges
    targets.info.update({
        "name": structure_name(atoms),
        "formula": atoms.get_chemical_formula(),
        "system": system,
        "charge": int(charge) if charge.is_integer() else charge,  # int as with PySCF
        "energy_hartree": scf.get("total_energy_hartree"),
        "converged": scf["scf_converged"],
        "n_scf_cycles": scf.get("n_scf_cycles"),
        "n_electrons": scf.get("n_electrons"),
        "scf_seconds": scf.get("time_total_s", {}).get("wall"),
        "fit_seconds": ri_fit.get("time_total_s", {}).get("wall"),
        "scf": scf,
        "options": dict(options.to_dict(), command=None),
        "units": UNITS,
    })
    return targets


def rebuild(
    atoms: ase.Atoms,
    directory: str,
    coefficients,
    basis: BasisSet,
    options: AimsOptions,
    run: bool = True,
) -> str:
    """Write (and run, if aims is configured) an aims rebuild of a coefficient vector.

    aims builds the density of the coefficients on its grid (``rho_rebuilt_ri.out``,
    a cube file with ``options.cube``), to score a predicted density with aims itself.

    Parameters
    ----------
    atoms : ase.Atoms
        The structure, positions in Angstrom.
    directory : str
        The rebuild run folder.
    coefficients : numpy.ndarray or TensorMap
        Canonical-order vector or shared-layout TensorMap (e.g. a prediction).
    basis : BasisSet
        The product basis of the structure's RI run.
    options : AimsOptions
        The options of the RI run (same product-basis settings).
    run : bool
        Run aims when it is configured.
    """
    os.makedirs(directory, exist_ok=True)
    inputs.write_inputs(atoms, directory, "rebuild", options)
    inputs.write_ri_vector(
        os.path.join(directory, inputs.REBUILD_COEFFICIENTS), coefficients, atoms, basis
    )
    command = options.resolved_command()
    if run and command is not None:
        run_aims(directory, command)
    return directory


# ------------------------------------------------------------- datasets ---
def run_dataset(
    structures: Sequence[ase.Atoms],
    out: str,
    options: AimsOptions,
    slurm: Optional[SlurmOptions] = None,
    executor: Optional[concurrent.futures.Executor] = None,
    n_workers: int = 1,
    progress: bool = True,
):
    """Run aims for every structure and write the dataset, or write SLURM jobs.

    Parameters
    ----------
    structures : sequence of ase.Atoms
        Positions in Angstrom; structure ``i`` runs in ``out/aims-runs/i/``.
    out : str
        Dataset folder (see the module docstring).
    options : AimsOptions
    slurm : SlurmOptions, optional
        Write the inputs of each structure's next step and one array job script
        per step (``out/aims-runs/slurm-<step>.sh``) instead of running.
    executor, n_workers, progress
        As in :func:`rhocalc.batch.run_batch`.

    All of it holds :func:`rholearn.dataset.exclusive_lock` on ``out``, so a
    concurrent run on the same folder is refused rather than racing.

    Returns
    -------
    BatchReport, or dict
        The batch report of a local run; with ``slurm``, the scripts written
        (``"scripts"``: step -> path) and the structures whose next step could
        not be prepared (``"failed"``: index -> reason).
    """
    os.makedirs(out, exist_ok=True)
    with exclusive_lock(out):
        if slurm is not None:
            runs = prepare_runs(structures, out, options)
            return write_slurm_jobs(structures, runs, options, slurm)
        compute, basis = dataset_compute(structures, out, options, run=True)
        return run_batch(
            structures, out, compute, basis, executor, n_workers, progress,
            settings=DATASET_SETTINGS, locked=True,
        )


def parse_dataset(
    out: str,
    executor: Optional[concurrent.futures.Executor] = None,
    n_workers: int = 1,
    progress: bool = True,
) -> BatchReport:
    """Write the dataset of ``out`` from finished aims runs, without running aims.

    Structures whose runs have not finished are recorded as failed (naming the
    step and folder); a rerun after more runs finish adds them. Holds
    :func:`rholearn.dataset.exclusive_lock` on ``out`` throughout.
    """
    structures, options = read_runs(out)
    with exclusive_lock(out):
        compute, basis = dataset_compute(structures, out, options, run=False)
        return run_batch(
            structures, out, compute, basis, executor, n_workers, progress,
            settings=DATASET_SETTINGS, locked=True,
        )


def dataset_compute(
    structures: Sequence[ase.Atoms], out: str, options: AimsOptions, run: bool
) -> Tuple[Compute, BasisSet]:
    """The ``compute`` and product basis to give :func:`rhocalc.batch.run_batch` for ``out``.

    Prepares ``out/aims-runs`` and finds the product basis of every element
    from finished RI runs, running aims for one structure per element if
    ``run`` (then aims must be configured). Call it holding
    :func:`rholearn.dataset.exclusive_lock` on ``out``, as :func:`run_dataset` does.
    """
    if run:
        _required_command(options)
    runs = prepare_runs(structures, out, options)
    basis = probe_basis(structures, runs, options, run)
    compute = functools.partial(
        compute_targets, options=options, runs=runs, basis=basis, run=run
    )
    return compute, basis


def read_runs(out: str) -> Tuple[List[ase.Atoms], AimsOptions]:
    """The structures and options of the aims runs of dataset ``out``."""
    options_path = os.path.join(out, RUNS_DIR, OPTIONS_FILE)
    if not os.path.isfile(options_path):
        raise DatasetError(f"'{out}' holds no aims runs (no '{options_path}')")
    options = AimsOptions.from_dict(_read_options(options_path))
    return read_structures(os.path.join(out, layout.STRUCTURES_FILE)), options


def probe_basis(
    structures: Sequence[ase.Atoms], runs: str, options: AimsOptions, run: bool
) -> BasisSet:
    """The product basis of every element, from one finished RI run containing it.

    With ``run``, the first structure holding a not yet covered element is run
    (it is needed anyway); a structure that fails is passed over for the next.
    """
    shells, names = {}, set()
    errors: Dict[str, str] = {}
    for index, atoms in enumerate(structures):
        symbols = set(atoms.get_chemical_symbols())
        if symbols <= set(shells):
            continue
        try:
            if run:
                run_structure(atoms, runs, index, options)
            if pending_step(runs, index) is not None:
                continue
            basis = outputs.read_basis(step_dir(runs, index, "ri"), atoms)
        except (AimsRunError, ValueError, OSError) as error:
            errors[f"structure {index}"] = str(error)
            continue
        names.add(basis.name)
        for symbol in symbols - set(shells):
            shells[symbol] = basis.shells[symbol]
    missing = sorted({s for atoms in structures for s in atoms.get_chemical_symbols()}
                     - set(shells))
    if missing:
        detail = "; ".join(f"{where}: {reason}" for where, reason in list(errors.items())[:3])
        raise DatasetError(
            f"no finished aims RI run in '{runs}' contains element(s) {missing}, so their "
            f"product basis is unknown" + (f" ({detail})" if detail else "")
        )
    if len(names) != 1:
        raise DatasetError(f"aims runs in '{runs}' used different product bases: {sorted(names)}")
    return BasisSet(name=names.pop(), shells=shells)


def write_slurm_jobs(
    structures: Sequence[ase.Atoms], runs: str, options: AimsOptions, slurm: SlurmOptions
) -> dict:
    """Prepare each structure's next step and write one array job script per step.

    Every unfinished step is listed again, so run this when the jobs of the
    previous call have ended (finished or failed), not while they still run.
    """
    # without a command here, the job takes $ASE_AIMS_COMMAND of the cluster node
    command = options.resolved_command() or (
        '${ASE_AIMS_COMMAND:?"set ASE_AIMS_COMMAND to the command running aims"}'
    )
    todo: Dict[str, List[str]] = {step: [] for step in TARGET_STEPS}
    failed: Dict[int, str] = {}
    for index, atoms in enumerate(structures):
        step = pending_step(runs, index)
        if step is None:
            continue
        try:
            todo[step].append(prepare_step(atoms, runs, index, step, options))
        except (AimsRunError, ValueError, OSError) as error:
            failed[index] = f"{type(error).__name__}: {error}"
    scripts = {}
    for step, directories in todo.items():
        if directories:
            path = os.path.join(runs, f"slurm-{step}.sh")
            write_slurm_array(path, directories, command, slurm, job_name=f"rhocalc-aims-{step}")
            scripts[step] = path
    return {"scripts": scripts, "failed": failed}


def write_slurm_array(
    path: str, directories: Sequence[str], command: str, slurm: SlurmOptions, job_name: str
) -> None:
    """Write a SLURM array job script running ``command`` once in each of ``directories``."""
    directories = [os.path.abspath(d) for d in directories]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array=0-{len(directories) - 1}",
        f"#SBATCH --output={os.path.abspath(os.path.dirname(path))}/slurm-%A_%a.out",
        *(f"#SBATCH {argument}" for argument in slurm.sbatch),
        "",
        "# written by rhocalc: one aims run per array task; submit with `sbatch "
        f"{os.path.basename(path)}`",
        *slurm.setup,
        "ulimit -s unlimited",
        "RUN_DIRS=(",
        *(f"  {shlex.quote(d)}" for d in directories),
        ")",
        'cd "${RUN_DIRS[$SLURM_ARRAY_TASK_ID]}" || exit 1',
        f"{command} > aims.out 2> aims.err",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    os.chmod(path, 0o755)


def prepare_runs(structures: Sequence[ase.Atoms], out: str, options: AimsOptions) -> str:
    """Create ``out/aims-runs`` with its options, and ``out/structures.xyz``, or check
    they match; returns the runs folder."""
    if len(structures) == 0:
        raise DatasetError(f"no structures to run into '{out}'")
    runs = os.path.abspath(os.path.join(out, RUNS_DIR))  # workers may run elsewhere
    os.makedirs(runs, exist_ok=True)
    options_path = os.path.join(runs, OPTIONS_FILE)
    recorded = dict(options.to_dict(), command=None)  # the command may change between runs
    if os.path.isfile(options_path):
        existing = _read_options(options_path)
        if existing != json.loads(json.dumps(recorded)):
            raise DatasetError(
                f"'{runs}' holds aims runs with other options ('{options_path}'); "
                "use another output folder"
            )
    else:
        write_json(options_path, recorded)
    check_structures(out, structures)  # so that parse_dataset can read them
    return runs


# -------------------------------------------------------------- helpers ---
def _required_command(options: AimsOptions) -> str:
    command = options.resolved_command()
    if command is None:
        raise AimsRunError(
            f"no FHI-aims command: set ${COMMAND_VARIABLE} or AimsOptions.command "
            "(--command), or write SLURM job scripts instead (--slurm)"
        )
    return command


def _read_options(path: str) -> dict:
    """The options recorded in ``options.json``, checked to make an :class:`AimsOptions`."""
    try:
        with open(path) as f:
            recorded = json.load(f)
        AimsOptions.from_dict(recorded)
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise DatasetError(f"cannot read '{path}': {type(error).__name__}: {error}") from error
    return recorded


def _describe(basis: BasisSet) -> str:
    counts = {symbol: basis.n_radial(symbol) for symbol in basis.elements}
    return f"'{basis.name}' {counts}"
