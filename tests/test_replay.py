"""replay / iter_events on hostile input: each bad line is reported and skipped, never raised."""

from __future__ import annotations

import os
import pickle
import tracemalloc
import warnings

import anyio
import numpy as np
import pytest

import nlsq_stream as ns
from nlsq_stream.events import (
    MAX_LINE_BYTES,
    FitFailed,
    FitFinished,
    FitStarted,
    Iteration,
    event_from_json,
)
from nlsq_stream.replay import ReplayWarning, iter_events

FIT = "fit-0123456789ab"


def good_events() -> list:
    return [
        FitStarted(FIT, "trf", 2, 10, ("a", "b"), np.array([1.0, 2.0]), 1.5),
        Iteration(FIT, 0, 1, 4.0, None, None, 0.5, np.array([1.0, 2.0]), 2.0),
        Iteration(FIT, 1, 2, 2.0, 2.0, 0.1, 0.25, np.array([1.1, 2.1]), 2.5),
        Iteration(FIT, 2, 3, float("nan"), 1.0, float("inf"), 0.1, np.array([1.2, -np.inf]), 3.0),
        FitFinished(
            FIT,
            {
                "x": np.array([1.2, 2.2]),
                "cost": 1.0,
                "optimality": 1e-9,
                "nfev": 3,
                "njev": 3,
                "nit": 2,
                "status": 1,
                "message": "`gtol` termination condition is satisfied.",
                "success": True,
            },
            4.0,
        ),
        FitFailed(FIT, "ValueError", "bad model: nope \u2603", 5.0),
    ]


def iteration_line(**override) -> str:
    """A valid Iteration line with some fields replaced by raw JSON text."""
    d = {
        "schema": "1",
        "type": '"Iteration"',
        "fit_id": f'"{FIT}"',
        "iteration": "7",
        "nfev": "8",
        "cost": "0.5",
        "cost_reduction": "0.1",
        "step_norm": "0.01",
        "optimality": "0.001",
        "params": "[1.0,2.0]",
        "time": "0.0",
    }
    d.update(override)
    body = ",".join(f'"{k}":{v}' for k, v in d.items() if v is not None)
    return "{" + body + "}"


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# (raw line bytes, substring the warning must name)
def hostile_lines(marker: str) -> list[tuple[bytes, str]]:
    big_int = "1" + "0" * 5000
    return [
        (b"hello world", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"schema":1,"type":"Iteration",', "not valid JSON"),
        (b"[1, 2, 3]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (b'"FitStarted"', "must be a JSON object"),
        (iteration_line(type='"Explosion"').encode(), "unknown event type"),
        (iteration_line(type="null").encode(), "unknown event type"),
        (iteration_line(schema="2").encode(), "unsupported schema"),
        (iteration_line(schema="true").encode(), "unsupported schema"),
        (iteration_line(schema='"1"').encode(), "unsupported schema"),
        (iteration_line(cost=None).encode(), "missing field 'cost'"),
        (iteration_line(cost='"0.5"').encode(), "field 'cost' must be a number"),
        (iteration_line(cost="true").encode(), "field 'cost' must be a number"),
        (iteration_line(fit_id='["fit-1"]').encode(), "field 'fit_id' must be a string"),
        (iteration_line(fit_id="7").encode(), "field 'fit_id' must be a string"),
        (iteration_line(iteration="true").encode(), "field 'iteration' must be an integer"),
        (iteration_line(iteration="3.5").encode(), "field 'iteration' must be an integer"),
        (iteration_line(nfev='"8"').encode(), "field 'nfev' must be an integer"),
        (iteration_line(params='[1.0,"2"]').encode(), "field 'params' must hold only numbers"),
        (iteration_line(params="[1.0,[2.0]]").encode(), "field 'params' must hold only numbers"),
        (iteration_line(params="[true]").encode(), "field 'params' must hold only numbers"),
        (iteration_line(params='{"a":1}').encode(), "field 'params' must be a list of numbers"),
        (iteration_line(step_norm='"big"').encode(), "field 'step_norm' must be a number or null"),
        (iteration_line(time="false").encode(), "field 'time' must be a number"),
        (iteration_line(iteration=big_int).encode(), "not valid JSON"),  # > 4300 digits
        (b"[" * 100_000, "nested too deeply"),
        (b'{"a":' * 100_000, "nested too deeply"),
        (b"\xff\xfe\x00{" + iteration_line().encode()[1:], "not UTF-8"),
        (iteration_line().encode()[:-1] + b"\xc3", "not UTF-8"),
        (b"__import__('os').system('touch " + marker.encode() + b"')", "not valid JSON"),
        (b"eval(\"__import__('os').system('touch " + marker.encode() + b"')\")", "not valid JSON"),
        (b"NaN", "must be a JSON object"),
        (b"\x00\x01\x02", "not valid JSON"),
    ]


def write_log(path, chunks: list[bytes]) -> None:
    path.write_bytes(b"".join(c + b"\n" for c in chunks))


def read_all(path, **kw) -> tuple[list, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evs = list(iter_events(path, **kw))
    return evs, [str(w.message) for w in caught if issubclass(w.category, ReplayWarning)]


async def replay_all(path, **kw) -> tuple[list, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with anyio.fail_after(60):
            evs = [ev async for ev in ns.replay(path, **kw)]
    return evs, [str(w.message) for w in caught if issubclass(w.category, ReplayWarning)]


def build_hostile_file(path, marker: str):
    """Good events interleaved with hostile lines (and blank ones). Returns the expected events
    and, for each hostile line, (line number, reason)."""
    goods = good_events()
    bad = hostile_lines(marker)
    chunks: list[bytes] = []
    expected_bad: list[tuple[int, str]] = []
    gi = 0
    for i, (raw, reason) in enumerate(bad):
        if gi < len(goods) and i % 6 == 0:
            chunks.append(goods[gi].to_json().encode())
            gi += 1
        if i % 10 == 5:
            chunks.extend([b"", b"   ", b"\t"])  # blank lines: skipped silently
        chunks.append(raw)
        expected_bad.append((len(chunks), reason))
    chunks.extend(g.to_json().encode() for g in goods[gi:])
    write_log(path, chunks)
    return goods, expected_bad


def check_warnings(path, msgs: list[str], expected_bad: list[tuple[int, str]]) -> None:
    assert len(msgs) == len(expected_bad), "\n".join(msgs)
    for msg, (lineno, reason) in zip(msgs, expected_bad, strict=True):
        assert msg.startswith(f"{path}:{lineno}: skipped: "), msg
        assert reason in msg, (reason, msg)


def test_hostile_lines_are_each_reported_and_good_lines_still_come_through(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.jsonl"
    goods, expected_bad = build_hostile_file(path, str(marker))
    evs, msgs = read_all(path)
    assert evs == goods  # in order, none lost
    check_warnings(path, msgs, expected_bad)
    assert not marker.exists()


@pytest.mark.anyio
async def test_replay_hostile_lines(anyio_backend, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.jsonl"
    goods, expected_bad = build_hostile_file(path, str(marker))
    evs, msgs = await replay_all(path)
    assert evs == goods
    check_warnings(path, msgs, expected_bad)
    assert not marker.exists()


@pytest.mark.anyio
async def test_pickle_payloads_are_just_not_json(anyio_backend, tmp_path):
    """Only JSON is parsed: a pickle that would run a command is rejected, and runs nothing."""
    marker = tmp_path / "pwned"
    path = tmp_path / "pickle.jsonl"
    goods = good_events()
    payloads = [
        pickle.dumps(_Evil(str(marker)), protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)
    ]
    assert not marker.exists()
    with open(path, "wb") as f:
        f.write(goods[0].to_json().encode() + b"\n")
        for p in payloads:
            f.write(p + b"\n")
        for g in goods[1:]:
            f.write(g.to_json().encode() + b"\n")
    evs, msgs = await replay_all(path)
    assert evs == goods
    bad_lines = [line for p in payloads for line in p.split(b"\n") if line.strip()]
    assert len(msgs) == len(bad_lines) > 0
    assert all(str(path) in m and ": skipped: " in m for m in msgs), msgs
    assert not marker.exists()


def test_overflowing_floats_become_infinite(tmp_path):
    """JSON numbers beyond float range (1e999) parse as +-inf, as the writer's own ``Infinity``:
    the event still builds, with infinite values."""
    path = tmp_path / "big.jsonl"
    write_log(
        path,
        [
            iteration_line(cost="1e999", params="[-1e999,2.0]", step_norm="1E400").encode(),
            iteration_line(cost="Infinity", params="[-Infinity,2.0]", step_norm="NaN").encode(),
        ],
    )
    evs, msgs = read_all(path)
    assert msgs == []
    assert len(evs) == 2
    for ev in evs:
        assert ev.cost == np.inf and ev.params[0] == -np.inf and ev.params[1] == 2.0
    assert evs[0].step_norm == np.inf and np.isnan(evs[1].step_norm)
    # and it round-trips through the writer's form
    assert event_from_json(evs[0].to_json()) == evs[0]


def test_huge_but_representable_integers_build(tmp_path):
    path = tmp_path / "ints.jsonl"
    write_log(path, [iteration_line(iteration="9" * 400, cost="12345678901234567890").encode()])
    (ev,), msgs = read_all(path)
    assert msgs == []
    assert ev.iteration == int("9" * 400) and ev.cost == pytest.approx(1.2345678901234567e19)


@pytest.mark.parametrize("field", ["cost", "params", "time", "step_norm"])
def test_integers_too_large_for_a_float_are_rejected(tmp_path, field):
    big = "1" + "0" * 400
    raw = {"params": f"[{big},2.0]"}.get(field, big)
    path = tmp_path / "overflow.jsonl"
    good = good_events()
    write_log(
        path,
        [
            good[0].to_json().encode(),
            iteration_line(**{field: raw}).encode(),
            good[1].to_json().encode(),
        ],
    )
    evs, msgs = read_all(path)
    assert evs == good[:2]
    assert len(msgs) == 1 and msgs[0].startswith(f"{path}:2: skipped: "), msgs


def test_fit_finished_result_fields_are_type_checked(tmp_path):
    path = tmp_path / "result.jsonl"
    bad = (
        '{"schema":1,"type":"FitFinished","fit_id":"fit-1","time":0.0,'
        '"result":{"x":[1.0],"cost":"cheap","optimality":0.0,"nfev":1,"njev":1,"nit":0,'
        '"status":"oops","message":7,"success":"yes"}}'
    )
    write_log(path, [bad.encode()])
    evs, msgs = read_all(path)
    assert evs == [] and len(msgs) == 1, (evs, msgs)


@pytest.fixture(scope="module")
def huge_line_log(tmp_path_factory):
    """Good lines around one 100 MB line (a valid JSON string: it is rejected for its size)."""
    path = tmp_path_factory.mktemp("huge") / "huge.jsonl"
    goods = good_events()
    with open(path, "wb") as f:
        f.write(goods[0].to_json().encode() + b"\n")
        f.write(b'{"schema":1,"type":"FitFailed","fit_id":"fit-1","message":"')
        block = b"x" * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write(b'","error_type":"E","time":0}\n')
        for g in goods[1:]:
            f.write(g.to_json().encode() + b"\n")
    return path, goods


def test_a_100_mb_line_is_skipped_without_holding_it(huge_line_log):
    path, goods = huge_line_log
    tracemalloc.start()
    try:
        evs, msgs = read_all(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert evs == goods
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith(f"{path}:2: skipped: ")
    assert f"over the {MAX_LINE_BYTES}-byte limit" in msgs[0]
    assert peak < 3 * MAX_LINE_BYTES, f"peak {peak / 2**20:.0f} MiB"  # never the whole line


@pytest.mark.anyio
async def test_replay_a_100_mb_line(anyio_backend, huge_line_log):
    path, goods = huge_line_log
    evs, msgs = await replay_all(path)
    assert evs == goods
    assert len(msgs) == 1 and f"{path}:2: skipped: " in msgs[0] and "limit" in msgs[0]


@pytest.mark.anyio
async def test_max_line_bytes_is_honoured(anyio_backend, tmp_path):
    path = tmp_path / "limit.jsonl"
    goods = good_events()
    write_log(path, [g.to_json().encode() for g in goods])
    longest = max(len(g.to_json()) for g in goods)
    evs, msgs = await replay_all(path, max_line_bytes=longest + 1)
    assert evs == goods and msgs == []
    evs, msgs = await replay_all(path, max_line_bytes=200)
    kept = [g for g in goods if len(g.to_json()) + 1 <= 200]
    assert evs == kept and 0 < len(kept) < len(goods)
    assert len(msgs) == len(goods) - len(kept)
    assert all("over the 200-byte limit" in m and str(path) in m for m in msgs)


@pytest.mark.anyio
async def test_truncated_last_line_is_reported_as_torn(anyio_backend, tmp_path):
    path = tmp_path / "torn.jsonl"
    goods = good_events()
    text = b"".join(g.to_json().encode() + b"\n" for g in goods)
    last = goods[-1].to_json().encode()
    path.write_bytes(text[: len(text) - 1 - len(last) // 2])  # half of the last line, no newline
    evs, msgs = await replay_all(path)
    assert evs == goods[:-1]
    assert len(msgs) == 1
    assert msgs[0].startswith(f"{path}:{len(goods)}: torn last line"), msgs[0]
    # a complete last line that only lacks its newline is not torn
    path.write_bytes(text[:-1])
    evs, msgs = await replay_all(path)
    assert evs == goods and msgs == []
    # a bad line that is *not* last is "skipped", not "torn"
    path.write_bytes(text[: len(text) - 1 - len(last) // 2] + b"\n" + last + b"\n")
    evs, msgs = await replay_all(path)
    assert evs == goods[:-1] + goods[-1:]
    assert len(msgs) == 1 and f":{len(goods)}: skipped: " in msgs[0]


@pytest.mark.anyio
async def test_empty_and_blank_files(anyio_backend, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert await replay_all(empty) == ([], [])
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n\n  \n\r\n\t\n")
    assert await replay_all(blank) == ([], [])
    assert read_all(blank) == ([], [])


@pytest.mark.anyio
async def test_missing_file_is_the_only_error(anyio_backend, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        async for _ in ns.replay(missing):
            pass
    with pytest.raises(FileNotFoundError):
        list(iter_events(missing))


@pytest.mark.anyio
@pytest.mark.usefixtures("no_leftover_threads")
async def test_a_real_fit_log_replays_exactly(anyio_backend, tmp_path):
    """Positive control: what JsonlSink writes, replay gives back event for event."""
    import jax.numpy as jnp

    def model(x, a, b):
        return a * jnp.exp(-b * x)

    x = np.linspace(0, 4, 50)
    path = tmp_path / "fit.jsonl"
    seen = []

    class Keep:
        async def send(self, ev):
            seen.append(ev)

    ns.curve_fit(
        model, x, 3.0 * np.exp(-0.5 * x), p0=[1.0, 1.0], sinks=[ns.sinks.JsonlSink(path), Keep()]
    )
    evs, msgs = await replay_all(path)
    assert msgs == [] and evs == seen
    assert isinstance(evs[0], FitStarted) and isinstance(evs[-1], FitFinished)


# ---- FitFinished.result read back from a log: an OptimizeResult, x a float64 array ----------

# A FitFinished line as the previous release's JsonlSink wrote it (same format), kept verbatim.
OLD_FINISHED_LINE = (
    '{"schema":1,"type":"FitFinished","fit_id":"fit-56c6357f3191","result":{"x":[3.0,0.5],'
    '"cost":4.029045443658096e-31,"optimality":3.5728186778899083e-16,"nfev":10,"njev":9,'
    '"nit":8,"status":3,"message":"`xtol` termination condition is satisfied.",'
    '"success":true},"time":1796284768.3736138}'
)


def check_result_x(ev, popt) -> None:
    assert isinstance(ev, FitFinished) and isinstance(ev.result, ns.OptimizeResult)
    assert isinstance(ev.result.x, np.ndarray) and ev.result.x.dtype == np.float64
    np.testing.assert_array_equal(ev.result.x, popt)
    assert ev.result.status == ev.result["status"] and ev.result.success is True


@pytest.mark.anyio
@pytest.mark.usefixtures("no_leftover_threads")
async def test_replayed_fit_finished_has_result_x(anyio_backend, tmp_path):
    import jax.numpy as jnp

    def model(x, a, b):
        return a * jnp.exp(-b * x)

    x = np.linspace(0, 4, 50)
    y = 3.0 * np.exp(-0.5 * x) + 0.01 * np.cos(7 * x)
    path = tmp_path / "fit.jsonl"
    popt, _ = ns.curve_fit(model, x, y, p0=[1.0, 1.0], sinks=[ns.sinks.JsonlSink(path)])
    evs, msgs = await replay_all(path)
    assert msgs == []
    check_result_x(evs[-1], popt)
    check_result_x(list(iter_events(path))[-1], popt)


@pytest.mark.anyio
async def test_an_old_log_still_replays_with_result_x(anyio_backend, tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text(OLD_FINISHED_LINE + "\n")
    evs, msgs = await replay_all(path)
    assert msgs == [] and len(evs) == 1
    check_result_x(evs[0], [3.0, 0.5])
    assert evs == list(iter_events(path))
    assert evs[0].to_json() == OLD_FINISHED_LINE
