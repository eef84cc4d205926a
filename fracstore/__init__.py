"""fracstore: content-addressed persistence for trained PyTorch models.

Train once, apply many: save a model with its config, metrics, history and environment into a store at any fsspec
URL, then find it (list, search, best by a metric) and load it anywhere by name, version, tag or digest.

    import fracstore
    store = fracstore.Store.open("models/")
    saved = store.save(model, name="pinn", config={...}, metrics={"val_loss": 1e-3})
    weights = store.load("pinn@1", device="cuda")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .bundle import BundleIndex, BundleModel, BundleSummary, ImportSummary
from .cache import BlobCache, CacheEntry, PruneResult
from .codec import TensorEntry
from .digest import Descriptor, Digest
from .errors import (
    AmbiguousRefError,
    ConfigError,
    ConflictError,
    FormatError,
    FracstoreError,
    IntegrityError,
    NotAvailableError,
    NotFoundError,
    OfflineError,
    OutcomeUnknownError,
    StorageError,
    UnsupportedBackendError,
)
from .gc import GcCandidate, GcReport, RetentionPolicy, RetentionReport
from .manifest import FileEntry, Manifest, TrainingSummary
from .model_types import register_model_type
from .query import MetricFilter, ModelRecord, RecordTable, Ref
from .store import ModelDiff, ModelInfo, SavedModel, Store
from .training import Checkpointer, restore_optimizer
from .transfer import TransferredVersion, TransferSummary
from .verify import Problem, VerifyReport

__all__ = [
    "AmbiguousRefError",
    "BlobCache",
    "BundleIndex",
    "BundleModel",
    "BundleSummary",
    "CacheEntry",
    "Checkpointer",
    "ConfigError",
    "ConflictError",
    "Descriptor",
    "Digest",
    "FileEntry",
    "FormatError",
    "FracstoreError",
    "GcCandidate",
    "GcReport",
    "ImportSummary",
    "IntegrityError",
    "Manifest",
    "MetricFilter",
    "ModelDiff",
    "ModelInfo",
    "ModelRecord",
    "NotAvailableError",
    "NotFoundError",
    "OfflineError",
    "OutcomeUnknownError",
    "Problem",
    "PruneResult",
    "RecordTable",
    "Ref",
    "RetentionPolicy",
    "RetentionReport",
    "SavedModel",
    "StorageError",
    "Store",
    "TensorEntry",
    "TrainingSummary",
    "TransferSummary",
    "TransferredVersion",
    "UnsupportedBackendError",
    "VerifyReport",
    "__version__",
    "register_model_type",
    "restore_optimizer",
]
