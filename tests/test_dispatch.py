"""``enable_inline_dispatch``: an explicit, process-wide opt-in, refused once it is too late.

Each case runs in a fresh interpreter: the setting is JAX's, read when its backend starts.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax

from nlsq_stream import _dispatch
from nlsq_stream.benchmarks.common import child_env

_CHILD = """
import json, sys
import nlsq_stream
from nlsq_stream import _dispatch
before = _dispatch.inline_dispatch_enabled()
if sys.argv[1] == "early":
    nlsq_stream.enable_inline_dispatch()
    nlsq_stream.enable_inline_dispatch()  # twice: nothing more happens
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
x = np.linspace(0.0, 5.0, 200)
y = 2.5 * np.exp(-1.3 * x) + 0.5
popt, _ = nlsq_stream.curve_fit(lambda x, a, b, c: a * jax.numpy.exp(-b * x) + c, x, y,
                                p0=[1.0, 1.0, 0.0])
error = None
if sys.argv[1] == "late":
    try:
        nlsq_stream.enable_inline_dispatch()
    except RuntimeError as e:
        error = str(e)
print(json.dumps(dict(before=before, after=_dispatch.inline_dispatch_enabled(),
                      popt=popt.tolist(), error=error)))
"""


def _run(when: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, when],
        capture_output=True,
        text=True,
        check=True,
        env=child_env(),
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_inline_dispatch_is_off_unless_asked():
    assert not _dispatch.inline_dispatch_enabled()  # this test process: JAX's default
    assert jax.config.values["jax_cpu_enable_async_dispatch"] is True
    out = _run("never")
    assert out["before"] is False and out["after"] is False


def test_enabled_before_the_backend_starts_it_runs_fits_inline_with_the_same_result():
    inline, default = _run("early"), _run("never")
    assert inline["before"] is False and inline["after"] is True
    assert inline["error"] is None
    assert inline["popt"] == default["popt"]  # the same program, run on another thread


def test_enabling_after_the_backend_started_is_refused_clearly():
    out = _run("late")
    assert out["after"] is False
    assert out["error"] is not None and "before JAX's backend starts" in out["error"]
