"""Writers of FHI-aims RI output files, for tests only.

They write a canonical-order target (made with PySCF) in the layouts aims
uses, implementing the conventions independently of ``rhocalc.aims.order``
(an aims file value = Condon-Shortley sign for odd m > 0 times the canonical
value, at aims' own position), so that parsing the files back pins them.
"""

import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIES_DIR = os.path.join(HERE, "species")
"""Hand-written species blocks for H and O in aims' format (test data)."""


def write_values(path, values):
    np.savetxt(path, np.asarray(values).reshape(-1), fmt="%.16e")


def write_basis_definition(path, basis, symbols):
    """``basis_info.out`` / ``product_basis_definition.out``: one block per atom."""
    with open(path, "w") as f:
        for atom, symbol in enumerate(symbols, start=1):
            n_radial = basis.n_radial(symbol)
            max_l = max(n_radial)
            f.write(f" atom {atom:11d}\n")
            for l in range(max_l + 1):
                f.write(f" For L = {l:12d} there are {n_radial.get(l, 0):11d} radial functions\n")
            f.write(f" For atom {atom:12d} max L = {max_l:12d}\n")


def write_2024_run(directory, symbols, basis, coefficients, projections, overlap, triu=True):
    """Files of aims >= 240926: canonical order and sign, overlap as upper triangle or full."""
    os.makedirs(directory, exist_ok=True)
    write_basis_definition(os.path.join(directory, "basis_info.out"), basis, symbols)
    write_values(os.path.join(directory, "ri_restart_coeffs.out"), coefficients)
    write_values(os.path.join(directory, "ri_projections.out"), projections)
    if triu:
        write_values(os.path.join(directory, "ri_ovlp.out"), overlap[np.triu_indices(len(overlap))])
    else:
        write_values(os.path.join(directory, "ri_ovlp.out"), overlap)


def aims_internal_labels(basis, symbols, rng):
    """``(atom, l, n, m)`` of each function in an aims-like internal order: per atom,
    its radial functions in a shuffled order (aims sorts them by extent, mixing l),
    m ascending within each."""
    labels = []
    for atom, symbol in enumerate(symbols):
        radial = [(l, n) for l, count in basis.n_radial(symbol).items() for n in range(count)]
        for k in rng.permutation(len(radial)):
            l, n = radial[k]
            labels.extend((atom, l, n, m) for m in range(-l, l + 1))
    return labels


def write_2022_run(directory, symbols, basis, coefficients, projections, overlap, rng):
    """Files of aims 221103: internal order, Condon-Shortley sign on odd m > 0, N*N overlap."""
    os.makedirs(directory, exist_ok=True)
    canonical = {f: i for i, f in enumerate(basis.functions(symbols))}
    labels = aims_internal_labels(basis, symbols, rng)
    index = np.array([canonical[label] for label in labels])
    sign = np.array([-1.0 if m > 0 and m % 2 == 1 else 1.0 for *_, m in labels])
    write_values(os.path.join(directory, "ri_coeffs.out"), sign * coefficients[index])
    write_values(os.path.join(directory, "ri_projs.out"), sign * projections[index])
    write_values(
        os.path.join(directory, "ri_ovlp.out"),
        sign[:, None] * overlap[np.ix_(index, index)] * sign[None, :],
    )
    write_basis_definition(
        os.path.join(directory, "product_basis_definition.out"), basis, symbols
    )
    position = {label: p for p, label in enumerate(labels)}
    with open(os.path.join(directory, "product_basis_idxs.out"), "w") as f:
        for atom, l, n, m in basis.functions(symbols):  # rows in canonical order, as aims
            n_radial = basis.n_radial(symbols[atom])
            cumulative = sum(n_radial[k] for k in n_radial if k < l) + n
            f.write(f"{position[(atom, l, n, m)] + 1:8d} {atom + 1:6d} {l:4d} "
                    f"{cumulative + 1:6d} {m:4d}\n")
    return labels


def write_grid_files(directory, points, names_and_values):
    """Grid files ``x y z value`` on the same points."""
    for name, values in names_and_values.items():
        np.savetxt(os.path.join(directory, name), np.column_stack([points, values]), fmt="%.16e")
