"""Log from your own jitted loop into nlsq_stream's event hub (or stdlib logging).

The same API as the reference NLSQ module, but wired: events go to the hub (fit id
``"async_logger"``), so ``nlsq_stream.subscribe()`` sees them; with no subscriber
they go to the stdlib logger ``nlsq_stream.async_logger`` at INFO. ``verbose=0`` compiles nothing;
``verbose=1`` logs every 10th iteration, gated on the device (a traced counter works); ``verbose=2``
logs every iteration. Each logged call is one host callback (~80 µs here), so prefer the solver's
own batched emission (``curve_fit(..., verbose=2)``) when you can.

>>> import jax, jax.numpy as jnp
>>> @jax.jit
... def step(i, x):
...     log_iteration_async(i, jnp.sum(x**2), jnp.linalg.norm(2 * x), verbose=1)
...     return x * 0.5
>>> _ = step(0, jnp.ones(3))
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._result import OptimizeResult
from .events import FitFinished, Iteration
from .stream.hub import HUB, Batch

__all__ = ["FIT_ID", "is_jax_array", "log_convergence_async", "log_iteration_async", "logger"]

FIT_ID = "async_logger"
logger = logging.getLogger("nlsq_stream.async_logger")


def is_jax_array(x: Any) -> bool:
    """True for JAX arrays, including tracers inside ``jit``; False for numpy and Python values.

    >>> is_jax_array(jnp.ones(2)), is_jax_array(np.ones(2)), is_jax_array(1.0)
    (True, False, False)
    """
    return isinstance(x, jax.Array)


def _check_verbose(verbose: Any) -> int:
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(f"`verbose` must be 0, 1 or 2, got {verbose!r}")
    return int(verbose)


def _host_iteration(message: str, iteration: Any, cost: Any, gnorm: Any) -> None:
    # A host callback: numpy only.
    it, c, g = int(np.asarray(iteration)), float(np.asarray(cost)), float(np.asarray(gnorm))
    if HUB.has_subscribers(FIT_ID):
        ev = Iteration(FIT_ID, it, -1, c, None, None, g, np.empty(0), time.time())
        HUB.publish(Batch(FIT_ID, [ev]))
    else:
        logger.info(
            "Iteration %d: cost=%.6e, gradient_norm=%.6e%s",
            it,
            c,
            g,
            f" {message}" if message else "",
        )


def log_iteration_async(
    iteration: Any, cost: Any, gradient_norm: Any, message: str = "", verbose: int = 0
) -> None:
    """Log one iteration from inside (or outside) a jitted function without blocking it.

    The event is an :class:`~nlsq_stream.events.Iteration` with ``nfev = -1`` and no params.
    """
    verbose = _check_verbose(verbose)
    if verbose == 0:
        return
    host = functools.partial(_host_iteration, str(message))
    traced = any(is_jax_array(v) for v in (iteration, cost, gradient_norm))
    if not traced:
        if verbose == 2 or int(iteration) % 10 == 0:
            host(iteration, cost, gradient_norm)
        return
    it = jnp.asarray(iteration)
    wanted = jnp.asarray(True) if verbose == 2 else (it % 10 == 0)

    def emit(args: tuple[Any, Any, Any]) -> None:
        jax.debug.callback(host, *args)

    lax.cond(wanted, emit, lambda args: None, (it, jnp.asarray(cost), jnp.asarray(gradient_norm)))


def _host_convergence(reason: str, iterations: Any, cost: Any, secs: Any, gnorm: Any) -> None:
    result = OptimizeResult(
        message=reason,
        nit=int(np.asarray(iterations)),
        cost=float(np.asarray(cost)),
        time_sec=float(np.asarray(secs)),
        optimality=float(np.asarray(gnorm)),
    )
    if HUB.has_subscribers(FIT_ID):
        HUB.publish(Batch(FIT_ID, [FitFinished(FIT_ID, result, time.time())]))
    else:
        logger.info(
            "Converged: %s after %d iterations, final cost=%.6e, time=%.3fs, gradient_norm=%.6e",
            reason,
            result["nit"],
            result["cost"],
            result["time_sec"],
            result["optimality"],
        )


def log_convergence_async(
    reason: str,
    iterations: Any,
    final_cost: Any,
    time_sec: Any,
    final_gradient_norm: Any,
    verbose: int = 1,
) -> None:
    """Log the end of an optimization (a :class:`~nlsq_stream.events.FitFinished` event)."""
    verbose = _check_verbose(verbose)
    if verbose == 0:
        return
    host = functools.partial(_host_convergence, str(reason))
    args = (iterations, final_cost, time_sec, final_gradient_norm)
    if any(is_jax_array(v) for v in args):
        jax.debug.callback(host, *args)
    else:
        host(*args)
