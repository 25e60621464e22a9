"""Device-side emission: no callback at all, gating on the device, chunks, the last batch."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from nlsq_stream import curve_fit
from nlsq_stream.solver import engine
from nlsq_stream.solver.curve_fit import prepare_curve_fit
from nlsq_stream.stream import emitter
from nlsq_stream.stream.emitter import Channel, Emitter
from nlsq_stream.stream.pipeline import execute


def model(x, a, b):
    return a * jnp.exp(-b * x)


def slow_problem(n=200):
    """A poorly started fit that needs many iterations (tight tolerances, lm)."""
    x = np.linspace(0, 4, n)
    y = 3.0 * np.exp(-0.7 * x) + 0.01 * np.sin(5 * x)
    return x, y


def _prep(verbose=2, **kw):
    x, y = slow_problem()
    kw.setdefault("ftol", 1e-15)
    kw.setdefault("xtol", 1e-15)
    kw.setdefault("gtol", 1e-15)
    return prepare_curve_fit(model, x, y, p0=[0.01, -2.0], verbose=verbose, **kw)


def _lowered_texts():
    """The programs a silent fit and a watched fit run."""
    prep = _prep()
    vectors = np.stack([prep.x0, prep.lb, prep.ub, prep.x_scale])
    scalars = np.array([*prep.tols, prep.f_scale, prep.max_nfev])
    quiet = engine.Config(**prep.config_kw)
    silent = engine.solve.trace(prep.problem, quiet, vectors, scalars, prep.data)
    watched = engine.Config(**prep.config_kw, emitter=Emitter(2))
    k = np.int32(5)
    start = engine.first_chunk.trace(prep.problem, watched, vectors, scalars, prep.data, k)
    carry, _ = engine.first_chunk(prep.problem, watched, vectors, scalars, prep.data, k)
    chunk = engine.solve_chunk.trace(prep.problem, watched, vectors, scalars, prep.data, carry, k)
    return [p.lower().as_text() for p in (silent, start, chunk)]


def test_no_program_contains_a_host_callback():
    silent, start, chunk = _lowered_texts()
    assert all("while" in text for text in (silent, start, chunk))  # the loops are in there
    for text in (silent, start, chunk):
        assert "callback" not in text


def _run(level, **kw):
    rows = []
    channel = Channel(lambda r, t: rows.append(r))
    res = execute(_prep(**kw), level, channel)
    channel.release()  # a hub channel sends them with the terminal event (finish)
    return res, np.concatenate(rows) if rows else np.zeros((0, 8)), channel


def test_every_iteration_is_delivered_in_order_with_fewer_callbacks():
    res, rows, channel = _run(2)
    its = rows[:, 0].astype(int)
    assert res.nit >= 15, "the test problem must need many iterations"
    assert its.tolist() == list(range(res.nit + 1))
    # Records are batched: fewer chunks than records once the host has timed a chunk.
    assert channel.flushes < len(its)
    # The last row is the final state (the last partial batch is always delivered).
    np.testing.assert_array_equal(rows[-1, 6:], res.x)
    assert rows[-1, 1] == res.nfev and rows[-1, 2] == pytest.approx(res.cost)


def test_verbose_one_gates_every_tenth_on_device():
    res, rows, _ = _run(1)
    its = rows[:, 0].astype(int).tolist()
    expected = [i for i in range(res.nit + 1) if i % 10 == 0]
    if res.nit % 10:
        expected.append(res.nit)
    assert its == expected


def test_stop_request_ends_the_fit_with_status_minus_two():
    # With no per-trial estimate for this problem the first chunk is one trial, so a stop asked
    # before the start is seen after it (later fits start with a longer first chunk).
    emitter._MEMORY.clear()
    rows = []
    channel = Channel(lambda r, t: rows.append(r))
    channel.stop_requested.set()
    res = execute(_prep(), 2, channel)
    assert res.status == engine.STATUS_STOPPED and not res.success
    assert np.all(np.isfinite(res.x))
    assert res.nit <= 1


def test_silent_and_watched_fits_agree():
    a = execute(_prep())
    b, _, _ = _run(2)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.nfev == b.nfev


def test_emission_on_large_arrays():
    """Large arrays (where XLA would run a host callback on its own threads) still deliver."""
    x = np.linspace(0, 4, 2_000_000)
    y = 3.0 * np.exp(-0.7 * x)
    prep = prepare_curve_fit(model, x, y, p0=[1.0, 1.0], verbose=2)
    rows = []
    channel = Channel(lambda r, t: rows.append(r))
    res = execute(prep, 2, channel)
    channel.release()
    got = np.concatenate(rows)[:, 0].astype(int).tolist()
    assert got == list(range(res.nit + 1))


def test_last_rows_wait_for_the_terminal_hand_off():
    """A fit's last rows are held until ``release()`` (called just before the terminal event is
    published), so a short fit reaches the watchers in one hand-off; nothing is lost."""
    rows = []
    channel = Channel(lambda r, t: rows.append(r))
    res = execute(_prep(), 2, channel)
    delivered = sum(len(r) for r in rows)
    assert delivered < res.nit + 1  # the last chunk's rows are still held
    channel.release()
    got = np.concatenate(rows)[:, 0].astype(int).tolist()
    assert got == list(range(res.nit + 1))
    channel.release()  # idempotent
    assert sum(len(r) for r in rows) == res.nit + 1


@pytest.mark.usefixtures("no_leftover_threads")
def test_without_fun_jac_the_fit_has_no_residual_sized_outputs(monkeypatch):
    """curve_fit without full_output needs neither fun nor jac: the silent program returns only
    the packed results, and a watched fit dispatches no final evaluation."""
    prep = _prep()
    vectors = np.stack([prep.x0, prep.lb, prep.ub, prep.x_scale])
    scalars = np.array([*prep.tols, prep.f_scale, prep.max_nfev])
    m = prep.n_residuals
    for fun_jac, shapes in ((True, {(m,), (m, 2)}), (False, set())):
        config = engine.Config(**{**prep.config_kw, "fun_jac": fun_jac})
        out = engine.solve.trace(prep.problem, config, vectors, scalars, prep.data).out_info
        assert {o.shape for o in (out.fun, out.jac) if o is not None} == shapes
    calls = []
    real = engine.fun_and_jac
    monkeypatch.setattr(engine, "fun_and_jac", lambda *a: calls.append(1) or real(*a))
    x, y = slow_problem()
    popt, _ = curve_fit(model, x, y, p0=[1.0, 0.5], verbose=2, sinks=[_null_sink])
    assert calls == []
    popt2, _, info, _, _ = curve_fit(
        model, x, y, p0=[1.0, 0.5], verbose=2, sinks=[_null_sink], full_output=True
    )
    assert calls == [1]
    np.testing.assert_allclose(popt2, popt)
    np.testing.assert_allclose(info["fvec"], model(x, *popt) - y, atol=1e-10)


async def _null_sink(event):
    """Takes every event and does nothing with it."""


def test_a_chunk_stretches_to_end_a_fit_expected_to_end_within_it(monkeypatch):
    """40 ms chunks of 10 ms trials hold 4 trials; a fit expected to need 7 (as many as the
    last fit of the problem) runs them in one chunk, stretched to 80 ms (8 trials, the slack
    taking a trial or so more than expected); one expected to need 9 does not."""
    key = ("a problem", 1)
    for expected, first in ((7, 8), (9, 4), (3, 8)):
        monkeypatch.setitem(emitter._MEMORY, key, emitter.Memory(0.01, expected))
        channel = Channel(lambda rows, t: None, target_interval=0.04)
        assert channel.first_k(key) == first
    channel = Channel(lambda rows, t: None, target_interval=0.04)
    monkeypatch.setitem(emitter._MEMORY, key, emitter.Memory(0.01, 11))
    assert channel.first_k(key) == 4  # 11 left: more than a stretched chunk
    channel._last -= 0.0396  # the first chunk took ~40 ms: 4 trials of ~10 ms
    k, stop = channel.on_chunk(4)
    assert (k, stop) == (8, False)  # 7 left: stretched to end the fit


def test_a_slower_machine_does_not_split_a_short_fit(monkeypatch):
    """The 1e6-point fit of ``bench emit`` takes 6 trials, ~10 ms each (one 80 ms chunk). On a
    machine 2-4 times slower (18-36 ms a trial, ~110-220 ms in all) the time rule alone would cut
    it in chunks of 2 or 1 trials; the trial rule keeps it one chunk (up to 240 ms). A fit of
    more trials, or one beyond 240 ms, still gets ~40 ms chunks."""
    key = ("a slow problem", 1)
    for per_trial, expected, one_chunk in (
        (0.010, 6, True),
        (0.018, 6, True),
        (0.036, 6, True),
        (0.018, 8, True),
        (0.018, 9, False),  # more trials than TAIL_TRIALS, beyond 80 ms: 40 ms chunks
        (0.050, 6, False),  # 300 ms: beyond TAIL_MAX intervals
    ):
        monkeypatch.setitem(emitter._MEMORY, key, emitter.Memory(per_trial, expected))
        k = Channel(lambda rows, t: None, target_interval=0.04).first_k(key)
        assert (k > expected) == one_chunk, (per_trial, expected, k)
        if not one_chunk:
            assert k == max(int(0.04 / per_trial), 1)
