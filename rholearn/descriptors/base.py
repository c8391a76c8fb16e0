"""What every lambda-SOAP calculator shares: hypers, structure checks, the disk cache.

A calculator (:class:`~rholearn.descriptors.LambdaSoap` or
:class:`~rholearn.descriptors.ContractedLambdaSoap`) holds a TorchScript-compatible
``module`` (metatomic systems -> descriptor TensorMap) and implements
:meth:`Descriptor.settings` and :meth:`Descriptor.n_features`; this base class
adds the conversion of ``ase.Atoms``, the element checks, renumbering of the
``system`` samples and the per-structure cache on disk.

Output layout (a ``metatensor.torch.TensorMap``)
    keys        ``o3_lambda, o3_sigma, center_type`` (only the requested target keys
                of the centre types present)
    samples     ``system, atom`` (``system`` is the structure's dataset index)
    components  ``o3_mu``
    properties  depend on the calculator (documented there)

Coordinates are read from ``ase.Atoms`` in Angstrom; the cutoff in the hypers is
in Angstrom too.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import ase
import ase.data
import metatensor.torch as mts
import numpy as np
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System, systems_to_torch

from .. import layout
from ..files import differing_keys, recorded_json
from ..options import OptionsError

DEFAULT_HYPERS = {
    "cutoff": {"radius": 4.0, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
    "density": {"type": "Gaussian", "width": 0.3},
    "basis": {
        "type": "TensorProduct",
        "max_angular": 6,
        "radial": {"type": "Gto", "max_radial": 5},
    },
}
"""featomic ``SphericalExpansion`` hypers (lengths in Angstrom).

``max_angular = 4`` would reach every ``o3_lambda <= 8``, enough for auxiliary bases
up to g functions; ``6`` (SALTED's ``nang``) gave lower test errors on distorted
methanol and unseen g2 molecules at every training-set size and the same on waters
(README, "Accuracy and speed"), for about 1.5x the prediction time of ``4``.
``max_radial = 5`` means 6 radial functions (featomic counts
from 0). The stock Clebsch-Gordan product costs roughly
``(max_angular + 1)^3 (max_radial + 1)^2 n_types^2`` per atom; the contracted one
``(max_angular + 1)^3 n_channels^2``.
"""

def check_hypers(hypers: dict, where: str = "hypers") -> None:
    """Refuse, before any work, hypers that featomic's ``SphericalExpansion`` would
    not take (or would hang or abort on: a zero cutoff, a zero Gaussian width).

    Raises
    ------
    OptionsError
        Naming the option (``where.cutoff.radius``); for what featomic itself
        refuses (an unknown ``type``, a negative ``max_angular``), the option whose
        value featomic's message quotes (else ``where``), and that message.
    """
    unknown = sorted(set(hypers) - {"cutoff", "density", "basis"})
    if unknown:
        raise OptionsError(f"unknown option '{where}.{unknown[0]}': featomic's "
                           "SphericalExpansion takes cutoff, density and basis")
    for path in (("cutoff", "radius"), ("density", "width")):
        value = hypers.get(path[0], {}).get(path[1]) if isinstance(hypers.get(path[0]), dict) \
            else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise OptionsError(f"option '{where}.{'.'.join(path)}' must be a length > 0 "
                               f"(Angstrom), got {value!r}")
    # featomic's plain calculator checks the hypers as its TorchScript one does, without
    # loading the TorchScript extension (which an export would then record)
    from featomic import SphericalExpansion

    try:
        SphericalExpansion(**hypers)
    except Exception as error:  # featomic raises FeatomicError or ValueError
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        named = re.search(r"`([^`]*)`|\"([^\"]*)\"|got (\S+)$", message)  # a value, if any
        paths = [path for path, value in _leaves(hypers, where)
                 if named and str(value) in named.groups()]
        culprit = paths[0] if len(paths) == 1 else where
        raise OptionsError(f"option '{culprit}': featomic's SphericalExpansion refuses these "
                           f"hypers: {message}") from None


def _leaves(tree: dict, where: str):
    """``(dotted path, value)`` of every non-mapping value of nested mappings."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{where}.{key}")
        else:
            yield f"{where}.{key}", value


CACHE_SETTINGS_FILE = "descriptor.json"
"""File in a descriptor cache folder recording the settings its files were made with."""

Key = Tuple[int, int, int]


class Descriptor:
    """Base of the lambda-SOAP calculators restricted to a set of target keys.

    Parameters
    ----------
    hypers : dict
        featomic ``SphericalExpansion`` hypers (``cutoff``, ``density``, ``basis``),
        see :data:`DEFAULT_HYPERS`. Lengths in Angstrom.
    atom_types : sequence of int
        Atomic numbers of every element the descriptor must handle; they fix the
        property dimension of each block.
    target_keys : sequence of (o3_lambda, o3_sigma, center_type), optional
        Blocks to compute, e.g. :meth:`rholearn.basis.BasisSet.keys`. Default:
        every ``o3_sigma = +1`` block up to ``o3_lambda = 2 max_angular``.
    dtype : torch.dtype
    device : torch.device or str, optional

    Notes
    -----
    Subclasses set ``self.module`` (``List[System] -> TensorMap``, samples
    ``system = 0 .. len(systems) - 1``) and implement :meth:`settings` and
    :meth:`n_features`; :meth:`fit` and :meth:`state` default to no-ops.
    """

    kind = ""
    """Name of the calculator in saved models and ``FitOptions.descriptor``."""

    def __init__(
        self,
        hypers: dict,
        atom_types: Sequence[int],
        target_keys: Optional[Sequence[Key]] = None,
        dtype: torch.dtype = torch.float64,
        device: Optional[torch.device] = None,
    ):
        self.hypers = copy.deepcopy(hypers)
        self.atom_types = sorted(int(z) for z in set(atom_types))
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        max_lambda = 2 * int(self.hypers["basis"]["max_angular"])
        if target_keys is None:
            target_keys = [(l, 1, z) for z in self.atom_types for l in range(max_lambda + 1)]
        self.target_keys: List[Key] = sorted(tuple(int(x) for x in key) for key in target_keys)
        _check_target_keys(self.target_keys, self.atom_types, max_lambda)
        self.module: torch.nn.Module

    # ------------------------------------------------------- to implement ---
    def settings(self) -> dict:
        """Plain-data settings that determine the descriptor values."""
        return {
            "descriptor": self.kind,
            "hypers": self.hypers,
            "atom_types": self.atom_types,
            "target_keys": [list(key) for key in self.target_keys],
            "dtype": str(self.dtype),
        }

    def n_features(self) -> Dict[Key, int]:
        """Number of properties of each target block."""
        raise NotImplementedError

    def fit(self, frames: Sequence[ase.Atoms]) -> None:
        """Fit what the descriptor learns from training structures (nothing here)."""

    def options(self) -> dict:
        """Constructor options beyond the common ones (none here)."""
        return {}

    def to(self, dtype: torch.dtype, device: Optional[torch.device] = None) -> "Descriptor":
        """The same descriptor (fitted state included) with another dtype/device."""
        other = type(self)(
            self.hypers, self.atom_types, self.target_keys, dtype, device, **self.options()
        )
        other.load_state(self.state())
        return other

    def state(self) -> Dict[str, torch.Tensor]:
        """Fitted tensors to save with a model (none here); see :meth:`load_state`."""
        return {}

    def load_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state` returned."""
        if state:
            raise ValueError(f"the '{self.kind}' descriptor has no state, got {sorted(state)}")

    # ------------------------------------------------------------ compute ---
    def systems(
        self, frames: Sequence[ase.Atoms], positions_requires_grad: bool = False
    ) -> List[System]:
        """Convert ase structures (Angstrom) to metatomic systems of this dtype/device.

        With ``positions_requires_grad=True`` the descriptor computed from the
        returned systems is differentiable with respect to ``system.positions``.
        """
        return systems_to_torch(
            list(frames),
            dtype=self.dtype,
            device=self.device,
            positions_requires_grad=positions_requires_grad,
        )

    def compute(
        self, frames: Sequence[ase.Atoms], system_ids: Optional[Sequence[int]] = None
    ) -> TensorMap:
        """Descriptor of ase structures (positions in Angstrom).

        Parameters
        ----------
        frames : sequence of ase.Atoms
        system_ids : sequence of int, optional
            Value of the ``system`` sample dimension of each structure (its index
            in the dataset). Default ``0 .. len(frames) - 1``.
        """
        system_ids = check_system_ids(frames, system_ids)
        self.check_atom_types(frames, system_ids)
        return self.compute_systems(self.systems(frames), system_ids)

    def compute_systems(
        self, systems: List[System], system_ids: Optional[Sequence[int]] = None
    ) -> TensorMap:
        """Descriptor of metatomic systems (see :meth:`systems`).

        Gradients flow to ``system.positions`` where they require grad.
        """
        system_ids = check_system_ids(systems, system_ids)
        return renumber_systems(self.module(systems), system_ids)

    def check_atom_types(
        self, frames: Sequence[ase.Atoms], system_ids: Optional[Sequence[int]] = None
    ) -> None:
        """Raise a ``ValueError`` naming the first structure with an unknown element."""
        known = set(self.atom_types)
        for system_id, atoms in zip(check_system_ids(frames, system_ids), frames):
            unknown = sorted(set(atoms.numbers.tolist()) - known)
            if unknown:
                raise ValueError(
                    f"structure {system_id} ({atoms.get_chemical_formula()}) contains "
                    f"element(s) {_symbols(unknown)}, but the descriptor only knows "
                    f"{_symbols(self.atom_types)}"
                )

    # -------------------------------------------------------------- cache ---
    def compute_cached(
        self,
        frames: Sequence[ase.Atoms],
        system_ids: Sequence[int],
        cache_dir: str,
    ) -> TensorMap:
        """Like :meth:`compute`, reading and writing ``cache_dir/<system_id>-<hash>.mts``.

        The file name holds :func:`structure_hash` of the structure, so a structure
        whose atoms moved (or changed) is computed again, never read from an older
        file (which is then removed). Structures without a cache file are computed
        together and each saved atomically; the folder records :meth:`settings` in
        ``descriptor.json`` (for a fitted descriptor these include a hash of its
        fitted state) and a folder made with other settings raises a ``ValueError``.
        """
        system_ids = check_system_ids(frames, system_ids)
        self._claim_cache(cache_dir)
        paths = [
            os.path.join(cache_dir, f"{i}-{structure_hash(atoms)}.mts")
            for i, atoms in zip(system_ids, frames)
        ]
        missing = [k for k, path in enumerate(paths) if not os.path.exists(path)]
        if missing:
            fresh = self.compute([frames[k] for k in missing], [system_ids[k] for k in missing])
            for k in missing:
                pattern = os.path.join(glob.escape(cache_dir), f"{system_ids[k]}-*.mts")
                for older in glob.glob(pattern):  # of the structure before it changed
                    os.remove(older)
                layout.save(paths[k], select_system(fresh, system_ids[k]))
        tensors = [self._load(path) for path in paths]
        return mts.join(tensors, axis="samples", different_keys="union")

    def _claim_cache(self, cache_dir: str) -> None:
        """Create ``cache_dir`` for these settings, or check it was made with them."""
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, CACHE_SETTINGS_FILE)
        settings = self.settings()
        differing = differing_keys(recorded_json(path, settings), json.loads(json.dumps(settings)))
        if differing:
            raise ValueError(
                f"descriptor cache '{cache_dir}' was made with other settings: {differing} "
                f"differ from those in '{path}'. Use another folder."
            )

    def _load(self, path: str) -> TensorMap:
        try:
            tensor = mts.load(path)
        except Exception as error:  # metatensor raises its own error types
            raise ValueError(f"cannot read descriptor file '{path}': {error}") from error
        return tensor.to(dtype=self.dtype, device=self.device)


def structure_hash(atoms: ase.Atoms) -> str:
    """16 hex digits identifying a structure's atomic numbers, positions, cell and
    periodicity (exact values: any change gives another hash)."""
    digest = hashlib.sha256()
    for array, dtype in ((atoms.numbers, np.int64), (atoms.positions, np.float64),
                         (atoms.cell.array, np.float64), (atoms.pbc, np.bool_)):
        values = np.ascontiguousarray(array, dtype=dtype)
        digest.update(str(values.shape).encode())
        digest.update(values.tobytes())
    return digest.hexdigest()[:16]


def _check_target_keys(target_keys: List[Key], atom_types: List[int], max_lambda: int):
    for o3_lambda, _, center_type in target_keys:
        if o3_lambda > max_lambda:
            raise ValueError(
                f"target key o3_lambda={o3_lambda}, center_type={center_type} needs "
                f"max_angular >= {(o3_lambda + 1) // 2} in the descriptor hypers, "
                f"which have max_angular={max_lambda // 2}"
            )
        if center_type not in atom_types:
            raise ValueError(
                f"target key o3_lambda={o3_lambda}, center_type={center_type}: "
                f"atom type {center_type} is not in atom_types {atom_types}"
            )


def check_system_ids(frames: Sequence, system_ids: Optional[Sequence[int]]) -> List[int]:
    """``system_ids`` as a list of int (default ``0 .. len(frames) - 1``), one per structure."""
    if system_ids is None:
        return list(range(len(frames)))
    system_ids = [int(i) for i in system_ids]
    if len(system_ids) != len(frames):
        raise ValueError(f"{len(frames)} structures but {len(system_ids)} system ids")
    return system_ids


def _symbols(atomic_numbers: Sequence[int]) -> List[str]:
    return [ase.data.chemical_symbols[z] for z in atomic_numbers]


def renumber_systems(tensor: TensorMap, system_ids: List[int]) -> TensorMap:
    """Replace the ``system`` sample values ``0..N-1`` by ``system_ids``."""
    if system_ids == list(range(len(system_ids))):
        return tensor
    ids = torch.tensor(system_ids, dtype=torch.int32, device=tensor.device)
    blocks = []
    for block in tensor.blocks():
        samples = block.samples.values.clone()
        samples[:, 0] = ids[samples[:, 0].to(torch.long)]
        blocks.append(
            TensorBlock(
                values=block.values,
                samples=Labels(block.samples.names, samples),
                components=block.components,
                properties=block.properties,
            )
        )
    return TensorMap(tensor.keys, blocks)


def select_system(tensor: TensorMap, system_id: int) -> TensorMap:
    """The samples of one structure, without the blocks where it has no atoms."""
    selection = Labels(["system"], torch.tensor([[system_id]], dtype=torch.int32))
    one = mts.slice(tensor, axis="samples", selection=selection.to(tensor.device))
    return mts.drop_empty_blocks(mts.detach(one))
