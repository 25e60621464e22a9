"""``nlsq-stream bench dask``: a smoke test at a tiny size. Timings belong in the benchmark; this
checks that it runs a real 2-worker LocalCluster, reports every figure it promises (parsed from
its lines), and leaves no process or thread behind."""

from __future__ import annotations

import io
import re
import time

import pytest

from nlsq_stream.benchmarks import BenchOptions
from nlsq_stream.cli import BENCHES, build_parser

pytest.importorskip("distributed", reason="the dask extra is not installed")
bench = pytest.importorskip("nlsq_stream.benchmarks.dask")

pytestmark = pytest.mark.usefixtures("no_leftover_threads")


def test_the_cli_knows_the_dask_bench() -> None:
    assert "dask" in BENCHES
    args = build_parser().parse_args(["bench", "dask", "--quick", "--sizes", "2e3"])
    assert (args.which, args.quick, args.sizes) == ("dask", True, (2000,))


@pytest.fixture(scope="module")
def _distributed_process_threads():
    """distributed's process-wide offload thread and multiprocessing's resource tracker outlive
    any cluster: started before the leftover checks take their snapshots."""
    utils = pytest.importorskip("distributed.utils")
    utils._offload_executor.submit(lambda: None).result()
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


@pytest.mark.timeout(600)
def test_bench_dask_runs_small(_distributed_process_threads) -> None:
    psutil = pytest.importorskip("psutil")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = io.StringIO()
    bench.bench_dask(BenchOptions(quick=True, repeats=1, sizes=(2_000,), out=out))
    text = out.getvalue()
    number = r"([0-9][0-9,.]*)"
    found = {
        key: re.search(pattern, text)
        for key, pattern in {
            "local": rf"in-process: {number} s warm \({number} fits/s\)",
            "cluster": rf"cluster: {number} s warm \({number} fits/s\), first {number} s, "
            rf"{number}% success",
            "ratio": rf"ratio cluster / in-process: {number}",
            "transfer": rf"Y to the workers: {number} s for {number} MiB",
            "block": rf"overhead per block: (-?{number}) ms",
            "load": rf"load average {number}",
        }.items()
    }
    missing = [k for k, m in found.items() if m is None]
    assert not missing, f"lines missing for {missing}:\n{text}"
    value = {k: float(m.group(1).replace(",", "")) for k, m in found.items() if m is not None}
    assert value["local"] > 0 and value["cluster"] > 0
    assert value["ratio"] == pytest.approx(value["cluster"] / value["local"], rel=0.02, abs=0.01)
    assert float(found["cluster"].group(4)) > 90.0  # the Gaussian fits succeed on the cluster
    assert float(found["transfer"].group(2)) == pytest.approx(2_000 * 100 * 8 / 2**20, abs=0.05)
    deadline = time.monotonic() + 10.0
    while {p.pid for p in psutil.Process().children(recursive=True)} - before:
        assert time.monotonic() < deadline, "worker processes left behind"
        time.sleep(0.1)
