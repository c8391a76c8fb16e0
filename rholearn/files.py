"""Atomic writes: a file that exists is complete, even if its writer was killed."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator


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
