"""Trust-region subproblem and step selection, all in parameter space (n-dimensional).

These are jittable versions of the algorithms scipy's TRF uses (Moré's exact subproblem solver and
the Coleman-Li reflective step selection of Branch, Coleman & Li 1999). Nothing here touches the
residual vector: the solver reduces the Jacobian to an n x n factor ``R`` (``R.T @ R == J.T @ J``)
once per evaluation, so every function below costs O(n^3) whatever the number of residuals.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import Array, lax


def solve_subproblem(
    uf: Array, s: Array, v: Array, delta: Array, alpha: Array, m: int, max_iter: int = 10
) -> tuple[Array, Array]:
    """Solve min ||J p + f|| subject to ||p|| <= delta, given the SVD of J.

    ``s`` and ``v`` are J's singular values and right singular vectors (columns), and ``uf`` is
    ``U.T @ f``. Returns the step and the Levenberg-Marquardt parameter found (used as the next
    initial guess), following Moré's algorithm as in scipy's ``solve_lsq_trust_region``.
    """
    n = s.shape[0]
    dtype = s.dtype
    eps = jnp.finfo(dtype).eps
    suf = s * uf
    if m >= n:
        full_rank = s[-1] > eps * m * s[0]
    else:
        full_rank = jnp.asarray(False)

    safe_s = jnp.where(s > 0, s, 1.0)
    p_gn = -v @ jnp.where(s > 0, uf / safe_s, 0.0)
    gn_ok = full_rank & (jnp.linalg.norm(p_gn) <= delta)

    def phi_and_derivative(a: Array) -> tuple[Array, Array]:
        denom = s**2 + a
        safe_denom = jnp.where(denom > 0, denom, 1.0)
        p_norm = jnp.linalg.norm(suf / safe_denom)
        safe_p_norm = jnp.where(p_norm > 0, p_norm, 1.0)
        phi = p_norm - delta
        phi_prime = -jnp.sum(suf**2 / safe_denom**3) / safe_p_norm
        return phi, phi_prime

    alpha_upper = jnp.linalg.norm(suf) / delta
    phi0, dphi0 = phi_and_derivative(jnp.zeros((), dtype))
    alpha_lower = jnp.where(full_rank, -phi0 / jnp.where(dphi0 != 0, dphi0, -1.0), 0.0)

    def restart_value(lo: Array, hi: Array) -> Array:
        return jnp.maximum(0.001 * hi, jnp.sqrt(jnp.maximum(lo * hi, 0.0)))

    use_restart = (~full_rank) & (alpha == 0)
    a0 = jnp.where(use_restart, restart_value(alpha_lower, alpha_upper), alpha)

    def cond(carry: tuple[Any, ...]) -> Array:
        i, _, _, _, done = carry
        return (i < max_iter) & ~done

    def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        i, a, lo, hi, _ = carry
        a = jnp.where((a < lo) | (a > hi), restart_value(lo, hi), a)
        phi, dphi = phi_and_derivative(a)
        hi = jnp.where(phi < 0, a, hi)
        ratio = phi / jnp.where(dphi != 0, dphi, -1.0)
        lo = jnp.maximum(lo, a - ratio)
        converged = jnp.abs(phi) < 0.01 * delta
        # scipy updates alpha and then breaks; the step below uses the updated value.
        a = a - (phi + delta) * ratio / delta
        return i + 1, a, lo, hi, converged

    # When the Gauss-Newton step fits in the region no iteration is needed (done from the start).
    _, a, _, _, _ = lax.while_loop(cond, body, (0, a0, alpha_lower, alpha_upper, gn_ok))
    denom = s**2 + a
    p = -v @ (suf / jnp.where(denom > 0, denom, 1.0))
    p_norm = jnp.linalg.norm(p)
    p = p * (delta / jnp.where(p_norm > 0, p_norm, 1.0))
    p = jnp.where(gn_ok, p_gn, p)
    return p, jnp.where(gn_ok, 0.0, a)


def quadratic(r_h: Array, g_h: Array, s: Array, diag: Array | None = None) -> Array:
    """Value of the model 0.5 s'(J'J + diag)s + g's, with ``r_h.T @ r_h == J'J``."""
    rs = r_h @ s
    q = rs @ rs
    if diag is not None:
        q = q + (s * diag) @ s
    return 0.5 * q + g_h @ s


def _quadratic_1d(
    r_h: Array, g_h: Array, s: Array, diag: Array, s0: Array
) -> tuple[Array, Array, Array]:
    """Coefficients a, b, c of the model along s0 + t s as a function of t."""
    v = r_h @ s
    u = r_h @ s0
    a = 0.5 * (v @ v + (s * diag) @ s)
    b = g_h @ s + u @ v + (s0 * diag) @ s
    c = 0.5 * (u @ u) + g_h @ s0 + 0.5 * (s0 * diag) @ s0
    return a, b, c


def _minimize_quadratic_1d(
    a: Array, b: Array, lo: Array, hi: Array, c: Array | float
) -> tuple[Array, Array]:
    safe_a = jnp.where(a != 0, a, 1.0)
    ext = -0.5 * b / safe_a
    ext_ok = (a != 0) & (lo < ext) & (ext < hi)
    t = jnp.stack([lo, hi, jnp.where(ext_ok, ext, lo)])
    y = t * (a * t + b) + c
    i = jnp.argmin(y)
    return t[i], y[i]


def step_size_to_bound(x: Array, s: Array, lb: Array, ub: Array) -> tuple[Array, Array]:
    """Smallest step t >= 0 along s that reaches a bound, and which components hit it (signed)."""
    nonzero = s != 0
    safe_s = jnp.where(nonzero, s, 1.0)
    steps = jnp.where(nonzero, jnp.maximum((lb - x) / safe_s, (ub - x) / safe_s), jnp.inf)
    min_step = jnp.min(steps)
    hits = jnp.where(steps == min_step, jnp.sign(s), 0.0)
    return min_step, hits


def _intersect_trust_region(x: Array, s: Array, delta: Array) -> tuple[Array, Array]:
    a = s @ s
    a = jnp.where(a > 0, a, 1.0)
    b = x @ s
    c = jnp.minimum(x @ x - delta**2, 0.0)
    d = jnp.sqrt(jnp.maximum(b * b - a * c, 0.0))
    q = -(b + jnp.where(b >= 0, d, -d))
    q = jnp.where(q != 0, q, -jnp.finfo(x.dtype).tiny)
    t1 = q / a
    t2 = c / q
    return jnp.minimum(t1, t2), jnp.maximum(t1, t2)


def in_bounds(x: Array, lb: Array, ub: Array) -> Array:
    return jnp.all((x >= lb) & (x <= ub))


def select_step(
    x: Array,
    jh: Array,
    diag_h: Array,
    g_h: Array,
    p: Array,
    p_h: Array,
    d: Array,
    delta: Array,
    lb: Array,
    ub: Array,
    theta: Array,
) -> tuple[Array, Array, Array]:
    """Choose among the trust-region step, its reflection, and the scaled gradient step.

    ``jh`` is the n x n factor of the scaled Jacobian. Returns ``(step, step_h,
    predicted_reduction)`` as scipy's TRF ``select_step`` does.
    """
    p_inside = in_bounds(x + p, lb, ub)
    p_value_full = quadratic(jh, g_h, p_h, diag_h)

    # Reflected direction from the point where p first hits a bound.
    p_stride, hits = step_size_to_bound(x, p, lb, ub)
    r_h = jnp.where(hits != 0, -p_h, p_h)
    r = d * r_h
    p_b = p * p_stride
    p_hb = p_h * p_stride
    _, to_tr = _intersect_trust_region(p_hb, r_h, delta)
    to_bound, _ = step_size_to_bound(x + p_b, r, lb, ub)
    r_stride = jnp.minimum(to_bound, to_tr)
    pos = r_stride > 0
    safe_rs = jnp.where(pos, r_stride, 1.0)
    r_lo = jnp.where(pos, (1 - theta) * p_stride / safe_rs, 0.0)
    r_hi = jnp.where(pos, jnp.where(r_stride == to_bound, theta * to_bound, to_tr), -1.0)
    a, b, c = _quadratic_1d(jh, g_h, r_h, diag_h, p_hb)
    t_r, r_value = _minimize_quadratic_1d(a, b, r_lo, r_hi, c)
    r_value = jnp.where(r_lo <= r_hi, r_value, jnp.inf)
    r_hs = r_h * t_r + p_hb
    r_s = r_hs * d

    # The truncated trust-region step, pulled strictly inside.
    p_t = p_b * theta
    p_ht = p_hb * theta
    p_value = quadratic(jh, g_h, p_ht, diag_h)

    # The scaled anti-gradient, truncated at the bound or the trust region.
    ag_h = -g_h
    ag = d * ag_h
    ag_norm = jnp.linalg.norm(ag_h)
    to_tr_ag = delta / jnp.where(ag_norm > 0, ag_norm, 1.0)
    to_bound_ag, _ = step_size_to_bound(x, ag, lb, ub)
    ag_stride = jnp.where(to_bound_ag < to_tr_ag, theta * to_bound_ag, to_tr_ag)
    a2, b2, _ = _quadratic_1d(jh, g_h, ag_h, diag_h, jnp.zeros_like(ag_h))
    t_ag, ag_value = _minimize_quadratic_1d(a2, b2, jnp.zeros_like(ag_stride), ag_stride, 0.0)

    use_p = (p_value < r_value) & (p_value < ag_value)
    use_r = (~use_p) & (r_value < p_value) & (r_value < ag_value)
    step = jnp.where(use_p, p_t, jnp.where(use_r, r_s, ag * t_ag))
    step_h = jnp.where(use_p, p_ht, jnp.where(use_r, r_hs, ag_h * t_ag))
    value = jnp.where(use_p, p_value, jnp.where(use_r, r_value, ag_value))

    step = jnp.where(p_inside, p, step)
    step_h = jnp.where(p_inside, p_h, step_h)
    value = jnp.where(p_inside, p_value_full, value)
    return step, step_h, -value


def cl_scaling(x: Array, g: Array, lb: Array, ub: Array) -> tuple[Array, Array]:
    """Coleman-Li scaling vector v and its derivative dv (scipy's ``CL_scaling_vector``)."""
    to_ub = (g < 0) & jnp.isfinite(ub)
    to_lb = (g > 0) & jnp.isfinite(lb)
    v = jnp.where(to_lb, x - lb, jnp.where(to_ub, ub - x, 1.0))
    dv = jnp.where(to_lb, 1.0, jnp.where(to_ub, -1.0, 0.0))
    return v, dv


def make_strictly_feasible(x: Array, lb: Array, ub: Array) -> Array:
    """Move components on or past a bound to the next representable value inside."""
    x_new = jnp.where(x <= lb, jnp.nextafter(lb, ub), x)
    x_new = jnp.where(x >= ub, jnp.nextafter(ub, lb), x_new)
    tight = (x_new < lb) | (x_new > ub)
    return jnp.where(tight, 0.5 * (lb + ub), x_new)


__all__ = [
    "cl_scaling",
    "in_bounds",
    "make_strictly_feasible",
    "quadratic",
    "select_step",
    "solve_subproblem",
    "step_size_to_bound",
]
