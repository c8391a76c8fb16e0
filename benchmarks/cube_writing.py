"""Time to write a density cube: rholearn's slab-by-slab writer (rholearn.cube, through
rhocalc.pyscf.realspace.write_cube) against PySCF's ``cubegen.Cube`` (every point at
once, then ``Cube.write``), on the fitted density of one molecule, for several spacings.

    .venv/bin/python benchmarks/cube_writing.py --molecule C6H6 --spacings 0.2 0.1 0.06

Prints a table (points, seconds of each writer, file size) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import ase.build
from pyscf.data.nist import BOHR
from pyscf.tools.cubegen import Cube

from rholearn import layout
from rholearn.cube import cube_grid
from rhocalc.pyscf import PySCFOptions, basis_set, compute_targets
from rhocalc.pyscf.molecule import atoms_molecule
from rhocalc.pyscf.realspace import density_at_points, write_cube


def pyscf_cube(path, atoms, coefficients, basis, spacing, margin=3.0):
    """The writer rholearn used before: all points at once, PySCF's format."""
    cube = Cube(atoms_molecule(atoms), resolution=spacing / BOHR, margin=margin / BOHR)
    values = density_at_points(coefficients, atoms, basis, cube.get_coords() * BOHR)
    cube.write(values.reshape(cube.nx, cube.ny, cube.nz), path, comment="density")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecule", default="C6H6", help="a name ase.build.molecule knows")
    parser.add_argument("--spacings", type=float, nargs="+", default=[0.2, 0.1, 0.06],
                        help="cube spacings (Angstrom)")
    parser.add_argument("--output", default="benchmarks/output/cube_writing.json")
    args = parser.parse_args()

    atoms = ase.build.molecule(args.molecule)
    options = PySCFOptions(xc="HF", basis="sto-3g", auxbasis="def2-universal-jfit")
    basis = basis_set(options.auxbasis, atoms.get_chemical_symbols())
    coefficients = compute_targets(atoms, options=options).coefficients
    vector = layout.tensormap_to_vector(coefficients, atoms.numbers, basis)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for spacing in args.spacings:
            path = os.path.join(folder, "density.cube")
            start = time.perf_counter()
            write_cube(path, atoms, vector, basis, spacing=spacing)
            ours = time.perf_counter() - start
            size = os.path.getsize(path)
            start = time.perf_counter()
            pyscf_cube(path, atoms, vector, basis, spacing)
            theirs = time.perf_counter() - start
            rows.append({"spacing": spacing, "points": cube_grid(atoms, spacing).n_points,
                         "rholearn_seconds": ours, "pyscf_seconds": theirs,
                         "megabytes": size / 1e6})
    print(f"{args.molecule}, {len(basis.functions(atoms.get_chemical_symbols()))} "
          f"auxiliary functions ({basis.name})")
    print(f"{'spacing':>8s} {'points':>10s} {'rholearn s':>11s} {'pyscf s':>9s} {'MB':>7s}")
    for row in rows:
        print(f"{row['spacing']:8.3f} {row['points']:10d} {row['rholearn_seconds']:11.2f} "
              f"{row['pyscf_seconds']:9.2f} {row['megabytes']:7.1f}")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"molecule": args.molecule, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
