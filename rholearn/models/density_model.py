"""The user-facing model: structures in, density coefficients out.

A :class:`DensityModel` bundles everything a prediction needs: the target
:class:`~rholearn.basis.BasisSet`, the lambda-SOAP descriptor (its hypers and
fitted contraction), the network (linear or nonlinear) and the invariant
baseline. :meth:`DensityModel.save` writes all of it as plain data in one
``torch.save`` file.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import ase
import ase.data
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

from ..basis import BasisSet
from ..descriptors import DEFAULT_HYPERS, Descriptor, make_descriptor
from ..descriptors.base import check_system_ids, renumber_systems
from ..descriptors.contracted import ContractedLambdaSoapModule
from ..files import atomic_path
from ..kinds import target_kind
from ..reduction import SumOverAtoms
from .baseline import Baseline
from .kernel import KernelModel
from .linear import LinearModel
from .nonlinear import NonlinearModel
from .weights import load_weights

NETS = {"linear": LinearModel, "nonlinear": NonlinearModel, "kernel": KernelModel}
"""Network kinds by name, as stored in saved models."""

FILE_FORMAT = "rholearn.DensityModel/4"
"""Format of saved models; ``/2`` added the descriptor kind, options and state; ``/3``:
a kernel model stores only the references it uses (an older rholearn would misread it);
``/4``: the target kind (:mod:`rholearn.kinds`; older files are densities)."""

OLD_FILE_FORMATS = {"rholearn.DensityModel/1": "stock", "rholearn.DensityModel/2": "contracted",
                    "rholearn.DensityModel/3": "contracted"}
"""Older formats still read, with the descriptor they were written with where the file
does not record it (``/2`` files do; their padded kernel references load as they are)."""

PREDICT_CHUNK = 256
"""Atoms per features + network step of a prediction with the contracted descriptor."""

DEFAULT_DESCRIPTOR = "contracted"
"""Descriptor of new models: see :mod:`rholearn.descriptors` (the contracted one
was at least as accurate as the stock one on the strongly distorted waters,
``benchmarks/descriptor_accuracy.py``, and is 100-200x faster to predict)."""

Key = Tuple[int, int, int]


class DensityModel(torch.nn.Module):
    """Equivariant model of density coefficients in an auxiliary basis.

    Parameters
    ----------
    basis : BasisSet
        The target basis; fixes the elements, blocks and radial channels.
    hypers : dict, optional
        featomic ``SphericalExpansion`` hypers of the lambda-SOAP descriptor
        (lengths in Angstrom). Default :data:`rholearn.descriptors.DEFAULT_HYPERS`.
    model : {"linear", "nonlinear"}
        Network kind, see :class:`LinearModel` and :class:`NonlinearModel`.
    baseline : Baseline, optional
        Invariant baseline added to the network output (e.g.
        :meth:`Baseline.from_coefficients` of the training targets); copied.
    dtype : torch.dtype
    device : torch.device or str, optional
    descriptor : {"contracted", "stock"}
        Lambda-SOAP calculator, see :data:`rholearn.descriptors.DESCRIPTORS`; a
        contracted one is fitted to training structures by :meth:`fit_descriptor`.
    descriptor_options : dict, optional
        Passed to the descriptor (``n_channels`` for ``"contracted"``).
    target : {"density", "dipole", "polarizability"}
        What the model predicts (:data:`rholearn.kinds.KINDS`): for a tensor kind,
        ``basis`` is the kind's output basis
        (:meth:`~rholearn.kinds.TargetKind.output_basis`) and the per-atom
        contributions are summed over each structure (:class:`~rholearn.reduction.SumOverAtoms`),
        so the model returns one tensor per structure (atomic units).
    **model_options
        Passed to the network constructor (``seed``, ``hidden_sizes``, ``width``).
    """

    def __init__(
        self,
        basis: BasisSet,
        hypers: Optional[dict] = None,
        model: str = "linear",
        baseline: Optional[Baseline] = None,
        dtype: torch.dtype = torch.float64,
        device: Optional[torch.device] = None,
        descriptor: str = DEFAULT_DESCRIPTOR,
        descriptor_options: Optional[dict] = None,
        target: str = "density",
        **model_options,
    ):
        super().__init__()
        kind = target_kind(target)
        self.target = kind.name
        self.reduction = SumOverAtoms(kind.lambdas) if kind.is_tensor else None
        if model not in NETS:
            raise ValueError(f"unknown model '{model}', expected one of {sorted(NETS)}")
        self.basis = basis
        self.hypers = copy.deepcopy(DEFAULT_HYPERS if hypers is None else hypers)
        self.model_type = model
        self.model_options = dict(model_options)
        self.keys: List[Key] = basis.keys()
        self.atom_types = [ase.data.atomic_numbers[s] for s in basis.elements]
        self.descriptor_kind = descriptor
        self._scripted: Optional[tuple] = None  # see _pipeline
        self.descriptor_options = dict(descriptor_options or {})
        self._descriptor = make_descriptor(
            descriptor, self.hypers, self.atom_types, self.keys, dtype, device,
            **self.descriptor_options,
        )
        n_features = self._descriptor.n_features()
        self.in_features = [n_features[key] for key in self.keys]
        self.out_features = [
            basis.n_radial(ase.data.chemical_symbols[z])[l] for l, _, z in self.keys
        ]
        self.net = NETS[model](
            self.keys, self.in_features, self.out_features,
            dtype=dtype, device=device, **self.model_options,
        )
        # a copy of our own: moving the model must not move the caller's baseline
        self.baseline = Baseline({} if baseline is None else baseline.to_dict(), dtype, device)
        self._check_baseline()

    # ------------------------------------------------------------ predict ---
    @property
    def dtype(self) -> torch.dtype:
        """dtype of the network's parameters (follows :meth:`to`)."""
        return next(self.net.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Device of the network's parameters (follows :meth:`to`)."""
        return next(self.net.parameters()).device

    @property
    def descriptor(self) -> Descriptor:
        """The lambda-SOAP calculator, with the dtype and device of the network."""
        if (self._descriptor.dtype, self._descriptor.device) != (self.dtype, self.device):
            self._descriptor = self._descriptor.to(self.dtype, self.device)
        return self._descriptor

    def fit_descriptor(self, frames: Sequence[ase.Atoms]) -> None:
        """Fit the descriptor to training structures (Angstrom); a no-op for ``"stock"``.

        Call before computing training descriptors: it changes their values (not
        their number).
        """
        self.descriptor.fit(frames)

    def forward(self, descriptor: TensorMap) -> TensorMap:
        """Coefficients (baseline included) from a lambda-SOAP TensorMap.

        Blocks absent from ``descriptor`` are absent from the output.
        """
        self._check_descriptor(descriptor)
        output = self.baseline(self.net(descriptor))
        return output if self.reduction is None else self.reduction(output)

    def predict(
        self, frames: Sequence[ase.Atoms], system_ids: Optional[Sequence[int]] = None
    ) -> TensorMap:
        """Predict coefficients for ase structures (positions in Angstrom).

        Returns a ``metatensor.torch.TensorMap`` in the layout of
        :mod:`rholearn.layout` (a tensor kind: :mod:`rholearn.tensors`, atomic
        units), ``system`` samples being ``system_ids``
        (default ``0 .. len(frames) - 1``). A structure with an element the model
        was not trained on raises a ``ValueError`` naming it.
        """
        ids = check_system_ids(frames, system_ids)
        for system_id, atoms in zip(ids, frames):
            self.check_elements(atoms, f"structure {system_id}")
        with torch.no_grad():
            coefficients = self._pipeline()(self.descriptor.systems(frames))
        return renumber_systems(coefficients, ids)

    def __getstate__(self) -> dict:
        """Pickle without the scripted pipeline (TorchScript modules do not pickle)."""
        return {**self.__dict__, "_scripted": None}

    def _pipeline(self) -> torch.nn.Module:
        """Descriptor, network and baseline as one TorchScript module.

        Scripted on first use (~0.1 s) and again only when the model's tensors
        are replaced (e.g. by :meth:`to`); it shares the tensors, so in-place
        updates (training, :meth:`fit_descriptor`) need no rebuild. Running it
        costs a fraction of the eager modules' Python overhead (a network that
        does not script runs eagerly, with a warning).
        """
        descriptor = self.descriptor
        modules = (self.net, self.baseline, descriptor.module)  # (reduction: no tensors)
        tensors = [t for module in modules for t in (*module.parameters(), *module.buffers())]
        key = (id(descriptor.module), tuple((id(t), t.data_ptr()) for t in tensors))
        if self._scripted is None or self._scripted[0] != key:
            pipeline = self.pipeline()
            try:
                pipeline = torch.jit.script(pipeline)
            except Exception as error:  # TorchScript raises many types
                warnings.warn(
                    f"predicting with eager modules (several times slower): the "
                    f"'{self.model_type}' model does not script: {error}", stacklevel=3,
                )
            self._scripted = (key, pipeline)
        return self._scripted[1]

    # ------------------------------------------------------------- checks ---
    def check_targets(self, targets, where: str = "targets") -> None:
        """Raise a ``ValueError`` naming the block of ``targets`` the model cannot fit.

        ``targets`` is a coefficient TensorMap (metatensor-core or -torch).
        """
        expected = dict(zip(self.keys, self.out_features))
        for key, block in targets.items():
            key = tuple(int(key[name]) for name in ("o3_lambda", "o3_sigma", "center_type"))
            name = f"{where}: block o3_lambda={key[0]}, o3_sigma={key[1]}, center_type={key[2]}"
            if key not in expected:
                raise ValueError(f"{name} is not in the model's basis '{self.basis.name}'")
            if len(block.properties) != expected[key]:
                raise ValueError(
                    f"{name} has {len(block.properties)} radial functions, the model's "
                    f"basis '{self.basis.name}' has {expected[key]}"
                )

    def check_elements(self, atoms: ase.Atoms, where: str) -> None:
        """Raise a ``ValueError`` naming ``where`` if ``atoms`` has an element the
        model was not trained on."""
        try:
            self.basis.check_elements(atoms.get_chemical_symbols(), where)
        except KeyError as error:
            raise ValueError(
                f"{where} ({atoms.get_chemical_formula()}) has an element the model was "
                f"not trained on: {error.args[0]}"
            ) from None

    def _check_descriptor(self, descriptor: TensorMap) -> None:
        expected = dict(zip(self.keys, self.in_features))
        for key, block in descriptor.items():
            key = tuple(int(x) for x in key.values)
            if expected.get(key) != len(block.properties):
                raise ValueError(
                    f"descriptor block {key} (o3_lambda, o3_sigma, center_type) with "
                    f"{len(block.properties)} properties does not fit the model, which "
                    f"expects {expected.get(key, 'no such block')}"
                )

    def _check_baseline(self) -> None:
        means = self.baseline.to_dict()
        for z, values in means.items():
            symbol = ase.data.chemical_symbols[z]
            if symbol not in self.basis.shells:
                raise ValueError(f"baseline has element {symbol}, not in basis '{self.basis.name}'")
            if len(values) != self.basis.n_radial(symbol)[0]:
                raise ValueError(
                    f"baseline of {symbol} has {len(values)} radial channels, basis "
                    f"'{self.basis.name}' has {self.basis.n_radial(symbol)[0]} for l=0"
                )

    # ---------------------------------------------------------------- I/O ---
    def save(self, path: str) -> None:
        """Write the whole model (plain data and tensors) to ``path`` atomically."""
        state = {
            "format": FILE_FORMAT,
            "target": self.target,
            "basis": self.basis.to_dict(),
            "hypers": self.hypers,
            "descriptor": self.descriptor_kind,
            "descriptor_options": self.descriptor_options,
            "descriptor_state": self.descriptor.state(),
            "model": self.model_type,
            "model_options": self.model_options,
            "dtype": str(self.dtype).replace("torch.", ""),
            "in_features": self.in_features,
            "baseline": self.baseline.to_dict(),
            "net_state": {k: _to_cpu(v) for k, v in self.net.state_dict().items()},
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    @classmethod
    def load(cls, path: str, device: Optional[torch.device] = None) -> "DensityModel":
        """Read a model written by :meth:`save`; errors name the file."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such model file: '{path}'")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types here
            raise ValueError(f"cannot read model file '{path}': {error}") from error
        if not isinstance(state, dict) or (
            state.get("format") != FILE_FORMAT and state.get("format") not in OLD_FILE_FORMATS
        ):
            found = state.get("format") if isinstance(state, dict) else None
            raise ValueError(
                f"'{path}' is not a rholearn model file this rholearn reads (format {found!r}; "
                f"known: {[FILE_FORMAT, *OLD_FILE_FORMATS]}): update rholearn, or retrain"
            )
        dtype = getattr(torch, state["dtype"])
        descriptor = state.get("descriptor", OLD_FILE_FORMATS.get(state["format"]))
        model = cls(
            BasisSet.from_dict(state["basis"]),
            hypers=state["hypers"],
            model=state["model"],
            baseline=Baseline(state["baseline"], dtype, device),
            dtype=dtype,
            device=device,
            descriptor=descriptor,
            descriptor_options=state.get("descriptor_options", {}),
            target=state.get("target", "density"),
            **state["model_options"],
        )
        try:
            model.descriptor.load_state(state.get("descriptor_state", {}))
        except ValueError as error:
            raise ValueError(f"model file '{path}': {error}") from error
        if model.in_features != state["in_features"]:
            raise ValueError(
                f"model file '{path}': the descriptor now has {model.in_features} "
                f"features per block, the model was trained with {state['in_features']} "
                "(different featomic version?)"
            )
        load_weights(model.net, state["net_state"])
        return model

    def export(self, path: str) -> None:
        """Save the whole model as TorchScript: metatomic systems -> coefficients.

        The file loads with ``torch.jit.load`` without rholearn and is called on
        ``metatomic.torch.systems_to_torch(frames, dtype=...)`` (Angstrom); its
        ``system`` samples are ``0 .. len(systems) - 1``. It runs on the device
        the model was on when exported.
        """
        torch.jit.save(torch.jit.script(self.pipeline()), path)

    def pipeline(self, reduce: bool = True) -> torch.nn.Module:
        """Descriptor, network and baseline as one TorchScript-compatible module
        (not scripted): ``List[System] -> TensorMap`` of coefficients, ``system``
        samples ``0 .. len(systems) - 1``; it shares this model's tensors.
        :meth:`export` and :func:`rholearn.export.export_atomistic` save it.
        A tensor kind's per-atom contributions are summed over each system unless
        ``reduce`` is false."""
        module = self.descriptor.module
        if isinstance(module, ContractedLambdaSoapModule):
            pipeline = _ChunkedModel(module, self.net, self.baseline, PREDICT_CHUNK)
        else:
            pipeline = _ScriptableModel(module, self.net, self.baseline)
        if self.reduction is None or not reduce:
            return pipeline
        return _Reduced(pipeline, self.reduction)


class _Reduced(torch.nn.Module):
    """A pipeline's per-atom output reduced to structures (tensor kinds)."""

    def __init__(self, pipeline: torch.nn.Module, reduction: SumOverAtoms):
        super().__init__()
        self.pipeline = pipeline
        self.reduction = reduction

    def forward(self, systems: List[System]) -> TensorMap:
        return self.reduction(self.pipeline(systems))


class _ScriptableModel(torch.nn.Module):
    """The TorchScript-compatible pipeline of a :class:`DensityModel`."""

    def __init__(self, descriptor: torch.nn.Module, net: torch.nn.Module, baseline: Baseline):
        super().__init__()
        self.descriptor = descriptor
        self.net = net
        self.baseline = baseline

    def forward(self, systems: List[System]) -> TensorMap:
        return self.baseline(self.net(self.descriptor(systems)))


class _ChunkedModel(torch.nn.Module):
    """The pipeline with a contracted lambda-SOAP, ``chunk`` atoms at a time.

    The contracted density of all atoms is computed at once (small); features,
    network and baseline run on ``chunk`` atoms at a time, so a large system
    never holds all its features (~0.1 MiB per atom in float64).
    """

    def __init__(
        self, descriptor: ContractedLambdaSoapModule, net: torch.nn.Module, baseline: Baseline,
        chunk: int,
    ):
        super().__init__()
        self.descriptor = descriptor
        self.net = net
        self.baseline = baseline
        self.chunk = chunk

    def forward(self, systems: List[System]) -> TensorMap:
        density, type_index, system_atom = self.descriptor.density(systems)
        parts: List[TensorMap] = []
        for start in range(0, max(1, density.shape[0]), self.chunk):
            stop = start + self.chunk
            features = self.descriptor.features(
                density[start:stop], type_index[start:stop], system_atom[start:stop]
            )
            parts.append(self.baseline(self.net(features)))
        return parts[0] if len(parts) == 1 else _join_samples(parts)


def _join_samples(parts: List[TensorMap]) -> TensorMap:
    """Blocks with the same key stacked along samples, in the order of ``parts``."""
    all_keys = torch.cat([part.keys.values for part in parts])
    keys = torch.unique(all_keys, dim=0)
    blocks: List[TensorBlock] = []
    for row in keys:
        found: List[TensorBlock] = []
        for part in parts:
            for index in range(len(part.keys)):
                if bool(torch.equal(part.keys.values[index], row)):
                    found.append(part.block_by_id(index))
        first = found[0]
        blocks.append(
            TensorBlock(
                values=torch.cat([block.values for block in found]),
                samples=Labels(
                    first.samples.names, torch.cat([block.samples.values for block in found])
                ),
                components=first.components,
                properties=first.properties,
            )
        )
    return TensorMap(Labels(parts[0].keys.names, keys), blocks)


def _to_cpu(value):
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value
