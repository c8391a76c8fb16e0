"""Direct solve in the overlap metric for networks linear in their weights, with the
regularisation chosen by cross-validation over the training structures.

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

**Sums over structure groups.** ``H``, ``g`` and the target norms ``y^T S y``
are sums over structures. The training structures are cut into folds
(contiguous ranges of their sorted ids) and every sum is kept per fold
(``H_f``, ``g_f``, ``n_f = sum y^T S y``): the whole-set sums are the sums over
folds, and the held-out loss of weights ``theta`` on fold ``f`` is
``theta^T H_f theta - 2 theta^T g_f + n_f``. Processes holding different structures
(:mod:`rholearn.distributed`) all-reduce every sum over structures (folds made from
the global structure ids) and take the same decisions, so they solve as one. The metric ``S`` enters in one place,
:func:`_metric_pairs` (and the chunk's ``metric`` for ``g`` and the norms);
a target whose metric is the identity changes only that.

**Assembly** uses the block structure: the weights ``theta_k`` (shape
``(F_k (+1 for the bias), n_k)``) of block ``k`` only touch the coefficients of
that block, and the same ``Phi_i`` acts on every radial channel, so for one
overlap block ``(lambda_1, lambda_2, Z_1, Z_2)`` with atom pairs ``p = (i, j)``

    H[k_1, k_2][f n, g n'] += sum_p sum_{m m'} Phi_i[m, f] S_p[m n, m' n'] Phi_j[m', g]

costs ``F_1 F_2 n_1 n_2 (2 lambda_2 + 1)`` per pair instead of the
``(rows of A) * P^2`` of forming ``A`` (P weights) explicitly.

**Choosing the regularisation.** ``alpha = regularisation * trace(H) / P``
(relative to the mean diagonal of the whole training set's ``H``, so one grid
suits any data scale; every held-out fit uses the same absolute ``alpha``).
Without validation structures, the strengths of the grid are scored by
cross-validation over the training structures, in one of two exact ways:

- **leave-one-structure-out**: one eigendecomposition ``H = U diag(l) U^T`` of
  the whole training set; for each structure ``s`` (overlap ``S_s``, ``r_s``
  basis functions) the fit without it follows from the fit with it by the
  Woodbury identity, at ``r_s^2 P`` operations per strength (see
  :func:`_loo_cross_validation`). Long grids are scored coarse to fine: every
  4th strength, then the best one's neighbours at 2 and 1 steps (11 of the
  default 25; the others are NaN in the record).
- **k folds** of contiguous structure ids: for each fold ``f`` one
  eigendecomposition ``H - H_f = U diag(l) U^T`` gives
  ``theta(alpha) = U (U^T (g - g_f)) / (l + alpha)`` for every strength.

Leave-one-out is used unless k-fold needs fewer than half its operations (or
``folds`` is set): leave-one-out for structures with fewer basis functions than
the model has weights (molecules), k-fold for a few large structures. The strength with the
lowest summed held-out loss is kept and the weights are solved again on all
training structures. When the cross-validation of all ``P`` weights would not
fit in the time budget ``cv_seconds`` (its operations counted, at the speed
of a matrix product timed at run time), or the matrix-free solver is needed,
it runs on the **leading features** of every block instead: the same fraction
of each block's features, sized so that it fits (a kernel model's features
come by decreasing eigenvalue of its references' kernel, so this is the same
model with fewer principal directions); the chosen absolute ``alpha`` is then
used for the solve with all weights. k-fold scores folds until the budget is
spent; with one training structure, ``fallback_regularisation`` is used with a
warning. With validation structures, the lowest validation loss wins instead
(no cross-validation). A choice at either end of the grid is warned about.

**Solvers.** ``"dense"`` stores ``H`` and solves by Cholesky (an
eigendecomposition where ``H + alpha I`` is not numerically positive
definite); ``"cg"`` never forms ``H`` and runs conjugate gradients with
matrix-free products ``H v`` through the sparse overlaps, preconditioned by the
Cholesky factors of the diagonal blocks of ``H`` (block-Jacobi: one block per
head block, or pieces of at most ``preconditioner_block`` weights of it).
``"auto"`` takes the dense solver whenever its matrices fit in
``memory_fraction`` of the memory available at run time. Each solve's
relative residual ``|(H + alpha I) theta - g| / |g|`` and convergence are recorded.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import metatensor.torch as mts
import numpy
import scipy.linalg
import torch
from scipy.linalg import lapack
from metatensor.torch import Labels, TensorBlock, TensorMap

from . import distributed
from .metrics import subtract_baseline
from .overlap import _BITS, SparseOverlap, _lookup, _row_ids, align_samples, systems_of

SOLVERS = ("auto", "dense", "cg")
LEAVE_ONE_OUT, K_FOLD = "leave-one-out", "k-fold"
"""The two ways of cross-validating (``cv_method`` of the record)."""

DEFAULT_GRID = tuple(float(f"{mantissa}e{exponent}") for exponent in range(-12, 0)
                     for mantissa in (1, 3)) + (1.0,)
"""Relative strengths ``1e-12, 3e-12, 1e-11, ..., 3e-1, 1``: 25 values."""


@dataclasses.dataclass
class SolveOptions:
    """How to choose the regularisation and solve the regularised normal equations.

    Parameters
    ----------
    regularisation : float or sequence of float
        Relative ridge strength(s) (see the module docstring). With one value it
        is used as it is; with several, the one with the lowest cross-validation
        loss (or validation loss, when validation structures are given) is kept.
    solver : {"auto", "dense", "cg"}
        Dense factorisations of the stored normal matrix, or matrix-free
        block-Jacobi conjugate gradients; ``"auto"``: dense when it fits in
        ``memory_fraction`` of the available memory.
    memory_fraction : float
        Share of the memory available at run time (host memory, or the free
        memory of the CUDA device) that ``"auto"`` lets the dense matrices use.
    folds : int, optional
        Cross-validate on this many folds of contiguous structure ids, one
        eigendecomposition each. Default: leave-one-structure-out (one
        eigendecomposition for all structures) when it is estimated to cost less
        than 5 folds (structures with fewer basis functions than weights), else 5 folds.
    cv_seconds : float
        Time budget of the cross-validation, in estimated seconds (the selection
        measured 1.1-2x the estimate on the benchmarks). When it is estimated to take
        longer with all weights (or the solver is ``"cg"``), it runs on the leading
        features of every block, as many as fit (the record's ``cv_weights``); k-fold
        scores its folds one after another until the budget is spent (at least one;
        the record says how many). The default, 30, chose the same strength as
        cross-validating every weight on distorted methanol and g2 at N = 30 and 100
        (4 600-5 500 of 6 400-10 000 weights cross-validated).
    fallback_regularisation : float
        The strength used when cross-validation is impossible (one training structure).
    cg_tolerance : float
        Conjugate gradients stop when the residual norm falls below this
        fraction of ``|g|``.
    cg_max_iterations : int
        Conjugate gradients stop there, unconverged (recorded and warned about).
    preconditioner_block : int
        Largest diagonal block (weights) of the block-Jacobi preconditioner.
    batch_size : int
        Structures per assembly chunk (bounds the memory of the features).
    """

    regularisation: Union[float, Sequence[float]] = DEFAULT_GRID
    solver: str = "auto"
    memory_fraction: float = 0.5
    folds: Optional[int] = None
    cv_seconds: float = 30.0
    fallback_regularisation: float = 1e-8
    cg_tolerance: float = 1e-8
    cg_max_iterations: int = 2000
    preconditioner_block: int = 4096
    batch_size: int = 32

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got '{self.solver}'")
        grid = self.grid()
        if not grid or any(not (math.isfinite(x) and x >= 0) for x in grid):
            raise ValueError(f"regularisation must be finite and >= 0, got {self.regularisation}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.folds is not None and self.folds < 2:
            raise ValueError(f"folds must be at least 2, got {self.folds}")

    def grid(self) -> List[float]:
        """The regularisation strengths, sorted."""
        values = self.regularisation
        return sorted([float(values)] if isinstance(values, (int, float)) else [float(x) for x in values])

    def n_folds(self, n_structures: int) -> int:
        """Cross-validation folds for ``n_structures`` training structures."""
        return min(self.folds if self.folds is not None else 5, n_structures)


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
    """The training data of a few structures of one fold, ready for products with ``theta``."""

    features: Dict[Tuple[int, int, int], torch.Tensor]  # key -> (atoms, 2l+1, rows)
    overlap: TensorMap
    metric: SparseOverlap
    target: TensorMap  # y = c_ref - c_base, in the prediction's keys and sample order
    target_norm: float  # y^T S y summed over the chunk's structures
    systems: List[int]
    fold: int


class _Sums(NamedTuple):
    """Per-fold sums of the normal equations (``H`` itself is assembled on demand)."""

    rhs: torch.Tensor  # (folds, P): g_f = sum A^T S y
    norms: torch.Tensor  # (folds,): n_f = sum y^T S y
    counts: List[int]  # structures per fold


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
        ``solver`` (``"dense"`` or ``"cg"``) and ``memory`` (why: bytes needed,
        available, where that figure comes from); ``n_weights``, ``n_train``,
        ``n_val``; ``selection`` (``"cross-validation"``, ``"validation"``,
        ``"single"`` for a single strength, or ``"fallback"`` with ``cv_skipped``
        saying why) with ``cv_method`` (``"leave-one-out"`` or ``"k-fold"``), ``folds``
        (structure ids per fold), ``folds_scored``, ``cv_estimate_seconds`` (the
        estimated time of the cross-validation run) and ``cv_weights`` (the weights
        cross-validated); ``regularisation``
        (the chosen relative strength), ``alpha`` (absolute), ``edge`` (``None``,
        or ``"smallest"`` / ``"largest"`` when the choice is at an end of a grid);
        ``grid``: per strength ``cv_loss`` (held-out loss per structure; NaN where
        not scored),
        ``cv_rmse_percent`` (``100 sqrt(sum held-out losses / sum y^T S y)``),
        ``val_loss``, ``val_rmse_percent``, ``train_loss`` (per structure; NaN
        where not computed); ``train_loss`` and ``train_rmse_percent`` of the
        returned weights; ``solves`` (one per solve: ``fold`` (``None`` for the
        whole training set), ``regularisation``, ``iterations`` (0 for dense),
        ``relative_residual``, ``converged``) and ``converged`` (all of them);
        ``seconds`` (``features``, ``assembly``, ``selection``, ``solve``).
    """
    features, head, active = linear_parts(model.net)
    blocks = _blocks(head, active)
    n_weights = sum(block.size for block in blocks)
    grid = options.grid()
    seconds = {"features": 0.0, "assembly": 0.0, "selection": 0.0, "solve": 0.0}
    with torch.no_grad():
        start = time.perf_counter()
        train_batches = list(train_batches)
        if not train_batches:
            raise ValueError("no training structures to solve for")
        systems = sorted({s for share in distributed.gather_objects(  # of every process
            {s for b in train_batches for s in systems_of(b.coefficients).tolist()}) for s in share})
        val_batches = list(val_batches or [])
        has_val = distributed.all_reduce_sum(len(val_batches)) > 0  # one choice for all processes
        selection = "single" if len(grid) == 1 else "validation" if has_val else "cross-validation"
        n_train = len(systems)
        n_folds = options.n_folds(n_train) if selection == "cross-validation" else 1
        fold_of = _fold_assignment(systems, n_folds)
        train = [chunk for batch in train_batches
                 for chunk in _chunks(model, features, head, blocks, batch, fold_of)]
        val = [chunk for batch in val_batches
               for chunk in _chunks(model, features, head, blocks, batch, None)]
        seconds["features"] = time.perf_counter() - start
        values = train[0].target.block(0).values
        dtype, device = values.dtype, values.device
        copies = 3  # H and two matrices of P^2: a fold's, its eigenvectors; or a factor
        solver, memory = distributed.broadcast_object(  # process 0 decides for all
            _choose_solver(options, n_weights, copies, dtype, device))

        start = time.perf_counter()
        sums = _all_reduce_sums(_fold_sums(train, blocks, n_folds, n_weights))
        rhs, spread = sums.rhs.sum(dim=0), float(sums.norms.sum())
        if solver == "dense":
            normal = distributed.all_reduce(_normal_matrix(train, blocks, n_weights))
            scale = float(normal.diagonal().mean()) if n_weights else 1.0
            pieces, diagonal_blocks = [], []
        else:
            normal = None
            pieces = _pieces(blocks, options.preconditioner_block)
            diagonal_blocks = [distributed.all_reduce(matrix)
                               for matrix in _diagonal_blocks(train, blocks, pieces)]
            trace = sum(float(matrix.diagonal().sum()) for matrix in diagonal_blocks)
            scale = trace / n_weights if n_weights else 1.0
        seconds["assembly"] = time.perf_counter() - start

        alphas = [regularisation * scale for regularisation in grid]
        rows = [{"regularisation": r, "alpha": a, "cv_loss": math.nan, "cv_rmse_percent": math.nan,
                 "val_loss": math.nan, "val_rmse_percent": math.nan, "train_loss": math.nan}
                for r, a in zip(grid, alphas)]
        solves: List[Dict[str, object]] = []
        start = time.perf_counter()
        theta = torch.zeros(n_weights, dtype=dtype, device=device)
        n_val = int(distributed.all_reduce_sum(sum(len(chunk.systems) for chunk in val)))
        cv_skipped, cv_blocks, method, estimate = None, blocks, None, 0.0
        if selection == "cross-validation" and n_train < 2:
            selection = "fallback"
            cv_skipped = ("cross-validation skipped: it needs 2 training structures or more; "
                          f"regularisation {options.fallback_regularisation:g} used")
            warnings.warn(f"{cv_skipped} (give validation structures)", stacklevel=2)
            grid = [options.fallback_regularisation]
            alphas = [grid[0] * scale]
            rows = [dict(rows[0], regularisation=grid[0], alpha=alphas[0])]
        elif selection == "cross-validation":
            sizes = [size for share in distributed.gather_objects(
                [size for chunk in train for size in chunk.metric.system_sizes().tolist()]) for size in share]
            method, cv_size, estimate = distributed.broadcast_object(_cv_plan(
                options, n_weights, n_folds, sizes, len(grid), normal is not None, memory, copies, dtype, device))
            if cv_size < n_weights or normal is None:  # (the matrix-free solver has no H)
                cv_blocks = _leading_blocks(blocks, cv_size / n_weights)
        n_scored = 0
        if selection == "cross-validation":
            cv_train, cv_sums, cv_normal = train, sums, normal
            if cv_blocks is not blocks:  # the same folds, on the leading features of every block
                cv_train = [_leading_chunk(chunk, blocks, cv_blocks) for chunk in train]
                cv_size = sum(block.size for block in cv_blocks)
                cv_sums = _all_reduce_sums(_fold_sums(cv_train, cv_blocks, n_folds, cv_size))
                cv_normal = distributed.all_reduce(_normal_matrix(cv_train, cv_blocks, cv_size))
            if method == LEAVE_ONE_OUT:
                held_out = _loo_cross_validation(cv_train, cv_blocks, cv_normal, cv_sums.rhs.sum(dim=0), alphas)
                n_scored, scored_spread, scored_count = n_train, spread, n_train
            else:
                per_fold = _dense_cross_validation(cv_train, cv_blocks, cv_normal, cv_sums, alphas,
                                                   options.cv_seconds)
                held_out, n_scored = per_fold.sum(dim=0), len(per_fold)
                scored_spread = float(sums.norms[:n_scored].sum())
                scored_count = sum(sums.counts[:n_scored])
            del cv_normal
            for row, loss in zip(rows, held_out.tolist()):
                row["cv_loss"] = loss / scored_count
                row["cv_rmse_percent"] = _percent(loss, scored_spread)  # NaN where not scored
            best = min(range(len(grid)), key=lambda i: _finite_or_inf(rows[i]["cv_loss"]))
        elif selection == "validation":
            val_spread = distributed.all_reduce_sum(sum(chunk.target_norm for chunk in val))
            for row, regularisation, alpha in reversed(list(zip(rows, grid, alphas))):
                theta = _solve(train, blocks, normal, alpha, rhs, pieces, diagonal_blocks, theta,
                               options, solves, None, regularisation)
                loss = _loss(val, blocks, theta)
                row["val_loss"], row["val_rmse_percent"] = loss / n_val, _percent(loss, val_spread)
            best = min(range(len(grid)), key=lambda i: rows[i]["val_loss"])
        else:
            best = 0
        seconds["selection"] = time.perf_counter() - start

        start = time.perf_counter()
        theta = _solve(train, blocks, normal, alphas[best], rhs, pieces, diagonal_blocks, theta,
                       options, solves, None, grid[best])
        train_loss = _train_loss(train, blocks, normal, theta, rhs, spread)
        rows[best]["train_loss"] = train_loss / n_train
        seconds["solve"] = time.perf_counter() - start
        _write_weights(blocks, theta)
    edge = None
    if len(grid) > 1 and best in (0, len(grid) - 1):
        edge = "smallest" if best == 0 else "largest"
        warnings.warn(
            f"the chosen regularisation {grid[best]:g} is the {edge} value of the grid "
            f"({grid[0]:g} to {grid[-1]:g}): the optimum may lie beyond it, extend the grid",
            stacklevel=2,
        )
    unconverged = [entry for entry in solves if not entry["converged"]]
    if unconverged:
        warnings.warn(
            f"{len(unconverged)} of {len(solves)} conjugate-gradient solves stopped unconverged "
            f"(largest relative residual {max(e['relative_residual'] for e in unconverged):.2e}, "
            f"tolerance {options.cg_tolerance:g}): raise cg_max_iterations or use the dense solver",
            stacklevel=2,
        )
    return {
        "solver": solver,
        "memory": memory,
        "n_weights": n_weights,
        "n_train": n_train,
        "n_val": n_val,
        "selection": selection,
        "cv_method": method,
        "folds": ([[s] for s in systems] if method == LEAVE_ONE_OUT
                  else [[s for s in systems if fold_of[s] == f] for f in range(n_folds)]),
        "folds_scored": n_scored,
        "cv_estimate_seconds": estimate,
        "cv_weights": sum(block.size for block in cv_blocks),
        "cv_skipped": cv_skipped,
        "regularisation": grid[best],
        "alpha": alphas[best],
        "edge": edge,
        "grid": rows,
        "train_loss": train_loss / n_train,
        "train_rmse_percent": _percent(train_loss, spread),
        "solves": solves,
        "converged": not unconverged,
        "seconds": seconds,
    }


def _finite_or_inf(value: float) -> float:
    """``value``, or infinity for NaN (a strength not scored) so that ``min`` skips it."""
    return value if not math.isnan(value) else math.inf


def _percent(loss: float, spread: float) -> float:
    """``100 sqrt(loss / spread)``: SALTED's % RMSE of a summed overlap loss (NaN and
    infinity stay as they are)."""
    return 100.0 * math.sqrt(max(loss, 0.0) / spread) if spread > 0 else math.nan


# --------------------------------------------------------------- decisions ---
def available_memory(device: torch.device) -> Tuple[int, str]:
    """Bytes of memory available now on ``device``, and where the figure comes from.

    CUDA: the device's free memory (``torch.cuda.mem_get_info``); otherwise the
    host's available memory from ``psutil`` if installed, else ``/proc/meminfo``
    (``MemAvailable``); ``(0, "unknown")`` when neither can be read.
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]), "torch.cuda.mem_get_info"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "psutil"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "/proc/meminfo"
    except OSError:
        pass
    return 0, "unknown"


def _choose_solver(options: SolveOptions, n_weights: int, copies: int, dtype, device) -> Tuple[str, Dict]:
    """``"dense"`` when ``copies`` matrices of ``P^2`` numbers fit in the allowed memory."""
    needed = copies * n_weights**2 * torch.empty((), dtype=dtype).element_size()
    available, source = available_memory(device)
    allowed = int(options.memory_fraction * available)
    solver = options.solver
    if solver == "auto":
        solver = "dense" if needed <= allowed else "cg"
    return solver, {
        "needed_bytes": needed, "copies": copies, "available_bytes": available, "source": source,
        "allowed_bytes": allowed, "requested": options.solver,
    }


def _fold_assignment(systems: Sequence[int], n_folds: int) -> Dict[int, int]:
    """Structure id -> fold: contiguous ranges of the sorted ids, as equal as possible
    (neighbours in a trajectory, or copies of one molecule, stay together)."""
    ordered = sorted(systems)
    return {s: position * n_folds // len(ordered) for position, s in enumerate(ordered)}


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


def _chunks(model, features, head, blocks: List[_Block], batch,
            fold_of: Optional[Dict[int, int]]) -> List[_Chunk]:
    """The chunks of a batch, one per fold of its structures (``fold_of=None``: one)."""
    systems = systems_of(batch.coefficients).tolist()
    if fold_of is None:
        return [_chunk(model, features, head, blocks, batch.descriptor, batch.coefficients,
                       batch.overlap, -1)]
    chunks = []
    for fold in sorted({fold_of[s] for s in systems}):
        tensors = (batch.descriptor, batch.coefficients, batch.overlap)
        if any(fold_of[s] != fold for s in systems):
            ids = [s for s in systems if fold_of[s] == fold]
            selection = Labels(["system"], torch.tensor(ids, dtype=torch.int32).reshape(-1, 1))
            tensors = tuple(  # without the blocks of elements these structures lack
                mts.drop_empty_blocks(mts.slice(tensor, "samples", selection.to(tensor.device)))
                for tensor in tensors
            )
        chunks.append(_chunk(model, features, head, blocks, *tensors, fold))
    return chunks


def _chunk(model, features, head, blocks: List[_Block], descriptor: TensorMap,
           coefficients: TensorMap, overlap: TensorMap, fold: int) -> _Chunk:
    """Features (active columns, plus a column of ones for a bias) and targets of some structures."""
    phi = features(descriptor)
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
        align_samples(coefficients, layout, "target coefficients"), model.baseline.means
    )
    metric = SparseOverlap(overlap, target)
    return _Chunk(
        features=per_key,
        overlap=overlap,
        metric=metric,
        target=target,
        target_norm=float(metric.quadratic(target).sum()),
        systems=metric.systems.tolist(),
        fold=fold,
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
        cross = chunk.metric.bilinear(prediction, chunk.target).sum()
        total += float(chunk.metric.quadratic(prediction).sum() - 2 * cross) + chunk.target_norm
    return distributed.all_reduce_sum(total)


def _metric_pairs(chunk: _Chunk, blocks: List[_Block]):
    """For each metric block with features on both sides: the two block specs, the
    feature rows of each pair's atoms and the values ``(pairs, m_1, m_2, n_1, n_2)``
    (here the overlap's atom-pair blocks)."""
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


def _pair_product(x_1: torch.Tensor, values: torch.Tensor, x_2: torch.Tensor,
                  pairs_per_step: int = 512) -> torch.Tensor:
    """``sum_p sum_{m m'} x_1[p, m, f] values[p, m, m', n, n'] x_2[p, m', g]`` as
    ``(F_1, n_1, F_2, n_2)``, for features ``x`` of shape ``(pairs, 2 lambda + 1, F)``."""
    out = x_1.new_zeros(x_1.shape[-1], values.shape[3], x_2.shape[-1], values.shape[4])
    for start in range(0, len(x_1), pairs_per_step):
        part = slice(start, start + pairs_per_step)
        # (P, m_1, F_1) x (P, m_1, m_2, n_1, n_2) -> (F_1, n_1, n_2, P, m_2)
        left = torch.einsum("paf,pabnk->fnkpb", x_1[part], values[part])
        size_1 = left.shape[0] * left.shape[1] * left.shape[2]
        product = left.reshape(size_1, -1) @ x_2[part].reshape(-1, x_2.shape[-1])  # (F_1 n_1 n_2, F_2)
        out += product.reshape(left.shape[0], left.shape[1], left.shape[2], -1).permute(0, 1, 3, 2)
    return out


def _normal_matrix(chunks: List[_Chunk], blocks: List[_Block], size: int) -> torch.Tensor:
    """``sum A^T S A`` over the chunks, ``(P, P)``, one metric block at a time."""
    values = chunks[0].target.block(0).values
    normal = torch.zeros(size, size, dtype=values.dtype, device=values.device)
    for chunk in chunks:
        for spec_1, spec_2, rows_1, rows_2, pair_values in _metric_pairs(chunk, blocks):
            phi_1, phi_2 = chunk.features[spec_1.key], chunk.features[spec_2.key]
            target = normal[spec_1.offset : spec_1.offset + spec_1.size, spec_2.offset : spec_2.offset + spec_2.size]
            target.view(spec_1.rows, spec_1.n_out, spec_2.rows, spec_2.n_out).add_(
                _pair_product(phi_1[rows_1], pair_values, phi_2[rows_2])
            )
    return normal


def _fold_sums(chunks: List[_Chunk], blocks: List[_Block], n_folds: int, size: int) -> _Sums:
    """``g_f``, ``n_f`` and the number of structures of every fold."""
    values = chunks[0].target.block(0).values
    rhs = torch.zeros(n_folds, size, dtype=values.dtype, device=values.device)
    norms = torch.zeros(n_folds, dtype=values.dtype)
    counts = [0] * n_folds
    for chunk in chunks:
        rhs[chunk.fold] += _transpose_product(chunk, chunk.metric.matvec(chunk.target), blocks, size)
        norms[chunk.fold] += chunk.target_norm
        counts[chunk.fold] += len(chunk.systems)
    return _Sums(rhs, norms, counts)


def _normal_product(chunks: List[_Chunk], blocks: List[_Block], vector: torch.Tensor) -> torch.Tensor:
    """``sum A^T S A v`` without forming the matrix."""
    out = torch.zeros_like(vector)
    for chunk in chunks:
        out += _transpose_product(chunk, chunk.metric.matvec(_apply(chunk, blocks, vector)), blocks, len(vector))
    return distributed.all_reduce(out)


def _train_loss(chunks, blocks, normal, theta, rhs, spread) -> float:
    """``sum (A theta - y)^T S (A theta - y)`` over the training structures."""
    if normal is not None:  # theta^T H theta - 2 theta^T g + sum y^T S y
        return float(theta @ (normal @ theta) - 2 * theta @ rhs) + spread
    return _loss(chunks, blocks, theta)


def _all_reduce_sums(sums: _Sums) -> _Sums:
    """The sums over the training structures of every process, each holding a share of
    them (:mod:`rholearn.distributed`; unchanged in one process). The folds are made from
    the global structure ids, so the per-fold sums add up."""
    if not distributed.active():
        return sums
    counts = distributed.all_reduce(torch.tensor(sums.counts, dtype=torch.float64))
    return _Sums(distributed.all_reduce(sums.rhs), distributed.all_reduce(sums.norms),
                 [int(count) for count in counts.tolist()])


# ------------------------------------------------------ cross-validation ---
EIGENVECTOR_COST, SPECTRUM_COST = 4.0, 2.5
"""Cost of an eigendecomposition of ``P`` weights, in multiply-adds of a matrix product
per ``P^3``: with its eigenvectors (:func:`_eigh`) and as :class:`_Spectrum` (measured
here against ``torch.matmul``: 3.8 and 2.3 at 3000-6400 weights on 1-2 threads)."""


def _cv_plan(options: SolveOptions, n_weights: int, n_folds: int, sizes: List[int], n_strengths: int,
             dense: bool, memory: Dict, copies: int, dtype: torch.dtype,
             device: torch.device) -> Tuple[str, int, float]:
    """``(method, weights cross-validated, estimated seconds)``.

    Leave-one-structure-out costs one eigendecomposition with eigenvectors plus, per
    scored strength and structure of ``r`` basis functions (``sizes``), about
    ``r^2 P + 1.5 r^3`` multiply-adds; ``n_folds`` folds cost one eigendecomposition
    each. Leave-one-out, the better estimate (every held-out fit sees all other
    structures), is taken unless k-fold needs fewer than half its operations or
    ``options.folds`` is set. It runs on all weights when it fits in
    ``options.cv_seconds`` (at the speed of a matrix product timed here) and in the
    memory, and the solver is dense; else on the most leading weights that do.
    """
    first, stride = _strength_schedule(n_strengths)
    scored = len(first) + 2 * int(math.log2(stride))
    per_weight = scored * sum(r * r for r in sizes)
    fixed = scored * sum(1.5 * r**3 for r in sizes)

    def operations(method: str, size: int) -> float:
        if method == LEAVE_ONE_OUT:
            return EIGENVECTOR_COST * size**3 + per_weight * size + fixed
        return n_folds * SPECTRUM_COST * size**3

    cheaper_folds = operations(K_FOLD, n_weights) < operations(LEAVE_ONE_OUT, n_weights) / 2
    method = K_FOLD if options.folds is not None or cheaper_folds else LEAVE_ONE_OUT
    seconds = _product_seconds(dtype, device)
    size = n_weights
    if not dense or operations(method, size) * seconds > options.cv_seconds:
        low, high = 1, n_weights  # the largest size within the budget (at least one weight)
        while low < high:
            middle = (low + high + 1) // 2
            fits = operations(method, middle) * seconds <= options.cv_seconds
            low, high = (middle, high) if fits else (low, middle - 1)
        size = low
    if memory["allowed_bytes"] > 0:
        element = torch.empty((), dtype=dtype).element_size()
        size = min(size, int(math.sqrt(memory["allowed_bytes"] / (copies * element))))
    return method, max(size, 1), operations(method, max(size, 1)) * seconds


def _strength_schedule(n: int) -> Tuple[List[int], int]:
    """The strengths scored first (every ``stride``-th of ``n`` sorted ones, and the
    last) and that stride: the search then halves it around the best so far."""
    stride = 4 if n >= 17 else 2 if n >= 7 else 1
    return sorted(set(range(0, n, stride)) | {n - 1}), stride


def _loo_cross_validation(chunks: List[_Chunk], blocks: List[_Block], normal: torch.Tensor,
                          rhs: torch.Tensor, alphas: List[float]) -> torch.Tensor:
    """Summed held-out losses ``(strengths,)`` of leaving each training structure out in
    turn (NaN for the strengths not scored).

    With ``H = U diag(l) U^T`` (one eigendecomposition) and ``B = A_s U`` for the held-out
    structure ``s`` (overlap ``S``, targets ``y``), the fit on all structures predicts
    ``A_s theta = B (U^T g) / (l + alpha)``, and the fit without ``s`` predicts residuals
    ``d_out = (I - M)^{-1} d`` from the residuals ``d = A_s theta - y``, with
    ``M = B diag(1 / (l + alpha)) B^T S`` (Woodbury): the held-out loss is
    ``d_out^T S d_out``. Strengths are scored coarse to fine (:func:`_strength_schedule`).
    """
    eigenvalues, vectors = _eigh(normal)
    alpha = torch.tensor(alphas, dtype=normal.dtype, device=normal.device)
    shifted = eigenvalues.clamp(min=0)[None] + alpha[:, None]  # (strengths, P)
    inverse = torch.where(shifted > 0, 1.0 / shifted, 0.0)  # alpha = 0: pseudo-inverse
    projected = vectors.T @ rhs
    losses = torch.full((len(alphas),), math.nan, dtype=torch.float64)
    todo, stride = _strength_schedule(len(alphas))
    while todo:
        losses[todo] = distributed.all_reduce(  # (on the device: nccl reduces CUDA tensors)
            _held_out_losses(chunks, blocks, vectors, inverse[todo], projected)).cpu()
        best = min(range(len(alphas)), key=lambda i: _finite_or_inf(float(losses[i])))
        stride //= 2
        todo = [i for i in (best - stride, best + stride)
                if stride and 0 <= i < len(alphas) and math.isnan(float(losses[i]))]
    return losses


def _held_out_losses(chunks: List[_Chunk], blocks: List[_Block], vectors: torch.Tensor,
                     inverse: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """Leave-one-out losses summed over the chunks' structures, for the strengths whose
    ``1 / (l + alpha)`` are the rows of ``inverse`` (see :func:`_loo_cross_validation`)."""
    total = torch.zeros(len(inverse), dtype=vectors.dtype, device=vectors.device)
    by_key = {block.key: block for block in blocks}
    for chunk in chunks:
        specs = [by_key[tuple(key)] for key in chunk.target.keys.values.tolist()]
        targets = [block.values for block in chunk.target.blocks()]
        for system in chunk.metric.dense_systems():
            overlap = system.matrix
            design = vectors.new_zeros(len(overlap), vectors.shape[1])  # B = A_s U
            for index, rows, positions in system.places:
                spec = specs[index]
                u = vectors[spec.offset : spec.offset + spec.size].reshape(spec.rows, spec.n_out, -1)
                part = torch.einsum("amf,fnp->amnp", chunk.features[spec.key][rows], u)
                design[positions.reshape(-1)] = part.reshape(-1, vectors.shape[1])
            residuals = design @ (inverse * projected).T - system.vector(targets)[:, None]
            identity = torch.eye(len(overlap), dtype=overlap.dtype, device=overlap.device)
            for k, weights in enumerate(inverse):
                hat = ((design * weights) @ design.T) @ overlap
                held, info = torch.linalg.solve_ex(identity - hat, residuals[:, k])
                total[k] += held @ (overlap @ held) if int(info) == 0 else math.inf
    return total


def _eigh(matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a symmetric matrix (on the CPU through numpy,
    whose LAPACK is faster here than torch's: 3000 weights, 2 threads, 2.1 s against 2.9 s)."""
    if matrix.device.type != "cpu":
        return torch.linalg.eigh(matrix)
    eigenvalues, vectors = numpy.linalg.eigh(matrix.numpy())
    return torch.from_numpy(eigenvalues), torch.from_numpy(vectors)


def _dense_cross_validation(chunks: List[_Chunk], blocks: List[_Block], normal: torch.Tensor,
                            sums: _Sums, alphas: List[float], budget: float) -> torch.Tensor:
    """Held-out losses ``(folds scored, strengths)``: for each fold ``f`` one eigendecomposition
    of ``H - H_f``, then every strength from it (see the module docstring); folds are
    scored in order until ``budget`` seconds have passed."""
    start = time.perf_counter()
    total = sums.rhs.sum(dim=0)
    alpha = torch.tensor(alphas, dtype=normal.dtype, device=normal.device)
    losses = torch.zeros(len(sums.counts), len(alphas), dtype=normal.dtype)
    for fold in range(len(sums.counts)):
        if fold > 0 and distributed.broadcast_object(time.perf_counter() - start > budget):
            return losses[:fold]  # (process 0's clock decides for all)
        in_fold = [c for c in chunks if c.fold == fold]  # none: the fold is another process's
        remaining = distributed.all_reduce(
            _normal_matrix(in_fold, blocks, len(total)) if in_fold else torch.zeros_like(normal))
        remaining.neg_().add_(normal)  # H - H_f, in place of H_f
        spectrum = _Spectrum(remaining)  # overwrites ``remaining``
        del remaining
        eigenvalues = spectrum.eigenvalues
        shifted = eigenvalues.clamp(min=0)[:, None] + alpha[None]
        coefficients = spectrum.project(total - sums.rhs[fold])
        weights = torch.where(shifted > 0, coefficients[:, None] / shifted, 0.0)  # alpha = 0: pseudo-inverse
        theta = spectrum.expand(weights)  # (P, strengths)
        # theta^T H_f theta = theta^T H theta - theta^T (H - H_f) theta
        quadratic = (theta * (normal @ theta)).sum(dim=0) - (eigenvalues[:, None] * weights**2).sum(dim=0)
        losses[fold] = (quadratic - 2 * (sums.rhs[fold] @ theta) + sums.norms[fold]).cpu()
    return losses


class _Spectrum:
    """``matrix = U diag(eigenvalues) U^T`` (symmetric), with products by ``U^T`` and ``U``.

    On the CPU, ``U`` is never formed: LAPACK's tridiagonal reduction
    ``matrix = Q T Q^T`` (``sytrd``, Householder reflectors overwriting ``matrix``) and
    the eigenvectors ``V`` of ``T`` (MRRR, ``stemr``) give ``U = Q V``; this is about 3x
    faster than ``torch.linalg.eigh``'s back-transformation (2000 weights, 1 thread:
    5.7 s against 18 s on a loaded machine). On other devices, ``torch.linalg.eigh``.
    """

    def __init__(self, matrix: torch.Tensor):
        self.device, self.dtype = matrix.device, matrix.dtype
        if matrix.device.type != "cpu":
            self.eigenvalues, self._vectors = torch.linalg.eigh(matrix)
            return
        sytrd = lapack.dsytrd if matrix.dtype == torch.float64 else lapack.ssytrd
        lwork = lapack.dsytrd_lwork(len(matrix), lower=1)[0]
        # the C-ordered symmetric matrix, seen as Fortran-ordered: reduced in place
        reflectors, diagonal, off_diagonal, self._tau, info = sytrd(
            matrix.numpy().T, lower=1, lwork=max(int(lwork), 1), overwrite_a=1
        )
        if info != 0:
            raise RuntimeError(f"LAPACK sytrd failed (info={info})")
        self._reflectors = reflectors
        eigenvalues, self._vectors = scipy.linalg.eigh_tridiagonal(
            diagonal, off_diagonal, lapack_driver="stemr"
        ) if len(diagonal) > 1 else (diagonal, numpy.ones((1, 1), dtype=diagonal.dtype))
        self.eigenvalues = torch.from_numpy(eigenvalues)

    def _apply_q(self, values: numpy.ndarray, transpose: bool) -> numpy.ndarray:
        """``Q values`` or ``Q^T values`` for ``values`` of shape ``(P, columns)``."""
        n = len(values)
        order = range(n - 1) if transpose else range(n - 2, -1, -1)
        reflector = numpy.empty(n, dtype=values.dtype)
        for i in order:  # H_i = I - tau_i v v^T on rows i + 1..; v = (1, reflectors[i + 2:, i])
            v = reflector[: n - i - 1]
            v[0] = 1.0
            v[1:] = self._reflectors[i + 2 :, i]
            rows = values[i + 1 :]
            rows -= self._tau[i] * numpy.outer(v, v @ rows)
        return values

    def project(self, vector: torch.Tensor) -> torch.Tensor:
        """``U^T vector`` for a vector of shape ``(P,)``."""
        if self.device.type != "cpu":
            return self._vectors.T @ vector
        rotated = self._apply_q(vector.numpy().reshape(-1, 1).copy(), transpose=True)
        return torch.from_numpy(self._vectors.T @ rotated[:, 0])

    def expand(self, weights: torch.Tensor) -> torch.Tensor:
        """``U weights`` for weights of shape ``(P, columns)``."""
        if self.device.type != "cpu":
            return self._vectors @ weights
        return torch.from_numpy(self._apply_q(self._vectors @ weights.numpy(), transpose=False))


_PROBE = 600
"""Size of the matrices whose product is timed to estimate the cost of cross-validation."""


def _product_seconds(dtype: torch.dtype, device: torch.device) -> float:
    """Seconds per multiply-add of a matrix product on ``device`` (the fastest of three
    products of ``_PROBE``-sized matrices)."""
    matrix = torch.ones(_PROBE, _PROBE, dtype=dtype, device=device)
    best = math.inf
    for _ in range(3):
        _synchronise(device)
        start = time.perf_counter()
        matrix @ matrix
        _synchronise(device)
        best = min(best, time.perf_counter() - start)
    return best / _PROBE**3


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _leading_blocks(blocks: List[_Block], fraction: float) -> List[_Block]:
    """The blocks restricted to their leading ``fraction`` of features (at least one each;
    a kernel model's features come by decreasing eigenvalue of the references' kernel),
    packed one after another."""
    leading, offset = [], 0
    for block in blocks:
        n_features = min(block.n_features, max(1, int(fraction * block.n_features)))
        block = block._replace(n_features=n_features, offset=offset)
        leading.append(block)
        offset += block.size
    return leading


def _leading_chunk(chunk: _Chunk, blocks: List[_Block], leading: List[_Block]) -> _Chunk:
    """``chunk`` with the features of ``leading`` (:func:`_leading_blocks`) only."""
    features = {}
    for block, short in zip(blocks, leading):
        if block.key in chunk.features:
            values = chunk.features[block.key]
            kept = values[..., : short.n_features]
            features[block.key] = torch.cat([kept, values[..., -1:]], dim=-1) if block.bias else kept
    return chunk._replace(features=features)


# ---------------------------------------------------------------- solvers ---
def _solve(chunks, blocks, normal, alpha, rhs, pieces, diagonal_blocks, start, options, solves,
           fold, regularisation) -> torch.Tensor:
    """``(H + alpha I)^{-1} rhs``: dense when ``normal`` is given, else block-Jacobi CG."""
    if normal is None:
        return _conjugate_gradients(chunks, blocks, alpha, rhs, pieces, diagonal_blocks, start,
                                    options, solves, fold, regularisation)
    theta = _dense_solve(normal, alpha, rhs)
    residual = normal @ theta + alpha * theta - rhs
    solves.append({"fold": fold, "regularisation": regularisation, "iterations": 0,
                   "relative_residual": _relative(residual, rhs), "converged": True})
    return theta


def _relative(residual: torch.Tensor, rhs: torch.Tensor) -> float:
    norm = float(rhs.norm())
    return float(residual.norm()) / norm if norm > 0 else float(residual.norm())


def _dense_solve(normal: torch.Tensor, alpha: float, rhs: torch.Tensor) -> torch.Tensor:
    """Cholesky of ``H + alpha I``; where it is not numerically positive definite, the
    eigendecomposition with eigenvalues below zero set to zero."""
    matrix = normal.clone()
    matrix.diagonal().add_(alpha)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.unsqueeze(1), factor).squeeze(1)
    del factor, matrix
    eigenvalues, vectors = torch.linalg.eigh(normal)
    shifted = eigenvalues.clamp(min=0) + alpha
    if alpha <= 0:
        shifted = torch.where(shifted > 0, shifted, torch.ones_like(shifted))  # pseudo-inverse
    return vectors @ ((vectors.T @ rhs) / shifted)


class _Piece(NamedTuple):
    """A diagonal block of the preconditioner: feature rows ``[first, last)`` of a head block."""

    block: int
    first: int
    last: int
    offset: int  # in theta
    size: int


def _pieces(blocks: List[_Block], max_size: int) -> List[_Piece]:
    """Each head block whole, or cut into runs of feature rows of at most ``max_size`` weights."""
    pieces = []
    for index, block in enumerate(blocks):
        step = max(1, max_size // max(block.n_out, 1))
        for first in range(0, block.rows, step):
            last = min(first + step, block.rows)
            pieces.append(_Piece(index, first, last, block.offset + first * block.n_out,
                                 (last - first) * block.n_out))
    return pieces


def _diagonal_blocks(chunks: List[_Chunk], blocks: List[_Block], pieces: List[_Piece]) -> List[torch.Tensor]:
    """The diagonal blocks of ``H`` of the pieces, assembled without ``H``."""
    values = chunks[0].target.block(0).values
    matrices = [torch.zeros(p.size, p.size, dtype=values.dtype, device=values.device) for p in pieces]
    by_block: Dict[int, List[int]] = {}
    for position, piece in enumerate(pieces):
        by_block.setdefault(piece.block, []).append(position)
    index_of = {block.key: index for index, block in enumerate(blocks)}
    for chunk in chunks:
        for spec_1, spec_2, rows_1, rows_2, pair_values in _metric_pairs(chunk, blocks):
            if spec_1.key != spec_2.key:
                continue
            phi = chunk.features[spec_1.key]
            x_1, x_2 = phi[rows_1], phi[rows_2]
            for position in by_block.get(index_of[spec_1.key], []):
                piece = pieces[position]
                part = slice(piece.first, piece.last)
                matrices[position] += _pair_product(x_1[..., part], pair_values, x_2[..., part]).reshape(
                    piece.size, piece.size
                )
    return matrices


def _conjugate_gradients(chunks, blocks, alpha, rhs, pieces, diagonal_blocks, start,
                         options: SolveOptions, solves, fold, regularisation) -> torch.Tensor:
    """Block-Jacobi preconditioned CG on ``(H + alpha I) theta = rhs`` from ``start``;
    appends the solve's record to ``solves``."""
    factors = []
    for matrix in diagonal_blocks:  # a tiny shift keeps singular blocks factorisable
        shift = max(alpha, 1e-12 * float(matrix.diagonal().mean().abs()) + 1e-300)
        factors.append(torch.linalg.cholesky(matrix + shift * torch.eye(len(matrix), dtype=matrix.dtype,
                                                                      device=matrix.device)))

    def precondition(vector: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(vector)
        for piece, factor in zip(pieces, factors):
            part = slice(piece.offset, piece.offset + piece.size)
            out[part] = torch.cholesky_solve(vector[part].unsqueeze(1), factor).squeeze(1)
        return out

    theta = start.clone()
    residual = rhs - _normal_product(chunks, blocks, theta) - alpha * theta
    z = precondition(residual)
    direction = z.clone()
    rz = float(residual @ z)
    goal = options.cg_tolerance * float(rhs.norm())
    iterations = 0
    while float(residual.norm()) > goal and iterations < options.cg_max_iterations:
        product = _normal_product(chunks, blocks, direction) + alpha * direction
        step = rz / float(direction @ product)
        theta += step * direction
        residual -= step * product
        z = precondition(residual)
        rz, rz_old = float(residual @ z), rz
        direction = z + (rz / rz_old) * direction
        iterations += 1
    converged = float(residual.norm()) <= goal
    true_residual = _normal_product(chunks, blocks, theta) + alpha * theta - rhs
    solves.append({"fold": fold, "regularisation": regularisation, "iterations": iterations,
                   "relative_residual": _relative(true_residual, rhs), "converged": converged})
    return theta


def _write_weights(blocks: List[_Block], theta: torch.Tensor) -> None:
    for block in blocks:
        weights = theta[block.offset : block.offset + block.size].reshape(block.rows, block.n_out)
        layer = block.module
        layer.weight.zero_()
        layer.weight[:, : block.n_features] = weights[: block.n_features].T.to(layer.weight)
        if block.bias:
            layer.bias.copy_(weights[block.n_features])
