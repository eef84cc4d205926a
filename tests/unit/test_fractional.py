"""Accuracy of the demo's numerics: the L1 scheme, the Mittag-Leffler function, the explicit fractional integrator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fracstore.demo.fractional import (
    caputo_l1,
    integrate_fractional,
    l1_matrix,
    l1_weights,
    mittag_leffler,
    product_rectangle_weights,
    relaxation_exact,
    relaxation_l1_solution,
    relaxation_residual,
)
from fracstore.errors import ConfigError


def _grid(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n + 1)


def test_l1_weights_are_positive_decreasing_and_telescope() -> None:
    b = l1_weights(50, alpha=0.3)
    assert b[0] == 1.0
    assert np.all(b > 0) and np.all(np.diff(b) < 0)
    assert math.isclose(b.sum(), 50 ** (1 - 0.3), rel_tol=1e-12)  # sum telescopes to n^(1-alpha)


def test_l1_matrix_is_the_scheme_as_written() -> None:
    alpha, n, dt = 0.6, 12, 0.05
    u = np.random.default_rng(0).normal(size=n + 1)
    b = l1_weights(n, alpha=alpha)
    scale = 1 / (math.gamma(2 - alpha) * dt**alpha)
    direct = [scale * sum(b[j] * (u[m - j] - u[m - j - 1]) for j in range(m)) for m in range(1, n + 1)]
    np.testing.assert_allclose(l1_matrix(n, alpha=alpha, dt=dt) @ u, direct, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
def test_l1_is_exact_for_a_linear_function(alpha: float) -> None:
    # D^alpha t = t^(1-alpha) / Gamma(2-alpha); the scheme interpolates linearly, so it has no truncation error.
    t = _grid(64)
    exact = t[1:] ** (1 - alpha) / math.gamma(2 - alpha)
    np.testing.assert_allclose(caputo_l1(t, alpha=alpha, dt=1 / 64), exact, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
def test_l1_converges_with_order_two_minus_alpha_on_a_smooth_function(alpha: float) -> None:
    # D^alpha t^2 = 2 t^(2-alpha) / Gamma(3-alpha)
    errors = []
    for n in (32, 64, 128, 256):
        t = _grid(n)
        exact = 2 * t[1:] ** (2 - alpha) / math.gamma(3 - alpha)
        errors.append(np.abs(caputo_l1(t**2, alpha=alpha, dt=1 / n) - exact).max())
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(np.abs(orders - (2 - alpha)) < 0.1), orders


def test_caputo_l1_on_torch_is_differentiable_and_matches_numpy() -> None:
    u = torch.linspace(0, 1, 33, dtype=torch.float64).pow(2).requires_grad_(True)
    d = caputo_l1(u, alpha=0.5, dt=1 / 32)
    np.testing.assert_allclose(d.detach().numpy(), caputo_l1(u.detach().numpy(), alpha=0.5, dt=1 / 32), rtol=1e-14)
    relaxation_residual(u, alpha=0.5, lam=2.0, dt=1 / 32).pow(2).sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


@pytest.mark.parametrize("x", [0.0, 0.1, 0.5, 1.0, 2.0, 2.8])
def test_mittag_leffler_half_matches_erfc(x: float) -> None:
    # E_{1/2}(-x) = exp(x^2) erfc(x) and E_{1/2}(x) = exp(x^2) erfc(-x)
    assert math.isclose(mittag_leffler(-x, alpha=0.5), math.exp(x * x) * math.erfc(x), rel_tol=1e-10)
    assert math.isclose(mittag_leffler(x, alpha=0.5), math.exp(x * x) * math.erfc(-x), rel_tol=1e-12)


@pytest.mark.parametrize("z", [-5.0, -2.0, -0.5, 0.0, 0.5, 3.0, 20.0])
def test_mittag_leffler_one_is_exp(z: float) -> None:
    assert math.isclose(mittag_leffler(z, alpha=1.0), math.exp(z), rel_tol=1e-10)


def test_mittag_leffler_other_closed_forms() -> None:
    for x in (0.5, 1.0, 2.0):
        assert math.isclose(mittag_leffler(-x * x, alpha=2.0), math.cos(x), rel_tol=1e-10)  # E_2(-x^2) = cos x
        assert math.isclose(mittag_leffler(x, alpha=1.0, beta=2.0), math.expm1(x) / x, rel_tol=1e-12)
    z = np.array([[-1.0, 0.0], [0.5, 1.0]])
    np.testing.assert_allclose(mittag_leffler(z, alpha=1.0), np.exp(z), rtol=1e-12)


def test_mittag_leffler_refuses_arguments_it_cannot_compute_accurately() -> None:
    with pytest.raises(ConfigError, match="smaller"):
        mittag_leffler(-4.0, alpha=0.5)
    assert math.isclose(mittag_leffler(-4.0, alpha=0.5, rtol=1e-6), math.exp(16) * math.erfc(4), rel_tol=1e-6)
    with pytest.raises(ConfigError):
        mittag_leffler(math.nan, alpha=0.5)
    with pytest.raises(ConfigError):
        mittag_leffler(1.0, alpha=0.0)


def test_relaxation_exact_starts_at_one_and_decays() -> None:
    u = relaxation_exact(np.linspace(0, 1, 11), alpha=0.75, lam=1.0)
    assert u[0] == 1.0 and np.all(np.diff(u) < 0)


def test_l1_solution_converges_to_the_exact_relaxation() -> None:
    # The solution behaves like t^alpha at 0, so the order on a uniform grid is about alpha there, not 2 - alpha.
    errors = []
    for n in (50, 100, 200, 400):
        u = relaxation_l1_solution(n, alpha=0.75, lam=1.0, horizon=1.0)
        errors.append(np.abs(u - relaxation_exact(_grid(n), alpha=0.75, lam=1.0)).max())
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(orders > 0.6) and errors[-1] < 2.5e-3, errors


def test_explicit_integrator_converges_to_the_exact_relaxation() -> None:
    errors = []
    for n in (25, 50, 100, 200):
        path = integrate_fractional(lambda y: -y, torch.ones(1, 1, dtype=torch.float64), alpha=0.75, dt=1 / n, steps=n)
        errors.append(np.abs(path[:, 0, 0].numpy() - relaxation_exact(_grid(n), alpha=0.75, lam=1.0)).max())
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(orders > 0.9) and errors[-1] < 1e-3, errors


def test_product_rectangle_weights_integrate_the_kernel() -> None:
    a = product_rectangle_weights(40, alpha=0.3, dt=0.1)
    assert math.isclose(a.sum(), 4.0**0.3 / math.gamma(1.3), rel_tol=1e-12)  # int_0^T (T-s)^(a-1)/Gamma(a) ds


def test_integrator_noise_is_added_and_checked() -> None:
    y0 = torch.zeros(3, 2, dtype=torch.float64)
    noise = torch.randn(10, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1
    quiet = integrate_fractional(lambda y: -y, y0, alpha=0.8, dt=0.1, steps=10)
    noisy = integrate_fractional(lambda y: -y, y0, alpha=0.8, dt=0.1, steps=10, noise=noise)
    assert torch.all(quiet == 0) and not torch.allclose(noisy, quiet)
    with pytest.raises(ConfigError, match="shape"):
        integrate_fractional(lambda y: -y, y0, alpha=0.8, dt=0.1, steps=10, noise=noise[:5])
