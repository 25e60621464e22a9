"""Batched fits (``curve_fit_batch``, ``fit_stream_batch``): the same answers as fits done alone,
ragged data, failures that stay with their fit, bad arguments, and the batch's events.

Oracles: every fit of a batch is compared with the same fit done alone by ``curve_fit`` (which
the rest of the suite checks against scipy and NIST), and with scipy where scipy converges.
"""

from __future__ import annotations

import io
import json
import threading
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import curve_fit as scipy_curve_fit

import nlsq_stream as ns
from nlsq_stream.events import BatchFinished, BatchProgress, BatchStarted, FitFinished
from nlsq_stream.sinks import ConsoleSink, JsonlSink
from nlsq_stream.solver import batch as solver_batch
from nlsq_stream.solver.curve_fit_batch import prepare_curve_fit_batch

pytestmark = pytest.mark.usefixtures("no_leftover_threads")

X = np.linspace(-5.0, 5.0, 100)
P0 = [2.0, 0.0, 1.0, 0.0]
# A lone fit and a batched one take the same steps, but their linear algebra (LAPACK, one
# matrix at a time or batched) may round the last bit differently; a well-conditioned fit
# then ends at the same point to many more digits than this.
RTOL = 1e-8


def gauss(x, a, mu, s, c):
    return a * jnp.exp(-0.5 * ((x - mu) / s) ** 2) + c


def gauss_np(x, a, mu, s, c):
    return a * np.exp(-0.5 * ((x - mu) / s) ** 2) + c


def spectra(n: int, seed: int = 0, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.stack(
        [
            rng.uniform(1, 3, n),
            rng.uniform(-1, 1, n),
            rng.uniform(0.5, 1.5, n),
            rng.uniform(-0.5, 0.5, n),
        ],
        axis=1,
    )
    y = gauss_np(X, *[truth[:, i : i + 1] for i in range(4)])
    return truth, y + noise * rng.standard_normal(y.shape)


def lone(y: np.ndarray, **kw) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ns.OptimizeWarning)
        return ns.curve_fit(gauss, kw.pop("x", X), y, p0=kw.pop("p0", P0), **kw)


def test_every_fit_matches_the_same_fit_done_alone_and_scipy():
    _, y = spectra(40)
    res = ns.curve_fit_batch(gauss, X, y, p0=P0)
    assert res.popt.shape == (40, 4) and res.pcov.shape == (40, 4, 4) and res.success.all()
    for i in range(40):
        popt, pcov = lone(y[i])
        np.testing.assert_allclose(res.popt[i], popt, rtol=RTOL)
        # pcov is a function of the point; the point agrees to RTOL, pcov to a few times that
        np.testing.assert_allclose(res.pcov[i], pcov, rtol=1e-6, atol=1e-14)
        np.testing.assert_allclose(res.perr[i], np.sqrt(np.diag(pcov)), rtol=1e-6)
        ref, _ = scipy_curve_fit(gauss_np, X, y[i], p0=P0)
        # scipy stops at its own 1e-8 tolerances: agreement to ~1e-6 of the parameters' scale
        np.testing.assert_allclose(res.popt[i], ref, rtol=1e-5, atol=1e-7)


def test_trf_bounds_sigma_and_per_fit_inputs_match_lone_fits():
    _, y = spectra(12, seed=1)
    rng = np.random.default_rng(2)
    x = X + 0.01 * rng.standard_normal((12, X.size))  # per-fit abscissae
    sigma = rng.uniform(0.03, 0.08, (12, X.size))
    lb = np.array([0.0, -3.0, 0.1, -2.0])
    ub = np.tile([10.0, 3.0, 5.0, 2.0], (12, 1))  # per-fit upper bounds
    p0 = np.tile(P0, (12, 1)) + 0.1 * rng.standard_normal((12, 4))
    res = ns.curve_fit_batch(gauss, x, y, p0=p0, sigma=sigma, bounds=(lb, ub))
    assert res.success.all()
    for i in range(12):
        popt, pcov = lone(y[i], x=x[i], p0=p0[i], sigma=sigma[i], bounds=(lb, ub[i]))
        np.testing.assert_allclose(res.popt[i], popt, rtol=RTOL)
        np.testing.assert_allclose(res.pcov[i], pcov, rtol=1e-6, atol=1e-14)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    noise=st.sampled_from([0.0, 1e-3, 0.05, 0.3]),
    method=st.sampled_from(["lm", "trf"]),
    loss=st.sampled_from(["linear", "soft_l1"]),
)
def test_hypothesis_batches_match_lone_fits(seed, noise, method, loss):
    if method == "lm" and loss != "linear":
        loss = "linear"  # lm has only the linear loss
    _, y = spectra(6, seed=seed, noise=noise)
    res = ns.curve_fit_batch(gauss, X, y, p0=P0, method=method, loss=loss)
    for i in range(6):
        try:
            popt, _ = lone(y[i], method=method, loss=loss)
        except RuntimeError:  # the lone fit did not converge: the batch must say so too
            assert not res.success[i]
            continue
        assert res.success[i]
        np.testing.assert_allclose(res.popt[i], popt, rtol=RTOL, atol=1e-12)


def test_mask_is_the_same_as_leaving_the_points_out():
    _, y = spectra(5, seed=3)
    rng = np.random.default_rng(4)
    mask = rng.uniform(size=y.shape) > 0.3
    res = ns.curve_fit_batch(gauss, X, y, p0=P0, mask=mask)
    for i in range(5):
        popt, pcov = lone(y[i][mask[i]], x=X[mask[i]])
        np.testing.assert_allclose(res.popt[i], popt, rtol=RTOL)
        np.testing.assert_allclose(res.pcov[i], pcov, rtol=1e-6, atol=1e-14)


def test_nan_points_are_omitted_or_fail_their_fit_alone():
    _, y = spectra(6, seed=5)
    y[1, :30] = np.nan  # ragged: a spectrum with a gap
    y[2] = np.nan  # a dead pixel
    omitted = ns.curve_fit_batch(gauss, X, y, p0=P0, nan_policy="omit")
    kept = np.isfinite(y[1])
    np.testing.assert_allclose(omitted.popt[1], lone(y[1][kept], x=X[kept])[0], rtol=RTOL)
    assert omitted.status[2] == -4 and np.isnan(omitted.popt[2]).all()  # no point left
    default = ns.curve_fit_batch(gauss, X, y, p0=P0)
    assert default.status[1] == default.status[2] == -3
    assert np.isnan(default.popt[1:3]).all() and np.isnan(default.cost[1:3]).all()
    assert "not finite" in default.message(2)
    for i in (0, 3, 4, 5):  # the other fits are unaffected
        np.testing.assert_array_equal(default.popt[i], omitted.popt[i])
    with pytest.raises(ValueError, match=r"ydata\[1\].*nan_policy='raise'"):
        ns.curve_fit_batch(gauss, X, y, p0=P0, nan_policy="raise")


def test_a_model_that_is_not_finite_for_one_dataset_fails_only_that_fit():
    _, y = spectra(4, seed=6)
    p0 = np.tile(P0, (4, 1))
    p0[3, 2] = 0.0  # width 0: the model divides by zero for this fit only
    res = ns.curve_fit_batch(gauss, X, y, p0=p0)
    assert res.status.tolist()[:3] == [int(s) for s in res.status[:3]] and res.success[:3].all()
    assert res.status[3] == -3 and np.isnan(res.popt[3]).all()
    for i in range(3):
        np.testing.assert_allclose(res.popt[i], lone(y[i])[0], rtol=RTOL)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ydata=np.zeros(100)), "ydata.*2-D"),
        (dict(xdata=np.zeros(99)), "xdata.*shape"),
        (dict(p0=[1.0, 2.0, 3.0]), "p0.*takes 4"),
        (dict(p0=np.zeros((3, 2, 4))), "p0.*shape"),
        (dict(mask=np.ones((4, 100), int)), "mask.*boolean"),
        (dict(nan_policy="drop"), "nan_policy"),
        (dict(sigma=np.ones(7)), "sigma.*shape"),
        (dict(bounds=(np.zeros((3, 4)), np.inf)), "bounds.*lower"),
        (dict(bounds=(0.0, 1.0)), "p0.*outside"),
        (dict(method="lm", bounds=(-10.0, 10.0)), "lm.*bounds"),
        (dict(batch_size=0), "batch_size"),
        (dict(trials=1.5), "trials"),
        (dict(sinks=["not a sink"]), "sinks"),
    ],
)
def test_bad_arguments_raise_early_naming_the_argument(kwargs, match):
    args = dict(f=gauss, xdata=X, ydata=spectra(4)[1], p0=P0)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        ns.curve_fit_batch(**args)


def test_pieces_and_compaction_give_the_same_answers_with_bounded_programs():
    _, y = spectra(300, seed=7)
    prep = prepare_curve_fit_batch(gauss, X, y, P0)
    whole = solver_batch.run(prep.batch)
    pieces = solver_batch.run(prep.batch, trials=3, batch_size=64)
    np.testing.assert_allclose(pieces.x, whole.x, rtol=RTOL)
    np.testing.assert_array_equal(pieces.status > 0, whole.status > 0)
    # trials=3 needs several chunks: the running fits were compacted into smaller buckets,
    # drawn from the ladder MIN_BUCKET * BUCKET_FACTOR**j (or a whole piece)
    assert pieces.chunks > 5 and min(pieces.buckets) < 64
    ladder = {solver_batch.MIN_BUCKET * solver_batch.BUCKET_FACTOR**j for j in range(8)}
    assert set(pieces.buckets) <= ladder | {64, 300 - 4 * 64}


def test_batches_in_two_threads_at_once_both_finish_with_their_answers():
    """Two threads' batches at once (XLA:CPU hangs if their programs run together: the solver
    runs one batch chunk at a time per process)."""
    _, y = spectra(400, seed=16)
    alone = ns.curve_fit_batch(gauss, X, y, p0=P0, trials=4)
    results: dict[int, ns.BatchResult] = {}

    def run(i: int) -> None:
        results[i] = ns.curve_fit_batch(gauss, X, y, p0=P0, trials=4)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "the two batches hung"
    for i in range(2):
        np.testing.assert_array_equal(results[i].popt, alone.popt)
        np.testing.assert_array_equal(results[i].status, alone.status)


def test_float32_batch():
    _, y = spectra(8, seed=8)
    p0 = np.asarray(P0, np.float32)  # a list of Python floats would ask for float64
    res = ns.curve_fit_batch(gauss, X.astype(np.float32), y.astype(np.float32), p0=p0)
    assert res.popt.dtype == np.float32 and res.success.all()
    ref = ns.curve_fit_batch(gauss, X, y, p0=P0)
    np.testing.assert_allclose(res.popt, ref.popt, rtol=1e-3, atol=1e-4)


def test_result_table():
    _, y = spectra(3, seed=9)
    res = ns.curve_fit_batch(gauss, X, y, p0=P0)
    table = res.to_dict()
    assert list(table)[:8] == ["a", "mu", "s", "c", "a_err", "mu_err", "s_err", "c_err"]
    np.testing.assert_array_equal(table["mu"], res.popt[:, 1])
    assert len(res) == 3 and sum(res.counts().values()) == 3


def test_console_progress_line_and_jsonl_log_replay(tmp_path):
    _, y = spectra(200, seed=10)
    out = io.StringIO()
    log = tmp_path / "batch.jsonl"
    res = ns.curve_fit_batch(
        gauss, X, y, p0=P0, trials=3, sinks=[ConsoleSink(out), JsonlSink(log)], per_fit_events=True
    )
    text = out.getvalue()
    assert "Function evaluations" not in text  # per-fit results go to the log, not the console
    assert text.startswith("Batch batch-") and "200 fits of gauss" in text
    assert "converged " in text and "fits/s" in text
    assert f"Batch finished: {int(res.success.sum())}/200 converged" in text
    events = list(ns.iter_events(log))
    assert isinstance(events[0], BatchStarted) and isinstance(events[-1], BatchFinished)
    per_fit = [e for e in events if isinstance(e, FitFinished)]
    assert [e.fit_id.rsplit("/", 1)[1] for e in per_fit] == [str(i) for i in range(200)]
    np.testing.assert_array_equal(np.stack([e.result.x for e in per_fit]), res.popt)
    assert events[-1].counts == {str(k): v for k, v in res.counts().items()}
    for line in log.read_text().splitlines():  # the log is plain JSON, batch events included
        json.loads(line)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_redrawn_progress_line():
    _, y = spectra(100, seed=11)
    out = _Tty()
    ns.curve_fit_batch(gauss, X, y, p0=P0, trials=2, sinks=[ConsoleSink(out)])
    start, progress, finished, end = out.getvalue().split("\n")
    assert start.startswith("Batch batch-") and finished.startswith("Batch finished") and not end
    redrawn = progress.split("\r")[1:]  # one terminal line, redrawn in place
    assert len(redrawn) >= 2 and all(line.startswith("converged ") for line in redrawn)


def _our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("nlsq_stream")]


def test_a_watched_batch_with_inline_sinks_starts_no_thread_and_matches_the_sink_loop(tmp_path):
    """Console, JSON lines and logging run in the caller's thread, between chunks: no thread
    starts, and the JSON log holds the same events (ids and times aside) as through an async
    sink, which runs in the shared sink loop."""
    _, y = spectra(150, seed=14)
    seen: list[tuple[str, list[str]]] = []

    class Probe:
        inline = True

        def write_batch(self, events):
            seen.extend((type(ev).__name__, _our_threads()) for ev in events)

    idle = threading.Event()
    while _our_threads() and not idle.wait(0.05):  # an earlier test's sink loop winding down
        pass
    started = threading.Thread.start
    calls: list[str] = []

    def start(self, *a, **k):
        calls.append(self.name)
        return started(self, *a, **k)

    inline_log, loop_log = tmp_path / "inline.jsonl", tmp_path / "loop.jsonl"
    threading.Thread.start = start  # type: ignore[method-assign]
    try:
        res = ns.curve_fit_batch(
            gauss, X, y, p0=P0, trials=2, sinks=[Probe(), JsonlSink(inline_log)]
        )
    finally:
        threading.Thread.start = started  # type: ignore[method-assign]
    assert calls == [] and all(not threads for _, threads in seen)
    assert seen[0][0] == "BatchStarted" and seen[-1][0] == "BatchFinished"
    assert "BatchProgress" in {kind for kind, _ in seen}

    got: list = []

    async def collect(event):
        got.append(event)

    again = ns.curve_fit_batch(gauss, X, y, p0=P0, trials=2, sinks=[collect, JsonlSink(loop_log)])
    np.testing.assert_array_equal(again.popt, res.popt)

    def kinds(path):
        return [json.loads(line)["type"] for line in path.read_text().splitlines()]

    assert kinds(inline_log)[0] == "BatchStarted" and kinds(inline_log)[-1] == "BatchFinished"
    assert kinds(loop_log)[0] == "BatchStarted" and kinds(loop_log)[-1] == "BatchFinished"
    assert [type(e).__name__ for e in got] == kinds(loop_log)


def test_a_failing_inline_sink_of_a_batch_is_detached_and_warned_once():
    _, y = spectra(80, seed=15)

    class Failing:
        inline = True

        def __init__(self) -> None:
            self.calls = self.closed = 0

        def write_batch(self, events):
            self.calls += 1
            raise OSError("disk full")

        def close(self):
            self.closed += 1

    bad, out = Failing(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ns.curve_fit_batch(gauss, X, y, p0=P0, trials=2, sinks=[bad, ConsoleSink(out)])
    sink_warnings = [w for w in caught if issubclass(w.category, ns.SinkError)]
    assert len(sink_warnings) == 1 and sink_warnings[0].filename == __file__  # at the caller
    message = str(sink_warnings[0].message)
    assert message.startswith("sink Failing raised OSError: disk full; it was detached")
    assert bad.calls == 1 and bad.closed == 1
    assert res.success.all() and "Batch finished: 80/80 converged" in out.getvalue()


@pytest.mark.anyio
async def test_fit_stream_batch_events_add_up():
    _, y = spectra(120, seed=12)
    async with ns.fit_stream_batch(gauss, X, y, p0=P0, trials=2) as stream:
        events = [ev async for ev in stream]
    res = stream.result
    assert isinstance(events[0], BatchStarted) and isinstance(events[-1], BatchFinished)
    progress = [e for e in events if isinstance(e, BatchProgress)]
    assert progress, "a multi-chunk batch reports progress"
    for p in progress:
        assert p.n_running + p.n_converged + p.n_failed == 120
    assert progress[-1].n_running == 0 and progress[-1].n_converged == int(res.success.sum())
    assert [p.iteration for p in progress] == sorted(p.iteration for p in progress)


@pytest.mark.anyio
async def test_stop_ends_every_running_fit_with_its_best_parameters():
    _, y = spectra(64, seed=13)
    # max_nfev large and gtol off: the fits run until stopped or ftol/xtol end them
    async with ns.fit_stream_batch(
        gauss, X, y, p0=P0, trials=1, ftol=1e-15, xtol=1e-15, gtol=None
    ) as stream:
        async for ev in stream:
            if isinstance(ev, BatchProgress):
                stream.stop()
    res = stream.result
    stopped = res.status == -2
    assert stopped.any() and np.isfinite(res.popt[stopped]).all()
    assert ev.stopped if isinstance(ev, BatchFinished) else False


def _rosen(x, t):
    return jnp.array([x[0] - t, 10.0 * (x[1] - x[0] ** 2)])


@pytest.mark.parametrize("method", ["trf", "lm"])
def test_least_squares_batch_matches_lone_least_squares(method):
    t = np.linspace(-1.0, 2.0, 7)
    x0 = np.stack([t - 0.5, np.zeros_like(t)], axis=1)
    res = ns.least_squares_batch(_rosen, x0, args=(t,), method=method)
    assert res.success.all() and res.param_names == ("x[0]", "x[1]")
    for i in range(t.size):
        lone_res = ns.least_squares(_rosen, x0[i], args=(t[i],), method=method)
        np.testing.assert_allclose(res.popt[i], lone_res.x, rtol=RTOL, atol=1e-12)
        assert res.nfev[i] == lone_res.nfev


def test_least_squares_batch_bad_arguments():
    with pytest.raises(ValueError, match=r"x0.*2-D"):
        ns.least_squares_batch(_rosen, np.zeros(2), args=(np.ones(1),))
    with pytest.raises(ValueError, match=r"args\[0\].*3 problems"):
        ns.least_squares_batch(_rosen, np.zeros((3, 2)), args=(np.ones(2),))
    with pytest.raises(TypeError, match="unexpected keyword"):
        ns.least_squares_batch(_rosen, np.zeros((3, 2)), args=(np.ones(3),), sigma=1.0)
