"""solver.lapack_init: a fit's LAPACK set-up loads scipy's two LAPACK/BLAS modules alone, and
``scipy.linalg`` imported later is whole. Each case runs in a fresh process (the preload is once
per process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("scipy")

FIT = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np, sys, json
from nlsq_stream import curve_fit
x = np.linspace(0.0, 4.0, 50)
popt, pcov = curve_fit(lambda x, a, b: a * jnp.exp(-b * x), x, 3.0 * np.exp(-0.5 * x), p0=[1, 1])
out = {"popt": popt.tolist(), "linalg_after_fit": "scipy.linalg" in sys.modules}
"""


def _run(code: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code) + "\nprint(json.dumps(out))"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_fit_sets_up_lapack_without_importing_scipy_linalg():
    out = _run(FIT)
    assert out["popt"] == pytest.approx([3.0, 0.5], rel=1e-9)
    assert out["linalg_after_fit"] is False


def test_scipy_linalg_imported_after_a_fit_has_its_lapack_modules():
    out = _run(
        FIT
        + """
import scipy.linalg
import scipy.linalg.cython_lapack
from scipy.linalg import cython_blas
from scipy.optimize import curve_fit as scipy_curve_fit
out["bound"] = (
    scipy.linalg.cython_lapack is sys.modules["scipy.linalg.cython_lapack"]
    and scipy.linalg.cython_blas is cython_blas is sys.modules["scipy.linalg.cython_blas"]
)
out["capi"] = "dgeqrf" in scipy.linalg.cython_lapack.__pyx_capi__
out["solve"] = scipy.linalg.solve(np.diag([2.0, 4.0]), np.ones(2)).tolist()
out["scipy_fit"] = scipy_curve_fit(lambda x, a: a * x, x, 2 * x)[0].tolist()
out["hooks_left"] = [type(f).__name__ for f in sys.meta_path if "Bind" in type(f).__name__]
"""
    )
    assert out["bound"] and out["capi"]
    assert out["solve"] == [0.5, 0.25]
    assert out["scipy_fit"] == pytest.approx([2.0])
    assert out["hooks_left"] == []


def test_nothing_is_preloaded_where_scipy_linalg_is_already_imported():
    out = _run(
        "import scipy.linalg\n"
        + FIT
        + """
out["hooks"] = [type(f).__name__ for f in sys.meta_path if "Bind" in type(f).__name__]
"""
    )
    assert out["popt"] == pytest.approx([3.0, 0.5], rel=1e-9)
    assert out["hooks"] == []
