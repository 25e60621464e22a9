"""LoggingSink: events to stdlib logging at the right levels, with the event on each record."""

from __future__ import annotations

import logging
import uuid

import anyio
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import decay_data, decay_model

import nlsq_stream as ns
from nlsq_stream.events import FitFailed, FitFinished, FitStarted, Iteration
from nlsq_stream.sinks import LoggingSink

X, Y, P0 = decay_data()
FIT = "fit-logtest"


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logger():
    """A fresh logger (unique name) with a list-collecting handler; no propagation."""
    log = logging.getLogger(f"nlsq_test.{uuid.uuid4().hex}")
    handler = ListHandler()
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    log.handler = handler  # type: ignore[attr-defined]
    yield log
    log.removeHandler(handler)


def events(success: bool = True, status: int = 1) -> list:
    return [
        FitStarted(FIT, "trf", 2, 10, ("a", "b"), np.array([1.0, 2.0]), 1.0),
        Iteration(FIT, 0, 1, 4.0, None, None, 0.5, np.array([1.0, 2.0]), 2.0),
        Iteration(FIT, 1, 2, 2.0, 2.0, 0.1, 0.25, np.array([1.1, 2.1]), 3.0),
        FitFinished(
            FIT,
            {
                "x": np.array([1.1, 2.1]),
                "cost": 2.0,
                "optimality": 0.25,
                "nfev": 2,
                "njev": 2,
                "nit": 1,
                "status": status,
                "message": "done" if success else "The maximum number of function evaluations",
                "success": success,
            },
            4.0,
        ),
    ]


async def feed(sink: LoggingSink, evs: list) -> None:
    for ev in evs:
        await sink.send(ev)


LEVELS = [logging.INFO, logging.DEBUG, logging.DEBUG, logging.INFO]


@pytest.mark.anyio
async def test_levels_and_records_with_a_custom_handler(anyio_backend, logger):
    evs = events()
    await feed(LoggingSink(logger), evs)
    recs = logger.handler.records
    assert [r.levelno for r in recs] == LEVELS
    assert [r.nlsq_event for r in recs] == evs
    assert all(r.name == logger.name for r in recs)
    msgs = [r.getMessage() for r in recs]
    assert msgs[0] == f"{FIT} started: method=trf, 2 parameters ['a', 'b'], 10 residuals"
    assert msgs[1] == f"{FIT} iteration 0: nfev=1 cost=4.000000e+00 optimality=5.00e-01"
    assert msgs[2].startswith(f"{FIT} iteration 1: nfev=2 cost=2.000000e+00")
    assert msgs[3] == f"{FIT} finished (status 1): done cost=2.000000e+00 nfev=2"


@pytest.mark.anyio
async def test_not_converged_finish_is_a_warning_and_failure_an_error(anyio_backend, logger):
    sink = LoggingSink(logger)
    await feed(sink, events(success=False, status=0))
    stopped = events(success=False, status=-2)[-1]
    await sink.send(stopped)
    failed = FitFailed(FIT, "ValueError", "bad model: nope", 5.0)
    await sink.send(failed)
    recs = logger.handler.records
    assert [r.levelno for r in recs] == [
        *LEVELS[:-1],
        logging.WARNING,
        logging.WARNING,
        logging.ERROR,
    ]
    assert recs[3].getMessage().startswith(f"{FIT} finished (status 0): The maximum number")
    assert recs[4].nlsq_event is stopped and "(status -2)" in recs[4].getMessage()
    assert recs[-1].nlsq_event is failed
    assert recs[-1].getMessage() == f"{FIT} failed: ValueError: bad model: nope"


@pytest.mark.anyio
@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING, logging.ERROR])
async def test_logger_level_filters_out_debug(anyio_backend, logger, level):
    logger.setLevel(level)
    evs = [*events(), FitFailed(FIT, "E", "m", 5.0)]
    await feed(LoggingSink(logger), evs)
    got = [r.nlsq_event for r in logger.handler.records]
    assert got == [ev for ev, lv in zip(evs, [*LEVELS, logging.ERROR], strict=True) if lv >= level]


@pytest.mark.anyio
async def test_with_caplog(anyio_backend, caplog):
    name = f"nlsq_test.caplog.{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG, logger=name)
    evs = [*events(success=False, status=0), FitFailed(FIT, "OSError", "sensor gone", 5.0)]
    await feed(LoggingSink(name), evs)  # by name
    recs = [r for r in caplog.records if r.name == name]
    assert [(r.levelname, r.nlsq_event) for r in recs] == list(
        zip(["INFO", "DEBUG", "DEBUG", "WARNING", "ERROR"], evs, strict=True)
    )
    assert "sensor gone" in caplog.text
    caplog.clear()
    caplog.set_level(logging.INFO, logger=name)
    await feed(LoggingSink(name), evs)
    assert [r.levelname for r in caplog.records if r.name == name] == ["INFO", "WARNING", "ERROR"]


def test_default_logger_and_bad_logger():
    assert LoggingSink().logger is logging.getLogger("nlsq_stream.fit")
    assert LoggingSink("a.b").logger is logging.getLogger("a.b")
    with pytest.raises(TypeError, match="logger"):
        LoggingSink(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="logger"):
        LoggingSink(logging.StreamHandler())  # type: ignore[arg-type]
    assert LoggingSink().policy == "lossless"


# --- through real fits: the sink runs in the sinks' background loop ------------------------


@pytest.mark.usefixtures("no_leftover_threads")
def test_real_fit_sync(logger):
    res = ns.least_squares(lambda p: decay_model(X, *p) - Y, P0, sinks=[LoggingSink(logger)])
    recs = logger.handler.records
    evs = [r.nlsq_event for r in recs]
    assert isinstance(evs[0], FitStarted) and isinstance(evs[-1], FitFinished)
    assert [type(e) for e in evs[1:-1]] == [Iteration] * (res.nit + 1)
    assert [r.levelno for r in recs] == [
        logging.INFO,
        *[logging.DEBUG] * (res.nit + 1),
        logging.INFO,
    ]
    assert res.sink_errors == []


@pytest.mark.usefixtures("no_leftover_threads")
def test_real_failing_fit_logs_an_error(logger):
    class Raises:
        def __init__(self):
            self.calls = 0

        def __call__(self, x, a, b, c):
            self.calls += 1
            if self.calls > 1:
                raise ValueError("bad model: refuses the solver's trace")
            return a * jnp.exp(-b * x) + c

    logger.setLevel(logging.INFO)  # DEBUG filtered: no iteration records
    with pytest.raises(ValueError, match="bad model"):
        ns.curve_fit(Raises(), X, Y, p0=P0, sinks=[LoggingSink(logger)])
    recs = logger.handler.records
    assert [r.levelno for r in recs] == [logging.INFO, logging.ERROR]
    assert isinstance(recs[-1].nlsq_event, FitFailed)
    assert "bad model: refuses the solver's trace" in recs[-1].getMessage()


@pytest.mark.anyio
@pytest.mark.usefixtures("no_leftover_threads")
async def test_real_fit_stream_not_converged_is_a_warning(anyio_backend, caplog):
    name = f"nlsq_test.stream.{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG, logger=name)
    with anyio.fail_after(60):
        async with ns.fit_stream(
            decay_model, X, Y, P0, method="trf", max_nfev=3, sinks=[LoggingSink(name)]
        ) as stream:
            async for _ in stream:
                pass
    assert stream.result.status == 0
    recs = [r for r in caplog.records if r.name == name]
    assert recs[0].levelno == logging.INFO and isinstance(recs[0].nlsq_event, FitStarted)
    assert all(r.levelno == logging.DEBUG for r in recs[1:-1])
    assert recs[-1].levelno == logging.WARNING
    assert recs[-1].nlsq_event.result["status"] == 0
    assert all(r.nlsq_event.fit_id == stream.fit_id for r in recs)
