"""Direct solve in the overlap metric for networks linear in their weights.

A net whose output block ``k = (lambda, sigma, Z)`` is ``Phi_i W_k (+ b_k if
lambda = 0)`` for per-atom features ``Phi_i`` of shape ``(2 lambda + 1, F_k)``
(the :class:`~rholearn.models.LinearModel`: ``Phi`` is the descriptor; the
:class:`~rholearn.models.KernelModel`: its kernel features) predicts
``c = c_base + A theta``, linear in all weights ``theta``. The overlap loss
plus a ridge penalty,

    sum_structures (A theta - y)^T S (A theta - y) + alpha |theta|^2,
    y = c_ref - c_base,

is minimised by the normal equations ``(H + alpha I) theta = g`` with
``H = sum A^T S A`` and ``g = sum A^T S y``.

Assembly uses the block structure: the weights ``theta_k`` (shape
``(F_k (+1 for the bias), n_k)``) of block ``k`` only touch the coefficients of
that block, and the same ``Phi_i`` acts on every radial channel, so for one
overlap block ``(lambda_1, lambda_2, Z_1, Z_2)`` with atom pairs ``p = (i, j)``

    H[k_1, k_2][f n, g n'] += sum_p sum_{m m'} Phi_i[m, f] S_p[m n, m' n'] Phi_j[m', g]

costs ``F_1 F_2 n_1 n_2 (2 lambda_2 + 1)`` per pair instead of the
``(rows of A) * P^2`` of forming ``A`` (P weights) explicitly. The overlap
blocks are read as stored (sparse atom pairs); ``g`` uses
:func:`rholearn.overlap.overlap_matvec`.

Solvers: ``"cholesky"`` stores ``H`` (``P^2`` numbers) and factorises
``H + alpha I`` once per regularisation strength; ``"cg"`` never forms ``H``
and runs (Jacobi-preconditioned) conjugate gradients with matrix-free
products ``H v`` through the sparse overlaps, for nets with many weights
(the linear model on large descriptors). ``"auto"`` picks Cholesky up to
``max_dense`` weights.

``alpha = regularisation * trace(H) / P`` (the regularisation is relative to
the mean diagonal of ``H``, so one value suits any data scale). With
validation structures, every value of ``regularisation`` (a grid) is tried and
the lowest validation overlap loss wins; the grid and its losses are returned
(and written to ``solve.json`` by :func:`rholearn.workflow.fit`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from metatensor.torch import TensorBlock, TensorMap

from .metrics import subtract_baseline
from .overlap import _BITS, SparseOverlap, _lookup, _row_ids, align_samples

SOLVERS = ("auto", "cholesky", "cg")


@dataclasses.dataclass
class SolveOptions:
    """How to solve the regularised normal equations.

    Parameters
    ----------
    regularisation : float or sequence of float
        Relative ridge strength(s) (see the module docstring). With several
        values and validation structures, the one with the lowest validation
        loss is kept; without validation structures the first value is used.
        The default grid stops at 1e-8: on distorted waters (kernel model,
        N = 100) 1e-10 lowered the loss of 10 validation structures by a
        quarter but doubled the test error (1.36 % against 0.69 % RMSE); on g2
        molecules (unseen test molecules, N = 10) validation picks 1e-4 to 1e-2.
    solver : {"auto", "cholesky", "cg"}
        Dense Cholesky of the stored normal matrix, or matrix-free conjugate
        gradients; ``"auto"``: Cholesky up to ``max_dense`` weights.
    max_dense : int
        Largest number of weights for which ``"auto"`` stores the normal matrix
        (``max_dense^2`` float64 numbers: 10000 -> 0.8 GB).
    cg_tolerance : float
        Conjugate gradients stop when the residual norm falls below this
        fraction of ``|g|``.
    cg_max_iterations : int
    batch_size : int
        Structures per assembly chunk (bounds the memory of the features).
    """

    regularisation: Union[float, Sequence[float]] = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    solver: str = "auto"
    max_dense: int = 10000
    cg_tolerance: float = 1e-8
    cg_max_iterations: int = 2000
    batch_size: int = 32

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got '{self.solver}'")
        grid = self.grid()
        if not grid or any(not (math.isfinite(x) and x >= 0) for x in grid):
            raise ValueError(f"regularisation must be finite and >= 0, got {self.regularisation}")

    def grid(self) -> List[float]:
        """The regularisation strengths, as a list."""
        values = self.regularisation
        return [float(values)] if isinstance(values, (int, float)) else [float(x) for x in values]


class _Block(NamedTuple):
    """Where the weights of one head block sit in ``theta``."""

    key: Tuple[int, int, int]
    module: torch.nn.Linear  # the head's layer of this key
    n_features: int  # active features F (weights beyond are zero)
    bias: bool
    n_out: int
    offset: int

    @property
    def rows(self) -> int:
        return self.n_features + int(self.bias)

    @property
    def size(self) -> int:
        return self.rows * self.n_out


class _Chunk(NamedTuple):
    """The training data of a few structures, ready for products with ``theta``."""

    features: Dict[Tuple[int, int, int], torch.Tensor]  # key -> (atoms, 2l+1, rows)
    overlap: TensorMap
    sparse: SparseOverlap
    target: TensorMap  # y = c_ref - c_base, in the prediction's keys and sample order
    target_norm: float  # y^T S y summed over the chunk's structures
    n_structures: int


def linear_parts(net: torch.nn.Module) -> Tuple[Callable[[TensorMap], TensorMap], torch.nn.Module, List[int]]:
    """``(features, head, active)`` of a net linear in its weights.

    ``features(descriptor)`` gives the per-atom features ``Phi``, ``head`` is the
    :class:`metatensor.torch.learn.nn.EquivariantLinear` on them and ``active[i]``
    the number of leading nonzero features of the head's block ``i``. Nets with
    ``features``, ``head`` and ``active_features()`` (the kernel model) and
    ``EquivariantLinear`` nets themselves (the linear model) qualify.
    """
    from metatensor.torch.learn.nn import EquivariantLinear

    if isinstance(net, EquivariantLinear):
        modules = net.module_map.module_list
        return (lambda descriptor: descriptor), net, [m.in_features for m in modules]
    if hasattr(net, "features") and hasattr(net, "head") and hasattr(net, "active_features"):
        return net.features, net.head, list(net.active_features())
    raise TypeError(
        f"{type(net).__name__} is not linear in its weights (it has no features/head): "
        "train it with gradients instead"
    )


def solve_linear(
    model: torch.nn.Module,
    train_batches: Iterable,
    val_batches: Optional[Iterable] = None,
    options: SolveOptions = SolveOptions(),
) -> Dict[str, object]:
    """Set the weights of ``model.net`` to the regularised overlap-loss optimum.

    Parameters
    ----------
    model : DensityModel
        Its ``net`` must be linear in its weights (:func:`linear_parts`); its
        baseline is subtracted from the targets. The kernel model's references
        must already be fitted.
    train_batches, val_batches : iterable of batches
        Collated batches (e.g. :func:`rholearn.data.make_dataloader` of a
        :func:`rholearn.data.make_dataset` with targets ``coefficients`` and
        ``overlap``), with fields ``descriptor``, ``coefficients``, ``overlap``.
    options : SolveOptions

    Returns
    -------
    dict
        ``solver``, ``n_weights``, ``regularisation`` (the chosen relative
        strength), ``alpha`` (absolute), ``grid`` (per strength: training and
        validation loss per structure), ``seconds`` (``features``,
        ``assembly``, ``solve``) and, for CG, ``cg_iterations``.
    """
    features, head, active = linear_parts(model.net)
    blocks = _blocks(head, active)
    n_weights = sum(block.size for block in blocks)
    solver = options.solver
    if solver == "auto":
        solver = "cholesky" if n_weights <= options.max_dense else "cg"
    seconds = {"features": 0.0, "assembly": 0.0, "solve": 0.0}
    with torch.no_grad():
        start = time.perf_counter()
        train = [_chunk(model, features, head, blocks, batch) for batch in train_batches]
        val = [_chunk(model, features, head, blocks, batch) for batch in (val_batches or [])]
        seconds["features"] = time.perf_counter() - start
        if not train:
            raise ValueError("no training structures to solve for")
        dtype = train[0].target.block(0).values.dtype
        device = train[0].target.block(0).values.device
        start = time.perf_counter()
        rhs = torch.zeros(n_weights, dtype=dtype, device=device)
        for chunk in train:
            rhs += _transpose_product(chunk, chunk.sparse.matvec(chunk.target), blocks, n_weights)
        if solver == "cholesky":
            normal = torch.zeros(n_weights, n_weights, dtype=dtype, device=device)
            for chunk in train:
                _add_normal_matrix(normal, chunk, blocks)
            diagonal = normal.diagonal().clone()
        else:
            normal = None
            diagonal = torch.zeros(n_weights, dtype=dtype, device=device)
            for chunk in train:
                _add_normal_diagonal(diagonal, chunk, blocks)
        seconds["assembly"] = time.perf_counter() - start

        scale = float(diagonal.mean()) if n_weights else 1.0
        grid = options.grid() if val else options.grid()[:1]
        n_train = sum(chunk.n_structures for chunk in train)
        target_norm = sum(chunk.target_norm for chunk in train)
        n_val = sum(chunk.n_structures for chunk in val)
        start = time.perf_counter()
        rows, best, iterations = [], None, 0
        theta = torch.zeros(n_weights, dtype=dtype, device=device)
        for regularisation in sorted(grid, reverse=True):  # CG warm-starts from stronger
            alpha = regularisation * scale
            if solver == "cholesky":
                theta = _cholesky_solve(normal, alpha, rhs)
            else:
                theta, used = _conjugate_gradients(
                    train, blocks, alpha, rhs, diagonal + alpha, theta, options
                )
                iterations += used
            if normal is not None:  # theta^T H theta - 2 theta^T g + y^T S y
                train_loss = float(theta @ (normal @ theta) - 2 * theta @ rhs) + target_norm
            else:
                train_loss = _loss(train, blocks, theta)
            row = {
                "regularisation": regularisation,
                "alpha": alpha,
                "train_loss": train_loss / n_train,
                "val_loss": _loss(val, blocks, theta) / n_val if val else math.nan,
            }
            rows.append(row)
            monitored = row["val_loss"] if val else row["train_loss"]
            if best is None or monitored < best[0]:
                best = (monitored, row, theta.clone())
        seconds["solve"] = time.perf_counter() - start
        _write_weights(blocks, best[2])
    record = {
        "solver": solver,
        "n_weights": n_weights,
        "n_train": n_train,
        "n_val": n_val,
        "regularisation": best[1]["regularisation"],
        "alpha": best[1]["alpha"],
        "grid": sorted(rows, key=lambda row: row["regularisation"]),
        "seconds": seconds,
    }
    if solver == "cg":
        record["cg_iterations"] = iterations
    return record


# ---------------------------------------------------------------- layout ---
def _blocks(head: torch.nn.Module, active: List[int]) -> List[_Block]:
    keys = head.module_map.in_keys.values.tolist()
    blocks, offset = [], 0
    for key, module, n_active in zip(keys, head.module_map.module_list, active):
        block = _Block(tuple(key), module, int(n_active), module.bias is not None,
                       module.out_features, offset)
        blocks.append(block)
        offset += block.size
    return blocks


def _chunk(model, features, head, blocks: List[_Block], batch) -> _Chunk:
    """Features (active columns, plus a column of ones for a bias) and targets of a batch."""
    phi = features(batch.descriptor)
    layout = head(phi)  # keys and samples of the prediction
    present = {tuple(key): index for index, key in enumerate(phi.keys.values.tolist())}
    per_key = {}
    for block in blocks:
        if block.key not in present:
            continue
        values = phi.block(present[block.key]).values[..., : block.n_features]
        if block.bias:
            values = torch.cat([values, torch.ones_like(values[..., :1])], dim=-1)
        per_key[block.key] = values
    target = subtract_baseline(
        align_samples(batch.coefficients, layout, "target coefficients"), model.baseline.means
    )
    sparse = SparseOverlap(batch.overlap, target)
    return _Chunk(
        features=per_key,
        overlap=batch.overlap,
        sparse=sparse,
        target=target,
        target_norm=float(sparse.quadratic(target).sum()),
        n_structures=len(sparse.systems),
    )


# ------------------------------------------------------------- products ---
def _apply(chunk: _Chunk, blocks: List[_Block], theta: torch.Tensor) -> TensorMap:
    """``A theta`` in the chunk's layout."""
    by_key = {block.key: block for block in blocks}
    values = []
    for key, block in zip(chunk.target.keys.values.tolist(), chunk.target.blocks()):
        spec = by_key[tuple(key)]
        weights = theta[spec.offset : spec.offset + spec.size].reshape(spec.rows, spec.n_out)
        values.append(chunk.features[spec.key] @ weights)
    return TensorMap(
        chunk.target.keys,
        [TensorBlock(v, b.samples, b.components, b.properties) for v, b in zip(values, chunk.target.blocks())],
    )


def _transpose_product(chunk: _Chunk, tensor: TensorMap, blocks: List[_Block], size: int) -> torch.Tensor:
    """``A^T t`` for ``t`` in the chunk's layout: ``sum_i Phi_i^T t_i`` per block."""
    out = torch.zeros(size, dtype=tensor.block(0).values.dtype, device=tensor.block(0).values.device)
    by_key = {block.key: block for block in blocks}
    for key, block in zip(tensor.keys.values.tolist(), tensor.blocks()):
        spec = by_key[tuple(key)]
        product = torch.einsum("amf,amn->fn", chunk.features[spec.key], block.values)
        out[spec.offset : spec.offset + spec.size] += product.reshape(-1)
    return out


def _loss(chunks: List[_Chunk], blocks: List[_Block], theta: torch.Tensor) -> float:
    """``sum (A theta - y)^T S (A theta - y)`` over the chunks' structures."""
    total = 0.0
    for chunk in chunks:
        prediction = _apply(chunk, blocks, theta)
        cross = chunk.sparse.bilinear(prediction, chunk.target).sum()
        total += float(chunk.sparse.quadratic(prediction).sum() - 2 * cross) + chunk.target_norm
    return total


def _overlap_pairs(chunk: _Chunk, blocks: List[_Block]):
    """For each overlap block with features on both sides: the two block specs, the
    feature rows of each pair's atoms and the values ``(pairs, m_1, m_2, n_1, n_2)``."""
    by_key = {block.key: block for block in blocks}
    rows = {key: _row_index(chunk.target, key) for key in chunk.features}
    for (l_1, l_2, z_1, z_2), block in zip(chunk.overlap.keys.values.tolist(), chunk.overlap.blocks()):
        key_1, key_2 = (l_1, 1, z_1), (l_2, 1, z_2)
        if key_1 not in chunk.features or key_2 not in chunk.features or len(block.samples) == 0:
            continue
        samples = block.samples.values.to(torch.int64)
        rows_1 = rows[key_1](samples[:, 0], samples[:, 1])
        rows_2 = rows[key_2](samples[:, 0], samples[:, 2])
        spec_1, spec_2 = by_key[key_1], by_key[key_2]
        values = block.values.reshape(len(samples), 2 * l_1 + 1, 2 * l_2 + 1, spec_1.n_out, spec_2.n_out)
        yield spec_1, spec_2, rows_1, rows_2, values


def _row_index(layout: TensorMap, key) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(system, atom) -> row`` of block ``key`` of ``layout``."""
    samples = layout.block({"o3_lambda": key[0], "o3_sigma": key[1], "center_type": key[2]}).samples
    sorted_ids, order = torch.sort(_row_ids(samples))

    def lookup(system: torch.Tensor, atom: torch.Tensor) -> torch.Tensor:
        index, found = _lookup(sorted_ids, (system << _BITS) | atom)
        if not bool(found.all()):
            raise KeyError(f"overlap pairs of atoms without coefficients in block {key}")
        return order[index]

    return lookup


def _add_normal_matrix(normal: torch.Tensor, chunk: _Chunk, blocks: List[_Block], pairs_per_step: int = 512) -> None:
    """``normal += A^T S A`` of the chunk, one overlap block at a time (see the module docstring)."""
    for spec_1, spec_2, rows_1, rows_2, values in _overlap_pairs(chunk, blocks):
        phi_1, phi_2 = chunk.features[spec_1.key], chunk.features[spec_2.key]
        target = normal[spec_1.offset : spec_1.offset + spec_1.size, spec_2.offset : spec_2.offset + spec_2.size]
        target = target.view(spec_1.rows, spec_1.n_out, spec_2.rows, spec_2.n_out)
        for start in range(0, len(rows_1), pairs_per_step):
            part = slice(start, start + pairs_per_step)
            x_1, x_2 = phi_1[rows_1[part]], phi_2[rows_2[part]]  # (P, m_1, F_1), (P, m_2, F_2)
            # (P, m_1, F_1) x (P, m_1, m_2, n_1, n_2) -> (F_1, n_1, n_2, P, m_2)
            left = torch.einsum("paf,pabnk->fnkpb", x_1, values[part])
            size_1 = left.shape[0] * left.shape[1] * left.shape[2]
            product = left.reshape(size_1, -1) @ x_2.reshape(-1, x_2.shape[-1])  # (F_1 n_1 n_2, F_2)
            target += product.reshape(spec_1.rows, spec_1.n_out, spec_2.n_out, spec_2.rows).permute(0, 1, 3, 2)


def _add_normal_diagonal(diagonal: torch.Tensor, chunk: _Chunk, blocks: List[_Block]) -> None:
    """``diagonal += diag(A^T S A)`` of the chunk (the Jacobi preconditioner of CG)."""
    for spec_1, spec_2, rows_1, rows_2, values in _overlap_pairs(chunk, blocks):
        if spec_1.key != spec_2.key:
            continue
        phi = chunk.features[spec_1.key]
        diag_values = values.diagonal(dim1=3, dim2=4)  # (P, m_1, m_2, n)
        product = torch.einsum("paf,pabn,pbf->fn", phi[rows_1], diag_values, phi[rows_2])
        diagonal[spec_1.offset : spec_1.offset + spec_1.size] += product.reshape(-1)


def _normal_product(chunks: List[_Chunk], blocks: List[_Block], vector: torch.Tensor) -> torch.Tensor:
    """``sum A^T S A v`` without forming the matrix."""
    out = torch.zeros_like(vector)
    for chunk in chunks:
        out += _transpose_product(chunk, chunk.sparse.matvec(_apply(chunk, blocks, vector)), blocks, len(vector))
    return out


# ---------------------------------------------------------------- solvers ---
def _cholesky_solve(normal: torch.Tensor, alpha: float, rhs: torch.Tensor) -> torch.Tensor:
    matrix = normal.clone()
    matrix.diagonal().add_(alpha)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise ValueError(
            f"the regularised normal matrix is not positive definite (alpha={alpha:.3g}): "
            "raise the regularisation"
        )
    return torch.cholesky_solve(rhs.unsqueeze(1), factor).squeeze(1)


def _conjugate_gradients(chunks, blocks, alpha, rhs, preconditioner, start, options) -> Tuple[torch.Tensor, int]:
    """Preconditioned CG on ``(H + alpha I) theta = rhs`` from ``start``."""
    theta = start.clone()
    inverse = 1.0 / preconditioner.clamp(min=1e-300)
    residual = rhs - _normal_product(chunks, blocks, theta) - alpha * theta
    z = inverse * residual
    direction = z.clone()
    rz = float(residual @ z)
    goal = options.cg_tolerance * float(rhs.norm())
    for iteration in range(1, options.cg_max_iterations + 1):
        if float(residual.norm()) <= goal:
            return theta, iteration - 1
        product = _normal_product(chunks, blocks, direction) + alpha * direction
        step = rz / float(direction @ product)
        theta += step * direction
        residual -= step * product
        z = inverse * residual
        rz, rz_old = float(residual @ z), rz
        direction = z + (rz / rz_old) * direction
    return theta, options.cg_max_iterations


def _write_weights(blocks: List[_Block], theta: torch.Tensor) -> None:
    for block in blocks:
        weights = theta[block.offset : block.offset + block.size].reshape(block.rows, block.n_out)
        layer = block.module
        layer.weight.zero_()
        layer.weight[:, : block.n_features] = weights[: block.n_features].T.to(layer.weight)
        if block.bias:
            layer.bias.copy_(weights[block.n_features])
