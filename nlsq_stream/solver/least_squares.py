"""``least_squares``'s arguments, checked: a residual function becomes a problem the engine runs.

``prepare_least_squares`` turns user arguments into a ``LeastSquaresProblem`` (static: the
functions), the static options and the traced arrays of a :class:`~.fit.PreparedFit`. The public
``nlsq_stream.least_squares`` (in ``faces``) runs it, watched or not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from . import engine, validate
from .fit import PreparedFit
from .losses import LOSSES

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
            return engine.forward_residual_and_jt(lambda p: self.residual(p, data), x)
        args, kwargs = data
        j = jnp.asarray(self.jac(x, *args, **kwargs), x.dtype)
        return self.residual(x, data), j.reshape(-1, x.shape[0]).T


def output_shape(
    problem: Any, x0: np.ndarray, data: Any, raw: Callable[..., Any]
) -> tuple[int, ...]:
    """Shape of ``raw(x, data)`` found by tracing once per (problem, shapes, dtypes)."""
    key: Any = engine.shape_key(problem, x0, data)
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
) -> PreparedFit:
    """Validate ``least_squares`` arguments (see ``nlsq_stream.least_squares``) into a
    :class:`PreparedFit`; nothing is compiled or started."""
    validate.check_callable("fun", fun)
    jac = validate.check_jac(jac)
    method = validate.check_method(method)
    loss = validate.check_loss(loss, LOSSES)
    verbose = validate.check_verbose(verbose)
    args_t = _check_data_tree("args", tuple(args))
    kwargs_t = _check_data_tree("kwargs", dict(kwargs or {}))
    dtype = validate.float_dtype(x0)
    x0a = validate.check_x0("x0", x0, dtype)
    n = x0a.size
    lb, ub = validate.prepare_bounds(bounds, n, dtype)
    has_bounds = validate.has_bounds(bounds, lb, ub)
    if method == "lm" and has_bounds:
        raise ValueError(
            "`method`='lm' does not support `bounds`; use method='trf' for bounded problems"
        )
    if has_bounds:
        validate.check_in_bounds("x0", x0a, lb, ub)
    xs = validate.check_x_scale(x_scale, n, dtype)
    tols = validate.check_tolerances(ftol, xtol, gtol, dtype)
    f_scale_v = validate.check_positive_scalar("f_scale", f_scale)
    if method == "lm" and loss != "linear":
        raise ValueError(f"`loss`={loss!r} is not supported by `method`='lm'; use method='trf'")
    max_nfev_v = validate.check_max_nfev(max_nfev, 100 * n)
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
