"""The human-readable log of a run: ``RUN/train.log`` with timestamps, and the console.

:func:`run_log` attaches, for the duration of a ``with`` block, a file handler
(``RUN/train.log``, appended to, one timestamped line per message) and a
console handler (plain lines on stdout) to the ``rholearn`` logger; nested
blocks on the same folder share them, so :func:`rholearn.workflow.fit` and the
:func:`rholearn.train.train` it calls write one log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

from .run import TEXT_LOG_FILE

LOGGER = logging.getLogger("rholearn")


@contextlib.contextmanager
def run_log(run_dir: str, console: bool = True) -> Iterator[logging.Logger]:
    """Log the messages of the ``rholearn`` logger to ``run_dir/train.log`` (and stdout).

    Parameters
    ----------
    run_dir : str
        The run folder (created if needed).
    console : bool
        Also print each message, without timestamp, on stdout.
    """
    path = os.path.abspath(os.path.join(run_dir, TEXT_LOG_FILE))
    if any(getattr(handler, "baseFilename", None) == path for handler in LOGGER.handlers):
        yield LOGGER  # an enclosing block logs to this run already
        return
    os.makedirs(run_dir, exist_ok=True)
    handlers = [logging.FileHandler(path)]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    if console:
        handlers.append(logging.StreamHandler(sys.stdout))
        handlers[1].setFormatter(logging.Formatter("%(message)s"))
    level = LOGGER.level
    LOGGER.setLevel(logging.INFO)
    for handler in handlers:
        LOGGER.addHandler(handler)
    try:
        yield LOGGER
    finally:
        for handler in handlers:
            LOGGER.removeHandler(handler)
            handler.close()
        LOGGER.setLevel(level)
