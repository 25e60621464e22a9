"""The reference async-logger API: device-side gating, hub delivery, stdlib fallback."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nlsq_stream as ns
from nlsq_stream.async_logger import is_jax_array, log_convergence_async, log_iteration_async


def _loop(verbose: int):
    @jax.jit
    def run(x):
        def body(i, x):
            log_iteration_async(i, jnp.sum(x**2), jnp.linalg.norm(x), message="m", verbose=verbose)
            return x * 0.9

        x = jax.lax.fori_loop(0, 25, body, x)
        log_convergence_async("done", 25, jnp.sum(x**2), 0.5, jnp.linalg.norm(x), verbose=1)
        return x

    return run


def test_is_jax_array():
    assert is_jax_array(jnp.ones(2))
    assert not is_jax_array(np.ones(2))
    assert not is_jax_array(3.0)
    seen = []
    jax.jit(lambda x: seen.append(is_jax_array(x)) or x)(jnp.ones(1))
    assert seen == [True]  # a tracer counts as a JAX array


@pytest.mark.parametrize(("verbose", "expected"), [(0, []), (1, [0, 10, 20]), (2, list(range(25)))])
def test_gating_on_device_falls_back_to_stdlib_logging(caplog, verbose, expected):
    caplog.set_level(logging.INFO, logger="nlsq_stream.async_logger")
    _loop(verbose)(jnp.ones(3)).block_until_ready()
    iters = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Iteration")]
    assert [int(m.split()[1].rstrip(":")) for m in iters] == expected
    assert any(r.getMessage().startswith("Converged: done after 25") for r in caplog.records)


def test_verbose_zero_compiles_no_callback():
    text = jax.jit(lambda x: (log_iteration_async(1, x, x, verbose=0), x)[1]).lower(1.0).as_text()
    assert "callback" not in text


def test_bad_verbose_is_rejected():
    with pytest.raises(ValueError, match="verbose"):
        log_iteration_async(0, 1.0, 1.0, verbose=3)


@pytest.mark.anyio
async def test_events_reach_hub_subscribers():
    import anyio

    run = _loop(1)
    run(jnp.ones(3)).block_until_ready()  # compile outside the subscription
    async with ns.subscribe() as sub:
        run(jnp.ones(3)).block_until_ready()
        got = []
        with anyio.fail_after(5):
            async for ev in sub:
                got.append(ev)
                if isinstance(ev, ns.FitFinished):
                    break
    assert [e.iteration for e in got if isinstance(e, ns.Iteration)] == [0, 10, 20]
    assert got[-1].result["nit"] == 25 and got[-1].fit_id == "async_logger"
