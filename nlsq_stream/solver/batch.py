"""Many fits as one compiled program: the engine's loop under ``jax.vmap``, compacted as fits end.

A batch of N fits of one model runs in *chunks*: one call of a vmapped program advances every
fit of the batch by at most ``trials`` trials. The loop of each fit is the single-fit engine's
``engine._run``, so every fit takes the very steps it would take alone. Between chunks the host
reads each fit's packed results (one transfer), writes out the fits that ended, and gathers the
ones still running into a smaller batch, padded up to a size from a short ladder of *buckets*
(``BUCKET_FACTOR`` apart). Converged fits thus stop costing work, and the number of compiled
programs stays bounded: per bucket size one start and one resume program, whatever N is.

A vmapped ``while_loop`` runs until its slowest lane ends; chunking bounds that waste to one
chunk, and compaction removes the ended lanes from the next one. Very large batches run in
pieces of ``batch_size`` fits, one after the other, so memory stays bounded.

Between chunks the host also reports progress (``on_chunk``) and checks a stop flag: a stopped
batch returns every running fit's best parameters so far, with status -2.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from . import engine

DEFAULT_TRIALS = 16  # most trials per chunk: most well-started fits of a few parameters end in one
TARGET_INTERVAL = 0.05  # seconds a chunk should last: the latency of a stop and of progress
MIN_BUCKET = 16  # the smallest padded batch (below it a chunk costs about the same)
BUCKET_FACTOR = 4  # bucket sizes are MIN_BUCKET * BUCKET_FACTOR**j: few programs to compile
DEFAULT_BATCH_SIZE = 1 << 16  # fits in one piece


class _Count(NamedTuple):
    trials: Array


@dataclasses.dataclass(frozen=True)
class TrialCounter:
    """The engine's ``Recorder`` for batches: it records nothing and only bounds a chunk's trials,
    so a batched chunk carries no record buffer."""

    def init(self, n: int, dtype: Any) -> _Count:
        return _Count(trials=jnp.zeros((), jnp.int32))

    def room(self, st: _Count, k: Array) -> Array:
        return st.trials < k

    def record(self, st: _Count, *args: Any, **kwargs: Any) -> _Count:
        return _Count(trials=st.trials + 1)


def _one_fit(
    problem: Any,
    config: engine.Config,
    vectors: Array,
    scalars: Array,
    data: Any,
    carry: Any,
    k: Array,
) -> tuple[Array, Array]:
    """One fit's chunk, traced (the programs vmap it): (flat state, packed results)."""
    st = engine._run(problem, config, vectors, scalars, data, (carry, k), flat_state=False)
    m = jax.eval_shape(lambda x: problem.residual(x, data), vectors[0]).shape[0]
    return engine._flatten(st), engine._pack(st, m)


def _start(
    problem: Any,
    config: engine.Config,
    treedef: Any,
    axes: tuple[int | None, ...],
    vectors: Array,
    scalars: Array,
    leaves: list[Array],
    k: Array,
) -> tuple[Array, Array]:
    """Start every fit of the batch at its ``x0`` and run at most ``k`` trials."""

    def one(v: Array, lv: list[Array]) -> tuple[Array, Array]:
        data = jax.tree_util.tree_unflatten(treedef, lv)
        return _one_fit(problem, config, v, scalars, data, None, k)

    return jax.vmap(one, in_axes=(0, list(axes)))(vectors, leaves)


def _resume(
    problem: Any,
    config: engine.Config,
    treedef: Any,
    axes: tuple[int | None, ...],
    vectors: Array,
    scalars: Array,
    leaves: list[Array],
    carry: Array,
    k: Array,
) -> tuple[Array, Array]:
    """Run every fit of the batch for at most ``k`` more trials from its flat state ``carry``."""

    def one(v: Array, lv: list[Array], c: Array) -> tuple[Array, Array]:
        data = jax.tree_util.tree_unflatten(treedef, lv)
        return _one_fit(problem, config, v, scalars, data, c, k)

    return jax.vmap(one, in_axes=(0, list(axes), 0))(vectors, leaves, carry)


_STATIC = ("problem", "config", "treedef", "axes")

# One batch chunk runs at a time in a process. Two threads running batch programs at once hang
# in XLA:CPU (jax 0.10.2: both wait forever for their first chunk, 400 fits, warm or not; a
# lone fit beside a batch does not), and one chunk already uses the cores it can. A chunk lasts
# about TARGET_INTERVAL, so another thread's batch (or its stop) waits about that long.
_ONE_AT_A_TIME = threading.Lock()


@functools.cache
def programs() -> tuple[Any, Any]:
    """The start and resume programs, jitted at first use: their compiler options depend on the
    backend, and importing the package must not start it."""
    options = engine._Program._options(0)
    return (
        jax.jit(_start, static_argnames=_STATIC, **options),
        jax.jit(_resume, static_argnames=_STATIC, **options),
    )


def bucket(count: int, largest: int) -> int:
    """The padded size for ``count`` running fits: the smallest bucket that holds them."""
    size = MIN_BUCKET
    while size < count and size < largest:
        size *= BUCKET_FACTOR
    return max(min(size, largest), count)


@dataclasses.dataclass
class Progress:
    """What the host knows between two chunks (``on_chunk`` gets it)."""

    chunk: int  # chunks run so far in this batch
    n_fits: int
    n_running: int
    n_converged: int
    n_failed: int  # ended without converging: out of budget, or not finite at the start
    costs: np.ndarray  # (N,) the latest cost of every fit (NaN where none is known yet)
    nfev: int  # evaluations so far, all fits


@dataclasses.dataclass
class BatchOutput:
    """The engine's answer for every fit (host arrays, fit order)."""

    x: np.ndarray  # (N, n)
    grad: np.ndarray  # (N, n)
    cov: np.ndarray  # (N, n, n) unscaled covariance pinv(J'J)
    cost: np.ndarray  # (N,)
    optimality: np.ndarray
    nfev: np.ndarray
    njev: np.ndarray
    nit: np.ndarray
    status: np.ndarray
    chunks: int = 0
    buckets: tuple[int, ...] = ()  # the padded sizes the chunks ran at, in order

    @classmethod
    def empty(cls, count: int, n: int, dtype: Any) -> BatchOutput:
        f = lambda *shape: np.full((count, *shape), np.nan, dtype)
        i = lambda: np.zeros(count, np.int64)
        return cls(f(n), f(n), f(n, n), f(), f(), i(), i(), i(), np.full(count, engine.RUNNING))

    def store(self, where: np.ndarray, packed: np.ndarray, n: int) -> None:
        """Write the packed results (rows as ``engine._pack`` lays them out) of fits ``where``."""
        self.x[where] = packed[:, :n]
        self.grad[where] = packed[:, n : 2 * n]
        self.cov[where] = packed[:, 2 * n : 2 * n + n * n].reshape(-1, n, n)
        tail = packed[:, 2 * n + n * n :]
        self.cost[where], self.optimality[where] = tail[:, 0], tail[:, 1]
        self.nfev[where], self.njev[where] = tail[:, 2], tail[:, 3]
        self.nit[where], self.status[where] = tail[:, 4], tail[:, 5]


@dataclasses.dataclass
class BatchProblem:
    """A validated batch: what ``run`` needs. Per-fit arrays have the fits on axis 0."""

    problem: Any
    config: engine.Config
    vectors: np.ndarray  # (N, 4, n): x0, lb, ub, x_scale of each fit
    scalars: np.ndarray  # (5,): ftol, xtol, gtol, f_scale, max_nfev (shared)
    data: Any  # a pytree of arrays: the leaves whose axis is 0 are per fit, None shared
    axes: tuple[int | None, ...]  # one per leaf of ``data``, in ``tree_flatten`` order

    @property
    def n_fits(self) -> int:
        return int(self.vectors.shape[0])


def run(
    batch: BatchProblem,
    trials: int = DEFAULT_TRIALS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop: threading.Event | None = None,
    on_chunk: Callable[[Progress], None] | None = None,
) -> BatchOutput:
    """Run every fit of ``batch`` to its end (or until ``stop`` is set), piece by piece."""
    n_fits, n = batch.n_fits, batch.vectors.shape[2]
    out = BatchOutput.empty(n_fits, n, batch.vectors.dtype)
    leaves, treedef = jax.tree_util.tree_flatten(batch.data)
    axes = batch.axes
    if len(axes) != len(leaves):
        raise ValueError(f"one axis per data leaf expected, got {len(axes)} for {len(leaves)}")
    progress = Progress(0, n_fits, n_fits, 0, 0, np.full(n_fits, np.nan), 0)
    for lo in range(0, n_fits, batch_size):
        if stop is not None and stop.is_set():
            break
        piece = np.arange(lo, min(lo + batch_size, n_fits))
        _run_piece(batch, piece, leaves, treedef, axes, trials, out, progress, stop, on_chunk)
    left = out.status == engine.RUNNING  # pieces not started before a stop
    if left.any():
        out.x[left] = batch.vectors[left, 0]
        out.status[left] = engine.STATUS_STOPPED
    return out


def _run_piece(
    batch: BatchProblem,
    piece: np.ndarray,
    leaves: list[Any],
    treedef: Any,
    axes: tuple[int | None, ...],
    trials: int,
    out: BatchOutput,
    progress: Progress,
    stop: threading.Event | None,
    on_chunk: Callable[[Progress], None] | None,
) -> None:
    """Chunks of one piece until every fit in it ended: start, then resume, compacting the
    running fits whenever they fit a smaller bucket (ended fits are otherwise left in place:
    their loops do nothing, and no data is gathered)."""
    n = batch.vectors.shape[2]
    statics = dict(problem=batch.problem, config=batch.config, treedef=treedef, axes=axes)
    # The piece's per-fit data moves to the device once; a compaction gathers the running fits.
    vectors = jax.device_put(batch.vectors[piece])
    local = [
        jax.device_put(np.asarray(leaf)[piece]) if ax == 0 else leaf
        for leaf, ax in zip(leaves, axes, strict=True)
    ]
    lanes = np.arange(piece.size)  # lane -> position in the piece
    live = np.ones(piece.size, bool)  # lanes whose fit still runs (padding lanes never do)
    lane_vectors, lane_leaves = vectors, local
    k = trials
    started = time.perf_counter()
    flat, rows = _first_chunk(vectors, batch.scalars, local, k, statics)
    resume_program = programs()[1]
    first = True
    while True:
        chunk_s = time.perf_counter() - started
        out.chunks += 1
        out.buckets += (lanes.size,)
        ended = live & (rows[:, -1] != engine.RUNNING)
        if stop is not None and stop.is_set():
            rows = rows.copy()
            rows[live & ~ended, -1] = engine.STATUS_STOPPED
            ended = live.copy()
        seen = live.copy()
        out.store(piece[lanes[ended]], rows[ended], n)
        live &= ~ended
        _update(progress, out, piece[lanes[seen]], rows[seen])
        if on_chunk is not None:
            on_chunk(progress)
        if not live.any():
            return
        if not first:  # the first chunk's time includes compiling: it predicts nothing
            k = _next_trials(chunk_s, k, trials)
        first = False
        size = bucket(int(live.sum()), piece.size)
        if size < lanes.size:
            keep = _padded(np.nonzero(live)[0], size)
            flat, lanes = _take(flat, keep), lanes[keep]
            live = ~_is_padding(keep)
            lane_vectors, lane_leaves = _take(vectors, lanes), _gather(local, axes, lanes)
        started = time.perf_counter()
        with _ONE_AT_A_TIME:
            flat, packed = resume_program(
                vectors=lane_vectors,
                scalars=batch.scalars,
                leaves=lane_leaves,
                carry=flat,
                k=np.int32(k),
                **statics,
            )
            rows = engine.fetch(packed)


def _first_chunk(
    vectors: Any, scalars: np.ndarray, leaves: list[Any], k: int, statics: dict[str, Any]
) -> tuple[Any, np.ndarray]:
    """The first chunk of a piece: its carry (on the device) and rows. Where XLA refuses the
    solver's compiler options (``engine.options_rejected``), the programs are made again
    without them."""
    for _ in range(2):
        start_program = programs()[0]
        try:
            with _ONE_AT_A_TIME:
                flat, packed = start_program(
                    vectors=vectors, scalars=scalars, leaves=leaves, k=np.int32(k), **statics
                )
                return flat, engine.fetch(packed)
        except jax.errors.JaxRuntimeError as e:
            if not engine.options_rejected(e):
                raise
            programs.cache_clear()
    raise AssertionError("unreachable: the programs without options were refused")


def _next_trials(chunk_s: float, k: int, most: int) -> int:
    """Trials for the next chunk so that it lasts about ``TARGET_INTERVAL`` (a stop request
    and a progress event then wait at most that long)."""
    per_trial = max(chunk_s / k, 1e-7)
    return int(min(max(TARGET_INTERVAL / per_trial, 1), most))


def _padded(idx: np.ndarray, size: int) -> np.ndarray:
    """``idx`` padded to ``size`` by repeating its first entry (extra lanes: work dropped)."""
    if idx.size == size:
        return idx.astype(np.int32)
    return np.concatenate([idx, np.full(size - idx.size, idx[0])]).astype(np.int32)


def _is_padding(idx: np.ndarray) -> np.ndarray:
    """The repeats ``_padded`` appended (every entry after the first of a repeated value)."""
    out = np.zeros(idx.size, bool)
    _, first = np.unique(idx, return_index=True)
    out[np.setdiff1d(np.arange(idx.size), first)] = True
    return out


def _take(a: Any, idx: np.ndarray) -> Array:
    return jnp.take(a, idx, axis=0)


def _gather(leaves: list[Any], axes: tuple[int | None, ...], idx: np.ndarray) -> list[Any]:
    return [_take(leaf, idx) if ax == 0 else leaf for leaf, ax in zip(leaves, axes, strict=True)]


def _update(progress: Progress, out: BatchOutput, fits: np.ndarray, rows: np.ndarray) -> None:
    """Progress after a chunk whose packed ``rows`` belong to ``fits`` (global indices)."""
    n = out.x.shape[1]
    tail = rows[:, 2 * n + n * n :]
    progress.costs[fits] = tail[:, 0]
    progress.chunk += 1
    status = out.status
    progress.n_running = int(np.count_nonzero(status == engine.RUNNING))
    progress.n_converged = int(np.count_nonzero(status > 0))
    progress.n_failed = int(np.count_nonzero((status <= 0) & (status != engine.RUNNING)))
    progress.nfev = int(out.nfev.sum() + tail[tail[:, 5] == engine.RUNNING, 2].sum())
