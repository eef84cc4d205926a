"""The demo's physics-informed network for the fractional relaxation equation ``D^alpha u = -lam * u``, ``u(0) = 1``.

The network learns ``u`` on ``[0, horizon]`` from the equation alone: the loss is the mean squared L1-scheme
residual on a uniform grid (:mod:`fracstore.demo.fractional`); no solution values are used in training. The exact
solution ``E_alpha(-lam t^alpha)`` is used only to measure the error.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..manifest import TrainingSummary
from ..model_types import register_model_type
from .fractional import relaxation_exact, relaxation_residual

MODEL_TYPE = "fracstore-demo.relaxation-pinn"


@register_model_type(MODEL_TYPE)
class RelaxationPINN(torch.nn.Module):
    """``u(t) = 1 + s * g(s)`` with ``s = (t / horizon)^alpha`` and ``g`` a small tanh MLP.

    The solution behaves like ``1 - lam t^alpha / Gamma(1 + alpha)`` near 0, which a network of ``t`` fits badly
    (its derivative is infinite at 0). As a function of ``s`` it is smooth (``E_alpha(-lam horizon^alpha s)`` is
    entire in ``s``), and the factor ``s`` makes ``u(0) = 1`` hold exactly, so the loss is the equation alone.

    Args:
        width: hidden units per layer.
        depth: hidden layers.
        alpha: the fractional order the input feature uses.
        horizon: the end of the time interval.
    """

    def __init__(self, width: int = 16, depth: int = 2, alpha: float = 0.75, horizon: float = 1.0) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ConfigError(f"width and depth must be >= 1, not width={width!r}, depth={depth!r}")
        self.alpha = float(alpha)
        self.horizon = float(horizon)
        layers: list[torch.nn.Module] = [torch.nn.Linear(1, width), torch.nn.Tanh()]
        for _ in range(depth - 1):
            layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
        layers.append(torch.nn.Linear(width, 1))
        self.net = torch.nn.Sequential(*layers)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RelaxationPINN:
        """Build from a saved config; keys other than the constructor's (the problem, the optimizer) are records."""
        return cls(
            width=int(config["width"]),
            depth=int(config["depth"]),
            alpha=float(config["alpha"]),
            horizon=float(config["horizon"]),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``u`` at times ``t`` (any shape; the output has the same shape)."""
        s = (t.clamp_min(0.0) / self.horizon) ** self.alpha
        g: torch.Tensor = self.net(s.reshape(-1, 1))
        return 1.0 + s * g.reshape(s.shape)


@dataclass(frozen=True, slots=True)
class Problem:
    """One fractional relaxation problem and the grid its residual is taken on.

    Attributes:
        alpha: the Caputo order, 0 < alpha < 1.
        lam: the relaxation rate.
        horizon: the end of the time interval.
        grid: the number of L1 steps on ``[0, horizon]``.
    """

    alpha: float = 0.75
    lam: float = 1.0
    horizon: float = 1.0
    grid: int = 200

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha must satisfy 0 < alpha < 1, not {self.alpha!r}")
        if not self.horizon > 0.0 or self.grid < 2:
            raise ConfigError(f"need horizon > 0 and grid >= 2, not horizon={self.horizon!r}, grid={self.grid!r}")

    def as_config(self) -> dict[str, Any]:
        """The problem as JSON-like config."""
        return {"alpha": self.alpha, "lam": self.lam, "horizon": self.horizon, "grid": self.grid}


@dataclass(frozen=True, slots=True)
class TrainedPINN:
    """What :func:`train_pinn` produced.

    Attributes:
        model: the trained network (eval mode).
        config: the constructor config (what ``load_model`` rebuilds it from) plus the problem and training settings.
        metrics: ``val_error`` (max error against the exact solution on a validation grid) and ``final_loss``.
        history: ``loss`` per step, and ``val_error`` every ``val_every`` steps (at steps ``val_step``).
        training: duration, steps, final and best loss.
    """

    model: RelaxationPINN
    config: Mapping[str, Any]
    metrics: Mapping[str, float]
    history: Mapping[str, list[float] | list[int]]
    training: TrainingSummary


@functools.lru_cache(maxsize=16)
def _reference(problem: Problem, points: int) -> tuple[np.ndarray, np.ndarray]:
    # Training measures the validation error every few steps; the exact solution on the grid never changes.
    t = np.linspace(0.0, problem.horizon, points)
    return t, relaxation_exact(t, alpha=problem.alpha, lam=problem.lam)


def validation_error(model: torch.nn.Module, problem: Problem, *, points: int = 257) -> float:
    """Max ``|u_model - u_exact|`` on ``points`` equally spaced times in ``[0, horizon]``."""
    t, exact = _reference(problem, points)
    with torch.no_grad():
        predicted = model(torch.as_tensor(t, dtype=torch.float32)).double().numpy()
    return float(np.abs(predicted - exact).max())


def train_pinn(
    problem: Problem,
    *,
    width: int,
    depth: int = 2,
    steps: int = 600,
    lr: float = 1e-2,
    seed: int = 0,
    val_every: int = 50,
) -> TrainedPINN:
    """Train a :class:`RelaxationPINN` on the L1 residual of ``problem`` with Adam (full batch, CPU).

    Raises:
        ConfigError: bad sizes or step counts.
    """
    if steps < 1 or val_every < 1:
        raise ConfigError(f"steps and val_every must be >= 1, not steps={steps!r}, val_every={val_every!r}")
    # A private generator keeps the demo reproducible without touching the caller's global torch seed.
    generator = torch.Generator().manual_seed(seed)
    model = RelaxationPINN(width=width, depth=depth, alpha=problem.alpha, horizon=problem.horizon)
    with torch.no_grad():
        for parameter in model.parameters():
            bound = 1.0 / max(1, parameter.shape[-1]) ** 0.5
            parameter.uniform_(-bound, bound, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    t = torch.linspace(0.0, problem.horizon, problem.grid + 1)
    dt = problem.horizon / problem.grid
    losses: list[float] = []
    val_steps: list[int] = []
    val_errors: list[float] = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        residual = relaxation_residual(model(t), alpha=problem.alpha, lam=problem.lam, dt=dt)
        loss = residual.pow(2).mean()
        torch.autograd.backward(loss)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % val_every == 0 or step == steps:
            val_steps.append(step)
            val_errors.append(validation_error(model, problem))
    duration = time.perf_counter() - started
    model.eval()
    val_error = validation_error(model, problem)
    config = {
        "width": width,
        "depth": depth,
        "alpha": problem.alpha,
        "horizon": problem.horizon,
        "problem": problem.as_config(),
        "optimizer": {"name": "adam", "lr": lr, "steps": steps, "schedule": "cosine", "seed": seed},
    }
    return TrainedPINN(
        model=model,
        config=config,
        metrics={"val_error": val_error, "final_loss": losses[-1]},
        history={"loss": losses, "val_step": val_steps, "val_error": val_errors},
        training=TrainingSummary(
            duration_s=duration, steps=steps, final_loss=losses[-1], best_loss=min(losses), converged=None
        ),
    )
