"""The example notebooks run on a real ipykernel (nbclient), and the Stop button's message stops a
sync fit while its cell blocks the kernel (jupyter_client plays the frontend).

Skipped, with the reason, when nbclient, nbformat, ipykernel or the notebook extra is missing;
``pip install -e ".[test]"`` installs them all.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

for _mod in ("nbclient", "nbformat", "ipykernel", "jupyter_client", "anywidget"):
    if os.environ.get("CI"):  # CI installs everything: these tests must run there
        __import__(_mod)
    pytest.importorskip(_mod, reason=f"{_mod} is not installed (pip install -e '.[test]')")

import nbformat  # noqa: E402
from jupyter_client.manager import start_new_kernel  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
KERNEL_TIMEOUT = 180  # seconds a cell may take (the first fit compiles)

# notebook -> (true parameters, tolerance): the last cell prints "popt [...]"
EXPECTED = {
    "quickstart": ([2.5, 1.3, 0.5], dict(atol=0.02)),
    "async_streaming": ([3.0, 0.4, 0.8, 0.2], dict(atol=0.02)),
    "replay": ([1.7, -0.8], dict(rtol=0.02)),
    "batch": ([3.0, 0.0, 0.8, 0.2], dict(atol=0.03)),  # the map's middle pixel
}


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A ``python3`` kernelspec that runs *this* interpreter, found first on JUPYTER_PATH.

    An installed ``python3`` spec may name whatever ``python`` is on PATH; this one cannot.
    """
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3 (test)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join([str(tmp_path / "jupyter")]))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    work = tmp_path / "work"
    work.mkdir()
    return work


def outputs_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_on_a_real_kernel(kernel_env, name):
    src = NOTEBOOKS / f"{name}.ipynb"
    copy = kernel_env / src.name  # run a copy: the repository's notebooks stay output-free
    shutil.copy(src, copy)
    nb = nbformat.read(copy, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "stored outputs"
    client = NotebookClient(
        nb,
        timeout=KERNEL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(kernel_env)}},
    )
    client.execute()  # raises CellExecutionError if a cell errors
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    widgets = [
        o
        for c in nb.cells
        for o in c.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert widgets, "no FitWidget was displayed"
    printed = "".join(outputs_text(c) for c in nb.cells)
    line = next(ln for ln in printed.splitlines() if ln.startswith("popt "))
    popt = json.loads(line.removeprefix("popt "))
    truth, tol = EXPECTED[name]
    np.testing.assert_allclose(popt, truth, **tol)
    assert list(kernel_env.iterdir()) == [copy]  # nothing written next to the notebook


STOP_SETUP = """
import json, time
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
from nlsq_stream import curve_fit, fit_stream

def slow(t, a):
    return jnp.where(t < 0.5, a + 1.0, 0.9999 * a**2 + a - 1.0)

t = np.repeat([0.0, 1.0], 100_000)
tight = dict(ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=100_000)
"""
STOP_CELLS = {
    # the quickstart's case: the sync face blocks the cell
    "sync": """
popt, _, info, mesg, ier = curve_fit(
    slow, t, np.zeros_like(t), p0=[1.0], verbose=2, full_output=True, **tight
)
print("RESULT " + json.dumps({"mesg": mesg, "nfev": int(info["nfev"]), "ended": time.time()}))
""",
    # the async face, awaited in the cell (top-level await)
    "async": """
async with fit_stream(slow, t, np.zeros_like(t), p0=[1.0], verbose=2, **tight) as stream:
    async for _ in stream:
        pass
r = stream.result
print("RESULT " + json.dumps({"mesg": r.message, "nfev": int(r.nfev), "ended": time.time()}))
""",
}


@pytest.mark.parametrize("face", sorted(STOP_CELLS))
def test_stop_message_stops_a_fit_while_its_cell_runs(kernel_env, face):
    """The quickstart case, kernel side: ``curve_fit(verbose=2)`` blocks the cell (or
    ``fit_stream`` is awaited in it); the widget's Stop message, sent as a frontend sends it,
    still stops the fit, which keeps its best result."""
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(kernel_env))
    try:
        msg_id = kc.execute(STOP_SETUP + STOP_CELLS[face])
        comm_id = None
        sent_at = None
        result = None
        deadline = time.monotonic() + KERNEL_TIMEOUT
        while time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=KERNEL_TIMEOUT)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "comm_open":
                state = content["data"].get("state", {})
                if state.get("_anywidget_id") == "nlsq_stream.sinks.widget.FitWidget":
                    comm_id = content["comm_id"]
            elif kind == "comm_msg" and content["comm_id"] == comm_id and sent_at is None:
                state = content["data"].get("state", {})
                if state.get("iteration", 0) >= 2:  # the fit is under way: click Stop
                    stop = {"method": "custom", "content": {"type": "stop"}}
                    kc.shell_channel.send(
                        kc.session.msg("comm_msg", {"comm_id": comm_id, "data": stop})
                    )
                    sent_at = time.time()
            elif kind == "stream" and content["text"].startswith("RESULT "):
                result = json.loads(content["text"].split("RESULT ", 1)[1])
            elif kind == "error":
                pytest.fail("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                break
        assert comm_id is not None, "the default display in a kernel is not a FitWidget"
        assert sent_at is not None, "the widget never reported iteration 2"
        assert result is not None
        assert "stopped" in result["mesg"], result
        assert result["nfev"] < 4000, result  # unstopped it takes ~4900 evaluations
        assert result["ended"] - sent_at < 5.0, result  # stopped while the cell still ran
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
