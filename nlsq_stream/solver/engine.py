"""The jitted solver loop: TRF (with bounds) and Levenberg-Marquardt in one ``lax.while_loop``.

Stage one of the flow. Everything in a fit's iteration loop -- trust-region step, step acceptance,
radius update, termination tests -- runs inside one compiled XLA program; the host sees the fit only
when it ends (and, when logging is on, through batched records; see ``nlsq_stream.stream.emitter``).

Design notes
------------
* One loop iteration is one *trial*: one evaluation of residuals and Jacobian together (a single
  forward-mode pass) at a trial point, reduced at once to an (n+1) x (n+1) triangular factor by a
  thin QR of ``[J f]``. The carried state is therefore n-dimensional; the m-dimensional residual
  vector never lives across iterations, so nothing m x m (or even m-sized) is copied per step.
* A trial that is accepted reuses its evaluation: no second pass over the data.
* ``problem`` (how to compute residuals) and ``config`` (method, loss, bounds or not, ...) are
  static; data, starting point, bounds values and tolerances are traced, so a second call with the
  same shapes, dtypes and options compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from . import lapack_init, losses, program_cache
from .trust_region import (
    cl_scaling,
    make_strictly_feasible,
    quadratic,
    select_step,
    solve_subproblem,
)

RUNNING = -100
STATUS_NONFINITE_START = -3
STATUS_STOPPED = -2


class Problem(Protocol):
    """How to compute residuals ``f(x)`` (shape (m,)) and the transposed Jacobian (n, m)."""

    def residual(self, x: Array, data: Any) -> Array: ...

    def residual_and_jt(self, x: Array, data: Any) -> tuple[Array, Array]: ...


class Recorder(Protocol):
    """What the loop calls to record iterations for a watcher: ``config.emitter`` (the stream
    stage's ``Emitter``). Its state is carried in ``State.emit`` and must have ``buf``, ``filled``
    and ``trials`` (a chunk returns them; see ``_chunk_outputs``). The solver knows no more of it.
    """

    def init(self, n: int, dtype: Any) -> Any: ...

    def room(self, st: Any, k: Array) -> Array: ...

    def record(
        self,
        st: Any,
        nit: Array,
        nfev: Array,
        cost: Array,
        reduction: Array,
        step_norm: Array,
        optimality: Array,
        x: Array,
        done: Array,
        final: Array | None = None,
    ) -> Any: ...


def forward_residual_and_jt(fun: Callable[[Array], Array], x: Array) -> tuple[Array, Array]:
    """Residuals and transposed Jacobian from one batched forward-mode pass.

    The primal does not depend on the tangent, so ``vmap`` leaves it unbatched and XLA evaluates
    the model and its n directional derivatives in one fused sweep over the data.
    """
    # The barrier ties the constant tangent basis to ``x``: otherwise XLA hoists the parts of the
    # Jacobian that depend on the data alone (``-x`` times a unit tangent, say) out of the solver
    # loop and materializes them as an (n, m) array before the loop starts: 24 MB and ~10 ms at
    # 1e6 x 3, paid once per call of the loop (measured).
    x, eye = lax.optimization_barrier((x, jnp.eye(x.shape[0], dtype=x.dtype)))
    f, jt = jax.vmap(lambda t: jax.jvp(fun, (x,), (t,)), out_axes=(None, 0))(eye)
    return f, jt


@dataclasses.dataclass(frozen=True)
class Config:
    """Static solver options; part of the compilation key."""

    method: str  # "trf" or "lm"
    loss: str
    has_bounds: bool
    jac_scale: bool
    # What records iterations for a watcher: a hashable ``Recorder`` (``stream.emitter.Emitter``),
    # or None: nothing is recorded and no record buffer is compiled at all.
    emitter: Recorder | None = None
    fun_jac: bool = True  # compute ``fun`` and ``jac`` at the solution (curve_fit needs neither)
    heap: int = 0  # XLA's per-heap limit for temporaries (``heap_limit``); 0: XLA's default


class Evaluation(NamedTuple):
    cost: Array
    r: Array  # (n, n) upper-triangular factor of the (loss-scaled) Jacobian
    qtf: Array  # (n,)  Q.T @ f, so that J.T @ f == r.T @ qtf
    finite: Array


class State(NamedTuple):
    x: Array
    cost: Array
    r: Array
    qtf: Array
    g: Array
    scale_inv: Array
    delta: Array
    alpha: Array
    nfev: Array
    njev: Array
    nit: Array
    status: Array
    g_norm: Array
    reduction: Array  # of the last completed iteration (scipy's "Cost reduction" column)
    step_norm: Array
    xnorm: Array  # LM only: ||diag * x||
    emit: Any  # emitter state (a pytree), or None


class Output(NamedTuple):
    """What a fit returns. ``packed`` holds every small result in one array, so the host fetches
    them with a single transfer: see ``unpack``. ``fun`` and ``jac`` are None unless
    ``config.fun_jac``."""

    packed: Array
    fun: Array | None
    jac: Array | None


def _pack(st: State, m: int) -> Array:
    """x, grad, the unscaled covariance pinv(J'J) and the scalar results, in one vector."""
    n = st.x.shape[0]
    dtype = st.x.dtype
    _, s, vt = jnp.linalg.svd(st.r, full_matrices=False)
    keep = s > jnp.finfo(dtype).eps * max(m, n) * s[0]
    inv_s2 = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0) ** 2, 0.0)
    cov = (vt.T * inv_s2[None, :]) @ vt
    cov = jnp.where(jnp.any(keep), cov, jnp.nan)
    scalars = jnp.stack(
        [st.cost, st.g_norm] + [v.astype(dtype) for v in (st.nfev, st.njev, st.nit, st.status)]
    )
    return jnp.concatenate([st.x, st.g, cov.reshape(-1), scalars])


# XLA:CPU's MLIR fusion emitters take about twice as long to compile the solver as its classic
# LLVM IR emitters (600 against 270 ms for the exponential-decay fit here) and run it no faster
# (warm fits at 1e3, 1e5 and 1e6 points, measured): a fit's first call is mostly compile time.
_CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def compiler_options() -> dict[str, Any] | None:
    """The options the solver programs are compiled with: ``_CPU_COMPILER_OPTIONS`` on CPU, until
    XLA says it does not know one of them (``options_rejected``), else XLA's defaults.

    Asking XLA first would cost a compile of its own in every process (20-40 ms here)."""
    if _REJECTED or not _on_cpu():
        return None
    return dict(_CPU_COMPILER_OPTIONS)


_REJECTED: list[str] = []  # XLA's refusal of an option, once it refused one


@functools.cache
def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def options_rejected(error: BaseException) -> bool:
    """Whether ``error`` is XLA refusing one of ``_CPU_COMPILER_OPTIONS`` (an older or newer XLA
    than the one they were measured on). If so, later programs are compiled without them: the
    caller builds its program again and retries."""
    if "No such compile option" not in str(error):
        return False
    _REJECTED.append(str(error))
    return True


class _Program:
    """A solver program: ``fn(problem, config, *arrays)`` compiled once per static ``problem`` and
    ``config``, built at first use so that its compiler options can depend on the backend and on
    ``config.heap`` (see ``heap_limit``).

    A call looks the pair up in a small cache of programs that take only the arrays: ``jax.jit``
    with ``static_argnames`` hashes and compares the static arguments on every call, which cost
    ~13 µs of a ~60 µs dispatch here. ``trace`` and ``lower`` (tests, introspection) go to the
    ``static_argnames`` form.
    """

    CACHE_SIZE = 256  # (problem, config) pairs kept compiled; the oldest is dropped first

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self._jits: dict[int, Any] = {}
        self._bound: dict[tuple[Any, Config], Any] = {}
        self._lock = threading.Lock()  # fits may start in several threads at once
        functools.update_wrapper(self, fn)

    @staticmethod
    def _options(heap: int) -> dict[str, Any]:
        lapack_init.preload()  # before the first program that may use LAPACK is lowered
        options = compiler_options()
        if options is None:
            return {}
        if heap:
            options = {**options, "xla_multiheap_size_constraint_per_heap": heap}
        return {"compiler_options": options}

    def variant(self, heap: int = 0) -> Any:
        jitted = self._jits.get(heap)
        if jitted is None:
            jitted = jax.jit(self._fn, static_argnames=("problem", "config"), **self._options(heap))
            self._jits[heap] = jitted
        return jitted

    def __call__(self, problem: Any, config: Config, *args: Any) -> Any:
        key = (problem, config)
        jitted = self._bound.get(key)
        if jitted is None:
            with self._lock:
                jitted = self._bound.get(key)
                if jitted is None:
                    if len(self._bound) >= self.CACHE_SIZE:
                        del self._bound[next(iter(self._bound))]
                    bound = functools.partial(self._fn, problem, config)
                    options = self._options(config.heap)
                    jitted = jax.jit(bound, **options)
                    if program_cache.folder() is not None:  # the compile cache is on
                        jitted = program_cache.CachedProgram(
                            self._fn.__name__,
                            jitted,
                            problem,
                            config,
                            repr(options),
                            lapack_init.initialize,
                        )
                    self._bound[key] = jitted
        try:
            return jitted(*args)
        except jax.errors.JaxRuntimeError as e:
            if not options_rejected(e):
                raise
            with self._lock:
                self._bound.clear()
                self._jits.clear()
            return self(problem, config, *args)

    def __getattr__(self, name: str) -> Any:  # trace, lower, ...
        return getattr(self.variant(), name)


MALLOC_RECYCLED = 31 << 20  # glibc's malloc mmaps (and so zero-fills) blocks over 32 MiB


def heap_limit(problem: Problem, x0: np.ndarray, data: Any, m: int) -> int:
    """XLA's per-heap size limit for a fit's temporaries, or 0 for XLA's default (one heap).

    XLA allocates a program's temporaries as one block per run. Over 32 MiB, glibc's malloc maps
    fresh pages for it every time, and the kernel zero-fills them on first touch: at 1e6 points
    (38 MiB) that cost ~6 ms per run, paid by every chunk of a watched fit (10-15 %, measured).
    Heaps of at most 31 MiB are blocks malloc recycles. The limit is set only where every
    buffer fits in it (XLA logs a warning for each one that does not): ``[J f]`` in TSQR blocks,
    and every intermediate of the model's evaluation. Small problems need no limit.
    """
    n, itemsize = x0.shape[0], x0.dtype.itemsize
    rows = m if m <= 2 * TSQR_BLOCK else -(-m // TSQR_BLOCK) * TSQR_BLOCK
    biggest = (n + 1) * rows * itemsize
    if compiler_options() is None or not MALLOC_RECYCLED // 2 < biggest <= MALLOC_RECYCLED:
        return 0  # small: one heap is small too, as a rule; big: nothing to gain
    try:
        largest = _largest_intermediate(problem, x0, data)
    except Exception:  # an unusual model or data tree: keep XLA's default
        return 0
    return MALLOC_RECYCLED if largest <= MALLOC_RECYCLED else 0


def shape_key(problem: Any, x0: np.ndarray, data: Any) -> Any:
    """What a fit's programs depend on besides ``config``: the problem, the shapes and dtypes of
    ``x0`` and of every leaf of ``data``, and the data's tree structure (a hashable key)."""
    leaves, treedef = jax.tree_util.tree_flatten(data)
    return (
        problem,
        treedef,
        x0.shape,
        x0.dtype.str,
        tuple((np.shape(leaf), _dtype_str(leaf)) for leaf in leaves),
    )


def _dtype_str(leaf: Any) -> str:
    dtype = getattr(leaf, "dtype", None)
    return dtype.str if isinstance(dtype, np.dtype) else np.result_type(leaf).str


def _largest_intermediate(problem: Problem, x0: np.ndarray, data: Any) -> int:
    """Bytes of the largest value in one evaluation of residuals and Jacobian (traced only)."""
    key = shape_key(problem, x0, data)
    cached = _LARGEST.get(key)
    if cached is not None:
        return cached
    spec = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype), data)
    closed = jax.make_jaxpr(problem.residual_and_jt)(jax.ShapeDtypeStruct(x0.shape, x0.dtype), spec)
    largest = max((_bytes(v.aval) for v in _jaxpr_vars(closed.jaxpr)), default=0)
    if len(_LARGEST) >= 64:
        _LARGEST.clear()
    _LARGEST[key] = largest
    return largest


_LARGEST: dict[Any, int] = {}

_subjaxprs: Callable[[Any], Iterator[Any]]
try:
    from jax.extend.core import jaxprs_in_params as _subjaxprs
except ImportError:  # older jax
    _subjaxprs = jax.core.jaxprs_in_params


def _bytes(aval: Any) -> int:
    shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
    if shape is None or dtype is None:
        return 0
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _jaxpr_vars(jaxpr: Any) -> Iterator[Any]:
    yield from jaxpr.invars
    for eqn in jaxpr.eqns:
        yield from eqn.outvars
        for sub in _subjaxprs(eqn.params):
            yield from _jaxpr_vars(sub)


def _program(fn: Callable[..., Any]) -> Any:
    return _Program(fn)


SPIN_S = 5e-4  # how long ``fetch`` polls before it blocks


def fetch(a: Any, spin_s: float = SPIN_S) -> np.ndarray:
    """``np.asarray(a)``, polling for up to ``spin_s`` seconds before blocking.

    XLA runs any program above a tiny cost estimate on its own thread, and a host thread blocked
    on the result wakes up some tens of µs after it is ready (measured here, 2-core VM: a 1e3
    point model evaluation takes 58 µs blocking, 10 µs polling; a warm 1e3 fit loses ~0.1 ms).
    Polling briefly saves that for short programs; a long one then blocks as before, having spent
    at most ``spin_s`` of one core.
    """
    if not a.is_ready():
        deadline = time.perf_counter() + spin_s
        while not a.is_ready() and time.perf_counter() < deadline:
            pass
    return np.asarray(a)


def unpack(packed: np.ndarray, n: int) -> dict[str, Any]:
    """Host-side inverse of ``_pack``."""
    x, g = packed[:n], packed[n : 2 * n]
    cov = packed[2 * n : 2 * n + n * n].reshape(n, n)
    cost, g_norm, nfev, njev, nit, status = packed[2 * n + n * n :].tolist()
    return dict(
        x=x,
        grad=g,
        cov=cov,
        cost=cost,
        optimality=g_norm,
        nfev=int(nfev),
        njev=int(njev),
        nit=int(nit),
        status=int(status),
    )


def _evaluate(problem: Problem, config: Config, x: Array, data: Any, f_scale: Array) -> Evaluation:
    n = x.shape[0]
    f, jt = problem.residual_and_jt(x, data)
    fs, jts = losses.scale_residuals_and_jacobian(config.loss, f, jt, f_scale)
    # Thin QR of [J f] (m x (n+1)): the last column of R is Q.T f, so Q is never formed.
    rf = thin_r(jnp.concatenate([jts, fs[None, :]], axis=0))
    r = rf[:n, :n]
    qtf = rf[:n, n]
    if config.loss == "linear":
        # ||f||^2 is the squared norm of R's last column (Q is orthogonal): f is then read only
        # by the fusion that writes [J f], so XLA keeps no separate m-sized copy of it.
        cost = 0.5 * jnp.sum(rf[:, n] ** 2)
    else:
        cost = losses.cost(config.loss, f, f_scale)
    finite = jnp.isfinite(cost) & jnp.all(jnp.isfinite(rf))
    return Evaluation(cost, r, qtf, finite)


TSQR_BLOCK = 4096


def thin_r(at: Array) -> Array:
    """R of the thin QR of ``at.T`` (shape (k, k)), given ``at`` of shape (k, m).

    For tall matrices this is a one-level TSQR: QR of row blocks that fit in cache, then QR of the
    stacked block factors. It is as stable as Householder QR on the whole matrix and, measured on a
    1e6 x 4 problem here, about twice as fast, because each block is swept while it is in cache.
    Rows of zeros (padding) do not change R.
    """
    k, m = at.shape
    if m <= 2 * TSQR_BLOCK:
        rf = jnp.linalg.qr(at.T, mode="r")
    else:
        nb = -(-m // TSQR_BLOCK)
        padded = jnp.pad(at, ((0, 0), (0, nb * TSQR_BLOCK - m)))
        blocks = padded.reshape(k, nb, TSQR_BLOCK).transpose(1, 2, 0)
        rs = jnp.linalg.qr(blocks, mode="r")
        rf = jnp.linalg.qr(rs.reshape(nb * k, k), mode="r")
    if rf.shape[0] < k:  # fewer rows than columns: pad, R.T R is unchanged
        rf = jnp.concatenate([rf, jnp.zeros((k - rf.shape[0], k), rf.dtype)], axis=0)
    return rf


def _col_norms(r: Array) -> Array:
    return jnp.sqrt(jnp.sum(r * r, axis=0))


def _trf_gnorm(config: Config, x: Array, g: Array, lb: Array, ub: Array) -> Array:
    if config.has_bounds:
        v, _ = cl_scaling(x, g, lb, ub)
        return jnp.max(jnp.abs(g * v))
    return jnp.max(jnp.abs(g))


def _lm_cosine(r: Array, g: Array, cost: Array) -> Array:
    """MINPACK's gtol measure: the largest |cosine| between a Jacobian column and f."""
    fnorm = jnp.sqrt(2.0 * cost)
    cn = _col_norms(r)
    ok = (cn > 0) & (fnorm > 0)
    return jnp.max(jnp.where(ok, jnp.abs(g) / jnp.where(ok, cn * fnorm, 1.0), 0.0))


def _initial_state(
    problem: Problem, config: Config, vectors: Array, scalars: Array, data: Any
) -> State:
    """Evaluate at ``x0`` and set up the loop (the first record, iteration 0, when watched)."""
    x0, lb, ub, x_scale = vectors[0], vectors[1], vectors[2], vectors[3]
    gtol, f_scale = scalars[2], scalars[3]
    max_nfev = scalars[4].astype(jnp.int32)
    dtype = x0.dtype
    n = x0.shape[0]
    ev0 = _evaluate(problem, config, x0, data, f_scale)
    g0 = ev0.r.T @ ev0.qtf
    if config.jac_scale:
        cn = _col_norms(ev0.r)
        scale_inv0 = jnp.where(cn == 0, 1.0, cn)
    else:
        scale_inv0 = 1.0 / x_scale

    if config.method == "lm":
        xnorm0 = jnp.linalg.norm(x0 * scale_inv0)
        delta0 = jnp.where(xnorm0 > 0, 100.0 * xnorm0, 100.0)
        gnorm_test0 = _lm_cosine(ev0.r, g0, ev0.cost)
        g_norm0 = jnp.max(jnp.abs(g0))
        conv0 = gnorm_test0 <= gtol
    else:
        xnorm0 = jnp.zeros((), dtype)
        if config.has_bounds:
            v0, dv0 = cl_scaling(x0, g0, lb, ub)
            vs = jnp.where(dv0 != 0, v0 * scale_inv0, v0)
            delta0 = jnp.linalg.norm(x0 * scale_inv0 / jnp.sqrt(vs))
        else:
            delta0 = jnp.linalg.norm(x0 * scale_inv0)
        delta0 = jnp.where(delta0 == 0, 1.0, delta0)
        g_norm0 = _trf_gnorm(config, x0, g0, lb, ub)
        conv0 = g_norm0 < gtol

    status0 = jnp.where(
        ~ev0.finite,
        STATUS_NONFINITE_START,
        jnp.where(conv0, 1, jnp.where(max_nfev <= 1, 0, RUNNING)),
    ).astype(jnp.int32)
    zero = jnp.zeros((), dtype)
    one_i = jnp.ones((), jnp.int32)
    emitter = config.emitter
    emit0 = None
    if emitter is not None:
        emit0 = emitter.init(n, dtype)
        emit0 = emitter.record(
            emit0,
            jnp.zeros((), jnp.int32),
            one_i,
            ev0.cost,
            zero,
            zero,
            g_norm0,
            x0,
            ev0.finite,  # a start with non-finite residuals fails with no row
        )
    state = State(
        x=x0,
        cost=ev0.cost,
        r=ev0.r,
        qtf=ev0.qtf,
        g=g0,
        scale_inv=scale_inv0.astype(dtype) * jnp.ones((n,), dtype),
        delta=delta0.astype(dtype),
        alpha=zero,
        nfev=one_i,
        njev=one_i,
        nit=jnp.zeros((), jnp.int32),
        status=status0,
        g_norm=g_norm0,
        reduction=zero,
        step_norm=zero,
        xnorm=xnorm0.astype(dtype),
        emit=emit0,
    )
    return state


class Loop(NamedTuple):
    """What every iteration reads and none changes: bounds, tolerances, budget, sizes."""

    lb: Array
    ub: Array
    ftol: Array
    xtol: Array
    gtol: Array
    f_scale: Array
    max_nfev: Array
    m: int  # residuals
    dtype: Any


class Trial(NamedTuple):
    """One trial's outcome, as a method's step computes it, for ``_commit`` to act on."""

    done: Array  # the trial ends an outer iteration (accepted, terminated or out of budget)
    accept: Array
    x_new: Array
    ev: Evaluation
    nfev: Array
    delta: Array
    alpha: Array
    term: Array  # a termination status from the step's own tests, or RUNNING
    reduction: Array
    step_norm: Array
    xnorm: Array


def _loop_constants(problem: Problem, vectors: Array, scalars: Array, data: Any) -> Loop:
    """Unpack the traced arguments once (``vectors``/``scalars`` as ``solve`` documents)."""
    m = jax.eval_shape(lambda x: problem.residual(x, data), vectors[0]).shape[0]
    return Loop(
        lb=vectors[1],
        ub=vectors[2],
        ftol=scalars[0],
        xtol=scalars[1],
        gtol=scalars[2],
        f_scale=scalars[3],
        max_nfev=scalars[4].astype(jnp.int32),
        m=m,
        dtype=vectors.dtype,
    )


def _run(
    problem: Problem,
    config: Config,
    vectors: Array,
    scalars: Array,
    data: Any,
    chunk: tuple[Array | None, Array] | None = None,
    flat_state: bool = True,
) -> State:
    """The iteration loop, traced. With ``chunk = (carry, k)`` it runs at most ``k`` trials (fewer
    when the record buffer fills up) from ``carry``, a state flattened by ``_flatten``, or from
    ``x0`` when ``carry`` is None. ``flat_state``: the loop carries the state as one vector (one
    fit); a batch (``vmap``) carries its fields, which costs it less than packing them.
    """
    loop = _loop_constants(problem, vectors, scalars, data)
    emitter: Any = config.emitter  # a Recorder whenever ``chunk`` is given
    if chunk is None or chunk[0] is None:
        state = _initial_state(problem, config, vectors, scalars, data)
    else:
        # No ``lax.cond`` between starting and resuming here: a conditional that takes the data
        # as an operand copied it on every call (10 ms a chunk at 1e6 points, measured).
        unflatten = _flatten_spec(problem, config, vectors, scalars, data)
        state = unflatten(chunk[0])._replace(emit=emitter.init(vectors.shape[1], loop.dtype))

    def cond(st: State) -> Array:
        running = st.status == RUNNING
        if chunk is None:
            return running
        return running & emitter.room(st.emit, chunk[1])

    step = _lm_step if config.method == "lm" else _trf_step

    def body(st: State) -> State:
        return _commit(config, loop, st, step(problem, config, loop, data, st))

    if not flat_state:  # packing (N, 32) states every iteration cost a 1e4 batch 10 % (measured)
        return lax.while_loop(cond, body, state)

    # The loop carries the state as one vector (and the emitter's records beside it): XLA then
    # computes the next state in a few fused kernels instead of one per field (each kernel is a
    # separate step of XLA:CPU's runtime, at a fixed cost that dominated small fits).
    flat, unravel = jax.flatten_util.ravel_pytree(state._replace(emit=None))

    def flat_cond(carry: tuple[Array, Any]) -> Array:
        return cond(unravel(carry[0])._replace(emit=carry[1]))

    def flat_body(carry: tuple[Array, Any]) -> tuple[Array, Any]:
        st = body(unravel(carry[0])._replace(emit=carry[1]))
        return _pack_state(st._replace(emit=None), flat.dtype), st.emit

    flat, emit = lax.while_loop(flat_cond, flat_body, (flat, state.emit))
    return unravel(flat)._replace(emit=emit)


def _pack_state(tree: Any, dtype: Any) -> Array:
    """``ravel_pytree(tree)[0]``, built by selecting among zero-padded pieces: elementwise work
    that XLA fuses into one kernel with the computations of the pieces (a concatenate of many
    operands is a kernel of its own, and so is each of its operands)."""
    leaves = [jnp.ravel(leaf).astype(dtype) for leaf in jax.tree_util.tree_leaves(tree)]
    total = sum(leaf.shape[0] for leaf in leaves)
    index = np.arange(total)
    out = jnp.zeros((total,), dtype)
    at = 0
    for leaf in leaves:
        k = leaf.shape[0]
        out = jnp.where((index >= at) & (index < at + k), jnp.pad(leaf, (at, total - at - k)), out)
        at += k
    return out


def _commit(config: Config, loop: Loop, st: State, t: Trial) -> State:
    """Act on a trial: take its point if accepted and, at the end of an outer iteration, test
    for convergence and record the iteration for the emitter."""
    x = jnp.where(t.accept, t.x_new, st.x)
    cost = jnp.where(t.accept, t.ev.cost, st.cost)
    r = jnp.where(t.accept, t.ev.r, st.r)
    qtf = jnp.where(t.accept, t.ev.qtf, st.qtf)
    g = r.T @ qtf
    njev = st.njev + t.accept.astype(jnp.int32)
    scale_inv = st.scale_inv
    if config.jac_scale:
        scale_inv = jnp.where(t.accept, jnp.maximum(scale_inv, _col_norms(t.ev.r)), scale_inv)
    g_norm, status = _termination(config, loop, t, x, g, r, cost)
    nit = st.nit + t.done.astype(jnp.int32)
    reduction = jnp.where(t.done, jnp.where(t.accept, t.reduction, 0.0), st.reduction)
    step_norm = jnp.where(t.done, jnp.where(t.accept, t.step_norm, 0.0), st.step_norm)
    g_norm = jnp.where(t.done, g_norm, st.g_norm)
    emit = st.emit
    if config.emitter is not None:
        emit = config.emitter.record(
            emit, nit, t.nfev, cost, reduction, step_norm, g_norm, x, t.done, status != RUNNING
        )
    return State(
        x=x,
        cost=cost,
        r=r,
        qtf=qtf,
        g=g,
        scale_inv=scale_inv,
        delta=t.delta,
        alpha=t.alpha,
        nfev=t.nfev,
        njev=njev,
        nit=nit,
        status=status,
        g_norm=g_norm,
        reduction=reduction,
        step_norm=step_norm,
        xnorm=t.xnorm,
        emit=emit,
    )


def _termination(
    config: Config, loop: Loop, t: Trial, x: Array, g: Array, r: Array, cost: Array
) -> tuple[Array, Array]:
    """The gradient norm at the committed point and the fit's status: converged on ``gtol`` (1),
    the step's own ``ftol``/``xtol`` test, out of budget (0), or still RUNNING."""
    if config.method == "lm":
        g_norm = jnp.max(jnp.abs(g))
        converged = _lm_cosine(r, g, cost) <= loop.gtol
    else:
        g_norm = _trf_gnorm(config, x, g, loop.lb, loop.ub)
        converged = g_norm < loop.gtol
    status = jnp.where(
        converged,
        1,
        jnp.where(t.term != RUNNING, t.term, jnp.where(t.nfev >= loop.max_nfev, 0, RUNNING)),
    )
    return g_norm, jnp.where(t.done, status, RUNNING).astype(jnp.int32)


def _trf_step(problem: Problem, config: Config, loop: Loop, data: Any, st: State) -> Trial:
    """One trial of trust-region reflective (scipy's ``trf``): solve the subproblem, evaluate the
    trial point, update the radius and test ``ftol`` and ``xtol``."""
    lb, ub = loop.lb, loop.ub
    x, g = st.x, st.g
    scale = 1.0 / st.scale_inv
    if config.has_bounds:
        v, dv = cl_scaling(x, g, lb, ub)
        v = jnp.where(dv != 0, v * st.scale_inv, v)
        d = jnp.sqrt(v) * scale
        diag_h = g * dv * scale
    else:
        d = scale
        diag_h = jnp.zeros_like(x)
    g_h = d * g
    jh = st.r * d[None, :]
    if config.has_bounds:
        aug = jnp.concatenate([jh, jnp.diag(jnp.sqrt(diag_h))], axis=0)
        u_rhs = jnp.concatenate([st.qtf, jnp.zeros_like(st.qtf)])
    else:
        aug, u_rhs = jh, st.qtf
    u, s, vt = jnp.linalg.svd(aug, full_matrices=False)
    p_h, alpha = solve_subproblem(u.T @ u_rhs, s, vt.T, st.delta, st.alpha, loop.m)
    p = d * p_h
    if config.has_bounds:
        theta = jnp.maximum(0.995, 1.0 - st.g_norm)
        step, step_h, predicted = select_step(
            x, jh, diag_h, g_h, p, p_h, d, st.delta, lb, ub, theta
        )
        x_new = make_strictly_feasible(x + step, lb, ub)
    else:
        step, step_h = p, p_h
        predicted = -quadratic(jh, g_h, p_h)
        x_new = x + step
    ev = _evaluate(problem, config, x_new, data, loop.f_scale)
    nfev = st.nfev + 1
    step_h_norm = jnp.linalg.norm(step_h)
    actual = st.cost - ev.cost
    ratio = jnp.where(
        predicted > 0,
        actual / jnp.where(predicted > 0, predicted, 1.0),
        jnp.where((predicted == 0) & (actual == 0), 1.0, 0.0),
    )
    delta_new = jnp.where(
        ratio < 0.25,
        0.25 * step_h_norm,
        jnp.where((ratio > 0.75) & (step_h_norm > 0.95 * st.delta), 2.0 * st.delta, st.delta),
    )
    step_norm = jnp.linalg.norm(step)
    ftol_ok = (actual < loop.ftol * st.cost) & (ratio > 0.25)
    xtol_ok = step_norm < loop.xtol * (loop.xtol + jnp.linalg.norm(x))
    term = jnp.where(ftol_ok & xtol_ok, 4, jnp.where(ftol_ok, 2, jnp.where(xtol_ok, 3, RUNNING)))
    term = jnp.where(ev.finite, term, RUNNING)
    terminated = term != RUNNING
    delta = jnp.where(ev.finite, jnp.where(terminated, st.delta, delta_new), 0.25 * step_h_norm)
    alpha = jnp.where(
        ev.finite & ~terminated,
        alpha * st.delta / jnp.where(delta_new > 0, delta_new, 1.0),
        alpha,
    )
    accept = ev.finite & (actual > 0)
    done = accept | terminated | (nfev >= loop.max_nfev)
    return Trial(done, accept, x_new, ev, nfev, delta, alpha, term, actual, step_norm, st.xnorm)


def _lm_step(problem: Problem, config: Config, loop: Loop, data: Any, st: State) -> Trial:
    """One trial of Levenberg-Marquardt as MINPACK's ``lmder`` takes it: the damped step, its
    evaluation, the radius update and MINPACK's ``ftol``/``xtol`` tests (relative reductions)."""
    x = st.x
    scale = 1.0 / st.scale_inv
    jh = st.r * scale[None, :]
    g_h = scale * st.g
    u, s, vt = jnp.linalg.svd(jh, full_matrices=False)
    p_h, alpha = solve_subproblem(u.T @ st.qtf, s, vt.T, st.delta, st.alpha, loop.m)
    pnorm = jnp.linalg.norm(p_h)
    delta = jnp.where(st.njev == 1, jnp.minimum(st.delta, pnorm), st.delta)
    x_new = x + scale * p_h
    ev = _evaluate(problem, config, x_new, data, loop.f_scale)
    nfev = st.nfev + 1
    cost = st.cost
    safe_cost = jnp.where(cost > 0, cost, 1.0)
    # MINPACK works with relative reductions: actred = 1 - (|f_new| / |f|)^2.
    close = ev.finite & (0.01 * ev.cost < cost)
    actred = jnp.where(close, 1.0 - ev.cost / safe_cost, -1.0)
    prered = -quadratic(jh, g_h, p_h) / safe_cost
    dirder = (g_h @ p_h) / safe_cost
    # A non-positive predicted reduction (possible when the Jacobian is rank-deficient and the
    # subproblem cannot reach the radius) must never make an uphill step look good.
    ratio = jnp.where(prered > 0, actred / jnp.where(prered > 0, prered, 1.0), 0.0)
    small = ratio <= 0.25
    denom = dirder + 0.5 * actred
    temp = jnp.where(actred >= 0, 0.5, 0.5 * dirder / jnp.where(denom != 0, denom, 1.0))
    temp = jnp.where(~close | (temp < 0.1), 0.1, temp)
    grow = (~small) & ((alpha == 0) | (ratio >= 0.75))
    delta = jnp.where(
        small, temp * jnp.minimum(delta, pnorm / 0.1), jnp.where(grow, pnorm / 0.5, delta)
    )
    alpha = jnp.where(small, alpha / temp, jnp.where(grow, 0.5 * alpha, alpha))
    accept = ev.finite & (ratio >= 1e-4)
    xnorm = jnp.where(accept, jnp.linalg.norm(x_new * st.scale_inv), st.xnorm)
    eps = jnp.finfo(loop.dtype).eps
    ftol_ok = (jnp.abs(actred) <= loop.ftol) & (prered <= loop.ftol) & (0.5 * ratio <= 1.0)
    xtol_ok = delta <= loop.xtol * xnorm
    term = jnp.where(ftol_ok & xtol_ok, 4, jnp.where(ftol_ok, 2, jnp.where(xtol_ok, 3, RUNNING)))
    # MINPACK's "tolerance too small" exits (info 6, 7): nothing more can be gained.
    ftol_eps = (jnp.abs(actred) <= eps) & (prered <= eps) & (0.5 * ratio <= 1.0)
    term = jnp.where(term != RUNNING, term, jnp.where(ftol_eps, 2, term))
    term = jnp.where(term != RUNNING, term, jnp.where(delta <= eps * xnorm, 3, term))
    done = accept | (term != RUNNING) | (nfev >= loop.max_nfev)
    reduction = st.cost - ev.cost
    step_norm = jnp.linalg.norm(scale * p_h)
    return Trial(done, accept, x_new, ev, nfev, delta, alpha, term, reduction, step_norm, xnorm)


def _finish(problem: Problem, config: Config, st: State, scalars: Array, data: Any) -> Output:
    if not config.fun_jac:  # no m-sized outputs, and one evaluation less
        m = jax.eval_shape(lambda x: problem.residual(x, data), st.x).shape[0]
        return Output(packed=_pack(st, m), fun=None, jac=None)
    f_final, jt_final = problem.residual_and_jt(st.x, data)
    _, jts = losses.scale_residuals_and_jacobian(config.loss, f_final, jt_final, scalars[3])
    return Output(packed=_pack(st, f_final.shape[0]), fun=f_final, jac=jts.T)


@_program
def solve(problem: Problem, config: Config, vectors: Array, scalars: Array, data: Any) -> Output:
    """Run a whole fit on the device, unwatched: one program, no host round trip at all.

    ``vectors`` stacks ``(x0, lb, ub, x_scale)`` (shape (4, n)) and ``scalars`` holds ``(ftol,
    xtol, gtol, f_scale, max_nfev)``: few arguments make the per-call dispatch cheap.
    """
    st = _run(problem, config, vectors, scalars, data)
    return _finish(problem, config, st, scalars, data)


def _flatten(st: State) -> Array:
    """The loop state (without records) as one vector: a chunk's carry is a single array, so a
    chunk call passes and returns few buffers. Counters are exact in the float dtype."""
    return jax.flatten_util.ravel_pytree(st._replace(emit=None))[0]


def _flatten_spec(
    problem: Problem, config: Config, vectors: Array, scalars: Array, data: Any
) -> Callable[[Array], State]:
    shapes = jax.eval_shape(
        functools.partial(_initial_state, problem, config), vectors, scalars, data
    )
    zeros = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), shapes._replace(emit=None)
    )
    return jax.flatten_util.ravel_pytree(zeros)[1]


def _chunk_outputs(st: State, m: int) -> tuple[Array, Array]:
    e = st.emit
    dtype = st.x.dtype
    info = jnp.stack([e.filled.astype(dtype), e.trials.astype(dtype), st.reduction, st.step_norm])
    return _flatten(st), jnp.concatenate([_pack(st, m), info, e.buf.reshape(-1)])


@_program
def first_chunk(
    problem: Problem, config: Config, vectors: Array, scalars: Array, data: Any, k: Array
) -> tuple[Array, Array]:
    """Start a watched fit at ``x0`` and run at most ``k`` trials: what ``solve_chunk`` does,
    with the record of iteration 0 first. A fit that ends within ``k`` trials is one program."""
    st = _run(problem, config, vectors, scalars, data, (None, k))
    m = jax.eval_shape(lambda x: problem.residual(x, data), vectors[0]).shape[0]
    return _chunk_outputs(st, m)


@_program
def solve_chunk(
    problem: Problem,
    config: Config,
    vectors: Array,
    scalars: Array,
    data: Any,
    carry: Array,
    k: Array,
) -> tuple[Array, Array]:
    """Run a watched fit for at most ``k`` more trials (see ``stream.emitter.run_chunks``).

    Returns the state to continue from (flat, stays on the device) and, for the host in one
    transfer, ``_pack``'s results, then ``[records, trials, reduction, step_norm]``, then the
    record buffer: see ``unpack_chunk``.
    """
    st = _run(problem, config, vectors, scalars, data, (carry, k))
    m = jax.eval_shape(lambda x: problem.residual(x, data), vectors[0]).shape[0]
    return _chunk_outputs(st, m)


def unpack_chunk(packed: np.ndarray, n: int) -> tuple[dict[str, Any], np.ndarray, int, np.ndarray]:
    """Host side of ``solve_chunk``: (results as ``unpack``, this chunk's record rows, trials,
    the chunk's info: ``[records, trials, reduction, step_norm]``, for ``current_row``)."""
    end = 2 * n + n * n + 6
    v = unpack(packed[:end], n)
    info = packed[end : end + 4]
    filled, trials = int(info[0]), int(info[1])
    rows = packed[end + 4 :].reshape(-1, n + 6)[:filled]
    return v, rows, trials, info


def current_row(v: dict[str, Any], info: np.ndarray) -> np.ndarray:
    """The record of the state a chunk ended in (``unpack_chunk``'s results and info): what a
    stopped fit reports as its last iteration."""
    head = [v["nit"], v["nfev"], v["cost"], info[2], info[3], v["optimality"]]
    return np.concatenate([np.asarray(head, info.dtype), v["x"]])


@_program
def fun_and_jac(
    problem: Problem, config: Config, x: Array, scalars: Array, data: Any
) -> tuple[Array, Array]:
    """Residuals and (loss-scaled) Jacobian at ``x``: a watched fit's ``fun`` and ``jac``,
    dispatched without waiting for them."""
    f, jt = problem.residual_and_jt(x, data)
    _, jts = losses.scale_residuals_and_jacobian(config.loss, f, jt, scalars[3])
    return f, jts.T
