"""The seed project's ``ModelPersistenceManager``, on top of a real fracstore :class:`~fracstore.Store`.

Code written against the seed keeps working (SEED_API.md); the on-disk format is fracstore's, not the seed's
``saved_models/model_registry.json`` layout. A *model id* here is a fracstore ref ``name@version`` (``pinn@3``);
every id :meth:`ModelPersistenceManager.list_models` returns is accepted by every other method, and so is any other
ref (``pinn``, ``pinn:prod``, a digest prefix).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .bundle import export_bundle, import_bundle, read_bundle_index
from .errors import ConfigError, NotFoundError
from .manifest import TrainingSummary
from .query import ModelRecord, RecordTable
from .store import Store


def _metadata(record: ModelRecord, environment: Mapping[str, str]) -> dict[str, Any]:
    training = record.training
    return {
        "model_id": record.ref,
        "name": record.name,
        "version": record.version,
        "digest": str(record.digest),
        "model_type": record.model_type,
        "created_at": record.created_at,
        "description": record.description,
        "tags": list(record.labels),
        "aliases": list(record.tags),
        "training_duration": training.duration_s,
        "final_loss": training.final_loss,
        "best_loss": training.best_loss,
        "best_val_loss": training.best_val_loss,
        "converged": training.converged,
        "epochs": training.epochs,
        "steps": training.steps,
        "device": environment.get("device"),
        "environment": dict(environment),
        "metrics": dict(record.metrics),
        "parent": None if record.parent is None else str(record.parent),
    }


def _row(record: ModelRecord) -> dict[str, Any]:
    row = {"model_id": record.ref}
    row.update(record.as_row())
    return row


class ModelPersistenceManager:
    """The seed's model manager: save, list, find the best, load, inspect and delete models.

    Args:
        path_or_url: a folder (the seed used ``"saved_models"``) or any fracstore store URL.
        storage_options: fsspec options for remote stores, passed through untouched.
        cache_dir: fracstore's local cache folder.
    """

    def __init__(
        self,
        path_or_url: str | os.PathLike[str] = "saved_models",
        *,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.store = Store.open(path_or_url, storage_options=storage_options, cache_dir=cache_dir)

    def save_model(
        self,
        model: torch.nn.Module,
        model_type: str,
        *,
        config: Mapping[str, Any] | None = None,
        training_history: Mapping[str, Any] | None = None,
        description: str = "",
        tags: Iterable[str] = (),
        metrics: Mapping[str, float] | None = None,
        training_duration: float | None = None,
        final_loss: float | None = None,
        best_val_loss: float | None = None,
        converged: bool | None = None,
        epochs: int | None = None,
        name: str | None = None,
        files: Mapping[str, bytes | os.PathLike[str]] | None = None,
    ) -> str:
        """Save ``model`` as the next version of ``name`` (default: the model type) and return its model id."""
        summary = TrainingSummary(
            duration_s=training_duration,
            epochs=epochs,
            converged=converged,
            final_loss=final_loss,
            best_val_loss=best_val_loss,
        )
        saved = self.store.save(
            model,
            name=name or model_type,
            model_type=model_type,
            config=config,
            metrics=metrics,
            history=training_history,
            tags=tags,
            description=description,
            training=summary,
            files=files,
        )
        return saved.ref

    def list_models(self, model_type: str | None = None, tags: Sequence[str] | None = None) -> Any:
        """One row per saved model version: ``model_id``, ``model_type``, ``created_at``, metrics, ...

        Returns:
            a ``pandas.DataFrame`` when pandas is installed, else a :class:`~fracstore.RecordTable` (which has
            ``head()``, ``len()``, ``table["model_id"].values`` and ``to_pandas()``).
        """
        table = RecordTable(self.store.list(model_type=model_type, tags=tuple(tags or ())), row=_row)
        try:
            return table.to_pandas()
        except ImportError:
            return table

    def load_model(
        self, model_id: str, device: str | torch.device | None = None
    ) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
        """Rebuild a saved model (its type must be registered with :func:`fracstore.register_model_type`).

        Returns:
            ``(model, config, metadata)``.
        """
        info = self.store.info(model_id)
        model = self.store.load_model(info.record.ref, device=device)
        return model, dict(info.manifest.config), _metadata(info.record, info.manifest.environment)

    def get_best_model(
        self, model_type: str | None = None, metric: str = "best_val_loss", *, mode: str | None = None
    ) -> str | None:
        """The id of the best model (lowest loss/error/duration, highest anything else), or None."""
        record = self.store.best(metric, mode=mode, model_type=model_type)
        return None if record is None else record.ref

    def get_model_info(self, model_id: str) -> dict[str, Any]:
        """Everything known about a model: ``metadata`` (description, training_duration, final_loss, ...),
        ``config``, ``metrics``, tensors and files."""
        info = self.store.info(model_id)
        manifest = info.manifest
        return {
            "model_id": info.record.ref,
            "metadata": _metadata(info.record, manifest.environment),
            "config": dict(manifest.config),
            "metrics": dict(manifest.metrics),
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in manifest.tensors],
            "files": [f.path for f in manifest.files],
        }

    def get_training_history(self, model_id: str) -> Any:
        """The training history saved with a model, or None."""
        return self.store.history(model_id)

    def compare_models(self, model_ids: Sequence[str]) -> list[dict[str, Any]]:
        """One row per model with its metadata and metrics side by side."""
        return [_row(self.store.resolve(model_id)) for model_id in model_ids]

    def delete_model(self, model_id: str) -> bool:
        """Delete one model version. Returns False when no such model exists."""
        try:
            self.store.delete(model_id)
        except NotFoundError:
            return False
        return True

    def export_model(self, model_id: str, path: str | os.PathLike[str]) -> str:
        """Export one model to a portable, verified bundle file (``.zip``), for :meth:`import_model` elsewhere.

        The bundle carries the weights, config, history, files and metadata, and the model's registry tags.

        Returns:
            the path of the bundle file.

        Raises:
            NotFoundError: no such model.
            StorageError: the file cannot be written (nothing is left at ``path``).
        """
        return str(export_bundle(self.store, [model_id], path).path)

    def import_model(self, path: str | os.PathLike[str]) -> str:
        """Import a model exported with :meth:`export_model` (on this machine or another) and return its model id.

        Every byte of the bundle is verified before the model is published; importing the same file twice returns
        the same id and adds nothing.

        Raises:
            NotFoundError: no file at ``path``.
            ConfigError: the bundle holds several models (import it with ``Store.import_bundle``).
            FormatError, IntegrityError: the file is not a bundle, or is corrupt (nothing is published).
        """
        count = len(read_bundle_index(path).models)
        if count != 1:
            raise ConfigError(
                f"{os.fspath(path)} holds {count} models; import_model imports one. Use "
                "fracstore.bundle.import_bundle(manager.store, path) to import them all"
            )
        return import_bundle(self.store, path).models[0].ref
