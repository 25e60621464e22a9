"""The batch faces: ``curve_fit_batch`` (sync) and ``fit_stream_batch`` (async).

Arguments are checked here, before anything starts (a bad argument raises; a fit's bad data
only fails that fit). Then the batch runs silently, or watched through the stream stage with
the sinks given and, with ``verbose``, the default display.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._result import BatchResult
from ..sinks import default_display
from ..solver import batch as solver_batch
from ..solver.curve_fit_batch import prepare_curve_fit_batch
from ..solver.least_squares_batch import prepare_least_squares_batch
from ..stream.batch import BatchJob, new_batch_id, run_batch_sync
from ..stream.fit_stream import FitStream
from ..stream.hub import POLICIES, Policy
from ..stream.pipeline import check_sinks

__all__ = ["curve_fit_batch", "fit_stream_batch", "least_squares_batch"]


def _check_run_options(batch_size: Any, trials: Any) -> None:
    for name, v in (("batch_size", batch_size), ("trials", trials)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {v!r}")


def curve_fit_batch(
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
    *,
    batch_size: int = solver_batch.DEFAULT_BATCH_SIZE,
    trials: int = solver_batch.DEFAULT_TRIALS,
    sinks: Sequence[Any] | None = None,
    per_fit_events: bool = False,
    **kwargs: Any,
) -> BatchResult:
    """Fit ``f(x, *params)`` to each row of ``ydata``: N fits as one compiled program.

    ``ydata`` is (N, m); ``xdata`` (m,) shared, (N, m) or (N, k, m) per fit; ``p0`` (p,) or
    (N, p); ``sigma`` (m,) or (N, m); each bound a scalar, (p,) or (N, p). A point is absent where
    ``mask`` (N, m) is False, or where ``ydata`` is NaN with ``nan_policy="omit"``; an absent
    point has weight 0 (cost, degrees of freedom and pcov count the points present). Without
    ``nan_policy="omit"`` a fit with NaN data fails alone (status -3, NaN parameters);
    ``nan_policy="raise"`` raises instead. Each fit takes the steps ``curve_fit`` would take alone.
    Other keyword arguments are ``curve_fit``'s (``ftol``, ``xtol``, ``gtol``, ``x_scale``,
    ``loss``, ``f_scale``, ``max_nfev``, ``jac``, ``verbose``).

    :param batch_size: fits per piece: larger batches run piece by piece (memory stays bounded).
    :param trials: trials per chunk; between chunks the running fits are compacted.
    :param sinks: event consumers; a batch publishes ``BatchStarted``, ``BatchProgress`` (at most
        ten a second) and ``BatchFinished``; ``verbose`` adds the live progress line.
    :param per_fit_events: also one ``FitFinished`` per fit at the end (a flood for large N).
    :returns: a :class:`BatchResult` (``popt`` (N, p), ``pcov``, ``perr``, ``status``, ...).
    :raises ValueError, TypeError: for bad arguments, before anything runs.

    >>> import jax.numpy as jnp, numpy as np
    >>> x = np.linspace(0, 4, 50)
    >>> y = np.stack([a * np.exp(-0.5 * x) for a in (1.0, 2.0, 3.0)])
    >>> res = curve_fit_batch(lambda x, a, b: a * jnp.exp(-b * x), x, y, p0=[1.0, 1.0])
    >>> np.round(res.popt, 6).tolist(), res.success.tolist()
    ([[1.0, 0.5], [2.0, 0.5], [3.0, 0.5]], [True, True, True])
    """
    _check_run_options(batch_size, trials)
    watchers = check_sinks(sinks)
    prep = prepare_curve_fit_batch(
        f, xdata, ydata, p0, sigma, absolute_sigma, bounds, method, mask, nan_policy, **kwargs
    )
    job = BatchJob(prep, trials, batch_size, bool(per_fit_events))
    return run_batch_sync(job, watchers, default_display)


def least_squares_batch(
    fun: Callable[..., Any],
    x0: Any,
    jac: Callable[..., Any] | str | None = None,
    bounds: Any = (-np.inf, np.inf),
    method: str = "trf",
    args: Sequence[Any] = (),
    kwargs: Any = None,
    *,
    batch_size: int = solver_batch.DEFAULT_BATCH_SIZE,
    trials: int = solver_batch.DEFAULT_TRIALS,
    sinks: Sequence[Any] | None = None,
    per_fit_events: bool = False,
    **options: Any,
) -> BatchResult:
    """Solve N least-squares problems of one residual function ``fun(x, *args, **kwargs)``.

    ``x0`` is (N, n); every array in ``args`` has the N problems on its first axis; ``kwargs``
    are shared. Options are ``least_squares``'s (``ftol``, ``xtol``, ``gtol``, ``x_scale``,
    ``loss``, ``f_scale``, ``max_nfev``, ``verbose``). The result's ``popt`` holds each
    problem's ``x``, and ``pcov`` is ``inv(J^T J)`` scaled by ``2 cost / (m - n)``.

    >>> import jax.numpy as jnp, numpy as np
    >>> fun = lambda x, t: jnp.array([x[0] - t, 10.0 * (x[1] - x[0] ** 2)])
    >>> res = least_squares_batch(fun, np.zeros((2, 2)), args=(np.array([1.0, 2.0]),))
    >>> np.round(res.popt, 6).tolist()
    [[1.0, 1.0], [2.0, 4.0]]
    """
    _check_run_options(batch_size, trials)
    watchers = check_sinks(sinks)
    prep = prepare_least_squares_batch(fun, x0, jac, bounds, method, args, kwargs, **options)
    job = BatchJob(prep, trials, batch_size, bool(per_fit_events))
    return run_batch_sync(job, watchers, default_display)


def fit_stream_batch(
    f: Callable[..., Any],
    xdata: Any,
    ydata: Any,
    p0: Any = None,
    *,
    policy: Policy = "lossless",
    sinks: Sequence[Any] | None = None,
    batch_size: int = solver_batch.DEFAULT_BATCH_SIZE,
    trials: int = solver_batch.DEFAULT_TRIALS,
    per_fit_events: bool = False,
    **curve_fit_batch_kwargs: Any,
) -> FitStream:
    """Fit like :func:`curve_fit_batch` and stream the batch's events (``async for``).

    Leaving the ``async with`` block early stops the batch (every running fit keeps its best
    parameters, status -2); ``stream.result`` is the :class:`BatchResult` once it ended.

    >>> import anyio, jax.numpy as jnp, numpy as np
    >>> x = np.linspace(0, 4, 50)
    >>> y = np.stack([a * np.exp(-0.5 * x) for a in (1.0, 2.0)])
    >>> async def main():
    ...     model = lambda x, a, b: a * jnp.exp(-b * x)
    ...     async with fit_stream_batch(model, x, y, p0=[1.0, 1.0]) as stream:
    ...         kinds = [type(event).__name__ async for event in stream]
    ...     return kinds[0], kinds[-1], stream.result.success.tolist()
    >>> anyio.run(main)
    ('BatchStarted', 'BatchFinished', [True, True])
    """
    if policy not in POLICIES:
        raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}")
    _check_run_options(batch_size, trials)
    watchers = check_sinks(sinks)
    prep = prepare_curve_fit_batch(f, xdata, ydata, p0, **curve_fit_batch_kwargs)
    job = BatchJob(prep, trials, batch_size, bool(per_fit_events))
    return FitStream(job, policy, watchers, default_display, fit_id=new_batch_id())
