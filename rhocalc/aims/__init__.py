"""FHI-aims backend of rhocalc: inputs through ase, runs, RI output parsing into targets.

FHI-aims is licensed and not installed with rhocalc: point ``$ASE_AIMS_COMMAND``
(or :attr:`AimsOptions.command`) at an aims binary to run it, and
``$AIMS_SPECIES_DIR`` (or :attr:`AimsOptions.species_dir`) at its species
defaults. Without a binary, runs can be written as SLURM array jobs and their
outputs parsed once they finish. See ``docs/aims.md``.

Usage::

    from rhocalc import aims
    options = aims.AimsOptions(xc="pbe", species_dir=".../defaults_2020/light")
    aims.run_dataset(structures, "dataset", options)          # runs aims locally
    aims.run_dataset(structures, "dataset", options, slurm=aims.SlurmOptions())
    aims.parse_dataset("dataset")                              # after the jobs
    targets, basis = aims.read_ri_run("path/to/ri/run", atoms)  # one finished run
    # a folder without aims.out: say which aims wrote it (it decides the conventions)
    targets, basis = aims.read_ri_run("path/to/old/run", atoms, aims_version="221103")
"""

from .aimsout import parse_aims_out
from .inputs import write_inputs, write_ri_vector
from .options import AimsOptions
from .order import AimsOrder, from_aims, to_aims
from .outputs import AimsOutputError, read_basis, read_ri_run
from .run import (
    AimsRunError,
    SlurmOptions,
    compute_targets,
    parse_dataset,
    rebuild,
    run_dataset,
)
from .runfiles import RunFiles, run_files

__all__ = [
    "AimsOptions",
    "AimsOrder",
    "AimsOutputError",
    "AimsRunError",
    "RunFiles",
    "SlurmOptions",
    "compute_targets",
    "from_aims",
    "parse_aims_out",
    "parse_dataset",
    "read_basis",
    "read_ri_run",
    "rebuild",
    "run_dataset",
    "run_files",
    "to_aims",
    "write_inputs",
    "write_ri_vector",
]
