"""Atomic writes: a file that exists is complete, even if its writer was killed."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict, Iterator, List


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
