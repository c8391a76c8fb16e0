"""Time OverlapLoss forward + backward on real auxiliary overlaps; print a table, write JSON.

Cases: batches of 10 and 32 water molecules and single ~20-atom molecules,
with the def2-universal-jkfit overlap from PySCF stored as sparse atom pairs.
The loss is timed twice: rebuilding the :class:`~rholearn.overlap.SparseOverlap`
index at every call (``cache_bytes=0``, as for shuffled minibatches, and as
every call did before the cache), and with the default cache on a batch met
again (LBFGS's fixed batches). Also shown: building the index alone, a cache
look-up (the batch's digest), the forward product alone, and a dense
``dc^T S dc`` (torch, same device).

Usage::

    python benchmarks/loss_overlap.py [--device cuda] [--dtype float32] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import ase
import ase.build
import metatensor.torch as mts
import numpy as np
import torch
from ase.collections import s22

from rhocalc.pyscf.basis import basis_set
from rhocalc.pyscf.molecule import aux_molecule
from rhocalc.pyscf.order import matrix_to_canonical
from rholearn import layout
from rholearn.loss import LossTarget, OverlapLoss
from rholearn.overlap import SparseOverlap, SparseOverlapCache

AUXBASIS = "def2-universal-jkfit"
OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
"""Git-ignored folder of the benchmarks' results."""


def waters(count: int, seed: int = 0):
    """Water molecules with positions jiggled by 0.05 Angstrom."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        atoms = ase.build.molecule("H2O")
        atoms.positions += 0.05 * rng.standard_normal(atoms.positions.shape)
        frames.append(atoms)
    return frames


def batch_tensors(frames, folder, dtype, device):
    """Dense overlaps and sparse TensorMaps (written and read back as the data loader does)."""
    basis = basis_set(AUXBASIS, {s for f in frames for s in f.get_chemical_symbols()})
    rng = np.random.default_rng(1)
    tensors = {"prediction": [], "reference": [], "overlap": []}
    dense = []
    for system, atoms in enumerate(frames):
        molecule = aux_molecule(atoms, basis)
        matrix = matrix_to_canonical(molecule.intor("int1e_ovlp"), molecule)
        c_ref = rng.standard_normal(len(matrix))
        c = c_ref + 0.1 * rng.standard_normal(len(matrix))
        dense.append((matrix, c - c_ref))
        for kind, tensor in (
            ("prediction", layout.vector_to_tensormap(c, atoms.numbers, basis, system)),
            ("reference", layout.vector_to_tensormap(c_ref, atoms.numbers, basis, system)),
            ("overlap", layout.matrix_to_pair_tensormap(matrix, atoms.numbers, basis, system)),
        ):
            path = os.path.join(folder, f"{kind}-{system}.mts")
            layout.save(path, tensor)
            tensors[kind].append(mts.load(path).to(dtype=dtype, device=device))

    def joined(tensors):
        return mts.join(tensors, axis="samples", different_keys="union")

    return (*(joined(tensors[kind]) for kind in ("prediction", "reference", "overlap")), dense)


def median_time(function, repeats: int, device) -> float:
    """Median wall time of ``function()`` in milliseconds (one warm-up call)."""
    function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def time_case(name, frames, dtype, device, repeats):
    with tempfile.TemporaryDirectory() as folder:
        prediction, reference, overlap, dense = batch_tensors(frames, folder, dtype, device)
    prediction = mts.requires_grad(prediction, True)
    target = LossTarget(coefficients=reference, overlap=overlap)
    loss_fn, uncached_fn = OverlapLoss(), OverlapLoss(cache_bytes=0)

    def loss_step():
        loss_fn(prediction, target).backward()

    def uncached_step():
        uncached_fn(prediction, target).backward()

    loss_step()  # meets the batch once: the next call stores its index

    difference = mts.subtract(prediction, reference)

    def index_only():
        SparseOverlap(overlap, prediction)

    sparse = SparseOverlap(overlap, prediction)
    cache = SparseOverlapCache()
    for _ in range(2):
        cache.get(overlap, prediction)

    def lookup_only():
        cache.get(overlap, prediction)

    def forward_only():
        with torch.no_grad():
            sparse.quadratic(difference)

    matrices = [torch.tensor(m, dtype=dtype, device=device) for m, _ in dense]
    vectors = [torch.tensor(v, dtype=dtype, device=device, requires_grad=True) for _, v in dense]

    def dense_step():
        sum(v @ m @ v for m, v in zip(matrices, vectors)).backward()

    samples = torch.cat([block.samples.values for block in overlap.blocks()])
    n_pairs = len(torch.unique(samples, dim=0))
    n_atoms = sum(len(f) for f in frames)
    result = {
        "case": name,
        "structures": len(frames),
        "atoms": n_atoms,
        "basis_functions": sum(len(m) for m, _ in dense),
        "stored_atom_pairs": n_pairs,
        "overlap_blocks": len(overlap.keys),
        "loss_forward_backward_uncached_ms": median_time(uncached_step, repeats, device),
        "loss_forward_backward_ms": median_time(loss_step, repeats, device),
        "index_build_ms": median_time(index_only, repeats, device),
        "cache_lookup_ms": median_time(lookup_only, repeats, device),
        "index_mebibytes": sparse.nbytes / 2**20,
        "quadratic_forward_ms": median_time(forward_only, repeats, device),
        "dense_forward_backward_ms": median_time(dense_step, repeats, device),
    }
    with torch.no_grad():
        check = loss_fn(prediction, target).item()
        expected = sum((v @ m @ v).item() for m, v in zip(matrices, vectors))
    result["relative_difference_to_dense"] = abs(check - expected) / expected
    result["cache_hits"], result["cache_misses"] = loss_fn.overlaps.hits, loss_fn.overlaps.misses
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output", default=os.path.join(OUTPUT_DIR, "loss_overlap.json"))
    parser.add_argument("--cases", nargs="*", default=None, metavar="CASE",
                        help="run only these cases (default all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cases = [
        ("10 x water", waters(10)),
        ("32 x water", waters(32)),
        ("pyrazine dimer", [s22["Pyrazine_dimer"]]),
        ("uracil dimer", [s22["Uracil_dimer_h-bonded"]]),
    ]
    cases = [case for case in cases if args.cases is None or case[0] in args.cases]
    results = [time_case(name, frames, dtype, device, args.repeats) for name, frames in cases]
    columns = [
        ("case", "{:>16}"), ("atoms", "{:>6}"), ("basis_functions", "{:>6}"),
        ("stored_atom_pairs", "{:>6}"), ("loss_forward_backward_uncached_ms", "{:>11.2f}"),
        ("loss_forward_backward_ms", "{:>11.2f}"), ("index_build_ms", "{:>8.2f}"),
        ("cache_lookup_ms", "{:>9.2f}"), ("quadratic_forward_ms", "{:>8.2f}"),
        ("dense_forward_backward_ms", "{:>8.2f}"),
    ]
    print(f"device {device}, {args.dtype}, {args.threads} thread(s), median of {args.repeats}")
    print("  ".join(["case".rjust(16), "atoms", " n_fn", "pairs", "rebuild f+b", "cached f+b",
                     "index ms", "lookup ms", "fwd ms", "dense ms"]))
    for result in results:
        print("  ".join(fmt.format(result[column]) for column, fmt in columns))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(
            {"device": str(device), "dtype": args.dtype, "threads": args.threads,
             "torch": torch.__version__, "results": results},
            f,
            indent=1,
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
