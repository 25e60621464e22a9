"""``nlsq-stream bench batch``: a quick smoke test (tiny sizes, a tiny loop sample, no optimistix).

Timings belong in the benchmark, not here: this only checks that it runs and reports what it
promises (both dtypes, the table, the loops' sample, the peak RSS, the targets).
"""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest

from nlsq_stream.benchmarks import BenchOptions
from nlsq_stream.benchmarks import batch as bench
from nlsq_stream.cli import BENCHES, build_parser


def test_the_cli_knows_the_batch_bench() -> None:
    assert "batch" in BENCHES
    args = build_parser().parse_args(["bench", "batch", "--quick", "--sizes", "1e2,1e3"])
    assert (args.which, args.quick, args.sizes) == ("batch", True, (100, 1000))


def test_gauss_data_is_fixed_and_typed() -> None:
    x, y, true = bench.gauss_data(5, np.float32)
    assert x.shape == (100,) and y.shape == (5, 100) and true.shape == (5, 4)
    assert x.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(y, bench.gauss_data(5, np.float32)[1])
    assert bench._same_minimum(np.array([1.0, 2.0]), np.array([1.0, 2.5]), 1e-6) == 0.5


def test_bench_batch_runs_small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "LOOP_SAMPLE", 20)
    monkeypatch.setattr(bench, "LOOP_ROUNDS", 2)
    monkeypatch.setattr(bench, "optimistix_fit", lambda dtype: (None, "left out in this test"))
    monkeypatch.setattr(bench, "TARGET_N", 40)  # the per-trial line and targets, at a tiny N
    out = io.StringIO()
    bench.bench_batch(BenchOptions(quick=True, repeats=1, sizes=(20, 40), out=out))
    text = out.getvalue()
    for expected in (
        "-- float64",
        "-- float32",
        "optimistix skipped: left out in this test",
        "sample of 20 fits",
        "ours fits/s",
        "peak RSS after N=40",
        "growth needs two sizes >= 1e3",
    ):
        assert expected in text, text
    # Where a trial's time goes: ours per trial, the two LAPACK calls alone, the 30x budget.
    trial_lines = [line for line in text.splitlines() if "us per fit and trial" in line]
    assert len(trial_lines) == 2, text  # one per dtype
    for line in trial_lines:
        numbers = [float(v) for v in re.findall(r"(\d+\.\d+) us", line)]
        assert len(numbers) == 4 and all(v > 0 for v in numbers), line
    assert text.count("100.0% success") == 4, text


def test_growth_is_timed_side_by_side_per_call_of_each_n(monkeypatch: pytest.MonkeyPatch) -> None:
    """The growth target's times: every N >= 1e3 in interleaved rounds, an N below
    ``GROWTH_WORK`` called that many fits' worth of times and divided back. A stand-in batch that
    takes 1 us a fit must read as linear (exponent 1) and pass."""
    calls: list[int] = []

    def fake_batch(model: object, x: np.ndarray, y: np.ndarray, p0: np.ndarray) -> None:
        calls.append(y.shape[0])
        time.sleep(y.shape[0] * 1e-6)

    monkeypatch.setattr(bench, "curve_fit_batch", fake_batch)
    monkeypatch.setattr(bench, "GROWTH_WORK", 8_000)
    opts = BenchOptions(repeats=3, out=io.StringIO())
    growth = bench._growth(opts, object(), (100, 1_000, 2_000, 8_000), np.float64)
    assert sorted(growth) == [1_000, 2_000, 8_000]  # 1e2 is below the target's range
    assert calls.count(1_000) == 3 * 8 and calls.count(2_000) == 3 * 4 and calls.count(8_000) == 3
    for n, seconds in growth.items():
        assert n * 1e-6 <= seconds < n * 1e-6 + 5e-3, (n, seconds)
    bench._say_targets(opts, {}, {}, "float64", growth)
    (line,) = [s for s in opts.out.getvalue().splitlines() if "grows no worse" in s]
    slope = float(re.search(r"exponent (\d+\.\d+)", line).group(1))
    assert 0.9 <= slope <= 1.05 and line.endswith("PASS"), line
    assert bench._growth(opts, object(), (100, 1_000), np.float64) == {}  # one N: not measured
