"""Atomic writes: a file that exists is complete, even if its writer was killed;
and the one-line report of a file error that the command-line tools print."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
from typing import Any, Callable, Dict, Iterator, List


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path to write ``path`` through.

    Yields ``.tmp-<pid>-<name>`` beside ``path`` (same extension, so writers that
    look at it keep working); it is renamed to ``path`` when the block ends
    without error and removed otherwise. Stale ``.tmp-*`` files are what a
    killed writer leaves behind.
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(folder: str) -> Iterator[str]:
    """A temporary folder to fill and rename to ``folder``.

    Yields an empty ``.tmp-<name>-<pid>`` folder beside ``folder``. When the block
    ends without error, an existing ``folder`` is removed (an explicit
    replacement) and the temporary folder renamed to it, so a folder that exists
    is always complete; on error the temporary folder is removed.
    """
    parent, name = os.path.split(os.path.abspath(folder))
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.lexists(folder):
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


STALE_PATTERN = ".tmp-*"
"""What :func:`atomic_path` and other atomic writers leave behind when killed."""


def remove_stale_files(folder: str) -> List[str]:
    """Remove the ``.tmp-*`` files and folders a killed writer left in ``folder`` (a
    symlink named ``.tmp-*`` is removed, not its target).

    Call it only while no other process writes into the folder. Returns the
    removed paths (none if ``folder`` does not exist).
    """
    removed = sorted(glob.glob(os.path.join(glob.escape(folder), STALE_PATTERN)))
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    return removed


def remove_orphans(path: str) -> List[str]:
    """Remove the ``.tmp-<pid>-<name>`` files that killed writers of ``path``
    (:func:`atomic_path`) left beside it; those of a process still running stay.

    Safe while other processes write other files of the folder. Returns the removed paths.
    """
    directory, name = os.path.split(os.path.abspath(path))
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(directory), f".tmp-*-{glob.escape(name)}")):
        pid = os.path.basename(tmp)[len(".tmp-"):-len(name) - 1]
        if pid.isdigit() and not _running(int(pid)):
            os.remove(tmp)
            removed.append(tmp)
    return sorted(removed)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


LOCK_FILE = ".lock"
"""Held (``flock``) by the one process writing a folder (:func:`exclusive_lock`)."""


@contextlib.contextmanager
def exclusive_lock(folder: str, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder/.lock`` for the block.

    The kernel releases it when the process dies, so a killed writer never blocks
    the next one. If another process (or another open of the file) holds it,
    ``busy(lock_path)`` is raised.
    """
    path = os.path.join(folder, LOCK_FILE)
    with open(path, "w") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            raise busy(path) from error
        yield


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1)


def recorded_json(path: str, data: Dict[str, Any]) -> Dict[str, Any]:
    """What ``path`` records: its content if it exists, else ``data``, written there.

    Used for settings that must not change between runs on the same folder:
    compare the result with ``data`` (:func:`differing_keys`). ``data`` is
    returned as JSON reads it back (tuples become lists), so the two compare
    equal when nothing changed. An unreadable file raises a ``ValueError``
    naming it.
    """
    data = json.loads(json.dumps(data))
    if not os.path.exists(path):
        write_json(path, data)
        return data
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read '{path}': {error}") from error


def differing_keys(recorded: Dict[str, Any], requested: Dict[str, Any]) -> List[str]:
    """Sorted keys whose values differ between two dicts (a key missing on one side
    differs)."""
    return sorted(k for k in set(recorded) | set(requested) if recorded.get(k) != requested.get(k))


_LAZY_FIELD_ERROR = "Error loading data field"
"""How ``metatensor.learn.IndexedDataset`` starts the error it raises from a lazy field's."""


def error_line(error: Exception) -> str:
    """One line for an error, as the command-line tools print it: an ``OSError``
    names its path(s), a ``KeyError`` loses the quotes ``str`` adds, and
    metatensor-learn's wrapper of an error in a lazily loaded field ("Error loading
    data field ...", which names no file) ends with the line of the error it wraps."""
    if isinstance(error, (FileExistsError, NotADirectoryError)) and os.path.isfile(
        str(error.filename)
    ):
        text = f"'{error.filename}' is a file, where a folder is needed ({error.strerror})"
    elif isinstance(error, OSError) and error.filename is not None and error.strerror:
        paths = [error.filename] + ([error.filename2] if error.filename2 else [])
        text = f"{error.strerror}: " + " -> ".join(f"'{p}'" for p in paths)
    elif isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    else:
        text = str(error)
    if text.startswith(_LAZY_FIELD_ERROR) and isinstance(error.__cause__, Exception):
        text = f"{text}: {error_line(error.__cause__)}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
