"""The end-to-end demo: train, save versions, list, pick the best, load and apply it, export and import a bundle.

:func:`run_demo` does the whole job on the CPU, offline, without configuration, in a few seconds, and returns a
:class:`DemoReport`. It never prints: progress goes to the ``say`` callback as human-readable lines.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..bundle import export_bundle, import_bundle
from ..config import default_store_url
from ..errors import ConfigError
from ..store import Store
from .fractional import relaxation_exact, relaxation_l1_solution
from .pinn import Problem, train_pinn

MODEL_NAME = "fracstore-demo-pinn"
BEST_TAG = "best"
METRIC = "val_error"
LABELS = ("demo", "fractional", "pinn")
PROBLEM = Problem(alpha=0.75, lam=1.0, horizon=1.0, grid=400)
# (width, Adam steps): wider and longer runs reach the L1 discretisation floor, the narrow one does not.
VERSIONS: tuple[tuple[int, int], ...] = ((8, 400), (16, 600), (32, 800))
NEW_INPUTS = 1000
SHOWN_INPUTS = 5


@dataclass(frozen=True, slots=True)
class SavedVersion:
    """One version the demo trained and saved.

    Attributes:
        ref: ``name@version``.
        digest: the manifest digest.
        width, steps: what distinguishes it.
        val_error: max error against the exact solution on the validation grid.
        final_loss: the last training loss (mean squared L1 residual).
        duration_s: training time.
        bytes_written: bytes the save added to the store.
    """

    ref: str
    digest: str
    width: int
    steps: int
    val_error: float
    final_loss: float
    duration_s: float
    bytes_written: int


@dataclass(frozen=True, slots=True)
class ListedVersion:
    """One live version of the demo's model in the store (earlier runs' versions included).

    Attributes:
        ref: ``name@version``.
        val_error: its validation error, or None when it has none.
        aliases: the registry tags pointing at it.
    """

    ref: str
    val_error: float | None
    aliases: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Sample:
    """The loaded model at one new input time, next to the exact solution."""

    t: float
    predicted: float
    exact: float


@dataclass(frozen=True, slots=True)
class DemoReport:
    """Everything :func:`run_demo` did and where.

    Attributes:
        store_url: the store trained models were saved into.
        second_store_url: the store the bundle was imported into.
        workdir: the folder holding the bundle (and, by default, the second store).
        name: the model name.
        alpha, lam, horizon, grid: the problem (``D^alpha u = -lam u`` on ``[0, horizon]``, ``grid`` L1 steps).
        scheme_error: the L1 scheme's own max error on that grid: the floor under any network trained on it.
        saved: the versions this run saved.
        listed: every live version of ``name`` in the store after saving, oldest first.
        best_ref: the best version by ``val_error`` among ``listed``, tagged ``name:best``.
        best_val_error: its validation error.
        new_inputs: how many new input times the loaded model was applied to.
        samples: a few of them, with prediction and exact value.
        test_error: max ``|u_model - u_exact|`` over all new inputs.
        bundle_path: the exported bundle (the best version, with its registry tags).
        bundle_bytes: its size.
        imported_refs: the imported versions as the second store names them (``name@version``).
        published_refs: those the import newly published (empty when the second store had them already).
        imported_difference: max difference between the imported copy's and the original's predictions on the new
            inputs (0.0: the bundle carries the weights bit for bit).
        duration_s: the whole demo's wall-clock time.
    """

    store_url: str
    second_store_url: str
    workdir: Path
    name: str
    alpha: float
    lam: float
    horizon: float
    grid: int
    scheme_error: float
    saved: tuple[SavedVersion, ...]
    listed: tuple[ListedVersion, ...]
    best_ref: str
    best_val_error: float
    new_inputs: int
    samples: tuple[Sample, ...]
    test_error: float
    bundle_path: Path
    bundle_bytes: int
    imported_refs: tuple[str, ...]
    published_refs: tuple[str, ...]
    imported_difference: float
    duration_s: float


def _new_inputs(count: int, horizon: float) -> torch.Tensor:
    # Random times in (0, horizon], drawn from a private generator: off the training grid, and the same every run.
    generator = torch.Generator().manual_seed(20241201)
    return torch.rand(count, generator=generator, dtype=torch.float64).mul(horizon).clamp_min(1e-6)


def _predict(model: torch.nn.Module, t: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.asarray(model(t.float()).double().numpy())


def _free_path(folder: Path, stem: str, suffix: str) -> Path:
    # A second run into the same workdir gets a new file instead of overwriting (or failing on) the first bundle.
    candidate = folder / f"{stem}{suffix}"
    counter = 2
    while candidate.exists():
        candidate = folder / f"{stem}-{counter}{suffix}"
        counter += 1
    return candidate


def run_demo(
    *,
    store_url: str | None = None,
    second_store_url: str | None = None,
    workdir: Path | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> DemoReport:
    """Run the demo end to end and report what it did.

    It trains a physics-informed network for ``D^alpha u = -lam u``, ``u(0) = 1`` (Caputo derivative, L1 scheme)
    in a few sizes, saves each as a new version of ``fracstore-demo-pinn`` with config, metrics, history, labels,
    description and training summary, lists the versions, tags the best by validation error ``best``, loads it with
    ``load_model`` and applies it to new inputs, then exports it as a bundle and imports that into a second store.
    Running it again adds new versions and repeats the same flow; nothing else in the store is touched.

    The tensors are tiny, so torch's intra-op threads only add synchronisation: call ``torch.set_num_threads(1)``
    before it (the thread count is process-wide, so the library leaves it to the caller). Measured on a busy 2-core
    machine: 5-10 s with one thread, 50-70 s with two.

    Args:
        store_url: where to save (default: :func:`fracstore.config.default_store_url`).
        second_store_url: where to import the bundle (default: ``second-store`` under ``workdir``).
        workdir: where the bundle goes (default: a new temporary folder, which is kept and reported).
        say: receives one human-readable line per step.

    Raises:
        ConfigError: ``second_store_url`` is the store itself (the import would prove nothing).
        FracstoreError: any store error, as raised by :class:`~fracstore.Store`.
    """
    started = time.perf_counter()
    url = store_url if store_url is not None else default_store_url()
    folder = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fracstore-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    second_url = second_store_url if second_store_url is not None else str(folder / "second-store")

    store = Store.open(url)
    second = Store.open(second_url)
    # Checked before training: an import into the store itself would prove nothing.
    if second.id == store.id:
        raise ConfigError(f"second_store_url {second_url!r} is the demo store itself; give another location")
    say(f"store: {store.url}")
    problem = PROBLEM
    scheme = relaxation_l1_solution(problem.grid, alpha=problem.alpha, lam=problem.lam, horizon=problem.horizon)
    grid_t = np.linspace(0.0, problem.horizon, problem.grid + 1)
    scheme_error = float(np.abs(scheme - relaxation_exact(grid_t, alpha=problem.alpha, lam=problem.lam)).max())
    say(
        f"problem: Caputo D^{problem.alpha:g} u = -{problem.lam:g} u, u(0) = 1 on [0, {problem.horizon:g}], "
        f"L1 scheme on {problem.grid} steps (its own max error: {scheme_error:.2e})"
    )

    saved: list[SavedVersion] = []
    for width, steps in VERSIONS:
        say(f"training width {width}, {steps} steps ...")
        trained = train_pinn(problem, width=width, steps=steps)
        result = store.save(
            trained.model,
            name=MODEL_NAME,
            config=trained.config,
            metrics=trained.metrics,
            history=trained.history,
            training=trained.training,
            tags=LABELS,
            description=(
                f"PINN for the fractional relaxation equation D^{problem.alpha:g} u = -{problem.lam:g} u "
                f"(Caputo, L1 scheme on {problem.grid} steps), width {width}, {steps} Adam steps"
            ),
        )
        version = SavedVersion(
            ref=result.ref,
            digest=str(result.digest),
            width=width,
            steps=steps,
            val_error=trained.metrics[METRIC],
            final_loss=trained.metrics["final_loss"],
            duration_s=trained.training.duration_s or 0.0,
            bytes_written=result.bytes_written,
        )
        saved.append(version)
        say(
            f"saved {version.ref}: val_error {version.val_error:.2e}, final loss {version.final_loss:.2e}, "
            f"trained in {version.duration_s:.1f} s, wrote {version.bytes_written} bytes"
        )

    listed = tuple(
        ListedVersion(ref=r.ref, val_error=r.metric(METRIC), aliases=tuple(r.tags)) for r in store.list(MODEL_NAME)
    )
    say(f"{len(listed)} live versions of {MODEL_NAME} in the store")
    best = store.best(METRIC, name=MODEL_NAME)
    best_val_error = None if best is None else best.metric(METRIC)
    if best is None or best_val_error is None:
        # Only possible when another process deleted every version between the saves and this query.
        raise ConfigError(f"no version of {MODEL_NAME} with {METRIC} left in {store.url}; run the demo again")
    store.tag(best.ref, BEST_TAG)
    say(f"best by {METRIC}: {best.ref} ({best_val_error:.2e}), tagged {MODEL_NAME}:{BEST_TAG}")

    # By name@version, not by the tag: a concurrent demo run may move the tag in between.
    model = store.load_model(best.ref)
    t_new = _new_inputs(NEW_INPUTS, problem.horizon)
    predicted = _predict(model, t_new)
    exact = relaxation_exact(t_new.numpy(), alpha=problem.alpha, lam=problem.lam)
    test_error = float(np.abs(predicted - exact).max())
    samples = tuple(
        Sample(t=float(t_new[i]), predicted=float(predicted[i]), exact=float(exact[i])) for i in range(SHOWN_INPUTS)
    )
    say(f"loaded {best.ref} with load_model; max error on {NEW_INPUTS} new inputs: {test_error:.2e}")

    bundle_path = _free_path(folder, f"{MODEL_NAME}-v{best.version}", ".zip")
    exported = export_bundle(store, [best.ref], bundle_path)
    say(f"exported {best.ref} to {exported.path} ({exported.file_size} bytes, {exported.blob_count} blobs)")
    imported = import_bundle(second, bundle_path)
    imported_refs = tuple(record.ref for record in imported.models)
    published = ", ".join(imported.published) or "nothing new: it was there already"
    say(f"imported into {second.url}: {', '.join(imported_refs)} (published {published})")
    copy = second.load_model(imported_refs[0])
    difference = float(np.abs(_predict(copy, t_new) - predicted).max())
    say(f"loaded the imported copy {imported_refs[0]}: max difference from the original's predictions {difference:.1e}")

    return DemoReport(
        store_url=store.url,
        second_store_url=second.url,
        workdir=folder,
        name=MODEL_NAME,
        alpha=problem.alpha,
        lam=problem.lam,
        horizon=problem.horizon,
        grid=problem.grid,
        scheme_error=scheme_error,
        saved=tuple(saved),
        listed=listed,
        best_ref=best.ref,
        best_val_error=best_val_error,
        new_inputs=NEW_INPUTS,
        samples=samples,
        test_error=test_error,
        bundle_path=exported.path,
        bundle_bytes=exported.file_size,
        imported_refs=imported_refs,
        published_refs=tuple(imported.published),
        imported_difference=difference,
        duration_s=time.perf_counter() - started,
    )
