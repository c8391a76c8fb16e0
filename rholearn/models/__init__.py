"""Equivariant models of density coefficients (lambda-SOAP in, coefficients out)."""

from .baseline import Baseline
from .density_model import DensityModel
from .kernel import KernelFeatures, KernelModel
from .linear import LinearModel
from .nonlinear import NonlinearModel

__all__ = [
    "Baseline", "DensityModel", "KernelFeatures", "KernelModel", "LinearModel", "NonlinearModel"
]
