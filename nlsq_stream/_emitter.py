"""Stage two: per-iteration records leave the device in batches.

A host callback costs ~80 µs here, more than a whole iteration of a small fit, so the jitted loop
writes each iteration's record into a device-side buffer and calls the host only when the buffer
holds ``k`` records. The host answers every flush with the next ``k`` and a stop flag:

* ``k`` is chosen by the host so that flushes come about every ``TARGET_INTERVAL`` seconds of fit
  time (measured between flushes), which bounds both the overhead (one callback per interval) and
  the latency (a record waits at most one interval). The first flush happens after one record.
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

TARGET_INTERVAL = 0.02  # seconds of fit time between flushes
K_MAX = 64  # rows in the device buffer
ROW_HEAD = 6  # iteration, nfev, cost, cost_reduction, step_norm, optimality; then the params


class EmitState(NamedTuple):
    buf: Array  # (K_MAX, ROW_HEAD + n)
    filled: Array  # rows filled
    k: Array  # flush when count reaches k
    stop: Array  # the host asked the fit to stop


@dataclasses.dataclass(frozen=True)
class Emitter:
    """Static emission settings (part of the compilation key): ``level`` 1 = every 10th
    iteration and the last, 2 = every iteration."""

    level: int
    k_max: int = K_MAX

    def init(self, token: Array, n: int, dtype: Any) -> EmitState:
        return EmitState(
            buf=jnp.zeros((self.k_max, ROW_HEAD + n), dtype),
            filled=jnp.zeros((), jnp.int32),
            k=jnp.ones((), jnp.int32),
            stop=jnp.zeros((), jnp.bool_),
        )

    def record(
        self,
        st: EmitState,
        token: Array,
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
        # The final rows are flushed after the loop, so a terminal iteration never flushes here.
        full = (count >= st.k) & ~final

        def flush(_: None) -> tuple[Array, Array]:
            return _host_flush(token, buf, count)

        def keep(_: None) -> tuple[Array, Array]:
            return st.k, st.stop

        k, stop = lax.cond(full, flush, keep, None)
        count = jnp.where(full, 0, count)
        return EmitState(buf=buf, filled=count, k=k, stop=stop | st.stop)

    def flush(self, st: EmitState, token: Array) -> Array:
        """Deliver the last partial batch (always called once, after the loop)."""
        k, _ = _host_flush(token, st.buf, st.filled)
        return k


def _host_flush(token: Array, buf: Array, count: Array) -> tuple[Array, Array]:
    return io_callback(
        _on_flush,
        (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.bool_)),
        token,
        buf,
        count,
        ordered=False,
    )


class Channel:
    """Host end of one fit's emission. ``sink(rows, received_at)`` gets each batch of rows."""

    def __init__(
        self,
        sink: Callable[[np.ndarray, float], None],
        k_max: int = K_MAX,
        target_interval: float = TARGET_INTERVAL,
    ) -> None:
        self.token = next(_TOKENS)
        self.stop_requested = threading.Event()
        self.flushes = 0
        self.interrupt: BaseException | None = None  # raised on the host once the fit returns
        self._sink = sink
        self._k_max = k_max
        self._target = target_interval
        self._last = time.perf_counter()

    def reset_clock(self) -> None:
        self._last = time.perf_counter()

    def on_rows(self, rows: np.ndarray) -> tuple[int, bool]:
        now = time.perf_counter()
        n = rows.shape[0]
        self.flushes += 1
        if n:
            per_row = max((now - self._last) / n, 1e-7)
            k = int(min(max(self._target / per_row, 1), self._k_max))
            self._sink(rows, time.time())
        else:
            k = 1
        self._last = now
        return k, self.stop_requested.is_set()

    def __enter__(self) -> Channel:
        _CHANNELS[self.token] = self
        return self

    def __exit__(self, *exc: object) -> None:
        _CHANNELS.pop(self.token, None)


_TOKENS = itertools.count(1)
_CHANNELS: dict[int, Channel] = {}


def _on_flush(token: Any, buf: Any, count: Any) -> tuple[Any, Any]:
    # Runs on an XLA thread: numpy only, never jnp, never block.
    tok = int(np.asarray(token))
    n = int(np.asarray(count))
    channel = _CHANNELS.get(tok)
    if channel is None:  # nobody listens any more: ask the loop to stop
        return np.int32(K_MAX), np.bool_(True)
    rows = np.array(np.asarray(buf)[:n], dtype=np.float64)
    try:
        k, stop = channel.on_rows(rows)
    except BaseException as e:  # e.g. KeyboardInterrupt: stop the fit cleanly, re-raise on the host
        channel.interrupt = e
        return np.int32(K_MAX), np.bool_(True)
    return np.int32(k), np.bool_(stop)
