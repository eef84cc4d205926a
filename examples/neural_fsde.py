"""Model family 4, a neural fractional SDE.

A network f (the drift) and a noise level sigma learn D^alpha y = f(y) + sigma * dW/dt (Caputo, alpha = 0.8, additive
noise) from sample paths of a fractional Ornstein-Uhlenbeck process, D^alpha y = -theta (y - mu) + s * dW/dt. The
model is integrated with the fractional Euler-Maruyama scheme (each step sums the whole past, drift and noise, with
the fractional kernel) and trained by matching the moments of its paths to the observed ones: the mean path and
the standard deviation at every time. The same Brownian increments are reused in every epoch (common random
numbers), which makes the loss deterministic, so L-BFGS can minimise it. Two widths are trained with the seed
project's ``train(..., save_model=True, model_description=..., model_tags=[...])`` shape and checkpointed with the
optimizer state; the best is found with ``get_best_model``, rebuilt with ``load_model`` and simulated from an
initial value it never saw.

    python examples/neural_fsde.py [STORE]      # or set FRACSTORE_EXAMPLES_STORE
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

import fracstore
from fracstore.compat import ModelPersistenceManager
from fracstore.demo.fractional import integrate_fractional
from fracstore.training import OPTIMIZER_TENSORS, Checkpointer

ALPHA, HORIZON, STEPS = 0.8, 2.0, 40
THETA, MU, SIGMA = 1.5, 1.0, 0.3  # the process the observations come from
DT = HORIZON / STEPS
PATHS = 1024  # per initial value: the moments' sampling error is about 0.2 / sqrt(PATHS)


def store_location() -> str:
    """The store: the first argument, else $FRACSTORE_EXAMPLES_STORE, else a folder next to this script."""
    if len(sys.argv) > 1:
        return sys.argv[1]
    return os.environ.get("FRACSTORE_EXAMPLES_STORE") or str(Path(__file__).resolve().parent / "fracstore-examples")


def brownian(paths: int, seed: int) -> torch.Tensor:
    """Brownian increments dW (variance DT) for ``paths`` scalar paths, as (STEPS, paths, 1)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(STEPS, paths, 1, generator=generator) * DT**0.5


def observed(y0: float, *, paths: int, seed: int) -> torch.Tensor:
    """Sample paths of the true process, as (STEPS + 1, paths)."""
    start = torch.full((paths, 1), y0)
    noise = SIGMA * brownian(paths, seed)
    with torch.no_grad():
        return integrate_fractional(lambda y: -THETA * (y - MU), start, alpha=ALPHA, dt=DT, steps=STEPS, noise=noise)[
            :, :, 0
        ]


def moments(paths: torch.Tensor) -> torch.Tensor:
    """Mean and standard deviation over paths at every time, as (2, STEPS + 1)."""
    return torch.stack([paths.mean(dim=1), paths.std(dim=1)])


@fracstore.register_model_type("neural-fsde")
class NeuralFSDE(torch.nn.Module):
    """Drift f(y) as a small MLP and a learned noise level; ``forward(y0, dW)`` simulates paths (STEPS + 1, paths)."""

    def __init__(self, width: int = 16, alpha: float = ALPHA) -> None:
        super().__init__()
        self.alpha = alpha
        self.drift = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        self.log_sigma = torch.nn.Parameter(torch.tensor(-1.0))

    def forward(self, y0: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
        noise = self.log_sigma.exp() * dw
        start = y0.expand(dw.shape[1], 1)
        return integrate_fractional(self.drift, start, alpha=self.alpha, dt=DT, steps=STEPS, noise=noise)[:, :, 0]


def train(
    model: NeuralFSDE,
    *,
    epochs: int,
    store: fracstore.Store | None = None,
    save_model: bool = False,
    model_description: str = "",
    model_tags: tuple[str, ...] | list[str] = (),
    config: dict[str, Any] | None = None,
) -> dict[str, list[float]]:
    """Match the moments of observed paths from y0 = 0 and y0 = 2 (either side of mu); validate from y0 = 1.5."""
    starts = (0.0, 2.0)
    targets = [moments(observed(y0, paths=PATHS, seed=1 + i)) for i, y0 in enumerate(starts)]
    val_target = moments(observed(1.5, paths=PATHS, seed=9))
    dw, val_dw = brownian(PATHS, seed=10), brownian(PATHS, seed=11)  # the model's own noise: fixed (docstring)

    def misfit(y0: float, noise: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (moments(model(torch.full((1,), y0), noise)) - target).pow(2).mean()

    checkpointer = None
    if save_model:
        if store is None:
            raise ValueError("save_model=True needs store=")
        checkpointer = Checkpointer(
            store,
            "neural-fsde",
            config=config,
            tags=model_tags,
            description=model_description,
            every=None,
            save_optimizer=True,
        )
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = sum((misfit(y0, dw, target) for y0, target in zip(starts, targets, strict=True)), torch.zeros(()))
        loss.backward()
        return loss

    history: dict[str, list[float]] = {"loss": [], "val_loss": [], "sigma": []}
    for _ in range(epochs):
        optimizer.step(closure)
        with torch.no_grad():
            loss = sum(misfit(y0, dw, target).item() for y0, target in zip(starts, targets, strict=True))
            val_loss = misfit(1.5, val_dw, val_target).item()
        metrics = {"loss": loss, "val_loss": val_loss, "sigma": model.log_sigma.exp().item()}
        for key, value in metrics.items():
            history[key].append(value)
        if checkpointer is not None:
            checkpointer.step(model, metrics, optimizer=optimizer)
    if checkpointer is not None:
        saved = checkpointer.finish(model, optimizer=optimizer)
        if saved is not None:
            print(
                f"saved {saved.ref}: val_loss {history['val_loss'][-1]:.2e}, sigma {history['sigma'][-1]:.3f} "
                f"(true {SIGMA}), {checkpointer.duration_s:.1f} s, with the optimizer state"
            )
    return history


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: a second thread costs more in synchronisation than it computes
    manager = ModelPersistenceManager(store_location())
    print(f"store: {manager.store.url}")
    for width in (4, 16):
        torch.manual_seed(0)
        config = {"width": width, "alpha": ALPHA}
        train(
            NeuralFSDE(**config),
            epochs=3,
            store=manager.store,
            save_model=True,
            model_description=f"neural fractional SDE D^{ALPHA} y = f(y) + sigma dW/dt, moment-matched",
            model_tags=["neural-fsde", "fractional", "stochastic", "example"],
            config=config,
        )

    best_id = manager.get_best_model("neural-fsde", metric="val_loss")
    print(f"best by val_loss: {best_id}")
    model, config, metadata = manager.load_model(best_id)
    info = manager.get_model_info(best_id)
    assert OPTIMIZER_TENSORS in info["files"]  # the checkpoint can resume training (fracstore.training)
    model.eval()
    with torch.no_grad():
        simulated = moments(model(torch.full((1,), 0.5), brownian(4000, seed=5)))
    truth = moments(observed(0.5, paths=4000, seed=6))
    print(f"loaded {metadata['model_id']} (width {config['width']}); simulated 4000 paths from y0 = 0.5")
    for i in range(0, STEPS + 1, 10):
        print(
            f"  t {i * DT:.1f}: mean {simulated[0, i]:.3f} (true {truth[0, i]:.3f}), "
            f"std {simulated[1, i]:.3f} (true {truth[1, i]:.3f})"
        )
    print(f"max error on new inputs: {(simulated - truth).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
