"""Sparse equivariant kernel model (the model family of SALTED), as torch modules.

For a target block ``(lambda, sigma, Z)`` and an atom ``i`` of element ``Z``:

1. the descriptor block ``x_i`` (shape ``(2 lambda + 1, F)``) is divided by its
   Frobenius norm and the invariant descriptor ``x0_i`` (block ``(0, 1, Z)``) by
   its Euclidean norm, so that the invariant kernel ``k0(i, m) = x0_i . x0_m``
   lies in ``[0, 1]`` (a power-spectrum scalar product is a rotation average
   of a squared overlap, hence ``>= 0``) and every atom weighs the same;
2. against ``M`` reference environments ``m`` of element ``Z`` (chosen by
   farthest-point sampling on ``x0`` of the training atoms,
   :func:`farthest_point_sampling`, as many per element as
   :func:`reference_counts` gives within the weight budget), the lambda-kernel is the
   ``(2 lambda + 1) x (2 lambda + 1)`` matrix
   ``k(i, m) = (x_i x_m^T) k0(i, m)^(zeta - 1)``, equivariant in ``i``'s
   index and nonlinear in the structure for ``zeta > 1``;
3. the kernel row of atom ``i``, ``(2 lambda + 1, M (2 lambda + 1))``, is
   multiplied by ``K_MM^{-1/2}`` (eigenvectors of the references' kernel matrix
   over the square roots of their eigenvalues, those below ``eigen_cutoff``
   times the largest dropped): the features of the subset-of-regressors /
   projected-process approximation (Grisafi et al., ACS Cent. Sci. 5, 57
   (2019); Lewis et al., JCTC 17, 7203 (2021)), on which a linear map to the
   radial channels (:class:`~rholearn.models.LinearModel`, bias on invariant
   blocks only) is the sparse GPR mean.

Each block stores the references actually chosen (fewer than ``M`` when the
training set has fewer atoms of that element) and the ``n_active`` columns of
``K_MM^{-1/2}`` that are kept, so a saved model holds what it uses; loading a
state resizes these buffers to the stored ones (files that stored ``M`` padded
references load too). The features keep the fixed width ``M (2 lambda + 1)``,
zero beyond ``n_active``, so the linear head has the same shape before and
after fitting.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from .linear import LinearModel, key_labels

Key = Tuple[int, int, int]


def farthest_point_sampling(points: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of ``n`` rows of ``points`` (shape ``(rows, features)``) picked greedily,
    each the farthest (Euclidean) from those already picked, starting from row 0."""
    return farthest_point_order(points, n)[0]


def farthest_point_order(points: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`farthest_point_sampling` with each pick's squared distance to the rows
    picked before it (shape ``(n,)``, nonincreasing; infinity for row 0): how far the
    ``k``-th pick's environment was from everything the first ``k - 1`` cover."""
    n = min(int(n), len(points))
    selected = torch.zeros(n, dtype=torch.int64)
    gaps = torch.full((n,), float("inf"), dtype=points.dtype)
    if n == 0:
        return selected, gaps
    distances = ((points - points[0]) ** 2).sum(dim=1)
    for k in range(1, n):
        selected[k] = torch.argmax(distances)
        gaps[k] = distances[selected[k]]
        distances = torch.minimum(distances, ((points - points[selected[k]]) ** 2).sum(dim=1))
    return selected, gaps


def _normalised(values: torch.Tensor) -> torch.Tensor:
    """``values`` (atoms, ...) divided by each atom's Frobenius norm (zero rows stay zero)."""
    norms = (values.reshape(len(values), -1) ** 2).sum(dim=1).sqrt()
    shape = [len(values)] + [1] * (values.dim() - 1)
    return values / norms.clamp(min=1e-300).reshape(shape)


class _BlockKernel(torch.nn.Module):
    """References and projection of one ``(lambda, sigma, Z)`` block.

    Buffers (empty before fitting): ``references`` ``(R, 2 lambda + 1, F)``,
    ``reference_invariants`` ``(R, F0)`` and ``projection`` ``(R (2 lambda + 1),
    n_active)`` for the ``R <= M`` references used; ``n_active`` features.
    """

    def __init__(self, o3_lambda: int, n_references: int, n_features: int,
                 n_invariant: int, dtype: torch.dtype):
        super().__init__()
        width = 2 * o3_lambda + 1
        self.out_width = n_references * width
        self.register_buffer("references", torch.zeros(0, width, n_features, dtype=dtype))
        self.register_buffer("reference_invariants", torch.zeros(0, n_invariant, dtype=dtype))
        self.register_buffer("projection", torch.zeros(0, 0, dtype=dtype))
        self.register_buffer("n_active", torch.zeros((), dtype=torch.int64))

    def forward(self, values: torch.Tensor, invariants: torch.Tensor, zeta: float) -> torch.Tensor:
        """Features ``(atoms, 2 lambda + 1, M (2 lambda + 1))`` of descriptor rows
        ``values`` ``(atoms, 2 lambda + 1, F)`` with invariants ``(atoms, F0)``."""
        k0 = _normalised(invariants) @ self.reference_invariants.T  # (atoms, R)
        atoms, width, n_features = values.shape
        n_references = self.references.shape[0]
        references = self.references.reshape(n_references * width, n_features)
        kernel = (_normalised(values).reshape(atoms * width, n_features) @ references.T).reshape(
            atoms, width, n_references, width
        )  # (atoms, 2 lambda + 1, R, 2 lambda + 1)
        if zeta != 1.0:
            kernel = kernel * k0.clamp(min=0.0).pow(zeta - 1.0)[:, None, :, None]
        n_active = int(self.n_active)  # features beyond are zero
        features = kernel.new_zeros(atoms, width, self.out_width)
        features[:, :, :n_active] = (
            kernel.reshape(atoms, width, n_references * width) @ self.projection[:, :n_active]
        )
        return features

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Take the stored number of references and active features (buffer shapes)."""
        for name in ("references", "reference_invariants", "projection"):
            stored = state_dict.get(prefix + name)
            if stored is not None and stored.shape != getattr(self, name).shape:
                current = getattr(self, name)
                setattr(self, name, current.new_zeros(stored.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class KernelFeatures(torch.nn.Module):
    """Equivariant sparse-kernel features: descriptor TensorMap -> features TensorMap.

    Parameters
    ----------
    keys : sequence of (o3_lambda, o3_sigma, center_type)
        Blocks; every center type needs its invariant key ``(0, 1, Z)``.
    in_features : sequence of int
        Descriptor properties of each block.
    n_references : int
        References ``M`` per element (fewer if the training set has fewer atoms).
    zeta : float
        Exponent of the invariant kernel (``zeta - 1`` multiplies the lambda-kernel).
    eigen_cutoff : float
        Eigenvalues of ``K_MM`` below ``eigen_cutoff`` times the largest are dropped.
    dtype : torch.dtype
    device : torch.device or str, optional

    Notes
    -----
    ``forward`` returns, for each descriptor block present, a block with the same
    samples and components and ``M (2 lambda + 1)`` properties ``kernel_feature``,
    of which the first ``n_active`` are nonzero. Before :meth:`fit` every feature is zero.
    """

    def __init__(
        self,
        keys: Sequence[Key],
        in_features: Sequence[int],
        n_references: int = 100,
        zeta: float = 2.0,
        eigen_cutoff: float = 1e-12,
        dtype: torch.dtype = torch.float64,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        self.keys: List[Key] = [tuple(int(x) for x in key) for key in keys]
        if int(n_references) < 1:
            raise ValueError(f"n_references must be >= 1, got {n_references}")
        invariant = {z: n for (l, s, z), n in zip(self.keys, in_features) if (l, s) == (0, 1)}
        missing = sorted({z for _, _, z in self.keys} - set(invariant))
        if missing:
            raise ValueError(
                "the kernel model needs the invariant (o3_lambda=0, o3_sigma=1) descriptor "
                f"block of every center type, missing for center_type {missing}"
            )
        self.n_references = int(n_references)
        self.zeta = float(zeta)
        self.eigen_cutoff = float(eigen_cutoff)
        self.in_keys = key_labels(self.keys)
        self.invariant_selections: List[Dict[str, int]] = [
            {"o3_lambda": 0, "o3_sigma": 1, "center_type": z} for _, _, z in self.keys
        ]
        self.blocks = torch.nn.ModuleList(
            [
                _BlockKernel(l, self.n_references, int(n), invariant[z], dtype)
                for (l, _, z), n in zip(self.keys, in_features)
            ]
        )
        self.out_features: List[int] = [self.n_references * (2 * l + 1) for l, _, _ in self.keys]
        self.to(device)

    def forward(self, descriptor: TensorMap) -> TensorMap:
        """Kernel features of the blocks of ``descriptor`` (a subset of ``keys``)."""
        keys: List[List[int]] = []
        blocks: List[TensorBlock] = []
        for index, module in enumerate(self.blocks):
            position = descriptor.keys.position(self.in_keys.entry(index))
            if position is not None:  # (no `continue`: TorchScript unrolls this loop)
                block = descriptor.block(position)
                invariants = descriptor.block(self.invariant_selections[index]).values
                if invariants.shape[0] != block.values.shape[0]:
                    raise ValueError(
                        "invariant and covariant descriptor blocks hold different atoms"
                    )
                values = module(
                    block.values, invariants.reshape(invariants.shape[0], -1), self.zeta
                )
                properties = Labels(
                    ["kernel_feature"],
                    torch.arange(values.shape[-1], dtype=torch.int32, device=values.device).reshape(-1, 1),
                )
                blocks.append(TensorBlock(values, block.samples, block.components, properties))
                key: List[int] = self.in_keys.entry(index).values.to(torch.int64).tolist()
                keys.append(key)
        return TensorMap(
            Labels(self.in_keys.names, torch.tensor(keys, dtype=torch.int32).reshape(-1, 3)).to(
                descriptor.device
            ),
            blocks,
        )

    @torch.no_grad()
    def fit(self, descriptor: TensorMap, selected: Optional[Dict[int, torch.Tensor]] = None) -> Dict[Key, int]:
        """Pick references among the atoms of ``descriptor`` (the training set) and
        build ``K_MM^{-1/2}``; returns the number of active features per block.

        References are chosen per element by farthest-point sampling
        (``n_references``) on the normalised invariant descriptor; every block of that
        element uses the same references (as SALTED does). ``selected`` (atomic number
        -> rows of its invariant block, e.g. the first picks of
        :func:`farthest_point_order`) gives an element's references instead.
        """
        selected = dict(selected or {})
        active: Dict[Key, int] = {}
        for key, module, selection in zip(self.keys, self.blocks, self.invariant_selections):
            z = key[2]
            try:
                invariant = descriptor.block(selection)
                block = descriptor.block({"o3_lambda": key[0], "o3_sigma": key[1], "center_type": z})
            except (ValueError, IndexError, RuntimeError):
                continue  # element or block absent from the training set: features stay zero
            if block.samples != invariant.samples:
                raise ValueError(f"descriptor block {key} and its invariant block hold different atoms")
            x0 = _normalised(invariant.values.reshape(len(invariant.values), -1))
            if z not in selected:
                selected[z] = farthest_point_sampling(x0.cpu(), self.n_references)
            rows = selected[z].to(x0.device)
            references = _normalised(block.values)[rows]
            module.references = references.contiguous()
            module.reference_invariants = x0[rows].contiguous()
            k0 = x0[rows] @ x0[rows].T
            kernel = torch.einsum("aif,bjf->aibj", references, references)
            if self.zeta != 1.0:
                kernel = kernel * k0.clamp(min=0.0).pow(self.zeta - 1.0)[:, None, :, None]
            size = kernel.shape[0] * kernel.shape[1]
            eigenvalues, eigenvectors = torch.linalg.eigh(kernel.reshape(size, size))
            keep = eigenvalues > self.eigen_cutoff * eigenvalues.max().clamp(min=1e-300)
            keep = keep.flip(0)  # largest first
            eigenvalues, eigenvectors = eigenvalues.flip(0)[keep], eigenvectors.flip(1)[:, keep]
            module.projection = (eigenvectors / eigenvalues.sqrt()).contiguous()
            module.n_active.fill_(len(eigenvalues))
            active[key] = len(eigenvalues)
        return active

    def references_per_element(self) -> Dict[int, int]:
        """Atomic number -> references chosen by :meth:`fit` (0 before it)."""
        return {z: int(module.references.shape[0]) for (_, _, z), module in zip(self.keys, self.blocks)}

    def active_features(self) -> List[int]:
        """Number of leading nonzero features of each block (0 before :meth:`fit`)."""
        return [int(module.n_active) for module in self.blocks]


def reference_counts(gaps: Dict[int, torch.Tensor], weights_per_reference: Dict[int, int],
                     max_weights: Optional[int]) -> Dict[int, int]:
    """References per element that cover every element's environments to one common
    resolution, within a budget of weights.

    Parameters
    ----------
    gaps : dict
        Atomic number -> the squared distances of its farthest-point picks to the picks
        before them (:func:`farthest_point_order`; nonincreasing, the first infinite).
    weights_per_reference : dict
        Atomic number -> weights of the linear map that one reference adds.
    max_weights : int, optional
        Budget of weights; ``None``: every pick is taken.

    Returns
    -------
    dict
        Atomic number -> references: every element keeps its first pick, then the picks
        of all elements are taken by decreasing gap while their weights fit, so an
        element whose environments are far apart gets more references than one whose
        atoms are all alike.
    """
    counts = {z: min(1, len(g)) for z, g in gaps.items()}
    used = sum(counts[z] * weights_per_reference.get(z, 0) for z in counts)
    picks = sorted(((float(g[k]), z) for z, g in gaps.items() for k in range(1, len(g))), reverse=True)
    for _, z in picks:
        cost = weights_per_reference.get(z, 0)
        if max_weights is not None and used + cost > max_weights:
            break
        counts[z] += 1
        used += cost
    return counts


class KernelModel(torch.nn.Module):
    """Sparse equivariant kernel regression: :class:`KernelFeatures` then a linear map.

    Parameters
    ----------
    keys, in_features, out_features
        As for :class:`~rholearn.models.LinearModel`.
    n_references, zeta, eigen_cutoff
        See :class:`KernelFeatures`.
    max_weights : int, optional
        Budget of weights of the linear map. When ``n_references`` per element (or
        all its training atoms, if fewer) would give more, the references are chosen
        from the data (:func:`reference_counts`): the farthest-point picks of all
        elements are taken by decreasing distance to the picks before them, so every
        element's environments are covered to one common resolution and an element
        with varied environments gets more references than one whose atoms are alike.
        A reference of element ``Z`` costs ``sum_l (2 l + 1) n_radial(Z, l)`` weights
        (def2-universal-jkfit: 18 for H, 75-77 for C, N, O). The default keeps the
        dense normal matrix within 0.8 GB and a fit of 100 distorted methanols near
        two minutes on one core. ``None``: no budget.
    seed : int
        Seed of the linear map's initialisation (the direct solve overwrites it).
    dtype : torch.dtype
    device : torch.device or str, optional

    Notes
    -----
    Call :meth:`fit_references` on the training descriptors before training or
    solving (:func:`rholearn.solve.solve_linear`); the model is linear in its
    weights, so the direct solve gives the regularised optimum in one step.
    """

    def __init__(
        self,
        keys: Sequence[Key],
        in_features: Sequence[int],
        out_features: Sequence[int],
        n_references: int = 100,
        zeta: float = 2.0,
        eigen_cutoff: float = 1e-12,
        max_weights: Optional[int] = 10000,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        if max_weights is not None and int(max_weights) < 1:
            raise ValueError(f"max_weights must be a positive integer or None, got {max_weights}")
        self.max_weights = None if max_weights is None else int(max_weights)
        self.weights_per_reference: Dict[int, int] = {}
        for (l, _, z), n_out in zip(keys, out_features):
            z = int(z)
            self.weights_per_reference[z] = self.weights_per_reference.get(z, 0) + (2 * int(l) + 1) * int(n_out)
        self.features = KernelFeatures(
            keys, in_features, n_references, zeta, eigen_cutoff, dtype, device
        )
        self.head = LinearModel(keys, self.features.out_features, out_features, seed, dtype, device)

    def forward(self, descriptor: TensorMap) -> TensorMap:
        """Coefficients (without baseline) from a descriptor TensorMap."""
        return self.head(self.features(descriptor))

    def fit_references(self, descriptor: TensorMap) -> Dict[Key, int]:
        """See :meth:`KernelFeatures.fit`; the references per element are chosen within
        ``max_weights`` by :func:`reference_counts`."""
        orders = {  # (picks, their gaps) per element, on its invariant block
            int(z): farthest_point_order(_normalised(block.values.reshape(len(block.values), -1)).cpu(),
                                         self.features.n_references)
            for (l, sigma, z), block in zip(descriptor.keys.values.tolist(), descriptor.blocks())
            if (l, sigma) == (0, 1)
        }
        counts = reference_counts({z: gaps for z, (_, gaps) in orders.items()},
                                  self.weights_per_reference, self.max_weights)
        return self.features.fit(descriptor, {z: picks[:counts[z]] for z, (picks, _) in orders.items()})

    def active_features(self) -> List[int]:
        """See :meth:`KernelFeatures.active_features`."""
        return self.features.active_features()
