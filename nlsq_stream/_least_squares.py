"""``least_squares``: scipy's interface over the jitted engine.

This module turns user arguments into a ``Problem`` (static: the functions), a ``Config`` (static:
method, loss, ...) and traced arrays, runs ``_engine.solve`` and shapes the answer like scipy's
``OptimizeResult``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from . import _engine, _validate
from ._losses import LOSSES
from ._pipeline import PreparedFit, check_sinks, run_sync
from ._result import STATUS_MESSAGES, OptimizeResult

_SHAPE_CACHE: dict[Any, tuple[int, ...]] = {}
_SHAPE_CACHE_MAX = 256


@dataclasses.dataclass(frozen=True)
class LeastSquaresProblem:
    """Residuals ``fun(x, *args, **kwargs)``; ``data`` is the pair ``(args, kwargs)``."""

    fun: Callable[..., Any]
    jac: Callable[..., Any] | None = None

    def residual(self, x: Array, data: Any) -> Array:
        args, kwargs = data
        return jnp.ravel(self.fun(x, *args, **kwargs))

    def residual_and_jt(self, x: Array, data: Any) -> tuple[Array, Array]:
        if self.jac is None:
            return _engine.forward_residual_and_jt(lambda p: self.residual(p, data), x)
        args, kwargs = data
        j = jnp.asarray(self.jac(x, *args, **kwargs), x.dtype)
        return self.residual(x, data), j.reshape(-1, x.shape[0]).T


def output_shape(
    problem: Any, x0: np.ndarray, data: Any, raw: Callable[..., Any]
) -> tuple[int, ...]:
    """Shape of ``raw(x, data)`` found by tracing once per (problem, shapes, dtypes)."""
    key: Any = _engine.shape_key(problem, x0, data)
    try:
        return _SHAPE_CACHE[key]
    except KeyError:
        pass
    except TypeError:  # unhashable static parts: just trace
        key = None
    shape = tuple(jax.eval_shape(raw, jax.ShapeDtypeStruct(x0.shape, x0.dtype), data).shape)
    if key is not None:
        if len(_SHAPE_CACHE) >= _SHAPE_CACHE_MAX:
            _SHAPE_CACHE.clear()
        _SHAPE_CACHE[key] = shape
    return shape


def _check_data_tree(name: str, tree: Any) -> Any:
    def conv(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return leaf
        arr = np.asarray(leaf)
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise TypeError(
                f"`{name}` may hold only numbers and arrays (they are traced into the compiled "
                f"solver), got {type(leaf).__name__}: {leaf!r:.60}"
            )
        return leaf

    return jax.tree_util.tree_map(conv, tree)


DEVICE_PUT_BYTES = 1 << 20


def _data_bytes(data: Any) -> int:
    return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(data))


def run(
    problem: Any,
    config: _engine.Config,
    x0: np.ndarray,
    lb: np.ndarray,
    ub: np.ndarray,
    data: Any,
    x_scale: np.ndarray,
    tols: tuple[float, float, float],
    f_scale: float,
    max_nfev: int,
    channel: Any = None,
    key: Any = None,
) -> OptimizeResult:
    """Run the compiled solver and build the scipy-shaped result (host values as numpy).

    With a ``channel`` (and ``config.emitter`` set) the fit runs in chunks whose records go to the
    channel (see ``_emitter.run_chunks``); ``key`` names the problem for the channel's timing.
    """
    dtype = x0.dtype
    if _data_bytes(data) > DEVICE_PUT_BYTES:
        # A numpy argument is copied on every call of a compiled function, and more slowly than
        # by device_put (3.5 ms against 1.6 ms for 2 x 1e6 float64 here): move large data once.
        data = jax.device_put(data)
    vectors = np.empty((4, x0.shape[0]), dtype)
    vectors[0], vectors[1], vectors[2], vectors[3] = x0, lb, ub, x_scale
    scalars = np.array([tols[0], tols[1], tols[2], f_scale, max_nfev], dtype)
    if channel is None:
        out = _engine.solve(problem, config, vectors, scalars, data)
        v = _engine.unpack(_engine.fetch(out.packed), x0.shape[0])
        fun, jac = out.fun, out.jac
    else:
        from ._emitter import run_chunks

        v, fun, jac = run_chunks(channel, problem, config, vectors, scalars, data, key)
    status = v["status"]
    if status == _engine.STATUS_NONFINITE_START:
        raise ValueError(
            "Residuals are not finite at the initial point: check `x0`/`p0` and the model "
            "(it returned NaN or inf there)"
        )
    x = v["x"]
    if config.has_bounds:
        active = find_active_constraints(x, lb, ub, tols[1])
    else:
        active = np.zeros(x.shape, dtype=int)
    return OptimizeResult(
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


def least_squares(
    fun: Callable[..., Any],
    x0: Any,
    jac: Callable[..., Any] | str | None = None,
    bounds: Any = (-np.inf, np.inf),
    method: str = "trf",
    ftol: float | None = 1e-8,
    xtol: float | None = 1e-8,
    gtol: float | None = 1e-8,
    x_scale: float | Sequence[float] | np.ndarray | str = 1.0,
    loss: str = "linear",
    f_scale: float = 1.0,
    max_nfev: int | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    verbose: int = 0,
    sinks: Sequence[Any] | None = None,
) -> OptimizeResult:
    """Solve a nonlinear least-squares problem with bounds, like ``scipy.optimize.least_squares``.

    ``fun(x, *args, **kwargs)`` returns the residual vector and is written with ``jax.numpy``. The
    whole iteration loop runs as one compiled program; the Jacobian comes from forward-mode
    autodiff unless ``jac`` is a callable. ``args`` and ``kwargs`` are traced (pass arrays), so new
    data reuses the compiled solver.

    :param method: ``"trf"`` (trust-region reflective, supports bounds) or ``"lm"``
        (Levenberg-Marquardt as in MINPACK, no bounds).
    :param loss: ``"linear"``, ``"soft_l1"``, ``"huber"``, ``"cauchy"`` or ``"arctan"``.
    :param verbose: 0 silent, 1 every 10th iteration, 2 every iteration, through the event pipeline.
    :param sinks: event consumers (see :mod:`nlsq_stream.sinks`); with ``verbose`` the console
        table is added unless a sink is given.
    :returns: an :class:`OptimizeResult` with scipy's fields. ``fun`` and ``jac`` stay on the device
        (``np.asarray`` copies them to the host).
    :raises ValueError, TypeError: for bad arguments, before anything is compiled.

    >>> import jax.numpy as jnp
    >>> rosen = lambda x: jnp.array([x[0] - 1.0, 10.0 * (x[1] - x[0] ** 2)])
    >>> res = least_squares(rosen, [0.0, 0.0])
    >>> [round(float(v), 6) for v in res.x]
    [1.0, 1.0]
    """
    prep = prepare_least_squares(
        fun,
        x0,
        jac,
        bounds,
        method,
        ftol,
        xtol,
        gtol,
        x_scale,
        loss,
        f_scale,
        max_nfev,
        args,
        kwargs,
        verbose,
        sinks,
    )
    return run_sync(prep)


def prepare_least_squares(
    fun: Callable[..., Any],
    x0: Any,
    jac: Callable[..., Any] | str | None = None,
    bounds: Any = (-np.inf, np.inf),
    method: str = "trf",
    ftol: float | None = 1e-8,
    xtol: float | None = 1e-8,
    gtol: float | None = 1e-8,
    x_scale: float | Sequence[float] | np.ndarray | str = 1.0,
    loss: str = "linear",
    f_scale: float = 1.0,
    max_nfev: int | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    verbose: int = 0,
    sinks: Sequence[Any] | None = None,
) -> PreparedFit:
    """Validate ``least_squares`` arguments (see there) into a :class:`PreparedFit`."""
    _validate.check_callable("fun", fun)
    jac = _validate.check_jac(jac)
    method = _validate.check_method(method)
    loss = _validate.check_loss(loss, LOSSES)
    verbose = _validate.check_verbose(verbose)
    sinks_v = check_sinks(sinks)
    args_t = _check_data_tree("args", tuple(args))
    kwargs_t = _check_data_tree("kwargs", dict(kwargs or {}))
    dtype = _validate.float_dtype(x0)
    x0a = _validate.check_x0("x0", x0, dtype)
    n = x0a.size
    lb, ub = _validate.prepare_bounds(bounds, n, dtype)
    has_bounds = _validate.has_bounds(bounds, lb, ub)
    if method == "lm" and has_bounds:
        raise ValueError(
            "`method`='lm' does not support `bounds`; use method='trf' for bounded problems"
        )
    if has_bounds:
        _validate.check_in_bounds("x0", x0a, lb, ub)
    xs = _validate.check_x_scale(x_scale, n, dtype)
    tols = _validate.check_tolerances(ftol, xtol, gtol, dtype)
    f_scale_v = _validate.check_positive_scalar("f_scale", f_scale)
    if method == "lm" and loss != "linear":
        raise ValueError(f"`loss`={loss!r} is not supported by `method`='lm'; use method='trf'")
    max_nfev_v = _validate.check_max_nfev(max_nfev, 100 * n)
    problem = LeastSquaresProblem(fun, jac)
    data = (args_t, kwargs_t)
    shape = output_shape(problem, x0a, data, lambda x, d: fun(x, *d[0], **d[1]))
    if len(shape) > 1:
        raise ValueError(f"`fun` must return a 1-D array of residuals, got shape {shape}")
    m = int(np.prod(shape))
    if method == "lm" and m < n:
        raise ValueError(
            f"`method`='lm' needs at least as many residuals as parameters: `fun` returns {m} "
            f"residuals for {n} parameters; use method='trf'"
        )
    if has_bounds:
        x0a = _strictly_feasible(x0a, lb, ub)
    config_kw = dict(method=method, loss=loss, has_bounds=has_bounds, jac_scale=isinstance(xs, str))
    x_scale_arr = np.ones(n, dtype) if isinstance(xs, str) else xs
    return PreparedFit(
        problem=problem,
        config_kw=config_kw,
        x0=x0a,
        lb=lb,
        ub=ub,
        data=data,
        x_scale=x_scale_arr,
        tols=tols,
        f_scale=f_scale_v,
        max_nfev=max_nfev_v,
        verbose=verbose,
        sinks=sinks_v,
        n_residuals=m,
        param_names=tuple(f"x[{i}]" for i in range(n)),
    )


def _strictly_feasible(
    x: np.ndarray, lb: np.ndarray, ub: np.ndarray, rstep: float = 1e-10
) -> np.ndarray:
    """Move a start on a bound slightly inside, as scipy's TRF does before it starts."""
    x = x.copy()
    lo = x <= lb
    x[lo] = lb[lo] + rstep * np.maximum(1, np.abs(lb[lo]))
    hi = x >= ub
    x[hi] = ub[hi] - rstep * np.maximum(1, np.abs(ub[hi]))
    tight = (x < lb) | (x > ub)
    x[tight] = 0.5 * (lb[tight] + ub[tight])
    return x
