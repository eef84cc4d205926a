"""The fracstore demo: a physics-informed network for a fractional relaxation equation, trained, versioned,
found, loaded and shipped through a store.

* :func:`run_demo` runs it end to end and returns a :class:`DemoReport` (what ``fracstore demo`` prints).
* :mod:`fracstore.demo.fractional` holds the numerics (L1 scheme, Mittag-Leffler function, explicit fractional
  integrator); :mod:`fracstore.demo.pinn` the network and its training loop.

Importing this package registers the model type ``fracstore-demo.relaxation-pinn``, so ``Store.load_model`` can
rebuild the demo's models in any process that imported it.
"""

from __future__ import annotations

from .pinn import MODEL_TYPE, Problem, RelaxationPINN, TrainedPINN, train_pinn
from .run import DemoReport, ListedVersion, Sample, SavedVersion, run_demo

__all__ = [
    "MODEL_TYPE",
    "DemoReport",
    "ListedVersion",
    "Problem",
    "RelaxationPINN",
    "Sample",
    "SavedVersion",
    "TrainedPINN",
    "run_demo",
    "train_pinn",
]
