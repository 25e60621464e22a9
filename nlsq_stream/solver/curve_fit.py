"""``curve_fit``'s arguments, checked: a model and its data become a problem the engine runs.

``prepare_curve_fit`` builds a :class:`~.fit.PreparedFit` whose result also carries ``popt`` and
``pcov`` (scaled as scipy scales them); the public ``nlsq_stream.curve_fit`` (in ``faces``) runs
it and returns scipy's tuple.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import Array

from .._result import OptimizeResult
from . import engine, validate
from .fit import PreparedFit
from .least_squares import _strictly_feasible, output_shape
from .losses import LOSSES

# Keyword arguments curve_fit passes on to least_squares. ``sinks`` is taken by the public face
# (``faces.sync``) before this module sees the call; it is listed so that the message for an
# unknown keyword names every accepted one.
_LS_KWARGS = ("ftol", "xtol", "gtol", "x_scale", "loss", "f_scale", "max_nfev", "verbose", "sinks")


@dataclasses.dataclass(frozen=True)
class CurveFitProblem:
    """Residuals ``transform (f(xdata, *p) - ydata)``; ``data`` is ``(xdata, ydata, transform)``.

    ``sigma_kind`` is ``"none"`` (transform is None), ``"1d"`` (transform = 1 / sigma),
    ``"2d"`` (transform is the lower Cholesky factor L of the covariance; residuals are
    ``L^-1 r``) or ``"masked"`` (transform = 1 / sigma where a point is present, 0 where it is
    absent: an absent point's residual is exactly 0 even where the model is not finite there).
    """

    model: Callable[..., Any]
    jac: Callable[..., Any] | None
    sigma_kind: str

    def _weigh(self, r: Array, transform: Array | None) -> Array:
        if transform is None:  # sigma_kind "none"
            return r
        if self.sigma_kind == "1d":
            return r * (transform if r.ndim == 1 else transform[:, None])
        if self.sigma_kind == "2d":
            return jsl.solve_triangular(transform, r, lower=True)
        if self.sigma_kind == "masked":
            w = transform if r.ndim == 1 else transform[:, None]
            return jnp.where(w != 0, r * w, 0.0)
        return r

    def residual(self, x: Array, data: Any) -> Array:
        xdata, ydata, transform = data
        pred = self.model(xdata, *[x[i] for i in range(x.shape[0])])
        return self._weigh(jnp.asarray(pred, x.dtype).reshape(ydata.shape) - ydata, transform)

    def residual_and_jt(self, x: Array, data: Any) -> tuple[Array, Array]:
        if self.jac is None:
            return engine.forward_residual_and_jt(lambda p: self.residual(p, data), x)
        xdata, ydata, transform = data
        j = jnp.asarray(self.jac(xdata, *[x[i] for i in range(x.shape[0])]), x.dtype)
        j = self._weigh(j.reshape(ydata.shape[0], x.shape[0]), transform)
        return self.residual(x, data), j.T


def parameter_names(f: Callable[..., Any]) -> list[str] | None:
    """Names of the fit parameters: the model's positional parameters after the first."""
    return _signature_info(f)[0]


def _positional_counts(f: Callable[..., Any]) -> tuple[int, int] | None:
    """(required, total) fit parameters in f's signature, or None when it cannot be told."""
    return _signature_info(f)[1]


_SIGNATURES: dict[Any, tuple[list[str] | None, tuple[int, int] | None]] = {}


def _signature_info(f: Callable[..., Any]) -> tuple[list[str] | None, tuple[int, int] | None]:
    """Parameter names and counts from f's signature, cached per model (inspect is slow)."""
    try:
        return _SIGNATURES[f]
    except (KeyError, TypeError):
        pass
    info = _read_signature(f)
    try:
        if len(_SIGNATURES) > 256:
            _SIGNATURES.clear()
        _SIGNATURES[f] = info
    except TypeError:
        pass
    return info


def _read_signature(f: Callable[..., Any]) -> tuple[list[str] | None, tuple[int, int] | None]:
    try:
        sig = inspect.signature(f)
    except (TypeError, ValueError):
        return None, None
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None, None
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(pos) < 2:
        return None, (0, 0) if len(pos) == 1 else None
    fit = pos[1:]
    required = sum(1 for p in fit if p.default is p.empty)
    return [p.name for p in fit], (required, len(fit))


def _initialize_feasible(lb: np.ndarray, ub: np.ndarray) -> np.ndarray:
    p0 = np.ones_like(lb)
    both = np.isfinite(lb) & np.isfinite(ub)
    p0[both] = 0.5 * (lb[both] + ub[both])
    lo = np.isfinite(lb) & ~np.isfinite(ub)
    p0[lo] = lb[lo] + 1
    hi = ~np.isfinite(lb) & np.isfinite(ub)
    p0[hi] = ub[hi] - 1
    return p0


def _as_data_array(
    name: str,
    value: Any,
    dtype: np.dtype[Any],
    check_finite: bool,
    on_device: list[tuple[str, Any]] | None = None,
) -> Any:
    """``value`` as a numpy array of ``dtype`` (a JAX array stays as it is), checked for NaN and
    inf. The check of a JAX array is a device computation: with ``on_device`` it is left for
    ``_check_finite_on_device``, which checks all of them in one."""
    arr: Any
    if isinstance(value, jax.Array):
        arr = value
        host = None
        if check_finite and on_device is not None:
            on_device.append((name, arr))
            return arr
    else:
        try:
            host = np.asarray(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"`{name}` must be an array of numbers, got {value!r:.60}") from e
        if host.dtype.kind not in "biuf":
            raise TypeError(f"`{name}` must hold real numbers, got dtype {host.dtype}")
        arr = host.astype(dtype, copy=False)
    if check_finite:
        ok = validate.all_finite(host) if host is not None else bool(jnp.all(jnp.isfinite(arr)))
        if not ok:
            raise _not_finite(name)
    return arr


def _not_finite(name: str) -> ValueError:
    return ValueError(f"`{name}` must not contain NaN or inf (pass check_finite=False to skip)")


@jax.jit
def _finite_flags(*arrays: Any) -> Array:
    return jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays])


def _check_finite_on_device(arrays: list[tuple[str, Any]]) -> None:
    """The NaN-and-inf check of every JAX array argument, as one device computation."""
    if not arrays:
        return
    flags = engine.fetch(_finite_flags(*[a for _, a in arrays]))
    for (name, _), ok in zip(arrays, flags, strict=True):
        if not ok:
            raise _not_finite(name)


def _check_xdata(
    xdata: Any,
    m: int,
    dtype: np.dtype[Any],
    check_finite: bool,
    on_device: list[tuple[str, Any]] | None = None,
) -> Any:
    if isinstance(xdata, (tuple, list)):
        parts = tuple(
            _as_data_array(f"xdata[{i}]", x, dtype, check_finite, on_device)
            for i, x in enumerate(xdata)
        )
        if not parts:
            raise ValueError("`xdata` must not be empty")
        for i, part in enumerate(parts):
            _check_points(f"xdata[{i}]", part, m)
        return parts
    arr = _as_data_array("xdata", xdata, dtype, check_finite, on_device)
    _check_points("xdata", arr, m)
    return arr


def _check_points(name: str, arr: Any, m: int) -> None:
    shape = np.shape(arr)
    if len(shape) == 0:
        return  # a scalar predictor broadcasts
    if shape[0] == 0 or 0 in shape:
        raise ValueError(f"`{name}` must not be empty")
    if shape[0] != m and shape[-1] != m:
        raise ValueError(
            f"`{name}` and `ydata` have different lengths: {name} has shape {shape}, ydata has "
            f"{m} points"
        )


def _prepare_sigma(sigma: Any, m: int, dtype: np.dtype[Any]) -> tuple[str, np.ndarray | None]:
    if sigma is None:
        return "none", None  # no argument at all for the compiled solver
    try:
        s = np.asarray(sigma, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`sigma` must be an array of numbers, got {sigma!r:.60}") from e
    if s.size == 1 or s.shape == (m,):
        s = np.broadcast_to(s.reshape(-1), (m,)) if s.size == 1 else s
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise ValueError(
                "`sigma` must be positive and finite (1-D sigma holds standard deviations)"
            )
        return "1d", (1.0 / s).astype(dtype)
    if s.shape == (m, m):
        if not np.all(np.isfinite(s)):
            raise ValueError("`sigma` (a covariance matrix) must be finite")
        try:
            chol = np.linalg.cholesky(s)
        except np.linalg.LinAlgError as e:
            raise ValueError("`sigma` (a 2-D covariance matrix) must be positive definite") from e
        return "2d", chol.astype(dtype)
    raise ValueError(
        f"`sigma` must have shape ({m},) (standard deviations) or ({m}, {m}) (a covariance), "
        f"got shape {s.shape}"
    )


def covariance(
    res: OptimizeResult, m: int, n: int, absolute_sigma: bool
) -> tuple[np.ndarray, bool]:
    """pcov from the Jacobian's factor via SVD and pseudo-inverse, scaled as scipy scales it."""
    pcov = np.array(res.cov_unscaled)
    warn = False
    if np.isnan(pcov).any():
        pcov = np.full((n, n), np.inf)
        warn = True
    elif not absolute_sigma:
        if m > n:
            pcov = pcov * (2.0 * res.cost / (m - n))
        else:
            pcov = np.full((n, n), np.inf)
            warn = True
    return pcov, warn


def prepare_curve_fit(
    f: Callable[..., Any],
    xdata: Any,
    ydata: Any,
    p0: Sequence[float] | np.ndarray | None = None,
    sigma: Any = None,
    absolute_sigma: bool = False,
    check_finite: bool = True,
    bounds: Any = (-np.inf, np.inf),
    method: str | None = None,
    jac: Callable[..., Any] | str | None = None,
    **kwargs: Any,
) -> PreparedFit:
    """Validate ``curve_fit`` arguments (see ``nlsq_stream.curve_fit``) into a
    :class:`PreparedFit`; nothing is compiled or started.

    The result of running it carries ``popt``, ``pcov`` and ``pcov_warning`` besides scipy's
    least-squares fields.
    """
    key = _plan_key(
        f, xdata, ydata, p0, sigma, absolute_sigma, check_finite, bounds, method, jac, kwargs
    )
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        with contextlib.suppress(KeyError):  # another thread's call may have dropped it
            _PLANS.move_to_end(key)
        return plan.prepare(xdata, ydata, p0, check_finite)
    prep = _prepare_in_full(
        f, xdata, ydata, p0, sigma, absolute_sigma, check_finite, bounds, method, jac, kwargs
    )
    if key is not None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.popitem(last=False)
        _PLANS[key] = _Plan(prep)
    return prep


def _prepare_in_full(
    f: Callable[..., Any],
    xdata: Any,
    ydata: Any,
    p0: Any,
    sigma: Any,
    absolute_sigma: bool,
    check_finite: bool,
    bounds: Any,
    method: str | None,
    jac: Any,
    kwargs: dict[str, Any],
) -> PreparedFit:
    """Every check of ``prepare_curve_fit``, and the fit they give."""
    validate.check_callable("f", f)
    jac = validate.check_jac(jac)
    kwargs = _least_squares_kwargs(kwargs)
    names = parameter_names(f)
    n = _parameter_count(f, p0, names)
    y, x, dtype = _data_arrays(xdata, ydata, p0, check_finite)
    m = int(np.shape(y)[0])
    lb, ub = validate.prepare_bounds(bounds, n, dtype)
    has_bounds = validate.has_bounds(bounds, lb, ub)
    p0a = (
        _initialize_feasible(lb, ub).astype(dtype)
        if p0 is None
        else validate.check_x0("p0", p0, dtype)
    )
    method = _method(method, has_bounds, m, n)
    if has_bounds:
        validate.check_in_bounds("p0", p0a, lb, ub)
    sigma_kind, transform = _prepare_sigma(sigma, m, dtype)
    options = _solver_options(kwargs, method, n, dtype)
    problem = CurveFitProblem(f, jac, sigma_kind)
    data = (x, y, transform)
    _check_model_output(problem, f, p0a, data, m, n)
    if has_bounds:
        p0a = _strictly_feasible(p0a, lb, ub)

    def finalize(res: OptimizeResult) -> None:
        pcov, warn = covariance(res, m, n, absolute_sigma)
        res["popt"] = np.asarray(res.x)
        res["pcov"] = pcov
        res["pcov_warning"] = warn

    xs = options.pop("x_scale")
    return PreparedFit(
        problem=problem,
        config_kw=dict(
            method=method,
            loss=options.pop("loss"),
            has_bounds=has_bounds,
            jac_scale=isinstance(xs, str),
        ),
        x0=p0a,
        lb=lb,
        ub=ub,
        data=data,
        x_scale=np.ones(n, dtype) if isinstance(xs, str) else xs,
        n_residuals=m,
        param_names=tuple(names)
        if names is not None and len(names) == n
        else tuple(f"p{i}" for i in range(n)),
        finalize=finalize,
        **options,
    )


class _Plan:
    """What ``prepare_curve_fit`` found for one model and call signature that does not depend
    on the data's or ``p0``'s values: a later call with the same signature only converts and
    checks those values (``prepare``), and shares the rest (read-only arrays, one problem).

    A small fit spends about as long in argument checks as in its program otherwise (~20 µs of
    Python warm, three times that when other work ran in between and the caches are cold)."""

    __slots__ = ("dtype", "template")

    def __init__(self, prep: PreparedFit) -> None:
        for arr in (prep.lb, prep.ub, prep.x_scale):
            arr.flags.writeable = False
        # Not the data: a plan must not keep the caller's arrays alive.
        self.template = dataclasses.replace(prep, data=None)
        self.dtype = prep.x0.dtype

    def prepare(
        self, xdata: np.ndarray, ydata: np.ndarray, p0: Any, check_finite: bool
    ) -> PreparedFit:
        t, dtype = self.template, self.dtype
        y = _as_data_array("ydata", ydata, dtype, check_finite)
        x = _as_data_array("xdata", xdata, dtype, check_finite)
        p0a = validate.check_x0("p0", p0, dtype)
        if t.config_kw["has_bounds"]:
            validate.check_in_bounds("p0", p0a, t.lb, t.ub)
            p0a = _strictly_feasible(p0a, t.lb, t.ub)
        return dataclasses.replace(t, config_kw=dict(t.config_kw), x0=p0a, data=(x, y, None))


_PLANS: collections.OrderedDict[Any, _Plan] = collections.OrderedDict()
_PLANS_MAX = 64
_PLAIN = (float, int, str, bool, type(None))


def _plan_key(
    f: Any,
    xdata: Any,
    ydata: Any,
    p0: Any,
    sigma: Any,
    absolute_sigma: Any,
    check_finite: Any,
    bounds: Any,
    method: Any,
    jac: Any,
    kwargs: dict[str, Any],
) -> Any:
    """The key of a call's ``_Plan``, or None where the call is not of the common kind that
    plans serve: numpy ``xdata`` and ``ydata``, a float ``p0``, no ``sigma`` or ``jac``,
    default or scalar bounds, plain keyword values, a hashable model."""
    if (
        type(ydata) is not np.ndarray
        or type(xdata) is not np.ndarray
        or sigma is not None
        or jac is not None
        or ydata.dtype.kind != "f"
        or xdata.dtype.kind != "f"
    ):
        return None
    if type(p0) in (list, tuple):
        if not all(type(v) is float or type(v) is int for v in p0):
            return None
        p0_key: Any = (len(p0), "py")
    elif type(p0) is np.ndarray and p0.ndim == 1 and p0.dtype.kind == "f":
        p0_key = (p0.shape[0], p0.dtype.str)
    else:
        return None
    if (
        type(bounds) is not tuple
        or len(bounds) != 2
        or not all(type(b) in (float, int) for b in bounds)
    ):
        return None
    if not all(type(v) in _PLAIN for v in kwargs.values()) or type(method) not in _PLAIN:
        return None
    key = (
        f,
        xdata.shape,
        xdata.dtype.str,
        ydata.shape,
        ydata.dtype.str,
        p0_key,
        bounds,
        method,
        bool(absolute_sigma),
        bool(check_finite),
        tuple(sorted(kwargs.items())),
        jax.dtypes.canonicalize_dtype(np.float64),  # x64 on or off, as float_dtype reads it
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _least_squares_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments for least_squares, ``maxfev`` (scipy's ``leastsq`` name) renamed."""
    kwargs = dict(kwargs)
    kwargs.pop("sinks", None)
    if "args" in kwargs:
        raise ValueError("`args` is not a supported keyword argument of curve_fit")
    if "maxfev" in kwargs:
        if kwargs.get("max_nfev") is not None:
            raise TypeError("pass only one of `maxfev` and `max_nfev`")
        kwargs["max_nfev"] = kwargs.pop("maxfev")
    unknown = sorted(set(kwargs) - set(_LS_KWARGS))
    if unknown:
        raise TypeError(
            f"curve_fit() got unexpected keyword argument(s) {unknown}; "
            f"accepted: {list(_LS_KWARGS)}"
        )
    return kwargs


def _parameter_count(f: Callable[..., Any], p0: Any, names: list[str] | None) -> int:
    """How many parameters: ``p0``'s length (checked against the model's signature), else the
    number of named parameters after ``x`` in the signature."""
    if p0 is None:
        if names is None:
            raise ValueError(
                "`p0` is needed: the number of parameters cannot be read from the model's "
                "signature (it needs f(x, a, b, ...) with named parameters)"
            )
        return len(names)
    n = len(p0) if type(p0) in (list, tuple) else np.atleast_1d(np.asarray(p0)).size
    counts = _positional_counts(f)
    if counts is not None and not counts[0] <= n <= counts[1]:
        lo, hi = counts
        want = str(lo) if lo == hi else f"between {lo} and {hi}"
        raise ValueError(
            f"`p0` has {n} values but the model f(x, ...) takes {want} parameters after x"
        )
    return n


def _data_arrays(
    xdata: Any, ydata: Any, p0: Any, check_finite: bool
) -> tuple[Any, Any, np.dtype[Any]]:
    """``(ydata, xdata, dtype)`` checked: numbers, 1-D non-empty ``ydata``, matching lengths, and
    (with ``check_finite``) no NaN or inf. The dtype is float64 unless the data are float32."""
    try:
        y_host = ydata if isinstance(ydata, jax.Array) else np.asarray(ydata)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`ydata` must be an array of numbers, got {ydata!r:.60}") from e
    dtype = validate.float_dtype(y_host.dtype, *(() if p0 is None else (p0,)))
    on_device: list[tuple[str, Any]] = []
    y = _as_data_array("ydata", y_host, dtype, check_finite, on_device)
    if np.ndim(y) != 1:
        raise ValueError(f"`ydata` must be 1-D, got shape {np.shape(y)}")
    m = int(np.shape(y)[0])
    if m == 0:
        raise ValueError("`ydata` must not be empty")
    x = _check_xdata(xdata, m, dtype, check_finite, on_device)
    _check_finite_on_device(on_device)
    return y, x, dtype


def _method(method: str | None, has_bounds: bool, m: int, n: int) -> str:
    """The method asked for, or scipy's default (``trf`` with bounds, else ``lm``), checked."""
    if method is None:
        method = "trf" if has_bounds else "lm"
    method = validate.check_method(method)
    if method == "lm" and has_bounds:
        raise ValueError(
            "`method`='lm' only works for unconstrained problems; use method='trf' with `bounds`"
        )
    if method == "lm" and m < n:
        raise ValueError(
            f"`method`='lm' needs at least as many data points as parameters: ydata has {m} "
            f"points for {n} parameters"
        )
    return method


def _solver_options(
    kwargs: dict[str, Any], method: str, n: int, dtype: np.dtype[Any]
) -> dict[str, Any]:
    """``loss``, ``x_scale``, tolerances, ``f_scale``, ``max_nfev`` and ``verbose``, checked,
    with scipy's curve_fit defaults (``x_scale='jac'`` and ``max_nfev=100 (n+1)`` for lm)."""
    loss = validate.check_loss(kwargs.get("loss", "linear"), LOSSES)
    if method == "lm" and loss != "linear":
        raise ValueError(f"`loss`={loss!r} is not supported by `method`='lm'; use method='trf'")
    x_scale = validate.check_x_scale(
        kwargs.get("x_scale", "jac" if method == "lm" else 1.0), n, dtype
    )
    tols = validate.check_tolerances(
        kwargs.get("ftol", 1e-8), kwargs.get("xtol", 1e-8), kwargs.get("gtol", 1e-8), dtype
    )
    return dict(
        loss=loss,
        x_scale=x_scale,
        tols=tols,
        f_scale=validate.check_positive_scalar("f_scale", kwargs.get("f_scale", 1.0)),
        max_nfev=validate.check_max_nfev(
            kwargs.get("max_nfev"), 100 * (n + 1) if method == "lm" else 100 * n
        ),
        verbose=validate.check_verbose(kwargs.get("verbose", 0)),
    )


def _check_model_output(
    problem: CurveFitProblem, f: Callable[..., Any], p0: np.ndarray, data: Any, m: int, n: int
) -> None:
    """The model must return one value per data point (found by tracing, not by running it)."""

    def model_out(p: Array, d: Any) -> Any:
        return f(d[0], *[p[i] for i in range(n)])

    shape = output_shape(problem, p0, data, model_out)
    if shape != (m,):
        raise ValueError(
            f"`f` must return one value per data point, shape ({m},), but f(xdata, *p0) has "
            f"shape {shape}"
        )
