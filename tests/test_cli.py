"""The ``nlsq-stream`` command, run as ``python -m nlsq_stream.cli`` in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nlsq_stream.sinks import HEADER

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the command in a fresh interpreter that imports this checkout's package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # The demo keeps its solver in the user's compile cache; tests keep theirs out of it.
    env.setdefault("NLSQ_STREAM_COMPILE_CACHE", "0")
    return subprocess.run(
        [sys.executable, "-m", "nlsq_stream.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def test_help() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "bench" in proc.stdout
    for sub in ("demo", "bench"):
        proc = run_cli(sub, "--help")
        assert proc.returncode == 0, proc.stderr
    assert "--sizes" in proc.stdout and "--quick" in proc.stdout


def test_unknown_subcommand_fails_clearly() -> None:
    proc = run_cli("frobnicate")
    assert proc.returncode != 0
    assert "invalid choice: 'frobnicate'" in proc.stderr
    assert "demo" in proc.stderr and "bench" in proc.stderr


def test_missing_subcommand_fails_clearly() -> None:
    proc = run_cli()
    assert proc.returncode != 0
    assert "required" in proc.stderr


def test_bad_option_value_fails_clearly() -> None:
    proc = run_cli("demo", "--points", "many")
    assert proc.returncode != 0
    assert "expected a positive integer" in proc.stderr


def test_demo_writes_table_and_log(tmp_path: Path) -> None:
    log = tmp_path / "x.jsonl"
    proc = run_cli("demo", "--log", str(log), "--points", "20000", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert HEADER in out
    assert "Function evaluations" in out  # the summary the console sink prints at the end
    assert str(log.resolve()) in out
    for name in ("offset", "slope", "amp1", "cen5", "wid5"):
        assert f"\n{name} " in out
    lines = log.read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    assert events[0]["type"] == "FitStarted"
    assert events[-1]["type"] == "FitFinished"
    assert events[-1]["result"]["success"] is True
    iterations = [e for e in events if e["type"] == "Iteration"]
    assert [e["iteration"] for e in iterations] == list(range(len(iterations)))
    assert len(iterations) >= 5
    assert not (tmp_path / "nlsq_stream_demo.jsonl").exists()  # --log was honoured


def test_demo_keeps_its_solver_in_the_compile_cache_given(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    log = str(tmp_path / "x.jsonl")
    proc = run_cli("demo", "--log", log, "--points", "2000", "--compile-cache", str(cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any(p.is_file() for p in cache.rglob("*"))
    off = run_cli("demo", "--log", log, "--points", "2000", "--no-compile-cache")
    assert off.returncode == 0, off.stdout + off.stderr
    bad = run_cli("demo", "--log", log, "--compile-cache", log)  # a file, not a folder
    assert bad.returncode == 2 and "--compile-cache" in bad.stderr and "`path`" in bad.stderr


def test_bench_cold_quick_prints_its_target() -> None:
    proc = run_cli("bench", "cold", "--repeats", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "second process's first fit" in x)
    assert "<= 0.3" in line and ("PASS" in line or "MISS" in line)


def test_bench_solver_quick_small() -> None:
    proc = run_cli("bench", "solver", "--quick", "--sizes", "1000", "--repeats", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "== solver" in out
    assert "first call <= 0.6 s" in out
    pytest.importorskip("scipy")
    assert "ratio scipy_fastest/ours_warm at n=1e3" in out
    assert "ours warm no slower than scipy lm" in out
    assert "PASS" in out or "MISS" in out


def test_bench_emit_quick_small() -> None:
    """The emission benchmark reports the cost of watching, the least that any pipeline would
    add ('floor'), the 1e3 target and the live consumer's latency."""
    proc = run_cli("bench", "emit", "--quick", "--sizes", "1000", "--repeats", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    row = re.search(
        r"^ +1e3 +([0-9.]+) +([0-9.]+) +[0-9.]+x +[-+][0-9.]+ms +[0-9.]+x "
        r"+([-+][0-9.]+)ms +3$",
        out,
        re.M,
    )
    assert row, out
    assert re.search(r"n=1e3: added < 0.3 ms: [-+][0-9.]+ ms  (PASS|MISS)", out), out
    assert re.search(r"latency \(end max\) <= 100 ms: [0-9.]+ ms  (PASS|MISS)", out), out


def test_bench_emit_prints_the_1e5_floor_beside_its_budget() -> None:
    """At 1e5 the benchmark sets the floor beside the target's budget: 3 % of the table's
    verbose=0 median, and the floor as a share of it."""
    import io

    from nlsq_stream.benchmarks import BenchOptions
    from nlsq_stream.benchmarks.emit import bench_emit_overhead

    out = io.StringIO()
    bench_emit_overhead(BenchOptions(quick=True, repeats=3, sizes=(100_000,), out=out))
    text = out.getvalue()
    row = re.search(r"^ +1e5 +([0-9.]+) +[0-9.]+ +[0-9.]+x .* +([-+][0-9.]+)ms +3$", text, re.M)
    line = re.search(
        r"n=1e5: the floor ([-+][0-9.]+) ms against the target's budget \+([0-9.]+) ms "
        r"\(3 % of verbose=0\): the floor is (-?[0-9]+)% of it",
        text,
    )
    assert row and line, text
    quiet, floor = float(row.group(1)), float(row.group(2))
    assert float(line.group(1)) == floor
    budget = float(line.group(2))
    assert budget == pytest.approx(0.03 * quiet, abs=1e-3)
    assert int(line.group(3)) == pytest.approx(100 * floor / budget, abs=2)


def test_ratio_interval_brackets_the_ratio_and_widens_with_noise() -> None:
    from nlsq_stream.benchmarks.common import ratio_interval

    rng = np.random.default_rng(0)
    base = 1.0 + 0.01 * rng.standard_normal(200)
    lo, hi = ratio_interval(base, 1.1 * base)
    assert lo == pytest.approx(1.1) and hi == pytest.approx(1.1)  # pairs move together
    noisy = 1.1 + 0.05 * rng.standard_normal(200)
    lo, hi = ratio_interval(base, noisy)
    assert lo < 1.1 < hi and 0.005 < hi - lo < 0.05
    lo5, hi5 = ratio_interval(base[:20], noisy[:20])
    assert hi5 - lo5 > hi - lo  # fewer pairs, a wider interval


def test_bench_slow_consumers_quick() -> None:
    """The slow-consumer benchmark runs and reports what it promises (its ratio is measured
    there, not asserted here: timings belong in benchmarks)."""
    proc = run_cli("bench", "slow", "--quick", "--repeats", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "== slow consumers" in out
    skipped = re.search(r"consumer skipped (\d+)-(\d+) of (\d+) iterations", out)
    assert skipped and 0 < int(skipped[1]) < int(skipped[3]), out
    assert "(all, in order)" in out, out
    assert re.search(r"slow / fast <= 1.05: [0-9.]+x  (PASS|MISS)", out), out


def test_bench_rejects_unknown_benchmark() -> None:
    proc = run_cli("bench", "nothing")
    assert proc.returncode != 0
    assert "invalid choice: 'nothing'" in proc.stderr


def test_replay_and_summary_commands(tmp_path):
    """`nlsq-stream replay FILE` prints the table again; `summary FILE` prints the result."""
    log = tmp_path / "fit.jsonl"
    demo = run_cli("demo", "--log", str(log), "--points", "20000")
    assert demo.returncode == 0, demo.stderr
    replayed = run_cli("replay", str(log))
    assert replayed.returncode == 0, replayed.stderr
    table = [line for line in replayed.stdout.splitlines() if line.strip()]
    assert "Iteration" in table[0] and "Optimality" in table[0]
    assert table[-1].startswith("Function evaluations ")
    summary = run_cli("summary", str(log))
    assert summary.returncode == 0, summary.stderr
    assert "status" in summary.stdout and "amp1" in summary.stdout
    with open(log, "a") as f:
        f.write('{"schema": 1, "type": "Itera')  # a torn last line
    torn = run_cli("replay", str(log))
    assert torn.returncode == 0 and "torn last line" in torn.stderr
    missing = run_cli("summary", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "No such file" in missing.stderr
