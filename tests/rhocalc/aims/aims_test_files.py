"""Writers of FHI-aims RI output files, for tests only.

They write a canonical-order target (made with PySCF) in the layouts aims
uses, implementing the conventions independently of ``rhocalc.aims.order``
(an aims file value = Condon-Shortley sign for odd m > 0 times the canonical
value, at aims' own position), so that parsing the files back pins them.

Layouts (see docs/aims.md): aims >= 240403 writes canonical files; aims
221103 its internal order with ``idx_prodbas_details.out`` (or
``idx_prodbas.out``) and ``prodbas_condon_shotley_list.out``; 2023
development builds the internal order under other names, with
``product_basis_idxs.out``. ``aims.out`` holds the lines aims prints that the
parser reads (format of aims' write statements).
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


def write_aims_out(directory, version, n_spin_channels=1, lattice=None):
    """The lines of aims.out the parser reads; ``lattice`` (3 x 3, Angstrom) for periodic runs."""
    lines = [
        "          Invoking FHI-aims ...",
        f"          FHI-aims version      : {version}",
        f"  | Number of spin channels           :        {n_spin_channels}",
    ]
    if lattice is None:
        lines.append("  | No unit cell requested.")
    else:
        lines.append("  | Unit cell:")
        lines.extend("  |" + "".join(f"{x:18.8f}" for x in row) for row in lattice)
    lines.append("  | Atomic structure:")
    lines.append("          Have a nice day.")
    with open(os.path.join(directory, "aims.out"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_2024_run(directory, symbols, basis, coefficients, projections, overlap, triu=True,
                   version="240926", names=("ri_restart_coeffs.out", "ri_projections.out")):
    """Files of aims >= 240403: canonical order and sign, overlap as upper triangle or full;
    aims.out with ``version`` (none if ``None``)."""
    os.makedirs(directory, exist_ok=True)
    if version is not None:
        write_aims_out(directory, version)
    write_basis_definition(os.path.join(directory, "basis_info.out"), basis, symbols)
    write_values(os.path.join(directory, names[0]), coefficients)
    write_values(os.path.join(directory, names[1]), projections)
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


OLD_LAYOUTS = {
    # version, coefficients, projections, basis definition, order file(s)
    "221103": ("221103", "ri_restart_coeffs.out", "ri_projections.out", "basis_info.out",
               ("idx_prodbas_details.out", "prodbas_condon_shotley_list.out")),
    "221103-index": ("221103", "ri_restart_coeffs.out", "ri_projections.out", "basis_info.out",
                     ("idx_prodbas.out", "prodbas_condon_shotley_list.out")),
    # a date below 240403 standing for the 2023 development builds (their version is not known)
    "2023-development": ("230905", "ri_coeffs.out", "ri_projs.out",
                         "product_basis_definition.out", ("product_basis_idxs.out",)),
}


def write_old_run(directory, layout, symbols, basis, coefficients, projections, overlap, rng,
                  aims_out=True):
    """Files of aims < 240403 in one of :data:`OLD_LAYOUTS`: internal order,
    Condon-Shortley sign on odd m > 0, N*N overlap. Returns the internal labels."""
    version, coefficients_name, projections_name, basis_name, order_files = OLD_LAYOUTS[layout]
    os.makedirs(directory, exist_ok=True)
    if aims_out:
        write_aims_out(directory, version)
    canonical = {f: i for i, f in enumerate(basis.functions(symbols))}
    labels = aims_internal_labels(basis, symbols, rng)
    index = np.array([canonical[label] for label in labels])
    sign = np.array([-1.0 if m > 0 and m % 2 == 1 else 1.0 for *_, m in labels])
    write_values(os.path.join(directory, coefficients_name), sign * coefficients[index])
    write_values(os.path.join(directory, projections_name), sign * projections[index])
    write_values(
        os.path.join(directory, "ri_ovlp.out"),
        sign[:, None] * overlap[np.ix_(index, index)] * sign[None, :],
    )
    write_basis_definition(os.path.join(directory, basis_name), basis, symbols)
    position = {label: p for p, label in enumerate(labels)}
    rows = []
    for atom, l, n, m in basis.functions(symbols):  # rows in canonical order, as aims
        n_radial = basis.n_radial(symbols[atom])
        cumulative = sum(n_radial[k] for k in n_radial if k < l) + n
        rows.append((position[(atom, l, n, m)] + 1, atom + 1, l, cumulative + 1, m))
    for name in order_files:
        with open(os.path.join(directory, name), "w") as f:
            if name == "idx_prodbas.out":
                f.writelines(f"{row[0]:8d}\n" for row in rows)
            elif name == "prodbas_condon_shotley_list.out":
                f.writelines(f"{p + 1:8d}\n" for p in np.flatnonzero(sign < 0))
            else:
                f.writelines("{:8d} {:6d} {:4d} {:6d} {:4d}\n".format(*row) for row in rows)
    return labels


def write_grid_files(directory, points, names_and_values, rng=None):
    """Grid files ``x y z value`` on the same points; each file in its own random point
    order if ``rng`` is given (aims need not write them in one order)."""
    for name, values in names_and_values.items():
        table = np.column_stack([points, values])
        if rng is not None:
            table = table[rng.permutation(len(table))]
        np.savetxt(os.path.join(directory, name), table, fmt="%.16e")
