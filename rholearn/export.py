"""A trained model as a metatomic ``AtomisticModel``, loadable by any metatomic engine.

The exported file holds the whole prediction pipeline in TorchScript (descriptor,
network, baseline) behind metatomic's model interface, and computes one output,
:data:`OUTPUT_NAME`: the density coefficients of every atom as a TensorMap in the
layout of :mod:`rholearn.layout` (keys ``o3_lambda, o3_sigma, center_type``,
samples ``system, atom``, component ``o3_mu``, properties ``n``). The auxiliary
basis those coefficients refer to is stored as JSON in the model's metadata
(``metadata().extra["basis"]``), next to the file format.

A descriptor that runs featomic (the stock lambda-SOAP, or the contracted one with
featomic's spherical expansion, the default on the CPU) needs featomic's TorchScript
extension, a compiled library. The export copies it (and its own dependencies) into
an extensions folder, as ``mtt export`` does, so that a process that imports neither
rholearn nor featomic loads the model::

    from metatomic.torch import load_atomistic_model
    model = load_atomistic_model("model-atomistic.pt", extensions_directory="extensions")

The libraries are those of this machine's platform and torch version. A contracted
descriptor with the pure-torch expansion (``descriptor_options: {expansion: torch}``)
needs no extension: its export records none, even when featomic is loaded in the
exporting process, and loads where featomic is not installed. ``expansion="torch"``
exports any contracted model so.
"""

import contextlib
import json
import os
import shutil
from typing import Dict, Iterator, List, Optional, Sequence

import ase.data
import metatensor.torch as mts
import torch
from metatensor.torch import Labels, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelMetadata,
    ModelOutput,
    System,
)

from . import __version__
from .descriptors.contracted import ContractedLambdaSoapModule
from .descriptors.expansion import make_expansion
from .files import atomic_path, remove_orphans
from .models.density_model import DensityModel
from .kinds import target_kind
from .reduction import SumOverAtoms

OUTPUT_NAME = "rholearn::density_coefficients"
"""Name of the output of exported models (metatomic's ``<domain>::<output>`` form)."""

TENSOR_UNITS = {"dipole": "e*Bohr", "polarizability": "e^2*Bohr^2/Hartree"}
"""Units of the output ``rholearn::<target>`` of a molecular-tensor model (one
TensorMap per system, :mod:`rholearn.tensors` layout; atomic units)."""

OUTPUT_UNIT = "e/Bohr^3"
"""Unit of the output: the coefficients expand a density in electrons / Bohr^3 on
basis functions normalised over Bohr^3 (:mod:`rholearn.layout`). An engine that
asks for another density unit (``e/Angstrom^3``) gets the coefficients scaled by
metatomic's conversion factor. The output's ``quantity`` stays empty: metatomic
deprecates it (the unit expression carries the dimension)."""

EXPORT_FORMAT = "rholearn.AtomisticModel/2"
"""Version of what an exported model carries in its metadata; bumped on any change
(``/2``: output unit, named metadata, bundled extensions)."""

EXTENSIONS_FOLDER = "extensions"
"""Default extensions folder, beside the exported file."""

REFERENCES = {
    "implementation": [
        "rholearn " + __version__,
        "featomic (lambda-SOAP descriptor): https://github.com/metatensor/featomic",
        "metatensor and metatomic: https://github.com/metatensor",
    ],
    "architecture": [
        "A. Grisafi, D. M. Wilkins, G. Csanyi, M. Ceriotti, Symmetry-adapted machine "
        "learning for tensorial properties of atomistic systems, Phys. Rev. Lett. 120, "
        "036002 (2018), https://doi.org/10.1103/PhysRevLett.120.036002",
        "A. Grisafi, A. Fabrizio, B. Meyer, D. M. Wilkins, C. Corminboeuf, M. Ceriotti, "
        "Transferable machine-learning model of the electron density, ACS Cent. Sci. 5, "
        "57 (2019), https://doi.org/10.1021/acscentsci.8b00551",
        "A. M. Lewis, A. Grisafi, M. Ceriotti, M. Rossi, Learning electron densities in the "
        "condensed phase, J. Chem. Theory Comput. 17, 7203 (2021), "
        "https://doi.org/10.1021/acs.jctc.1c00576",
    ],
}
"""References recorded in an exported model's metadata."""


class AtomisticDensity(torch.nn.Module):
    """metatomic's model interface around a scripted rholearn pipeline.

    Parameters
    ----------
    pipeline : torch.nn.Module
        ``List[System] -> TensorMap`` of per-atom outputs (:meth:`DensityModel.pipeline`
        with ``reduce=False``).
    output_name : str
        The output it computes.
    lambdas : list of int, optional
        For a molecular tensor (:mod:`rholearn.kinds`): its ``o3_lambda``; the per-atom
        contributions of the selected atoms are summed over each system
        (:class:`rholearn.reduction.SumOverAtoms`).
    """

    def __init__(self, pipeline: torch.nn.Module, output_name: str = OUTPUT_NAME,
                 lambdas: Optional[List[int]] = None):
        super().__init__()
        self.pipeline = pipeline
        self.output_name = output_name  # TorchScript reads no global strings
        self.reduce = lambdas is not None
        self.reduction = SumOverAtoms(lambdas or [])

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:
        if self.output_name not in outputs:
            return {}
        coefficients = self.pipeline(systems)
        if selected_atoms is not None:
            coefficients = mts.slice(coefficients, axis="samples", selection=selected_atoms)
        if self.reduce:
            coefficients = self.reduction(coefficients)
        return {self.output_name: coefficients}


def export_atomistic(
    model: DensityModel,
    path: str,
    extensions: Optional[str] = None,
    authors: Sequence[str] = (),
    name: Optional[str] = None,
    expansion: Optional[str] = None,
) -> str:
    """Write ``model`` as a metatomic ``AtomisticModel`` file and its extensions.

    Parameters
    ----------
    model : DensityModel
        A trained model; exported in its current dtype (float32 or float64).
    path : str
        Output file (conventionally ``.pt``); written atomically.
    extensions : str, optional
        Folder for the TorchScript extensions the model needs (replaced if it
        exists); default :data:`EXTENSIONS_FOLDER` beside ``path``. Pass it to
        ``load_atomistic_model(path, extensions_directory=...)``.
    authors : sequence of str
        Recorded in the model's metadata.
    name : str, optional
        Model name in the metadata; default names the model kind, basis and elements.
    expansion : {"torch", "featomic"}, optional
        Who computes the spherical expansion of a contracted descriptor in the
        exported model; default the model's own. ``"torch"`` exports a model that needs
        no featomic extension (and computes the expansion on the engine's device);
        its values equal featomic's to about 1e-13 (Gaussian density, GTO basis only).

    Returns
    -------
    str
        The extensions folder.

    Raises
    ------
    OSError
        The file or folder cannot be written (full disk, no permission), naming it;
        nothing is left at ``path`` but a previous complete export.
    ValueError
        ``expansion`` for a stock descriptor, or ``"torch"`` for hypers it does not support.

    Notes
    -----
    Capabilities: the model's atom types, the descriptor cutoff as the
    interaction range, lengths in Angstrom, CPU and CUDA devices; output unit
    :data:`OUTPUT_UNIT`. The file is first written to memory, then copied: torch
    aborts the process when a file it writes hits a full disk. What a killed
    export left (``.tmp-<pid>-<file>``) is removed by the next export to the
    same path; a killed export may leave the extensions folder incomplete, and
    the next export rewrites it.
    """
    model = model.eval()
    if extensions is None:
        extensions = os.path.join(os.path.dirname(os.path.abspath(path)), EXTENSIONS_FOLDER)
    elements = " ".join(ase.data.chemical_symbols[z] for z in model.atom_types)
    kind = target_kind(model.target)
    output_name = f"rholearn::{kind.name}" if kind.is_tensor else OUTPUT_NAME
    what = (f"the {kind.name} (atomic units, {TENSOR_UNITS.get(kind.name)}) of each system as a "
            "sum of per-atom contributions, layout of rholearn.tensors" if kind.is_tensor else
            f"electron density coefficients per atom in the auxiliary basis "
            f"'{model.basis.name}' (metadata extra['basis']), layout of rholearn.layout")
    capabilities = ModelCapabilities(
        outputs={
            output_name: ModelOutput(
                unit=TENSOR_UNITS.get(kind.name, OUTPUT_UNIT),
                sample_kind="system" if kind.is_tensor else "atom",
                description=what,
            )
        },
        atomic_types=list(model.atom_types),
        interaction_range=float(model.hypers["cutoff"]["radius"]),
        length_unit="angstrom",
        supported_devices=["cpu", "cuda"],
        dtype=str(model.dtype).replace("torch.", ""),
    )
    metadata = ModelMetadata(
        name=name or f"rholearn {model.model_type} {kind.name} model ({model.basis.name}; {elements})",
        description=(
            (f"Molecules of {elements}: {what}" if kind.is_tensor else
             f"Electron density of molecules and materials of {elements} as coefficients of "
             f"the auxiliary basis '{model.basis.name}' (electrons / Bohr^3 on normalised "
             "functions)") + f", from a {model.model_type} model on the {model.descriptor_kind} "
            f"lambda-SOAP (cutoff {float(model.hypers['cutoff']['radius']):g} Angstrom); "
            f"trained and exported with rholearn {__version__}."
        ),
        authors=list(authors),
        references={key: list(value) for key, value in REFERENCES.items()},
        extra={"format": EXPORT_FORMAT, "basis": json.dumps(model.basis.to_dict())},
    )
    with _expansion(model, expansion):
        module = AtomisticDensity(model.pipeline(reduce=False), output_name,
                                  list(kind.lambdas) if kind.is_tensor else None)
        atomistic = AtomisticModel(module.eval(), metadata, capabilities)
        remove_orphans(path)
        _check_extensions_folder(extensions)
        with atomic_path(path) as tmp, _hidden_libraries(_unused_featomic(atomistic)):
            _save(atomistic, tmp, extensions, path)
    return extensions


@contextlib.contextmanager
def _expansion(model: DensityModel, kind: Optional[str]) -> Iterator[None]:
    """The model's contracted descriptor computes its spherical expansion with ``kind``
    (``"torch"`` or ``"featomic"``, None: unchanged) meanwhile."""
    if kind is None:
        yield
        return
    if kind not in ("torch", "featomic"):
        raise ValueError(f"unknown expansion '{kind}', expected 'torch' or 'featomic'")
    descriptor = model.descriptor
    module = descriptor.module
    if not isinstance(module, ContractedLambdaSoapModule):
        raise ValueError(f"expansion '{kind}' needs a contracted descriptor, this model's "
                         f"is '{model.descriptor_kind}'")
    original = module.expansion
    module.expansion = make_expansion(
        kind, descriptor.hypers, descriptor.atom_types, descriptor.dtype
    ).to(descriptor.device)
    try:
        yield
    finally:
        module.expansion = original


def _unused_featomic(atomistic: torch.nn.Module) -> List[str]:
    """featomic's TorchScript libraries loaded in this process, where no module of
    ``atomistic`` is featomic's (they hold all its TorchScript classes); else none."""
    if any(type(module).__module__.split(".")[0] == "featomic" for module in atomistic.modules()):
        return []
    return [library for library in torch.ops.loaded_libraries
            if "featomic" in os.path.basename(library)]


@contextlib.contextmanager
def _hidden_libraries(libraries: List[str]) -> Iterator[None]:
    """metatomic records every TorchScript library loaded in the process as needed by
    the model it saves: hide ``libraries`` from it meanwhile."""
    loaded = torch.ops.loaded_libraries
    loaded.difference_update(libraries)
    try:
        yield
    finally:
        loaded.update(libraries)


def _check_extensions_folder(extensions: str) -> None:
    """Refuse to replace anything but an extensions folder: metatomic removes the
    folder before collecting into it, so it must hold shared libraries only."""
    if os.path.lexists(extensions) and not os.path.isdir(extensions):
        raise ValueError(f"extensions folder '{extensions}' exists and is not a folder")
    for root, _, files in os.walk(extensions):
        for name in files:
            if not (".so" in name or name.endswith((".dylib", ".dll"))):
                raise ValueError(
                    f"extensions folder '{extensions}' holds '{os.path.join(root, name)}', "
                    "which is not a library: give an empty or new folder (it is replaced)"
                )


def _save(atomistic: AtomisticModel, tmp: str, extensions: str, path: str) -> None:
    """``atomistic.save`` to ``tmp`` with its extensions collected in ``extensions``;
    errors as ``OSError`` / ``ValueError`` naming ``path`` or ``extensions``."""
    memory = _memory_file()
    try:
        try:
            atomistic.save(tmp if memory is None else f"/proc/self/fd/{memory}",
                           collect_extensions=extensions)
        except OSError as error:  # copying the extensions
            raise OSError(error.errno, f"cannot write the extensions folder: {error.strerror}",
                          extensions) from error
        except RuntimeError as error:  # TorchScript or metatomic
            raise ValueError(f"cannot export to '{path}': {error}") from error
        if memory is not None:
            try:
                os.lseek(memory, 0, os.SEEK_SET)
                with open(memory, "rb", closefd=False) as source, open(tmp, "wb") as target:
                    shutil.copyfileobj(source, target)
            except OSError as error:
                raise OSError(error.errno, error.strerror, path) from error
    finally:
        if memory is not None:
            os.close(memory)


def _memory_file() -> Optional[int]:
    """A file descriptor of an anonymous in-memory file, where the platform has one
    (Linux); torch then writes to memory, and only Python writes to disk."""
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return None
    return os.memfd_create("rholearn-export")
