"""The whole pipeline in three calls: fit, evaluate, predict.

This package is the top layer of rholearn, one module per step
(:mod:`~rholearn.workflow.fitting`, :mod:`~rholearn.workflow.evaluation`,
:mod:`~rholearn.workflow.prediction`). The real-space errors and cube files need the
quantum-chemistry basis functions and the SCF density: they come from the
dataset's backend (:mod:`rholearn.backends`, registered by rhocalc), so rholearn
itself imports no quantum-chemistry code.

Typical use, after ``rhocalc pyscf structures.xyz --out dataset``::

    from rholearn import workflow
    result = workflow.fit("dataset", "run", workflow.FitOptions(n_train=80, n_val=10))
    # run/: options.yaml, split.json, model.pt, train.log, ... (rholearn.run)
    errors = workflow.evaluate(result.model, "dataset", result.split["test"])
    workflow.predict(result.model, new_frames, "predictions")
"""

from ..run import DESCRIPTOR_CACHE, MODEL_FILE, OPTIONS_FILE, PARITY_PLOT, SOLVE_FILE, SPLIT_FILE
from .evaluation import evaluate
from .fitters import FITTERS, LOSS_TARGETS, LOSSES, DirectFit, GradientFit
from .fitting import SOLVERS, SUBSETS, FitOptions, FitResult, fit
from .prediction import (
    CUBE_FILE,
    CUBE_TOLERANCE,
    PREDICTION_INFO_FILE,
    PREDICTION_MARKER,
    CubeResolutionWarning,
    earlier_predictions,
    predict,
    predict_in_batches,
)

__all__ = [
    "CUBE_FILE", "CUBE_TOLERANCE", "CubeResolutionWarning", "DESCRIPTOR_CACHE", "DirectFit",
    "FITTERS", "FitOptions", "FitResult", "GradientFit", "LOSSES", "LOSS_TARGETS", "MODEL_FILE",
    "OPTIONS_FILE", "PARITY_PLOT", "PREDICTION_INFO_FILE", "PREDICTION_MARKER", "SOLVERS",
    "SOLVE_FILE", "SPLIT_FILE", "SUBSETS",
    "earlier_predictions", "evaluate", "fit", "predict", "predict_in_batches",
]
