"""The model and data that the hidden set-up of several documentation pages shares.

Importing them from one module gives every page the same function object, so a solver compiled
for it on one page is reused on the next (a new function object would compile again; see
optimize.rst). The visible examples define the same model and data themselves.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def model(x, a, b, c):
    return a * jnp.exp(-b * x) + c


x = np.linspace(0, 5, 200)
y = 2.5 * np.exp(-1.3 * x) + 0.5 + 0.01 * np.random.default_rng(0).standard_normal(x.size)
