"""Prediction throughput with featomic's spherical expansion against the pure-torch one.

For each ``--expansions`` choice of the contracted lambda-SOAP (``featomic``: the
compiled calculator, on the CPU whatever the device; ``torch``:
:class:`rholearn.descriptors.expansion.TorchExpansion`, on the model's device), times

- the expansion alone (``descriptor.module.expansion(systems)``, dense tensor out);
- :meth:`rholearn.models.DensityModel.predict`, end to end (ase structures in,
  coefficients out; default hypers and model, def2-universal-jkfit for H/C/N/O),

on one water, ``--batch`` waters per call (time per molecule) and the uracil dimer
of S22 (24 atoms). Times are the minimum over ``--repeats`` calls after a warm-up
call, one torch thread; on CUDA each call ends with a synchronisation. The largest
difference between the two expansions' predictions is printed as a check.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/expansion_speed.py
    python benchmarks/expansion_speed.py --device cuda --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import time

import ase.build
import numpy as np
import torch
from ase.collections import s22

from rholearn.models import DensityModel

OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
EXPANSIONS = ["featomic", "torch"]


def load_basis(path):
    """def2-universal-jkfit for H/C/N/O from PySCF, or a ``BasisSet.to_dict`` JSON file."""
    from rholearn.basis import BasisSet

    if path is None:
        from rhocalc.pyscf import basis_set

        return basis_set("def2-universal-jkfit", ["H", "C", "N", "O"])
    with open(path) as f:
        return BasisSet.from_dict(json.load(f))


def best_seconds(function, repeats: int, device: str) -> float:
    """Minimum over ``repeats`` calls of ``function()`` after one warm-up call."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--expansions", nargs="+", choices=EXPANSIONS, default=EXPANSIONS)
    parser.add_argument("--basis", help="BasisSet JSON instead of PySCF's def2-universal-jkfit")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    output = args.output or os.path.join(OUTPUT_DIR, f"expansion_speed_{args.device.split(':')[0]}.json")

    rng = np.random.default_rng(0)
    waters = []
    for _ in range(args.batch):
        atoms = ase.build.molecule("H2O")
        atoms.positions += 0.05 * rng.standard_normal(atoms.positions.shape)
        waters.append(atoms)
    cases = {"water": [waters[0]], f"{args.batch} waters": waters,
             "uracil dimer": [s22["Uracil_dimer_h-bonded"]]}
    basis = load_basis(args.basis)

    rows, predictions = {}, {}
    for expansion in args.expansions:
        print(expansion, flush=True)
        model = DensityModel(basis, descriptor="contracted", descriptor_options={"expansion": expansion})
        model.fit_descriptor(waters + cases["uracil dimer"])
        model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
        descriptor = model.descriptor
        rows[expansion] = {}
        for case, frames in cases.items():
            systems = descriptor.systems(frames)
            rows[expansion][case] = {
                "expansion_s": best_seconds(lambda: descriptor.module.expansion(systems), args.repeats, args.device),
                "predict_s": best_seconds(lambda: model.predict(frames), args.repeats, args.device),
            }
        predictions[expansion] = model.predict(cases["uracil dimer"])

    difference = None
    if len(predictions) == 2:
        a, b = predictions.values()
        difference = max(float((a.block(key).values - block.values).abs().max()) for key, block in b.items())

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n{device_name}, {args.dtype}, 1 torch thread; ms per molecule, min of {args.repeats}")
    print(f"{'':28}" + "".join(f"{e + ' expansion':>20}{e + ' predict':>18}" for e in args.expansions))
    for case, frames in cases.items():
        cells = []
        for expansion in args.expansions:
            row = rows[expansion][case]
            cells += [f"{1e3 * row['expansion_s'] / len(frames):.3f}", f"{1e3 * row['predict_s'] / len(frames):.3f}"]
        print(f"{case:28}" + "".join(f"{cell:>20}" if i % 2 == 0 else f"{cell:>18}" for i, cell in enumerate(cells)))
    if difference is not None:
        print(f"largest difference of the predicted coefficients (uracil dimer): {difference:.1e}")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump({"device": device_name, "dtype": args.dtype, "torch": torch.__version__,
                   "batch": args.batch, "max_difference": difference, "results": rows}, f, indent=1)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
