"""The async face: ``fit_stream`` and ``least_squares_stream`` return a ``FitStream``.

Arguments are checked here, before any thread starts; the fit starts when the stream is entered
or first iterated (see :class:`~nlsq_stream.stream.fit_stream.FitStream`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..sinks import default_display
from ..solver.curve_fit import prepare_curve_fit
from ..solver.least_squares import prepare_least_squares
from ..stream.fit_stream import FitStream
from ..stream.hub import POLICIES, Policy
from ..stream.pipeline import check_sinks

__all__ = ["fit_stream", "least_squares_stream"]


def _check_policy(policy: Any) -> None:
    if policy not in POLICIES:
        raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}")


def fit_stream(
    f: Callable[..., Any],
    xdata: Any,
    ydata: Any,
    p0: Any = None,
    *,
    policy: Policy = "lossless",
    sinks: Sequence[Any] | None = None,
    **curve_fit_kwargs: Any,
) -> FitStream:
    """Fit like :func:`curve_fit` and stream its events.

    Arguments are validated now (errors raise here, before any thread starts); the fit starts when
    the stream is entered or first iterated. ``policy`` is this consumer's buffer policy.

    >>> import anyio, jax.numpy as jnp, numpy as np
    >>> x = np.linspace(0, 4, 50)
    >>> async def main():
    ...     model = lambda x, a, b: a * jnp.exp(-b * x)
    ...     async with fit_stream(model, x, 3.0 * np.exp(-0.5 * x), p0=[1.0, 1.0]) as stream:
    ...         kinds = [type(event).__name__ async for event in stream]
    ...     return kinds[0], kinds[-1], np.round(stream.result.popt, 6).tolist()
    >>> anyio.run(main)
    ('FitStarted', 'FitFinished', [3.0, 0.5])
    """
    _check_policy(policy)
    sinks_v = check_sinks(sinks)
    prep = prepare_curve_fit(f, xdata, ydata, p0, **curve_fit_kwargs)
    return FitStream(prep, policy, sinks_v, default_display)


def least_squares_stream(
    fun: Callable[..., Any],
    x0: Any,
    *,
    policy: Policy = "lossless",
    sinks: Sequence[Any] | None = None,
    **least_squares_kwargs: Any,
) -> FitStream:
    """Solve like :func:`least_squares` and stream its events (see :func:`fit_stream`)."""
    _check_policy(policy)
    sinks_v = check_sinks(sinks)
    prep = prepare_least_squares(fun, x0, **least_squares_kwargs)
    return FitStream(prep, policy, sinks_v, default_display)
