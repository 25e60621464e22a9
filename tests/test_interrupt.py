"""Ctrl-C during a watched sync fit: the fit stops, the sinks drain, KeyboardInterrupt follows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    # Ctrl-C as at a terminal: a test run started in the background by a non-interactive shell
    # inherits SIGINT *ignored* (POSIX, for background jobs), and so would this process.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from nlsq_stream import least_squares
    from nlsq_stream.sinks import ConsoleSink, JsonlSink

    t = np.linspace(0, 1, 1000)
    def resid(p):  # converges, then keeps trying rejected steps: tolerances are off
        return jnp.concatenate([10 * (p[1:] - p[:-1] ** 2), 1 - p[:-1], 1e-3 * jnp.sin(t * p[0])])
    p0 = -1.2 * np.ones(6)
    quiet = ConsoleSink(open(os.devnull, "w"))
    least_squares(resid, p0, max_nfev=3, sinks=[quiet])  # compile outside the timed part
    fired = {}
    def fire():
        time.sleep(1.0)
        fired["t"] = time.perf_counter()
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=fire, daemon=True).start()
    try:
        least_squares(resid, p0, max_nfev=10**8, ftol=None, xtol=None, gtol=1e-300,
                      sinks=[JsonlSink(sys.argv[1]), quiet])
        print("NO-INTERRUPT")
    except KeyboardInterrupt:
        ms = 1e3 * (time.perf_counter() - fired["t"])
        deadline = time.monotonic() + 3.0  # the shared sink loop ends 1-1.5 s after its last fit
        while any(th.name.startswith("nlsq_stream") for th in threading.enumerate()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        alive = [th.name for th in threading.enumerate() if th.name != "MainThread"]
        print(json.dumps({"latency_ms": ms, "threads": alive}))
    """
)


def test_ctrl_c_stops_a_watched_sync_fit(tmp_path):
    log = tmp_path / "fit.jsonl"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Stop latency: one chunk (~40 ms) plus one trial, with slack for a loaded machine.
    assert out["latency_ms"] < 1000, out
    assert [t for t in out["threads"] if t.startswith("nlsq_stream")] == []
    lines = log.read_text().splitlines()
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    assert first["type"] == "FitStarted"
    assert last["type"] == "FitFinished" and last["result"]["status"] == -2
