"""The run folder: every rule about what a training run holds, how it is claimed,
resumed, cleaned and read back (as :mod:`rholearn.dataset` is for datasets)::

    RUN/
      .lock                 held (``flock``) by the one process using the run
      options.yaml          the expanded options: dataset, run, every FitOptions field
      split.json            structure indices under train, val, test
      train.log             timestamped log of every session on the run
      model.pt              the trained model (best weights)
      solve.json            direct solve: regularisation grid, choice, timings
      log.csv               gradient training: one row per epoch
      checkpoint_last.pt    gradient training: everything needed to resume
      checkpoint_best.pt    gradient training: the weights of the best epoch
      descriptors/          cached lambda-SOAP, one file per structure
      descriptors_search/   the same for the hyper search's other descriptor settings
      evaluation_<subset>/  rholearn evaluate: errors, chemiscope map, plots, coefficients
      model-atomistic.pt    rholearn export

:meth:`RunFolder.claim` takes the folder for one process (a second is refused),
refuses a folder inside the dataset, another dataset, split or options on resume,
and an existing run unless it is resumed or overwritten; then writes ``split.json``
and ``options.yaml``. Checkpoints carry an integer format version
(:data:`CHECKPOINT_FORMAT`); older ones are upgraded on reading
(:data:`CHECKPOINT_UPGRADES`), newer ones refused.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import yaml

from . import __version__, layout
from .files import atomic_path, exclusive_lock, remove_stale_files, write_json
from .options import dump_yaml, read_yaml, write_yaml

OPTIONS_FILE = "options.yaml"
"""The one record of a run's expanded options (``dataset``, ``run`` and every
:class:`~rholearn.workflow.FitOptions` field): ``rholearn train RUN/options.yaml
--resume`` continues the run, a copy with another ``run`` repeats it."""
SPLIT_FILE = "split.json"
MODEL_FILE = "model.pt"
TEXT_LOG_FILE = "train.log"
EPOCH_LOG_FILE = "log.csv"
SOLVE_FILE = "solve.json"
"""The direct solve's record: chosen regularisation, validation curve, timings."""
LAST_CHECKPOINT = "checkpoint_last.pt"
BEST_CHECKPOINT = "checkpoint_best.pt"
DESCRIPTOR_CACHE = "descriptors"
SEARCH_CACHE = "descriptors_search"
"""``RUN/descriptors_search/<settings>/``: the descriptor caches of the hyper search's candidates."""
EVALUATION_PREFIX = "evaluation_"
"""``RUN/evaluation_<subset>/``: what ``rholearn evaluate`` writes."""
ERRORS_FILE = "errors.json"
CHEMISCOPE_FILE = "errors.chemiscope.json.gz"
PARITY_PLOT = "parity.png"
CURVES_PLOT = "training_curves.png"
EXPORTED_FILE = "model-atomistic.pt"
LEGACY_FILES = ("fit.json", "options.json")
"""Records of runs written by rholearn before ``options.yaml`` held them all."""
RUN_FILES = (
    OPTIONS_FILE, SPLIT_FILE, MODEL_FILE, TEXT_LOG_FILE, EPOCH_LOG_FILE, SOLVE_FILE,
    LAST_CHECKPOINT, BEST_CHECKPOINT, EXPORTED_FILE, *LEGACY_FILES,
)
"""Every file a run writes at its top level; ``--overwrite`` removes these (and the
descriptor cache and evaluation folders), nothing else."""
DEFAULT_RUNS = "runs"
"""Where a run without a named folder goes: ``runs/<date>/<time>`` (:func:`new_run_path`)."""

CHECKPOINT_FORMAT = 3
"""Integer version written into every checkpoint as ``"format"``."""


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked: busy, inside a dataset, or
    holding another run."""


_HELD: Dict[str, int] = {}
"""Run folders (real paths) this process holds the lock of, and how many claims deep."""


class RunFolder:
    """The files of one training run folder (nothing is written until :meth:`claim`).

    Parameters
    ----------
    path : str
        The folder (created by :meth:`claim`).
    """

    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        """The path of ``name`` in the run folder."""
        return os.path.join(self.path, name)

    @property
    def descriptor_cache(self) -> str:
        return self.file(DESCRIPTOR_CACHE)

    def search_cache(self, settings: str) -> str:
        """``RUN/descriptors_search/<settings>``: the descriptor cache of a search candidate
        (``settings``: a name of its descriptor settings)."""
        return os.path.join(self.file(SEARCH_CACHE), settings)

    def evaluation_dir(self, subset: str) -> str:
        """``RUN/evaluation_<subset>``: where the evaluation on ``subset`` goes."""
        return self.file(f"{EVALUATION_PREFIX}{subset}")

    # ------------------------------------------------------------ reading ---
    def existing_files(self) -> List[str]:
        """The run's own files and folders present in the folder (names)."""
        if not os.path.isdir(self.path):
            return []
        return sorted(
            name for name in os.listdir(self.path)
            if name in RUN_FILES or name in (DESCRIPTOR_CACHE, SEARCH_CACHE)
            or name.startswith(EVALUATION_PREFIX)
        )

    def options(self) -> Dict[str, Any]:
        """The recorded expanded options (``options.yaml``); errors name the file."""
        path = self.file(OPTIONS_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"'{self.path}' holds no run: missing '{path}'")
        return read_yaml(path)

    def dataset(self) -> str:
        """The dataset folder the run was trained on, as recorded in ``options.yaml``."""
        dataset = self.options().get("dataset")
        if not isinstance(dataset, str):
            raise RunFolderError(f"'{self.file(OPTIONS_FILE)}' names no dataset")
        return dataset

    def split(self) -> Dict[str, List[int]]:
        """The recorded split (``split.json``); errors name the file."""
        path = self.file(SPLIT_FILE)
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"'{self.path}' holds no run: missing '{path}'") from None
        except ValueError as error:
            raise RunFolderError(f"cannot read '{path}': {error}") from error

    def resume_hint(self) -> str:
        """How to continue this run, naming only what exists."""
        if os.path.exists(self.file(OPTIONS_FILE)):
            return f"rholearn train {self.file(OPTIONS_FILE)} --resume, or resume=True"
        return "resume=True"

    # ------------------------------------------------------------ claiming ---
    @contextlib.contextmanager
    def locked(self) -> Iterator["RunFolder"]:
        """Hold the run folder for this process (created if needed) during the block.

        Another process holding it raises a :class:`RunFolderError`; nested blocks
        of this process share the lock.
        """
        os.makedirs(self.path, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield self
            finally:
                _HELD[key] -= 1
            return
        with exclusive_lock(self.path, lambda path: RunFolderError(
            f"another process is using the run folder '{self.path}' (it holds a lock on "
            f"'{path}'); wait for it to end or choose another run folder"
        )):
            _HELD[key] = 1
            try:
                yield self
            finally:
                del _HELD[key]

    @contextlib.contextmanager
    def claim(
        self,
        options: Dict[str, Any],
        split: Dict[str, List[int]],
        resume: bool = False,
        overwrite: bool = False,
        may_change: Sequence[str] = (),
    ) -> Iterator["RunFolder"]:
        """Take the folder for a run, check it, and record the run, before any work.

        Refuses (nothing written) a folder that is, or is inside, a dataset folder;
        one another process holds; one that holds a run unless ``resume`` (same
        dataset, split and options but the dotted keys of ``may_change``) or
        ``overwrite`` (the run's files are removed, nothing else). Then removes
        what a killed run left (``.tmp-*``, not following symlinks) and writes
        ``split.json`` and ``options.yaml``.

        Parameters
        ----------
        options : dict
            The expanded options as plain data, with ``dataset`` (a folder) and ``run``.
        split : dict
            Structure indices under ``train``, ``val``, ``test``.
        may_change : sequence of str
            Dotted option keys a resumed run may change (``"train.epochs"``).
        """
        if resume and overwrite:
            raise RunFolderError("--resume and --overwrite exclude each other (resume=True, "
                                 "overwrite=True): choose one")
        self._check_outside_dataset(options["dataset"])
        with self.locked():
            present = self.existing_files()
            if present and overwrite:
                self._clear(present)
            elif present and resume:
                self._check_same_run(options, split, may_change)
            elif present:
                raise FileExistsError(
                    f"'{self.path}' already holds a run ({', '.join(present)}); continue it "
                    "with --resume (resume=True), start it again with --overwrite "
                    "(overwrite=True), or choose another run folder"
                )
            self.remove_stale_files()
            write_json(self.file(SPLIT_FILE), split)
            write_yaml(self.file(OPTIONS_FILE), options)
            yield self

    def remove_stale_files(self) -> List[str]:
        """Remove the ``.tmp-*`` files a killed run left in the folder and in its own
        subfolders (the descriptor cache, evaluation folders; never through a symlink,
        never in other subfolders); returns their paths."""
        folders = [self.path] + [
            self.file(name) for name in self.existing_files()
            if os.path.isdir(self.file(name)) and not os.path.islink(self.file(name))
        ]
        return sorted(path for folder in folders for path in remove_stale_files(folder))

    def _check_outside_dataset(self, dataset: str) -> None:
        run, root = os.path.realpath(self.path), os.path.realpath(dataset)
        if run == root or run.startswith(root + os.sep):
            raise RunFolderError(
                f"run folder '{self.path}' is inside the dataset folder '{dataset}': choose "
                "a run folder outside it"
            )
        if all(os.path.exists(self.file(name)) for name in (layout.BASIS_FILE,
                                                            layout.STRUCTURES_FILE)):
            raise RunFolderError(
                f"run folder '{self.path}' holds a dataset ({layout.BASIS_FILE}, "
                f"{layout.STRUCTURES_FILE}): choose another run folder"
            )

    def _check_same_run(self, options, split, may_change: Sequence[str]) -> None:
        """Refuse to resume with another dataset, split, or options than ``may_change``."""
        path = self.file(OPTIONS_FILE)
        if os.path.exists(path):
            recorded = _flat(self.options())
            requested = _flat(yaml.safe_load(dump_yaml(options)))  # as it reads back
            recorded["dataset"] = os.path.abspath(str(recorded.get("dataset")))
            requested["dataset"] = os.path.abspath(str(requested.get("dataset")))
            ignored = {"run", *may_change}
            differing = sorted(
                key for key in set(recorded) | set(requested)
                if key not in ignored and recorded.get(key) != requested.get(key)
            )
            if differing:
                details = ", ".join(
                    f"{key}: {recorded.get(key)!r} there, {requested.get(key)!r} now"
                    for key in differing[:4]
                ) + (f" and {len(differing) - 4} more" if len(differing) > 4 else "")
                raise RunFolderError(
                    f"cannot resume '{self.path}' with other options ({details}; recorded in "
                    f"'{path}'); a resumed run may change only {', '.join(may_change)}: "
                    "resume with its options, --overwrite to start again, or another run folder"
                )
        if os.path.exists(self.file(SPLIT_FILE)) and self.split() != json.loads(json.dumps(split)):
            raise RunFolderError(
                f"cannot resume '{self.path}' with another split than its "
                f"'{self.file(SPLIT_FILE)}': resume with the same split_file / sizes and seed, "
                "--overwrite to start again, or another run folder"
            )

    def _clear(self, names: Sequence[str]) -> None:
        """Remove the run's own files and folders ``names`` (a symlink is unlinked, its
        target kept)."""
        for name in names:
            path = self.file(name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def _flat(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested options as ``{"train.epochs": 20, ...}`` (mappings of free keys such as
    ``hypers`` are flattened too)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def new_run_path(root: str = DEFAULT_RUNS, now: Optional[datetime.datetime] = None) -> str:
    """A run folder that does not exist yet: ``root/<YYYY-MM-DD>/<HH-MM-SS>`` (local
    time), with ``-1``, ``-2``, ... appended if that one is taken."""
    now = now or datetime.datetime.now()
    base = os.path.join(root, now.strftime("%Y-%m-%d"), now.strftime("%H-%M-%S"))
    path, number = base, 0
    while os.path.lexists(path):
        number += 1
        path = f"{base}-{number}"
    return path


# -------------------------------------------------------------- checkpoints ---
def save_checkpoint(checkpoint: Dict[str, Any], path: str) -> None:
    """``torch.save`` to a temporary file renamed to ``path``: the file at ``path``
    is always a complete checkpoint, even if the process is killed."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def _upgrade_2_to_3(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """Format 2 named its version ``"rholearn.checkpoint/2"`` and did not record the
    rholearn version that wrote it."""
    return {**checkpoint, "format": 3, "rholearn_version": None}


CHECKPOINT_UPGRADES: Dict[int, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    2: _upgrade_2_to_3,
}
"""``{version: function}``: each turns a checkpoint of ``version`` into ``version + 1``."""


def checkpoint_fields() -> Dict[str, Any]:
    """What every checkpoint written now records about its format."""
    return {"format": CHECKPOINT_FORMAT, "rholearn_version": __version__}


def _format_version(checkpoint: Any) -> Optional[int]:
    """The integer format of a checkpoint (format 2 wrote ``"rholearn.checkpoint/2"``)."""
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if isinstance(found, str) and found.startswith("rholearn.checkpoint/"):
        found = found.rpartition("/")[2]
        found = int(found) if found.isdigit() else None
    return found if isinstance(found, int) and not isinstance(found, bool) else None


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path`` as plain data, upgraded to :data:`CHECKPOINT_FORMAT`.

    Read with ``torch.load(weights_only=True)``: tensors and plain data only,
    nothing in the file is executed.

    Raises
    ------
    ValueError
        Naming ``path`` and saying what to do, if it is truncated, corrupt, not a
        checkpoint, or of a format this rholearn cannot read.
    """
    best = os.path.join(os.path.dirname(path), BEST_CHECKPOINT)
    advice = (
        f"the run cannot be resumed from it: start again in a new run folder (or delete "
        f"'{path}')" + (f", or use the best weights so far in '{best}'" if path != best else "")
    )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises many types for bad files
        first_line = str(error).strip().split("\n")[0].split(". ")[0]
        raise ValueError(
            f"cannot read checkpoint '{path}' (truncated, corrupt, or not a rholearn "
            f"checkpoint: {type(error).__name__}: {first_line}); {advice}"
        ) from error
    version = _format_version(checkpoint)
    if version is None or version > CHECKPOINT_FORMAT or (
        version < CHECKPOINT_FORMAT and version not in CHECKPOINT_UPGRADES
    ):
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
        newer = " (written by a newer rholearn)" if version and version > CHECKPOINT_FORMAT else ""
        raise ValueError(
            f"checkpoint '{path}' has format {found!r}{newer}, this rholearn reads formats "
            f"{sorted({*CHECKPOINT_UPGRADES, CHECKPOINT_FORMAT})}; {advice}"
        )
    while version < CHECKPOINT_FORMAT:
        checkpoint = CHECKPOINT_UPGRADES[version](checkpoint)
        version += 1
    return checkpoint
