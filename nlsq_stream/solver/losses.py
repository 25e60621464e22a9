"""Robust loss functions rho(z), z = (f / f_scale)**2, as in scipy.optimize.least_squares.

Each loss returns ``(rho0, rho1, rho2)``: the value and the first two derivatives with respect to
``z``. The solver uses them to rescale residuals and Jacobian rows (Triggs' correction, the same as
scipy's ``scale_for_robust_loss_function``) so that the trust-region subproblem stays a linear least
squares problem.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax import Array

LOSSES: tuple[str, ...] = ("linear", "soft_l1", "huber", "cauchy", "arctan")

LossTriple = tuple[Array, Array, Array]


def _linear(z: Array) -> LossTriple:
    return z, jnp.ones_like(z), jnp.zeros_like(z)


def _soft_l1(z: Array) -> LossTriple:
    t = 1.0 + z
    st = jnp.sqrt(t)
    return 2.0 * (st - 1.0), 1.0 / st, -0.5 / (t * st)


def _huber(z: Array) -> LossTriple:
    inner = z <= 1.0
    # Guard the sqrt of the branch that is not taken so no NaN leaks into gradients.
    zs = jnp.where(inner, 1.0, z)
    sz = jnp.sqrt(zs)
    rho0 = jnp.where(inner, z, 2.0 * sz - 1.0)
    rho1 = jnp.where(inner, 1.0, 1.0 / sz)
    rho2 = jnp.where(inner, 0.0, -0.5 / (zs * sz))
    return rho0, rho1, rho2


def _cauchy(z: Array) -> LossTriple:
    t = 1.0 + z
    return jnp.log1p(z), 1.0 / t, -1.0 / (t * t)


def _arctan(z: Array) -> LossTriple:
    t = 1.0 + z * z
    return jnp.arctan(z), 1.0 / t, -2.0 * z / (t * t)


_TABLE: dict[str, Callable[[Array], LossTriple]] = {
    "linear": _linear,
    "soft_l1": _soft_l1,
    "huber": _huber,
    "cauchy": _cauchy,
    "arctan": _arctan,
}


def rho(loss: str, f: Array, f_scale: Array) -> LossTriple:
    """Loss value and derivatives at residuals ``f``, scaled as scipy scales them."""
    z = (f / f_scale) ** 2
    r0, r1, r2 = _TABLE[loss](z)
    return r0 * f_scale**2, r1, r2 / f_scale**2


def cost(loss: str, f: Array, f_scale: Array) -> Array:
    """Half the summed loss; ``0.5 * f @ f`` for the linear loss."""
    if loss == "linear":
        return 0.5 * jnp.sum(f * f)
    return 0.5 * jnp.sum(rho(loss, f, f_scale)[0])


def scale_residuals_and_jacobian(
    loss: str, f: Array, jt: Array, f_scale: Array
) -> tuple[Array, Array]:
    """Rescale ``f`` and the transposed Jacobian ``jt`` (n, m) for a robust loss.

    Returns ``(f_scaled, jt_scaled)`` such that the Gauss-Newton model of the scaled linear problem
    matches the second-order model of the robust cost.
    """
    if loss == "linear":
        return f, jt
    _, r1, r2 = rho(loss, f, f_scale)
    eps = jnp.finfo(f.dtype).eps
    j_scale = jnp.sqrt(jnp.maximum(r1 + 2.0 * r2 * f * f, eps))
    return f * (r1 / j_scale), jt * j_scale[None, :]
