"""``bench dask``: the Gaussian batch of ``bench batch`` fitted in this process (one
``curve_fit_batch``) and in blocks on a 2-worker ``LocalCluster`` (``fit_blocks``), and what a
block costs beyond its fits.

* ``in-process``: ``curve_fit_batch`` on the N fits, warm (after a first call that compiles).
* ``cluster``: Y is first persisted on the workers (its transfer is timed apart), then
  ``fit_blocks`` with ``BLOCKS`` blocks, warm (each worker compiled in a first call); the ratio
  is the cluster's time over this process's, medians of interleaved rounds.
* ``per block``: ``TINY_BLOCKS`` blocks of one fit against one block of ``TINY_BLOCKS`` fits,
  both warm on the cluster: the difference divided by ``TINY_BLOCKS - 1`` is the fixed cost of a
  block (scheduling, the task's trip, the block's start, its reports).

Both sides share this machine's cores: with 2 cores the two workers compete with each other
(and XLA already spreads one batch over the cores), so the ratio measures what the cluster adds,
not a speed-up. Not part of ``bench all``: it needs the dask extra and starts worker processes.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from typing import Any

import dask.array as da
import distributed
import numpy as np

from ..dask import fit_blocks
from ..faces.batch import curve_fit_batch
from .batch import GAUSS_P0, gauss_data, gauss_model
from .common import BenchOptions, _say, _size, _timed, interleaved

DASK_N = 200_000
QUICK_N = 20_000
BLOCKS = 8  # blocks of the N fits on the cluster
WORKERS = 2
TINY_BLOCKS = 32  # blocks of one fit, for the per-block cost


def _load() -> str:
    return f"load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load n/a"


def _cluster() -> tuple[Any, Any]:
    lc = distributed.LocalCluster(
        n_workers=WORKERS,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=40,
    )
    return lc, distributed.Client(lc)


def _per_block(client: Any, model: Any, x: np.ndarray, y: np.ndarray, reps: int) -> float:
    """Seconds a block costs beyond its fits: ``TINY_BLOCKS`` one-fit blocks against one block of
    the same fits (both warm), the difference per extra block."""
    tiny = client.persist(da.from_array(y[:TINY_BLOCKS], chunks=(1, y.shape[1])))
    whole = client.persist(da.from_array(y[:TINY_BLOCKS], chunks=(TINY_BLOCKS, y.shape[1])))
    fns = [
        lambda: fit_blocks(model, x, whole, GAUSS_P0, client),
        lambda: fit_blocks(model, x, tiny, GAUSS_P0, client),
    ]
    for fn in fns:
        fn()  # compiles on the workers
    one, many = interleaved(fns, max(reps, 3))
    return (statistics.median(many) - statistics.median(one)) / (TINY_BLOCKS - 1)


def bench_dask(opts: BenchOptions) -> None:
    """In-process ``curve_fit_batch`` against ``fit_blocks`` on a 2-worker LocalCluster."""
    n = opts.sizes[0] if opts.sizes else (QUICK_N if opts.quick else DASK_N)
    reps = opts.reps(3, 1)
    x, y, _ = gauss_data(n)
    model = gauss_model()
    _say(opts, f"== dask: N = {_size(n)} Gaussian peaks (as in bench batch), 100 points, lm")
    _say(opts, f"   in-process curve_fit_batch vs fit_blocks in {BLOCKS} blocks on a LocalCluster")
    _say(opts, f"   of {WORKERS} worker processes (1 thread each), warm medians of {reps} rounds")
    first_local = _timed(lambda: curve_fit_batch(model, x, y, GAUSS_P0))
    lc, client = _cluster()
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # "Sending large graph": what this line measures
            warnings.simplefilter("ignore", UserWarning)
            Y = client.persist(da.from_array(y, chunks=(-(-n // BLOCKS), y.shape[1])))
        client.wait_for_workers(WORKERS)
        distributed.wait(Y)
        transfer = time.perf_counter() - t0
        res: list[Any] = []
        first_cluster = _timed(lambda: res.append(fit_blocks(model, x, Y, GAUSS_P0, client)))
        ok = float((res[0].status.compute() > 0).mean())
        fns = [
            lambda: curve_fit_batch(model, x, y, GAUSS_P0),
            lambda: fit_blocks(model, x, Y, GAUSS_P0, client),
        ]
        local_t, cluster_t = (statistics.median(t) for t in interleaved(fns, reps))
        block_s = _per_block(client, model, x, y, reps)
    finally:
        client.close()
        lc.close()
    mb = y.nbytes / 2**20
    rate = f"{n / local_t:,.0f} fits/s"
    _say(opts, f"   in-process: {local_t:.4f} s warm ({rate}), first {first_local:.2f} s")
    _say(
        opts,
        f"   cluster: {cluster_t:.4f} s warm ({n / cluster_t:,.0f} fits/s), first "
        f"{first_cluster:.2f} s, {ok:.1%} success",
    )
    _say(opts, f"   ratio cluster / in-process: {cluster_t / local_t:.2f}")
    _say(
        opts,
        f"   Y to the workers: {transfer:.2f} s for {mb:.1f} MiB ({mb / transfer:.0f} MiB/s, "
        "in the graph, through the scheduler)",
    )
    _say(
        opts,
        f"   overhead per block: {block_s * 1e3:.1f} ms ({TINY_BLOCKS} blocks of 1 fit vs 1 "
        f"block of {TINY_BLOCKS}, warm)",
    )
    _say(
        opts,
        f"   per fit: {local_t / n * 1e6:.1f} us in-process, {cluster_t / n * 1e6:.1f} us "
        f"on the cluster (wall), {_load()}",
    )
