"""``curve_fit_batch``'s arguments, checked: N datasets of one model become one batched problem.

Shapes: ``ydata`` (N, m); ``xdata`` shared (m,) or per fit (N, m); with k inputs per point
shared (k, m) or per fit (N, k, m) (a 2-D ``xdata`` whose first axis is N is per fit);
``p0`` (p,) or (N, p); ``sigma`` (m,) or (N, m); each bound a scalar, (p,) or (N, p).
Ragged data: a point is absent where ``mask`` is False, or where ``ydata`` is NaN with
``nan_policy="omit"``. An absent point has weight 0 (as if it were not there: cost, degrees of
freedom and pcov count only the points present). A fit's own bad data (NaN without
``nan_policy="omit"``, too few points) fail that fit only; arguments that are wrong for the whole
batch raise here, before anything runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from .._result import BatchResult
from . import engine, validate
from .batch import BatchOutput, BatchProblem, TrialCounter
from .curve_fit import CurveFitProblem, _least_squares_kwargs, _positional_counts, parameter_names
from .losses import LOSSES

NAN_POLICIES = (None, "propagate", "omit", "raise")
STATUS_TOO_FEW_POINTS = -4


@dataclasses.dataclass
class PreparedBatch:
    """A validated batch and what turns the engine's output into a :class:`BatchResult`."""

    batch: BatchProblem
    points: np.ndarray  # (N,) data points present per fit
    absolute_sigma: bool
    param_names: tuple[str, ...]
    method: str
    verbose: int

    @property
    def n_fits(self) -> int:
        return self.batch.n_fits

    def result(self, out: BatchOutput) -> BatchResult:
        """Scale pcov per fit as scipy does, and give failed fits NaN parameters."""
        n = out.x.shape[1]
        status = out.status.copy()
        status[self.points < n if self.method == "lm" else self.points == 0] = STATUS_TOO_FEW_POINTS
        pcov = out.cov.copy()
        dof = self.points - n
        if not self.absolute_sigma:
            with np.errstate(invalid="ignore", divide="ignore"):  # inf * 0 where dof <= 0: NaN
                scale = np.where(dof > 0, 2.0 * out.cost / np.where(dof > 0, dof, 1), np.inf)
                pcov = pcov * scale[:, None, None]
        singular = np.isnan(out.cov).any(axis=(1, 2))
        pcov[singular] = np.inf
        failed = (status == engine.STATUS_NONFINITE_START) | (status == STATUS_TOO_FEW_POINTS)
        popt = out.x.copy()
        popt[failed] = np.nan
        pcov[failed] = np.nan
        cost = out.cost.copy()
        cost[failed] = np.nan
        return BatchResult(
            popt=popt,
            pcov=pcov,
            cost=cost,
            nfev=out.nfev.copy(),
            nit=out.nit.copy(),
            status=status,
            param_names=self.param_names,
        )


def prepare_curve_fit_batch(
    f: Callable[..., Any],
    xdata: Any,
    ydata: Any,
    p0: Any = None,
    sigma: Any = None,
    absolute_sigma: bool = False,
    bounds: Any = (-np.inf, np.inf),
    method: str | None = None,
    mask: Any = None,
    nan_policy: str | None = None,
    jac: Callable[..., Any] | str | None = None,
    **kwargs: Any,
) -> PreparedBatch:
    """Validate ``curve_fit_batch`` arguments (see ``nlsq_stream.curve_fit_batch``) into a
    :class:`PreparedBatch`; nothing is compiled or started."""
    validate.check_callable("f", f)
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"`nan_policy` must be one of {NAN_POLICIES}, got {nan_policy!r}")
    kwargs = _least_squares_kwargs(kwargs)
    y = _ydata(ydata)
    n_fits, m = y.shape
    dtype = validate.float_dtype(y.dtype, *(() if p0 is None else (p0,)))
    y = y.astype(dtype, copy=False)
    present = _present(y, mask, nan_policy, n_fits, m)
    x, x_axis = _xdata(xdata, n_fits, m, dtype)
    if x_axis == 0 and nan_policy == "omit":
        present &= _finite_points(x)
    names = parameter_names(f)
    n = _parameter_count(f, p0, names)
    lb, ub = _bounds(bounds, n_fits, n, dtype)
    has_bounds = bool(np.isfinite(lb).any() or np.isfinite(ub).any())
    x0 = _p0(p0, lb, ub, n_fits, n, dtype, has_bounds)
    method = _method(method, has_bounds, m, n)
    options = _options(kwargs, method, n, dtype)
    transform, kind = _weights(sigma, present, n_fits, m, dtype)
    y = np.where(present, y, 0.0).astype(dtype) if not present.all() else y
    if x_axis == 0 and not present.all():
        x = _zero_absent(x, present)
    data = (x, y, transform)
    axes = (x_axis, 0) + (() if transform is None else (0 if transform.ndim == 2 else None,))
    problem = CurveFitProblem(f, validate.check_jac(jac), kind)
    return batch_problem(
        problem,
        method,
        has_bounds,
        (x0, lb, ub),
        options,
        data,
        axes,
        points=present.sum(axis=1),
        absolute_sigma=bool(absolute_sigma),
        param_names=tuple(names) if names is not None and len(names) == n else (),
    )


def batch_problem(
    problem: Any,
    method: str,
    has_bounds: bool,
    starts_and_bounds: tuple[np.ndarray, np.ndarray, np.ndarray],
    options: dict[str, Any],
    data: Any,
    axes: tuple[int | None, ...],
    points: np.ndarray,
    absolute_sigma: bool,
    param_names: tuple[str, ...],
) -> PreparedBatch:
    """The engine's view of a checked batch: (N, 4, n) vectors of x0, lb, ub and x_scale, the
    shared scalars, and the static options (``options`` as ``_options`` returns them)."""
    x0, lb, ub = starts_and_bounds
    n_fits, n = x0.shape
    xs = options["x_scale"]
    vectors = np.empty((n_fits, 4, n), x0.dtype)
    vectors[:, 0], vectors[:, 1], vectors[:, 2] = x0, lb, ub
    vectors[:, 3] = 1.0 if isinstance(xs, str) else xs
    scalars = np.array([*options["tols"], options["f_scale"], options["max_nfev"]], x0.dtype)
    config = engine.Config(
        method=method,
        loss=options["loss"],
        has_bounds=has_bounds,
        jac_scale=isinstance(xs, str),
        emitter=TrialCounter(),
        fun_jac=False,
    )
    return PreparedBatch(
        batch=BatchProblem(problem, config, vectors, scalars, data, axes),
        points=points,
        absolute_sigma=absolute_sigma,
        param_names=param_names,
        method=method,
        verbose=options["verbose"],
    )


def _ydata(ydata: Any) -> np.ndarray:
    try:
        y = np.asarray(ydata)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`ydata` must be an array of numbers, got {ydata!r:.60}") from e
    if y.dtype.kind not in "biuf":
        raise TypeError(f"`ydata` must hold real numbers, got dtype {y.dtype}")
    if y.ndim != 2 or 0 in y.shape:
        raise ValueError(f"`ydata` must be 2-D (N fits, m points each), got shape {y.shape}")
    return y


def _present(y: np.ndarray, mask: Any, nan_policy: str | None, n_fits: int, m: int) -> np.ndarray:
    """Which points are present: ``mask`` and, with ``nan_policy="omit"``, finite ``ydata``."""
    present = np.ones((n_fits, m), bool)
    if mask is not None:
        mk = np.asarray(mask)
        if mk.dtype != np.bool_ or mk.shape != (n_fits, m):
            raise ValueError(
                f"`mask` must be a boolean array of ydata's shape {(n_fits, m)}, got "
                f"{mk.dtype} {mk.shape}"
            )
        present &= mk
    finite = np.isfinite(y)
    if nan_policy == "omit":
        present &= finite
    elif nan_policy == "raise" and not finite[present].all():
        bad = int(np.nonzero(~(finite | ~present).all(axis=1))[0][0])
        raise ValueError(f"`ydata[{bad}]` contains NaN or inf (nan_policy='raise')")
    return present


def _finite_points(x: np.ndarray) -> np.ndarray:
    """(N, m): every input of the point is finite (x is (N, m) or (N, k, m))."""
    ok = np.isfinite(x)
    return ok if ok.ndim == 2 else ok.all(axis=1)


def _zero_absent(x: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Absent points' inputs set to 0, so that a NaN there cannot reach the model's output."""
    where = present if x.ndim == 2 else present[:, None, :]
    return np.where(where, x, 0.0).astype(x.dtype)


def _xdata(xdata: Any, n_fits: int, m: int, dtype: np.dtype[Any]) -> tuple[np.ndarray, int | None]:
    """``xdata`` as an array and its batch axis: None when shared (m,), 0 when per fit."""
    try:
        x = np.asarray(xdata)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`xdata` must be an array of numbers, got {xdata!r:.60}") from e
    if x.dtype.kind not in "biuf":
        raise TypeError(f"`xdata` must hold real numbers, got dtype {x.dtype}")
    x = x.astype(dtype, copy=False)
    if x.shape == (m,):
        return x, None
    if x.ndim in (2, 3) and x.shape[0] == n_fits and x.shape[-1] == m:
        return x, 0
    if x.ndim == 2 and x.shape[-1] == m:  # k inputs, shared (k != N)
        return x, None
    raise ValueError(
        f"`xdata` must have shape ({m},) or (k, {m}) (shared), or ({n_fits}, {m}) or "
        f"({n_fits}, k, {m}) (per fit) for ydata of shape ({n_fits}, {m}), got {x.shape}"
    )


def _parameter_count(f: Callable[..., Any], p0: Any, names: list[str] | None) -> int:
    if p0 is None:
        if names is None:
            raise ValueError(
                "`p0` is needed: the number of parameters cannot be read from the model's "
                "signature (it needs f(x, a, b, ...) with named parameters)"
            )
        return len(names)
    shape = np.shape(p0)
    if len(shape) not in (1, 2) or shape[-1] == 0:
        raise ValueError(f"`p0` must have shape (p,) or (N, p), got {shape}")
    n = int(shape[-1])
    counts = _positional_counts(f)
    if counts is not None and not counts[0] <= n <= counts[1]:
        raise ValueError(f"`p0` has {n} values per fit but the model takes {counts[0]}-{counts[1]}")
    return n


def _bounds(
    bounds: Any, n_fits: int, n: int, dtype: np.dtype[Any]
) -> tuple[np.ndarray, np.ndarray]:
    """(N, n) lower and upper bounds from shared or per-fit ones."""
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError("`bounds` must be a pair (lower, upper)")
    out = []
    for name, b in zip(("lower", "upper"), bounds, strict=True):
        a = np.asarray(b, dtype=dtype)
        if a.ndim <= 1 and a.size in (1, n):
            a = np.broadcast_to(a.reshape(-1), (n,))
        elif a.shape != (n_fits, n):
            raise ValueError(
                f"`bounds` {name} must be a scalar, ({n},) or ({n_fits}, {n}), got {a.shape}"
            )
        out.append(np.broadcast_to(a, (n_fits, n)).astype(dtype))
    lb, ub = out
    if np.isnan(lb).any() or np.isnan(ub).any() or (lb >= ub).any():
        raise ValueError("`bounds`: each lower bound must be strictly less than its upper bound")
    return lb, ub


def _p0(
    p0: Any,
    lb: np.ndarray,
    ub: np.ndarray,
    n_fits: int,
    n: int,
    dtype: np.dtype[Any],
    has_bounds: bool,
) -> np.ndarray:
    """(N, n) starts: ``p0`` broadcast, checked finite and inside the bounds, nudged inside."""
    if p0 is None:
        x0 = np.ones((n_fits, n), dtype)
        both = np.isfinite(lb) & np.isfinite(ub)
        x0[both] = 0.5 * (lb[both] + ub[both])
    else:
        x0 = np.broadcast_to(np.asarray(p0, dtype=dtype), (n_fits, n)).copy()
    if not np.isfinite(x0).all():
        raise ValueError("`p0` must be finite")
    if has_bounds:
        outside = ((x0 < lb) | (x0 > ub)).any(axis=1)
        if outside.any():
            raise ValueError(f"`p0` of fit {int(np.nonzero(outside)[0][0])} is outside `bounds`")
        rstep = 1e-10
        lo, hi = x0 <= lb, x0 >= ub
        with np.errstate(invalid="ignore"):  # inf - inf where a side is unbounded: not used
            x0[lo] = (lb + rstep * np.maximum(1, np.abs(lb)))[lo]
            x0[hi] = (ub - rstep * np.maximum(1, np.abs(ub)))[hi]
    return x0


def _method(method: str | None, has_bounds: bool, m: int, n: int) -> str:
    method = validate.check_method("trf" if method is None and has_bounds else method or "lm")
    if method == "lm" and has_bounds:
        raise ValueError("`method`='lm' does not support `bounds`; use method='trf'")
    if method == "lm" and m < n:
        raise ValueError(f"`method`='lm' needs at least {n} points per fit, ydata has {m}")
    return method


def _options(kwargs: dict[str, Any], method: str, n: int, dtype: np.dtype[Any]) -> dict[str, Any]:
    loss = validate.check_loss(kwargs.get("loss", "linear"), LOSSES)
    if method == "lm" and loss != "linear":
        raise ValueError(f"`loss`={loss!r} is not supported by `method`='lm'; use method='trf'")
    x_scale = validate.check_x_scale(
        kwargs.get("x_scale", "jac" if method == "lm" else 1.0), n, dtype
    )
    return dict(
        loss=loss,
        x_scale=x_scale,
        tols=validate.check_tolerances(
            kwargs.get("ftol", 1e-8), kwargs.get("xtol", 1e-8), kwargs.get("gtol", 1e-8), dtype
        ),
        f_scale=validate.check_positive_scalar("f_scale", kwargs.get("f_scale", 1.0)),
        max_nfev=validate.check_max_nfev(
            kwargs.get("max_nfev"), 100 * (n + 1) if method == "lm" else 100 * n
        ),
        verbose=validate.check_verbose(kwargs.get("verbose", 0)),
    )


def _weights(
    sigma: Any, present: np.ndarray, n_fits: int, m: int, dtype: np.dtype[Any]
) -> tuple[np.ndarray | None, str]:
    """The residual weights: 1/sigma, 0 for absent points; and the problem's ``sigma_kind``."""
    if sigma is None:
        if present.all():
            return None, "none"
        return present.astype(dtype), "masked"
    s = np.asarray(sigma, dtype=dtype)
    if s.shape not in ((m,), (n_fits, m)):
        raise ValueError(f"`sigma` must have shape ({m},) or ({n_fits}, {m}), got {s.shape}")
    if not np.isfinite(s).all() or (s <= 0).any():
        raise ValueError("`sigma` must be positive and finite (standard deviations)")
    w = (1.0 / s).astype(dtype)
    if present.all():
        return w, "1d"
    return np.where(present, np.broadcast_to(w, (n_fits, m)), 0.0).astype(dtype), "masked"
