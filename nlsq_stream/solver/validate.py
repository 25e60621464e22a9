"""Argument checks shared by ``least_squares`` and ``curve_fit``.

Every check runs on the host before anything is compiled or any thread starts, and every message
names the argument and says what was expected.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

METHODS: tuple[str, ...] = ("trf", "lm")
JAC_STRINGS: tuple[str, ...] = ("2-point", "3-point", "cs")


def float_dtype(*arrays: Any) -> np.dtype[Any]:
    """The floating dtype a fit runs in (of arrays, sequences or dtypes): float64 when JAX has
    x64 enabled, else float32.

    float32 inputs stay float32 even when x64 is on, so single precision can be asked for.
    """
    dt = np.result_type(*[_dtype_of(a) for a in arrays], np.float32)
    if dt.kind != "f":
        dt = np.dtype(np.float64)
    return np.dtype(jax.dtypes.canonicalize_dtype(dt))


def _dtype_of(a: Any) -> np.dtype[Any]:
    if isinstance(a, np.dtype):
        return a
    if isinstance(a, (list, tuple)) and all(type(v) is float or type(v) is int for v in a):
        return np.dtype(np.float64)  # what np.asarray(a) gives, without building the array
    dtype = getattr(a, "dtype", None)
    return dtype if isinstance(dtype, np.dtype) else np.asarray(a).dtype


def check_callable(name: str, value: Any) -> None:
    if not callable(value):
        raise TypeError(f"`{name}` must be callable, got {type(value).__name__}: {value!r:.80}")


def check_method(method: str, allowed: tuple[str, ...] = METHODS) -> str:
    if not isinstance(method, str) or method not in allowed:
        raise ValueError(f"`method` must be one of {allowed}, got {method!r}")
    return method


def check_loss(loss: Any, losses: tuple[str, ...]) -> str:
    if not isinstance(loss, str) or loss not in losses:
        raise ValueError(f"`loss` must be one of {losses}, got {loss!r}")
    return loss


def check_jac(jac: Any) -> Callable[..., Any] | None:
    if jac is None or callable(jac):
        return jac
    if isinstance(jac, str) and jac in JAC_STRINGS:
        return None  # finite-difference requests are served by exact autodiff
    raise ValueError(
        f"`jac` must be None (autodiff), a callable, or one of {JAC_STRINGS}, got {jac!r}"
    )


def check_positive_scalar(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}")
    return v


def check_tolerances(
    ftol: Any, xtol: Any, gtol: Any, dtype: np.dtype[Any]
) -> tuple[float, float, float]:
    """Non-negative tolerances; those below the dtype's epsilon are raised to it.

    Below epsilon a test can never pass (scipy warns and disables it). Raising it to epsilon keeps
    float32 fits with scipy's default 1e-8 from running to ``max_nfev``.
    """
    eps = _eps(dtype)
    out = []
    for name, value in (("ftol", ftol), ("xtol", xtol), ("gtol", gtol)):
        if value is None:
            value = 0.0
        if type(value) is not float and (
            isinstance(value, bool) or not isinstance(value, numbers.Real)
        ):
            raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
        v = float(value)
        if not (v >= 0) or not math.isfinite(v):
            raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
        out.append(v)
    if all(v == 0 for v in out):
        raise ValueError("At least one of `ftol`, `xtol`, `gtol` must be positive")
    a, b, c = (max(v, eps) if v > 0 else v for v in out)
    return a, b, c


@functools.cache
def _eps(dtype: np.dtype[Any]) -> float:
    return float(np.finfo(dtype).eps)


def check_max_nfev(max_nfev: Any, default: int) -> int:
    if max_nfev is None:
        return default
    if isinstance(max_nfev, bool) or not isinstance(max_nfev, numbers.Integral):
        raise TypeError(f"`max_nfev` must be a positive integer or None, got {max_nfev!r}")
    if max_nfev < 1:
        raise ValueError(f"`max_nfev` must be a positive integer or None, got {max_nfev!r}")
    return int(max_nfev)


def check_verbose(verbose: Any) -> int:
    if verbose not in (0, 1, 2) or isinstance(verbose, bool):
        raise ValueError(f"`verbose` must be 0, 1 or 2, got {verbose!r}")
    return int(verbose)


def check_x0(name: str, x0: Any, dtype: np.dtype[Any] | None = None) -> np.ndarray:
    try:
        x = np.atleast_1d(np.asarray(x0, dtype=dtype))
    except (TypeError, ValueError) as e:
        raise TypeError(f"`{name}` must be a 1-D array of real numbers, got {x0!r:.80}") from e
    if x.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"`{name}` must not be empty")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"`{name}` must hold real numbers, got dtype {x.dtype}")
    # A few parameters are checked faster as Python floats than by numpy reductions.
    finite = all(map(math.isfinite, x.tolist())) if x.size <= 32 else all_finite(x)
    if not finite:
        raise ValueError(f"`{name}` must be finite, got {x}")
    return x


def prepare_bounds(bounds: Any, n: int, dtype: np.dtype[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(lb, ub)`` as arrays of shape (n,); accepts a 2-tuple or an object with ``lb``/``ub``."""
    if (
        type(bounds) is tuple
        and len(bounds) == 2
        and _is_neg_inf(bounds[0])
        and _is_pos_inf(bounds[1])
    ):
        return _no_bounds(n, np.dtype(dtype))  # the default
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):
        lb_in, ub_in = bounds.lb, bounds.ub
    else:
        try:
            lb_in, ub_in = bounds
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"`bounds` must be a pair (lb, ub) of scalars or arrays, got {bounds!r:.80}"
            ) from e
    out = []
    for side, value in (("lower", lb_in), ("upper", ub_in)):
        try:
            arr = np.asarray(value, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise TypeError(f"`bounds`: the {side} bound must be numeric, got {value!r:.80}") from e
        if arr.ndim == 0:
            arr = np.full(n, arr, dtype=dtype)
        if arr.shape != (n,):
            raise ValueError(
                f"`bounds`: the {side} bound must be a scalar or have shape ({n},) to match the "
                f"{n} parameters, got shape {arr.shape}"
            )
        if np.any(np.isnan(arr)):
            raise ValueError(f"`bounds`: the {side} bound contains NaN")
        out.append(arr)
    lb, ub = out
    bad = np.flatnonzero(lb >= ub)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"`bounds`: each lower bound must be strictly less than its upper bound; parameter {i} "
            f"has lower {lb[i]!r} >= upper {ub[i]!r}"
        )
    return lb, ub


@functools.lru_cache(maxsize=64)
def _no_bounds(n: int, dtype: np.dtype[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(-inf, ..., +inf, ...)`` bounds for ``n`` parameters: shared, so read-only."""
    lb, ub = np.full(n, -np.inf, dtype), np.full(n, np.inf, dtype)
    lb.flags.writeable = ub.flags.writeable = False
    return lb, ub


def has_bounds(bounds: Any, lb: np.ndarray, ub: np.ndarray) -> bool:
    """Does any parameter have a finite bound? (``bounds`` as passed, ``lb``/``ub`` prepared.)"""
    if type(bounds) is tuple and len(bounds) == 2 and _is_neg_inf(bounds[0]):
        if _is_pos_inf(bounds[1]):
            return False  # the default, answered without looking at the arrays
    return bool(np.isfinite(lb).any() or np.isfinite(ub).any())


def _is_neg_inf(v: Any) -> bool:
    return type(v) is float and v == -np.inf


def _is_pos_inf(v: Any) -> bool:
    return type(v) is float and v == np.inf


def all_finite(a: np.ndarray) -> bool:
    """True when no element is NaN or inf, without a boolean temporary.

    A NaN or an inf makes the sum NaN or inf, so a finite sum (one reduction) answers at once;
    only a non-finite one (or a sum of finite values that overflowed) needs min and max.
    """
    if a.size == 0 or a.dtype.kind != "f":
        return True
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf, or an overflow
        total = np.add.reduce(a, axis=None)
    if math.isfinite(total):
        return True
    return bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def check_in_bounds(name: str, x0: np.ndarray, lb: np.ndarray, ub: np.ndarray) -> None:
    bad = np.flatnonzero((x0 < lb) | (x0 > ub))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"`{name}` is outside the bounds: {name}[{i}] = {float(x0[i])!r} is not in "
            f"[{float(lb[i])!r}, {float(ub[i])!r}]"
        )


def check_x_scale(x_scale: Any, n: int, dtype: np.dtype[Any]) -> np.ndarray | str:
    if isinstance(x_scale, str):
        if x_scale != "jac":
            raise ValueError(
                f"`x_scale` must be 'jac', a positive number or array, got {x_scale!r}"
            )
        return x_scale
    try:
        arr = np.asarray(x_scale, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`x_scale` must be 'jac', a positive number or array, got {x_scale!r}"
        ) from e
    if arr.ndim == 0:
        arr = np.full(n, arr, dtype=dtype)
    if arr.shape != (n,):
        raise ValueError(f"`x_scale` must be a scalar or have shape ({n},), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"`x_scale` must be positive and finite, got {arr}")
    return arr
