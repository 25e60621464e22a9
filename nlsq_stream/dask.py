"""Fits in blocks with Dask: each block of a dask array one ``curve_fit_batch``, in-process or on
a ``distributed`` cluster, with one live view of the whole job.

``fit_blocks`` takes ``Y`` (..., m), chunked over its leading axes (the last axis one chunk),
runs one :func:`~nlsq_stream.curve_fit_batch` per block and returns dask arrays with ``Y``'s
leading shape. Per-fit arguments (``p0`` (..., p); ``x``, ``sigma``, ``mask`` (..., m)) are split
with the blocks; shared ones ((p,), (m,)) go to every block. Without a client the blocks run in
this process, on a thread pool made for the call (and shut down after it); with a
``distributed.Client`` they run on its cluster, and a block whose worker died runs again on
another one (distributed's own retry). ``submit_blocks`` starts the same job and returns a
:class:`BlockJob` handle at once: ``result()``, ``stop()`` (the fits end early, status -2, their
results kept) and ``cancel()`` (stopped, results dropped).

Watched (``sinks`` or ``verbose``), each block reports when it starts, while it runs (its own
aggregated progress, at most once per ``BLOCK_PROGRESS_S``) and when it ends, never once per fit:
on a worker through distributed's own event transport (``Worker.log_event``, read on the client
with ``Client.subscribe_topic``), in-process straight to the client's tally. The tally publishes
``BatchProgress`` events (with their ``blocks`` field) on the hub under one batch id, so the
console line, JSON lines and ``subscribe`` work as for one ``curve_fit_batch``. A report carries
its block id and an attempt id: a block run twice is counted once (its latest attempt's running
counts until one attempt ends).

Stopping: distributed does not interrupt a running task, so ``stop()`` and ``cancel()`` send the
job's id to every worker (``Client.run``), where each running block of the job has its stop flag
set; the batched solver sees it between two chunks (about 0.1 s apart) and ends the block's fits.

``curvefit`` is the xarray face, shaped like ``xarray.DataArray.curvefit``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any, NamedTuple

import anyio
import anyio.to_thread
import jax
import numpy as np

from . import _control
from ._exceptions import FitError, SinkError
from ._result import BatchResult
from .events import QUANTILES, BatchFinished, BatchProgress, BatchStarted, Event, FitFailed
from .sinks import default_display
from .solver import batch as solver_batch
from .solver.curve_fit_batch import prepare_curve_fit_batch
from .stream.batch import PROGRESS_INTERVAL, new_batch_id
from .stream.hub import HUB, Batch, Policy, Subscription
from .stream.pipeline import check_sinks, describe, publish_end, with_display
from .stream.runner import SinkRunner

try:
    import cloudpickle
    import dask.array as da
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError("nlsq_stream.dask needs Dask: pip install 'nlsq_stream[dask]'") from e

__all__ = ["BlockFit", "BlockFitError", "BlockJob", "curvefit", "fit_blocks", "submit_blocks"]

SETTLE_S = 2.0  # seconds to wait, after the results, for blocks' reports still in transit
BLOCK_PROGRESS_S = 0.5  # a running block reports its progress at most this often
POLL_S = 0.05  # how often a waiting ``result()`` looks for a stop request (``stop_fit``)
PER_FIT = ("x", "p0", "sigma", "mask")  # the arguments that may be given per fit


class BlockFitError(FitError):
    """A block's ``curve_fit_batch`` raised on a worker; the message names the block and the
    cause (``__cause__`` is the original where it survives the trip back)."""


class BlockFit(NamedTuple):
    """``fit_blocks``'s answer: dask arrays chunked like ``Y``'s leading axes."""

    popt: Any  # (..., p)
    perr: Any  # (..., p)
    status: Any  # (...)
    pcov: Any  # (..., p, p)


# -- on a worker (or in this process): a block's run, its reports, its stop flag ----------------

# In-process runs report to the client's tally through this table (topic -> handler).
_LOCAL: dict[str, Callable[[dict[str, Any]], None]] = {}

# The stop flags of the blocks running in this process, by job id, and the jobs told to stop
# here (a block of such a job that starts later stops at once).
_LOCK = threading.Lock()
_RUNNING: dict[str, list[threading.Event]] = {}
_STOPPED: set[str] = set()

# One block's fits at a time in a process: one batch program already uses every core, and a
# block holds its piece's data and state on the device only while it runs, so a worker's memory
# is one block's whatever its thread count. (Batch programs of two threads at once also hang in
# XLA:CPU, jax 0.10.2: the solver guards that itself, one chunk at a time, see
# ``solver.batch._ONE_AT_A_TIME``.) Blocks of a process (the threads of the in-process pool, or a
# worker's threads) overlap only their loading and packing.
_EXCLUSIVE = threading.Lock()

# The models met in this process, by a digest of their pickle. Each task brings its own copy of
# the model (unpickled anew), and the solver compiles once per model object: without this, every
# block on a worker compiled again (measured: about 1 s a block, ``bench dask``).
_MODELS: OrderedDict[str, Callable[..., Any]] = OrderedDict()
MODELS_KEPT = 32


def _same_model(key: str | None, f: Callable[..., Any]) -> Callable[..., Any]:
    """The first model object this process met under ``key`` (``f`` itself the first time)."""
    if key is None:
        return f
    with _LOCK:
        kept = _MODELS.setdefault(key, f)
        _MODELS.move_to_end(key)
        while len(_MODELS) > MODELS_KEPT:
            _MODELS.popitem(last=False)
    return kept


def _model_key(f: Callable[..., Any]) -> str | None:
    """A digest of ``f``'s pickle (as dask ships it), or None where it does not pickle."""
    try:
        return hashlib.sha256(cloudpickle.dumps(f)).hexdigest()
    except Exception:  # not picklable: it can only run here, where it is one object anyway
        return None


def _stop_here(job: str) -> int:
    """Stop every block of ``job`` running in this process (``Client.run`` calls it on each
    worker); returns how many were running."""
    with _LOCK:
        _STOPPED.add(job)
        flags = list(_RUNNING.get(job, ()))
    for flag in flags:
        flag.set()
    return len(flags)


def _forget_here(job: str) -> None:
    with _LOCK:
        _STOPPED.discard(job)


def _running_here(job: str) -> int:
    """How many blocks of ``job`` are running in this process."""
    with _LOCK:
        return len(_RUNNING.get(job, ()))


@contextlib.contextmanager
def _stoppable(job: str) -> Iterator[threading.Event]:
    flag = threading.Event()
    with _LOCK:
        _RUNNING.setdefault(job, []).append(flag)
        if job in _STOPPED:
            flag.set()
    try:
        yield flag
    finally:
        with _LOCK:
            flags = _RUNNING[job]
            flags.remove(flag)
            if not flags:
                del _RUNNING[job]


def _report(topic: str | None, msg: dict[str, Any]) -> None:
    if topic is None:
        return
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a distributed worker: this process
        handler = _LOCAL.get(topic)
        if handler is not None:
            handler(msg)
        return
    worker.log_event(topic, msg)


def _quantiles(costs: np.ndarray) -> list[float]:
    ok = costs[np.isfinite(costs)]
    return np.quantile(ok, QUANTILES).tolist() if ok.size else [float("nan")] * len(QUANTILES)


class _Reporter:
    """One attempt of one block reporting to the client's tally: its start, its own progress
    (at most once per ``BLOCK_PROGRESS_S``, from the solver's between-chunks hook), its end."""

    def __init__(self, topic: str | None, block: int, n_fits: int) -> None:
        self.topic, self.block, self.n_fits = topic, block, n_fits
        self.attempt = uuid.uuid4().hex[:12]
        self._last = time.monotonic()

    def send(self, kind: str, **fields: Any) -> None:
        head = {"block": self.block, "attempt": self.attempt, "kind": kind, "n_fits": self.n_fits}
        _report(self.topic, {**head, **fields})

    def on_chunk(self, p: solver_batch.Progress) -> None:
        now = time.monotonic()
        if self.topic is None or not p.n_running or now - self._last < BLOCK_PROGRESS_S:
            return
        self._last = now
        self.send(
            "progress",
            n_converged=int(p.n_converged),
            n_failed=int(p.n_failed),
            nfev=int(p.nfev),
            quantiles=_quantiles(p.costs),
        )


def _block_id(block_info: Any) -> int:
    info = block_info[0]
    loc, grid = info["chunk-location"][:-1], info["num-chunks"][:-1]
    return int(np.ravel_multi_index(loc, grid)) if grid else 0


def _run_block(
    f: Callable[..., Any],
    y: np.ndarray,
    args: dict[str, Any],
    options: dict[str, Any],
    stop: threading.Event,
    on_chunk: Callable[[solver_batch.Progress], None],
) -> BatchResult:
    """``curve_fit_batch(f, x, y, **args, **options)``, stoppable, with a hook between chunks."""
    opts = dict(options)
    trials = opts.pop("trials", solver_batch.DEFAULT_TRIALS)
    batch_size = opts.pop("batch_size", solver_batch.DEFAULT_BATCH_SIZE)
    args = dict(args)
    prep = prepare_curve_fit_batch(f, args.pop("x"), y, **args, **opts)
    return prep.result(solver_batch.run(prep.batch, trials, batch_size, stop, on_chunk))


def _fit_block(
    block: np.ndarray,
    *per_fit: np.ndarray,
    names: tuple[str, ...],
    f: Callable[..., Any],
    model_key: str | None,
    shared: dict[str, Any],
    options: dict[str, Any],
    job: str,
    topic: str | None,
    x64: bool,
    block_info: Any = None,
) -> np.ndarray:
    """One block: its leading axes flattened to N fits (with the per-fit arguments' blocks), one
    batched run, the answers packed as (..., p + p + p*p + 1): popt, perr, pcov, status."""
    bid = _block_id(block_info) if block_info else 0
    f = _same_model(model_key, f)
    lead, m = block.shape[:-1], block.shape[-1]
    n = int(np.prod(lead))
    args = dict(shared)
    for name, a in zip(names, per_fit, strict=True):
        args[name] = np.reshape(a, (n, a.shape[-1]))
    if args.get("mask") is not None and np.ndim(args["mask"]) == 1:
        args["mask"] = np.broadcast_to(args["mask"], (n, m))
    rep = _Reporter(topic, bid, n)
    rep.send("start")
    t0 = time.time()
    try:
        with jax.enable_x64(x64), _stoppable(job) as flag, _EXCLUSIVE:
            res = _run_block(f, np.reshape(block, (n, m)), args, options, flag, rep.on_chunk)
    except Exception as e:
        raise BlockFitError(
            f"block {bid} ({n} fits) failed: {type(e).__name__}: {describe(e)}"
        ) from e
    rep.send(
        "done",
        n_converged=int(res.success.sum()),
        n_stopped=int((res.status == -2).sum()),
        nfev=int(res.nfev.sum()),
        quantiles=_quantiles(res.cost),
        seconds=time.time() - t0,
        ended=time.time(),
    )
    p = res.popt.shape[1]
    packed = np.concatenate(
        [res.popt, res.perr, res.pcov.reshape(n, p * p), res.status[:, None].astype(float)], axis=1
    )
    return packed.reshape(*lead, packed.shape[1])


# -- on the client: the tally of the blocks' reports ---------------------------------------------


class _Tally:
    """The client's view of a job in blocks: each block counted once, whatever its attempts.
    A running block counts with the latest progress of its latest attempt (an attempt lost with
    its worker stops counting when the block starts again)."""

    def __init__(self, batch_id: str, n_blocks: int, n_fits: int) -> None:
        self.batch_id, self.n_blocks, self.n_fits = batch_id, n_blocks, n_fits
        self.attempts: dict[int, set[str]] = {}
        self.current: dict[int, str] = {}  # block -> its latest attempt
        self.live: dict[int, dict[str, Any]] = {}  # block -> latest progress of that attempt
        self.done: dict[int, dict[str, Any]] = {}
        self.progress_reports = 0  # in-block progress messages received
        self.lock = threading.Lock()
        self.t0 = time.time()
        self._last_emit = 0.0
        self.all_done = threading.Event()

    def on_message(self, msg: dict[str, Any]) -> None:
        with self.lock:
            self._fold(msg)
            now = time.time()
            if now - self._last_emit < PROGRESS_INTERVAL:
                return
            self._last_emit = now
            event = self.progress(now)
        HUB.publish(Batch(self.batch_id, [event]))

    def _fold(self, msg: dict[str, Any]) -> None:
        bid, attempt, kind = int(msg["block"]), str(msg["attempt"]), msg["kind"]
        if bid in self.done:
            return  # a late report of a block already counted
        if kind == "start":
            self.attempts.setdefault(bid, set()).add(attempt)
            self.current[bid] = attempt
            self.live.pop(bid, None)
        elif kind == "progress" and self.current.get(bid) == attempt:
            self.progress_reports += 1
            self.live[bid] = msg
        elif kind == "done":
            self.attempts.setdefault(bid, set()).add(attempt)
            self.done[bid] = msg
            self.live.pop(bid, None)
            if len(self.done) == self.n_blocks:
                self.all_done.set()

    def on_event(self, event: Any) -> None:
        """``Client.subscribe_topic``'s handler: ``(timestamp, msg)``."""
        self.on_message(event[1])

    def progress(self, now: float) -> BatchProgress:
        done, live = list(self.done.values()), list(self.live.values())
        converged = sum(d["n_converged"] for d in done) + sum(r["n_converged"] for r in live)
        ended = sum(d["n_fits"] for d in done)
        failed = ended - sum(d["n_converged"] for d in done) + sum(r["n_failed"] for r in live)
        running = [b for b in self.attempts if b not in self.done]
        blocks = {
            "total": self.n_blocks,
            "done": len(done),
            "running": len(running),
            "retried": sum(1 for a in self.attempts.values() if len(a) > 1),
        }
        return BatchProgress(
            self.batch_id,
            iteration=len(done),
            n_fits=self.n_fits,
            n_running=self.n_fits - converged - failed,
            n_converged=converged,
            n_failed=failed,
            cost_quantiles=_merge_quantiles(done + live),
            nfev=sum(d["nfev"] for d in done + live),
            elapsed=now - self.t0,
            time=now,
            blocks=blocks,
        )


def _merge_quantiles(done: list[dict[str, Any]]) -> np.ndarray:
    """The blocks' cost quantiles as one: the min of the minima, the max of the maxima, and
    between them the blocks' quantiles averaged by their fits (an approximation)."""
    qs = np.array([d["quantiles"] for d in done], dtype=float).reshape(-1, len(QUANTILES))
    w = np.array([d["n_fits"] for d in done], dtype=float)
    ok = np.isfinite(qs).all(axis=1)
    if not ok.any():
        return np.full(len(QUANTILES), np.nan)
    qs, w = qs[ok], w[ok]
    out = (qs * w[:, None]).sum(axis=0) / w.sum()
    out[0], out[-1] = qs[:, 0].min(), qs[:, -1].max()
    return out


class _Watch:
    """A watched job's events: the start, the tally's progress, the end; the sinks' runner."""

    def __init__(self, sinks: list[Any], verbose: int, started: BatchStarted, n_blocks: int):
        self.started = started
        self.runner = SinkRunner(with_display(sinks, verbose, default_display), started.batch_id)
        self.tally = _Tally(started.batch_id, n_blocks, started.n_fits)

    def begin(self, client: Any) -> None:
        topic = self.started.batch_id
        self.runner.__enter__()
        HUB.publish(Batch(topic, [self.started]))
        if client is None:
            _LOCAL[topic] = self.tally.on_message
        else:
            client.subscribe_topic(topic, self.tally.on_event)

    def end(self, client: Any, error: BaseException | None, status: Any) -> None:
        """Stop listening, publish the last progress and the end (``BatchFinished``, or
        ``FitFailed`` naming the error), and wait for the sinks to drain."""
        topic = self.started.batch_id
        try:
            if client is None:
                _LOCAL.pop(topic, None)
            else:
                client.unsubscribe_topic(topic)
        finally:
            now = time.time()
            if error is not None:
                tail: list[Event] = [
                    FitFailed(topic, type(error).__name__, describe(error) or "cancelled", now)
                ]
            else:
                tail = _end_events(self.tally, status)
            publish_end(topic, tail)
            self.runner.wait()
            self.runner.__exit__(None, None, None)
        for failure in self.runner.errors:
            warnings.warn(failure, SinkError, stacklevel=4)


def _end_events(tally: _Tally, status: Any) -> list[Event]:
    now = time.time()
    with tally.lock:
        last = tally.progress(now)
    values, counts = np.unique(np.asarray(status, dtype=np.int64), return_counts=True)
    by_status = {str(int(k)): int(c) for k, c in zip(values, counts, strict=True)}
    return [last, BatchFinished(tally.batch_id, int(status.size), by_status, now - tally.t0, now)]


# -- on the client: arguments, the job's handle ---------------------------------------------------


def _n_params(f: Callable[..., Any], p0: Any) -> int:
    if p0 is not None:
        return int(np.shape(p0)[-1]) if np.ndim(p0) else 1
    params = list(inspect.signature(f).parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise ValueError("give `p0`: the model takes *args, so its parameters cannot be counted")
    return len(params)


def _param_names(f: Callable[..., Any], p: int) -> tuple[str, ...]:
    try:
        names = [q.name for q in list(inspect.signature(f).parameters.values())[1:]]
    except (TypeError, ValueError):
        return ()
    return tuple(names) if len(names) == p else ()


def _check_blocks(Y: Any) -> Any:
    if not isinstance(Y, da.Array):
        raise TypeError(f"`Y` must be a dask array, got {type(Y).__name__}")
    if Y.ndim < 2:
        raise ValueError(f"`Y` must be (..., m) with at least one leading axis, got {Y.shape}")
    if len(Y.chunks[-1]) != 1:
        raise ValueError(
            f"`Y`'s last axis (the {Y.shape[-1]} points of each fit) must be one chunk, got "
            f"chunks {Y.chunks[-1]}: rechunk it with Y.rechunk({{-1: -1}})"
        )
    return Y


def _split_argument(name: str, value: Any, Y: Any) -> tuple[Any, Any]:
    """``(shared, None)`` for a value every fit shares ((p,) for ``p0``, (m,) otherwise), or
    ``(None, blocks)``: a per-fit value (Y's leading shape, then p or m) as a dask array chunked
    like ``Y``'s leading axes. Anything else raises, naming the argument."""
    if value is None:
        return None, None
    lead, m = tuple(Y.shape[:-1]), int(Y.shape[-1])
    arr = value if isinstance(value, da.Array) else np.asarray(value)
    if name == "mask" and arr.dtype != np.bool_:
        raise TypeError(f"`mask` must be a boolean array, got dtype {arr.dtype}")
    if name != "mask" and not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"`{name}` must be an array of numbers, got dtype {arr.dtype}")
    if (name == "p0" and arr.ndim == 1) or (name != "p0" and arr.shape == (m,)):
        return np.asarray(arr), None
    last = arr.shape[-1] if arr.ndim else 0
    if arr.ndim == Y.ndim and tuple(arr.shape[:-1]) == lead and (name == "p0" or last == m):
        chunks = (*Y.chunks[:-1], (last,))
        if isinstance(arr, da.Array):
            return None, arr.rechunk(chunks)
        return None, da.from_array(arr, chunks=chunks)
    want = "(p,)" if name == "p0" else f"({m},)"
    per_fit = (*lead, "p" if name == "p0" else m)
    raise ValueError(
        f"`{name}` must have shape {want} (shared by every fit) or {per_fit} (one per fit: Y's "
        f"leading shape {lead}), got {tuple(arr.shape)}"
    )


def _check_options(
    f: Callable[..., Any], m: int, shared: dict[str, Any], p: int, options: dict[str, Any]
) -> None:
    """Check what every block will be given on one made-up fit, before anything runs: a bad
    option raises here, naming it, not on a worker. ``shared`` holds None for a per-fit value."""
    for name in ("per_fit_events", "sinks"):
        if options.get(name):
            raise ValueError(f"`{name}` is not supported by fit_blocks (watch the job instead)")
    for name in ("batch_size", "trials"):
        v = options.get(name, 1)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {v!r}")
    bounds = options.get("bounds")
    if bounds is not None and any(np.ndim(b) > 1 for b in bounds):
        raise ValueError("`bounds` per fit are not split into blocks: give scalars or (p,) arrays")
    x = np.arange(m, dtype=float) if shared["x"] is None else shared["x"]
    mask = None if shared["mask"] is None else shared["mask"][None]
    p0 = np.ones(p) if shared["p0"] is None else shared["p0"]
    opts = {k: v for k, v in options.items() if k not in ("batch_size", "trials")}
    prepare_curve_fit_batch(f, x, np.ones((1, m)), p0, shared["sigma"], mask=mask, **opts)


def _started(topic: str, f: Any, Y: Any, p: int, options: dict[str, Any]) -> BatchStarted:
    bounded = "bounds" in options and not np.all(np.isinf(np.asarray(options["bounds"], float)))
    return BatchStarted(
        topic,
        n_fits=int(np.prod(Y.shape[:-1])),
        method=options.get("method") or ("trf" if bounded else "lm"),
        n_params=p,
        n_points=int(Y.shape[-1]),
        param_names=_param_names(f, p),
        time=time.time(),
        model=getattr(f, "__name__", None),
    )


def _split(packed: Any, p: int) -> BlockFit:
    lead = packed.shape[:-1]
    pcov = packed[..., 2 * p : 2 * p + p * p].reshape(*lead, p, p)
    status = packed[..., -1].astype(np.int64)
    return BlockFit(packed[..., :p], packed[..., p : 2 * p], status, pcov)


class BlockJob:
    """A ``fit_blocks`` job while it runs (what :func:`submit_blocks` returns).

    ``result()`` waits for every block and returns the :class:`BlockFit`; ``stop()`` ends every
    running fit early (status -2, best parameters so far, results kept); ``cancel()`` stops the
    fits and drops the results (``result()`` then raises ``CancelledError``). On a cluster the
    workers' running blocks see a stop within about one chunk of the solver (~0.1 s).
    ``stop_fit(job.batch_id)`` (a widget's Stop button) stops it too, while ``result()`` waits.
    """

    def __init__(self, packed: Any, client: Any, p: int, job: str, watch: _Watch | None) -> None:
        self.batch_id = job
        self._client, self._p, self._watch = client, p, watch
        self._cancelled = self._stop_sent = False
        self._stop_flag = threading.Event()  # set by stop_fit(batch_id)
        self._fit: BlockFit | None = None
        self._error: BaseException | None = None
        self._answer: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        _control.register(job, self._stop_flag)
        if watch is not None:
            watch.begin(client)
        try:
            if client is not None:
                self._packed = client.persist(packed)
                self._status = client.compute(self._packed[..., -1])
            else:
                self._packed = packed
                self._thread = threading.Thread(target=self._run_here, name=f"nlsq-dask-{job}")
                self._thread.start()
        except BaseException as e:  # nothing started: end the watch, naming the error
            self._error = e
            self._close(None)
            raise

    def _run_here(self) -> None:
        n_threads = max(1, min(self._packed.npartitions, os.cpu_count() or 1))
        try:
            with ThreadPoolExecutor(n_threads, thread_name_prefix="nlsq-dask") as pool:
                self._answer["out"] = self._packed.compute(scheduler="threads", pool=pool)
        except BaseException as e:
            self._answer["error"] = e

    def done(self) -> bool:
        """Whether every block ended (or the job failed or was cancelled)."""
        if self._client is None:
            return self._thread is None or not self._thread.is_alive()
        return bool(self._status.done())

    def stop(self) -> None:
        """Stop every running fit of the job: each ends with status -2 and its best parameters
        so far, and ``result()`` returns them. A block not started yet stops at once."""
        self._stop_sent = True
        if self._client is None:
            _stop_here(self.batch_id)
        else:
            self._client.run(_stop_here, self.batch_id, on_error="ignore")

    def cancel(self) -> None:
        """Stop the job's fits on every worker (within about a chunk) and drop its results:
        ``result()`` raises ``CancelledError``. Returns once every worker got the stop."""
        if self._fit is not None or self._error is not None:
            return
        self._cancelled = True
        self.stop()
        if self._client is not None:
            # the statuses first: they depend on the blocks, and the scheduler asserts that a
            # cancelled key's dependents are wanted by a client
            self._client.cancel(self._status)
            self._client.cancel(self._packed)
        with contextlib.suppress(CancelledError):
            self.result()

    @contextlib.asynccontextmanager
    async def events(self, policy: Policy = "lossless") -> AsyncIterator[AsyncIterator[Event]]:
        """Follow the job's events in this event loop (asyncio or trio), as ``fit_stream``
        does: its ``BatchStarted``, its ``BatchProgress`` over every block, then
        ``BatchFinished`` (or ``FitFailed``). Meanwhile ``result()`` is awaited in a worker
        thread; leaving the block before the end stops the job (its running fits end with
        status -2) and waits for it. Afterwards ``result()`` returns at once.

        The job must be watched: ``submit_blocks(..., sinks=[])`` (or any sinks, or
        ``verbose``).

        :raises ValueError: the job is not watched.
        :raises RuntimeError: the job already ended (its events were published).
        """
        if self._watch is None:
            raise ValueError(
                "`events()` needs a watched job: pass `sinks` (a list, [] for none) or "
                "`verbose` to submit_blocks"
            )
        if self._fit is not None or self._error is not None:
            raise RuntimeError(f"fit_blocks job {self.batch_id} already ended")
        sub = HUB.subscribe(Subscription(self.batch_id, policy))
        started = self._watch.started

        async def follow() -> AsyncGenerator[Event, None]:
            yield started  # published when the job started, before this subscription
            async for event in sub:
                yield event

        stream = follow()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, self._end_quietly)
                try:
                    yield stream
                finally:
                    if not self.done():
                        self.stop()
        finally:
            HUB.unsubscribe(sub)
            sub.close()
            await stream.aclose()

    def _end_quietly(self) -> None:
        """Wait for the job's end (its error, if any, is kept for ``result()``)."""
        with contextlib.suppress(Exception):
            self.result()

    def _wait(self) -> tuple[Any, np.ndarray]:
        """The packed answers and the statuses, once every block ended; a ``stop_fit`` of the
        job's id while waiting stops it, and Ctrl-C cancels it."""
        try:
            while True:
                if self._stop_flag.is_set() and not self._stop_sent:
                    self.stop()
                if self._client is not None:
                    # Polled by ``done()`` (local state), then fetched without a timeout:
                    # ``Future.result(timeout=...)`` can lose its answer in distributed's
                    # ``sync`` when the timeout and the result race (UnboundLocalError, seen
                    # once in a CI run of test_cluster_equals_in_process_and_reports_errors).
                    if self._status.done():
                        status = self._status.result()  # raises a block's error
                        return self._packed, np.asarray(status)
                    time.sleep(POLL_S)
                else:
                    assert self._thread is not None
                    self._thread.join(POLL_S)
                    if not self._thread.is_alive():
                        break
        except KeyboardInterrupt:
            self.cancel()
            raise
        if "error" in self._answer:
            raise self._answer["error"]
        out = self._answer["out"]
        return da.from_array(out, chunks=self._packed.chunks), out[..., -1]

    def result(self) -> BlockFit:
        """Wait for every block; the :class:`BlockFit`, or the block's error
        (:class:`BlockFitError`), or ``CancelledError`` after ``cancel()``."""
        if self._fit is not None:
            return self._fit
        if self._error is not None:
            raise self._error
        out = status = None
        try:
            out, status = self._wait()
            if self._cancelled:
                raise CancelledError(f"fit_blocks job {self.batch_id} was cancelled")
            if self._watch is not None:
                self._watch.tally.all_done.wait(SETTLE_S)  # reports still in transit
        except BaseException as e:
            self._error = e
        self._close(status)
        if self._error is not None:
            raise self._error
        self._fit = _split(out, self._p)
        return self._fit

    def _close(self, status: Any) -> None:
        _control.unregister(self.batch_id)
        if self._stop_sent:  # the job's stop mark is no longer needed anywhere
            if self._client is None:
                _forget_here(self.batch_id)
            else:
                self._client.run(_forget_here, self.batch_id, on_error="ignore")
        if self._watch is not None:
            self._watch.end(self._client, self._error, status)


def submit_blocks(
    f: Callable[..., Any],
    x: Any,
    Y: Any,
    p0: Any = None,
    client: Any = None,
    *,
    sinks: Sequence[Any] | None = None,
    **curve_fit_batch_kwargs: Any,
) -> BlockJob:
    """Start :func:`fit_blocks`'s job and return its :class:`BlockJob` at once (``result()``,
    ``stop()``, ``cancel()``). Arguments as for :func:`fit_blocks`, checked before anything
    starts."""
    Y = _check_blocks(Y)
    options = dict(curve_fit_batch_kwargs)
    verbose = int(options.pop("verbose", 0) or 0)
    watchers = check_sinks(sinks)
    values = {"x": x, "p0": p0, "sigma": options.pop("sigma", None)}
    values["mask"] = options.pop("mask", None)
    shared: dict[str, Any] = {}
    per_fit: dict[str, Any] = {}
    for name in PER_FIT:
        shared[name], blocks = _split_argument(name, values[name], Y)
        if blocks is not None:
            per_fit[name] = blocks
    p = _n_params(f, shared["p0"] if "p0" not in per_fit else per_fit["p0"])
    _check_options(f, int(Y.shape[-1]), shared, p, options)
    width = 2 * p + p * p + 1
    job = new_batch_id()
    watched = sinks is not None or bool(verbose)
    packed = da.map_blocks(
        _fit_block,
        Y,
        *per_fit.values(),
        names=tuple(per_fit),
        f=f,
        model_key=_model_key(f),
        shared={k: v for k, v in shared.items() if k not in per_fit},
        options=options,
        job=job,
        topic=job if watched else None,
        x64=bool(jax.config.read("jax_enable_x64")),
        chunks=(*Y.chunks[:-1], (width,)),
        dtype=np.float64,
        meta=np.empty((0,) * Y.ndim, dtype=np.float64),
    )
    watch = None
    if watched:
        started = _started(job, f, Y, p, options)
        watch = _Watch(watchers, verbose, started, packed.npartitions)
    return BlockJob(packed, client, p, job, watch)


def fit_blocks(
    f: Callable[..., Any],
    x: Any,
    Y: Any,
    p0: Any = None,
    client: Any = None,
    *,
    sinks: Sequence[Any] | None = None,
    **curve_fit_batch_kwargs: Any,
) -> BlockFit:
    """Fit ``f(x, *params)`` to every row of the dask array ``Y`` (..., m), one
    :func:`~nlsq_stream.curve_fit_batch` per block, and return once every block ended.

    ``x`` is (m,) shared or ``Y``'s shape (one per fit); ``p0`` (p,) shared or (..., p) one per
    fit; ``sigma`` and ``mask`` (m,) shared or ``Y``'s shape. Per-fit values (numpy or dask
    arrays) are split into the blocks of ``Y``. Other keyword arguments are
    ``curve_fit_batch``'s and are passed to every block (``bounds`` shared only). Without
    ``client`` the blocks run in this process (a thread per core at most, loading and packing
    blocks side by side; one block's fits at a time in a process, as on a worker); with a
    ``distributed.Client`` on its cluster, where the results stay (persisted). ``sinks`` and
    ``verbose`` watch the whole job as one batch. :func:`submit_blocks` is the same job with a
    handle that can stop or cancel it.

    :returns: :class:`BlockFit` (``popt`` (..., p), ``perr`` (..., p), ``status`` (...),
        ``pcov`` (..., p, p)), dask arrays chunked like ``Y``'s leading axes.
    :raises ValueError, TypeError: for bad arguments, naming them, before anything runs.
    :raises BlockFitError: a block raised (its message names the block and the cause).
    """
    job = submit_blocks(f, x, Y, p0, client, sinks=sinks, **curve_fit_batch_kwargs)
    return job.result()


def _xr_p0_bounds(
    names: Sequence[str], p0: Any, bounds: Any
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """xarray's ``p0`` (a dict by name, missing ones 1.0; or a sequence) and ``bounds`` (a dict
    of name -> (lower, upper), missing ones unbounded; or curve_fit's (lower, upper))."""
    if isinstance(p0, dict):
        start = np.array([float(p0.get(n, 1.0)) for n in names])
    else:
        start = np.ones(len(names)) if p0 is None else np.asarray(p0, dtype=float)
    if bounds is None:
        return start, (np.full(len(names), -np.inf), np.full(len(names), np.inf))
    if isinstance(bounds, dict):
        lo = np.array([float(bounds.get(n, (-np.inf, np.inf))[0]) for n in names])
        hi = np.array([float(bounds.get(n, (-np.inf, np.inf))[1]) for n in names])
        return start, (lo, hi)
    lo, hi = (np.broadcast_to(np.asarray(b, dtype=float), start.shape) for b in bounds)
    return start, (lo, hi)


def curvefit(
    obj: Any,
    coords: str,
    func: Callable[..., Any],
    reduce_dims: Any = None,
    skipna: bool = True,
    p0: Any = None,
    bounds: Any = None,
    param_names: Sequence[str] | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    client: Any = None,
    **options: Any,
) -> Any:
    """``obj.curvefit(coords, func, ...)`` with the fits done by :func:`fit_blocks`: change
    ``da.curvefit(...)`` to ``curvefit(da, ...)``.

    ``obj`` is an ``xarray.DataArray`` (numpy- or dask-backed); ``coords`` names the one dimension
    fitted over (its coordinate, or 0..m-1, is ``x``); every other dimension is a fit each.
    ``p0`` and ``bounds`` are dicts by parameter name (or sequences in ``param_names`` order),
    ``skipna`` omits NaN points (``nan_policy="omit"``), ``kwargs`` and ``options`` are
    ``curve_fit_batch``'s. A fit that failed has NaN coefficients (xarray's ``errors="ignore"``).

    :returns: an ``xarray.Dataset`` with ``curvefit_coefficients`` (..., param) and
        ``curvefit_covariance`` (..., cov_i, cov_j), like ``DataArray.curvefit``'s.
    """
    import xarray as xr

    if reduce_dims is not None:
        raise NotImplementedError(
            "`reduce_dims`: only one fitted dimension (`coords`) is supported"
        )
    if not isinstance(coords, str) or coords not in obj.dims:
        raise ValueError(
            f"`coords` must name one dimension of the array {obj.dims}, got {coords!r}"
        )
    if param_names is None:
        names = _param_names(func, _n_params(func, None))
    else:
        names = tuple(param_names)
    start, (lo, hi) = _xr_p0_bounds(names, p0, bounds)
    arr = obj.transpose(..., coords)
    x = np.asarray(arr[coords].values if coords in arr.coords else np.arange(arr.shape[-1]), float)
    data = arr.data if isinstance(arr.data, da.Array) else da.from_array(np.asarray(arr.data))
    lead = arr.dims[:-1]
    data = (data if lead else data[None]).rechunk({-1: -1})
    opts = dict(kwargs or {}, **options)
    if np.isfinite(lo).any() or np.isfinite(hi).any():
        opts["bounds"] = (lo, hi)
    if skipna:
        opts.setdefault("nan_policy", "omit")
    res = fit_blocks(func, x, data, start, client, **opts)
    popt, pcov = (res.popt, res.pcov) if lead else (res.popt[0], res.pcov[0])
    kept = {k: v for k, v in arr.coords.items() if coords not in v.dims}
    return xr.Dataset(
        {
            "curvefit_coefficients": ((*lead, "param"), popt),
            "curvefit_covariance": ((*lead, "cov_i", "cov_j"), pcov),
        },
        coords={**kept, "param": list(names), "cov_i": list(names), "cov_j": list(names)},
    )
