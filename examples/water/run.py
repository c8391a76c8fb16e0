"""The whole pipeline on a built-in dataset of distorted water molecules.

1. makes ``--n-structures`` water molecules with random bond lengths, angles and
   orientations (fixed seed);
2. computes their targets with PySCF (PBE/def2-svp SCF, density fitted onto
   def2-universal-jkfit) into ``OUT/dataset`` (resumable: rerun and finished
   structures are skipped);
3. trains the default model (sparse equivariant kernel on the contracted
   lambda-SOAP, solved directly in the overlap metric, the regularisation chosen
   on validation structures) into ``OUT/run``;
4. prints the test-set errors (relative L2, SALTED % RMSE, real-space L1 against
   the RI and the SCF densities) and writes, in ``OUT/evaluation``, the errors
   (``errors.json``), a chemiscope map with per-atom errors
   (``errors.chemiscope.json.gz``), a parity plot (``parity.png``) and the
   predicted coefficients of each test structure;
5. predicts the density of a new water molecule without any SCF and writes it
   as a cube file ``OUT/prediction/new-water/density.cube``.

Run it with ``bash install/run-example.sh`` (which sets up ``.venv`` first) or
``python examples/water/run.py --help``.
"""

import argparse
import functools
import os
import time

from rhocalc.batch import run_batch
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets
from rhocalc.structures import distorted_waters
from rholearn import workflow
from rholearn.files import write_json
from rholearn.visualise import write_chemiscope


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/water-example", help="output folder")
    parser.add_argument("--n-structures", type=int, default=60)
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-val", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="processes for PySCF")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    timings = {}

    frames = distorted_waters(args.n_structures + 1, args.seed)
    new_structure, frames = frames[-1], frames[:-1]
    new_structure.info["name"] = "new-water"  # the name of its prediction folder
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

    print("[2/4] training the default model (kernel on lambda-SOAP, direct solve)", flush=True)
    start = time.perf_counter()
    fit_options = workflow.FitOptions(n_train=args.n_train, n_val=args.n_val, split_seed=args.seed)
    result = workflow.fit(dataset, os.path.join(args.out, "run"), fit_options, resume=True)
    timings["training_seconds"] = time.perf_counter() - start

    print(f"[3/4] evaluating on {len(result.split['test'])} test structures", flush=True)
    evaluation = os.path.join(args.out, "evaluation")
    errors = workflow.evaluate(result.model, dataset, result.split["test"], out=evaluation)
    timings["predict_seconds_per_structure"] = errors["seconds"]["predict_per_structure"]
    chemiscope_map = os.path.join(evaluation, "errors.chemiscope.json.gz")
    write_chemiscope(
        chemiscope_map, [frames[i] for i in result.split["test"]], errors["structures"],
        name="rholearn water example: test-set errors",
        description=f"{len(result.split['train'])} training structures, default model",
    )

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
    print(f"Errors per structure and atom: {chemiscope_map} (open at https://chemiscope.org)")
    print(f"Parity plot: {os.path.join(evaluation, workflow.PARITY_PLOT)}")
    write_json(os.path.join(evaluation, "errors.json"), {**errors, "timings": timings})


if __name__ == "__main__":
    main()
