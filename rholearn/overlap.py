"""Inner products of coefficient TensorMaps, per structure, through the sparse overlap.

For the coefficients ``a`` and ``b`` of densities on a batch of structures
(layout of :mod:`rholearn.layout`, many structures joined along samples) and
the overlap ``S`` of their auxiliary basis stored as atom-pair blocks, this
module computes, for every structure,

    a^T S b = sum_{i, j atoms} a_i^T S_ij b_j

without ever forming the dense matrix.

How: :class:`SparseOverlap` regroups, once per batch, the overlap blocks of
all ``(o3_lambda_1, o3_lambda_2)`` of an element pair ``(center_type_1,
center_type_2)`` into one tensor of atom-pair matrices ``S_ij`` of shape
``(pairs, F_1, F_2)``, where ``F`` is the number of basis functions of an atom
of that element, and finds where each pair's atoms sit in the coefficient
blocks. A product then costs, per element pair, two row gathers, one batched
matrix product and one ``index_add`` into the structures: few, large torch
operations, on the device and in the dtype of the inputs, differentiable in
``a`` and ``b``. The regrouped overlap holds as many numbers as the overlap
TensorMap itself (memory linear in the number of stored atom pairs).

Building that index costs far more than a product (a batch of 32 waters:
16 ms against 1 ms), so :class:`SparseOverlapCache` keeps the indices of batches met again,
e.g. LBFGS's fixed full batch across its evaluations and epochs; the losses
of :mod:`rholearn.loss` use one.

Only coefficient blocks with ``o3_sigma = 1`` enter the products (targets have
no other). Atom indices must be below 2^20 and structure ids below 2^23.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, defaultdict
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from .layout import PAIR_KEY_NAMES

# samples as one int64: (system, atom) -> system << 20 | atom, and
# (system, atom_1, atom_2) -> (system << 20 | atom_1) << 20 | atom_2
_BITS = 20
_ATOM_MASK = (1 << _BITS) - 1


def key_string(keys: Labels, index: int) -> str:
    """``"o3_lambda=1, o3_sigma=1, center_type=8"`` for entry ``index`` of ``keys``."""
    values = keys.values[index].tolist()
    return ", ".join(f"{name}={value}" for name, value in zip(keys.names, values))


def systems_of(tensor: TensorMap) -> torch.Tensor:
    """Sorted unique ``system`` sample values over all blocks, int64, on the tensor's device."""
    columns = [block.samples.column("system") for block in tensor.blocks()]
    return torch.unique(torch.cat(columns).to(torch.int64))


def _row_ids(samples: Labels) -> torch.Tensor:
    """One int64 per ``(system, atom)`` sample."""
    values = samples.values.to(torch.int64)
    return (values[:, 0] << _BITS) | values[:, 1]


def _pair_ids(samples: torch.Tensor) -> torch.Tensor:
    """One int64 per ``(system, atom_1, atom_2)`` row of pair sample values."""
    values = samples.to(torch.int64)
    return (((values[:, 0] << _BITS) | values[:, 1]) << _BITS) | values[:, 2]


def _lookup(
    sorted_table: torch.Tensor, queries: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions of ``queries`` in a sorted table of unique values, and whether they are there."""
    if len(sorted_table) == 0:
        return torch.zeros_like(queries), torch.zeros_like(queries, dtype=torch.bool)
    index = torch.searchsorted(sorted_table, queries).clamp_(max=len(sorted_table) - 1)
    return index, sorted_table[index] == queries


def align_samples(tensor: TensorMap, reference: TensorMap, name: str = "tensor") -> TensorMap:
    """``tensor`` with the keys of ``reference`` and the rows of each block in its sample order.

    Blocks without samples count as absent on either side. Returns ``tensor``
    itself when it already matches.

    Parameters
    ----------
    tensor : TensorMap
        Coefficient-layout tensor to reorder (for example a target).
    reference : TensorMap
        Tensor whose keys and per-block sample order to follow (for example
        the prediction).
    name : str
        What ``tensor`` is, for the error messages.

    Raises
    ------
    KeyError
        If a non-empty block is in one tensor only, or the two blocks of a key
        hold different ``(system, atom)`` samples; the message names the key.
    ValueError
        If the components or properties of a key differ.
    """
    present = _nonempty_keys(tensor)
    extra = sorted(set(present) - set(_nonempty_keys(reference)))
    if extra:
        raise KeyError(
            f"{name} has block(s) {extra} ({', '.join(reference.keys.names)}) "
            "with samples that the reference lacks"
        )
    values, reordered = [], False
    for index, (key, ref_block) in enumerate(
        zip(reference.keys.values.tolist(), reference.blocks())
    ):
        where = f"{name}: block {key_string(reference.keys, index)}"
        if tuple(key) not in present:
            if len(ref_block.samples) > 0:
                raise KeyError(f"{name} has no block for {key_string(reference.keys, index)}")
            values.append(ref_block.values)  # empty on both sides
            reordered = True
            continue
        block = tensor.block(present[tuple(key)])
        rows = _rows_in_reference_order(block, ref_block, where)
        values.append(block.values if rows is None else block.values[rows])
        reordered = reordered or rows is not None
    if not reordered and tensor.keys == reference.keys:
        return tensor
    return TensorMap(
        reference.keys,
        [
            TensorBlock(v, block.samples, block.components, block.properties)
            for v, block in zip(values, reference.blocks())
        ],
    )


def _nonempty_keys(tensor: TensorMap) -> Dict[Tuple[int, ...], int]:
    """Key values -> block index, for the blocks that have samples."""
    return {
        tuple(key): i
        for i, (key, block) in enumerate(zip(tensor.keys.values.tolist(), tensor.blocks()))
        if len(block.samples) > 0
    }


def _rows_in_reference_order(
    block: TensorBlock, reference: TensorBlock, where: str
) -> Optional[torch.Tensor]:
    """The rows of ``block`` in the sample order of ``reference``; ``None`` if already so."""
    if block.components != reference.components or block.properties != reference.properties:
        raise ValueError(
            f"{where} has components/properties that differ from the reference "
            f"({tuple(block.values.shape[1:])} vs {tuple(reference.values.shape[1:])})"
        )
    if block.samples == reference.samples:
        return None
    ids = _row_ids(block.samples)
    sorted_ids, order = torch.sort(ids)
    index, found = _lookup(sorted_ids, _row_ids(reference.samples))
    if not bool(found.all()):
        system, atom = reference.samples.values[~found][0].tolist()
        raise KeyError(f"{where} lacks the sample system={system}, atom={atom}")
    if len(block.samples) != len(reference.samples):
        raise KeyError(
            f"{where} has {len(block.samples)} samples, the reference {len(reference.samples)}"
        )
    return order[index]


def per_system_dot(
    a: TensorMap,
    b: TensorMap,
    systems: torch.Tensor,
    weights: Optional[Dict[Tuple[int, int, int], float]] = None,
) -> torch.Tensor:
    """Euclidean ``sum_k w_k a_k b_k`` per structure, for ``a`` and ``b`` with the same metadata.

    Parameters
    ----------
    a, b : TensorMap
        Coefficient-layout tensors with the same keys and samples in the same
        order (see :func:`align_samples`).
    systems : torch.Tensor
        Sorted structure ids to sum into (from :func:`systems_of`).
    weights : dict, optional
        ``(o3_lambda, o3_sigma, center_type) -> weight`` of each block's terms
        (1 for keys not listed).

    Returns
    -------
    torch.Tensor, shape (len(systems),)
    """
    weights = {} if weights is None else weights
    total = torch.zeros(len(systems), dtype=a.block(0).values.dtype, device=systems.device)
    for key, block_a, block_b in zip(a.keys.values.tolist(), a.blocks(), b.blocks()):
        per_row = (block_a.values * block_b.values).sum(dim=(1, 2))
        slots = torch.searchsorted(systems, block_a.samples.column("system").to(torch.int64))
        total = total.index_add(0, slots, per_row, alpha=weights.get(tuple(key), 1.0))
    return total


class _ElementRows(NamedTuple):
    """The coefficient blocks of one element, read as one row of ``F`` functions per atom.

    Atom rows are sorted by ``(system, atom)``; an atom's functions are its
    blocks' ``(2l+1) * n_radial`` values one after the other, ``o3_lambda``
    ascending, ``m``-major within a block.
    """

    blocks: List[int]  # layout block indices (o3_sigma = 1), o3_lambda ascending
    lambdas: List[int]  # their o3_lambda
    columns: List[slice]  # where each block's values sit among the atom's F functions
    orders: List[torch.Tensor]  # block rows in sorted atom order
    inverses: List[torch.Tensor]  # sorted atom rows in block order
    ids: torch.Tensor  # sorted (system, atom) ids


class _PairGroup(NamedTuple):
    """The overlap of every stored atom pair of one element pair."""

    element_1: int
    element_2: int
    rows_1: torch.Tensor  # (P,) row of each pair's atom_1 among element_1's atoms
    rows_2: torch.Tensor
    slots: torch.Tensor  # (P,) position of each pair's structure in ``systems``
    matrices: torch.Tensor  # (P, F_1, F_2) blocks S_ij


class DenseSystem(NamedTuple):
    """One structure's overlap as a dense matrix, and where its coefficients sit in it.

    Rows follow :class:`SparseOverlap`'s atom rows: elements in the layout's order,
    atoms by index, an atom's blocks by ``o3_lambda``, ``m``-major within a block.
    """

    system: int  # the structure id
    matrix: torch.Tensor  # (r, r): S of the structure, r its number of basis functions
    places: List[Tuple[int, torch.Tensor, torch.Tensor]]
    """Per layout block holding the structure's atoms: ``(block index, block rows
    (atoms,), positions (atoms, (2 lambda + 1) n) in the matrix's rows)``."""

    def vector(self, values: List[torch.Tensor]) -> torch.Tensor:
        """The structure's coefficients ``(r, *extra)`` from per-block ``values`` of shape
        ``(block rows, 2 lambda + 1, n, *extra)`` (the layout's blocks, in order)."""
        extra = values[self.places[0][0]].shape[3:]
        out = values[0].new_zeros((len(self.matrix),) + tuple(extra))
        for index, rows, positions in self.places:
            out[positions.reshape(-1)] = values[index][rows].reshape((-1,) + tuple(extra))
        return out


class SparseOverlap:
    """The overlap of a batch, indexed against the rows of one coefficient layout.

    Parameters
    ----------
    overlap : TensorMap
        Atom-pair overlap blocks of every structure of ``layout`` (pair layout
        of :mod:`rholearn.layout`, samples in any order). Pairs absent from it
        count as zero.
    layout : TensorMap
        A coefficient-layout tensor (e.g. the prediction) whose keys and
        per-block samples every tensor passed to :meth:`bilinear` and
        :meth:`matvec` must share. Same dtype and device as ``overlap``.

    Attributes
    ----------
    systems : torch.Tensor
        Sorted structure ids of ``layout``; per-structure results follow this order.

    Raises
    ------
    KeyError
        An overlap block without coefficient block, atom pairs whose
        ``(system, atom)`` rows are missing from ``layout``, blocks of one
        element with different atoms, or a structure without overlap pairs;
        the message names the key, element or structure.
    ValueError
        Different dtype or device, or a block whose shape disagrees.
    """

    def __init__(self, overlap: TensorMap, layout: TensorMap):
        if overlap.keys.names != PAIR_KEY_NAMES:
            raise ValueError(
                f"overlap keys are {overlap.keys.names}, expected {PAIR_KEY_NAMES}"
            )
        self.layout = layout
        self.systems = systems_of(layout)
        self._checks: List[Tuple[torch.Tensor, str]] = []  # (all found?, error) for one sync
        self._elements = self._element_rows(layout)
        self._groups = self._pair_groups(overlap)
        self._pair_systems = (
            torch.cat([group.slots for group in self._groups])
            if self._groups
            else torch.zeros(0, dtype=torch.int64, device=self.systems.device)
        )
        self._check()

    # ------------------------------------------------------------- building ---
    def _element_rows(self, layout: TensorMap) -> Dict[int, _ElementRows]:
        per_element = defaultdict(list)  # z -> [(l, block index, block)]
        for index, ((l, sigma, z), block) in enumerate(
            zip(layout.keys.values.tolist(), layout.blocks())
        ):
            if sigma == 1 and len(block.samples) > 0:
                per_element[z].append((l, index, block))
        elements = {}
        for z, blocks in per_element.items():
            blocks.sort(key=lambda entry: entry[0])
            error = f"coefficient blocks of center_type={z} hold different atoms"
            columns, orders, inverses, start, ids = [], [], [], 0, None
            for _, _, block in blocks:
                width = block.values[0].numel()
                columns.append(slice(start, start + width))
                start += width
                sorted_ids, order = torch.sort(_row_ids(block.samples))
                if ids is None:
                    ids = sorted_ids
                elif len(sorted_ids) != len(ids):
                    raise KeyError(error)
                else:
                    self._checks.append(((sorted_ids == ids).all(), error))
                orders.append(order)
                inverses.append(torch.argsort(order))
            elements[z] = _ElementRows(
                blocks=[index for _, index, _ in blocks],
                lambdas=[l for l, _, _ in blocks],
                columns=columns,
                orders=orders,
                inverses=inverses,
                ids=ids,
            )
        return elements

    def _pair_groups(self, overlap: TensorMap) -> List[_PairGroup]:
        expected, found = self.layout.block(0).values, overlap.block(0).values
        if found.dtype != expected.dtype or found.device != expected.device:
            raise ValueError(
                f"the overlap is {found.dtype} on {found.device} but the coefficients are "
                f"{expected.dtype} on {expected.device}"
            )
        per_pair = defaultdict(list)  # (z_1, z_2) -> [(samples, columns_1, columns_2, S_ij)]
        for index, ((l_1, l_2, z_1, z_2), block) in enumerate(
            zip(overlap.keys.values.tolist(), overlap.blocks())
        ):
            values = block.values
            if len(values) == 0:
                continue
            columns_1 = self._columns(z_1, l_1, overlap.keys, index)
            columns_2 = self._columns(z_2, l_2, overlap.keys, index)
            m_1, m_2 = 2 * l_1 + 1, 2 * l_2 + 1
            n_1 = (columns_1.stop - columns_1.start) // m_1
            n_2 = (columns_2.stop - columns_2.start) // m_2
            if values.shape[1:] != (m_1, m_2, n_1 * n_2):
                raise ValueError(
                    f"overlap block {key_string(overlap.keys, index)} has shape "
                    f"{tuple(values.shape)}, expected (pairs, {m_1}, {m_2}, {n_1 * n_2})"
                )
            # (P, m_1, m_2, n_1 n_2) -> (P, m_1, n_1, m_2, n_2): the atom rows' column order
            matrices = values.reshape(-1, m_1, m_2, n_1, n_2).permute(0, 1, 3, 2, 4)
            per_pair[(z_1, z_2)].append((block.samples, columns_1, columns_2, matrices))
        return [self._pair_group(z_1, z_2, blocks) for (z_1, z_2), blocks in per_pair.items()]

    def _columns(self, z: int, l: int, keys: Labels, index: int) -> slice:
        """Columns of the ``(l, z)`` coefficient block in its element's atom rows."""
        element = self._elements.get(z)
        if element is None or l not in element.lambdas:
            raise KeyError(
                f"overlap block {key_string(keys, index)} has no coefficient block "
                f"o3_lambda={l}, center_type={z}"
            )
        return element.columns[element.lambdas.index(l)]

    def _pair_group(self, z_1: int, z_2: int, blocks) -> _PairGroup:
        """Copy the ``(l_1, l_2)`` blocks of an element pair into one tensor of ``S_ij``."""
        width_1 = self._elements[z_1].columns[-1].stop
        width_2 = self._elements[z_2].columns[-1].stop
        first = blocks[0][0]
        if all(samples == first for samples, _, _, _ in blocks[1:]):  # as the layout writes them
            pairs = _pair_ids(first.values)
            matrices = blocks[0][3].new_zeros((len(pairs), width_1, width_2))
            for _, columns_1, columns_2, values in blocks:
                matrices[:, columns_1, columns_2].view(values.shape).copy_(values)
        else:  # blocks with different pairs: scatter each into the union of pairs
            ids = _pair_ids(torch.cat([samples.values for samples, _, _, _ in blocks]))
            pairs, positions = torch.unique(ids, return_inverse=True)
            matrices = blocks[0][3].new_zeros((len(pairs), width_1, width_2))
            rows_of_blocks = torch.split(positions, [len(values) for _, _, _, values in blocks])
            for (_, columns_1, columns_2, values), rows in zip(blocks, rows_of_blocks):
                target = matrices[:, columns_1, columns_2].view(-1, *values.shape[1:])
                target.index_copy_(0, rows, values)
        rows_1, found_1 = _lookup(self._elements[z_1].ids, pairs >> _BITS)
        atom_2 = ((pairs >> (2 * _BITS)) << _BITS) | (pairs & _ATOM_MASK)
        rows_2, found_2 = _lookup(self._elements[z_2].ids, atom_2)
        slots, found_system = _lookup(self.systems, pairs >> (2 * _BITS))
        self._checks.append(
            (
                (found_1 & found_2 & found_system).all(),
                f"overlap blocks center_type_1={z_1}, center_type_2={z_2} have atom pairs "
                "whose (system, atom) rows are not in the coefficients",
            )
        )
        return _PairGroup(z_1, z_2, rows_1, rows_2, slots, matrices)

    def _check(self) -> None:
        """One device sync for all look-ups; on failure, name the culprit."""
        if self._checks and not bool(torch.stack([ok for ok, _ in self._checks]).all()):
            raise KeyError(next(message for ok, message in self._checks if not bool(ok)))
        covered = torch.zeros(len(self.systems), dtype=torch.bool, device=self.systems.device)
        covered[self._pair_systems] = True
        if not bool(covered.all()):
            raise KeyError(f"no overlap blocks for system(s) {self.systems[~covered].tolist()}")

    @property
    def nbytes(self) -> int:
        """Memory of the regrouped overlap and its indices, in bytes."""
        tensors = [self.systems, self._pair_systems]
        tensors += [t for g in self._groups for t in (g.rows_1, g.rows_2, g.slots, g.matrices)]
        for element in self._elements.values():
            tensors += [element.ids, *element.orders, *element.inverses]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _atom_slots(self, element: _ElementRows) -> Tuple[torch.Tensor, torch.Tensor]:
        """The structure (position in ``systems``) of each of an element's atom rows, and
        the element's number of atoms in every structure."""
        slots = _lookup(self.systems, element.ids >> _BITS)[0]
        return slots, torch.bincount(slots, minlength=len(self.systems))

    def system_sizes(self) -> torch.Tensor:
        """Basis functions ``r`` of every structure (``systems`` order), int64 ``(systems,)``."""
        sizes = torch.zeros(len(self.systems), dtype=torch.int64, device=self.systems.device)
        for element in self._elements.values():
            sizes += self._atom_slots(element)[1] * element.columns[-1].stop
        return sizes

    def dense_systems(self) -> List[DenseSystem]:
        """Every structure's overlap as a dense ``(r, r)`` matrix (memory ``r^2`` each:
        for a few structures at a time, e.g. one batch)."""
        positions, slots = {}, {}  # element -> first row of each atom in its structure; its slot
        taken = torch.zeros(len(self.systems), dtype=torch.int64, device=self.systems.device)
        for z, element in self._elements.items():
            slot, counts = self._atom_slots(element)
            first_atom = torch.cumsum(counts, 0) - counts  # element row of each structure's first atom
            rank = torch.arange(len(slot), device=slot.device) - first_atom[slot]
            width = element.columns[-1].stop
            positions[z], slots[z] = taken[slot] + rank * width, slot
            taken += counts * width
        systems = []
        for s, size in enumerate(taken.tolist()):  # (the functions of every structure)
            matrix = self.layout.block(0).values.new_zeros((size, size))
            for g in self._groups:
                mine = g.slots == s
                first_1 = positions[g.element_1][g.rows_1[mine]]
                first_2 = positions[g.element_2][g.rows_2[mine]]
                columns_1 = first_1[:, None] + torch.arange(g.matrices.shape[1], device=first_1.device)
                columns_2 = first_2[:, None] + torch.arange(g.matrices.shape[2], device=first_2.device)
                matrix[columns_1[:, :, None], columns_2[:, None, :]] = g.matrices[mine]
            places = []
            for z, element in self._elements.items():
                atoms = (slots[z] == s).nonzero().reshape(-1)  # sorted atom rows of this structure
                for index, columns, order in zip(element.blocks, element.columns, element.orders):
                    offsets = torch.arange(columns.start, columns.stop, device=atoms.device)
                    places.append((index, order[atoms], positions[z][atoms, None] + offsets))
            systems.append(DenseSystem(int(self.systems[s]), matrix, places))
        return systems

    # ------------------------------------------------------------- products ---
    def _check_layout(self, tensor: TensorMap, name: str) -> None:
        if tensor is self.layout:
            return
        if tensor.keys != self.layout.keys or any(
            block.samples != reference.samples
            for block, reference in zip(tensor.blocks(), self.layout.blocks())
        ):
            raise ValueError(
                f"{name} must have the keys and samples of the layout the "
                "SparseOverlap was built for (use align_samples)"
            )

    def _atom_rows(self, tensor: TensorMap) -> Dict[int, torch.Tensor]:
        """Element -> ``(atoms, F)`` coefficients, atoms sorted by ``(system, atom)``."""
        rows = {}
        for z, element in self._elements.items():
            parts = [
                tensor.block(index).values[order].reshape(len(order), -1)
                for index, order in zip(element.blocks, element.orders)
            ]
            rows[z] = torch.cat(parts, dim=1)
        return rows

    def bilinear(self, a: TensorMap, b: TensorMap) -> torch.Tensor:
        """``a^T S b`` per structure, shape ``(len(systems),)``, differentiable in ``a``, ``b``."""
        self._check_layout(a, "a")
        self._check_layout(b, "b")
        rows_a = self._atom_rows(a)
        rows_b = rows_a if b is a else self._atom_rows(b)
        dtype = self.layout.block(0).values.dtype
        total = torch.zeros(len(self.systems), dtype=dtype, device=self.systems.device)
        if not self._groups:
            return total
        per_pair = [
            (
                rows_a[g.element_1][g.rows_1].unsqueeze(1)
                @ g.matrices
                @ rows_b[g.element_2][g.rows_2].unsqueeze(2)
            ).reshape(-1)
            for g in self._groups
        ]
        return total.index_add(0, self._pair_systems, torch.cat(per_pair))

    def quadratic(self, a: TensorMap) -> torch.Tensor:
        """``a^T S a`` per structure (the squared L2 norm of the density ``a`` describes)."""
        return self.bilinear(a, a)

    def matvec(self, a: TensorMap) -> TensorMap:
        """``S a`` in the coefficient layout (for coefficients ``a``: the projections)."""
        self._check_layout(a, "a")
        rows_a = self._atom_rows(a)
        products = {z: torch.zeros_like(rows) for z, rows in rows_a.items()}
        for g in self._groups:
            product = (g.matrices @ rows_a[g.element_2][g.rows_2].unsqueeze(2)).squeeze(2)
            products[g.element_1] = products[g.element_1].index_add(0, g.rows_1, product)
        values = [torch.zeros_like(block.values) for block in a.blocks()]
        for z, element in self._elements.items():
            parts = zip(element.blocks, element.columns, element.inverses)
            for index, columns, inverse in parts:
                values[index] = products[z][inverse, columns].reshape(values[index].shape)
        return TensorMap(
            a.keys,
            [
                TensorBlock(v, block.samples, block.components, block.properties)
                for v, block in zip(values, a.blocks())
            ],
        )


DEFAULT_CACHE_BYTES = 2**30
"""Default bound of a :class:`SparseOverlapCache`: 1 GiB of cached indices."""


class SparseOverlapCache:
    """The :class:`SparseOverlap` of batches met before, reused.

    A batch is recognised by a digest of the keys and samples of the
    coefficient layout (so its structures' ids and their sample order), the
    keys and shapes of the overlap blocks and the sum of each overlap block's
    values: a batch read again from disk is recognised, the same structures
    with another geometry, basis or pair threshold are not. Computing the
    digest costs about a tenth of building the index.

    An index is stored the second time its batch is met: fixed batches (LBFGS's
    full batch, evaluated many times per epoch, or validation batches) are
    built twice and then reused, while batches that never come back (Adam's
    shuffled minibatches) are built each time and take no memory. Entries are
    dropped least recently used first so that their :attr:`SparseOverlap.nbytes`
    stay within ``max_bytes``; a stored index keeps the layout's metadata, not
    its values' autograd graph.

    Parameters
    ----------
    max_bytes : int
        Memory bound of the stored indices (about the size of the overlap
        TensorMaps they came from); 0 stores nothing.
    max_seen : int
        How many digests of batches met once are remembered (16 bytes each).

    Attributes
    ----------
    hits, misses : int
        Calls that reused an index, and calls that built one.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, max_seen: int = 4096):
        if max_bytes < 0 or max_seen < 0:
            raise ValueError(f"max_bytes and max_seen must be >= 0, got {max_bytes}, {max_seen}")
        self.max_bytes = max_bytes
        self.max_seen = max_seen
        self.hits = 0
        self.misses = 0
        self.nbytes = 0
        """Memory of the stored indices, in bytes."""
        self._entries: "OrderedDict[bytes, SparseOverlap]" = OrderedDict()
        self._seen: "OrderedDict[bytes, None]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every stored index and digest."""
        self._entries.clear()
        self._seen.clear()
        self.nbytes = 0

    def get(self, overlap: TensorMap, layout: TensorMap) -> SparseOverlap:
        """``SparseOverlap(overlap, layout)``, reused if this batch was stored before."""
        if self.max_bytes == 0:
            self.misses += 1
            return SparseOverlap(overlap, layout)
        digest = _digest(overlap, layout)
        if digest in self._entries:
            self.hits += 1
            self._entries.move_to_end(digest)
            return self._entries[digest]
        self.misses += 1
        if digest not in self._seen:
            self._seen[digest] = None
            while len(self._seen) > self.max_seen:
                self._seen.popitem(last=False)
            return SparseOverlap(overlap, layout)
        del self._seen[digest]
        sparse = SparseOverlap(overlap, _metadata_only(layout))
        size = sparse.nbytes
        if size <= self.max_bytes:
            while self._entries and self.nbytes + size > self.max_bytes:
                self.nbytes -= self._entries.popitem(last=False)[1].nbytes
            self._entries[digest] = sparse
            self.nbytes += size
        return sparse


def _digest(overlap: TensorMap, layout: TensorMap) -> bytes:
    """16 bytes identifying an overlap and a layout; see :class:`SparseOverlapCache`."""
    digest = hashlib.blake2b(digest_size=16)
    values = [block.values for block in overlap.blocks()]
    digest.update(f"{layout.block(0).values.dtype} {values[0].device}".encode())
    digest.update(str([list(v.shape) for v in values]).encode())
    sums = torch.stack([v.detach().sum() for v in values])
    arrays = [layout.keys.values, overlap.keys.values, sums]
    arrays += [block.samples.values for block in layout.blocks()]
    for array in arrays:
        digest.update(array.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


def _metadata_only(layout: TensorMap) -> TensorMap:
    """``layout`` with detached values: keeps no autograd graph alive once cached."""
    return TensorMap(
        layout.keys,
        [
            TensorBlock(block.values.detach(), block.samples, block.components, block.properties)
            for block in layout.blocks()
        ],
    )


def bilinear_form(
    a: TensorMap,
    b: TensorMap,
    overlap: TensorMap,
    cache: Optional[SparseOverlapCache] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a^T S b`` per structure, for ``a`` and ``b`` in any sample order.

    Parameters
    ----------
    a, b : TensorMap
        Coefficient-layout tensors over the same ``(system, atom)`` samples.
    overlap : TensorMap
        Pair-layout overlap of those structures.
    cache : SparseOverlapCache, optional
        Reuses the index of a batch met before.

    Returns
    -------
    systems : torch.Tensor, shape (n_systems,)
        Sorted structure ids.
    values : torch.Tensor, shape (n_systems,)
        ``sum_ij a_i^T S_ij b_j`` of each structure.
    """
    sparse = SparseOverlap(overlap, a) if cache is None else cache.get(overlap, a)
    return sparse.systems, sparse.bilinear(a, align_samples(b, a, "b"))


def overlap_matvec(
    a: TensorMap, overlap: TensorMap, cache: Optional[SparseOverlapCache] = None
) -> TensorMap:
    """``S a`` in the coefficient layout of ``a`` (same keys and sample order);
    ``cache`` reuses the index of a batch met before."""
    sparse = SparseOverlap(overlap, a) if cache is None else cache.get(overlap, a)
    return sparse.matvec(a)
