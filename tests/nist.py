"""NIST StRD nonlinear regression: a parser for NIST's files, the 27 models, and fit runners.

Every number (starting values, certified values and standard deviations, certified residual sum of
squares, data) is read from NIST's own ``.dat`` files; nothing is copied by hand. The models are
the formulas of each file's "Model:" section written with ``jax.numpy`` as ``f(x, b1, b2, ...)``.

Accuracy is measured as NIST does, by the LRE (log relative error, the number of correct significant
digits) of each estimate against its certified value; see :func:`lre`.

JAX must run in float64 (``jax.config.update("jax_enable_x64", True)``) before any fit here.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

import nlsq_stream
from nlsq_stream import OptimizeWarning

Model = Callable[..., Any]

# The formulas of the files' "Model:" sections. Nelson's left-hand side is log[y]: the parser turns
# its response into log(y) (see ``NistProblem.y``), so every model here predicts ``NistProblem.y``.
MODELS: dict[str, Model] = {
    "Misra1a": lambda x, b1, b2: b1 * (1 - jnp.exp(-b2 * x)),
    "Chwirut2": lambda x, b1, b2, b3: jnp.exp(-b1 * x) / (b2 + b3 * x),
    "Chwirut1": lambda x, b1, b2, b3: jnp.exp(-b1 * x) / (b2 + b3 * x),
    "Lanczos3": lambda x, b1, b2, b3, b4, b5, b6: (
        b1 * jnp.exp(-b2 * x) + b3 * jnp.exp(-b4 * x) + b5 * jnp.exp(-b6 * x)
    ),
    "Gauss1": lambda x, b1, b2, b3, b4, b5, b6, b7, b8: (
        b1 * jnp.exp(-b2 * x)
        + b3 * jnp.exp(-((x - b4) ** 2) / b5**2)
        + b6 * jnp.exp(-((x - b7) ** 2) / b8**2)
    ),
    "Gauss2": lambda x, b1, b2, b3, b4, b5, b6, b7, b8: (
        b1 * jnp.exp(-b2 * x)
        + b3 * jnp.exp(-((x - b4) ** 2) / b5**2)
        + b6 * jnp.exp(-((x - b7) ** 2) / b8**2)
    ),
    "DanWood": lambda x, b1, b2: b1 * x**b2,
    "Misra1b": lambda x, b1, b2: b1 * (1 - (1 + b2 * x / 2) ** (-2)),
    "Kirby2": lambda x, b1, b2, b3, b4, b5: (b1 + b2 * x + b3 * x**2) / (1 + b4 * x + b5 * x**2),
    "Hahn1": lambda x, b1, b2, b3, b4, b5, b6, b7: (
        (b1 + b2 * x + b3 * x**2 + b4 * x**3) / (1 + b5 * x + b6 * x**2 + b7 * x**3)
    ),
    # Nelson has two predictors: x[0] is x1 and x[1] is x2.
    "Nelson": lambda x, b1, b2, b3: b1 - b2 * x[0] * jnp.exp(-b3 * x[1]),
    "MGH17": lambda x, b1, b2, b3, b4, b5: b1 + b2 * jnp.exp(-x * b4) + b3 * jnp.exp(-x * b5),
    "Lanczos1": lambda x, b1, b2, b3, b4, b5, b6: (
        b1 * jnp.exp(-b2 * x) + b3 * jnp.exp(-b4 * x) + b5 * jnp.exp(-b6 * x)
    ),
    "Lanczos2": lambda x, b1, b2, b3, b4, b5, b6: (
        b1 * jnp.exp(-b2 * x) + b3 * jnp.exp(-b4 * x) + b5 * jnp.exp(-b6 * x)
    ),
    "Gauss3": lambda x, b1, b2, b3, b4, b5, b6, b7, b8: (
        b1 * jnp.exp(-b2 * x)
        + b3 * jnp.exp(-((x - b4) ** 2) / b5**2)
        + b6 * jnp.exp(-((x - b7) ** 2) / b8**2)
    ),
    "Misra1c": lambda x, b1, b2: b1 * (1 - (1 + 2 * b2 * x) ** (-0.5)),
    "Misra1d": lambda x, b1, b2: b1 * b2 * x * ((1 + b2 * x) ** (-1)),
    "Roszman1": lambda x, b1, b2, b3, b4: b1 - b2 * x - jnp.arctan(b3 / (x - b4)) / jnp.pi,
    "ENSO": lambda x, b1, b2, b3, b4, b5, b6, b7, b8, b9: (
        b1
        + b2 * jnp.cos(2 * jnp.pi * x / 12)
        + b3 * jnp.sin(2 * jnp.pi * x / 12)
        + b5 * jnp.cos(2 * jnp.pi * x / b4)
        + b6 * jnp.sin(2 * jnp.pi * x / b4)
        + b8 * jnp.cos(2 * jnp.pi * x / b7)
        + b9 * jnp.sin(2 * jnp.pi * x / b7)
    ),
    "MGH09": lambda x, b1, b2, b3, b4: b1 * (x**2 + x * b2) / (x**2 + x * b3 + b4),
    "Thurber": lambda x, b1, b2, b3, b4, b5, b6, b7: (
        (b1 + b2 * x + b3 * x**2 + b4 * x**3) / (1 + b5 * x + b6 * x**2 + b7 * x**3)
    ),
    "BoxBOD": lambda x, b1, b2: b1 * (1 - jnp.exp(-b2 * x)),
    "Rat42": lambda x, b1, b2, b3: b1 / (1 + jnp.exp(b2 - b3 * x)),
    "MGH10": lambda x, b1, b2, b3: b1 * jnp.exp(b2 / (x + b3)),
    "Eckerle4": lambda x, b1, b2, b3: (b1 / b2) * jnp.exp(-0.5 * ((x - b3) / b2) ** 2),
    "Rat43": lambda x, b1, b2, b3, b4: b1 / ((1 + jnp.exp(b2 - b3 * x)) ** (1 / b4)),
    "Bennett5": lambda x, b1, b2, b3: b1 * (b2 + x) ** (-1 / b3),
}

DIFFICULTIES: tuple[str, ...] = ("Lower", "Average", "Higher")

# Tolerances and evaluation budget used for every fit here, ours and scipy's alike.
TOLERANCES: dict[str, float] = {"ftol": 1e-15, "xtol": 1e-15, "gtol": 1e-15}
MAX_NFEV = 10000
LRE_CAP = 11.0  # NIST certifies 11 significant digits
SOLVED_LRE = 6.0  # a fit "solves" a problem when every parameter has at least this LRE


@dataclasses.dataclass(frozen=True, eq=False)
class NistProblem:
    """One NIST StRD problem, as read from its file.

    ``y`` is the model's left-hand side: the response column, or its log where the file's model is
    ``log[y] = ...`` (Nelson). ``x`` has shape (m,) for one predictor, (k, m) for k predictors.
    """

    name: str
    difficulty: str
    model_text: str
    n_params: int  # "N Parameters" in the Model section
    param_names: tuple[str, ...]
    starts: tuple[np.ndarray, np.ndarray]  # Start 1, Start 2
    certified: np.ndarray
    certified_sd: np.ndarray
    certified_rss: float
    n_obs_described: int  # "N Observations" in the file's "Data:" description
    n_obs: int  # "Number of Observations:" below the certified values
    columns: tuple[str, ...]  # the data columns' names, response first
    response: str  # "y" or "log[y]"
    y: np.ndarray
    x: np.ndarray

    @property
    def model(self) -> Model:
        """The jax.numpy model ``f(x, b1, ..., bn)`` (one function object per problem)."""
        return MODELS[self.name]

    def rss(self, params: np.ndarray) -> float:
        """Residual sum of squares of the model at ``params``, in float64."""
        _require_x64()
        pred = np.asarray(self.model(self.x, *params), np.float64)
        return float(np.sum((self.y - pred) ** 2))


_LINE_RANGE = re.compile(
    r"^\s*(?:File Format:)?\s*(Starting Values|Certified Values|Data)\s*"
    r"\(lines\s+(\d+)\s+to\s+(\d+)\)",
    re.IGNORECASE,
)
_PARAM_ROW = re.compile(r"^\s*(b\d+)\s*=\s*(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")


def _line_ranges(lines: list[str]) -> dict[str, tuple[int, int]]:
    """The "(lines A to B)" ranges of the File Format header, as 0-based half-open slices."""
    out: dict[str, tuple[int, int]] = {}
    for line in lines[:20]:
        m = _LINE_RANGE.match(line)
        if m:
            out[m.group(1).lower()] = (int(m.group(2)) - 1, int(m.group(3)))
    if set(out) != {"starting values", "certified values", "data"}:
        raise ValueError(f"could not read the File Format line ranges, got {out}")
    return out


def _search(pattern: str, text: str, what: str) -> re.Match[str]:
    m = re.search(pattern, text, re.MULTILINE)
    if m is None:
        raise ValueError(f"no {what} (pattern {pattern!r}) in the file")
    return m


def _model_section(lines: list[str]) -> str:
    """The lines of the "Model:" section, up to the starting-values table."""
    start = next(i for i, line in enumerate(lines) if line.startswith("Model:"))
    stop = next(
        i for i in range(start, len(lines)) if re.search(r"Starting values", lines[i], re.I)
    )
    return "\n".join(line.rstrip() for line in lines[start:stop] if line.strip())


def load_problem(path: Path) -> NistProblem:
    """Parse one NIST StRD nonlinear-regression ``.dat`` file."""
    text = path.read_text()
    lines = text.splitlines()
    name = _search(r"^Dataset Name:\s+(\S+)", text, "dataset name").group(1)
    ranges = _line_ranges(lines)

    s0, s1 = ranges["starting values"]
    c0, c1 = ranges["certified values"]
    rows = [_PARAM_ROW.match(line) for line in lines[s0:s1]]
    if not all(rows):
        raise ValueError(f"{name}: unreadable parameter row in lines {s0 + 1}..{s1}")
    param_rows = [m for m in rows if m is not None]
    table = np.array([[float(m.group(k)) for k in range(2, 6)] for m in param_rows])
    certified_block = "\n".join(lines[c0:c1])
    rss = float(_search(r"Residual Sum of Squares:\s+(\S+)", certified_block, "RSS").group(1))
    n_obs = int(_search(r"Number of Observations:\s+(\d+)", certified_block, "count").group(1))

    model_text = _model_section(lines)
    n_params = int(_search(r"(\d+)\s+Parameters", model_text, "parameter count").group(1))
    response = "log[y]" if re.search(r"^\s*log\[y\]\s*=", model_text, re.M) else "y"
    if response == "y":
        _search(r"^\s*y\s*=", model_text, "model equation 'y = ...'")

    description = text[: text.index("Model:")]
    n_obs_described = int(_search(r"^\s+(\d+)\s+Observations", description, "count").group(1))
    difficulty = _search(r"(\w+)\s+Level of Difficulty", description, "difficulty").group(1)

    d0, d1 = ranges["data"]
    header = lines[d0 - 1]
    if not header.startswith("Data:"):
        raise ValueError(f"{name}: expected the data header on line {d0}, got {header!r}")
    columns = tuple(header.split()[1:])
    data = np.array([[float(v) for v in line.split()] for line in lines[d0:d1]])
    if data.ndim != 2 or data.shape[1] != len(columns):
        raise ValueError(f"{name}: data of shape {data.shape} for columns {columns}")
    y = np.log(data[:, 0]) if response == "log[y]" else data[:, 0]
    x = data[:, 1] if data.shape[1] == 2 else np.ascontiguousarray(data[:, 1:].T)

    return NistProblem(
        name=name,
        difficulty=difficulty,
        model_text=model_text,
        n_params=n_params,
        param_names=tuple(m.group(1) for m in param_rows),
        starts=(table[:, 0].copy(), table[:, 1].copy()),
        certified=table[:, 2].copy(),
        certified_sd=table[:, 3].copy(),
        certified_rss=rss,
        n_obs_described=n_obs_described,
        n_obs=n_obs,
        columns=columns,
        response=response,
        y=y,
        x=x,
    )


def load_all(nist_dir: Path) -> dict[str, NistProblem]:
    """Every ``*.dat`` problem in ``nist_dir``, by NIST's difficulty and then by name."""
    problems = [load_problem(p) for p in sorted(nist_dir.glob("*.dat"))]
    problems.sort(key=lambda p: (DIFFICULTIES.index(p.difficulty), p.name))
    return {p.name: p for p in problems}


def lre(estimate: Any, certified: Any, cap: float = LRE_CAP) -> np.ndarray:
    """Log relative error ``-log10(|est - cert| / |cert|)``, in [0, cap].

    Where ``certified`` is 0 the absolute error is used; a non-finite estimate scores 0.
    """
    est = np.asarray(estimate, np.float64)
    cert = np.asarray(certified, np.float64)
    err = np.abs(est - cert) / np.where(cert != 0, np.abs(cert), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = -np.log10(err)
    out = np.where(np.isnan(out), 0.0, out)
    return np.clip(out, 0.0, cap)


@dataclasses.dataclass(frozen=True)
class FitResult:
    """One fit of one problem from one start. ``popt`` is None when the fit raised RuntimeError."""

    solver: str  # "ours-trf", "ours-lm" or "scipy-trf"
    problem: str
    start: int
    popt: np.ndarray | None
    sd: np.ndarray | None
    param_lre: np.ndarray  # zeros when the fit failed
    sd_lre: np.ndarray
    rss: float
    rss_lre: float
    nfev: int | None
    message: str

    @property
    def converged(self) -> bool:
        return self.popt is not None

    @property
    def min_lre(self) -> float:
        return float(np.min(self.param_lre))

    @property
    def min_sd_lre(self) -> float:
        return float(np.min(self.sd_lre))

    @property
    def solved(self) -> bool:
        """Converged with every parameter's LRE >= ``SOLVED_LRE``."""
        return self.converged and self.min_lre >= SOLVED_LRE

    def describe(self) -> str:
        """A one-paragraph account for failure messages."""
        lres = ", ".join(f"{v:.1f}" for v in self.param_lre)
        return (
            f"{self.solver} {self.problem} start {self.start}: {self.message!r}, nfev={self.nfev}, "
            f"RSS={self.rss:.10e} (RSS LRE {self.rss_lre:.1f}), param LREs [{lres}], "
            f"popt={self.popt}"
        )


def _require_x64() -> None:
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError('enable float64 first: jax.config.update("jax_enable_x64", True)')


def _result(
    solver: str, problem: NistProblem, start: int, out: tuple[Any, ...] | None, message: str
) -> FitResult:
    n = problem.n_params
    if out is None:
        zeros = np.zeros(n)
        return FitResult(
            solver, problem.name, start, None, None, zeros, zeros, np.nan, 0.0, None, message
        )
    popt, pcov, info, mesg, _ier = out
    popt = np.asarray(popt, np.float64)
    sd = np.sqrt(np.diag(np.asarray(pcov, np.float64)))
    rss = float(np.sum(np.asarray(info["fvec"], np.float64) ** 2))
    return FitResult(
        solver=solver,
        problem=problem.name,
        start=start,
        popt=popt,
        sd=sd,
        param_lre=lre(popt, problem.certified),
        sd_lre=lre(sd, problem.certified_sd),
        rss=rss,
        rss_lre=float(lre(rss, problem.certified_rss)),
        nfev=int(info["nfev"]),
        message=str(mesg),
    )


def fit_ours(problem: NistProblem, start: int, method: str = "trf") -> FitResult:
    """Fit with ``nlsq_stream.curve_fit`` from Start ``start`` (1 or 2)."""
    _require_x64()
    p0 = problem.starts[start - 1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            out = nlsq_stream.curve_fit(
                problem.model,
                problem.x,
                problem.y,
                p0=p0,
                method=method,
                full_output=True,
                max_nfev=MAX_NFEV,
                **TOLERANCES,
            )
    except RuntimeError as e:
        return _result(f"ours-{method}", problem, start, None, str(e))
    return _result(f"ours-{method}", problem, start, out, out[3])


@functools.cache
def numpy_model(name: str) -> Model:
    """The model as a numpy function for scipy: jitted once, returning host arrays."""
    jitted = jax.jit(MODELS[name])

    def f(x: np.ndarray, *params: float) -> np.ndarray:
        return np.asarray(jitted(x, *params))

    return f


def fit_scipy(problem: NistProblem, start: int) -> FitResult:
    """Fit with ``scipy.optimize.curve_fit(method="trf")``, its default finite-difference Jacobian
    and the same tolerances and budget as :func:`fit_ours`."""
    _require_x64()
    p0 = problem.starts[start - 1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # overflow on the way, covariance warnings
            out = scipy.optimize.curve_fit(
                numpy_model(problem.name),
                problem.x,
                problem.y,
                p0=p0,
                method="trf",
                full_output=True,
                max_nfev=MAX_NFEV,
                **TOLERANCES,
            )
    except RuntimeError as e:
        return _result("scipy-trf", problem, start, None, str(e))
    return _result("scipy-trf", problem, start, out, out[3])
