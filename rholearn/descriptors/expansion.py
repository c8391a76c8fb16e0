"""The neighbour density expansion as one dense tensor: featomic's, or the same in pure torch.

Both modules map metatomic systems to ``rho[atom, (l, m), (t, n)]``, shape
``(n_atoms, (max_angular + 1)^2, n_types n_radial)``: atoms of all systems in
order, column ``l^2 + l + m`` for ``(l, m)``, and ``t`` the index of the
neighbour type in ``atom_types``. Values are featomic's ``SphericalExpansion``

``rho[i, (l, m), (t, n)] = sum_{j of type t, r_ij < r_c} f_c(r_ij) R_nl(r_ij) Y_lm(r_ij / r_ij)
+ [t = t_i, l = 0] w Y_00 R_n0(0)``

with the cutoff function ``f_c`` (``ShiftedCosine`` or ``Step``), featomic's real
spherical harmonics ``Y_lm`` (no Condon-Shortley phase: ``Y_1m`` is ``y, z, x``),
the centre-atom weight ``w`` and the radial integral ``R_nl`` of a Gaussian
density of ``width`` on the orthonormalised ``Gto`` basis.

- :class:`FeatomicExpansion` runs featomic's compiled calculator; it computes on
  the CPU whatever the device of the systems.
- :class:`TorchExpansion` computes the same values with torch operations only, on
  the device of the systems, with autograd and TorchScript, so a model using it
  runs (and exports) without featomic. It evaluates featomic's own spline of the
  radial integral: the knots (positions, values, derivatives) are built at
  construction with featomic's algorithm (a cubic Hermite spline on 11 points,
  refined by halving until the mean absolute or relative error at the midpoints is
  below ``spline_accuracy``, 1e-8 by default), from the analytic integral
  (``1F1``, the GTO overlap and its inverse square root). Pairs come from the
  system's neighbour list when one with a large enough cutoff is attached
  (:meth:`TorchExpansion.requested_neighbor_lists`, which metatomic engines
  provide to exported models); otherwise from all pairs (and periodic images)
  within the cutoff, found in torch.

Lengths are in Angstrom, as in the hypers.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np
import scipy.special
import torch
from metatomic.torch import NeighborListOptions, System

EXPANSIONS = ["auto", "featomic", "torch"]
"""Choices of the ``expansion`` descriptor option; ``auto`` is ``torch`` on CUDA."""

DEFAULT_SPLINE_ACCURACY = 1e-8
"""featomic's default ``spline_accuracy`` of the radial integral."""

_MAX_SPLINE_POINTS = 10_000


def resolve(expansion: str, device: torch.device) -> str:
    """``"featomic"`` or ``"torch"`` for the ``expansion`` option on ``device``."""
    if expansion not in EXPANSIONS:
        raise ValueError(f"unknown expansion '{expansion}', expected one of {EXPANSIONS}")
    if expansion == "auto":
        return "torch" if device.type == "cuda" else "featomic"
    return expansion


def make_expansion(
    kind: str, hypers: dict, atom_types: List[int], dtype: torch.dtype
) -> torch.nn.Module:
    """The dense expansion module of ``kind``, ``"featomic"`` or ``"torch"`` (see :func:`resolve`)."""
    if kind == "torch":
        return TorchExpansion(hypers, atom_types, dtype)
    return FeatomicExpansion(hypers, atom_types)


class FeatomicExpansion(torch.nn.Module):
    """featomic's ``SphericalExpansion`` rearranged as the dense tensor of this module.

    Parameters
    ----------
    hypers : dict
        featomic ``SphericalExpansion`` hypers with a ``TensorProduct`` basis.
    atom_types : list of int
        Sorted atomic numbers (the neighbour types ``t``).
    """

    def __init__(self, hypers: dict, atom_types: List[int]):
        super().__init__()
        # imported here: a process that uses only TorchExpansion never loads featomic's
        # TorchScript extension, so metatomic does not record it in exported models
        from featomic.torch import SphericalExpansion

        self.calculator = SphericalExpansion(**hypers)
        self.max_angular = int(hypers["basis"]["max_angular"])
        self.n_radial = int(hypers["basis"]["radial"]["max_radial"]) + 1
        self.n_types = len(atom_types)
        type_index = [-1] * (max(atom_types) + 1)
        for index, atom_type in enumerate(atom_types):
            type_index[atom_type] = index
        self.type_index: List[int] = type_index

    def forward(self, systems: List[System]) -> torch.Tensor:
        """``rho``, shape ``(n_atoms, (max_angular + 1)^2, n_types n_radial)``."""
        expansion = self.calculator(systems)
        dtype, device = systems[0].positions.dtype, systems[0].positions.device
        sizes = torch.tensor([len(system) for system in systems], device=device)
        first_atom = torch.cumsum(sizes, 0) - sizes
        n_atoms = int(sizes.sum())
        n_m = (self.max_angular + 1) * (self.max_angular + 1)
        density = torch.zeros(n_atoms, n_m, self.n_types * self.n_radial, dtype=dtype, device=device)
        # the blocks of one (centre type, neighbour type) share their samples: one
        # scatter per pair of types, all l at once
        groups: Dict[int, List[int]] = {}
        keys: List[List[int]] = expansion.keys.values.to(torch.long).tolist()
        for index, key in enumerate(keys):
            group = key[2] * len(self.type_index) + key[3]
            if group not in groups:
                groups[group] = [-1] * (self.max_angular + 1)
            groups[group][key[0]] = index  # block index by l
        blocks = expansion.blocks()
        for group, indices in groups.items():
            if min(indices) < 0:
                raise ValueError("the spherical expansion lacks some o3_lambda blocks")
            t = self.type_index[group % len(self.type_index)]
            samples = blocks[indices[0]].samples.values.to(torch.long).to(device)
            rows = first_atom[samples[:, 0]] + samples[:, 1]
            values = torch.cat([blocks[index].values for index in indices], dim=1)
            columns = density[:, :, t * self.n_radial : (t + 1) * self.n_radial]
            columns.index_add_(0, rows, values.to(device))
        return density


class TorchExpansion(torch.nn.Module):
    """featomic's spherical expansion (Gaussian density, GTO basis) in pure torch.

    Parameters
    ----------
    hypers : dict
        featomic ``SphericalExpansion`` hypers: ``cutoff`` (``radius``, ``smoothing``
        ``ShiftedCosine`` or ``Step``), ``density`` (``Gaussian`` with ``width``,
        optional ``center_atom_weight``; no ``scaling``), ``basis``
        (``TensorProduct``, ``max_angular``, ``radial`` ``Gto`` with ``max_radial``,
        optional ``spline_accuracy``). Other choices raise a ``ValueError``.
    atom_types : list of int
        Sorted atomic numbers (the neighbour types ``t``).
    dtype : torch.dtype
        Of the spline knots (move the module with ``.to(device)``).
    """

    def __init__(self, hypers: dict, atom_types: List[int], dtype: torch.dtype = torch.float64):
        super().__init__()
        cutoff, width, smoothing, weight, max_angular, max_radial, accuracy = _torch_hypers(hypers)
        self.cutoff = cutoff
        self.smoothing_width = smoothing  # 0 for a step
        self.max_angular = max_angular
        self.n_radial = max_radial + 1
        self.n_types = len(atom_types)
        self.atom_types: List[int] = [int(z) for z in atom_types]
        type_index = torch.full((max(atom_types) + 1,), -1, dtype=torch.long)
        type_index[torch.tensor(atom_types)] = torch.arange(len(atom_types))
        self.register_buffer("type_index", type_index)

        # featomic's spline of the radial integral, one per l, padded to a common length
        splines = [
            _hermite_knots(lambda r, l=l: _gto_integral(r, l, cutoff, width, max_radial), cutoff, accuracy)
            for l in range(max_angular + 1)
        ]
        n_knots = max(len(positions) for positions, _, _ in splines)
        positions = np.zeros((max_angular + 1, n_knots))
        values = np.zeros((max_angular + 1, n_knots, self.n_radial))
        derivatives = np.zeros_like(values)
        for l, (x, y, dy) in enumerate(splines):
            positions[l, : len(x)] = x
            positions[l, len(x) :] = cutoff + 1.0 + np.arange(n_knots - len(x))  # never reached
            values[l, : len(x)], derivatives[l, : len(x)] = y, dy
        self.register_buffer("knots", torch.tensor(positions, dtype=torch.float64))
        self.register_buffer("knot_values", torch.tensor(values, dtype=dtype))
        self.register_buffer("knot_derivatives", torch.tensor(derivatives, dtype=dtype))
        self.register_buffer("last_interval", torch.tensor([len(x) - 2 for x, _, _ in splines]))
        # the centre's own density: l = 0, neighbour type = centre type
        self_contribution = weight * values[0, 0] / math.sqrt(4 * math.pi)
        self.register_buffer("self_contribution", torch.tensor(self_contribution, dtype=dtype))
        self.register_buffer(
            "angular_of_m",
            torch.repeat_interleave(torch.arange(max_angular + 1), 2 * torch.arange(max_angular + 1) + 1),
        )
        self.register_buffer("harmonic_norms", torch.tensor(_harmonic_norms(max_angular), dtype=dtype))

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        """A full neighbour list of the cutoff (metatomic engines attach it to systems)."""
        return [NeighborListOptions(cutoff=self.cutoff, full_list=True, strict=False, requestor="rholearn")]

    def forward(self, systems: List[System]) -> torch.Tensor:
        """``rho``, shape ``(n_atoms, (max_angular + 1)^2, n_types n_radial)``; differentiable
        with respect to positions and cells."""
        dtype, device = systems[0].positions.dtype, systems[0].positions.device
        centres: List[torch.Tensor] = []
        neighbours: List[torch.Tensor] = []
        vectors: List[torch.Tensor] = []
        all_types = self._type_indices(systems)
        offset = 0
        for system in systems:
            first, second, shifts = self._pairs(system)
            vectors.append(
                system.positions[second] - system.positions[first] + shifts.to(dtype) @ system.cell
            )
            centres.append(first + offset)
            neighbours.append(second + offset)
            offset += len(system)
        centre = torch.cat(centres)
        neighbour_type = all_types[torch.cat(neighbours)]
        vector = torch.cat(vectors)

        distance = torch.sqrt((vector * vector).sum(dim=1))
        inside = distance < self.cutoff
        centre, neighbour_type = centre[inside], neighbour_type[inside]
        vector, distance = vector[inside], distance[inside]
        # featomic: coincident atoms get the direction +z
        close = distance < 1e-6
        safe = torch.where(close, torch.ones_like(distance), distance)
        direction = torch.where(
            close.unsqueeze(1), torch.tensor([0.0, 0.0, 1.0], dtype=dtype, device=device),
            vector / safe.unsqueeze(1),
        )
        harmonics = _harmonic_polynomials(direction, self.max_angular) * self.harmonic_norms
        radial = self._radial(distance) * self._smoothing(distance).view(1, -1, 1)  # [l, pair, n]
        pair_values = harmonics.unsqueeze(2) * radial[self.angular_of_m].transpose(0, 1)

        # summed into [(centre, neighbour type), (l m), n]
        n_m = (self.max_angular + 1) * (self.max_angular + 1)
        density = torch.zeros(offset * self.n_types, n_m, self.n_radial, dtype=dtype, device=device)
        density.index_add_(0, centre * self.n_types + neighbour_type, pair_values)
        own_rows = torch.arange(offset, device=device) * self.n_types + all_types
        density[:, 0].index_add_(0, own_rows, self.self_contribution.expand(offset, self.n_radial))
        density = density.view(offset, self.n_types, n_m, self.n_radial).transpose(1, 2)
        return density.reshape(offset, n_m, self.n_types * self.n_radial)

    def _type_indices(self, systems: List[System]) -> torch.Tensor:
        """Index in ``atom_types`` of every atom of ``systems``, shape ``(n_atoms,)``.

        Raises
        ------
        ValueError
            Naming the first system (index in ``systems``), atom and atomic number
            outside ``atom_types``.
        """
        types = torch.cat([system.types for system in systems]).to(torch.long)
        size = self.type_index.shape[0]
        known = (types >= 0) & (types < size)
        index = torch.where(known, self.type_index[types.clamp(0, size - 1)], -1)
        if bool((index < 0).any()):
            first = int(torch.nonzero(index < 0)[0, 0])
            start = 0
            for number, system in enumerate(systems):
                if first < start + len(system):
                    raise ValueError(
                        "system " + str(number) + " has atomic number " + str(int(types[first]))
                        + " (atom " + str(first - start) + "), which is not in the atom_types "
                        + str(self.atom_types) + " of the torch spherical expansion"
                    )
                start += len(system)
        return index

    def _pairs(self, system: System) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``first, second, cell_shifts`` (int) of the pairs of ``system``, both directions."""
        for options in system.known_neighbor_lists():
            if options.cutoff >= self.cutoff:
                neighbors = system.get_neighbor_list(options)
                samples = neighbors.samples.values.to(torch.long)
                first, second, shifts = samples[:, 0], samples[:, 1], samples[:, 2:5]
                if not options.full_list:
                    first, second = torch.cat([first, second]), torch.cat([second, first])
                    shifts = torch.cat([shifts, -shifts])
                return first, second, shifts
        return all_pairs(system.positions.detach(), system.cell.detach(), system.pbc, self.cutoff)

    def _radial(self, distance: torch.Tensor) -> torch.Tensor:
        """featomic's splined radial integral, shape ``(max_angular + 1, n_pairs, n_radial)``."""
        n_l = self.max_angular + 1
        x = distance.to(torch.float64).clamp(0.0, self.cutoff).unsqueeze(0).expand(n_l, -1)
        k = torch.searchsorted(self.knots, x.contiguous().detach(), right=True) - 1
        k = torch.minimum(k, self.last_interval.unsqueeze(1)).clamp(min=0)
        x_k = self.knots.gather(1, k)
        delta = self.knots.gather(1, k + 1) - x_k
        t = ((x - x_k) / delta).to(self.knot_values.dtype).unsqueeze(2)
        delta = delta.to(self.knot_values.dtype).unsqueeze(2)
        rows = torch.arange(n_l, device=k.device).unsqueeze(1)
        p_k, p_k1 = self.knot_values[rows, k], self.knot_values[rows, k + 1]
        m_k, m_k1 = self.knot_derivatives[rows, k], self.knot_derivatives[rows, k + 1]
        t2 = t * t
        t3 = t2 * t
        return (
            (2 * t3 - 3 * t2 + 1) * p_k + (t3 - 2 * t2 + t) * delta * m_k
            + (-2 * t3 + 3 * t2) * p_k1 + (t3 - t2) * delta * m_k1
        )

    def _smoothing(self, distance: torch.Tensor) -> torch.Tensor:
        if self.smoothing_width == 0.0:
            return torch.ones_like(distance)
        onset = self.cutoff - self.smoothing_width
        cosine = 0.5 * (1.0 + torch.cos(math.pi * (distance - onset) / self.smoothing_width))
        return torch.where(distance <= onset, torch.ones_like(distance), cosine)


def spherical_harmonics(direction: torch.Tensor, max_angular: int) -> torch.Tensor:
    """featomic's real spherical harmonics of unit vectors, ``(n, (max_angular + 1)^2)``.

    Column ``l^2 + l + m``: ``Y_lm = sqrt(2) N_lm Q_l^|m|(z) Re (x + i y)^m`` for
    ``m > 0``, ``Im`` of it for ``m < 0``, ``N_l0 Q_l^0(z)`` for ``m = 0``, with
    ``P_l^m = sin^m Q_l^m`` the associated Legendre functions without the
    Condon-Shortley phase and ``N_lm`` their normalisation: polynomials in
    ``x, y, z``, smooth everywhere.
    """
    norms = torch.tensor(_harmonic_norms(max_angular), dtype=direction.dtype, device=direction.device)
    return _harmonic_polynomials(direction, max_angular) * norms


def _harmonic_norms(max_angular: int) -> List[float]:
    """``N_lm`` (times ``sqrt(2)`` for ``m != 0``) in the column order of the harmonics."""
    norms = []
    for l in range(max_angular + 1):
        for m in range(-l, l + 1):
            a = abs(m)
            norm = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - a) / math.factorial(l + a))
            norms.append(norm if m == 0 else math.sqrt(2.0) * norm)
    return norms


def _harmonic_polynomials(direction: torch.Tensor, max_angular: int) -> torch.Tensor:
    """``Q_l^|m|(z)`` times ``1``, ``Re (x + i y)^m`` or ``Im (x + i y)^|m|``, ``(n, (L + 1)^2)``."""
    x, y, z = direction[:, 0], direction[:, 1], direction[:, 2]
    real: List[torch.Tensor] = [torch.ones_like(x)]
    imaginary: List[torch.Tensor] = [torch.zeros_like(x)]
    for m in range(1, max_angular + 1):
        real.append(real[m - 1] * x - imaginary[m - 1] * y)
        imaginary.append(real[m - 1] * y + imaginary[m - 1] * x)
    # q[l][m] = Q_l^m(z): from Q_m^m = (2m - 1)!!, a recurrence in l at fixed m
    q: List[List[torch.Tensor]] = []
    for l in range(max_angular + 1):
        row: List[torch.Tensor] = []
        for m in range(l + 1):
            if m == l:
                value = torch.ones_like(z) if l == 0 else (2 * l - 1) * q[l - 1][l - 1]
            elif m == l - 1:
                value = (2 * m + 1) * z * q[l - 1][m]
            else:
                value = ((2 * l - 1) * z * q[l - 1][m] - (l + m - 1) * q[l - 2][m]) / (l - m)
            row.append(value)
        q.append(row)
    columns: List[torch.Tensor] = []
    for l in range(max_angular + 1):
        for m in range(-l, l + 1):
            if m < 0:
                columns.append(q[l][-m] * imaginary[-m])
            else:
                columns.append(q[l][m] * real[m])
    return torch.stack(columns, dim=1)


def all_pairs(
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, cutoff: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ordered pair of atoms (and periodic images) closer than ``cutoff`` Angstrom.

    Returns ``first, second, cell_shifts``, with the pair vector
    ``positions[second] - positions[first] + cell_shifts @ cell``. Quadratic in the
    atom count (one pass per cell shift): the fallback for systems that come without
    a neighbour list; mixed periodic boundaries raise a ``ValueError``.
    """
    n_atoms = positions.shape[0]
    device = positions.device
    offsets = torch.zeros(n_atoms, 3, dtype=torch.long, device=device)
    wrapped = positions
    images = [0, 0, 0]
    if bool(pbc.any()):
        if not bool(pbc.all()):
            raise ValueError(
                "the torch expansion finds neighbours of molecules and fully periodic cells "
                "only: attach a neighbour list to systems with mixed periodic boundaries"
            )
        inverse = torch.linalg.inv(cell)
        offsets = torch.floor(positions @ inverse).to(torch.long) * pbc.to(torch.long)
        wrapped = positions - offsets.to(positions.dtype) @ cell
        for axis in range(3):
            if bool(pbc[axis]):
                images[axis] = int(math.ceil(cutoff * float(torch.linalg.norm(inverse[:, axis]))))
    index = torch.arange(n_atoms, device=device)
    firsts: List[torch.Tensor] = []
    seconds: List[torch.Tensor] = []
    shifts: List[torch.Tensor] = []
    for a in range(-images[0], images[0] + 1):
        for b in range(-images[1], images[1] + 1):
            for c in range(-images[2], images[2] + 1):
                shift = torch.tensor([a, b, c], device=device)
                vector = wrapped.unsqueeze(0) - wrapped.unsqueeze(1) + shift.to(positions.dtype) @ cell
                close = (vector * vector).sum(dim=2) < cutoff * cutoff
                if a == 0 and b == 0 and c == 0:
                    close = close & (index.unsqueeze(0) != index.unsqueeze(1))
                pairs = torch.nonzero(close)
                first, second = pairs[:, 0], pairs[:, 1]
                firsts.append(first)
                seconds.append(second)
                # wrapped[j] - wrapped[i] = positions[j] - positions[i] - (o_j - o_i) @ cell
                shifts.append(shift.unsqueeze(0) - offsets[second] + offsets[first])
    return torch.cat(firsts), torch.cat(seconds), torch.cat(shifts)


# ---------------------------------------- featomic's radial integral, in numpy ---
def _torch_hypers(hypers: dict) -> Tuple[float, float, float, float, int, int, float]:
    """``cutoff, width, smoothing width, centre weight, max_angular, max_radial, accuracy``."""
    cutoff, density, basis = hypers["cutoff"], hypers["density"], hypers["basis"]
    smoothing = cutoff["smoothing"]
    radial = basis.get("radial", {})
    problems = []
    if smoothing.get("type") not in ("ShiftedCosine", "Step"):
        problems.append(f"cutoff smoothing {smoothing.get('type')!r}")
    if density.get("type") != "Gaussian" or density.get("scaling") is not None:
        problems.append(f"density {density!r} (only Gaussian without scaling)")
    if basis.get("type") != "TensorProduct" or radial.get("type") != "Gto":
        problems.append(f"basis {basis.get('type')!r} with radial {radial.get('type')!r}")
    if radial.get("radius", cutoff["radius"]) != cutoff["radius"]:
        problems.append("a GTO radius other than the cutoff")
    accuracy = basis.get("spline_accuracy", DEFAULT_SPLINE_ACCURACY)
    if accuracy is None:
        problems.append("spline_accuracy None (the torch expansion evaluates featomic's spline)")
    if problems:
        raise ValueError(
            "the torch spherical expansion does not support " + "; ".join(problems)
            + ": use expansion='featomic'"
        )
    return (
        float(cutoff["radius"]), float(density["width"]),
        float(smoothing["width"]) if smoothing["type"] == "ShiftedCosine" else 0.0,
        float(density.get("center_atom_weight", 1.0)),
        int(basis["max_angular"]), int(radial["max_radial"]), float(accuracy),
    )


def _gto_integral(r: np.ndarray, l: int, cutoff: float, width: float, max_radial: int):
    """featomic's radial integral of a Gaussian density (``width``) on the orthonormalised
    GTO basis at distances ``r`` ``(k,)``: values and derivatives, each ``(k, max_radial + 1)``."""
    n = np.arange(max_radial + 1)
    sigma = cutoff * np.maximum(np.sqrt(n), 1.0) / (max_radial + 1)
    gto_constant = 1.0 / (2.0 * sigma**2)
    c = 1.0 / (2.0 * width**2)
    global_factor = (np.pi / width**2) ** 0.75
    a, b = 0.5 * (n + l + 3), l + 1.5
    ratio = scipy.special.gamma(a) / scipy.special.gamma(b)
    c_dn = (c + gto_constant) ** (-(0.5 * (n + l) + 1.5))
    r = np.asarray(r, dtype=float)[:, None]
    at_zero = r == 0.0
    safe = np.where(at_zero, 1.0, r)
    c_rij = c * safe
    z = c_rij * c_rij / (c + gto_constant)
    factor = global_factor * np.exp(-safe * c_rij) * c_rij**l
    values = ratio * scipy.special.hyp1f1(a, b, z) * c_dn * factor
    gradients = ratio * a / b * scipy.special.hyp1f1(a + 1, b + 1, z) * c_dn * factor * 2 * z / safe
    gradients = gradients + values * (l / safe - 2 * c_rij)
    # r = 0, where the formula is 0/0: the limits featomic uses
    values = np.where(at_zero, ratio * c_dn * global_factor * (l == 0), values)
    gradient_at_zero = scipy.special.gamma(a) / scipy.special.gamma(2.5) * global_factor * c * c_dn
    gradients = np.where(at_zero, gradient_at_zero * (l == 1), gradients)
    orthonormalization = _gto_orthonormalization(sigma)
    return values @ orthonormalization.T, gradients @ orthonormalization.T


def _gto_orthonormalization(sigma: np.ndarray) -> np.ndarray:
    """``S^-1/2 diag(normalisation)`` of the GTO radial basis of widths ``sigma``."""
    n = np.arange(len(sigma))
    gamma = scipy.special.gamma
    normalization = np.sqrt(2.0 / (sigma ** (2 * n + 3) * gamma(n + 1.5)))
    n1, n2 = np.meshgrid(n, n, indexing="ij")
    s1, s2 = sigma[n1], sigma[n2]
    half = 0.5 * (3.0 + n1 + n2)
    overlap = (
        (0.5 / s1**2 + 0.5 / s2**2) ** (-half) / (s1**n1 * s2**n2) * gamma(half)
        / ((s1 * s2) ** 1.5 * np.sqrt(gamma(n1 + 1.5) * gamma(n2 + 1.5)))
    )
    eigenvalues, eigenvectors = np.linalg.eigh(overlap)
    if eigenvalues.min() <= np.finfo(float).eps:
        raise ValueError(f"radial overlap matrix is singular, try a lower max_radial than {len(n) - 1}")
    inverse_sqrt = (eigenvectors / np.sqrt(eigenvalues)) @ eigenvectors.T
    return inverse_sqrt @ np.diag(normalization)


def _hermite_knots(function, stop: float, accuracy: float):
    """featomic's ``HermitCubicSpline::with_accuracy`` on ``[0, stop]``: knot positions
    ``(k,)``, values and derivatives ``(k, size)`` of ``function(x) -> (values, derivatives)``
    (vectorised over ``x``)."""
    step = stop / 10
    positions = np.array([k * step for k in range(10)] + [stop])
    values, derivatives = function(positions)
    while True:
        middles = (positions[:-1] + positions[1:]) / 2.0
        exact, exact_derivatives = function(middles)
        found = _hermite(
            middles[:, None], positions[:-1, None], positions[1:, None],
            values[:-1], derivatives[:-1], values[1:], derivatives[1:],
        )
        error = np.abs(found - exact)
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.mean(error / np.abs(exact))
        if np.mean(error) < accuracy or relative < accuracy:
            return positions, values, derivatives
        if 2 * len(positions) - 1 > _MAX_SPLINE_POINTS:
            raise ValueError(f"the radial spline did not reach the accuracy {accuracy}")
        positions = _interleave(positions, middles)
        values = _interleave(values, exact)
        derivatives = _interleave(derivatives, exact_derivatives)


def _interleave(knots: np.ndarray, middles: np.ndarray) -> np.ndarray:
    merged = np.empty((len(knots) + len(middles),) + knots.shape[1:])
    merged[0::2], merged[1::2] = knots, middles
    return merged


def _hermite(x, x_k, x_k1, p_k, m_k, p_k1, m_k1):
    """featomic's cubic Hermite interpolation between knots ``k`` and ``k + 1``."""
    delta = x_k1 - x_k
    t = (x - x_k) / delta
    t2 = t * t
    t3 = t2 * t
    return (
        (2.0 * t3 - 3.0 * t2 + 1.0) * p_k + (t3 - 2.0 * t2 + t) * delta * m_k
        + (-2.0 * t3 + 3.0 * t2) * p_k1 + (t3 - t2) * delta * m_k1
    )
