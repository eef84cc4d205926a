"""Numerics of the fractional relaxation equation, for the demo and the examples.

Terms:

* **Caputo derivative** of order ``0 < alpha < 1``:
  ``D^alpha u(t) = 1/Gamma(1-alpha) * int_0^t (t-s)^(-alpha) u'(s) ds``.
* **L1 scheme**: the Caputo derivative on a uniform grid ``t_n = n * dt`` with ``u`` interpolated piecewise linearly,
  ``D^alpha u(t_n) ~ 1/(Gamma(2-alpha) dt^alpha) * sum_{j=0}^{n-1} b_j (u_{n-j} - u_{n-j-1})`` with weights
  ``b_j = (j+1)^(1-alpha) - j^(1-alpha)``. It is exact for linear ``u`` and of order ``2 - alpha`` for smooth ``u``;
  for the relaxation solution, which behaves like ``t^alpha`` at 0, it is of order about ``alpha`` near ``t = 0``.
* **Fractional relaxation**: ``D^alpha u = -lam * u``, ``u(0) = 1``; its exact solution is
  ``u(t) = E_alpha(-lam * t^alpha)``.
* **Mittag-Leffler function** ``E_{alpha,beta}(z) = sum_k z^k / Gamma(alpha k + beta)`` (``E_alpha`` is
  ``beta = 1``), computed here by its power series with a rounding-error bound: the series is used only where that
  bound guarantees the requested relative accuracy (by default 1e-10). For negative ``z`` the terms alternate and
  grow to about ``E_alpha(|z|)`` before they decay, so the bound is about ``eps * E_alpha(|z|) / |E_alpha(z)|``: in
  float64, at the default 1e-10, that allows ``z >= -1.7`` for ``alpha = 1/4``, ``-2.9`` for ``1/2``, ``-4.8`` for
  ``3/4`` and ``-5.5`` for ``1``; positive ``z`` has no cancellation. Outside that range the function raises
  instead of returning digits it cannot vouch for.
* **Explicit fractional integrator**: the Volterra form ``y(t) = y0 + 1/Gamma(alpha) int_0^t (t-s)^(alpha-1)
  f(y(s)) ds`` with ``f`` frozen on each cell (the product-rectangle rule, the predictor of the fractional
  Adams-Bashforth-Moulton method of Diethelm, Ford and Freed), optionally with additive noise increments
  (fractional Euler-Maruyama; the noise integral exists for ``alpha > 1/2``).

Everything here is pure: numpy for references, torch where a loss must be differentiated.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from typing import overload

import numpy as np
import torch

from ..errors import ConfigError

_EPS = sys.float_info.epsilon
_MAX_TERMS = 10_000


def _check_alpha(alpha: float, *, upper: float = 1.0) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 < alpha < upper:
        raise ConfigError(f"the fractional order alpha must be a number with 0 < alpha < {upper:g}, not {alpha!r}")
    return float(alpha)


def _check_step(dt: float) -> float:
    if isinstance(dt, bool) or not isinstance(dt, int | float) or not dt > 0.0 or not math.isfinite(dt):
        raise ConfigError(f"the time step dt must be a positive finite number, not {dt!r}")
    return float(dt)


def l1_weights(n: int, *, alpha: float) -> np.ndarray:
    """The L1 weights ``b_j = (j+1)^(1-alpha) - j^(1-alpha)`` for ``j = 0 .. n-1`` (positive, decreasing).

    Raises:
        ConfigError: ``n < 1`` or ``alpha`` outside (0, 1).
    """
    alpha = _check_alpha(alpha)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of L1 weights must be an int >= 1, not {n!r}")
    j = np.arange(n, dtype=np.float64)
    return np.asarray((j + 1.0) ** (1.0 - alpha) - j ** (1.0 - alpha), dtype=np.float64)


def l1_matrix(n: int, *, alpha: float, dt: float) -> np.ndarray:
    """The L1 scheme as an ``(n, n+1)`` matrix: row ``m-1`` maps ``u_0 .. u_n`` to ``D^alpha u(t_m)``.

    The result is cached and read-only (a training loop applies the same matrix at every step).

    Raises:
        ConfigError: ``n < 1``, ``alpha`` outside (0, 1) or ``dt <= 0``.
    """
    return _l1_matrix(n, _check_alpha(alpha), _check_step(dt))


@functools.lru_cache(maxsize=32)
def _l1_matrix(n: int, alpha: float, dt: float) -> np.ndarray:
    b = l1_weights(n, alpha=alpha)
    scale = 1.0 / (math.gamma(2.0 - alpha) * dt**alpha)
    # D_m = scale * sum_{k=1}^{m} b_{m-k} (u_k - u_{k-1}) collects, for u_k (k >= 1), b_{m-k} - b_{m-k-1} with
    # b_{-1} = 0, and for u_0, -b_{m-1}: a Toeplitz band in the lag m - k plus one column.
    coefficients = np.concatenate(([b[0]], np.diff(b)))  # c_0 = b_0, c_j = b_j - b_{j-1}
    rows = np.arange(1, n + 1)[:, None]
    lag = rows - np.arange(1, n + 1)[None, :]
    matrix = np.zeros((n, n + 1))
    matrix[:, 1:] = np.where(lag >= 0, coefficients[np.clip(lag, 0, n - 1)], 0.0)
    matrix[:, 0] = -b[rows[:, 0] - 1]
    matrix *= scale
    matrix.setflags(write=False)
    return matrix


@overload
def caputo_l1(u: torch.Tensor, *, alpha: float, dt: float) -> torch.Tensor: ...
@overload
def caputo_l1(u: np.ndarray, *, alpha: float, dt: float) -> np.ndarray: ...
def caputo_l1(u: torch.Tensor | np.ndarray, *, alpha: float, dt: float) -> torch.Tensor | np.ndarray:
    """The L1 approximation of ``D^alpha u`` at ``t_1 .. t_n`` from samples ``u_0 .. u_n`` along the last axis.

    A torch tensor stays a torch tensor (differentiable, on its device and dtype); a numpy array stays numpy.

    Raises:
        ConfigError: fewer than two samples, ``alpha`` outside (0, 1) or ``dt <= 0``.
    """
    samples = u.shape[-1]
    if samples < 2:
        raise ConfigError(f"the L1 scheme needs at least 2 samples along the last axis, not {samples}")
    matrix = l1_matrix(samples - 1, alpha=alpha, dt=dt)
    if isinstance(u, torch.Tensor):
        # torch.tensor copies: the cached matrix is read-only, and torch must not share memory it may write.
        return u @ torch.tensor(matrix.T, dtype=u.dtype, device=u.device)
    return np.asarray(u @ matrix.T)


def relaxation_residual(u: torch.Tensor, *, alpha: float, lam: float | torch.Tensor, dt: float) -> torch.Tensor:
    """``D^alpha u + lam * u`` at ``t_1 .. t_n`` (L1 scheme) from samples ``u_0 .. u_n`` along the last axis.

    ``lam`` is a number or a tensor that broadcasts against ``u[..., 1:]`` (one rate per row: shape ``(batch, 1)``).

    Raises:
        ConfigError: as :func:`caputo_l1`.
    """
    return caputo_l1(u, alpha=alpha, dt=dt) + lam * u[..., 1:]


def relaxation_l1_solution(n: int, *, alpha: float, lam: float, horizon: float) -> np.ndarray:
    """The L1 scheme's own solution of ``D^alpha u = -lam * u``, ``u(0) = 1``, at ``t_0 .. t_n`` on ``[0, horizon]``.

    This is what a network trained on the L1 residual converges to at best: its distance from the exact solution
    is the discretisation error, the floor under the network's error on that grid.

    Raises:
        ConfigError: as :func:`l1_matrix`.
    """
    matrix = l1_matrix(n, alpha=alpha, dt=horizon / n)
    # Row m: sum_k M[m, k] u_k + lam u_m = 0 with u_0 = 1; the unknowns' block is lower triangular.
    system = matrix[:, 1:] + lam * np.eye(n)
    return np.concatenate(([1.0], np.linalg.solve(system, -matrix[:, 0])))


def _mittag_leffler_scalar(z: float, alpha: float, beta: float, rtol: float) -> float:
    if z == 0.0:
        return 1.0 / math.gamma(beta)
    terms: list[float] = []
    magnitude = 0.0  # sum of |term|: bounds the rounding error of the alternating sum
    log_abs = math.log(abs(z))
    negative = z < 0.0
    for k in range(_MAX_TERMS):
        argument = alpha * k + beta
        # math.gamma overflows past 171; beyond it the log form keeps the term finite (it is tiny there anyway
        # for any argument the accuracy check lets through).
        if argument < 170.0:
            term = z**k / math.gamma(argument)
        else:
            exponent = k * log_abs - math.lgamma(argument)
            term = math.exp(exponent) if exponent > -745.0 else 0.0
            if negative and k % 2 == 1:
                term = -term
        magnitude += abs(term)
        # Stop once the terms shrink and are negligible. The ratio of consecutive terms, |z| Gamma(alpha k + beta) /
        # Gamma(alpha k + alpha + beta), decreases in k (Gamma is log-convex), so once they shrink they keep
        # shrinking and the tail is below the last term's order of magnitude.
        if k > 2 and abs(term) < abs(terms[-1]) and abs(term) <= _EPS * 1e-3 * magnitude:
            terms.append(term)
            break
        terms.append(term)
    else:
        raise ConfigError(f"the Mittag-Leffler series did not converge within {_MAX_TERMS} terms at z={z!r}")
    value = math.fsum(terms)
    # Each term carries a few ulps of error from z**k and gamma; the fsum adds none beyond the final rounding.
    bound = 8.0 * _EPS * magnitude
    if bound > rtol * abs(value):
        raise ConfigError(
            f"E_{{{alpha:g},{beta:g}}}({z:g}) cannot be computed to relative accuracy {rtol:g} by the power series "
            f"(rounding bound {bound / abs(value) if value else math.inf:.1e}): use a smaller |z| (a shorter time "
            "span or a smaller rate), or accept a larger rtol"
        )
    return value


@overload
def mittag_leffler(z: float, *, alpha: float, beta: float = 1.0, rtol: float = 1e-10) -> float: ...
@overload
def mittag_leffler(z: np.ndarray, *, alpha: float, beta: float = 1.0, rtol: float = 1e-10) -> np.ndarray: ...
def mittag_leffler(
    z: float | np.ndarray, *, alpha: float, beta: float = 1.0, rtol: float = 1e-10
) -> float | np.ndarray:
    """The Mittag-Leffler function ``E_{alpha,beta}(z)`` for real ``z`` (a number or an array), by its power series.

    Args:
        z: where to evaluate it.
        alpha: ``alpha > 0`` (up to 2, which covers ``E_2(-x^2) = cos x``).
        beta: ``beta > 0``.
        rtol: the relative accuracy the result must have; arguments where the series' rounding-error bound
            exceeds it raise (see the module docstring for the range this allows).

    Raises:
        ConfigError: bad ``alpha`` / ``beta`` / ``rtol``, a non-finite ``z``, or a ``z`` too far out for ``rtol``.
    """
    alpha = _check_alpha(alpha, upper=2.0 + 1e-12)
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not beta > 0.0:
        raise ConfigError(f"beta must be a positive number, not {beta!r}")
    if not isinstance(rtol, int | float) or not 0.0 < rtol < 1.0:
        raise ConfigError(f"rtol must be a number in (0, 1), not {rtol!r}")
    values = np.asarray(z, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ConfigError("the Mittag-Leffler function is evaluated only at finite arguments")
    out = np.array([_mittag_leffler_scalar(float(v), alpha, float(beta), float(rtol)) for v in values.ravel()])
    if isinstance(z, np.ndarray):
        return out.reshape(values.shape)
    return float(out[0])


def relaxation_exact(t: np.ndarray, *, alpha: float, lam: float) -> np.ndarray:
    """The exact solution ``E_alpha(-lam * t^alpha)`` of ``D^alpha u = -lam * u``, ``u(0) = 1``, at times ``t >= 0``.

    Raises:
        ConfigError: negative times, or ``lam * t^alpha`` beyond the range :func:`mittag_leffler` can vouch for.
    """
    times = np.asarray(t, dtype=np.float64)
    if np.any(times < 0.0):
        raise ConfigError("the relaxation solution is defined for t >= 0 only")
    return mittag_leffler(-lam * times ** _check_alpha(alpha), alpha=alpha)


def product_rectangle_weights(steps: int, *, alpha: float, dt: float) -> np.ndarray:
    """Kernel weights ``a_m = dt^alpha (m^alpha - (m-1)^alpha) / Gamma(alpha+1)`` for ``m = 1 .. steps``: the exact
    integral of ``(t_n - s)^(alpha-1) / Gamma(alpha)`` over the cell ``m`` steps back.

    Raises:
        ConfigError: ``steps < 1``, ``alpha`` outside (0, 1) or ``dt <= 0``.
    """
    alpha = _check_alpha(alpha)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1, not {steps!r}")
    m = np.arange(1, steps + 1, dtype=np.float64)
    return np.asarray(_check_step(dt) ** alpha * (m**alpha - (m - 1.0) ** alpha) / math.gamma(alpha + 1.0))


def integrate_fractional(
    f: Callable[[torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    *,
    alpha: float,
    dt: float,
    steps: int,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate ``D^alpha y = f(y)`` (plus additive noise) explicitly with the product-rectangle rule.

    ``y_n = y0 + sum_{j<n} a_{n-j} (f(y_j) + noise_j / dt)``: with ``noise_j = sigma * dW_j`` (Brownian increments
    of variance ``dt``) this is the fractional Euler-Maruyama scheme for ``D^alpha y = f(y) + sigma * dW/dt``. The
    cost is quadratic in ``steps`` (every step looks at the whole past: that is the fractional memory). Everything
    stays differentiable, so a loss on the path trains ``f``.

    Args:
        f: the right-hand side, applied to a ``(batch, dim)`` state.
        y0: the initial state, ``(batch, dim)``.
        alpha: the order, 0 < alpha < 1 (use alpha > 1/2 with noise, where the noise integral exists).
        dt: the step.
        steps: how many steps to take.
        noise: optional ``(steps, batch, dim)`` increments added on each cell.

    Returns:
        the path ``y_0 .. y_steps`` as ``(steps + 1, batch, dim)``.

    Raises:
        ConfigError: bad ``alpha``, ``dt`` or ``steps``, or noise of the wrong shape.
    """
    weights = product_rectangle_weights(steps, alpha=alpha, dt=dt)
    if noise is not None and tuple(noise.shape) != (steps, *y0.shape):
        raise ConfigError(f"noise must have shape (steps, *y0.shape) = {(steps, *y0.shape)}, not {tuple(noise.shape)}")
    a = torch.as_tensor(weights, dtype=y0.dtype, device=y0.device)
    path = [y0]
    drives: list[torch.Tensor] = []
    for n in range(1, steps + 1):
        drive = f(path[-1])
        if noise is not None:
            drive = drive + noise[n - 1] / dt
        drives.append(drive)
        # sum_{j=0}^{n-1} a_{n-j} g_j: the newest drive gets a_1, the oldest a_n.
        history = torch.stack(drives)  # (n, batch, dim)
        kernel = a[:n].flip(0)
        path.append(y0 + torch.tensordot(kernel, history, dims=1))
    return torch.stack(path)
