"""Stage two: per-iteration records leave the device in batches, in chunks of the fit.

A host callback from inside a compiled loop costs ~80 µs here (more than a whole iteration of a
small fit), and a program that contains one is dispatched through JAX's slow Python path and runs
its callbacks on XLA's threads. So a watched fit contains no callback at all: it runs as a
sequence of *chunks*. Each chunk is one call of the compiled loop (``engine.first_chunk``, then
``engine.solve_chunk``) that runs at most ``k`` trials (loop iterations), writing each
iteration's record into a device-side buffer, gated on the device (``level`` 1: every 10th
iteration and the last; 2: every one). The loop state stays on the device between chunks; only
the records come back, one transfer per chunk.

* ``k`` is chosen by the host so that a chunk lasts about ``TARGET_INTERVAL`` seconds of fit time
  (measured on the previous chunk), which bounds both the overhead (one hand-off per interval) and
  the latency (a record waits at most one interval). A problem seen before starts with the
  per-trial time of its last fit, so a short fit is a single chunk; a new one starts with a chunk
  of one trial (iteration 0 reaches the watchers at once, and the host learns the trial time).
  A chunk stretches up to ``TAIL`` intervals (80 ms) when the fit is expected to end within it
  (the last fit of the problem took that many trials): no short last chunk. A chunk boundary is
  not free: at 1e6 points a fit split in two took 3.2 ms longer (120 pairs, device-side), so a
  fit expected to end within 80 ms, inside the latency budget (100 ms), runs as one chunk.
  Judged by time alone, that rule split the same fit on a slower day: the 1e6-point fit (6
  trials, ~60 ms) took ~110 ms with the machine 2-4 times slower and was cut in three chunks,
  adding two boundaries to the fit that could least afford them. So a fit expected to end
  within ``TAIL_TRIALS`` (8) trials also runs as one chunk while it is expected to end within
  ``TAIL_MAX`` intervals (240 ms): a slower machine does not split a short fit, and its events
  then wait up to 240 ms (only on a machine 3-4 times slower than usual).
  Counting trials rather than records means that a long run of rejected trials still ends its
  chunk, so a stop request always gets through. A chunk also ends when its buffer is full.
* a stop request (``stream.stop()``, the Stop button, Ctrl-C) is seen between chunks: the fit
  ends there with status -2 and the best parameters so far.
* the last partial batch is the last chunk's records; the channel holds them back until the
  terminal event, so that a short fit reaches its watchers in one hand-off (``release``, and
  ``pipeline.HubChannel.finish``).

``verbose=0`` runs ``engine.solve``: one program, no emitter, no chunks.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import Array

from ..solver import engine

TARGET_INTERVAL = 0.04  # seconds of fit time per chunk (latency budget: 100 ms)
TAIL = 2.0  # a chunk stretches this far to end a fit expected to end within it (80 ms)
TAIL_TRIALS = 8  # ... or to end a fit expected to end within this many trials, ...
TAIL_MAX = 6.0  # ... and within this many intervals (240 ms: the latency such a fit may have)
K_MAX = 256  # rows in the device buffer (a full buffer ends the chunk)
K_TRIALS_MAX = 1 << 14  # at most this many trials per chunk
ROW_HEAD = 6  # iteration, nfev, cost, cost_reduction, step_norm, optimality; then the params
_CACHE_SIZE = 128  # problems whose per-trial time and state template are remembered


class EmitState(NamedTuple):
    buf: Array  # (K_MAX, ROW_HEAD + n)
    filled: Array  # rows filled in this chunk
    trials: Array  # trials (loop iterations) in this chunk


@dataclasses.dataclass(frozen=True)
class Emitter:
    """Static emission settings (part of the compilation key): ``level`` 1 = every 10th
    iteration and the last, 2 = every iteration."""

    level: int
    k_max: int = K_MAX

    def init(self, n: int, dtype: Any) -> EmitState:
        return EmitState(
            buf=jnp.zeros((self.k_max, ROW_HEAD + n), dtype),
            filled=jnp.zeros((), jnp.int32),
            trials=jnp.zeros((), jnp.int32),
        )

    def room(self, st: EmitState, k: Array) -> Array:
        """May the chunk run another trial? (At most one row per trial, so the buffer can't
        overflow.)"""
        return (st.trials < k) & (st.filled < self.k_max)

    def record(
        self,
        st: EmitState,
        nit: Array,
        nfev: Array,
        cost: Array,
        reduction: Array,
        step_norm: Array,
        optimality: Array,
        x: Array,
        done: Array,
        final: Array | None = None,
    ) -> EmitState:
        """Count a trial; append a row when it completed an iteration that is wanted (gated on
        the device). ``final``: the iteration ends the fit (always recorded at level 1)."""
        dtype = st.buf.dtype
        if self.level >= 2 or final is None:
            wanted = done
        else:
            wanted = done & ((nit % 10 == 0) | final)
        head = jnp.stack(
            [nit.astype(dtype), nfev.astype(dtype), cost, reduction, step_norm, optimality]
        )
        row = jnp.concatenate([head.astype(dtype), x.astype(dtype)])
        idx = jnp.minimum(st.filled, self.k_max - 1)
        buf = st.buf.at[idx].set(jnp.where(wanted, row, st.buf[idx]))
        return EmitState(buf=buf, filled=st.filled + wanted.astype(jnp.int32), trials=st.trials + 1)


class Channel:
    """Host end of one fit's emission. ``sink(rows, received_at)`` gets each batch of rows."""

    def __init__(
        self,
        sink: Callable[[np.ndarray, float], None] | None = None,
        target_interval: float = TARGET_INTERVAL,
    ) -> None:
        self.stop_requested = threading.Event()
        self._held: tuple[np.ndarray, float] | None = None
        self.flushes = 0
        self.last_iteration = -1  # of the rows delivered so far
        self.keyboard_interrupt: KeyboardInterrupt | None = None  # re-raised after the sinks
        self._memory: Memory | None = None  # what is known of the problem (``first_k``)
        self._sink = sink
        self._target = target_interval
        self._last = time.perf_counter()
        self._k = 1
        self._trials = 0  # run so far
        self._expected: int | None = None  # trials the last fit of this problem needed

    def on_keyboard_interrupt(self, e: KeyboardInterrupt) -> None:
        """Ctrl-C during a watched fit: stop it (best parameters so far), re-raise afterwards."""
        if self.keyboard_interrupt is None:
            self.keyboard_interrupt = e
        self.stop_requested.set()

    def first_k(self, key: Any = None) -> int | None:
        """Trials in the first chunk, or None for a problem not seen before.

        For a problem seen before (same ``key``) the last fit's per-trial time predicts how many
        trials fill a chunk, so a short fit runs as a single chunk. For a new one the host times
        the fit's start (one evaluation, about one trial) instead.
        """
        self._last = time.perf_counter()
        memory = None
        if key is not None:  # one look-up per fit: hashing the key (the config) is not free
            memory = _MEMORY.get(key)
            if memory is None:
                memory = _MEMORY[key] = Memory()
                if len(_MEMORY) > _CACHE_SIZE:
                    _MEMORY.popitem(last=False)
            else:
                _MEMORY.move_to_end(key)
        self._memory = memory
        per_trial = memory.per_trial if memory is not None else None
        self._expected = memory.trials if memory is not None else None
        if per_trial is None:
            self.announce()  # a new problem may compile first: show the start at once
            return None
        return self._k_for(per_trial)

    def release(self) -> None:
        """Deliver the rows held back as the last ones."""
        held, self._held = self._held, None
        if held is not None:
            self.send(*held)

    def send(self, rows: np.ndarray, received_at: float) -> None:
        """Hand one batch of rows on: to ``sink``, or what a subclass does instead (a method, not
        a bound method stored on the object: no reference cycle to leave for the GC)."""
        if self._sink is not None:
            self._sink(rows, received_at)

    def announce(self) -> None:
        """Make the fit's start known now (see ``pipeline.HubChannel``); a no-op here."""

    def dispatched(self) -> None:
        """The fit's first program is on its way: host work that need not precede it (the
        watchers' setup, see ``pipeline.HubChannel``) can overlap it now. A no-op here."""

    def _k_for(self, per_trial: float) -> int:
        per_trial = max(per_trial, 1e-7)
        k = int(min(max(self._target / per_trial, 1), K_TRIALS_MAX))
        if self._expected is not None:
            # A fit expected to end within TAIL intervals runs to its end in this chunk, with the
            # rest of those intervals as slack: a short last chunk would cost a chunk boundary.
            # So does one expected to end within TAIL_TRIALS trials and TAIL_MAX intervals: the
            # same fit on a machine a few times slower (under load, say) is not split either.
            left = self._expected - self._trials
            needed = left * per_trial
            if 0 < left and needed <= self._target * TAIL:
                k = max(k, int(min(self._target * TAIL / per_trial, K_TRIALS_MAX)))
            elif 0 < left <= TAIL_TRIALS and needed <= self._target * TAIL_MAX:
                k = max(k, int(self._target * TAIL_MAX / per_trial), left + 2)  # 2 spare trials
        return k

    def remember_trials(self, trials: int) -> None:
        """The fit ended after ``trials`` trials: the next fit of the problem expects as many."""
        if self._memory is not None:
            self._memory.trials = trials

    def on_rows(self, rows: np.ndarray, trials: int, last: bool = False) -> tuple[int, bool]:
        """Take a chunk's rows, from ``trials`` trials; answer (trials in the next chunk, stop?).

        The same as ``on_chunk(trials)`` then ``deliver(rows, last)``.
        """
        answer = self.on_chunk(trials)
        self.deliver(rows, last)
        return answer

    def on_chunk(self, trials: int) -> tuple[int, bool]:
        """A chunk of ``trials`` trials ended: answer (trials in the next chunk, stop?).

        A chunk with no trial leaves the timing alone.
        """
        now = time.perf_counter()
        self.flushes += 1
        self._trials += trials
        if trials > 0:
            per_trial = max((now - self._last) / trials, 1e-7)
            if self._memory is not None and trials > 1:
                self._memory.per_trial = per_trial
            self._last = now
            self._k = self._k_for(per_trial)
        return self._k, self.stop_requested.is_set()

    def deliver(self, rows: np.ndarray, last: bool = False) -> None:
        """Hand a chunk's rows on. The ``last`` rows of a fit are held back for ``release()``,
        which the pipeline calls just before it publishes the terminal event: a short fit's
        events then reach the watchers in one hand-off."""
        if rows.shape[0]:
            self.last_iteration = int(rows[-1, 0])
            if last:
                self._held = (rows, time.time())
            else:
                self.send(rows, time.time())


class Memory:
    """What the last fit of a problem taught: seconds per trial, and the trials it took."""

    __slots__ = ("per_trial", "trials")

    def __init__(self, per_trial: float | None = None, trials: int | None = None) -> None:
        self.per_trial = per_trial
        self.trials = trials


_MEMORY: collections.OrderedDict[Any, Memory] = collections.OrderedDict()  # by problem, LRU


def run_chunks(
    channel: Channel,
    problem: Any,
    config: engine.Config,
    vectors: np.ndarray,
    scalars: np.ndarray,
    data: Any,
    key: Any,
) -> tuple[dict[str, Any], Any, Any]:
    """Run a watched fit chunk by chunk, handing each chunk's records to ``channel``.

    Returns the results as ``engine.unpack`` gives them (status -2 when stopped) and the final
    ``fun`` and ``jac``, dispatched but not waited for. Ctrl-C that reaches this thread as
    KeyboardInterrupt stops the fit like ``stream.stop()``.
    """
    n = vectors.shape[1]
    k = channel.first_k(key)
    # A new problem starts with one trial: its first rows come at once, and the host learns how
    # long a trial takes. Chunks run one after the other: queueing the next chunk behind one not
    # yet finished (so that the device never waits for the host) left a fit waiting forever on
    # an XLA future (stopped fits, about 1 in 17 in one run here; jax 0.10.2, CPU): not done.
    flat, packed = engine.first_chunk(problem, config, vectors, scalars, data, np.int32(k or 1))
    channel.dispatched()
    v: dict[str, Any] | None = None
    info = np.zeros(0)
    try:
        while True:
            v, rows, trials, info = engine.unpack_chunk(engine.fetch(packed), n)
            running = v["status"] == engine.RUNNING
            k, stop = channel.on_chunk(trials)
            if running and not stop:
                # The next chunk goes first: the sinks' work on these rows (in their thread,
                # under the GIL) then overlaps the device's, instead of delaying its dispatch.
                flat, packed = engine.solve_chunk(
                    problem, config, vectors, scalars, data, flat, np.int32(k)
                )
            channel.deliver(np.asarray(rows, np.float64), last=not running)
            if not running or stop:
                break
    except KeyboardInterrupt as e:  # Ctrl-C where no handler of ours caught it
        if v is None:
            raise
        channel.on_keyboard_interrupt(e)
    if v["status"] > 0:  # converged: a fit cut short by max_nfev or a stop predicts nothing
        channel.remember_trials(int(v["nfev"]) - 1)  # a trial is one evaluation after the first
    if v["status"] == engine.RUNNING:  # stopped between chunks
        v["status"] = engine.STATUS_STOPPED
        # The iteration the fit stopped at is reported even where level 1 skipped it.
        current = engine.current_row(v, info)
        if int(current[0]) > channel.last_iteration:
            channel.on_rows(np.asarray(current[None, :], np.float64), 0, last=True)
    if not config.fun_jac:
        return v, None, None
    fun, jac = engine.fun_and_jac(problem, config, v["x"], scalars, data)
    return v, fun, jac
