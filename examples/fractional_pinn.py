"""Model family 1, a physics-informed network (PINN) for a fractional equation.

The network learns u(t) on [0, 1] for the fractional relaxation equation D^alpha u = -lam * u, u(0) = 1 (Caputo
derivative, alpha = 0.7) from the equation alone: the loss is the L1-scheme residual on a uniform grid. Its exact
solution, E_alpha(-lam * t^alpha) (Mittag-Leffler), is used only to validate. Two widths are trained with the seed
project's ``train(..., save_model=True, model_description=..., model_tags=[...])`` shape; the best is found with
``get_best_model``, rebuilt with ``load_model`` and applied to new times. Its error there is mostly the L1 scheme's
own discretisation error (largest near t = 0, where the solution behaves like t^alpha), not the network's.

    python examples/fractional_pinn.py [STORE]      # or set FRACSTORE_EXAMPLES_STORE
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fracstore
from fracstore.compat import ModelPersistenceManager
from fracstore.demo.fractional import relaxation_exact, relaxation_residual
from fracstore.training import Checkpointer

ALPHA, LAM, GRID = 0.7, 1.0, 200


def store_location() -> str:
    """The store: the first argument, else $FRACSTORE_EXAMPLES_STORE, else a folder next to this script."""
    if len(sys.argv) > 1:
        return sys.argv[1]
    return os.environ.get("FRACSTORE_EXAMPLES_STORE") or str(Path(__file__).resolve().parent / "fracstore-examples")


@fracstore.register_model_type("fractional-pinn")
class FractionalPINN(torch.nn.Module):
    """u(t) = 1 + s * g(s), s = t^alpha: smooth in s where u is not in t, and u(0) = 1 by construction."""

    def __init__(self, width: int = 16, alpha: float = ALPHA) -> None:
        super().__init__()
        self.alpha = alpha
        self.g = torch.nn.Sequential(
            torch.nn.Linear(1, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh()
        )
        self.out = torch.nn.Linear(width, 1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        s = t.clamp_min(0.0) ** self.alpha
        return 1.0 + s * self.out(self.g(s.reshape(-1, 1))).reshape(s.shape)


def train(
    model: FractionalPINN,
    *,
    epochs: int,
    store: fracstore.Store | None = None,
    save_model: bool = False,
    model_description: str = "",
    model_tags: tuple[str, ...] | list[str] = (),
    config: dict[str, Any] | None = None,
) -> dict[str, list[Any]]:
    """Fit the residual; with ``save_model`` the trained model is saved (history, duration, metrics) into ``store``."""
    checkpointer = None
    if save_model:
        if store is None:
            raise ValueError("save_model=True needs store=")
        checkpointer = Checkpointer(
            store, "fractional-pinn", config=config, tags=model_tags, description=model_description, every=None
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    t = torch.linspace(0.0, 1.0, GRID + 1)
    t_val = np.linspace(0.0, 1.0, 173)  # a validation grid that is not the training grid
    exact_val = torch.as_tensor(relaxation_exact(t_val, alpha=ALPHA, lam=LAM), dtype=torch.float32)
    history: dict[str, list[Any]] = {"loss": [], "val_loss": []}
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = relaxation_residual(model(t), alpha=ALPHA, lam=LAM, dt=1.0 / GRID).pow(2).mean()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            val_loss = (model(torch.as_tensor(t_val, dtype=torch.float32)) - exact_val).pow(2).mean().item()
        history["loss"].append(loss.item())
        history["val_loss"].append(val_loss)
        if checkpointer is not None:
            checkpointer.step(model, {"loss": loss.item(), "val_loss": val_loss})
    if checkpointer is not None:
        saved = checkpointer.finish(model)
        if saved is not None:
            print(f"saved {saved.ref}: val_loss {val_loss:.2e}, {checkpointer.duration_s:.1f} s")
    return history


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: a second thread costs more in synchronisation than it computes
    manager = ModelPersistenceManager(store_location())
    print(f"store: {manager.store.url}")
    for width in (6, 16):
        torch.manual_seed(0)
        config = {"width": width, "alpha": ALPHA}
        train(
            FractionalPINN(**config),
            epochs=300,
            store=manager.store,
            save_model=True,
            model_description=f"PINN for D^{ALPHA} u = -{LAM} u (L1 scheme, {GRID} steps), width {width}",
            model_tags=["pinn", "fractional", "example"],
            config=config,
        )

    # val_loss is the saved weights' own validation loss; best_val_loss would be the lowest seen while training.
    best_id = manager.get_best_model("fractional-pinn", metric="val_loss")
    print(f"best by val_loss: {best_id}")
    model, config, metadata = manager.load_model(best_id, device="cpu")
    model.eval()
    t_new = torch.tensor([0.05, 0.3, 0.77, 0.95])
    with torch.no_grad():
        predicted = model(t_new).numpy()
    exact = relaxation_exact(t_new.numpy().astype(np.float64), alpha=ALPHA, lam=LAM)
    print(f"loaded {metadata['model_id']} (width {config['width']}, trained {metadata['training_duration']:.1f} s)")
    for ti, pi, ei in zip(t_new.tolist(), predicted.tolist(), exact.tolist(), strict=True):
        print(f"  u({ti:.2f}) = {pi:.4f}   exact {ei:.4f}")
    print(f"max error on new inputs: {np.abs(predicted - exact).max():.2e}")


if __name__ == "__main__":
    main()
