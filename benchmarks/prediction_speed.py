"""Prediction speed and memory: stock vs contracted lambda-SOAP, against the SCF it replaces.

Times :meth:`rholearn.models.DensityModel.predict` (end to end: ase structures in,
coefficient TensorMap out; default hypers, def2-universal-jkfit for H/C/N/O, linear
model; the model's weights do not change its cost) with each descriptor on

- the uracil dimer of S22 (``Uracil_dimer_h-bonded``, 24 atoms), next to a PySCF
  PBE/def2-svp SCF with ``.density_fit()`` onto def2-universal-jkfit timed in the
  same run (``--no-scf`` skips it, ~100 s);
- one water, and waters predicted ``--batch`` at a time (time per molecule);
- periodic water boxes of 3 n^3 atoms (``--box-sides``), each in its own
  subprocess, with the peak resident memory of the prediction: the process's
  peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` just before)
  minus its RSS then (model built and scripted by a warm-up call on one water);
  on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated then. Log-log slopes of time and memory
  against the atom count are fitted over the boxes.

Times are the minimum over ``--repeats`` calls after a warm-up call (which
scripts the model, ~0.1 s, reported as ``first s``), with one torch thread and one
PySCF thread. The contracted descriptor is fitted (PCA) on the structures it
predicts; this changes its values, not its cost.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/prediction_speed.py   # ~5-10 min: SCF, stock boxes
    OMP_NUM_THREADS=1 python benchmarks/prediction_speed.py --quick --no-scf
    python benchmarks/prediction_speed.py --device cuda --quick --no-scf
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import ase
import ase.build
import numpy as np
import torch
from ase.collections import s22

from rholearn.basis import BasisSet
from rholearn.descriptors import DEFAULT_HYPERS
from rholearn.options import merge
from rholearn.models import DensityModel
from rholearn.rotations import random_rotation

OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
"""Git-ignored folder of the benchmarks' results."""

AUXBASIS = "def2-universal-jkfit"
ELEMENTS = ["H", "C", "N", "O"]
DESCRIPTORS = ["stock", "contracted"]
WATER_SPACING = 3.104
"""Angstrom between water centres on the box lattice: 1 g/cm^3."""


def water_box(n_side: int, seed: int = 0) -> ase.Atoms:
    """Periodic cubic box of ``n_side^3`` randomly oriented waters (Angstrom)."""
    water = ase.build.molecule("H2O")
    water.positions -= water.positions.mean(axis=0)
    frames = []
    for i, j, k in np.ndindex(n_side, n_side, n_side):
        rotation = random_rotation(seed * 100003 + len(frames))
        molecule = water.copy()
        molecule.positions = molecule.positions @ rotation.T + WATER_SPACING * np.array([i, j, k])
        frames.append(molecule)
    box = sum(frames[1:], frames[0])
    box.cell = [WATER_SPACING * n_side] * 3
    box.pbc = True
    return box


def load_basis(path) -> BasisSet:
    """def2-universal-jkfit for H/C/N/O from PySCF, or a ``BasisSet.to_dict`` JSON file."""
    if path is None:
        from rhocalc.pyscf import basis_set

        return basis_set(AUXBASIS, ELEMENTS)
    with open(path) as f:
        return BasisSet.from_dict(json.load(f))


def make_model(descriptor: str, fit_frames, basis, device: str, dtype: torch.dtype,
               max_angular: int) -> DensityModel:
    hypers = merge(DEFAULT_HYPERS, {"basis": {"max_angular": max_angular}})
    model = DensityModel(load_basis(basis), hypers, descriptor=descriptor)
    model.fit_descriptor(fit_frames)
    return model.to(device=device, dtype=dtype)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_predict(model: DensityModel, frames, repeats: int, device: str) -> dict:
    """Seconds of the first call and min/median of ``repeats`` further calls."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model.predict(frames)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "min_s": min(times[1:]), "median_s": statistics.median(times[1:])}


def status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc (MiB, Linux)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 2**10


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS (``VmHWM``) of this process; False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def box_child(descriptor: str, n_side: int, repeats: int, basis, device: str, dtype: str,
              max_angular: int) -> dict:
    """Run in a subprocess: time and peak memory of predicting one water box."""
    torch.set_num_threads(1)
    box = water_box(n_side)
    model = make_model(
        descriptor, [s22["Uracil_dimer_h-bonded"], box], basis, device, getattr(torch, dtype),
        max_angular,
    )
    model.predict([ase.build.molecule("H2O")])  # scripting, allocator warm-up
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        reset = reset_peak_rss()
        before = status_mib("VmRSS")
    timing = time_predict(model, [box], repeats, device)
    if device.startswith("cuda"):
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    elif reset:
        peak, kind = status_mib("VmHWM"), "peak RSS (VmHWM, reset before the prediction)"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        kind = "peak RSS of the process (ru_maxrss: could not reset VmHWM)"
    return {"n_atoms": len(box), **timing, "peak_mib": peak - before, "memory": kind}


def run_box(descriptor: str, n_side: int, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", descriptor, str(n_side),
               "--repeats", str(args.box_repeats), "--device", args.device, "--dtype", args.dtype,
               "--max-angular", str(args.max_angular)]
    if args.basis:
        command += ["--basis", args.basis]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def scf_seconds(atoms: ase.Atoms) -> float:
    """PySCF PBE/def2-svp SCF with density fitting onto def2-universal-jkfit (1 thread)."""
    import pyscf

    from rhocalc.pyscf import PySCFOptions, run_scf

    pyscf.lib.num_threads(1)
    start = time.perf_counter()
    run_scf(atoms, PySCFOptions(xc="PBE", basis="def2-svp", auxbasis=AUXBASIS, scf_density_fit=True))
    return time.perf_counter() - start


def slope(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, boxes of 3 x 4^3 and 3 x 6^3 atoms, stock boxes skipped")
    parser.add_argument("--no-scf", action="store_true", help="skip the ~100 s PySCF SCF")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--box-repeats", type=int, default=3)
    parser.add_argument("--box-sides", type=int, nargs="+", default=[4, 5, 6, 7, 8],
                        help="waters per box side: 3 n^3 atoms")
    parser.add_argument("--stock-max-atoms", type=int, default=1600,
                        help="largest box predicted with the stock descriptor")
    parser.add_argument("--batch", type=int, default=32, help="waters per predict call")
    parser.add_argument("--descriptors", nargs="+", choices=DESCRIPTORS, default=DESCRIPTORS)
    parser.add_argument("--child", nargs=2, metavar=("DESCRIPTOR", "N_SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--basis", help="BasisSet JSON (BasisSet.to_dict) instead of PySCF's "
                        "def2-universal-jkfit, for machines without PySCF")
    parser.add_argument("--max-angular", type=int, default=DEFAULT_HYPERS["basis"]["max_angular"],
                        help="the lambda-SOAP's max_angular (default: the default hypers')")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(box_child(args.child[0], int(args.child[1]), args.box_repeats,
                                   args.basis, args.device, args.dtype, args.max_angular)))
        return
    if args.quick:
        args.repeats, args.box_sides, args.stock_max_atoms = 5, [4, 6], 0
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    output = args.output or os.path.join(
        OUTPUT_DIR, f"prediction_speed_{args.device.split(':')[0]}{'_quick' if args.quick else ''}"
        f"_l{args.max_angular}.json"
    )

    dimer = s22["Uracil_dimer_h-bonded"]
    water = ase.build.molecule("H2O")
    rng = np.random.default_rng(0)
    waters = []
    for _ in range(args.batch):
        atoms = water.copy()
        atoms.positions += 0.05 * rng.standard_normal(atoms.positions.shape)
        waters.append(atoms)

    rows = {}
    for descriptor in args.descriptors:
        print(f"{descriptor}: molecules", flush=True)
        model = make_model(descriptor, [dimer] + waters, args.basis, args.device, dtype,
                           args.max_angular)
        repeats = args.repeats if descriptor == "contracted" else max(2, args.repeats // 10)
        in_features = dict(zip(model.keys, model.in_features))
        rows[descriptor] = {
            "features_total": sum(model.in_features),
            "features_O_lambda0": in_features[(0, 1, 8)],
            "uracil_dimer": time_predict(model, [dimer], repeats, args.device),
            "water": time_predict(model, [water], repeats, args.device),
            "water_batch": time_predict(model, waters, max(2, repeats // 4), args.device),
            "boxes": [],
        }
        for n_side in args.box_sides:
            if descriptor == "stock" and 3 * n_side**3 > args.stock_max_atoms:
                continue
            print(f"{descriptor}: box of {3 * n_side**3} atoms", flush=True)
            rows[descriptor]["boxes"].append(run_box(descriptor, n_side, args))
        boxes = rows[descriptor]["boxes"]
        if len(boxes) >= 2:
            atoms = [box["n_atoms"] for box in boxes]
            rows[descriptor]["time_slope"] = slope(atoms, [box["min_s"] for box in boxes])
            rows[descriptor]["memory_slope"] = slope(atoms, [box["peak_mib"] for box in boxes])

    scf = None
    if not args.no_scf:
        print("PySCF SCF of the uracil dimer (density fitting, 1 thread)", flush=True)
        scf = scf_seconds(dimer)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n{device_name}, {args.dtype}, {torch.get_num_threads()} torch thread(s); "
          f"min over repeats (first call in brackets)")
    print(f"{'':34}" + "".join(f"{d:>18}" for d in args.descriptors))

    def line(name, values):
        print(f"{name:34}" + "".join(f"{value:>18}" for value in values))

    line("features (all blocks / O l=0)",
         [f"{rows[d]['features_total']} / {rows[d]['features_O_lambda0']}" for d in args.descriptors])
    for key, name in [("uracil_dimer", "uracil dimer predict ms"), ("water", "one water predict ms")]:
        line(name, [f"{1e3 * rows[d][key]['min_s']:.2f} ({1e3 * rows[d][key]['first_s']:.0f})"
                    for d in args.descriptors])
    line(f"water in batches of {args.batch}, ms/mol",
         [f"{1e3 * rows[d]['water_batch']['min_s'] / args.batch:.2f}" for d in args.descriptors])
    sizes = sorted({box["n_atoms"] for d in args.descriptors for box in rows[d]["boxes"]})
    for n_atoms in sizes:
        cells = []
        for d in args.descriptors:
            box = next((b for b in rows[d]["boxes"] if b["n_atoms"] == n_atoms), None)
            cells.append("-" if box is None else f"{box['min_s']:.3f} s {box['peak_mib']:.0f} MiB")
        line(f"water box {n_atoms} atoms", cells)
    for key, name in [("time_slope", "log-log slope: time"), ("memory_slope", "log-log slope: memory")]:
        line(name, [f"{rows[d][key]:.2f}" if key in rows[d] else "-" for d in args.descriptors])
    if scf is not None:
        line("PySCF DF-SCF of the dimer s", [f"{scf:.1f}"])
        line("SCF / predict (uracil dimer)",
             [f"{scf / rows[d]['uracil_dimer']['min_s']:.0f}x" for d in args.descriptors])
    memory = next((box["memory"] for d in args.descriptors for box in rows[d]["boxes"]), None)
    if memory:
        print(f"box memory: {memory} during the prediction minus before it, MiB")

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump({"device": device_name, "dtype": args.dtype, "torch": torch.__version__,
                   "torch_threads": torch.get_num_threads(), "scf_seconds": scf,
                   "batch": args.batch, "results": rows}, f, indent=1)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
