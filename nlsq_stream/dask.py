"""Fits in blocks with Dask: each block of a dask array one ``curve_fit_batch``, in-process or on
a ``distributed`` cluster, with one live view of the whole job.

``fit_blocks`` takes ``Y`` (..., m), chunked over its leading axes (the last axis one chunk),
runs one :func:`~nlsq_stream.curve_fit_batch` per block and returns dask arrays with ``Y``'s
leading shape. Without a client the blocks run in this process, on a thread pool made for the
call (and shut down after it); with a ``distributed.Client`` they run on its cluster, and a
block whose worker died runs again on another one (distributed's own retry).

Watched (``sinks`` or ``verbose``), each block reports twice, when it starts and when it ends
(never once per fit): on a worker through distributed's own event transport
(``Worker.log_event``, read on the client with ``Client.subscribe_topic``), in-process straight
to the client's tally. The tally publishes ``BatchProgress`` events (with their ``blocks``
field) on the hub under one batch id, so the console line, JSON lines and ``subscribe`` work as
for one ``curve_fit_batch``. A report carries its block id and an attempt id: a block run twice
is counted once.

``curvefit`` is the xarray face, shaped like ``xarray.DataArray.curvefit``.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from ._exceptions import FitError, SinkError
from .events import QUANTILES, BatchFinished, BatchProgress, BatchStarted, Event, FitFailed
from .faces.batch import curve_fit_batch
from .sinks import default_display
from .stream.batch import PROGRESS_INTERVAL, new_batch_id
from .stream.hub import HUB, Batch
from .stream.pipeline import check_sinks, describe, publish_end, with_display
from .stream.runner import SinkRunner

try:
    import dask.array as da
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError("nlsq_stream.dask needs Dask: pip install 'nlsq_stream[dask]'") from e

__all__ = ["BlockFit", "BlockFitError", "curvefit", "fit_blocks"]

SETTLE_S = 2.0  # seconds to wait, after the results, for blocks' reports still in transit


class BlockFitError(FitError):
    """A block's ``curve_fit_batch`` raised on a worker; the message names the block and the
    cause (``__cause__`` is the original where it survives the trip back)."""


class BlockFit(NamedTuple):
    """``fit_blocks``'s answer: dask arrays chunked like ``Y``'s leading axes."""

    popt: Any  # (..., p)
    perr: Any  # (..., p)
    status: Any  # (...)
    pcov: Any  # (..., p, p)


# In-process runs report to the client's tally through this table (topic -> handler).
_LOCAL: dict[str, Callable[[dict[str, Any]], None]] = {}


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


def _block_id(block_info: Any) -> int:
    info = block_info[0]
    loc, grid = info["chunk-location"][:-1], info["num-chunks"][:-1]
    return int(np.ravel_multi_index(loc, grid)) if grid else 0


def _fit_block(
    block: np.ndarray,
    f: Callable[..., Any],
    x: Any,
    p0: Any,
    options: dict[str, Any],
    topic: str | None,
    x64: bool,
    block_info: Any = None,
) -> np.ndarray:
    """One block: its leading axes flattened to N fits, one ``curve_fit_batch``, the answers
    packed as (..., p + p + p*p + 1): popt, perr, pcov, status."""
    import jax

    bid = _block_id(block_info) if block_info else 0
    attempt = uuid.uuid4().hex[:12]
    lead, m = block.shape[:-1], block.shape[-1]
    n = int(np.prod(lead))
    _report(topic, {"block": bid, "attempt": attempt, "kind": "start", "n_fits": n})
    t0 = time.time()
    try:
        with jax.enable_x64(x64):
            res = curve_fit_batch(f, x, np.reshape(block, (n, m)), p0, **options)
    except Exception as e:
        raise BlockFitError(
            f"block {bid} ({n} fits) failed: {type(e).__name__}: {describe(e)}"
        ) from e
    costs = res.cost[np.isfinite(res.cost)]
    q = np.quantile(costs, QUANTILES).tolist() if costs.size else [float("nan")] * len(QUANTILES)
    msg = {
        "block": bid,
        "attempt": attempt,
        "kind": "done",
        "n_fits": n,
        "n_converged": int(res.success.sum()),
        "nfev": int(res.nfev.sum()),
        "quantiles": q,
        "seconds": time.time() - t0,
    }
    _report(topic, msg)
    p = res.popt.shape[1]
    packed = np.concatenate(
        [res.popt, res.perr, res.pcov.reshape(n, p * p), res.status[:, None].astype(float)], axis=1
    )
    return packed.reshape(*lead, packed.shape[1])


class _Tally:
    """The client's view of a job in blocks: each block counted once, whatever its attempts."""

    def __init__(self, batch_id: str, n_blocks: int, n_fits: int) -> None:
        self.batch_id, self.n_blocks, self.n_fits = batch_id, n_blocks, n_fits
        self.attempts: dict[int, set[str]] = {}
        self.done: dict[int, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.t0 = time.time()
        self._last_emit = 0.0
        self.all_done = threading.Event()

    def on_message(self, msg: dict[str, Any]) -> None:
        with self.lock:
            bid = int(msg["block"])
            self.attempts.setdefault(bid, set()).add(str(msg["attempt"]))
            if msg["kind"] == "done" and bid not in self.done:
                self.done[bid] = msg
            if len(self.done) == self.n_blocks:
                self.all_done.set()
            now = time.time()
            if now - self._last_emit < PROGRESS_INTERVAL:
                return
            self._last_emit = now
            event = self.progress(now)
        HUB.publish(Batch(self.batch_id, [event]))

    def on_event(self, event: Any) -> None:
        """``Client.subscribe_topic``'s handler: ``(timestamp, msg)``."""
        self.on_message(event[1])

    def progress(self, now: float) -> BatchProgress:
        done = list(self.done.values())
        converged = sum(d["n_converged"] for d in done)
        ended = sum(d["n_fits"] for d in done)
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
            n_running=self.n_fits - ended,
            n_converged=converged,
            n_failed=ended - converged,
            cost_quantiles=_merge_quantiles(done),
            nfev=sum(d["nfev"] for d in done),
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


def _n_params(f: Callable[..., Any], p0: Any) -> int:
    if p0 is not None:
        return int(np.size(p0))
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


def _compute(packed: Any, client: Any) -> tuple[Any, np.ndarray]:
    """Run the blocks: on ``client``'s cluster (kept there, persisted), or here on a pool of
    threads made for this call. Returns the packed answers and the statuses (here)."""
    if client is not None:
        packed = client.persist(packed)
        status = client.compute(packed[..., -1]).result()  # raises a block's error
        return packed, np.asarray(status)
    n_threads = max(1, min(packed.npartitions, os.cpu_count() or 1))
    with ThreadPoolExecutor(n_threads, thread_name_prefix="nlsq-dask") as pool:
        out = packed.compute(scheduler="threads", pool=pool)
    return da.from_array(out, chunks=packed.chunks), out[..., -1]


def _split(packed: Any, p: int) -> BlockFit:
    lead = packed.shape[:-1]
    pcov = packed[..., 2 * p : 2 * p + p * p].reshape(*lead, p, p)
    status = packed[..., -1].astype(np.int64)
    return BlockFit(packed[..., :p], packed[..., p : 2 * p], status, pcov)


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

    ``x`` (m,) and ``p0`` (p,) are shared by all fits; other keyword arguments are
    ``curve_fit_batch``'s and are passed to every block (shared values only: per-fit ``sigma``,
    ``mask`` or ``p0`` are not split into blocks). Without ``client`` the blocks run in this
    process (a thread per core at most); with a ``distributed.Client`` on its cluster, where the
    results stay (persisted). ``sinks`` and ``verbose`` watch the whole job as one batch.

    :returns: :class:`BlockFit` (``popt`` (..., p), ``perr`` (..., p), ``status`` (...),
        ``pcov`` (..., p, p)), dask arrays chunked like ``Y``'s leading axes.
    :raises BlockFitError: a block raised (its message names the block and the cause).
    """
    import jax

    Y = _check_blocks(Y)
    verbose = int(curve_fit_batch_kwargs.pop("verbose", 0) or 0)
    watchers = check_sinks(sinks)
    p = _n_params(f, p0)
    width = 2 * p + p * p + 1
    watched = bool(watchers or verbose)
    topic = new_batch_id() if watched else None
    packed = Y.map_blocks(
        _fit_block,
        f,
        np.asarray(x),
        None if p0 is None else np.asarray(p0, dtype=float),
        curve_fit_batch_kwargs,
        topic,
        bool(jax.config.read("jax_enable_x64")),
        chunks=(*Y.chunks[:-1], (width,)),
        dtype=np.float64,
        meta=np.empty((0,) * Y.ndim, dtype=np.float64),
    )
    if topic is None:
        return _split(_compute(packed, client)[0], p)
    runner = SinkRunner(with_display(watchers, verbose, default_display), topic)
    started = _started(topic, f, Y, p, curve_fit_batch_kwargs)
    tally = _Tally(topic, packed.npartitions, started.n_fits)
    with runner:
        try:
            out = _watched_run(packed, client, tally, started)
        finally:
            runner.wait()  # the sinks drain, the end (or the failure) included
    for failure in runner.errors:
        warnings.warn(failure, SinkError, stacklevel=2)
    return _split(out, p)


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


def _watched_run(packed: Any, client: Any, tally: _Tally, started: BatchStarted) -> Any:
    """Publish the start, run the blocks with their reports going to ``tally``, publish the
    last progress and the end (``BatchFinished``, or ``FitFailed`` naming the error)."""
    topic = started.batch_id
    HUB.publish(Batch(topic, [started]))
    if client is None:
        _LOCAL[topic] = tally.on_message
    else:
        client.subscribe_topic(topic, tally.on_event)
    error: BaseException | None = None
    try:
        out, status = _compute(packed, client)
        tally.all_done.wait(SETTLE_S)  # reports still in transit from the workers
    except BaseException as e:
        error = e
    finally:
        if client is None:
            _LOCAL.pop(topic, None)
        else:
            client.unsubscribe_topic(topic)
    if error is not None:
        publish_end(topic, [FitFailed(topic, type(error).__name__, describe(error), time.time())])
        raise error
    publish_end(topic, _end_events(tally, status))
    return out


def _end_events(tally: _Tally, status: Any) -> list[Event]:
    now = time.time()
    with tally.lock:
        last = tally.progress(now)
    values, counts = np.unique(np.asarray(status, dtype=np.int64), return_counts=True)
    by_status = {str(int(k)): int(c) for k, c in zip(values, counts, strict=True)}
    return [last, BatchFinished(tally.batch_id, int(status.size), by_status, now - tally.t0, now)]


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
