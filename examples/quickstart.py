"""Train a tiny physics-informed network three times, save every version, find the best, load it and apply it.

The network learns u(t) on [0, 2] for the relaxation equation u' = -lam * u, u(0) = 1 (exact: exp(-lam * t)) from
the equation alone: the loss is the ODE residual at collocation points plus the initial condition. Everything runs
on the CPU in a few seconds, offline, into a local store (default: ./fracstore-quickstart, or the first argument).

    python examples/quickstart.py [STORE_URL]
"""

from __future__ import annotations

import sys
import time

import torch

import fracstore


@fracstore.register_model_type("pinn")
class RelaxationPINN(torch.nn.Module):
    """u(t) as a small tanh MLP."""

    def __init__(self, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Linear(1, width), torch.nn.Tanh()]
        for _ in range(depth - 1):
            layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
        layers.append(torch.nn.Linear(width, 1))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(t)


def train(width: int, *, lam: float = 1.5, epochs: int = 400, seed: int = 0) -> tuple[RelaxationPINN, dict, dict]:
    """Fit the PINN; return the model, its history and its training summary."""
    torch.manual_seed(seed)
    model = RelaxationPINN(width=width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    t = torch.linspace(0, 2, 64).reshape(-1, 1).requires_grad_(True)
    t_val = torch.linspace(0, 2, 101).reshape(-1, 1)
    history: dict[str, list[float]] = {"loss": [], "residual": [], "initial": [], "val_error": []}
    start = time.perf_counter()
    for _ in range(epochs):
        optimizer.zero_grad()
        u = model(t)
        (du,) = torch.autograd.grad(u.sum(), t, create_graph=True)
        residual = ((du + lam * u) ** 2).mean()
        initial = (model(torch.zeros(1, 1)) - 1.0).pow(2).mean()
        loss = residual + initial
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            val_error = (model(t_val) - torch.exp(-lam * t_val)).abs().max().item()
        history["loss"].append(loss.item())
        history["residual"].append(residual.item())
        history["initial"].append(initial.item())
        history["val_error"].append(val_error)
    summary = {
        "duration_s": time.perf_counter() - start,
        "epochs": epochs,
        "final_loss": history["loss"][-1],
        "best_loss": min(history["loss"]),
        "converged": history["loss"][-1] < 1e-3,
    }
    return model, history, summary


def main(url: str) -> None:
    store = fracstore.Store.open(url)
    print(f"store: {store.url}")
    for width in (4, 16, 32):
        model, history, summary = train(width)
        saved = store.save(
            model,
            name="relaxation-pinn",
            config={"width": width, "depth": 2},
            metrics={"val_error": history["val_error"][-1], "final_loss": history["loss"][-1]},
            history=history,
            training=summary,
            tags=["demo", "relaxation"],
            description=f"PINN for u' = -1.5 u, width {width}",
        )
        print(f"saved {saved.ref} ({saved.digest.short}): wrote {saved.bytes_written} of {saved.bytes_total} bytes")

    print("\nversions:")
    for record in store.list("relaxation-pinn"):
        print(f"  {record.ref:<22} width={record.config['width']:<3} val_error={record.metrics['val_error']:.2e}")

    best = store.best("val_error", name="relaxation-pinn")
    assert best is not None
    store.tag(best.ref, "best")
    print(f"\nbest by val_error: {best.ref} (tagged relaxation-pinn:best)")

    model = store.load_model("relaxation-pinn:best")
    model.eval()
    t_new = torch.tensor([[0.25], [1.0], [1.75]])
    with torch.no_grad():
        prediction = model(t_new)
    exact = torch.exp(-1.5 * t_new)
    for ti, pi, ei in zip(t_new.flatten(), prediction.flatten(), exact.flatten(), strict=True):
        print(f"  u({ti:.2f}) = {pi:.4f}   exact {ei:.4f}")
    error = (prediction - exact).abs().max().item()
    print(f"max error of the loaded model on new inputs: {error:.2e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fracstore-quickstart")
