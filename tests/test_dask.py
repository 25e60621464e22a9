"""``nlsq_stream.dask``: fits in blocks, in-process and on a 2-worker LocalCluster (a worker killed
mid-job, a model that raises), the live view, and the xarray face against xarray's own."""

from __future__ import annotations

import json
import os
import threading
import time

import anyio
import jax.numpy as jnp
import numpy as np
import pytest

from nlsq_stream import BatchFinished, BatchProgress, BatchStarted, FitFailed, curve_fit_batch
from nlsq_stream.events import event_from_json
from nlsq_stream.sinks import JsonlSink

da = pytest.importorskip("dask.array", reason="the dask extra is not installed")
nd = pytest.importorskip("nlsq_stream.dask", reason="the dask extra is not installed")

pytestmark = pytest.mark.usefixtures("no_leftover_threads")

X = np.linspace(0.0, 4.0, 30)
P0 = [1.0, 1.0, 0.0]


def decay(x, a, b, c):
    return a * jnp.exp(-b * x) + c


def data(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(1.0, 3.0, shape)
    b = rng.uniform(0.3, 1.2, shape)
    return a[..., None] * np.exp(-b[..., None] * X) + 0.1 + 0.01 * rng.standard_normal((*shape, 30))


def reference(y: np.ndarray):
    return curve_fit_batch(decay, X, y.reshape(-1, y.shape[-1]), p0=P0)


# In-process results are computed with scheduler="sync": dask's default threaded scheduler keeps a
# process-wide pool of threads, which the leftover-thread check would see.


def read_log(path) -> list:
    return [event_from_json(line) for line in path.read_text().splitlines()]


def check_log(events: list, n_fits: int, n_blocks: int, converged: int) -> None:
    assert isinstance(events[0], BatchStarted) and events[0].n_fits == n_fits
    assert isinstance(events[-1], BatchFinished) and events[-1].n_fits == n_fits
    assert len({e.batch_id for e in events}) == 1
    progress = [e for e in events if isinstance(e, BatchProgress)]
    assert progress and all(e.blocks is not None for e in progress)
    last = progress[-1]
    assert last.blocks["done"] == last.blocks["total"] == n_blocks
    assert last.n_converged == converged == events[-1].n_converged  # each block counted once
    assert all(e.n_converged + e.n_failed + e.n_running == n_fits for e in progress)
    assert all(e.n_running >= 0 and e.n_converged <= n_fits for e in progress)


def test_blocks_in_process_equal_one_batch_and_report_per_block(tmp_path):
    y = data((4, 6))
    log = tmp_path / "blocks.jsonl"
    res = nd.fit_blocks(decay, X, da.from_array(y, chunks=(2, 3, 30)), P0, sinks=[JsonlSink(log)])
    ref = reference(y)
    assert res.popt.shape == (4, 6, 3) and res.status.shape == (4, 6)
    assert res.pcov.shape == (4, 6, 3, 3) and res.popt.chunks[:2] == ((2, 2), (3, 3))
    np.testing.assert_array_equal(res.popt.compute(scheduler="sync").reshape(-1, 3), ref.popt)
    np.testing.assert_array_equal(res.perr.compute(scheduler="sync").reshape(-1, 3), ref.perr)
    np.testing.assert_array_equal(res.status.compute(scheduler="sync").ravel(), ref.status)
    check_log(read_log(log), 24, 4, int(ref.success.sum()))


def test_unwatched_and_bad_arguments():
    y = data((5,))
    res = nd.fit_blocks(decay, X, da.from_array(y, chunks=(2, 30)))  # p0 None: 3 from signature
    np.testing.assert_allclose(
        res.popt.compute(scheduler="sync"),
        curve_fit_batch(decay, X, y).popt,
        rtol=1e-10,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="one chunk"):
        nd.fit_blocks(decay, X, da.from_array(y, chunks=(2, 10)), P0)
    with pytest.raises(TypeError, match="dask array"):
        nd.fit_blocks(decay, X, y, P0)


def broken(x, a, b, c):
    raise RuntimeError("sensor offline")


def test_a_block_that_raises_names_the_block_and_cause(tmp_path):
    log = tmp_path / "bad.jsonl"
    y = da.from_array(data((4,)), chunks=(2, 30))
    with pytest.raises(nd.BlockFitError, match=r"block \d \(2 fits\) failed: .*sensor offline"):
        nd.fit_blocks(broken, X, y, P0, sinks=[JsonlSink(log)])
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["type"] == "FitFailed" and "sensor offline" in last["message"]


def test_blocks_field_round_trips_and_old_lines_still_read():
    ev = BatchProgress("b", 1, 4, 2, 2, 0, np.zeros(5), 10, 1.0, 2.0, blocks={"total": 2})
    assert event_from_json(ev.to_json()) == ev
    plain = BatchProgress("b", 1, 4, 2, 2, 0, np.zeros(5), 10, 1.0, 2.0)
    assert "blocks" not in plain.to_dict() and event_from_json(plain.to_json()).blocks is None


def test_xarray_face_matches_xarray_curvefit():
    xr = pytest.importorskip("xarray")
    pytest.importorskip("scipy")
    y = data((3, 4), seed=1)
    arr = xr.DataArray(y, dims=("r", "c", "t"), coords={"t": X, "r": [10, 20, 30]}, name="sig")

    def decay_np(t, a, b, c):
        return a * np.exp(-b * t) + c

    kw = {"p0": {"a": 1.0, "b": 1.0}, "bounds": {"b": (0.0, 5.0)}}
    ours = nd.curvefit(arr, "t", decay, **kw).compute(scheduler="sync")
    ref = arr.curvefit("t", decay_np, **kw)
    assert set(ours.data_vars) == set(ref.data_vars)
    for name in ref.data_vars:
        assert ours[name].dims == ref[name].dims
        np.testing.assert_allclose(ours[name].values, ref[name].values, rtol=1e-5, atol=1e-9)
    assert list(ours.param.values) == ["a", "b", "c"] and list(ours.r.values) == [10, 20, 30]
    one = nd.curvefit(arr.isel(r=0, c=0), "t", decay, p0=kw["p0"])
    assert one.curvefit_coefficients.dims == ("param",)


# --- on a cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _distributed_process_threads():
    """distributed keeps one process-wide thread (its offload executor) once a client used it, and
    its spawned workers start multiprocessing's resource tracker (a helper process that lives as
    long as this one): both are started here, before the leftover checks take their snapshots."""
    utils = pytest.importorskip("distributed.utils", reason="distributed is not installed")
    utils._offload_executor.submit(lambda: None).result()
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


@pytest.fixture
def cluster(_distributed_process_threads):
    """A 2-worker LocalCluster (processes) and its client, stopped after the test; no child
    process may be left."""
    distributed = pytest.importorskip("distributed")
    psutil = pytest.importorskip("psutil")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with (
        distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
        ) as lc,
        distributed.Client(lc) as client,
    ):
        yield lc, client
    deadline = time.monotonic() + 10.0
    while True:
        left = {p.pid for p in psutil.Process().children(recursive=True)} - before
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    names = [" ".join(psutil.Process(p).cmdline())[:120] for p in left if psutil.pid_exists(p)]
    assert not left, f"child processes left behind: {names}"


@pytest.mark.timeout(300)
def test_cluster_equals_in_process_and_reports_errors(cluster, tmp_path):
    _, client = cluster
    y = data((16,))
    log = tmp_path / "cluster.jsonl"
    res = nd.fit_blocks(
        decay, X, da.from_array(y, chunks=(4, 30)), P0, client, sinks=[JsonlSink(log)]
    )
    ref = reference(y)
    np.testing.assert_allclose(res.popt.compute(), ref.popt, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(res.status.compute(), ref.status)
    check_log(read_log(log), 16, 4, int(ref.success.sum()))
    with pytest.raises(nd.BlockFitError, match=r"block \d \(4 fits\) failed: .*sensor offline"):
        nd.fit_blocks(broken, X, da.from_array(y, chunks=(4, 30)), P0, client)
    x, y, p0, sigma, mask = per_fit_arguments((16,))
    ref = curve_fit_batch(decay, x, y, p0, sigma=sigma, mask=mask)
    res = nd.fit_blocks(
        decay, x, da.from_array(y, chunks=(4, 30)), p0, client, sigma=sigma, mask=mask
    )
    np.testing.assert_array_equal(res.popt.compute(), ref.popt)
    np.testing.assert_array_equal(res.status.compute(), ref.status)


@pytest.mark.timeout(300)
def test_a_killed_worker_s_blocks_run_elsewhere(cluster, tmp_path):
    _, client = cluster
    y = data((24,), seed=2)
    log = tmp_path / "killed.jsonl"
    killed: list[str] = []

    def kill_a_busy_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            busy = [w for w, tasks in client.processing().items() if tasks]
            if busy:
                killed.append(busy[0])
                try:
                    client.run(os._exit, 1, workers=busy[:1])
                except Exception:  # the worker died before it answered
                    pass
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_busy_worker, name="killer")
    killer.start()
    try:
        res = nd.fit_blocks(
            decay, X, da.from_array(y, chunks=(4, 30)), P0, client, sinks=[JsonlSink(log)]
        )
        popt, status = res.popt.compute(), res.status.compute()
    finally:
        killer.join()
    assert killed, "no worker was busy to kill"
    ref = reference(y)
    np.testing.assert_allclose(popt, ref.popt, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(status, ref.status)
    check_log(read_log(log), 24, 6, int(ref.success.sum()))


# --- per-fit arguments, split with the blocks ---------------------------------------------------


def per_fit_arguments(shape: tuple[int, ...]):
    """Per-fit x (shifted grids), p0, sigma and a mask with a few points left out of each fit."""
    rng = np.random.default_rng(3)
    x = X + rng.uniform(0.0, 0.2, (*shape, 1))
    a, b = rng.uniform(1.0, 3.0, (*shape, 1)), rng.uniform(0.3, 1.2, (*shape, 1))
    y = a * np.exp(-b * x) + 0.1 + 0.01 * rng.standard_normal((*shape, 30))
    p0 = np.stack([a[..., 0] * 0.8, b[..., 0] * 1.2, np.zeros(shape)], axis=-1)
    sigma = rng.uniform(0.5, 2.0, (*shape, 30))
    mask = rng.uniform(size=(*shape, 30)) > 0.1
    return x, y, p0, sigma, mask


def test_per_fit_arguments_are_split_with_the_blocks():
    x, y, p0, sigma, mask = per_fit_arguments((4, 6))
    flat = lambda a: a.reshape(24, a.shape[-1])
    ref = curve_fit_batch(decay, flat(x), flat(y), flat(p0), sigma=flat(sigma), mask=flat(mask))
    res = nd.fit_blocks(
        decay,
        x,  # numpy, per fit
        da.from_array(y, chunks=(2, 3, 30)),
        da.from_array(p0, chunks=(1, 6, 3)),  # dask, chunked otherwise: rechunked like Y
        sigma=sigma,
        mask=da.from_array(mask, chunks=(4, 2, 30)),
    )
    assert res.popt.shape == (4, 6, 3) and res.popt.chunks[:2] == ((2, 2), (3, 3))
    np.testing.assert_array_equal(flat(res.popt.compute(scheduler="sync")), ref.popt)
    np.testing.assert_array_equal(flat(res.perr.compute(scheduler="sync")), ref.perr)
    np.testing.assert_array_equal(res.status.compute(scheduler="sync").ravel(), ref.status)
    # shared (m,) sigma and mask stay broadcast; a (p,) p0 is shared
    shared_mask = mask[0, 0]
    ref = curve_fit_batch(
        decay, X, flat(y), P0, sigma=sigma[0, 0], mask=np.broadcast_to(shared_mask, (24, 30))
    )
    res = nd.fit_blocks(
        decay, X, da.from_array(y, chunks=(3, 2, 30)), P0, sigma=sigma[0, 0], mask=shared_mask
    )
    np.testing.assert_array_equal(flat(res.popt.compute(scheduler="sync")), ref.popt)
    np.testing.assert_array_equal(res.status.compute(scheduler="sync").ravel(), ref.status)


def test_per_fit_arguments_of_the_wrong_shape_raise_early_naming_them():
    x, y, p0, sigma, mask = per_fit_arguments((4, 6))
    Y = da.from_array(y, chunks=(2, 3, 30))
    cases = [
        (dict(p0=p0[:3]), ValueError, r"`p0` must have shape \(p,\) .* \(4, 6, 'p'\).*\(3, 6, 3\)"),
        (dict(p0=P0, sigma=sigma[..., :29]), ValueError, r"`sigma` must have shape \(30,\)"),
        (dict(p0=P0, mask=mask.astype(float)), TypeError, r"`mask` must be a boolean array"),
        (dict(p0=P0, mask=mask[0]), ValueError, r"`mask` must have shape \(30,\)"),
        (dict(p0=P0, bounds=(np.zeros((24, 3)), 5.0)), ValueError, r"`bounds` per fit"),
        (dict(p0=P0, method="nope"), ValueError, r"method"),
        (dict(p0=P0, trials=0), ValueError, r"`trials` must be a positive integer"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            nd.fit_blocks(decay, X, Y, **kwargs)
    with pytest.raises(ValueError, match=r"`x` must have shape \(30,\)"):
        nd.fit_blocks(decay, x[:, :2], Y, P0)


# --- stop and cancel in this process ------------------------------------------------------------


def long_job(n: int, per_block: int, seed: int = 0):
    """Clean decay data made by dask itself (on the workers, on a cluster): ``n`` fits in blocks
    of ``per_block``; with ``trials=1`` a block of many fits runs for seconds."""
    rs = da.random.RandomState(seed)
    a = rs.uniform(1.0, 3.0, (n, 1), chunks=(per_block, 1))
    b = rs.uniform(0.3, 1.2, (n, 1), chunks=(per_block, 1))
    return a * da.exp(-b * X) + 0.1


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def converged_so_far(events: list) -> int:
    progress = [e for e in list(events) if isinstance(e, BatchProgress)]
    return progress[-1].n_converged if progress else 0


@pytest.mark.timeout(300)
def test_stop_and_cancel_in_process():
    from concurrent.futures import CancelledError

    from nlsq_stream import stop_fit

    events: list = []
    kw = dict(trials=1, batch_size=500, sinks=[events.append])
    job = nd.submit_blocks(decay, X, long_job(40_000, 20_000), P0, **kw)
    wait_for(lambda: converged_so_far(events) >= 500, 120, "a block's first 500 fits")
    assert stop_fit(job.batch_id)  # what a widget's Stop button calls
    res = job.result()
    status = res.status.compute(scheduler="sync")
    assert (status == -2).sum() > 20_000, "the blocks were not stopped"
    assert ((status == -2) | (status > 0)).all()
    assert nd._running_here(job.batch_id) == 0 and job.batch_id not in nd._STOPPED
    assert isinstance(events[-1], BatchFinished) and events[-1].counts["-2"] > 20_000

    events.clear()
    job = nd.submit_blocks(decay, X, long_job(40_000, 20_000), P0, **kw)
    wait_for(lambda: converged_so_far(events) >= 500, 120, "a block's first 500 fits")
    t0 = time.monotonic()
    job.cancel()
    took = time.monotonic() - t0
    assert job.done() and nd._running_here(job.batch_id) == 0
    assert took < 1.0, f"cancel took {took:.2f} s"
    with pytest.raises(CancelledError, match="cancelled"):
        job.result()
    assert isinstance(events[-1], FitFailed) and events[-1].error_type == "CancelledError"


@pytest.mark.timeout(300)
def test_progress_from_inside_the_blocks_reaches_the_client(cluster, tmp_path):
    _, client = cluster
    log = tmp_path / "live.jsonl"
    Y = long_job(16_000, 8_000, seed=1)
    res = nd.fit_blocks(decay, X, Y, P0, client, trials=1, batch_size=500, sinks=[JsonlSink(log)])
    status = res.status.compute()
    events = read_log(log)
    check_log(events, 16_000, 2, int((status > 0).sum()))
    progress = [e for e in events if isinstance(e, BatchProgress)]
    # fits counted as converged before any block ended: only the blocks' own reports say so
    early = [e for e in progress if e.blocks["done"] == 0 and e.n_converged > 0]
    assert early, [(e.blocks, e.n_converged) for e in progress]
    converged = [e.n_converged for e in progress]
    assert converged == sorted(converged)  # no fault: each block's count only grows
    # batched: a few messages a block (start, one per 0.5 s at most, end), never one per fit
    msgs = [m for _, m in client.get_events(events[0].batch_id)]
    kinds = [m["kind"] for m in msgs]
    assert kinds.count("start") == kinds.count("done") == 2 and kinds.count("progress") >= 1
    seconds = sum(m["seconds"] for m in msgs if m["kind"] == "done")
    assert kinds.count("progress") <= seconds / nd.BLOCK_PROGRESS_S + 2


def block_reports(client, job, kind: str) -> dict[int, dict]:
    return {m["block"]: m for _, m in client.get_events(job.batch_id) if m["kind"] == kind}


@pytest.mark.timeout(300)
def test_cancel_stops_the_workers_fits_within_a_second(cluster):
    from concurrent.futures import CancelledError

    _, client = cluster

    def threads_in_the_package() -> list[str]:  # run on each worker: threads still in our code
        import sys
        import traceback

        names = {t.ident: t.name for t in threading.enumerate()}
        return [
            names.get(tid, str(tid))
            for tid, frame in sys._current_frames().items()
            if any("nlsq_stream" in f.filename for f in traceback.extract_stack(frame))
        ]

    events: list = []
    job = nd.submit_blocks(
        decay,
        X,
        long_job(400_000, 200_000),
        P0,
        client,
        trials=1,
        batch_size=500,
        sinks=[events.append],
    )

    def both_blocks_past_their_first_piece() -> bool:
        live = block_reports(client, job, "progress")
        return len(live) == 2 and all(m["n_converged"] >= 500 for m in live.values())

    wait_for(both_blocks_past_their_first_piece, 120, "both blocks to report progress")
    assert sum(client.run(nd._running_here, job.batch_id).values()) == 2
    t0 = time.time()
    job.cancel()
    cancel_s = time.time() - t0
    wait_for(lambda: len(block_reports(client, job, "done")) == 2, 10, "the blocks to end")
    done = block_reports(client, job, "done")
    stopped_s = max(m["ended"] for m in done.values()) - t0
    print(f"cancel() returned after {cancel_s:.3f} s; the blocks ended {stopped_s:.3f} s after it")
    assert stopped_s < 1.0 and cancel_s < 1.0
    assert all(0 < m["n_stopped"] < m["n_fits"] for m in done.values())  # stopped mid-block
    with pytest.raises(CancelledError):
        job.result()
    assert isinstance(events[-1], FitFailed)
    assert sum(client.run(nd._running_here, job.batch_id).values()) == 0
    wait_for(lambda: not any(client.processing().values()), 10, "the scheduler to hold no task")
    # a stopped block still packs its answers after its report: give it a moment
    wait_for(lambda: not any(client.run(threads_in_the_package).values()), 5, "idle workers")


def test_the_tally_counts_a_retried_block_once():
    """The client's fold of the blocks' reports: a block's running counts come from its latest
    attempt only (a dead attempt's late reports are ignored), and a block ends once."""
    tally = nd._Tally("b", n_blocks=2, n_fits=20)
    q = [0.0] * 5

    def msg(block, attempt, kind, **counts):
        return {"block": block, "attempt": attempt, "kind": kind, "n_fits": 10, **counts}

    def progress(block, attempt, converged, failed=0):
        return msg(block, attempt, "progress", n_converged=converged, n_failed=failed, nfev=1,
                   quantiles=q)  # fmt: skip

    def done(block, attempt, converged):
        return msg(block, attempt, "done", n_converged=converged, nfev=1, quantiles=q)

    for m in (
        msg(0, "a1", "start"),
        progress(0, "a1", 6, 1),
        msg(1, "c1", "start"),
        progress(1, "c1", 3),
        msg(0, "a2", "start"),  # block 0 again: its worker died
        progress(0, "a1", 8),  # late, from the dead attempt
        progress(0, "a2", 2),
    ):
        tally._fold(m)
    p = tally.progress(time.time())
    assert (p.n_converged, p.n_failed, p.n_running) == (5, 0, 15)
    assert p.blocks == {"total": 2, "done": 0, "running": 2, "retried": 1}
    for m in (done(0, "a2", 9), done(0, "a1", 10), progress(0, "a2", 9)):  # late copies
        tally._fold(m)
    p = tally.progress(time.time())
    assert (p.n_converged, p.n_failed, p.n_running) == (12, 1, 7)
    assert p.blocks == {"total": 2, "done": 1, "running": 1, "retried": 1}
    tally._fold(done(1, "c1", 10))
    p = tally.progress(time.time())
    assert (p.n_converged, p.n_failed, p.n_running) == (19, 1, 0) and tally.all_done.is_set()


@pytest.mark.anyio
async def test_async_iteration_over_a_job_in_process():
    """``job.events()``, as ``fit_stream``: the whole job's events in this loop (asyncio, trio),
    then ``result()`` at once, equal to one ``curve_fit_batch``."""
    y = data((6, 40), seed=21)
    job = nd.submit_blocks(decay, X, da.from_array(y, chunks=(2, 40, 30)), P0, sinks=[])
    async with job.events() as events:
        got = [event async for event in events]
    check_log(got, 240, 3, int(reference(y).success.sum()))
    res = job.result()
    np.testing.assert_array_equal(
        res.popt.compute(scheduler="sync").reshape(-1, 3), reference(y).popt
    )


@pytest.mark.anyio
@pytest.mark.timeout(300)
async def test_leaving_the_events_block_early_stops_the_job():
    job = nd.submit_blocks(decay, X, long_job(40_000, 20_000), P0, trials=1, sinks=[])
    async with job.events() as events:
        async for event in events:
            if isinstance(event, BatchProgress) and event.n_converged >= 500:
                break
    assert job.done()
    status = job.result().status.compute(scheduler="sync")
    assert (status == -2).sum() > 20_000, "leaving the block did not stop the job"
    assert ((status == -2) | (status > 0)).all()


def test_events_need_a_watched_job_that_has_not_ended():
    y = da.from_array(data((4,), seed=22), chunks=(2, 30))
    job = nd.submit_blocks(decay, X, y, P0)
    with pytest.raises(ValueError, match="`events\\(\\)` needs a watched job"):
        anyio.run(_enter_events, job)
    job.result()
    watched = nd.submit_blocks(decay, X, y, P0, sinks=[])
    watched.result()
    with pytest.raises(RuntimeError, match="already ended"):
        anyio.run(_enter_events, watched)


async def _enter_events(job) -> None:
    async with job.events():
        pass


@pytest.mark.timeout(300)
def test_async_iteration_over_a_job_on_the_cluster(cluster):
    _, client = cluster
    y = data((8, 50), seed=23)

    async def follow():
        job = nd.submit_blocks(
            decay, X, da.from_array(y, chunks=(2, 50, 30)), P0, client=client, sinks=[]
        )
        async with job.events() as events:
            return job, [event async for event in events]

    job, got = anyio.run(follow)
    check_log(got, 400, 4, int(reference(y).success.sum()))
    np.testing.assert_array_equal(job.result().popt.compute().reshape(-1, 3), reference(y).popt)


@pytest.mark.timeout(300)
def test_the_notebook_widget_watches_and_stops_a_job():
    """The widget takes a job's events like a batch's (counts over every block), and its Stop
    (``FitWidget.stop``, what the button calls) stops the job."""
    widget = pytest.importorskip("nlsq_stream.notebook")
    y = data((6, 40), seed=24)
    w = widget.FitWidget(auto_display=False, max_rate=1e9)
    res = nd.fit_blocks(decay, X, da.from_array(y, chunks=(2, 40, 30)), P0, sinks=[w])
    converged = int((res.status.compute(scheduler="sync") > 0).sum())
    assert (w.view, w.n_fits, w.n_converged, w.n_running) == ("batch", 240, converged, 0)
    assert w.status == "converged" and w.counts and sum(w.counts.values()) == 240

    w = widget.FitWidget(auto_display=False, max_rate=1e9)
    job = nd.submit_blocks(decay, X, long_job(40_000, 20_000), P0, trials=1, sinks=[w])
    wait_for(lambda: w.n_converged >= 500, 120, "the widget's first 500 converged fits")
    assert w.stop(job.batch_id)
    status = job.result().status.compute(scheduler="sync")
    assert (status == -2).sum() > 20_000
    assert (w.status, w.n_stopped) == ("stopped", int((status == -2).sum()))
