"""Running compiled programs on the calling thread (CPU): an explicit, process-wide opt-in.

JAX's CPU client runs a compiled program on a worker thread of its own unless its estimated
cost is tiny (below ~1000 flops). For a small fit (1e3 points: ~0.1-0.25 ms of program) the
hand-off is a large part of the time, and more so when the worker has parked because other work
ran between fits, or when another process holds the other cores. ``jax_cpu_enable_async_dispatch
= False`` runs every program inline on the thread that calls it; JAX reads it once, when its CPU
backend starts, and it applies to every program of the process, so a library must not set it
behind its user's back. :func:`enable_inline_dispatch` sets it when asked.

This module imports nothing of the package.
"""

from __future__ import annotations

from typing import Any

import jax

_xla_bridge: Any
try:
    from jax._src import xla_bridge as _xla_bridge  # private: when did the backend start?
except ImportError:  # pragma: no cover - a JAX without it
    _xla_bridge = None

_FLAG = "jax_cpu_enable_async_dispatch"


def _backend_started() -> bool:
    """Whether JAX's backends have started (assumed so when this JAX cannot tell)."""
    started = getattr(_xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else True


def inline_dispatch_enabled() -> bool:
    """Whether JAX runs CPU programs on the calling thread (async dispatch off)."""
    return not jax.config.values[_FLAG]


def enable_inline_dispatch() -> None:
    """Run every compiled CPU program of this process on the thread that calls it.

    A process-wide JAX setting (``jax_cpu_enable_async_dispatch = False``) that JAX reads when
    its CPU backend starts: call this first thing, before any JAX computation (or set the
    environment variable ``JAX_CPU_ENABLE_ASYNC_DISPATCH=false``). Small fits then start
    without waking XLA's worker thread; large ones do not notice. The cost: a call of any jitted
    function returns only when its result is ready, so host work can no longer overlap a
    running program (a watched fit's sinks run on their own thread and still overlap).

    :raises RuntimeError: the backend has already started with asynchronous dispatch, so the
        setting could no longer take effect.
    """
    if inline_dispatch_enabled():
        return
    if _backend_started():
        raise RuntimeError(
            "enable_inline_dispatch() must be called before JAX's backend starts (before any "
            "JAX computation in this process); it has started with asynchronous dispatch"
        )
    jax.config.update(_FLAG, False)
