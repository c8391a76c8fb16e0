"""Contracted lambda-SOAP: a few channels per l, then one dense Clebsch-Gordan product.

:class:`ContractedLambdaSoap` starts from featomic's spherical expansion like the
stock path (computed by featomic, or by the same in pure torch on the model's
device: :mod:`rholearn.descriptors.expansion`), but

1. maps, for each centre type ``Z`` and angular channel ``l``, the
   ``n_types x n_radial`` (neighbour type, radial) channels of the density to
   ``n_channels`` channels with a linear map ``U[Z, l]`` fitted by an uncentred
   PCA on training environments (:meth:`ContractedLambdaSoap.fit`; the same map
   acts on every ``m``, so equivariance is kept). This is the idea of
   tensor-reduced density representations (Darby et al., 2023): the feature count
   no longer grows with the square of the number of elements;
2. couples the contracted density with itself with Clebsch-Gordan coefficients
   from :func:`featomic.clebsch_gordan.calculate_cg_coefficients`, for every
   ``l_1 <= l_2`` pair, only for the target ``(o3_lambda, o3_sigma = +1)`` blocks,
   as one matrix product and one batched matrix product per ``(l_1, l_2)`` pair.

Everything that does not depend on positions (contraction, Clebsch-Gordan
coefficients, block layout, keys, components and property labels) is built at
construction and stored as buffers; a call does tensor arithmetic only, and the
module is TorchScript-compatible.

Properties of block ``(o3_lambda, 1, Z)`` are ``l_1, l_2, k_1, k_2``, pairs
``l_1 <= l_2`` in increasing order, then ``k_1`` (major) and ``k_2`` running over
the ``n_channels`` contracted channels. Values are

``p[i, mu, (l_1, l_2, k_1, k_2)] = sum_{m_1 m_2} C^{l_1 l_2 o3_lambda}_{m_1 m_2 mu}
a[i, l_1, m_1, k_1] a[i, l_2, m_2, k_2]``,  ``a[i, l, m, k] = sum_{t n} U[Z_i, l][(t, n), k]
rho[i, l, m, t, n]``

with featomic's real Clebsch-Gordan coefficients and sign convention, and no
further normalisation: like the stock features they scale with the square of the
neighbour density. With ``n_channels=None`` ``U`` is the identity, channel
``k = t * n_radial + n`` for the ``t``-th atom type, and the values equal
featomic's ``EquivariantPowerSpectrum`` with neighbour types in properties,
property ``(l_1, l_2, neighbor_1_type, n_1, neighbor_2_type, n_2)`` becoming
``(l_1, l_2, k_1, k_2)``.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Sequence, Tuple

import ase
import torch
from featomic.clebsch_gordan import calculate_cg_coefficients
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatensor.torch.learn.nn import Module
from metatomic.torch import System, systems_to_torch

from .. import layout
from .base import Descriptor, Key
from .expansion import make_expansion, resolve
from .stock import check_system_types

DEFAULT_CHANNELS = 12
"""Default number of contracted channels per (centre type, l); see ``benchmarks/``."""

FIT_BATCH = 64
"""Structures per expansion call when fitting the contraction."""


class ContractedLambdaSoap(Descriptor):
    """Lambda-SOAP with a fitted per-(centre type, l) channel contraction.

    Parameters
    ----------
    hypers, atom_types, target_keys, dtype, device
        As for :class:`~rholearn.descriptors.base.Descriptor`; the radial basis
        must be a ``TensorProduct`` one (same radial functions for every l).
    n_channels : int or None
        Contracted channels per (centre type, l), at most
        ``len(atom_types) * (max_radial + 1)`` (larger values are capped).
        ``None`` switches the contraction off (identity: the stock features).
    expansion : {"auto", "featomic", "torch"}
        Who computes the spherical expansion: featomic's compiled calculator (on the
        CPU), or the same values in pure torch on the descriptor's device (needed on
        CUDA, and for a model exported without featomic; Gaussian density and GTO
        basis only). ``"auto"``: torch on CUDA, featomic elsewhere. The values agree
        to about 1e-13, so the choice is not part of :meth:`settings`.

    Notes
    -----
    Before :meth:`fit`, the contraction is a fixed seeded random orthonormal
    projection, so an unfitted descriptor is deterministic and equivariant;
    :meth:`fit` replaces it by the PCA of the training environments.
    """

    kind = "contracted"

    def __init__(
        self,
        hypers: dict,
        atom_types: Sequence[int],
        target_keys: Optional[Sequence[Key]] = None,
        dtype: torch.dtype = torch.float64,
        device: Optional[torch.device] = None,
        n_channels: Optional[int] = DEFAULT_CHANNELS,
        expansion: str = "auto",
    ):
        super().__init__(hypers, atom_types, target_keys, dtype, device)
        self.expansion = expansion
        self.expansion_kind = resolve(expansion, self.device)
        basis = self.hypers["basis"]
        if basis.get("type") != "TensorProduct":
            raise ValueError(
                f"the contracted lambda-SOAP needs a 'TensorProduct' basis, got {basis.get('type')}"
            )
        self.max_angular = int(basis["max_angular"])
        self.n_radial = int(basis["radial"]["max_radial"]) + 1
        n_inputs = len(self.atom_types) * self.n_radial
        if n_channels is not None and int(n_channels) < 1:
            raise ValueError(f"n_channels must be a positive integer or None, got {n_channels}")
        self.n_channels = n_channels if n_channels is None else int(n_channels)
        self.width = n_inputs if n_channels is None else min(int(n_channels), n_inputs)
        self.fitted = n_channels is None
        # float64 master copy: saved, hashed, and cast into the module
        self._contraction = self._initial_contraction()
        self.module = ContractedLambdaSoapModule(
            make_expansion(self.expansion_kind, self.hypers, self.atom_types, dtype),
            self.atom_types,
            self.max_angular,
            self.n_radial,
            self.target_keys,
            self._contraction,
            dtype,
        ).to(self.device)

    def options(self) -> dict:
        return {"n_channels": self.n_channels, "expansion": self.expansion}

    def settings(self) -> dict:
        """Plain-data settings, including a hash of the fitted contraction."""
        contraction = self._contraction.contiguous()
        return {
            **super().settings(),
            "n_channels": self.n_channels,
            "fitted": self.fitted,
            "contraction_sha256": hashlib.sha256(contraction.numpy().tobytes()).hexdigest(),
        }

    def n_features(self) -> Dict[Key, int]:
        """Number of properties of each target block: ``n_pairs(o3_lambda) width^2``."""
        return {
            key: len(self.module.properties[self.module.lambdas.index(key[0])])
            for key in self.target_keys
        }

    # ---------------------------------------------------------------- fit ---
    def fit(self, frames: Sequence[ase.Atoms]) -> None:
        """Fit the contraction by an uncentred PCA of the training environments.

        For each centre type ``Z`` and ``l``, ``U[Z, l]`` holds the ``n_channels``
        leading eigenvectors of ``sum_{i of type Z} sum_m rho[i,l,m] rho[i,l,m]^T``
        (sign fixed so that the largest component is positive); a centre type absent
        from ``frames`` gets the PCA of all centres pooled. A no-op with the
        contraction switched off.

        Parameters
        ----------
        frames : sequence of ase.Atoms
            Training structures (Angstrom).
        """
        if self.n_channels is None:
            return
        frames = list(frames)
        self.check_atom_types(frames)
        n_inputs = len(self.atom_types) * self.n_radial
        covariance = torch.zeros(
            len(self.atom_types), self.max_angular + 1, n_inputs, n_inputs, dtype=torch.float64
        )
        identity = _identity(len(self.atom_types), self.max_angular, n_inputs)
        expansion = make_expansion(
            resolve(self.expansion, torch.device("cpu")), self.hypers, self.atom_types, torch.float64
        )
        module = ContractedLambdaSoapModule(
            expansion, self.atom_types, self.max_angular,
            self.n_radial, self.target_keys, identity, torch.float64,
        )
        counts = torch.zeros(len(self.atom_types), dtype=torch.long)
        for start in range(0, len(frames), FIT_BATCH):
            batch = frames[start : start + FIT_BATCH]
            with torch.no_grad():
                density, type_index, _ = module.density(
                    systems_to_torch(batch, dtype=torch.float64)
                )
            for t in range(len(self.atom_types)):
                rows = density[type_index == t]
                counts[t] += len(rows)
                for l in range(self.max_angular + 1):
                    x = rows[:, l * l : (l + 1) * (l + 1), :].reshape(-1, n_inputs)
                    covariance[t, l] += x.T @ x
        for t, count in enumerate(counts.tolist()):
            if count == 0:  # no such centre in training: pooled environments of all types
                covariance[t] = covariance.sum(dim=0)
        leading = torch.linalg.eigh(covariance).eigenvectors.flip(-1)[..., : self.width]
        signs = torch.sign(leading.gather(-2, leading.abs().argmax(-2, keepdim=True)))
        self.load_state({"contraction": leading * signs})

    def state(self) -> Dict[str, torch.Tensor]:
        """``{"contraction": U}``, shape ``(n_types, max_angular + 1, n_types n_radial, width)``."""
        return {"contraction": self._contraction.clone()}

    def load_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore a contraction returned by :meth:`state` (marks it fitted)."""
        if sorted(state) != ["contraction"]:
            raise ValueError(f"contracted descriptor state must hold 'contraction', got {sorted(state)}")
        contraction = state["contraction"]
        if tuple(contraction.shape) != tuple(self.module.contraction.shape):
            raise ValueError(
                f"contraction of shape {tuple(contraction.shape)} does not fit this "
                f"descriptor, which expects {tuple(self.module.contraction.shape)}"
            )
        self._contraction = contraction.detach().to("cpu", torch.float64).clone()
        with torch.no_grad():
            self.module.contraction.copy_(self._contraction)
        self.fitted = True

    def _initial_contraction(self) -> torch.Tensor:
        n_types, n_inputs = len(self.atom_types), len(self.atom_types) * self.n_radial
        if self.n_channels is None:
            return _identity(n_types, self.max_angular, n_inputs)
        generator = torch.Generator().manual_seed(0)
        gaussian = torch.randn(
            n_types, self.max_angular + 1, n_inputs, self.width,
            generator=generator, dtype=torch.float64,
        )
        return torch.linalg.qr(gaussian).Q


def _identity(n_types: int, max_angular: int, n_inputs: int) -> torch.Tensor:
    eye = torch.eye(n_inputs, dtype=torch.float64)
    return eye.expand(n_types, max_angular + 1, n_inputs, n_inputs).clone()


class ContractedLambdaSoapModule(Module):
    """TorchScript-compatible contracted lambda-SOAP: metatomic systems -> TensorMap.

    Parameters
    ----------
    expansion : torch.nn.Module
        ``List[System] -> rho``, the dense expansion of
        :mod:`rholearn.descriptors.expansion`.
    atom_types : list of int
        Sorted atomic numbers; the t-th one is channel block ``t`` of the density.
    max_angular : int
    n_radial : int
    target_keys : list of (o3_lambda, o3_sigma, center_type)
        Only ``o3_sigma = +1`` keys are supported (those of density targets).
    contraction : torch.Tensor
        ``U``, shape ``(n_types, max_angular + 1, n_types n_radial, width)``.
    dtype : torch.dtype

    Notes
    -----
    Output samples are ``system = 0 .. len(systems) - 1``; keys are the target
    keys whose centre type is present.
    """

    def __init__(
        self,
        expansion: torch.nn.Module,
        atom_types: List[int],
        max_angular: int,
        n_radial: int,
        target_keys: List[Key],
        contraction: torch.Tensor,
        dtype: torch.dtype,
    ):
        super().__init__()
        for o3_lambda, o3_sigma, _ in target_keys:
            if o3_sigma != 1:
                raise ValueError(
                    f"target key o3_lambda={o3_lambda}, o3_sigma={o3_sigma}: the "
                    "contracted lambda-SOAP only computes o3_sigma=+1 blocks"
                )
        self.expansion = expansion
        self.atom_types = list(atom_types)
        self.max_angular = max_angular
        self.n_radial = n_radial
        self.width = int(contraction.shape[-1])
        self.register_buffer("contraction", contraction.to(dtype).contiguous())
        type_index = torch.full((max(atom_types) + 1,), -1, dtype=torch.long)
        type_index[torch.tensor(atom_types)] = torch.arange(len(atom_types))
        self.register_buffer("type_index", type_index)
        self.register_buffer(
            "angular_of_m",
            torch.repeat_interleave(
                torch.arange(max_angular + 1), 2 * torch.arange(max_angular + 1) + 1
            ),
        )

        # the output blocks: which lambda, which centre type (index), in key order
        self.lambdas: List[int] = sorted({key[0] for key in target_keys})
        self.key_lambda: List[int] = [self.lambdas.index(key[0]) for key in target_keys]
        self.key_type: List[int] = [self.atom_types.index(key[2]) for key in target_keys]
        self.key_names: List[str] = list(layout.KEY_NAMES)
        self.register_buffer(
            "keys", torch.tensor([list(key) for key in target_keys], dtype=torch.int32)
        )

        # (l_1, l_2) pairs and their Clebsch-Gordan matrices [m_1, (lambda, mu, m_2)]
        coefficients = calculate_cg_coefficients(
            max([max_angular] + self.lambdas), "python-dense", "torch", torch.float64,
            torch.device("cpu"),
        )
        pairs = []  # per (l_1, l_2): l_1, l_2, offset in cg, number of (lambda, mu)
        pair_lambdas = []  # per (l_1, l_2): index in self.lambdas, slot there, index, ...
        properties: List[List[List[int]]] = [[] for _ in self.lambdas]
        matrices = []
        offset = 0
        channels = torch.cartesian_prod(torch.arange(self.width), torch.arange(self.width))
        for l1 in range(max_angular + 1):
            for l2 in range(l1, max_angular + 1):
                lambdas = [
                    i for i, lam in enumerate(self.lambdas)
                    if abs(l1 - l2) <= lam <= l1 + l2 and (l1 + l2 + lam) % 2 == 0
                ]
                if not lambdas:
                    continue
                blocks = []
                slots: List[int] = []
                for i in lambdas:
                    lam = self.lambdas[i]
                    cg = coefficients.block({"l1": l1, "l2": l2, "lambda": lam}).values
                    blocks.append(cg[0, ..., 0])  # [m_1, m_2, mu]; sign (-1)^(l1+l2+lam) = 1
                    slots += [i, len(properties[i])]
                    properties[i].append([l1, l2])
                matrix = torch.cat(blocks, dim=2).permute(0, 2, 1).reshape(2 * l1 + 1, -1)
                matrices.append(matrix.reshape(-1))
                n_mu = sum(2 * self.lambdas[i] + 1 for i in lambdas)
                pairs.append([l1, l2, offset, n_mu])
                pair_lambdas.append(slots)
                offset += matrix.numel()
        self.pairs: List[List[int]] = pairs
        self.pair_lambdas: List[List[int]] = pair_lambdas
        self.n_pairs: List[int] = [len(pairs) for pairs in properties]
        self.register_buffer("cg", torch.cat(matrices).to(dtype))

        property_labels: List[Labels] = []
        for pairs in properties:
            values = [
                torch.cat([torch.tensor([l1, l2]).expand(len(channels), 2), channels], dim=1)
                for l1, l2 in pairs
            ]
            property_labels.append(
                Labels(["l_1", "l_2", "k_1", "k_2"], torch.cat(values).to(torch.int32))
            )
        self.register_buffer("properties", property_labels)
        self.register_buffer(
            "components",
            [
                Labels(layout.COMPONENT_NAME, torch.arange(-lam, lam + 1, dtype=torch.int32).reshape(-1, 1))
                for lam in self.lambdas
            ],
        )

    @torch.jit.export
    def density(self, systems: List[System]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Contracted density ``a`` of every atom, rows ordered by (type, system, atom).

        Returns
        -------
        a : torch.Tensor
            Shape ``(n_atoms, (max_angular + 1)^2, width)``; column ``l^2 + l + m``
            holds ``(l, m)``.
        type_index : torch.Tensor
            Index in ``atom_types`` of each row's atom type, shape ``(n_atoms,)``.
        system_atom : torch.Tensor
            ``(system, atom)`` of each row, shape ``(n_atoms, 2)``, int32.
        """
        device = self.contraction.device
        types = torch.cat([system.types for system in systems]).to(device).to(torch.long)
        n_atoms = len(types)
        known = (types >= 0) & (types < self.type_index.shape[0])
        type_index = torch.where(known, self.type_index[types.clamp(0, self.type_index.shape[0] - 1)], -1)
        if bool((type_index < 0).any()):
            check_system_types(systems, self.atom_types)  # raises, naming the system
        density = self.expansion(systems)  # [atom, (l m), (neighbour type, n)]
        sizes = torch.tensor([len(system) for system in systems], device=device)
        first_atom = torch.cumsum(sizes, 0) - sizes
        order = torch.argsort(type_index * n_atoms + torch.arange(n_atoms, device=device))
        density = density[order]
        type_index = type_index[order]

        # contracted per centre type, all (l, m) in one batched matmul
        per_m = self.contraction[:, self.angular_of_m]  # [types, (l m), inputs, width]
        counts: List[int] = torch.bincount(type_index, minlength=len(self.atom_types)).tolist()
        parts: List[torch.Tensor] = []
        start = 0
        for t, count in enumerate(counts):
            rows = density[start : start + count].transpose(0, 1)  # [(l m), atom, inputs]
            parts.append(torch.bmm(rows, per_m[t]).transpose(0, 1))
            start += count
        density = torch.cat(parts)
        system_atom = torch.stack(
            [
                torch.repeat_interleave(torch.arange(len(systems), device=device), sizes),
                torch.arange(n_atoms, device=device)
                - torch.repeat_interleave(first_atom, sizes),
            ],
            dim=1,
        )
        return density, type_index, system_atom[order].to(torch.int32)

    def forward(self, systems: List[System]) -> TensorMap:
        density, type_index, system_atom = self.density(systems)
        return self.features(density, type_index, system_atom)

    @torch.jit.export
    def features(
        self, density: torch.Tensor, type_index: torch.Tensor, system_atom: torch.Tensor
    ) -> TensorMap:
        """The lambda-SOAP of rows of :meth:`density` (all, or a contiguous range).

        Computing it a range of atoms at a time bounds the memory of large systems:
        the features take ``sum_lambda (2 lambda + 1) n_pairs(lambda) width^2``
        values per atom (13968 with the default hypers, def2-universal-jkfit and
        12 channels).
        """
        n_atoms = density.shape[0]
        k = self.width

        # one matmul and one batched matmul per (l_1, l_2) pair
        # written in place into the output (memory traffic bounds large systems)
        values: List[torch.Tensor] = []
        slots: List[torch.Tensor] = []
        for i, lam in enumerate(self.lambdas):
            values.append(
                torch.empty(
                    n_atoms, 2 * lam + 1, self.n_pairs[i] * k * k,
                    dtype=density.dtype, device=density.device,
                )
            )
            slots.append(values[i].view(n_atoms, 2 * lam + 1, self.n_pairs[i], k * k))
        for pair, lambdas in zip(self.pairs, self.pair_lambdas):
            l1, l2, offset, n_mu = pair[0], pair[1], pair[2], pair[3]
            m1, m2 = 2 * l1 + 1, 2 * l2 + 1
            cg = self.cg[offset : offset + m1 * n_mu * m2].view(m1, n_mu * m2)
            a1 = density[:, l1 * l1 : l1 * l1 + m1, :].transpose(1, 2).reshape(n_atoms * k, m1)
            coupled = torch.matmul(a1, cg).view(n_atoms, k, n_mu, m2).transpose(1, 2)
            coupled = coupled.reshape(n_atoms, n_mu * k, m2)  # [atom, (mu, k_1), m_2]
            product = torch.bmm(coupled, density[:, l2 * l2 : l2 * l2 + m2, :])
            product = product.view(n_atoms, n_mu, k * k)  # [atom, mu, (k_1, k_2)]
            start = 0
            for index in range(0, len(lambdas), 2):
                i, slot = lambdas[index], lambdas[index + 1]
                size = 2 * self.lambdas[i] + 1
                slots[i][:, :, slot].copy_(product[:, start : start + size])
                start += size

        # blocks of the centre types present, samples (system, atom)
        counts: List[int] = torch.bincount(type_index, minlength=len(self.atom_types)).tolist()
        starts = [0]
        for count in counts:
            starts.append(starts[-1] + count)
        samples: List[Labels] = []
        for t in range(len(self.atom_types)):
            samples.append(
                Labels(["system", "atom"], system_atom[starts[t] : starts[t + 1]])
            )
        selected: List[int] = []
        blocks: List[TensorBlock] = []
        for index in range(len(self.key_lambda)):
            i, t = self.key_lambda[index], self.key_type[index]
            if counts[t] == 0:
                continue
            selected.append(index)
            blocks.append(
                TensorBlock(
                    values=values[i][starts[t] : starts[t + 1]],
                    samples=samples[t],
                    components=[self.components[i]],
                    properties=self.properties[i],
                )
            )
        selection = torch.tensor(selected, dtype=torch.long, device=self.keys.device)
        return TensorMap(Labels(self.key_names, self.keys[selection]), blocks)
