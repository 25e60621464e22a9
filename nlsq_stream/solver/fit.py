"""A validated fit and how the solver runs it: ``PreparedFit`` in, ``OptimizeResult`` out.

``prepare_least_squares`` and ``prepare_curve_fit`` check the user's arguments and build a
:class:`PreparedFit`; :func:`solve` runs it as one compiled program. A watched fit (the stream
stage) runs the same ``PreparedFit`` in chunks instead, from the same ``inputs()``, and turns the
engine's output into a result with the same ``result()``: the two paths cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from .._result import STATUS_MESSAGES, OptimizeResult
from . import engine

DEVICE_PUT_BYTES = 1 << 20


@dataclasses.dataclass
class PreparedFit:
    """A fit whose arguments passed validation: everything the engine needs, nothing started.

    ``verbose`` is the level of detail a watcher asked for (0 none, 1 every 10th iteration, 2
    every iteration); the solver itself only passes it on.
    """

    problem: Any
    config_kw: dict[str, Any]
    x0: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    data: Any
    x_scale: np.ndarray
    tols: tuple[float, float, float]
    f_scale: float
    max_nfev: int
    verbose: int
    n_residuals: int
    param_names: tuple[str, ...]
    finalize: Callable[[OptimizeResult], None] | None = None

    def config(self, emitter: Any = None) -> engine.Config:
        """The static options of this fit's programs; ``emitter`` records iterations."""
        heap = engine.heap_limit(self.problem, self.x0, self.data, self.n_residuals)
        return engine.Config(**self.config_kw, emitter=emitter, heap=heap)

    def inputs(self) -> tuple[np.ndarray, np.ndarray, Any]:
        """The engine's traced arguments: ``(vectors, scalars, data)`` (see ``engine.solve``)."""
        dtype = self.x0.dtype
        data = self.data
        if _data_bytes(data) > DEVICE_PUT_BYTES:
            # A numpy argument is copied on every call of a compiled function, and more slowly
            # than by device_put (3.5 ms against 1.6 ms for 2 x 1e6 float64 here): move large
            # data once.
            data = jax.device_put(data)
        vectors = np.empty((4, self.x0.shape[0]), dtype)
        vectors[0], vectors[1], vectors[2], vectors[3] = self.x0, self.lb, self.ub, self.x_scale
        t = self.tols
        scalars = np.array([t[0], t[1], t[2], self.f_scale, self.max_nfev], dtype)
        return vectors, scalars, data

    def result(
        self, config: engine.Config, v: dict[str, Any], fun: Any, jac: Any
    ) -> OptimizeResult:
        """The scipy-shaped result from the engine's unpacked output ``v`` (host values as numpy).

        :raises ValueError: the residuals were not finite at the start.
        """
        status = v["status"]
        if status == engine.STATUS_NONFINITE_START:
            raise ValueError(
                "Residuals are not finite at the initial point: check `x0`/`p0` and the model "
                "(it returned NaN or inf there)"
            )
        x = v["x"]
        if config.has_bounds:
            active = find_active_constraints(x, self.lb, self.ub, self.tols[1])
        else:
            active = np.zeros(x.shape, dtype=int)
        res = OptimizeResult(
            x=x,
            cost=v["cost"],
            fun=fun,
            jac=jac,
            grad=v["grad"],
            optimality=v["optimality"],
            active_mask=active,
            nfev=v["nfev"],
            njev=v["njev"],
            nit=v["nit"],
            status=status,
            message=STATUS_MESSAGES[status],
            success=status > 0,
            cov_unscaled=v["cov"],
        )
        if self.finalize is not None:
            self.finalize(res)
        return res


def solve(prep: PreparedFit) -> OptimizeResult:
    """Run ``prep`` unwatched: one compiled program, one transfer of its results to the host."""
    config = prep.config()
    vectors, scalars, data = prep.inputs()
    out = engine.solve(prep.problem, config, vectors, scalars, data)
    v = engine.unpack(engine.fetch(out.packed), prep.x0.shape[0])
    return prep.result(config, v, out.fun, out.jac)


def _data_bytes(data: Any) -> int:
    return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(data))


def find_active_constraints(
    x: np.ndarray, lb: np.ndarray, ub: np.ndarray, rtol: float
) -> np.ndarray:
    """-1/0/1 per parameter for lower-active/free/upper-active, as scipy reports ``active_mask``."""
    active = np.zeros(x.shape, dtype=int)
    lower_dist = x - lb
    upper_dist = ub - x
    lower_thr = rtol * np.maximum(1, np.abs(lb))
    upper_thr = rtol * np.maximum(1, np.abs(ub))
    with np.errstate(invalid="ignore"):
        active[np.isfinite(lb) & (lower_dist <= np.minimum(upper_dist, lower_thr))] = -1
        active[np.isfinite(ub) & (upper_dist <= np.minimum(lower_dist, upper_thr))] = 1
    return active
