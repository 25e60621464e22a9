"""Stage two: per-iteration records leave the device in batches.

A host callback costs ~80 µs here, more than a whole iteration of a small fit, so the jitted loop
writes each iteration's record into a device-side buffer and calls the host only every ``k``
trials (loop iterations), or when the buffer is full. The host answers every flush with the next
``k`` and a stop flag:

* ``k`` is chosen by the host so that flushes come about every ``TARGET_INTERVAL`` seconds of fit
  time (measured between flushes), which bounds both the overhead (one callback per interval) and
  the latency (a record waits at most one interval). The first flush happens at once, with the
  record of iteration 0. Counting trials rather than records means that a long run of rejected
  trials still flushes, so a stop request always gets through.
* the stop flag is how ``stream.stop()`` reaches the device: the loop ends at the next flush with
  status -2 and the best parameters so far.

The callback does almost nothing on the XLA thread: it copies the rows and hands them to the hub,
which never blocks. ``verbose=0`` compiles no emitter and no callback at all.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.experimental import io_callback

TARGET_INTERVAL = 0.04  # seconds of fit time between flushes (latency budget: 100 ms)
K_MAX = 64  # rows in the device buffer (a full buffer is flushed at once)
K_TRIALS_MAX = 1 << 14  # at most this many trials between flushes
ROW_HEAD = 6  # iteration, nfev, cost, cost_reduction, step_norm, optimality; then the params


class EmitState(NamedTuple):
    buf: Array  # (K_MAX, ROW_HEAD + n)
    filled: Array  # rows filled
    trials: Array  # trials (loop iterations) since the last flush
    k: Array  # flush after k trials (or when the buffer is full)
    stop: Array  # the host asked the fit to stop


@dataclasses.dataclass(frozen=True)
class Emitter:
    """Static emission settings (part of the compilation key): ``level`` 1 = every 10th
    iteration and the last, 2 = every iteration."""

    level: int
    k_max: int = K_MAX

    def init(self, args: Array, n: int, dtype: Any) -> EmitState:
        """``args`` is ``[channel token, trials before the first flush]`` (int32, traced)."""
        return EmitState(
            buf=jnp.zeros((self.k_max, ROW_HEAD + n), dtype),
            filled=jnp.zeros((), jnp.int32),
            trials=jnp.zeros((), jnp.int32),
            k=jnp.maximum(args[1], 1),
            stop=jnp.zeros((), jnp.bool_),
        )

    def record(
        self,
        st: EmitState,
        args: Array,
        nit: Array,
        nfev: Array,
        cost: Array,
        reduction: Array,
        step_norm: Array,
        optimality: Array,
        x: Array,
        done: Array,
        status: Array,
    ) -> EmitState:
        """Append a row when an iteration completed (gated on the device), flush when full."""
        dtype = st.buf.dtype
        final = status != -100
        if self.level >= 2:
            wanted = done
        else:
            wanted = done & ((nit % 10 == 0) | final)
        head = jnp.stack(
            [nit.astype(dtype), nfev.astype(dtype), cost, reduction, step_norm, optimality]
        )
        row = jnp.concatenate([head.astype(dtype), x.astype(dtype)])
        idx = jnp.minimum(st.filled, self.k_max - 1)
        buf = st.buf.at[idx].set(jnp.where(wanted, row, st.buf[idx]))
        count = st.filled + wanted.astype(jnp.int32)
        trials = st.trials + 1
        # Flushes are counted in trials, not rows, so a long run of rejected trials (no completed
        # iteration) still reaches the host, and a stop request still reaches the device. The
        # final rows are flushed after the loop, so a terminal iteration never flushes here.
        full = ((trials >= st.k) | (count >= self.k_max)) & ~final

        def flush(_: None) -> tuple[Array, Array]:
            return _host_flush(args[0], buf, count, trials)

        def keep(_: None) -> tuple[Array, Array]:
            return st.k, st.stop

        k, stop = lax.cond(full, flush, keep, None)
        count = jnp.where(full, 0, count)
        trials = jnp.where(full, 0, trials)
        return EmitState(buf=buf, filled=count, trials=trials, k=k, stop=stop | st.stop)

    def flush(self, st: EmitState, args: Array) -> Array:
        """Deliver the last partial batch (always called once, after the loop)."""
        k, _ = _host_flush(args[0], st.buf, st.filled, st.trials)
        return k


def _host_flush(token: Array, buf: Array, count: Array, trials: Array) -> tuple[Array, Array]:
    return io_callback(
        _on_flush,
        (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.bool_)),
        token,
        buf,
        count,
        trials,
        ordered=False,
    )


class Channel:
    """Host end of one fit's emission. ``sink(rows, received_at)`` gets each batch of rows."""

    def __init__(
        self,
        sink: Callable[[np.ndarray, float], None],
        target_interval: float = TARGET_INTERVAL,
    ) -> None:
        self.token = next(_TOKENS)
        self.stop_requested = threading.Event()
        self.flushes = 0
        self._key: Any = None
        self.interrupt: BaseException | None = None  # raised on the host once the fit returns
        self.keyboard_interrupt: KeyboardInterrupt | None = None  # re-raised after the sinks
        self._sink = sink
        self._target = target_interval
        self._last = time.perf_counter()

    def on_keyboard_interrupt(self, e: KeyboardInterrupt) -> None:
        """Ctrl-C during a watched fit: stop it (best parameters so far), re-raise afterwards."""
        if self.keyboard_interrupt is None:
            self.keyboard_interrupt = e
        self.stop_requested.set()

    def reset_clock(self) -> None:
        self._last = time.perf_counter()

    def emit_args(self, key: Any = None) -> np.ndarray:
        """Device arguments: this channel's token and the trials before the first flush.

        The first flush of a fit is where the host learns how long a trial takes. For a problem
        seen before (same ``key``) the last fit's per-trial time predicts it, so a short fit can
        make a single callback (the final one) instead of two.
        """
        self._key = key
        per_trial = _PER_TRIAL.get(key) if key is not None else None
        k0 = 1 if per_trial is None else self._k_for(per_trial)
        return np.array([self.token, k0], np.int32)

    def _k_for(self, per_trial: float) -> int:
        return int(min(max(self._target / max(per_trial, 1e-7), 1), K_TRIALS_MAX))

    def on_rows(self, rows: np.ndarray, trials: int = 0) -> tuple[int, bool]:
        """Take a batch; answer (trials until the next flush, stop?)."""
        now = time.perf_counter()
        self.flushes += 1
        if rows.shape[0]:
            self._sink(rows, time.time())
        per_trial = max((now - self._last) / max(trials, 1), 1e-7)
        k = self._k_for(per_trial)
        if self._key is not None and trials > 1:
            _PER_TRIAL[self._key] = per_trial
        self._last = now
        return k, self.stop_requested.is_set()

    def __enter__(self) -> Channel:
        _CHANNELS[self.token] = self
        return self

    def __exit__(self, *exc: object) -> None:
        _CHANNELS.pop(self.token, None)


_TOKENS = itertools.count(1)
_PER_TRIAL: dict[Any, float] = {}  # seconds per trial, by problem, from the last watched fit
_CHANNELS: dict[int, Channel] = {}


def _on_flush(token: Any, buf: Any, count: Any, trials: Any) -> tuple[Any, Any]:
    # Runs on an XLA thread (or the caller's): numpy only, never jnp, never block, never raise.
    channel = None
    try:
        channel = _CHANNELS.get(int(np.asarray(token)))
        if channel is None:  # nobody listens any more: ask the loop to stop
            return np.int32(K_TRIALS_MAX), np.bool_(True)
        n = int(np.asarray(count))
        rows = np.array(np.asarray(buf)[:n], dtype=np.float64)
        k, stop = channel.on_rows(rows, int(np.asarray(trials)))
        return np.int32(k), np.bool_(stop)
    except KeyboardInterrupt as e:  # Ctrl-C landed in the callback: stop cleanly
        if channel is not None:
            channel.on_keyboard_interrupt(e)
        return np.int32(K_TRIALS_MAX), np.bool_(True)
    except BaseException as e:  # never let a host error tear down the XLA computation
        if channel is not None:
            channel.interrupt = e
        return np.int32(K_TRIALS_MAX), np.bool_(True)
