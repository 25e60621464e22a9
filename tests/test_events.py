"""Typed events and their JSON form: exact round trips, and strict, named decode errors."""

from __future__ import annotations

import json
import math
import pickle

import anyio
import numpy as np
import pytest
from conftest import decay_data, decay_model

import nlsq_stream as ns
from nlsq_stream import events
from nlsq_stream.events import (
    MAX_LINE_BYTES,
    SCHEMA_VERSION,
    EventDecodeError,
    FitFailed,
    FitFinished,
    FitStarted,
    Iteration,
    event_from_dict,
    event_from_json,
)

pytestmark = pytest.mark.usefixtures("no_leftover_threads")

NAN, INF = float("nan"), float("inf")

SAMPLES = {
    "started": FitStarted(
        "fit-1", "trf", 3, 1000, ("a", "b", "c"), np.array([1.0, NAN, -INF]), 1.7e9 + 0.123456789
    ),
    "iteration0": Iteration("fit-1", 0, 1, 2.5, None, None, 1e-3, np.array([1.0, 2.0]), 0.0),
    "iteration": Iteration(
        "fit-1", 7, 9, 0.1 + 0.2, 1e-300, 5e-324, 3.0e300, np.array([INF, -0.0, 1 / 3]), 12.5
    ),
    "iteration_nonfinite": Iteration(
        "fit-1", 8, 10, NAN, INF, -INF, INF, np.array([NAN, INF, -INF]), 13.0
    ),
    "finished": FitFinished(
        "fit-1",
        {
            "x": np.array([1.0, NAN, INF]),
            "cost": INF,
            "optimality": NAN,
            "nfev": 12,
            "njev": 11,
            "nit": 10,
            "status": -2,
            "message": 'stopped "early" \u2014 \n ok',
            "success": False,
        },
        1.0,
    ),
    "failed": FitFailed("fit-2", "ValueError", "boom: line1\nline2 \u00e9", 2.0),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_json_round_trip_is_exact(name):
    ev = SAMPLES[name]
    line = ev.to_json()
    assert "\n" not in line
    back = event_from_json(line)
    assert type(back) is type(ev)
    assert back == ev
    # bytes in, and the classmethod (which parses any event type), give the same event
    assert event_from_json(line.encode("utf-8")) == ev
    assert Iteration.from_json(line) == ev
    # and JSON again: byte-identical
    assert back.to_json() == line


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_schema_and_type_fields(name):
    ev = SAMPLES[name]
    d = json.loads(ev.to_json())
    assert d["schema"] == SCHEMA_VERSION == 1
    assert d["type"] == type(ev).__name__
    assert d["fit_id"] == ev.fit_id
    assert isinstance(d["time"], float)
    assert ev.to_dict()["schema"] == 1


def test_non_finite_floats_use_pythons_json_tokens():
    line = SAMPLES["iteration_nonfinite"].to_json()
    assert "NaN" in line and "Infinity" in line and "-Infinity" in line
    d = json.loads(line)
    assert math.isnan(d["cost"]) and d["cost_reduction"] == INF and d["step_norm"] == -INF


def test_iteration_zero_writes_null_reduction_and_step():
    d = json.loads(SAMPLES["iteration0"].to_json())
    assert d["cost_reduction"] is None and d["step_norm"] is None
    back = event_from_json(SAMPLES["iteration0"].to_json())
    assert back.cost_reduction is None and back.step_norm is None


def test_floats_keep_full_precision():
    ev = SAMPLES["iteration"]
    back = event_from_json(ev.to_json())
    assert back.cost == 0.1 + 0.2  # repr precision, not 0.3
    assert back.step_norm == 5e-324  # subnormal survives
    assert np.signbit(back.params[1])  # -0.0 survives
    assert back.params.dtype == np.float64


def test_numpy_scalars_are_written_as_json_numbers():
    ev = FitFinished("f", {"x": np.array([1.0]), "nfev": np.int64(3), "cost": np.float32(0.5)}, 0.0)
    d = json.loads(ev.to_json())
    assert d["result"] == {"x": [1.0], "nfev": 3, "cost": 0.5}


def test_nan_reduction_and_step_round_trip():
    ev = Iteration("fit-1", 3, 4, 1.0, NAN, NAN, 1.0, np.array([1.0]), 0.0)
    back = event_from_json(ev.to_json())
    assert back == ev


def test_equality_and_status_helpers():
    a = SAMPLES["finished"]
    assert a.status == -2 and a.stopped
    ok = FitFinished("f", {"status": 1}, 0.0)
    assert ok.status == 1 and not ok.stopped
    assert SAMPLES["iteration"] != SAMPLES["iteration_nonfinite"]
    assert SAMPLES["iteration"] != SAMPLES["started"]
    with pytest.raises(TypeError):
        hash(SAMPLES["iteration"])


def _line(**fields):
    return json.dumps(fields)


def _good(kind):
    return {
        "FitStarted": json.loads(SAMPLES["started"].to_json()),
        "Iteration": json.loads(SAMPLES["iteration"].to_json()),
        "FitFinished": json.loads(SAMPLES["finished"].to_json()),
        "FitFailed": json.loads(SAMPLES["failed"].to_json()),
    }[kind]


def _with(kind, **changes):
    d = _good(kind)
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    return json.dumps(d)


_DROP = object()

BAD_LINES = [
    # (id, line, text the error message must contain)
    ("not-json", "this is not json", "not valid JSON"),
    ("truncated", SAMPLES["iteration"].to_json()[:-5], "not valid JSON"),
    ("empty", "", "not valid JSON"),
    ("not-utf8", b"\xff\xfe{}", "UTF-8"),
    ("array", "[1, 2, 3]", "JSON object"),
    ("number", "3", "JSON object"),
    ("too-deep", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("no-schema", _with("Iteration", schema=_DROP), "schema"),
    ("schema-2", _with("Iteration", schema=2), "schema"),
    ("schema-str", _with("Iteration", schema="1"), "schema"),
    ("unknown-type", _with("Iteration", type="FitExploded"), "FitExploded"),
    ("no-type", _with("Iteration", type=_DROP), "type"),
    ("fit_id-missing", _with("Iteration", fit_id=_DROP), "'fit_id'"),
    ("fit_id-int", _with("Iteration", fit_id=3), "'fit_id'"),
    ("time-str", _with("Iteration", time="now"), "'time'"),
    ("time-bool", _with("FitFailed", time=True), "'time'"),
    ("iteration-float", _with("Iteration", iteration=1.5), "'iteration'"),
    ("iteration-bool", _with("Iteration", iteration=True), "'iteration'"),
    ("nfev-str", _with("Iteration", nfev="9"), "'nfev'"),
    ("cost-null", _with("Iteration", cost=None), "'cost'"),
    ("cost-missing", _with("Iteration", cost=_DROP), "'cost'"),
    ("cost_reduction-str", _with("Iteration", cost_reduction="x"), "'cost_reduction'"),
    ("step_norm-bool", _with("Iteration", step_norm=False), "'step_norm'"),
    ("optimality-list", _with("Iteration", optimality=[1.0]), "'optimality'"),
    ("params-str", _with("Iteration", params="1,2"), "'params'"),
    ("params-item", _with("Iteration", params=[1.0, "2"]), "'params'"),
    ("params-bool-item", _with("Iteration", params=[1.0, True]), "'params'"),
    ("params-nested", _with("Iteration", params=[[1.0]]), "'params'"),
    ("method-int", _with("FitStarted", method=1), "'method'"),
    ("n_params-str", _with("FitStarted", n_params="3"), "'n_params'"),
    ("n_residuals-float", _with("FitStarted", n_residuals=10.0), "'n_residuals'"),
    ("param_names-item", _with("FitStarted", param_names=["a", 2, "c"]), "'param_names'"),
    ("param_names-str", _with("FitStarted", param_names="abc"), "'param_names'"),
    ("x0-missing", _with("FitStarted", x0=_DROP), "'x0'"),
    ("result-list", _with("FitFinished", result=[1, 2]), "'result'"),
    ("result-x-item", _with("FitFinished", result={"x": [1.0, None]}), "'x'"),
    ("error_type-missing", _with("FitFailed", error_type=_DROP), "'error_type'"),
    ("message-int", _with("FitFailed", message=42), "'message'"),
]


@pytest.mark.parametrize(
    ("line", "needle"), [b[1:] for b in BAD_LINES], ids=[b[0] for b in BAD_LINES]
)
def test_from_json_rejects_with_named_field(line, needle):
    with pytest.raises(EventDecodeError) as info:
        event_from_json(line)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)  # EventDecodeError is a ValueError


@pytest.mark.parametrize("schema", [True, 1.0], ids=["true", "float"])
def test_from_json_rejects_schema_of_wrong_type(schema):
    with pytest.raises(EventDecodeError, match="schema"):
        event_from_json(_with("Iteration", schema=schema))


def test_from_json_rejects_oversized_lines():
    big = " " * (MAX_LINE_BYTES + 1)
    with pytest.raises(EventDecodeError, match="limit"):
        event_from_json(big)
    with pytest.raises(EventDecodeError, match="limit"):
        event_from_json(big.encode())


def test_from_json_never_evaluates_code():
    # A pickle- or eval-looking payload is just "not JSON".
    for payload in (b"\x80\x04\x95", "__import__('os').system('true')"):
        with pytest.raises(EventDecodeError):
            event_from_json(payload)


def test_event_from_dict_rejects_non_dict():
    with pytest.raises(EventDecodeError, match="JSON object"):
        event_from_dict(["FitStarted"])


def test_public_surface():
    assert set(events.__all__) >= {"FitStarted", "Iteration", "FitFinished", "FitFailed"}
    assert events.TERMINAL == (FitFinished, FitFailed, events.BatchFinished)


def test_fit_started_optional_fields_are_backward_compatible():
    """``max_nfev`` and ``model`` came later: logs without them still decode (as None)."""
    full = FitStarted("f", "trf", 1, 2, ("a",), np.zeros(1), 0.0, 300, "decay")
    assert event_from_json(full.to_json()) == full
    d = json.loads(full.to_json())
    del d["max_nfev"], d["model"]
    old = event_from_dict(d)
    assert isinstance(old, FitStarted) and old.max_nfev is None and old.model is None
    with pytest.raises(EventDecodeError, match="'max_nfev'"):
        event_from_dict({**d, "max_nfev": 1.5})
    with pytest.raises(EventDecodeError, match="'model'"):
        event_from_dict({**d, "model": 3})


# ---- FitFinished.result is an OptimizeResult (attribute access, as scipy's) ------------------

# A FitFinished line as the previous release wrote it (its JsonlSink, a two-parameter fit), kept
# verbatim: the format did not change, so logs written before still decode, now with ``.x``.
OLD_FINISHED_LINE = (
    '{"schema":1,"type":"FitFinished","fit_id":"fit-56c6357f3191","result":{"x":[3.0,0.5],'
    '"cost":4.029045443658096e-31,"optimality":3.5728186778899083e-16,"nfev":10,"njev":9,'
    '"nit":8,"status":3,"message":"`xtol` termination condition is satisfied.",'
    '"success":true},"time":1796284768.3736138}'
)

X, Y, P0 = decay_data(200)


class Collect:
    def __init__(self) -> None:
        self.events: list = []

    async def send(self, event) -> None:
        self.events.append(event)


def check_result(ev, popt=None) -> None:
    """``ev.result`` is an OptimizeResult whose ``x`` is a float64 array (equal to ``popt``)."""
    assert isinstance(ev, FitFinished)
    r = ev.result
    assert isinstance(r, ns.OptimizeResult)
    assert isinstance(r.x, np.ndarray) and r.x.dtype == np.float64
    assert all(getattr(r, key) is r[key] for key in r)  # r.x, r.status, ... as r["x"], ...
    if popt is not None:
        np.testing.assert_array_equal(r.x, popt)
        assert r.success and r.status > 0 and r.nit >= 1 and r.nfev >= r.nit
    back = event_from_json(ev.to_json())
    assert back == ev and isinstance(back.result, ns.OptimizeResult)
    assert back.result.x.dtype == np.float64
    np.testing.assert_array_equal(back.result.x, r.x)


def test_fit_finished_result_has_attribute_access():
    ev = SAMPLES["finished"]
    check_result(ev)
    assert ev.result.status == -2 and ev.result.success is False
    with pytest.raises(AttributeError):
        ev.result.popt  # noqa: B018 - not in the summary


def test_a_plain_dict_becomes_an_optimize_result_with_a_float64_x():
    given = {"x": [1, 2], "status": 1}
    ev = FitFinished("f", given, 0.0)
    check_result(ev)
    np.testing.assert_array_equal(ev.result.x, [1.0, 2.0])
    assert given == {"x": [1, 2], "status": 1}  # copied, not changed
    # the JSON writes x as a list, as before
    assert json.loads(ev.to_json())["result"] == {"x": [1.0, 2.0], "status": 1}
    assert FitFinished("f", {"status": 1}, 0.0).result == {"status": 1}  # x stays optional


def test_fit_finished_equality_repr_and_pickle():
    ev = SAMPLES["finished"]
    same = FitFinished(ev.fit_id, dict(ev.result), ev.time)
    assert same == ev  # key by key, arrays by value, NaN equal to NaN
    moved = FitFinished(ev.fit_id, {**ev.result, "x": np.array([1.0, NAN, 2.0])}, ev.time)
    assert moved != ev
    assert FitFinished("f", {"x": [1.0]}, 0.0) != FitFinished("f", {"x": [1.0, 2.0]}, 0.0)
    text = repr(ev)
    assert "\n" not in text
    assert text.startswith("FitFinished(fit_id='fit-1', result=OptimizeResult({'x': array(")
    back = pickle.loads(pickle.dumps(ev))
    assert back == ev and isinstance(back.result, ns.OptimizeResult)


def test_an_old_log_line_still_decodes():
    ev = event_from_json(OLD_FINISHED_LINE)
    check_result(ev)
    np.testing.assert_array_equal(ev.result.x, [3.0, 0.5])
    assert ev.result.nit == 8 and ev.result.status == 3 and ev.result.success is True
    assert ev.to_json() == OLD_FINISHED_LINE  # written back byte for byte


def test_live_fit_finished_from_curve_fit_has_result_x():
    collect = Collect()
    popt, _ = ns.curve_fit(decay_model, X, Y, p0=P0, sinks=[collect])
    check_result(collect.events[-1], popt)


@pytest.mark.anyio
async def test_live_fit_finished_from_fit_stream_has_result_x(anyio_backend):
    collect = Collect()
    with anyio.fail_after(60):
        async with ns.fit_stream(decay_model, X, Y, P0, sinks=[collect]) as stream:
            evs = [ev async for ev in stream]
    check_result(evs[-1], stream.result.popt)
    check_result(collect.events[-1], stream.result.popt)
    assert collect.events[-1] == evs[-1]
