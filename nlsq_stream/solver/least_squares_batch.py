"""``least_squares_batch``'s arguments, checked: N residual problems of one function, batched.

``x0`` is (N, n): one start per problem. Each array in ``args`` has the problems on its first
axis (``args[j][i]`` is problem ``i``'s); ``kwargs`` are shared by all. Bounds are shared or per
problem, as for ``curve_fit_batch``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from . import validate
from .curve_fit_batch import PreparedBatch, _bounds, _options, _p0, batch_problem
from .least_squares import LeastSquaresProblem, _check_data_tree, output_shape


def prepare_least_squares_batch(
    fun: Callable[..., Any],
    x0: Any,
    jac: Callable[..., Any] | str | None = None,
    bounds: Any = (-np.inf, np.inf),
    method: str = "trf",
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> PreparedBatch:
    """Validate ``least_squares_batch`` arguments (see ``nlsq_stream.least_squares_batch``)."""
    validate.check_callable("fun", fun)
    jac_fn = validate.check_jac(jac)
    x0a = np.asarray(x0)
    if x0a.ndim != 2 or 0 in x0a.shape:
        raise ValueError(f"`x0` must be 2-D (N problems, n parameters), got shape {x0a.shape}")
    n_fits, n = x0a.shape
    dtype = validate.float_dtype(x0a)
    args_t = tuple(np.asarray(a) for a in _check_data_tree("args", tuple(args)))
    for j, a in enumerate(args_t):
        if a.ndim == 0 or a.shape[0] != n_fits:
            raise ValueError(
                f"`args[{j}]` must have the {n_fits} problems on its first axis, got {a.shape}"
            )
    kwargs_t = _check_data_tree("kwargs", dict(kwargs or {}))
    lb, ub = _bounds(bounds, n_fits, n, dtype)
    has_bounds = bool(np.isfinite(lb).any() or np.isfinite(ub).any())
    x0b = _p0(x0a, lb, ub, n_fits, n, dtype, has_bounds)
    method = validate.check_method(method)
    if method == "lm" and has_bounds:
        raise ValueError("`method`='lm' does not support `bounds`; use method='trf'")
    unknown = sorted(
        set(options) - {"ftol", "xtol", "gtol", "x_scale", "loss", "f_scale", "max_nfev", "verbose"}
    )
    if unknown:
        raise TypeError(f"least_squares_batch() got unexpected keyword argument(s) {unknown}")
    opts = _options({"x_scale": 1.0, **options}, method, n, dtype)
    opts["max_nfev"] = validate.check_max_nfev(options.get("max_nfev"), 100 * n)
    problem = LeastSquaresProblem(fun, jac_fn)
    data = (args_t, kwargs_t)
    m = _residual_count(problem, fun, x0b[0], args_t, kwargs_t)
    if method == "lm" and m < n:
        raise ValueError(f"`method`='lm' needs at least {n} residuals, `fun` returns {m}")
    leaves = jax.tree_util.tree_leaves(data)
    n_args = len(jax.tree_util.tree_leaves(args_t))
    axes = tuple(0 if i < n_args else None for i in range(len(leaves)))
    return batch_problem(
        problem,
        method,
        has_bounds,
        (x0b, lb, ub),
        opts,
        data,
        axes,
        points=np.full(n_fits, m),
        absolute_sigma=False,
        param_names=tuple(f"x[{i}]" for i in range(n)),
    )


def _residual_count(
    problem: LeastSquaresProblem,
    fun: Callable[..., Any],
    x0: np.ndarray,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> int:
    """Residuals per problem, from tracing ``fun`` on the first problem's arguments."""
    first = (tuple(a[0] for a in args), kwargs)
    shape = output_shape(problem, x0, first, lambda x, d: fun(x, *d[0], **d[1]))
    if len(shape) > 1:
        raise ValueError(f"`fun` must return a 1-D array of residuals, got shape {shape}")
    return int(np.prod(shape))
