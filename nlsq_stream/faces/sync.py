"""The sync face: ``least_squares`` and ``curve_fit``, scipy's calls, watched or not.

Each call checks its arguments (the solver's ``prepare_*`` and the stream's ``check_sinks``)
before anything starts, then runs the fit silently as one compiled program, or watched through
the stream stage with the sinks given and, with ``verbose``, the default display (the console
table, or the widget in Jupyter), which this face passes in.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._result import OptimizeResult, OptimizeWarning
from ..sinks import default_display
from ..solver import engine
from ..solver.curve_fit import prepare_curve_fit
from ..solver.least_squares import prepare_least_squares
from ..stream.pipeline import check_sinks, run_sync

__all__ = ["curve_fit", "least_squares"]


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
    watchers = check_sinks(sinks)
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
    )
    return run_sync(prep, watchers, default_display)


def curve_fit(
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
    full_output: bool = False,
    **kwargs: Any,
) -> Any:
    """Fit ``f(xdata, *params)`` to ``ydata``, like ``scipy.optimize.curve_fit``.

    The model is written with ``jax.numpy``; its Jacobian comes from autodiff. Data and ``p0``
    are traced, so repeated fits with the same model, shapes and options reuse one compiled solver.
    Extra keyword arguments go to :func:`least_squares` (``ftol``, ``xtol``, ``gtol``,
    ``x_scale``, ``loss``, ``f_scale``, ``max_nfev`` or ``maxfev``, ``verbose``, ``sinks``).

    :returns: ``(popt, pcov)``, or ``(popt, pcov, infodict, mesg, ier)`` with ``full_output``.
    :raises RuntimeError: if the fit did not converge (as scipy does).
    :raises ValueError, TypeError: for bad arguments, before anything is compiled.

    >>> import jax.numpy as jnp, numpy as np
    >>> x = np.linspace(0, 4, 50)
    >>> popt, pcov = curve_fit(lambda x, a, b: a * jnp.exp(-b * x), x, 3.0 * np.exp(-0.5 * x))
    >>> np.round(popt, 6).tolist()
    [3.0, 0.5]
    """
    watchers = check_sinks(kwargs.pop("sinks", None))
    prep = prepare_curve_fit(
        f, xdata, ydata, p0, sigma, absolute_sigma, check_finite, bounds, method, jac, **kwargs
    )
    # fun and jac at the solution are part of the result only with full_output (fvec): without
    # it the fit skips a final evaluation and its m-sized outputs (10 % of a 1e6-point fit).
    prep.config_kw["fun_jac"] = bool(full_output)
    res = run_sync(prep, watchers, default_display)
    if res.status == engine.STATUS_STOPPED:
        warnings.warn(
            "The fit was stopped before convergence; returning the best parameters so far",
            OptimizeWarning,
            stacklevel=2,
        )
    elif not res.success:
        raise RuntimeError("Optimal parameters not found: " + res.message)
    if res.pcov_warning:
        warnings.warn(
            "Covariance of the parameters could not be estimated", OptimizeWarning, stacklevel=2
        )
    popt, pcov = res.popt, res.pcov
    if full_output:
        infodict = {"nfev": res.nfev, "njev": res.njev, "nit": res.nit, "fvec": np.asarray(res.fun)}
        return popt, pcov, infodict, res.message, res.status
    return popt, pcov
