"""Typed fit events and their JSON form.

A fit produces, in order: one :class:`FitStarted`, any number of :class:`Iteration` events with
increasing ``iteration``, then exactly one terminal event, :class:`FitFinished` or
:class:`FitFailed`. Events are frozen dataclasses; ``to_json``/``from_json`` round-trip them exactly
(floats are written with ``repr`` precision).

JSON schema (version 1), one object per event::

    {"schema": 1, "type": "FitStarted", "fit_id": str, "method": str, "n_params": int,
     "n_residuals": int, "param_names": [str, ...], "x0": [float, ...], "time": float,
     "max_nfev": int|null, "model": str|null}
    {"schema": 1, "type": "Iteration", "fit_id": str, "iteration": int, "nfev": int,
     "cost": float, "cost_reduction": float|null, "step_norm": float|null,
     "optimality": float, "params": [float, ...], "time": float}
    {"schema": 1, "type": "FitFinished", "fit_id": str, "result": {...}, "time": float}
    {"schema": 1, "type": "FitFailed", "fit_id": str, "error_type": str, "message": str,
     "time": float}

A batch of fits (``curve_fit_batch``) produces one :class:`BatchStarted`, any number of
:class:`BatchProgress` events (one per chunk of its compiled loop, at most one per emission
interval) and one :class:`BatchFinished`; per-fit :class:`FitFinished` events (``fit_id``
``"<batch_id>/<i>"``) only when asked for::

    {"schema": 1, "type": "BatchStarted", "batch_id": str, "n_fits": int, "method": str,
     "n_params": int, "n_points": int, "param_names": [str, ...], "time": float,
     "model": str|null}
    {"schema": 1, "type": "BatchProgress", "batch_id": str, "iteration": int, "n_fits": int,
     "n_running": int, "n_converged": int, "n_failed": int, "cost_quantiles": [float x 5],
     "nfev": int, "elapsed": float, "time": float,
     "blocks": {"total": int, "done": int, "running": int, "retried": int}}  (blocks: optional)
    {"schema": 1, "type": "BatchFinished", "batch_id": str, "n_fits": int,
     "counts": {"<status>": int, ...}, "elapsed": float, "time": float}

The batch events were added to version 1 without changing the others: a reader that predates
them skips their lines (``replay`` warns once per line) and reads the rest of the log.

``time`` is seconds since the epoch (``time.time()``) when the host received the event. Non-finite
floats are written as ``NaN``, ``Infinity`` and ``-Infinity``, as Python's ``json`` does.
``result`` holds ``x`` (list), ``cost``, ``optimality``, ``nfev``, ``njev``, ``nit``, ``status``,
``message`` and ``success``. ``max_nfev`` (the evaluation budget) and ``model`` (the model's
name) were added later: readers treat a missing key as ``null``, and older readers ignore them.

In Python, ``FitFinished.result`` is an :class:`~nlsq_stream.OptimizeResult` (``event.result.x``
as well as ``event.result["x"]``) whose ``x`` is a float64 numpy array, whether the event came
from a fit or from a JSON line; the JSON is the same either way.

>>> e = Iteration("fit-1", 3, 4, 0.5, 0.1, 0.01, 1e-3, np.array([1.0, 2.0]), 0.0)
>>> Iteration.from_json(e.to_json()) == e
True
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, overload

import numpy as np

from ._result import OptimizeResult

SCHEMA_VERSION = 1


class EventDecodeError(ValueError):
    """A JSON line could not be turned into an event; the message says why."""


def _float(v: Any) -> float:
    return float(v)


def _opt_float(v: Any) -> float | None:
    if v is None:
        return None
    return float(v)


class _Base:
    """What every event does: JSON, and equality field by field (arrays by value)."""

    TYPE: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": SCHEMA_VERSION, "type": self.TYPE}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        """One line of JSON (no newline)."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str | bytes) -> Event:
        """Parse one JSON line into the event it describes (any event type)."""
        return event_from_json(line)

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        return all(
            _equal(getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        )

    __hash__ = None  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True, eq=False)
class _Event(_Base):
    """An event of one fit; ``fit_id`` names the fit."""

    fit_id: str


@dataclasses.dataclass(frozen=True, eq=False)
class _BatchEvent(_Base):
    """An event of a batch of fits; ``batch_id`` names the batch (the hub routes it by that id,
    which ``fit_id`` also returns)."""

    batch_id: str

    @property
    def fit_id(self) -> str:
        return self.batch_id


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [float(t) for t in v.reshape(-1)]
    if isinstance(v, dict):
        return {k: _jsonable(t) for k, t in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(t) for t in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


@dataclasses.dataclass(frozen=True, eq=False)
class FitStarted(_Event):
    """A fit began. ``x0`` is the starting point (after it was made strictly feasible).

    ``max_nfev`` is the fit's budget of function evaluations and ``model`` the name of the model
    (``None`` when unknown, e.g. in logs written before these fields existed).
    """

    TYPE: ClassVar[str] = "FitStarted"
    method: str
    n_params: int
    n_residuals: int
    param_names: tuple[str, ...]
    x0: np.ndarray
    time: float
    max_nfev: int | None = None
    model: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Iteration(_Event):
    """One completed solver iteration: a row of scipy's ``verbose=2`` table plus the parameters.

    ``cost_reduction`` and ``step_norm`` are ``None`` for iteration 0.
    """

    TYPE: ClassVar[str] = "Iteration"
    iteration: int
    nfev: int
    cost: float
    cost_reduction: float | None
    step_norm: float | None
    optimality: float
    params: np.ndarray
    time: float


@dataclasses.dataclass(frozen=True, eq=False)
class FitFinished(_Event):
    """The fit ended with a result (converged, or not: see ``result.status``).

    ``result`` is a summary of the fit's :class:`~nlsq_stream.OptimizeResult`, and one itself
    (a dict with attribute access, as scipy's): ``x`` (a float64 numpy array), ``cost``,
    ``optimality``, ``nfev``, ``njev``, ``nit``, ``status``, ``message``, ``success``. Any mapping
    given is copied into one, its ``x`` made a float64 array. Two events are equal when their
    fields are, the result compared key by key (arrays by value, NaN equal to NaN), as every
    event compares.
    """

    TYPE: ClassVar[str] = "FitFinished"
    result: OptimizeResult
    time: float

    def __post_init__(self) -> None:
        result = OptimizeResult(self.result)
        if "x" in result:
            result["x"] = np.asarray(result["x"], dtype=np.float64)
        object.__setattr__(self, "result", result)

    def __repr__(self) -> str:
        # one line: OptimizeResult's own repr is scipy's multi-line table
        return (
            f"FitFinished(fit_id={self.fit_id!r}, result=OptimizeResult({dict(self.result)!r}), "
            f"time={self.time!r})"
        )

    @property
    def status(self) -> int:
        return int(self.result.get("status", 0))

    @property
    def stopped(self) -> bool:
        """True when the fit was stopped on request (status -2)."""
        return self.status == -2


@dataclasses.dataclass(frozen=True, eq=False)
class FitFailed(_Event):
    """The fit raised: no result. ``error_type`` and ``message`` describe the exception."""

    TYPE: ClassVar[str] = "FitFailed"
    error_type: str
    message: str
    time: float


QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)  # the cost quantiles a BatchProgress carries


@dataclasses.dataclass(frozen=True, eq=False)
class BatchStarted(_BatchEvent):
    """A batch of ``n_fits`` fits of one model began (``n_points`` data points per fit)."""

    TYPE: ClassVar[str] = "BatchStarted"
    n_fits: int
    method: str
    n_params: int
    n_points: int
    param_names: tuple[str, ...]
    time: float
    model: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class BatchProgress(_BatchEvent):
    """Where a batch stands after ``iteration`` chunks of its compiled loop.

    ``n_running + n_converged + n_failed == n_fits`` (failed: ended without converging: out of
    budget, stopped, or not finite at the start). ``cost_quantiles`` are the min, 10 %, median,
    90 % and max of the latest cost of every fit that has one, ``nfev`` the evaluations of all
    fits so far and ``elapsed`` the seconds since the batch started. ``blocks`` is set only for
    a batch run in blocks (``nlsq_stream.dask``): how many blocks in all, done, running, and
    started more than once (their worker was lost); a log without it reads as ``None``.
    """

    TYPE: ClassVar[str] = "BatchProgress"
    iteration: int
    n_fits: int
    n_running: int
    n_converged: int
    n_failed: int
    cost_quantiles: np.ndarray
    nfev: int
    elapsed: float
    time: float
    blocks: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.blocks is None:
            del out["blocks"]  # a batch in one piece writes what it always wrote
        return out

    @property
    def fits_per_second(self) -> float:
        """Fits ended per second so far."""
        ended = self.n_converged + self.n_failed
        return ended / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far (None before any fit ended)."""
        rate = self.fits_per_second
        return self.n_running / rate if rate > 0 else None


@dataclasses.dataclass(frozen=True, eq=False)
class BatchFinished(_BatchEvent):
    """The batch ended: ``counts`` maps each status (as a string, e.g. ``"1"``) to its fits."""

    TYPE: ClassVar[str] = "BatchFinished"
    n_fits: int
    counts: dict[str, int]
    elapsed: float
    time: float

    @property
    def n_converged(self) -> int:
        return sum(c for k, c in self.counts.items() if int(k) > 0)

    @property
    def stopped(self) -> bool:
        """True when the batch was stopped on request (some fit has status -2)."""
        return self.counts.get("-2", 0) > 0


Event = (
    FitStarted | Iteration | FitFinished | FitFailed | BatchStarted | BatchProgress | BatchFinished
)
TERMINAL = (FitFinished, FitFailed, BatchFinished)

ROW_COLUMNS = ("iteration", "nfev", "cost", "cost_reduction", "step_norm", "optimality")
"""The head columns of an iteration row (see :class:`EventBatch`); the parameters follow."""


def iterations_from_rows(fit_id: str, rows: Any, t: float) -> list[Iteration]:
    """The Iteration events of rows ``[iteration, nfev, cost, reduction, step_norm, optimality,
    *params]`` (``reduction`` and ``step_norm`` are ignored for iteration 0), all at ``t``.

    Built in bulk: the head columns become Python numbers in one ``tolist``, every event's
    ``params`` is a row of one float64 copy of the parameter columns, and each event's fields
    are set at once (the frozen dataclass's ``__init__`` sets them one by one through
    ``object.__setattr__``; the result is the same, checked in ``tests/test_hub.py``).
    """
    rows = np.asarray(rows)
    if rows.shape[0] == 0:
        return []
    heads = rows[:, : len(ROW_COLUMNS)].tolist()
    params = np.array(rows[:, len(ROW_COLUMNS) :], dtype=np.float64)
    new = object.__new__
    out: list[Iteration] = []
    for (it, nfev, cost, red, step, opt), p in zip(heads, params, strict=True):
        ev = new(Iteration)
        ev.__dict__.update(
            fit_id=fit_id,
            iteration=int(it),
            nfev=int(nfev),
            cost=cost,
            cost_reduction=None if it == 0 else red,
            step_norm=None if it == 0 else step,
            optimality=opt,
            params=p,
            time=t,
        )
        out.append(ev)
    return out


_DECODE_LOCK = threading.Lock()


class EventBatch(Sequence[Event]):
    """Events of one fit handed over together: ``head`` (events), then one Iteration event per
    row of ``rows``, then ``tail`` (events). A read-only sequence of events.

    ``rows`` is one float64 array, a row per iteration: the columns ``ROW_COLUMNS``, then the
    parameters, every row at ``time``. The Iteration events are built from it only when the
    batch is read as a sequence (once, in bulk, thread-safely); a sink that can use the rows as
    they are (the console table, the JSON lines) reads ``head``, ``rows`` and ``tail`` instead.
    """

    __slots__ = ("_events", "fit_id", "head", "rows", "tail", "time")

    def __init__(
        self,
        fit_id: str,
        events: Sequence[Event] | None = None,
        rows: np.ndarray | None = None,
        time: float = 0.0,
        tail: Sequence[Event] = (),
    ) -> None:
        self.fit_id = fit_id
        self.head: list[Event] = list(events) if events is not None else []
        self.tail: list[Event] = list(tail)
        self.rows = rows if rows is None or rows.shape[0] else None
        self.time = time
        self._events: list[Event] | None = None if self.rows is not None else self.head + self.tail

    def events(self) -> list[Event]:
        """Every event, in order, as a list (built on first use)."""
        if self._events is None:
            with _DECODE_LOCK:  # one lock for all batches: decoding is rare and short
                if self._events is None:
                    its = iterations_from_rows(self.fit_id, self.rows, self.time)
                    self._events = [*self.head, *its, *self.tail]
        return self._events

    def __len__(self) -> int:
        rows = 0 if self.rows is None else self.rows.shape[0]
        return len(self.head) + rows + len(self.tail)

    @overload
    def __getitem__(self, i: int) -> Event: ...

    @overload
    def __getitem__(self, i: slice) -> list[Event]: ...

    def __getitem__(self, i: int | slice) -> Event | list[Event]:
        return self.events()[i]

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events())


_TYPES: dict[str, type[_Base]] = {
    c.TYPE: c
    for c in (
        FitStarted,
        Iteration,
        FitFinished,
        FitFailed,
        BatchStarted,
        BatchProgress,
        BatchFinished,
    )
}
MAX_LINE_BYTES = 16 * 1024 * 1024


def _require(d: dict[str, Any], key: str, kinds: tuple[type, ...], what: str) -> Any:
    if key not in d:
        raise EventDecodeError(f"missing field {key!r}")
    v = d[key]
    if isinstance(v, bool) and bool not in kinds:
        raise EventDecodeError(f"field {key!r} must be {what}, got {v!r:.40}")
    if not isinstance(v, kinds):
        raise EventDecodeError(f"field {key!r} must be {what}, got {type(v).__name__}")
    return v


def _float_list(d: dict[str, Any], key: str) -> np.ndarray:
    v = _require(d, key, (list,), "a list of numbers")
    for t in v:
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise EventDecodeError(f"field {key!r} must hold only numbers, got {type(t).__name__}")
    return np.asarray(v, dtype=np.float64)


_NUM = (int, float)
_RESULT_FIELDS: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("cost", _NUM, "a number"),
    ("optimality", _NUM, "a number"),
    ("time_sec", _NUM, "a number"),
    ("nfev", (int,), "an integer"),
    ("njev", (int,), "an integer"),
    ("nit", (int,), "an integer"),
    ("status", (int,), "an integer"),
    ("message", (str,), "a string"),
    ("success", (bool,), "true or false"),
)


def event_from_dict(d: Any) -> Event:
    """Validate a decoded JSON object and build the event. Raises :class:`EventDecodeError`."""
    if not isinstance(d, dict):
        raise EventDecodeError(f"an event must be a JSON object, got {type(d).__name__}")
    schema = d.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise EventDecodeError(
            f"unsupported schema {schema!r:.20} (this reader knows {SCHEMA_VERSION})"
        )
    kind = d.get("type")
    if kind not in _DECODERS:
        raise EventDecodeError(f"unknown event type {kind!r:.40}")
    key = "batch_id" if kind.startswith("Batch") else "fit_id"
    ident = _require(d, key, (str,), "a string")
    t = _float(_require(d, "time", _NUM, "a number"))
    return _DECODERS[kind](d, ident, t)


def _int(d: dict[str, Any], key: str) -> int:
    return int(_require(d, key, (int,), "an integer"))


def _str(d: dict[str, Any], key: str) -> str:
    return str(_require(d, key, (str,), "a string"))


def _names(d: dict[str, Any]) -> tuple[str, ...]:
    names = _require(d, "param_names", (list,), "a list of strings")
    if not all(isinstance(s, str) for s in names):
        raise EventDecodeError("field 'param_names' must hold only strings")
    return tuple(names)


def _optional(d: dict[str, Any], key: str, kinds: tuple[type, ...], what: str) -> Any:
    v = d.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, kinds)):
        raise EventDecodeError(f"field {key!r} must be {what} or null")
    return v


def _fit_started(d: dict[str, Any], fit_id: str, t: float) -> FitStarted:
    return FitStarted(
        fit_id,
        _str(d, "method"),
        _int(d, "n_params"),
        _int(d, "n_residuals"),
        _names(d),
        _float_list(d, "x0"),
        t,
        _optional(d, "max_nfev", (int,), "an integer"),
        _optional(d, "model", (str,), "a string"),
    )


def _iteration(d: dict[str, Any], fit_id: str, t: float) -> Iteration:
    return Iteration(
        fit_id,
        _int(d, "iteration"),
        _int(d, "nfev"),
        _float(_require(d, "cost", _NUM, "a number")),
        _opt_float(_optional(d, "cost_reduction", _NUM, "a number")),
        _opt_float(_optional(d, "step_norm", _NUM, "a number")),
        _float(_require(d, "optimality", _NUM, "a number")),
        _float_list(d, "params"),
        t,
    )


def _fit_finished(d: dict[str, Any], fit_id: str, t: float) -> FitFinished:
    result = OptimizeResult(_require(d, "result", (dict,), "an object"))
    if "x" in result:
        result["x"] = _float_list(result, "x")
    for key, kinds, what in _RESULT_FIELDS:
        if key in result:
            v = result[key]
            if (isinstance(v, bool) and bool not in kinds) or not isinstance(v, kinds):
                raise EventDecodeError(f"field 'result.{key}' must be {what}")
    return FitFinished(fit_id, result, t)


def _fit_failed(d: dict[str, Any], fit_id: str, t: float) -> FitFailed:
    return FitFailed(fit_id, _str(d, "error_type"), _str(d, "message"), t)


def _batch_started(d: dict[str, Any], batch_id: str, t: float) -> BatchStarted:
    return BatchStarted(
        batch_id,
        _int(d, "n_fits"),
        _str(d, "method"),
        _int(d, "n_params"),
        _int(d, "n_points"),
        _names(d),
        t,
        _optional(d, "model", (str,), "a string"),
    )


def _batch_progress(d: dict[str, Any], batch_id: str, t: float) -> BatchProgress:
    quantiles = _float_list(d, "cost_quantiles")
    if quantiles.shape != (len(QUANTILES),):
        raise EventDecodeError(f"field 'cost_quantiles' must hold {len(QUANTILES)} numbers")
    return BatchProgress(
        batch_id,
        _int(d, "iteration"),
        _int(d, "n_fits"),
        _int(d, "n_running"),
        _int(d, "n_converged"),
        _int(d, "n_failed"),
        quantiles,
        _int(d, "nfev"),
        _float(_require(d, "elapsed", _NUM, "a number")),
        t,
        _blocks(d),
    )


def _blocks(d: dict[str, Any]) -> dict[str, int] | None:
    blocks = _optional(d, "blocks", (dict,), "an object")
    if blocks is not None and any(
        isinstance(v, bool) or not isinstance(v, int) for v in blocks.values()
    ):
        raise EventDecodeError("field 'blocks' must map names to integers")
    return None if blocks is None else dict(blocks)


def _batch_finished(d: dict[str, Any], batch_id: str, t: float) -> BatchFinished:
    counts = _require(d, "counts", (dict,), "an object")
    for k, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise EventDecodeError("field 'counts' must map statuses to integers")
        try:
            int(k)
        except ValueError:
            raise EventDecodeError(
                f"field 'counts' has a key that is no status: {k!r:.20}"
            ) from None
    return BatchFinished(
        batch_id,
        _int(d, "n_fits"),
        dict(counts),
        _float(_require(d, "elapsed", _NUM, "a number")),
        t,
    )


_DECODERS: dict[str, Any] = {
    "FitStarted": _fit_started,
    "Iteration": _iteration,
    "FitFinished": _fit_finished,
    "FitFailed": _fit_failed,
    "BatchStarted": _batch_started,
    "BatchProgress": _batch_progress,
    "BatchFinished": _batch_finished,
}


def event_from_json(line: str | bytes) -> Event:
    """Parse one line of JSON into an event. Only JSON is ever parsed: never pickle or eval."""
    if isinstance(line, bytes):
        if len(line) > MAX_LINE_BYTES:
            raise EventDecodeError(f"line is {len(line)} bytes, over the {MAX_LINE_BYTES} limit")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EventDecodeError(f"not UTF-8: {e}") from None
    if len(line) > MAX_LINE_BYTES:
        raise EventDecodeError(f"line is {len(line)} characters, over the {MAX_LINE_BYTES} limit")
    try:
        d = json.loads(line)
    except RecursionError:
        raise EventDecodeError("JSON nested too deeply") from None
    except ValueError as e:
        raise EventDecodeError(f"not valid JSON: {e}") from None
    try:
        return event_from_dict(d)
    except OverflowError as e:  # an integer too large for a float
        raise EventDecodeError(f"number out of range: {e}") from None


__all__ = [
    "QUANTILES",
    "ROW_COLUMNS",
    "SCHEMA_VERSION",
    "TERMINAL",
    "BatchFinished",
    "BatchProgress",
    "BatchStarted",
    "Event",
    "EventBatch",
    "EventDecodeError",
    "FitFailed",
    "FitFinished",
    "FitStarted",
    "Iteration",
    "event_from_dict",
    "event_from_json",
    "iterations_from_rows",
]
