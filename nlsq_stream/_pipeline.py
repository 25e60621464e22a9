"""Wires a validated fit to the engine and, when watched, to the event pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _engine
from ._least_squares import run
from ._result import OptimizeResult


def run_with_pipeline(
    *,
    problem: Any,
    config_kw: dict[str, Any],
    x0: np.ndarray,
    lb: np.ndarray,
    ub: np.ndarray,
    data: Any,
    x_scale: np.ndarray,
    tols: tuple[float, float, float],
    f_scale: float,
    max_nfev: int,
    verbose: int,
    sinks: Any,
    n_residuals: int,
    param_names: Any,
) -> OptimizeResult:
    if verbose or sinks:
        raise NotImplementedError("event streaming arrives with the event pipeline")
    config = _engine.Config(**config_kw)
    return run(problem, config, x0, lb, ub, data, x_scale, tols, f_scale, max_nfev)
