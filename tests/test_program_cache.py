"""solver.program_cache: with the compile cache on, a new process loads the solver's programs
whole; the key changes with anything the program depends on, and models it cannot key (host
callbacks) are compiled as usual. Cross-process cases run in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nlsq_stream
from nlsq_stream import _compile_cache
from nlsq_stream.benchmarks.common import child_env
from nlsq_stream.solver import engine, program_cache
from nlsq_stream.solver.curve_fit import prepare_curve_fit

X = np.linspace(0.0, 4.0, 60)
Y = 2.5 * np.exp(-0.8 * X) + 0.3 + 0.01 * np.sin(7 * X)

_CHILD = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
import nlsq_stream
from nlsq_stream.solver import program_cache
nlsq_stream.enable_compile_cache(sys.argv[1])
x = np.linspace(0.0, 4.0, 60)
y = 2.5 * np.exp(-0.8 * x) + 0.3 + 0.01 * np.sin(7 * x)
def model(x, a, b, c):
    return a * jnp.exp(-b * x) + c
popt, pcov = nlsq_stream.curve_fit(model, x, y, p0=[1.0, 1.0, 0.0])
level = int(sys.argv[2])
res = nlsq_stream.least_squares(lambda p: model(x, *p) - y, [1.0, 1.0, 0.0], verbose=level)
print(json.dumps(dict(popt=popt.tolist(), pcov=pcov.tolist(), x=res.x.tolist(), nfev=int(res.nfev),
                      counts=program_cache.counts)))
"""


def _child(folder: str, verbose: int = 0) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, folder, str(verbose)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("verbose", [0, 2])
def test_a_second_process_loads_the_programs_and_gets_the_same_answers(tmp_path, verbose):
    """Silent fits (one program) and watched ones (the chunk programs) alike."""
    first = _child(str(tmp_path), verbose)
    assert first["counts"]["loaded"] == 0 and first["counts"]["stored"] >= 2
    files = sorted((tmp_path / program_cache.SUBFOLDER).iterdir())
    assert len(files) == first["counts"]["stored"]
    second = _child(str(tmp_path), verbose)
    assert second["counts"] == {"loaded": len(files), "stored": 0, "not_kept": 0}
    assert sorted((tmp_path / program_cache.SUBFOLDER).iterdir()) == files
    for key in ("popt", "pcov", "x", "nfev"):  # bit for bit: the very same program ran
        assert second[key] == first[key]


def _key(f, p0=(1.0, 1.0, 0.0), method=None, x=X, y=Y):
    prep = prepare_curve_fit(f, x, y, p0=list(p0), method=method)
    config = prep.config()
    return program_cache.program_key("solve", prep.problem, config, "options", prep.inputs())


def test_the_key_follows_the_model_and_everything_else():
    def model(x, a, b, c):
        return a * jnp.exp(-b * x) + c

    def same_body_other_name(x, a, b, c):
        return a * jnp.exp(-b * x) + c

    def other_body(x, a, b, c):
        return a * jnp.exp(-b * x) - c

    def closure(k):
        return lambda x, a, b, c: a * jnp.exp(-b * x) + c * k

    base = _key(model)
    assert base is not None and base == _key(model)
    assert _key(same_body_other_name) == base  # the same computation: the same program
    assert _key(other_body) != base
    assert _key(closure(1.0)) != _key(closure(2.0))  # a captured value is part of the key
    assert _key(model, method="trf") != base  # Config
    assert _key(model, p0=np.array([1.0, 1.0, 0.0], np.float32)) == base  # data decide dtype
    assert _key(model, x=X[:50], y=Y[:50]) != base  # shapes
    array = np.arange(60.0)

    def with_array(x, a, b, c):
        return a * jnp.exp(-b * x) + c * array

    before = _key(with_array)
    array[3] = -1.0  # a global array changed in place: another program
    assert _key(with_array) != before


def test_a_custom_derivative_rule_is_part_of_the_key():
    def make(scale):
        @jax.custom_jvp
        def softplus(t):
            return jnp.log1p(jnp.exp(t))

        @softplus.defjvp
        def _jvp(primals, tangents):
            (t,), (dt,) = primals, tangents
            return softplus(t), scale * jax.nn.sigmoid(t) * dt

        return lambda x, a, b, c: a * softplus(-b * x) + c

    assert _key(make(1.0)) != _key(make(2.0))


def test_a_model_with_a_host_callback_is_not_kept(tmp_path, monkeypatch):
    def printing(x, a, b, c):
        jax.debug.print("a={a}", a=a)
        return a * jnp.exp(-b * x) + c

    assert _key(printing) is None
    monkeypatch.setattr(_compile_cache, "_enabled", [tmp_path])
    before = dict(program_cache.counts)
    popt, _ = nlsq_stream.curve_fit(printing, X, Y, p0=[1.0, 1.0, 0.0])
    assert program_cache.counts["not_kept"] == before["not_kept"] + 1
    assert program_cache.counts["stored"] == before["stored"]
    assert not (tmp_path / program_cache.SUBFOLDER).exists()
    plain, _ = nlsq_stream.curve_fit(lambda x, a, b, c: a * jnp.exp(-b * x) + c, X, Y)
    np.testing.assert_allclose(popt, plain, rtol=1e-10)


def test_an_unreadable_file_is_compiled_again_and_replaced(tmp_path, monkeypatch):
    def fresh(x, a, b, c):  # a new function: no program of this process has it
        return a * jnp.exp(-b * x) + c + 0.0 * x

    monkeypatch.setattr(_compile_cache, "_enabled", [tmp_path])
    prep = prepare_curve_fit(fresh, X, Y, p0=[1.0, 1.0, 0.0])
    prep.config_kw["fun_jac"] = False  # as curve_fit runs it
    config = prep.config()
    options = repr(engine.solve._options(config.heap))
    key = program_cache.program_key("solve", prep.problem, config, options, prep.inputs())
    path = tmp_path / program_cache.SUBFOLDER / f"solve-{key}.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a program")
    before = dict(program_cache.counts)
    popt, _ = nlsq_stream.curve_fit(fresh, X, Y, p0=[1.0, 1.0, 0.0])
    assert program_cache.counts["stored"] == before["stored"] + 1
    assert program_cache.counts["loaded"] == before["loaded"]
    assert path.read_bytes() != b"not a program"
    plain, _ = nlsq_stream.curve_fit(lambda x, a, b, c: a * jnp.exp(-b * x) + c, X, Y)
    np.testing.assert_allclose(popt, plain, rtol=1e-10)


def test_off_unless_the_compile_cache_is_on():
    assert _compile_cache.enabled_folder() is None and program_cache.folder() is None
