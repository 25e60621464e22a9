"""scipy as the oracle: random well-posed fits must end at least as low as scipy's.

Three model families (exponential decay, Gaussian peak, rational function) with fixed data sizes,
so each (family, method, loss, bounds) combination compiles once and hypothesis reuses it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize as so
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import nlsq_stream
from nlsq_stream import curve_fit, least_squares

# Inherits conftest's hypothesis profile ("fixed": derandomized, the same examples everywhere).
SETTINGS = settings(max_examples=30)
LOSSES = ("linear", "soft_l1", "huber", "cauchy", "arctan")
COND_MAX = 1e6  # Jacobian condition number below which x itself must agree with scipy
FTOL = 1e-8  # the default ftol both solvers run with


# --- model families: jnp model, residual for least_squares, numpy model and Jacobian for scipy --


def exp_model(x, a, b, c):
    """a exp(-b x) + c."""
    return a * jnp.exp(-b * x) + c


def gauss_model(x, a, mu, s, c):
    """A Gaussian peak on a constant background."""
    return a * jnp.exp(-(((x - mu) / s) ** 2) / 2) + c


def rational_model(x, a, b, c):
    """(a + b x) / (1 + c x), used on x >= 0 with c > 0."""
    return (a + b * x) / (1 + c * x)


def exp_residual(p, x, y):
    return exp_model(x, *p) - y


def gauss_residual(p, x, y):
    return gauss_model(x, *p) - y


def rational_residual(p, x, y):
    return rational_model(x, *p) - y


def _np_exp(x, p):
    a, b, c = p
    e = np.exp(-b * x)
    return a * e + c, np.stack([e, -a * x * e, np.ones_like(x)], axis=1)


def _np_gauss(x, p):
    a, mu, s, c = p
    z = (x - mu) / s
    g = np.exp(-(z**2) / 2)
    return a * g + c, np.stack([g, a * g * z / s, a * g * z**2 / s, np.ones_like(x)], axis=1)


def _np_rational(x, p):
    a, b, c = p
    den = 1 + c * x
    return (a + b * x) / den, np.stack([1 / den, x / den, -(a + b * x) * x / den**2], axis=1)


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its residual, a numpy twin for scipy, data grid and parameter ranges."""

    name: str
    residual: Callable
    np_model: Callable  # (x, p) -> (model values, Jacobian)
    x: np.ndarray
    lo: tuple[float, ...]  # ranges the true parameters are drawn from
    hi: tuple[float, ...]
    p0_min: tuple[float, ...]  # floor for p0 (keeps a width or a pole parameter positive)


FAMILIES = {
    "exp": Family(
        name="exp",
        residual=exp_residual,
        np_model=_np_exp,
        x=np.linspace(0.0, 5.0, 40),
        lo=(0.5, 0.2, -1.0),
        hi=(5.0, 2.0, 1.0),
        p0_min=(-np.inf, 0.05, -np.inf),
    ),
    "gauss": Family(
        name="gauss",
        residual=gauss_residual,
        np_model=_np_gauss,
        x=np.linspace(-5.0, 5.0, 60),
        lo=(1.0, -2.0, 0.5, -1.0),
        hi=(5.0, 2.0, 2.0, 1.0),
        p0_min=(-np.inf, -np.inf, 0.3, -np.inf),
    ),
    "rational": Family(
        name="rational",
        residual=rational_residual,
        np_model=_np_rational,
        x=np.linspace(0.0, 4.0, 30),
        lo=(0.5, -2.0, 0.1),
        hi=(3.0, 2.0, 2.0),
        p0_min=(-np.inf, -np.inf, 0.05),
    ),
}


@dataclasses.dataclass
class Case:
    """One drawn problem: data, truth, start, bounds."""

    family: Family
    y: np.ndarray
    truth: np.ndarray
    p0: np.ndarray
    lb: np.ndarray
    ub: np.ndarray


unit = st.floats(0.0, 1.0)


@st.composite
def cases(draw, family: Family, bounded: bool = False, outliers: bool = False) -> Case:
    """A random problem of ``family``: truth, noisy data, p0 near the truth, optional bounds."""
    n = len(family.lo)
    lo, hi = np.array(family.lo), np.array(family.hi)
    truth = lo + (hi - lo) * np.array([draw(unit) for _ in range(n)])
    rel = np.array([draw(st.floats(-0.3, 0.3)) for _ in range(n)])
    shift = np.array([draw(st.floats(-0.2, 0.2)) for _ in range(n)])
    p0 = np.maximum(truth * (1 + rel) + shift, family.p0_min)
    noise = draw(st.sampled_from([0.0, 1e-3, 0.03, 0.2]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    y = family.np_model(family.x, truth)[0] + noise * rng.standard_normal(family.x.size)
    if outliers and draw(st.booleans()):
        idx = rng.choice(family.x.size, size=3, replace=False)
        y[idx] += rng.choice([-1.0, 1.0], size=3) * draw(st.floats(0.5, 3.0))
    lb = np.full(n, -np.inf)
    ub = np.full(n, np.inf)
    if bounded:
        for i in range(n):
            kind = draw(st.sampled_from(["none", "lower", "upper", "both"]))
            lo_i, hi_i = min(truth[i], p0[i]), max(truth[i], p0[i])
            if kind in ("lower", "both"):
                lb[i] = lo_i - draw(st.floats(0.01, 2.0))
            if kind in ("upper", "both"):
                ub[i] = hi_i + draw(st.floats(0.01, 2.0))
        if draw(st.booleans()):  # a tight bound that cuts off the truth: active at the solution
            k = draw(st.integers(0, n - 1))
            gap = draw(st.floats(0.05, 0.3)) * (abs(truth[k]) + 0.5)
            inside = draw(st.floats(0.1, 1.0))
            if draw(st.booleans()):
                ub[k] = truth[k] - gap
                lb[k] = min(lb[k], ub[k] - 2 * inside)
                p0[k] = ub[k] - inside
            else:
                lb[k] = truth[k] + gap
                ub[k] = max(ub[k], lb[k] + 2 * inside)
                p0[k] = lb[k] + inside
            p0 = np.maximum(p0, family.p0_min)
            assume(np.all(p0 > lb) and np.all(p0 < ub))
    return Case(family, y, truth, p0, lb, ub)


# --- running both solvers and judging the result --------------------------------------------


def _rho(loss: str, z: np.ndarray) -> np.ndarray:
    """scipy's loss functions rho(z), z = (f / f_scale) ** 2."""
    if loss == "linear":
        return z
    if loss == "soft_l1":
        return 2 * (np.sqrt(1 + z) - 1)
    if loss == "huber":
        return np.where(z <= 1, z, 2 * np.sqrt(z) - 1)
    if loss == "cauchy":
        return np.log1p(z)
    return np.arctan(z)


def _cost(case: Case, p: np.ndarray, loss: str, f_scale: float) -> float:
    """The robust cost at ``p``, computed the same way for both solvers."""
    f = case.family.np_model(case.family.x, p)[0] - case.y
    return float(0.5 * f_scale**2 * np.sum(_rho(loss, (f / f_scale) ** 2)))


def _fit_both(case: Case, method: str, loss="linear", f_scale=1.0, x_scale=1.0):
    """Fit with nlsq_stream and with scipy under the same options; discard scipy failures."""
    fam = case.family
    bounds = (case.lb, case.ub)

    def sp_fun(p):
        return fam.np_model(fam.x, p)[0] - case.y

    def sp_jac(p):
        return fam.np_model(fam.x, p)[1]

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = so.least_squares(
            sp_fun,
            case.p0,
            jac=sp_jac,
            bounds=bounds,
            method=method,
            loss=loss,
            f_scale=f_scale,
            x_scale=x_scale,
        )
    scipy_ok = ref.status > 0 and np.all(np.isfinite(ref.x))
    if currently_in_test_context():
        assume(scipy_ok)
    assert scipy_ok, ref.message
    ours = least_squares(
        fam.residual,
        case.p0,
        bounds=bounds,
        method=method,
        loss=loss,
        f_scale=f_scale,
        x_scale=x_scale,
        args=(fam.x, case.y),
    )
    return ours, ref


def _event(name: str) -> None:
    """Count ``name`` in hypothesis' statistics (when inside a hypothesis test)."""
    if currently_in_test_context():
        event(name)


def _check(case: Case, ours, ref, loss="linear", f_scale=1.0) -> None:
    """Our cost is no higher than scipy's; on well-conditioned, unconstrained optima x agrees."""
    assert ours.success, ours.message
    x = np.asarray(ours.x)
    assert np.all(x >= case.lb) and np.all(x <= case.ub)
    c_ours = _cost(case, x, loss, f_scale)
    c_ref = _cost(case, ref.x, loss, f_scale)
    assert ours.cost == pytest.approx(c_ours, rel=1e-9, abs=1e-14)
    assert c_ours <= c_ref * (1 + 1e-8) + 1e-12 * (1 + c_ref), (c_ours, c_ref, x, ref.x)
    free = not np.any(ref.active_mask) and not np.any(ours.active_mask)
    _event("bound active" if not free else "no bound active")
    sv = np.linalg.svd(ref.jac, compute_uv=False)
    if free and sv[-1] > sv[0] / COND_MAX:
        _event("x compared")
        # Both stop once a step gains less than ftol * cost, so each may sit up to about
        # sqrt(2 * gap) / sigma_min from the minimum (gap: the cost still to gain, ~10 ftol cost).
        slack = 2 * np.sqrt(2 * 10 * FTOL * c_ref) / sv[-1]
        assert np.linalg.norm(x - ref.x) <= 1e-5 * np.linalg.norm(ref.x) + slack, (x, ref.x)


family_param = pytest.mark.parametrize("name", sorted(FAMILIES))


@family_param
@SETTINGS
@given(data=st.data())
def test_trf_unbounded(name, data):
    """TRF without bounds, with unit and Jacobian variable scaling."""
    case = data.draw(cases(FAMILIES[name]))
    x_scale = data.draw(st.sampled_from([1.0, "jac"]))
    ours, ref = _fit_both(case, "trf", x_scale=x_scale)
    _check(case, ours, ref)


@family_param
@SETTINGS
@given(data=st.data())
def test_trf_bounded(name, data):
    """TRF with bounds around truth and p0, sometimes cutting the truth off (active bound)."""
    case = data.draw(cases(FAMILIES[name], bounded=True))
    assume(np.any(np.isfinite(case.lb)) or np.any(np.isfinite(case.ub)))
    x_scale = data.draw(st.sampled_from([1.0, "jac"]))
    ours, ref = _fit_both(case, "trf", x_scale=x_scale)
    _check(case, ours, ref)


@family_param
@SETTINGS
@given(data=st.data())
def test_lm(name, data):
    """Levenberg-Marquardt against MINPACK, with unit and Jacobian variable scaling."""
    case = data.draw(cases(FAMILIES[name]))
    x_scale = data.draw(st.sampled_from([1.0, "jac"]))
    ours, ref = _fit_both(case, "lm", x_scale=x_scale)
    _check(case, ours, ref)


@family_param
@pytest.mark.parametrize("loss", LOSSES)
@settings(SETTINGS, max_examples=12)
@given(data=st.data())
def test_robust_loss(name, loss, data):
    """Each robust loss with a drawn f_scale, on data that sometimes has outliers."""
    case = data.draw(cases(FAMILIES[name], bounded=data.draw(st.booleans()), outliers=True))
    f_scale = data.draw(st.floats(0.05, 2.0))
    ours, ref = _fit_both(case, "trf", loss=loss, f_scale=f_scale)
    _check(case, ours, ref, loss, f_scale)


# --- curve_fit against scipy.optimize.curve_fit on fixed cases ------------------------------

X = np.linspace(0.0, 5.0, 40)
Y = 2.5 * np.exp(-0.7 * X) + 0.3 + 0.02 * np.sin(5 * X)
P0 = [2.0, 1.0, 0.0]


def np_exp_model(x, a, b, c):
    return a * np.exp(-b * x) + c


def np_exp_jac(x, a, b, c):
    return _np_exp(x, (a, b, c))[1]


def two_predictor_model(xx, a, b, c):
    """a exp(-b x1) + c x2, with xdata a pair (x1, x2)."""
    return a * jnp.exp(-b * xx[0]) + c * xx[1]


def np_two_predictor_model(xx, a, b, c):
    return a * np.exp(-b * xx[0]) + c * xx[1]


def np_two_predictor_jac(xx, a, b, c):
    e = np.exp(-b * xx[0])
    return np.stack([e, -a * xx[0] * e, xx[1]], axis=1)


EPS = np.finfo(float).eps
CF_FTOL = CF_XTOL = 1e-8  # curve_fit's default ftol and xtol, in both libraries


@dataclasses.dataclass(frozen=True)
class CurveFitProblem:
    """A curve_fit problem in numpy: the model, its analytic Jacobian, data and weights."""

    model: Callable  # model(xdata, *p)
    jac: Callable  # jac(xdata, *p): the model's (m, n) Jacobian
    xdata: object
    ydata: np.ndarray
    sigma: np.ndarray | None = None
    absolute_sigma: bool = False

    def _whiten(self, a: np.ndarray) -> np.ndarray:
        """What both libraries fit: rows divided by a 1-D sigma, or by L for sigma = L L'."""
        if self.sigma is None:
            return a
        if self.sigma.ndim == 1:
            return (a.T / self.sigma).T
        return scipy.linalg.solve_triangular(np.linalg.cholesky(self.sigma), a, lower=True)

    def residual(self, p: np.ndarray) -> np.ndarray:
        return self._whiten(self.model(self.xdata, *p) - self.ydata)

    def jacobian(self, p: np.ndarray) -> np.ndarray:
        return self._whiten(self.jac(self.xdata, *p))

    def s2(self, p: np.ndarray) -> float:
        """The factor pcov carries: the residual variance, or 1 with absolute_sigma."""
        if self.absolute_sigma:
            return 1.0
        f = self.residual(p)
        return float(f @ f) / (f.size - len(p))

    def scipy_fit(self, p0, **kw):
        """scipy's curve_fit, given the exact Jacobian: its default forward differences carry a
        relative error of ~sqrt(eps) in J, which its pcov inherits times cond(J) (~1e-7 here),
        an error of the reference and not of ours."""
        return so.curve_fit(
            self.model,
            self.xdata,
            self.ydata,
            p0=p0,
            sigma=self.sigma,
            absolute_sigma=self.absolute_sigma,
            jac=self.jac,
            **kw,
        )


def _pinv_gram(J: np.ndarray) -> np.ndarray:
    """pinv(J'J) by SVD, dropping singular values below eps * max(m, n) * s_max, as both do."""
    _, s, vt = np.linalg.svd(J, full_matrices=False)
    keep = s > EPS * max(J.shape) * s[0]
    return (vt[keep].T / s[keep] ** 2) @ vt[keep]


def _assert_fit_matches(ours, ref, problem: CurveFitProblem, method: str) -> None:
    """popt agrees with scipy's; pcov is s2 pinv(J'J) at popt, and agrees with scipy's pcov to
    within what scipy's own stopping rule leaves open. Every pcov entry is judged relative to
    sqrt(pcov_ii pcov_jj), its natural scale (a correlation, for the off-diagonal ones).

    Tolerances, derived from the problem at hand:

    * rounding: pcov is s2 (a sum of m squares: relative error <= m eps) times pinv(J'J) from an
      SVD of the whitened J (m x n; backward error ~ max(m, n) eps, which pinv(J'J) amplifies by
      kappa^2, kappa the condition number of J with unit columns, which is what the natural
      scale divides out): rho = (m + max(m, n) kappa^2) eps of an entry's scale per computation,
      2 rho between two computations of it.
    * moved: a pcov computed from the Jacobian at a point a distance r away (in ||J .||) differs
      by at most r * ||dpcov/du|| to first order, over directions u with ||J u|| = 1 (derivatives
      by central differences along J's right singular vectors divided by the singular value).
      r is ||J (popt - scipy's popt)||, and for lm also MINPACK's last step: its pcov uses the
      Jacobian of the iterate *before* that step. MINPACK stops once that step's predicted
      reduction is <= ftol (so ||J p|| <= sqrt(ftol) ||f||) or it is <= xtol ||D x|| (D: column
      norms of J), so r_lm <= max(sqrt(ftol) ||f||, ||J D^-1|| xtol ||D x||): ~1e-5 of the natural
      scale for the fits here, where the last step actually moved scipy's pcov by ~1e-6.
    * s2: each side's residual variance at its own popt (measured).
    """
    popt, pcov = np.asarray(ours[0]), np.asarray(ours[1])
    np.testing.assert_allclose(popt, ref[0], rtol=1e-7)
    J = problem.jacobian(popt)
    m, n = J.shape
    s2 = problem.s2(popt)
    exact = s2 * _pinv_gram(J)
    sd = np.sqrt(np.diag(exact))
    scale = np.outer(sd, sd)
    live = sd > 0  # a parameter without effect has a zero column in J and zero pcov row/column
    col_norms = np.linalg.norm(J[:, live], axis=0)
    kappa = np.linalg.cond(J[:, live] / col_norms)
    rounding = 2 * (m + max(m, n) * kappa**2) * EPS * scale
    np.testing.assert_array_less(np.abs(pcov - exact), rounding + 1e-300)

    r = float(np.linalg.norm(J @ (ref[0] - popt)))
    if method == "lm":
        f = problem.residual(popt)
        ftol_step = np.sqrt(CF_FTOL) * np.linalg.norm(f)
        xtol_step = (
            np.linalg.norm(J[:, live] / col_norms, 2)
            * CF_XTOL
            * np.linalg.norm(col_norms * popt[live])
        )
        r += max(ftol_step, xtol_step)
    _, s, vt = np.linalg.svd(J, full_matrices=False)
    keep = s > EPS * max(m, n) * s[0]
    derivs = []
    for s_l, v_l in zip(s[keep], vt[keep], strict=True):
        u = v_l / s_l  # ||J u|| = 1
        h = 1e-6 * np.linalg.norm(popt) / np.linalg.norm(u)
        up, down = (s2 * _pinv_gram(problem.jacobian(popt + t * u)) for t in (h, -h))
        derivs.append((up - down) / (2 * h))
    moved = r * np.sqrt(np.sum(np.square(derivs), axis=0))
    s2_gap = abs(problem.s2(ref[0]) / s2 - 1) * np.abs(exact)
    np.testing.assert_array_less(np.abs(pcov - ref[1]), moved + s2_gap + rounding + 1e-300)


@pytest.mark.parametrize("method", ["lm", "trf"])
@pytest.mark.parametrize("absolute_sigma", [False, True])
def test_curve_fit_sigma_1d(method, absolute_sigma):
    """1-D sigma (standard deviations), relative and absolute."""
    sigma = 0.01 + 0.02 * X
    ours = curve_fit(
        exp_model, X, Y, p0=P0, sigma=sigma, absolute_sigma=absolute_sigma, method=method
    )
    problem = CurveFitProblem(np_exp_model, np_exp_jac, X, Y, sigma, absolute_sigma)
    _assert_fit_matches(ours, problem.scipy_fit(P0, method=method), problem, method)


@pytest.mark.parametrize("absolute_sigma", [False, True])
def test_curve_fit_sigma_2d(absolute_sigma):
    """A 2-D covariance sigma with correlated errors."""
    idx = np.arange(X.size)
    cov = 1e-4 * 0.5 ** np.abs(idx[:, None] - idx[None, :]) + 1e-5 * np.eye(X.size)
    ours = curve_fit(exp_model, X, Y, p0=P0, sigma=cov, absolute_sigma=absolute_sigma, method="trf")
    problem = CurveFitProblem(np_exp_model, np_exp_jac, X, Y, cov, absolute_sigma)
    _assert_fit_matches(ours, problem.scipy_fit(P0, method="trf"), problem, "trf")


@pytest.mark.parametrize("bounded", [False, True])
def test_curve_fit_two_predictors(bounded):
    """xdata as a tuple of two arrays."""
    x1 = np.linspace(0.0, 3.0, 35)
    x2 = np.cos(x1) + 0.1 * x1
    y = 1.5 * np.exp(-0.4 * x1) - 0.8 * x2 + 0.01 * np.sin(9 * x1)
    bounds = ([0, 0, -2], [5, 5, 2]) if bounded else (-np.inf, np.inf)
    ours = curve_fit(two_predictor_model, (x1, x2), y, p0=[1.0, 1.0, 0.0], bounds=bounds)
    problem = CurveFitProblem(np_two_predictor_model, np_two_predictor_jac, np.stack([x1, x2]), y)
    ref = problem.scipy_fit([1.0, 1.0, 0.0], bounds=bounds)
    _assert_fit_matches(ours, ref, problem, "trf" if bounded else "lm")  # both default to these


@pytest.mark.parametrize("method", ["lm", "trf"])
def test_curve_fit_full_output(method):
    """full_output returns (popt, pcov, infodict, mesg, ier) like scipy."""
    sigma = np.full(X.size, 0.05)
    ours = curve_fit(exp_model, X, Y, p0=P0, sigma=sigma, method=method, full_output=True)
    problem = CurveFitProblem(np_exp_model, np_exp_jac, X, Y, sigma)
    ref = problem.scipy_fit(P0, method=method, full_output=True)
    assert len(ours) == len(ref) == 5
    _assert_fit_matches(ours, ref, problem, method)
    info, mesg, ier = ours[2:]
    assert {"nfev", "fvec"} <= set(info)
    assert info["nfev"] >= 1
    np.testing.assert_allclose(info["fvec"], ref[2]["fvec"], rtol=1e-6, atol=1e-9)
    assert isinstance(mesg, str) and mesg
    assert ier in (1, 2, 3, 4)


@pytest.mark.parametrize("method", ["lm", "trf"])
def test_pcov_inf_when_as_many_points_as_parameters(method):
    """m == n: the residual variance is undefined, so pcov is inf with an OptimizeWarning."""
    x = np.array([0.0, 1.0, 2.0])
    y = np_exp_model(x, 3.0, 0.5, 1.0)
    with pytest.warns(nlsq_stream.OptimizeWarning, match="Covariance"):
        popt, pcov = curve_fit(exp_model, x, y, p0=[2.0, 1.0, 0.5], method=method)
    with pytest.warns(so.OptimizeWarning):
        _, ref_pcov = so.curve_fit(np_exp_model, x, y, p0=[2.0, 1.0, 0.5], method=method)
    assert pcov.shape == (3, 3) and np.all(np.isinf(pcov)) and np.all(np.isinf(ref_pcov))
    np.testing.assert_allclose(popt, [3.0, 0.5, 1.0], rtol=1e-6)


def unused_parameter_model(x, a, b):
    """``b`` has no effect: the Jacobian has a zero column."""
    return a * jnp.exp(-0.5 * x) + 0.0 * b


def np_unused_parameter_model(x, a, b):
    return a * np.exp(-0.5 * x) + 0.0 * b


def np_unused_parameter_jac(x, a, b):
    return np.stack([np.exp(-0.5 * x), np.zeros_like(x)], axis=1)


UNUSED_X = np.linspace(0.0, 4.0, 20)
UNUSED_Y = 3.0 * np.exp(-0.5 * UNUSED_X) + 0.01 * np.cos(7 * UNUSED_X)


def test_lm_converges_with_parameter_without_effect():
    """lm with a zero Jacobian column still finds the optimum of the parameters that matter."""
    fam = Family(
        name="unused",
        residual=lambda p, x, y: unused_parameter_model(x, *p) - y,
        np_model=lambda x, p: (
            np_unused_parameter_model(x, *p),
            np.stack([np.exp(-0.5 * x), np.zeros_like(x)], axis=1),
        ),
        x=UNUSED_X,
        lo=(),
        hi=(),
        p0_min=(),
    )
    inf = np.full(2, np.inf)
    case = Case(fam, UNUSED_Y, np.array([3.0, 1.0]), np.array([1.0, 1.0]), -inf, inf)
    ours, ref = _fit_both(case, "lm")
    _check(case, ours, ref)
    assert ours.x[0] == pytest.approx(ref.x[0], rel=1e-5)


def test_pcov_for_parameter_without_effect_lm_matches_trf():
    """A deliberate difference from scipy: scipy's lm (MINPACK) reports a singular J'J as inf with
    a warning, while every method here uses the pseudo-inverse, as scipy's trf does, so lm and trf
    give the same finite pcov with a zero row and column for the idle parameter."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, pcov_lm = curve_fit(
            unused_parameter_model, UNUSED_X, UNUSED_Y, p0=[1.0, 1.0], method="lm"
        )
        _, pcov_trf = curve_fit(
            unused_parameter_model, UNUSED_X, UNUSED_Y, p0=[1.0, 1.0], method="trf"
        )
    np.testing.assert_allclose(pcov_lm, pcov_trf, rtol=1e-6)
    assert pcov_lm[1, 1] == 0.0 and pcov_lm[0, 0] > 0


def test_pcov_for_parameter_without_effect_trf():
    """trf: like scipy, the pseudo-inverse gives a finite pcov with a zero row and column."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = (UNUSED_X, UNUSED_Y)
        ours = curve_fit(unused_parameter_model, *args, p0=[1.0, 1.0], method="trf")
        problem = CurveFitProblem(np_unused_parameter_model, np_unused_parameter_jac, *args)
        ref = problem.scipy_fit([1.0, 1.0], method="trf")
    _assert_fit_matches(ours, ref, problem, "trf")
    assert ours[1][1, 1] == 0.0 and ours[1][0, 0] > 0
