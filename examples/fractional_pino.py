"""Model family 2, a physics-informed neural operator (PINO) with a Fourier layer.

The operator maps a relaxation rate lam to the whole solution u(t) of D^alpha u = -lam * u, u(0) = 1 on a uniform
grid of [0, 1] (Caputo derivative, alpha = 0.7), for any lam in [0.5, 2]: one forward pass per lam, no retraining.
It is a small Fourier neural operator (lift, two spectral convolutions over the lowest modes plus pointwise paths,
projection) trained PINO-style on a data loss (exact Mittag-Leffler solutions for a few rates) plus the physics
loss (the L1-scheme residual for random rates, where no data is used). Training is checkpointed every 100 epochs,
keeping the last checkpoint and the best one, tagged ``pino:best``; the best is then found with ``get_best_model``,
rebuilt with ``load_model`` and applied to rates it never saw. Its error is largest at the first grid step, where
the L1 residual (which the physics loss drives to zero) and the exact solution disagree most.

    python examples/fractional_pino.py [STORE]      # or set FRACSTORE_EXAMPLES_STORE
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

import fracstore
from fracstore.compat import ModelPersistenceManager
from fracstore.demo.fractional import relaxation_exact, relaxation_residual
from fracstore.training import Checkpointer

ALPHA, GRID, LAM_RANGE = 0.7, 64, (0.5, 2.0)
TIMES = torch.linspace(0.0, 1.0, GRID + 1)


def store_location() -> str:
    """The store: the first argument, else $FRACSTORE_EXAMPLES_STORE, else a folder next to this script."""
    if len(sys.argv) > 1:
        return sys.argv[1]
    return os.environ.get("FRACSTORE_EXAMPLES_STORE") or str(Path(__file__).resolve().parent / "fracstore-examples")


def exact_solutions(lams: torch.Tensor) -> torch.Tensor:
    """E_alpha(-lam t^alpha) on the grid, one row per rate."""
    t = TIMES.double().numpy()
    return torch.stack([torch.as_tensor(relaxation_exact(t, alpha=ALPHA, lam=float(lam))) for lam in lams]).float()


class SpectralConv(torch.nn.Module):
    """Multiply the lowest ``modes`` Fourier coefficients by learned complex channel-mixing weights.

    The weights are kept as separate real and imaginary parts, so every saved tensor is a plain float tensor.
    """

    def __init__(self, width: int, modes: int) -> None:
        super().__init__()
        scale = 1.0 / width
        self.modes = modes
        self.weight_real = torch.nn.Parameter(scale * torch.randn(width, width, modes))
        self.weight_imag = torch.nn.Parameter(scale * torch.randn(width, width, modes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, width, points)
        coefficients = torch.fft.rfft(x, dim=-1)[..., : self.modes]
        weight = torch.complex(self.weight_real, self.weight_imag)
        mixed = torch.einsum("bim,iom->bom", coefficients, weight)
        spectrum = torch.zeros(x.shape[0], x.shape[1], x.shape[-1] // 2 + 1, dtype=mixed.dtype)
        spectrum[..., : self.modes] = mixed
        return torch.fft.irfft(spectrum, n=x.shape[-1], dim=-1)


@fracstore.register_model_type("pino")
class FourierOperator(torch.nn.Module):
    """lam -> u on the grid. Input channels per grid point: lam, t, t^alpha; u = 1 + t^alpha * v keeps u(0) = 1."""

    def __init__(self, width: int = 16, modes: int = 12, layers: int = 2) -> None:
        super().__init__()
        self.lift = torch.nn.Conv1d(3, width, 1)
        self.spectral = torch.nn.ModuleList(SpectralConv(width, modes) for _ in range(layers))
        self.pointwise = torch.nn.ModuleList(torch.nn.Conv1d(width, width, 1) for _ in range(layers))
        self.project = torch.nn.Sequential(
            torch.nn.Conv1d(width, width, 1), torch.nn.GELU(), torch.nn.Conv1d(width, 1, 1)
        )

    def forward(self, lam: torch.Tensor) -> torch.Tensor:  # lam: (batch,) -> u: (batch, GRID + 1)
        s = TIMES**ALPHA
        features = torch.stack(
            [lam[:, None].expand(-1, TIMES.numel()), TIMES.expand(lam.numel(), -1), s.expand(lam.numel(), -1)], dim=1
        )
        x = self.lift(features)
        for spectral, pointwise in zip(self.spectral, self.pointwise, strict=True):
            x = torch.nn.functional.gelu(spectral(x) + pointwise(x))
        return 1.0 + s * self.project(x)[:, 0]


def train(
    model: FourierOperator,
    *,
    epochs: int,
    store: fracstore.Store | None = None,
    save_model: bool = False,
    model_description: str = "",
    model_tags: tuple[str, ...] | list[str] = (),
    config: dict[str, Any] | None = None,
) -> dict[str, list[float]]:
    """Data loss on 4 rates + physics loss on 8 random rates per epoch; validation on rates used for neither."""
    checkpointer = None
    if save_model:
        if store is None:
            raise ValueError("save_model=True needs store=")
        checkpointer = Checkpointer(
            store, "pino", config=config, tags=model_tags, description=model_description, every=100, keep_last=1
        )
    generator = torch.Generator().manual_seed(0)
    data_lams = torch.tensor([0.5, 1.0, 1.5, 2.0])
    data = exact_solutions(data_lams)
    val_lams = torch.tensor([0.75, 1.25, 1.75])
    val_exact = exact_solutions(val_lams)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    history: dict[str, list[float]] = {"loss": [], "data_loss": [], "physics_loss": [], "val_loss": []}
    for _ in range(epochs):
        optimizer.zero_grad()
        data_loss = (model(data_lams) - data).pow(2).mean()
        low, high = LAM_RANGE
        lams = low + (high - low) * torch.rand(8, generator=generator)
        residual = relaxation_residual(model(lams), alpha=ALPHA, lam=lams[:, None], dt=1.0 / GRID)
        physics_loss = (
            1e-2 * residual.pow(2).mean()
        )  # the residual scales like dt^-alpha times the error: weigh it down
        loss = data_loss + physics_loss
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            val_loss = (model(val_lams) - val_exact).pow(2).mean().item()
        metrics = {"loss": loss.item(), "data_loss": data_loss.item(), "physics_loss": physics_loss.item()}
        for key, value in {**metrics, "val_loss": val_loss}.items():
            history[key].append(value)
        if checkpointer is not None:
            saved = checkpointer.step(model, {**metrics, "val_loss": val_loss})
            if saved is not None:
                print(f"checkpoint {saved.ref}: val_loss {val_loss:.2e}")
    if checkpointer is not None:
        checkpointer.finish(model)
        kept = [s.ref for s in checkpointer.saved if s.ref not in checkpointer.deleted]
        print(f"this run kept {', '.join(kept)} and deleted {', '.join(checkpointer.deleted) or 'nothing'}")
        if checkpointer.best is not None:
            print(f"best checkpoint of this run: {checkpointer.best.ref} (tagged pino:best)")
    return history


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: a second thread costs more in synchronisation than it computes
    manager = ModelPersistenceManager(store_location())
    print(f"store: {manager.store.url}")
    torch.manual_seed(0)
    config = {"width": 16, "modes": 12, "layers": 2}
    train(
        FourierOperator(**config),
        epochs=300,
        store=manager.store,
        save_model=True,
        model_description=f"PINO (Fourier layers) lam -> u for D^{ALPHA} u = -lam u on {GRID} steps",
        model_tags=["pino", "neural-operator", "fractional", "example"],
        config=config,
    )
    best_id = manager.get_best_model("pino", metric="val_loss")
    print(f"best by val_loss: {best_id}")
    model, config, metadata = manager.load_model(best_id)
    model.eval()
    new_lams = torch.tensor([0.6, 1.1, 1.9])
    with torch.no_grad():
        predicted = model(new_lams)
    error = (predicted - exact_solutions(new_lams)).abs().max().item()
    print(f"loaded {metadata['model_id']} ({config}); applied to rates it never saw")
    exact_end = exact_solutions(new_lams)[:, -1]
    for lam, u_end, e_end in zip(new_lams.tolist(), predicted[:, -1].tolist(), exact_end.tolist(), strict=True):
        print(f"  lam {lam:.2f}: u(1) = {u_end:.4f}   exact {e_end:.4f}")
    print(f"max error on new inputs: {error:.2e}")


if __name__ == "__main__":
    main()
