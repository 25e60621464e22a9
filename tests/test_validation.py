"""Bad input is refused with a clear error that names the argument, before anything is compiled.

Every failing call runs under ``rejected``: it asserts the exception type and message, and that no
XLA backend compilation happened during the call (counted through ``jax.monitoring``). The data
sizes here are used by no other test module, so a fit that did start would have to compile.
"""

from __future__ import annotations

import contextlib

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_compiles

from nlsq_stream import curve_fit, least_squares

M = 17  # points; unique to this module (see the module docstring)
X = np.linspace(0.0, 4.0, M)
Y = 2.0 * np.exp(-0.5 * X) + 0.5
P0 = [1.0, 1.0, 0.0]


def model(x, a, b, c):
    """a exp(-b x) + c."""
    return a * jnp.exp(-b * x) + c


def residual(p):
    """Residuals of ``model`` on the module's data, for least_squares."""
    return model(X, *p) - Y


@contextlib.contextmanager
def rejected(exc: type[Exception] | tuple[type[Exception], ...], match: str):
    """Expect ``exc`` with a message matching ``match``, raised before any compilation."""
    with count_compiles() as compiles, pytest.raises(exc, match=match):
        yield
    assert compiles == [], f"compiled before refusing the input: {compiles}"


def test_listener_sees_compilation():
    """Positive control: a valid fit of a new shape does fire backend_compile events."""
    with count_compiles() as compiles:
        curve_fit(model, X[:-2], Y[:-2], p0=P0)
    assert compiles


# --- curve_fit ----------------------------------------------------------------------------


def test_xdata_ydata_different_lengths():
    with rejected(ValueError, r"`xdata` and `ydata` have different lengths"):
        curve_fit(model, X[:-1], Y, p0=P0)


def test_empty_ydata():
    with rejected(ValueError, r"`ydata` must not be empty"):
        curve_fit(model, [], [], p0=P0)


def test_empty_xdata():
    with rejected(ValueError, r"`xdata` must not be empty"):
        curve_fit(model, np.array([]), Y, p0=P0)


def test_nan_in_ydata():
    y = Y.copy()
    y[3] = np.nan
    with rejected(ValueError, r"`ydata` must not contain NaN or inf"):
        curve_fit(model, X, y, p0=P0, check_finite=True)


def test_inf_in_xdata():
    x = X.copy()
    x[5] = np.inf
    with rejected(ValueError, r"`xdata` must not contain NaN or inf"):
        curve_fit(model, x, Y, p0=P0)


def test_inf_in_one_of_two_predictors():
    x2 = X.copy()
    x2[0] = -np.inf
    with rejected(ValueError, r"`xdata\[1\]` must not contain NaN or inf"):
        curve_fit(lambda xx, a, b, c: a * xx[0] + b * xx[1] + c, (X, x2), Y, p0=P0)


def test_nan_and_inf_in_jax_arrays_name_the_argument():
    """JAX arrays are checked on the device, all in one computation; the message still names
    the argument that holds the NaN or inf."""
    # Not ``rejected``: checking a JAX array is itself a compiled computation.
    y = jnp.asarray(Y).at[3].set(jnp.nan)
    with pytest.raises(ValueError, match=r"`ydata` must not contain NaN or inf"):
        curve_fit(model, jnp.asarray(X), y, p0=P0)
    x2 = jnp.asarray(X).at[0].set(-jnp.inf)
    with pytest.raises(ValueError, match=r"`xdata\[1\]` must not contain NaN or inf"):
        curve_fit(lambda xx, a, b, c: a * xx[0] + b * xx[1] + c, (X, x2), jnp.asarray(Y), p0=P0)
    popt, _ = curve_fit(model, jnp.asarray(X), jnp.asarray(Y), p0=P0)  # finite: fits
    assert np.all(np.isfinite(popt))


@pytest.mark.parametrize("p0", [[1.0, 1.0], [1.0, 1.0, 0.0, 0.0]], ids=["short", "long"])
def test_p0_wrong_length(p0):
    with rejected((TypeError, ValueError), r"p0|parameters"):
        curve_fit(model, X, Y, p0=p0)


def test_p0_wrong_length_for_bounds():
    """With array bounds too, the p0 check (which runs first) names p0 and the counts."""
    with rejected(ValueError, r"`p0` has 2 values but the model .* takes 3 parameters"):
        curve_fit(model, X, Y, p0=[1.0, 1.0], bounds=([0, 0, 0], [5, 5, 5]))


def test_p0_outside_bounds():
    with rejected(ValueError, r"`p0` is outside the bounds: p0\[2\]"):
        curve_fit(model, X, Y, p0=[1.0, 1.0, 10.0], bounds=(-5, 5))


@pytest.mark.parametrize("upper", [2.0, 1.0], ids=["equal", "below"])
def test_lower_bound_not_below_upper(upper):
    with rejected(ValueError, r"`bounds`.*lower bound must be strictly less.*parameter 2"):
        curve_fit(model, X, Y, p0=[1.0, 1.0, 1.5], bounds=([0, 0, 2.0], [5, 5, upper]))


def test_lm_with_bounds():
    with rejected(ValueError, r"`method`='lm'.*`bounds`"):
        curve_fit(model, X, Y, p0=P0, bounds=(-5, 5), method="lm")


def test_lm_fewer_points_than_parameters():
    with rejected(ValueError, r"`method`='lm' needs at least as many data points as parameters"):
        curve_fit(model, X[:2], Y[:2], p0=P0, method="lm")


def test_model_not_callable():
    with rejected(TypeError, r"`f` must be callable"):
        curve_fit("a*exp(-b*x)+c", X, Y, p0=P0)


@pytest.mark.parametrize(
    "bad",
    [lambda x, a, b, c: jnp.stack([x, x]) * a, lambda x, a, b, c: a + b + c + 0 * x[:3]],
    ids=["2-D", "too-short"],
)
def test_model_output_wrong_shape(bad):
    with rejected(ValueError, rf"`f` must return one value per data point, shape \({M},\)"):
        curve_fit(bad, X, Y, p0=P0)


@pytest.mark.parametrize("shape", [(5,), (M, 2), (M + 1, M + 1)])
def test_sigma_wrong_shape(shape):
    with rejected(ValueError, r"`sigma` must have shape"):
        curve_fit(model, X, Y, p0=P0, sigma=np.ones(shape))


@pytest.mark.parametrize("value", [0.0, -1.0, np.nan], ids=["zero", "negative", "nan"])
def test_sigma_not_positive(value):
    sigma = np.ones(M)
    sigma[4] = value
    with rejected(ValueError, r"`sigma` must be positive and finite"):
        curve_fit(model, X, Y, p0=P0, sigma=sigma)


def test_sigma_covariance_not_positive_definite():
    with rejected(ValueError, r"`sigma`.*positive definite"):
        curve_fit(model, X, Y, p0=P0, sigma=-np.eye(M))


def test_unknown_loss():
    with rejected(ValueError, r"`loss` must be one of .*got 'l1'"):
        curve_fit(model, X, Y, p0=P0, method="trf", loss="l1")


def test_unknown_method():
    with rejected(ValueError, r"`method` must be one of .*got 'dogbox'"):
        curve_fit(model, X, Y, p0=P0, method="dogbox")


# --- least_squares ------------------------------------------------------------------------


def test_ls_x0_outside_bounds():
    with rejected(ValueError, r"`x0` is outside the bounds: x0\[0\]"):
        least_squares(residual, [9.0, 1.0, 0.0], bounds=(-5, 5))


@pytest.mark.parametrize(
    "x_scale",
    [[1.0, -1.0, 1.0], [1.0, 0.0, 1.0], [1.0, np.inf, 1.0], "auto", [1.0, 1.0]],
    ids=["negative", "zero", "inf", "unknown-string", "wrong-length"],
)
def test_ls_x_scale_invalid(x_scale):
    with rejected(ValueError, r"`x_scale` must"):
        least_squares(residual, P0, x_scale=x_scale)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_ls_x0_not_finite(bad):
    with rejected(ValueError, r"`x0` must be finite"):
        least_squares(residual, [1.0, bad, 0.0])


def test_ls_fun_returns_2d():
    with rejected(ValueError, r"`fun` must return a 1-D array of residuals, got shape \(3, 3\)"):
        least_squares(lambda p: jnp.outer(p, p), P0)


def test_ls_fun_not_callable():
    with rejected(TypeError, r"`fun` must be callable"):
        least_squares(np.ones(3), P0)


def test_ls_unknown_loss():
    with rejected(ValueError, r"`loss` must be one of"):
        least_squares(residual, P0, loss="l2")


def test_ls_unknown_method():
    with rejected(ValueError, r"`method` must be one of"):
        least_squares(residual, P0, method="dogbox")


def test_ls_lm_with_bounds():
    with rejected(ValueError, r"`method`='lm'.*`bounds`"):
        least_squares(residual, P0, method="lm", bounds=(-5, 5))


def test_ls_lm_fewer_residuals_than_parameters():
    with rejected(ValueError, r"`method`='lm' needs at least as many residuals as parameters"):
        least_squares(lambda p: residual(p)[:2], P0, method="lm")


def test_ls_lower_bound_not_below_upper():
    with rejected(ValueError, r"`bounds`.*lower bound must be strictly less.*parameter 1"):
        least_squares(residual, P0, bounds=([0, 1, -1], [5, 1, 1]))


@pytest.mark.parametrize(
    "values, dtype, finite",
    [
        ([1.0, 2.0], np.float64, True),
        ([1e308, 1e308], np.float64, True),  # the sum overflows: min and max decide
        ([6e4, 6e4], np.float16, True),
        ([1.0, np.nan], np.float64, False),
        ([np.inf, 1.0], np.float32, False),
        ([-np.inf, np.inf], np.float64, False),  # the sum is NaN
        ([1, 2], np.int64, True),
    ],
)
def test_all_finite_answers_exactly_and_silently(values, dtype, finite):
    import warnings

    from nlsq_stream.solver.validate import all_finite

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value RuntimeWarning leaks out
        assert all_finite(np.array(values, dtype)) is finite
        assert all_finite(np.tile(np.array(values, dtype), (3, 40))) is finite


@pytest.mark.parametrize("n", [3, 40])  # a few parameters are checked in Python, many by numpy
def test_p0_not_finite_any_size(n):
    p0 = np.ones(n)
    p0[-1] = np.nan
    with rejected(ValueError, r"`x0` must be finite"):
        least_squares(lambda p: p - 1.0, p0)


def test_default_bounds_are_shared_read_only_arrays():
    from nlsq_stream.solver.validate import prepare_bounds

    lb, ub = prepare_bounds((-np.inf, np.inf), 3, np.dtype(np.float64))
    assert prepare_bounds((-np.inf, np.inf), 3, np.dtype(np.float64))[0] is lb
    assert lb.tolist() == [-np.inf] * 3 and ub.tolist() == [np.inf] * 3
    with pytest.raises(ValueError, match="read-only"):
        lb[0] = 0.0


# --- planned calls: a second call of the same kind checks its values as the first did --------


def _planned(x=X, y=Y, p0=P0, **kwargs):
    """Fit once with valid values, so that calls of this kind have a plan (``_PLANS``)."""
    from nlsq_stream.solver.curve_fit import _PLANS

    curve_fit(model, x, y, p0=p0, **kwargs)
    assert any(key[0] is model for key in _PLANS)


@pytest.mark.parametrize(
    ("which", "match"),
    [
        ("ydata", r"`ydata` must not contain NaN or inf"),
        ("xdata", r"`xdata` must not contain NaN or inf"),
        ("p0", r"`p0` must be finite"),
    ],
)
def test_a_planned_call_still_checks_every_value(which, match):
    _planned(check_finite=True)
    x, y, p0 = X.copy(), Y.copy(), np.array(P0)
    {"xdata": x, "ydata": y, "p0": p0}[which][1] = np.inf
    with rejected(ValueError, match):
        curve_fit(model, x, y, p0=p0 if which == "p0" else P0, check_finite=True)


def test_a_planned_call_still_checks_p0_against_the_bounds():
    _planned(p0=[1.0, 1.0, 0.5], bounds=(0.0, 10.0))
    with rejected(ValueError, r"`p0` is outside the bounds: p0\[2\] = -1.0"):
        curve_fit(model, X, Y, p0=[1.0, 1.0, -1.0], bounds=(0.0, 10.0))


def test_a_plan_serves_only_calls_of_its_kind():
    """Other shapes, keywords or argument types go through every check again."""
    _planned()
    with rejected(ValueError, r"`p0` has 2 values but the model"):
        curve_fit(model, X, Y, p0=[1.0, 1.0])
    with rejected(ValueError, r"`xdata` and `ydata` have different lengths"):
        curve_fit(model, X[:-1], Y, p0=P0)
    with rejected(ValueError, r"At least one of `ftol`, `xtol`, `gtol` must be positive"):
        curve_fit(model, X, Y, p0=P0, ftol=0.0, xtol=0.0, gtol=0.0)
    with rejected(TypeError, r"`ydata` must hold real numbers"):
        curve_fit(model, X, Y.astype(complex), p0=P0)


def test_a_plan_changes_no_answer():
    """Fits of new data through a plan equal the same fits checked in full, bit for bit, and
    ``full_output`` on one call does not leak into the next."""
    from nlsq_stream.solver.curve_fit import _PLANS

    rng = np.random.default_rng(7)
    sets = [Y + 0.01 * rng.standard_normal(M) for _ in range(3)]
    unplanned = []
    for y in sets:
        _PLANS.clear()
        unplanned.append(curve_fit(model, X, y, p0=P0, full_output=True))
    _PLANS.clear()
    for i, y in enumerate(sets):
        popt, pcov = curve_fit(model, X, y, p0=P0)
        assert np.array_equal(popt, unplanned[i][0]) and np.array_equal(pcov, unplanned[i][1])
        full = curve_fit(model, X, y, p0=P0, full_output=True)
        assert len(full) == 5 and np.array_equal(full[2]["fvec"], unplanned[i][2]["fvec"])
    assert sum(key[0] is model for key in _PLANS) == 1  # one plan served every call


def test_a_plan_keeps_no_data_alive():
    import gc
    import weakref

    y = Y + 0.0
    ref = weakref.ref(y)
    curve_fit(model, X, y, p0=P0)
    curve_fit(model, X, y + 0.0, p0=P0)  # a planned call
    del y
    gc.collect()
    assert ref() is None
