"""rhocalc: learning targets (density-fitting coefficients, overlaps, projections)."""

__version__ = "0.1.0"
