"""Model family 3, a neural fractional ODE.

A network f learns the right-hand side of D^alpha y = f(y) (Caputo derivative, alpha = 0.8) from trajectories of
the fractional logistic equation D^alpha y = r y (1 - y). The model is integrated with the explicit
product-rectangle rule (the predictor of the fractional Adams method, whose every step looks at the whole past:
the fractional memory), and trained by backpropagating a trajectory loss through the integrator (L-BFGS). The reference
trajectories come from the same scheme on a 10x finer grid. Two widths are trained with the seed project's
``train(..., save_model=True, model_description=..., model_tags=[...])`` shape and saved through the
``ModelPersistenceManager`` facade; the best is found with ``get_best_model``, rebuilt with ``load_model`` and
integrated from an initial value it never saw.

    python examples/neural_fode.py [STORE]      # or set FRACSTORE_EXAMPLES_STORE
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import fracstore
from fracstore.compat import ModelPersistenceManager
from fracstore.demo.fractional import integrate_fractional

ALPHA, RATE, HORIZON, STEPS, FINE = 0.8, 2.0, 4.0, 40, 10


def store_location() -> str:
    """The store: the first argument, else $FRACSTORE_EXAMPLES_STORE, else a folder next to this script."""
    if len(sys.argv) > 1:
        return sys.argv[1]
    return os.environ.get("FRACSTORE_EXAMPLES_STORE") or str(Path(__file__).resolve().parent / "fracstore-examples")


def reference(y0: list[float]) -> torch.Tensor:
    """Logistic trajectories from the initial values ``y0`` at the STEPS + 1 grid times, as (STEPS + 1, batch)."""
    start = torch.tensor(y0, dtype=torch.float64)[:, None]
    with torch.no_grad():
        fine = integrate_fractional(
            lambda y: RATE * y * (1 - y), start, alpha=ALPHA, dt=HORIZON / (STEPS * FINE), steps=STEPS * FINE
        )
    return fine[::FINE, :, 0].float()


@fracstore.register_model_type("neural-fode")
class NeuralFODE(torch.nn.Module):
    """f(y) as a small MLP; ``forward(y0)`` integrates D^alpha y = f(y) over the grid and returns the path."""

    def __init__(self, width: int = 16, alpha: float = ALPHA, horizon: float = HORIZON, steps: int = STEPS) -> None:
        super().__init__()
        self.alpha, self.dt, self.steps = alpha, horizon / steps, steps
        self.f = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))

    def forward(self, y0: torch.Tensor) -> torch.Tensor:  # y0: (batch,) -> path: (steps + 1, batch)
        path = integrate_fractional(self.f, y0[:, None], alpha=self.alpha, dt=self.dt, steps=self.steps)
        return path[:, :, 0]


def train(
    model: NeuralFODE,
    *,
    epochs: int,
    manager: ModelPersistenceManager | None = None,
    save_model: bool = False,
    model_description: str = "",
    model_tags: tuple[str, ...] | list[str] = (),
    config: dict[str, Any] | None = None,
) -> dict[str, list[float]]:
    """Fit trajectories from y0 = 0.05, 0.5, 0.9; validate on y0 = 0.3 (used for neither)."""
    train_y0, val_y0 = [0.05, 0.5, 0.9], [0.3]
    target, val_target = reference(train_y0), reference(val_y0)
    # Adam stalls on this loss for hundreds of epochs (the memory couples every step to all earlier ones, which
    # makes it ill-conditioned); L-BFGS with a line search solves it in a few epochs of 20 iterations.
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=20, line_search_fn="strong_wolfe")
    history: dict[str, list[float]] = {"loss": [], "val_loss": []}
    started = time.perf_counter()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (model(torch.tensor(train_y0)) - target).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(epochs):
        optimizer.step(closure)
        with torch.no_grad():
            loss = (model(torch.tensor(train_y0)) - target).pow(2).mean()
            history["val_loss"].append((model(torch.tensor(val_y0)) - val_target).pow(2).mean().item())
        history["loss"].append(loss.item())
    duration = time.perf_counter() - started
    if save_model:
        if manager is None:
            raise ValueError("save_model=True needs manager=")
        model_id = manager.save_model(
            model,
            "neural-fode",
            config=config,
            training_history=history,
            description=model_description,
            tags=model_tags,
            metrics={"val_loss": history["val_loss"][-1], "loss": history["loss"][-1]},
            training_duration=duration,
            final_loss=history["loss"][-1],
            best_val_loss=min(history["val_loss"]),
            epochs=epochs,
        )
        print(f"saved {model_id}: val_loss {history['val_loss'][-1]:.2e}, {duration:.1f} s")
    return history


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: a second thread costs more in synchronisation than it computes
    manager = ModelPersistenceManager(store_location())
    print(f"store: {manager.store.url}")
    for width in (4, 16):
        torch.manual_seed(0)
        config = {"width": width, "alpha": ALPHA, "horizon": HORIZON, "steps": STEPS}
        train(
            NeuralFODE(**config),
            epochs=4,
            manager=manager,
            save_model=True,
            model_description=f"neural fractional ODE D^{ALPHA} y = f(y) fitted to logistic trajectories",
            model_tags=["neural-fode", "fractional", "example"],
            config=config,
        )
    models = manager.list_models(model_type="neural-fode")  # a DataFrame with pandas, else a RecordTable
    print(f"models of type neural-fode: {', '.join(models['model_id'].values)}")

    best_id = manager.get_best_model("neural-fode", metric="val_loss")
    print(f"best by val_loss: {best_id}")
    model, config, metadata = manager.load_model(best_id)
    model.eval()
    with torch.no_grad():
        predicted = model(torch.tensor([0.7]))[:, 0]
    exact = reference([0.7])[:, 0]
    print(f"loaded {metadata['model_id']} (width {config['width']}); integrated from y0 = 0.7")
    for i in range(0, STEPS + 1, 10):
        print(f"  y({i * HORIZON / STEPS:.1f}) = {predicted[i]:.4f}   reference {exact[i]:.4f}")
    print(f"max error on new inputs: {(predicted - exact).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
