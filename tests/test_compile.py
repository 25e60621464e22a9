"""Compile once: a repeat fit with the same model, shapes, dtypes and options compiles nothing.

Compilations are counted with ``jax.monitoring``: every XLA backend compilation fires the event
``COMPILE_EVENT`` (checked against this jax version in ``test_shape_change_compiles``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_compiles

from nlsq_stream import curve_fit, curve_fit_batch, least_squares

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
M = 33  # points; unique to this module so the first fit of each configuration really compiles


def model(x, a, b, c):
    """a exp(-b x) + c."""
    return a * jnp.exp(-b * x) + c


def residual(p, x, y):
    """Residuals of ``model``, for least_squares (data passed through ``args``)."""
    return model(x, *p) - y


def data(seed: int, m: int = M, dtype=np.float64):
    """Noisy exponential-decay data; the seed changes the values, not the shapes."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 4.0, m)
    truth = np.array([2.0, 0.7, 0.3]) * (1 + 0.2 * rng.standard_normal(3))
    y = truth[0] * np.exp(-truth[1] * x) + truth[2] + 0.01 * rng.standard_normal(m)
    p0 = truth * (1 + 0.2 * rng.standard_normal(3))
    return x.astype(dtype), y.astype(dtype), p0.astype(dtype)


CURVE_FIT_OPTIONS = {
    "lm": dict(method="lm"),
    "trf": dict(method="trf"),
    "trf-bounds": dict(method="trf", bounds=([0.0, 0.0, -5.0], [10.0, 5.0, 5.0])),
    "trf-sigma-loss": dict(method="trf", loss="soft_l1", f_scale=0.1),
}


@pytest.mark.parametrize("name", sorted(CURVE_FIT_OPTIONS))
def test_curve_fit_second_call_compiles_nothing(name):
    opts = CURVE_FIT_OPTIONS[name]
    x, y, p0 = data(1)
    sigma = np.full(M, 0.01) if "sigma" in name else None
    first = curve_fit(model, x, y, p0=p0, sigma=sigma, **opts)[0]
    x, y, p0 = data(2)
    sigma = None if sigma is None else np.linspace(0.01, 0.03, M)
    with count_compiles() as compiles:
        second = curve_fit(model, x, y, p0=p0, sigma=sigma, **opts)[0]
    assert compiles == []
    assert not np.allclose(first, second)  # new data really was used


def test_curve_fit_new_bounds_values_compile_nothing():
    """Bound values are traced: only whether there are bounds is part of the compiled program."""
    x, y, p0 = data(3)
    curve_fit(model, x, y, p0=p0, bounds=([0.0, 0.0, -5.0], [10.0, 5.0, 5.0]))
    with count_compiles() as compiles:
        curve_fit(model, x, y, p0=p0, bounds=([-1.0, 0.1, -4.0], [9.0, 4.0, 4.0]))
    assert compiles == []


@pytest.mark.parametrize(
    "opts",
    [dict(method="lm"), dict(method="trf"), dict(method="trf", bounds=(-10, 10), loss="huber")],
    ids=["lm", "trf", "trf-bounds-huber"],
)
def test_least_squares_second_call_compiles_nothing(opts):
    x, y, p0 = data(4)
    first = least_squares(residual, p0, args=(x, y), **opts).x
    x, y, p0 = data(5)
    with count_compiles() as compiles:
        second = least_squares(residual, p0, args=(x, y), **opts).x
    assert compiles == []
    assert not np.allclose(first, second)


def test_shape_change_compiles():
    """A different number of points is a new program: the counter sees it (and its name)."""
    x, y, p0 = data(6)
    curve_fit(model, x, y, p0=p0, method="trf")
    x, y, p0 = data(6, m=M + 1)
    with count_compiles() as compiles:
        curve_fit(model, x, y, p0=p0, method="trf")
    assert COMPILE_EVENT in compiles


F32_TOLS = dict(ftol=1e-6, xtol=1e-6, gtol=1e-6)


def as32(*arrays):
    return [np.asarray(a, np.float32) for a in arrays]


def test_float32_default_tolerances():
    """float32 with scipy's default tolerances converges (they are raised to float32's eps)."""
    x, y, p0 = data(7)
    popt32, _ = curve_fit(model, *as32(x, y), p0=as32(p0)[0])
    assert popt32.dtype == np.float32


@pytest.mark.parametrize("name", ["lm", "trf", "trf-bounds"])
def test_float32_curve_fit(name):
    """float32 inputs fit in float32 (x64 is on) and land near the float64 answer."""
    assert jax.config.jax_enable_x64
    opts = CURVE_FIT_OPTIONS[name]
    x, y, p0 = data(7)
    popt64, _ = curve_fit(model, x, y, p0=p0, **opts)
    popt32, pcov32 = curve_fit(model, *as32(x, y), p0=as32(p0)[0], **opts, **F32_TOLS)
    assert popt32.dtype == np.float32
    assert np.all(np.isfinite(pcov32))
    np.testing.assert_allclose(popt32, popt64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lm", "trf"])
def test_float32_least_squares(method):
    """least_squares keeps float32 too: x, fun and jac come back in float32."""
    x, y, p0 = data(8)
    ref = least_squares(residual, p0, args=(x, y), method=method)
    x32, y32, p032 = as32(x, y, p0)
    res = least_squares(residual, p032, args=(x32, y32), method=method, **F32_TOLS)
    assert res.success, res.message
    for value in (res.x, res.fun, res.jac):
        assert np.asarray(value).dtype == np.float32
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-4, atol=1e-5)


def test_solver_programs_use_the_cpu_compiler_options():
    """On CPU the solver is compiled with the classic emitters (half the compile time); the
    option reaches XLA, which rejects an option it does not know (see the next test)."""
    from nlsq_stream.solver import engine

    if jax.default_backend() != "cpu":
        pytest.skip("the compiler options are CPU-only")
    options = engine.compiler_options()
    if options is None:
        pytest.skip(f"jax {jax.__version__} does not know {engine._CPU_COMPILER_OPTIONS}")
    assert options == engine._CPU_COMPILER_OPTIONS
    x, y, p0 = data(3, m=M + 2)
    popt, _ = curve_fit(model, x, y, p0=p0)
    assert np.all(np.isfinite(popt))


def test_an_unknown_compiler_option_falls_back_to_xla_defaults(monkeypatch):
    """No probe compile: the first program compiled with an option XLA does not know fails, the
    options are dropped for the process, and the program is compiled again with XLA's defaults."""
    from nlsq_stream.solver import engine

    if jax.default_backend() != "cpu":
        pytest.skip("the compiler options are CPU-only")
    bogus = {"xla_cpu_no_such_option_for_this_test": True}
    with pytest.raises(Exception, match="xla_cpu_no_such_option_for_this_test"):
        jax.jit(lambda v: v * 2, compiler_options=bogus).lower(np.zeros(2)).compile()
    monkeypatch.setattr(engine, "_CPU_COMPILER_OPTIONS", bogus)
    monkeypatch.setattr(engine, "_REJECTED", [])
    assert engine.compiler_options() == bogus

    def fresh(x, a, b):  # a new function: its program is compiled now, with the bogus option
        return a * jnp.exp(-b * x)

    x = np.linspace(0.0, 4.0, 40)
    popt, _ = curve_fit(fresh, x, 2.0 * np.exp(-0.7 * x), p0=[1.0, 1.0])
    np.testing.assert_allclose(popt, [2.0, 0.7], rtol=1e-8)
    assert engine.compiler_options() is None
    assert "xla_cpu_no_such_option_for_this_test" in engine._REJECTED[0]


def test_heap_limit_only_where_every_buffer_fits():
    """Heaps of at most 31 MiB (temporaries malloc recycles) are asked for only where the
    largest buffer fits in one: else XLA would warn about each buffer that does not."""
    from nlsq_stream.solver import curve_fit as solver_curve_fit
    from nlsq_stream.solver import engine

    if engine.compiler_options() is None:
        pytest.skip("the heap limit is a CPU compiler option")

    def wide(x, a, b, c):
        """Materializes an (m, 8) intermediate: 64 MB at 1e6 points."""
        g = jnp.exp(-(((x[:, None] - jnp.linspace(0, 5, 8)[None, :]) * b) ** 2))
        return a * jnp.cumsum(g, axis=1)[:, -1] + c

    def limit(f, m):
        x = np.linspace(0.0, 5.0, m)
        prep = solver_curve_fit.prepare_curve_fit(f, x, np.zeros(m), p0=[1.0, 1.0, 0.0])
        return engine.heap_limit(prep.problem, prep.x0, prep.data, prep.n_residuals)

    assert limit(model, 1_000_000) == engine.MALLOC_RECYCLED  # [J f]: 30.6 MiB
    assert limit(wide, 1_000_000) == 0
    assert limit(model, 10_000) == 0  # small: one heap is small anyway
    assert limit(model, 4_000_000) == 0  # [J f] alone is over the limit


def test_program_cache_keeps_at_most_cache_size_problems(monkeypatch):
    # Programs are kept per (problem, config) in a bounded cache: the oldest goes first, and a
    # problem still in the cache compiles nothing when it comes back.
    from nlsq_stream.solver import engine

    monkeypatch.setattr(engine._Program, "CACHE_SIZE", 2)
    monkeypatch.setattr(engine.solve, "_bound", {})
    models = [lambda x, a, b, c, k=k: a * jnp.exp(-b * x) + c + 0.0 * k for k in range(3)]
    x, y, p0 = data(5, m=35)
    fits = [curve_fit(f, x, y, p0=p0)[0] for f in models]
    assert len(engine.solve._bound) == 2
    assert [key[0].model for key in engine.solve._bound] == models[1:]
    with count_compiles() as compiles:
        again = curve_fit(models[2], x, y, p0=p0)[0]
    assert compiles == []
    np.testing.assert_allclose(again, fits[2], rtol=1e-12)
    with count_compiles() as compiles:
        curve_fit(models[0], x, y, p0=p0)  # it was dropped: compiled anew
    assert compiles


def test_a_batch_falls_back_too_when_xla_refuses_an_option(monkeypatch):
    from nlsq_stream.solver import batch as solver_batch
    from nlsq_stream.solver import engine

    if jax.default_backend() != "cpu":
        pytest.skip("the compiler options are CPU-only")
    monkeypatch.setattr(engine, "_CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option_b": True})
    monkeypatch.setattr(engine, "_REJECTED", [])
    solver_batch.programs.cache_clear()
    try:

        def fresh(x, a, b):  # a new function: its batch programs compile now
            return a * jnp.exp(-b * x)

        x = np.linspace(0.0, 4.0, 40)
        y = np.stack([2.0 * np.exp(-0.7 * x), 1.5 * np.exp(-0.3 * x)])
        res = curve_fit_batch(fresh, x, y, p0=[1.0, 1.0])
        np.testing.assert_allclose(res.popt, [[2.0, 0.7], [1.5, 0.3]], rtol=1e-8)
        assert engine.compiler_options() is None
    finally:
        solver_batch.programs.cache_clear()  # the next batch compiles with the options again
