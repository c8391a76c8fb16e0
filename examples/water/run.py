"""The whole pipeline on a built-in dataset of distorted water molecules.

1. makes ``--n-structures`` water molecules with random bond lengths, angles and
   orientations (fixed seed);
2. computes their targets with PySCF (PBE/def2-svp SCF, density fitted onto
   def2-universal-jkfit) into ``OUT/dataset`` (resumable: rerun and finished
   structures are skipped);
3. trains a linear equivariant model on lambda-SOAP descriptors with the
   overlap (real-space L2) loss into ``OUT/run``;
4. prints the test-set errors (relative L2, SALTED % RMSE, real-space L1 against
   the RI and the SCF densities) and writes them to ``OUT/test_errors.json`` and a
   chemiscope map ``OUT/test_errors.chemiscope.json.gz``;
5. predicts the density of a new water molecule without any SCF and writes it
   as a cube file ``OUT/prediction/0/density.cube``.

Run it with ``bash install/run-example.sh`` (which sets up ``.venv`` first) or
``python examples/water/run.py --help``.
"""

import argparse
import functools
import json
import os
import time

import numpy as np

from rhocalc.batch import run_batch
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets
from rhocalc.structures import distorted_waters
from rholearn import workflow
from rholearn.train import TrainOptions
from rholearn.visualise import write_chemiscope


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/water-example", help="output folder")
    parser.add_argument("--n-structures", type=int, default=60)
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-val", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30, help="LBFGS epochs")
    parser.add_argument("--workers", type=int, default=2, help="processes for PySCF")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    timings = {}

    frames = distorted_waters(args.n_structures + 1, args.seed)
    new_structure, frames = frames[-1], frames[:-1]
    options = PySCFOptions(xc="PBE", basis="def2-svp", auxbasis="def2-universal-jkfit")
    dataset = os.path.join(args.out, "dataset")

    print(f"[1/4] PySCF targets for {len(frames)} water molecules -> {dataset}", flush=True)
    start = time.perf_counter()
    report = run_batch(
        frames, dataset, functools.partial(compute_targets, options=options),
        basis_set(options.auxbasis, ["H", "O"]), n_workers=args.workers,
        settings=options.dataset_settings(),
    )
    timings["targets_seconds"] = time.perf_counter() - start
    print(f"      {len(report.done)} computed, {len(report.skipped)} already there, "
          f"{len(report.failed)} failed", flush=True)

    print("[2/4] training a linear model (lambda-SOAP, overlap loss, LBFGS)", flush=True)
    start = time.perf_counter()
    fit_options = workflow.FitOptions(
        model="linear", loss="overlap", n_train=args.n_train, n_val=args.n_val,
        split_seed=args.seed,
        train=TrainOptions(
            epochs=args.epochs, optimizer="lbfgs", learning_rate=1.0, batch_size=16,
            scheduler=None, early_stopping_patience=10, checkpoint_every=5, verbose=False,
            seed=args.seed,
        ),
    )
    result = workflow.fit(dataset, os.path.join(args.out, "run"), fit_options, resume=True)
    timings["training_seconds"] = time.perf_counter() - start
    timings["seconds_per_epoch"] = float(np.mean([h["seconds"] for h in result.history]))

    print(f"[3/4] evaluating on {len(result.split['test'])} test structures", flush=True)
    errors = workflow.evaluate(result.model, dataset, result.split["test"])
    timings["predict_seconds_per_structure"] = errors["seconds"]["predict_per_structure"]
    chemiscope_map = os.path.join(args.out, "test_errors.chemiscope.json.gz")
    write_chemiscope(chemiscope_map, [frames[i] for i in result.split["test"]], errors["structures"])

    print("[4/4] predicting a new structure -> cube file", flush=True)
    start = time.perf_counter()
    folders = workflow.predict(result.model, [new_structure], os.path.join(args.out, "prediction"), cube=True)
    timings["predict_with_cube_seconds"] = time.perf_counter() - start

    summary = errors["summary"]
    print()
    print(f"Test-set errors ({summary['n_structures']} structures, "
          f"trained on {len(result.split['train'])}):")
    rows = [
        ("relative L2 error vs RI density (overlap metric)", summary["relative_l2_percent"]),
        ("SALTED % RMSE vs RI coefficients", summary["rmse_percent"]),
        ("real-space L1 error vs RI density", summary["l1_vs_ri_percent"]),
        ("real-space L1 error vs SCF density", summary["l1_vs_scf_percent"]),
        ("  of which the RI basis itself (RI vs SCF)", summary["ri_l1_vs_scf_percent"]),
    ]
    for name, value in rows:
        print(f"  {name:<48s} {value:8.3f} %")
    print("Timings:")
    for name, value in timings.items():
        print(f"  {name:<48s} {value:8.3f} s")
    print(f"Predicted density: {os.path.join(folders[0], 'density.cube')}")
    print(f"Errors per structure: {chemiscope_map} (open at https://chemiscope.org)")
    with open(os.path.join(args.out, "test_errors.json"), "w") as f:
        json.dump({**errors, "timings": timings}, f, indent=1)


if __name__ == "__main__":
    main()
