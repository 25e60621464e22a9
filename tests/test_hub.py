"""The hub: per-subscriber streams, ``lossless`` and ``latest`` policies, ``subscribe()``."""

from __future__ import annotations

import dataclasses
import itertools
import threading

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from conftest import (
    SLOW_TOLS,
    assert_no_leftover_tasks,
    decay_data,
    decay_model,
    live_tasks,
    slow_args,
    slow_residual,
)

import nlsq_stream as ns
from nlsq_stream.events import FitFinished, FitStarted, Iteration
from nlsq_stream.stream.hub import HUB, Batch, Hub, Subscription, _scheduler, rows_to_iterations

pytestmark = pytest.mark.usefixtures("no_leftover_threads")

X, Y, P0 = decay_data()
MANY = slow_args(5000)  # ~5000 iterations in a fraction of a second
TIMEOUT = 60


def started(fit_id="f"):
    return FitStarted(fit_id, "trf", 1, 1, ("x",), np.zeros(1), 0.0)


def it(i, fit_id="f"):
    return Iteration(
        fit_id,
        i,
        i + 1,
        1.0 / (i + 1),
        None if i == 0 else 0.1,
        None if i == 0 else 0.2,
        0.3,
        np.array([float(i)]),
        0.0,
    )


def finished(fit_id="f"):
    return FitFinished(fit_id, {"status": 1}, 0.0)


async def settle() -> None:
    """Wait until every hand-off already scheduled into this loop has run (they run in order)."""
    done = anyio.Event()
    _scheduler(anyio.lowlevel.current_token())(done.set)
    await done.wait()


def drain(sub: Subscription) -> list:
    out = []
    while True:
        try:
            out.append(sub.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return out


def iterations(evs):
    return [e.iteration for e in evs if isinstance(e, Iteration)]


# ---- Subscription and Hub, with synthetic events --------------------------------------------


@pytest.mark.anyio
async def test_lossless_keeps_everything_in_order(anyio_backend):
    before = live_tasks()
    hub = Hub()
    sub = hub.subscribe(Subscription("f", "lossless"))
    hub.publish(Batch("f", [started()]))
    for k in range(0, 1000, 100):
        hub.publish(Batch("f", [it(i) for i in range(k, k + 100)]))
    hub.publish(Batch("f", [finished()]))
    await settle()
    evs = [ev async for ev in sub]  # ends after the terminal event of the fit it follows
    assert isinstance(evs[0], FitStarted) and isinstance(evs[-1], FitFinished)
    assert iterations(evs) == list(range(1000))
    assert sub.skipped == 0 and sub.received == 1002
    await assert_no_leftover_tasks(before)


@pytest.mark.anyio
async def test_latest_replaces_waiting_iterations_and_counts_them(anyio_backend):
    hub = Hub()
    sub = hub.subscribe(Subscription("f", "latest"))
    hub.publish(Batch("f", [started(), *[it(i) for i in range(10)]]))
    hub.publish(Batch("f", [it(i) for i in range(10, 20)]))
    hub.publish(Batch("f", [finished()]))
    await settle()
    evs = [ev async for ev in sub]
    assert [type(e) for e in evs] == [FitStarted, Iteration, FitFinished]
    assert iterations(evs) == [19]  # the latest one
    assert sub.skipped == 19
    assert len(iterations(evs)) + sub.skipped == 20


@pytest.mark.anyio
async def test_latest_slow_reader_gets_only_the_newest_iteration(anyio_backend):
    hub = Hub()
    sub = hub.subscribe(Subscription("f", "latest"))
    hub.publish(Batch("f", [started()]))
    assert isinstance(await sub.receive(), FitStarted)  # the reader keeps up so far ...
    hub.publish(Batch("f", [it(i) for i in range(10)]))  # ... then falls behind
    hub.publish(Batch("f", [it(i) for i in range(10, 20)]))
    hub.publish(Batch("f", [finished()]))
    await settle()
    evs = [ev async for ev in sub]
    assert iterations(evs) == [19]  # got [9, 19]: iteration 9 had been superseded before the read
    assert sub.skipped == 19


@pytest.mark.anyio
async def test_latest_stays_in_order_when_the_reader_was_already_waiting(anyio_backend):
    """A waiting reader is handed iteration 0 directly, 1 is then buffered in the stream and 2
    waits beside it: the reader must get 1 (or nothing) before 2, never 2 then 1."""
    hub = Hub()
    sub = hub.subscribe(Subscription("f", "latest"))
    hub.publish(Batch("f", [started()]))
    assert isinstance(await sub.receive(), FitStarted)
    got: list = []

    async def reader():
        got.append(await sub.receive())

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.wait_all_tasks_blocked()  # the reader waits in receive()
        for i in range(3):  # three hand-offs that run before the reader wakes up
            hub.publish(Batch("f", [it(i)]))
        await settle()
    hub.publish(Batch("f", [finished()]))
    await settle()
    got += [ev async for ev in sub]
    seen = iterations(got)
    assert seen[0] == 0 and seen[-1] == 2
    assert all(a < b for a, b in itertools.pairwise(seen)), seen
    assert len(seen) + sub.skipped == 3
    assert isinstance(got[-1], FitFinished)


@pytest.mark.anyio
async def test_latest_never_drops_started_or_terminal(anyio_backend):
    hub = Hub()
    sub = hub.subscribe(Subscription(None, "latest"))
    for fid in ("a", "b"):
        hub.publish(Batch(fid, [started(fid), it(0, fid), it(1, fid), finished(fid)]))
    await settle()
    evs = drain(sub)
    kinds = [(type(e).__name__, e.fit_id) for e in evs]
    assert kinds == [
        ("FitStarted", "a"),
        ("Iteration", "a"),
        ("FitFinished", "a"),
        ("FitStarted", "b"),
        ("Iteration", "b"),
        ("FitFinished", "b"),
    ]
    assert iterations(evs) == [1, 1] and sub.skipped == 2
    sub.close()


@pytest.mark.anyio
async def test_latest_reader_keeping_up_skips_nothing(anyio_backend):
    hub = Hub()
    sub = hub.subscribe(Subscription("f", "latest"))
    hub.publish(Batch("f", [started()]))
    got = [await sub.receive()]
    for i in range(20):
        hub.publish(Batch("f", [it(i)]))
        await settle()
        got.append(await sub.receive())
    hub.publish(Batch("f", [finished()]))
    got += [ev async for ev in sub]
    assert iterations(got) == list(range(20)) and sub.skipped == 0


@pytest.mark.anyio
async def test_subscriptions_filter_by_fit_and_unsubscribe(anyio_backend):
    hub = Hub()
    mine = hub.subscribe(Subscription("a"))
    every = hub.subscribe(Subscription(None))
    assert hub.has_subscribers("a") and hub.has_subscribers("zzz")  # `every` follows all fits
    hub.publish(Batch("b", [started("b"), finished("b")]))
    hub.publish(Batch("a", [started("a"), finished("a")]))
    await settle()
    assert [e.fit_id for e in drain(mine)] == ["a", "a"]
    assert [e.fit_id for e in drain(every)] == ["b", "b", "a", "a"]
    hub.unsubscribe(every)
    every.close()
    every.close()  # idempotent
    assert not hub.has_subscribers("zzz")
    hub.publish(Batch("zzz", [started("zzz")]))  # nobody follows it: nothing happens
    await settle()
    assert drain(every) == []
    with pytest.raises(ValueError, match="policy"):
        Subscription(None, "newest")


@pytest.mark.anyio
async def test_publishing_from_other_threads(anyio_backend):
    """Batches published by many threads each arrive whole and in their thread's order."""
    before = live_tasks()
    hub = Hub()
    sub = hub.subscribe(Subscription(None))

    def producer(fid):
        for k in range(0, 500, 50):
            hub.publish(Batch(fid, [it(i, fid) for i in range(k, k + 50)]))

    threads = [threading.Thread(target=producer, args=(f"t{j}",)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    await settle()
    evs = drain(sub)
    assert len(evs) == 4 * 500
    for j in range(4):
        assert iterations([e for e in evs if e.fit_id == f"t{j}"]) == list(range(500))
    sub.close()
    await assert_no_leftover_tasks(before)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_publishing_after_the_consumers_loop_closed_is_harmless(backend):
    hub = Hub()

    async def main():
        return hub.subscribe(Subscription(None))

    sub = anyio.run(main, backend=backend)
    hub.publish(Batch("f", [started()]))  # the loop is gone: the offer fails quietly
    hub.publish(Batch("f", [started()]))
    assert sub._dead
    hub.unsubscribe(sub)


# ---- policies with a real fit ----------------------------------------------------------------


@pytest.mark.anyio
async def test_latest_consumer_skips_while_lossless_sees_all(anyio_backend):
    before, subs = live_tasks(), len(HUB._subs)
    ns.least_squares(slow_residual, [1.0], args=MANY, **SLOW_TOLS)  # compile outside the timing
    stream = ns.least_squares_stream(slow_residual, [1.0], args=MANY, policy="latest", **SLOW_TOLS)
    latest: list = []
    lossless: list = []

    async def slow_latest_reader():
        async with stream:
            async for ev in stream:
                latest.append(ev)
                await anyio.sleep(0.005)

    async def slowish_lossless_reader(sub):
        async for ev in sub:
            lossless.append(ev)
            if len(lossless) < 20:
                await anyio.sleep(0.005)

    with anyio.fail_after(TIMEOUT):
        async with ns.subscribe(stream.fit_id, policy="lossless") as sub:
            async with anyio.create_task_group() as tg:
                tg.start_soon(slowish_lossless_reader, sub)
                tg.start_soon(slow_latest_reader)

    nit = stream.result.nit
    assert nit > 1000
    # lossless: everything, in order
    assert isinstance(lossless[0], FitStarted) and isinstance(lossless[-1], FitFinished)
    assert iterations(lossless) == list(range(nit + 1))
    # latest: FitStarted, increasing iterations ending with the last one, the terminal event
    assert isinstance(latest[0], FitStarted) and isinstance(latest[-1], FitFinished)
    assert sum(isinstance(e, FitFinished) for e in latest) == 1
    seen = iterations(latest)
    assert all(a < b for a, b in itertools.pairwise(seen)), seen
    assert seen[-1] == nit  # the last iteration always arrives (iteration 0 may be skipped)
    assert stream.skipped > 0
    assert len(seen) + stream.skipped == nit + 1  # skipped counts exactly what it did not see
    assert len(latest) < len(lossless)
    # what the latest reader did see is identical to the lossless copy
    by_it = {e.iteration: e for e in lossless if isinstance(e, Iteration)}
    assert all(by_it[e.iteration] == e for e in latest if isinstance(e, Iteration))
    assert len(HUB._subs) == subs
    await assert_no_leftover_tasks(before)


class SlowLatestSink:
    policy = "latest"

    def __init__(self) -> None:
        self.events: list = []

    async def send(self, event):
        self.events.append(event)
        await anyio.sleep(0.005)


def test_latest_sink_in_the_sync_face():
    latest = SlowLatestSink()
    seen_all: list = []

    async def lossless(event):
        seen_all.append(event)

    res = ns.least_squares(slow_residual, [1.0], args=MANY, sinks=[latest, lossless], **SLOW_TOLS)
    assert iterations(seen_all) == list(range(res.nit + 1))
    got = iterations(latest.events)
    assert isinstance(latest.events[0], FitStarted) and isinstance(latest.events[-1], FitFinished)
    assert all(a < b for a, b in itertools.pairwise(got)) and got[-1] == res.nit
    assert len(got) < res.nit + 1


# ---- subscribe() -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_subscribe_receives_a_fit_run_meanwhile(anyio_backend):
    before, subs = live_tasks(), len(HUB._subs)
    stream = ns.fit_stream(decay_model, X, Y, P0)
    consumer: list = []
    watched: list = []

    async def run_fit():
        async for ev in stream:
            consumer.append(ev)

    with anyio.fail_after(TIMEOUT):
        async with ns.subscribe() as events:
            assert len(HUB._subs) == subs + 1
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_fit)
                async for ev in events:  # every fit's events: keep ours, until its end
                    if ev.fit_id == stream.fit_id:
                        watched.append(ev)
                        if isinstance(ev, FitFinished):
                            break
    assert len(HUB._subs) == subs
    assert watched == consumer
    assert isinstance(watched[0], FitStarted) and isinstance(watched[-1], FitFinished)
    assert iterations(watched) == list(range(stream.result.nit + 1))
    await assert_no_leftover_tasks(before)


@pytest.mark.anyio
async def test_subscribe_to_one_fit_ends_with_it(anyio_backend):
    before = live_tasks()
    stream = ns.fit_stream(decay_model, X, Y, P0)
    watched: list = []

    async def watch(sub):
        async for ev in sub:  # ends by itself after that fit's terminal event
            watched.append(ev)

    with anyio.fail_after(TIMEOUT):
        async with ns.subscribe(stream.fit_id) as sub:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, sub)
                async with stream:
                    async for _ in stream:
                        pass
    assert {e.fit_id for e in watched} == {stream.fit_id}
    assert isinstance(watched[-1], FitFinished)
    assert iterations(watched) == list(range(stream.result.nit + 1))
    await assert_no_leftover_tasks(before)


@pytest.mark.anyio
async def test_subscribe_sees_sync_face_fits(anyio_backend):
    """A fit run by the sync face (in this thread, blocking the loop) is still delivered."""
    before = live_tasks()
    async with ns.subscribe(policy="lossless") as events:
        popt, _ = ns.curve_fit(decay_model, X, Y, p0=P0, sinks=[_null_sink])
        await settle()
        got = drain(events)
    ids = {e.fit_id for e in got if isinstance(e, FitStarted)}
    ours = [e for e in got if e.fit_id in ids]
    assert isinstance(ours[0], FitStarted) and isinstance(ours[-1], FitFinished)
    np.testing.assert_array_equal(ours[-1].result["x"], popt)
    await assert_no_leftover_tasks(before)


async def _null_sink(event):
    pass


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_decoded_rows_are_the_events_the_constructor_builds(dtype):
    # rows_to_iterations fills the frozen dataclass's fields directly (for speed): the result
    # must be indistinguishable from Iteration(...), JSON included.
    rows = np.array(
        [[0, 1, 2.5, 9.0, 9.0, 0.25, 1.0, -2.0], [1, 3, 1.5, 1.0, 0.125, 0.5, 1.5, -2.5]], dtype
    )
    got = rows_to_iterations("fit-x", rows, 12.5)
    want = [
        Iteration("fit-x", 0, 1, 2.5, None, None, 0.25, np.array([1.0, -2.0]), 12.5),
        Iteration("fit-x", 1, 3, 1.5, 1.0, 0.125, 0.5, np.array([1.5, -2.5]), 12.5),
    ]
    assert got == want
    names = [f.name for f in dataclasses.fields(Iteration)]
    for g, w in zip(got, want, strict=True):
        assert list(vars(g)) == names
        assert {k: type(v) for k, v in vars(g).items()} == {k: type(v) for k, v in vars(w).items()}
        assert g.params.dtype == np.float64
        assert Iteration.from_json(g.to_json()) == w
        with pytest.raises(dataclasses.FrozenInstanceError):
            g.cost = 0.0  # type: ignore[misc]
    assert rows_to_iterations("fit-x", rows[:0], 0.0) == []
