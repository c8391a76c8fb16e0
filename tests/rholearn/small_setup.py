"""Cheap settings shared by the data and training tests: HF/sto-3g targets fitted
onto def2-universal-jfit, and a small lambda-SOAP (Angstrom)."""

from rhocalc.pyscf import PySCFOptions

OPTIONS = PySCFOptions(xc="HF", basis="sto-3g", auxbasis="def2-universal-jfit", grid_level=0)
HYPERS = {
    "cutoff": {"radius": 3.0, "smoothing": {"type": "ShiftedCosine", "width": 0.5}},
    "density": {"type": "Gaussian", "width": 0.3},
    "basis": {
        "type": "TensorProduct", "max_angular": 2, "radial": {"type": "Gto", "max_radial": 2}
    },
}
