"""Training-loop integration: checkpoint a model into a store while it trains.

Terms: a **call** is one :meth:`Checkpointer.step`, made once per step or per epoch, whichever the loop counts; the
**count** is the number of calls so far. A **checkpoint** is a saved version (``name@version``). The **best**
checkpoint is the one with the best value of the **monitored** metric among the checkpoints this checkpointer saved;
it carries the registry tag ``best_tag`` (``name:best``), which moves when a better checkpoint arrives.

The seed project's trainers offered ``train(..., save_model=True, model_description=..., model_tags=[...])``. With
fracstore, a ``train`` function gets that shape by creating a checkpointer only when asked to save::

    def train(model, data, *, epochs, store, save_model=False, model_description="", model_tags=()):
        checkpointer = None
        if save_model:
            checkpointer = Checkpointer(store, "pinn", config=model.config, tags=model_tags,
                                        description=model_description, every=None, monitor="val_loss")
        history = {"loss": [], "val_loss": []}
        for epoch in range(epochs):
            loss, val_loss = ...
            history["loss"].append(loss); history["val_loss"].append(val_loss)
            if checkpointer is not None:
                checkpointer.step(model, {"loss": loss, "val_loss": val_loss})
        if checkpointer is not None:
            checkpointer.finish(model)        # every=None: one version at the end, with history and duration
        return history

Optimizer state is saved without pickle: its tensors as one safetensors artifact and everything else as JSON, in
the version's files (:data:`OPTIMIZER_TENSORS`, :data:`OPTIMIZER_STRUCTURE`); :func:`restore_optimizer` loads them
back into an optimizer.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import safetensors.torch
import torch

from .errors import ConfigError, FormatError, NotFoundError
from .manifest import TrainingSummary, check_name
from .store import SavedModel, Store

OPTIMIZER_TENSORS = "optimizer/state.safetensors"
OPTIMIZER_STRUCTURE = "optimizer/structure.json"
_STRUCTURE_FORMAT = "fracstore.optimizer-state"
_STRUCTURE_VERSION = 1


def _count_option(option: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option}= takes an int >= 1 or None, not {value!r}")
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ConfigError(f"metric {key!r} is a tensor of {value.numel()} values; pass one number (.item())")
        value = value.item()
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        raise ConfigError(f"metric {key!r} must be a number, not {value!r}")
    return float(value)


class Checkpointer:
    """Saves a model into a store during training: every ``every`` calls, keeping and tagging the best.

    Args:
        store: where checkpoints go.
        name: the model name the checkpoints are versions of.
        model_type: as for :meth:`Store.save` (default: the module's registered type).
        config: the constructor config, saved with every checkpoint.
        tags: descriptive labels for every checkpoint.
        description: free text for every checkpoint.
        every: save on every ``every``-th call; None saves only in :meth:`finish`.
        monitor: the metric that decides the best checkpoint; None tracks no best.
        mode: ``"min"`` (lower is better) or ``"max"``.
        best_tag: the registry tag that follows the best checkpoint; None leaves tags alone.
        keep_last: keep only the newest ``keep_last`` of this checkpointer's checkpoints, deleting older ones
            that no registry tag points at (never the best); None keeps everything.
        save_optimizer: store the optimizer state with each checkpoint (pass ``optimizer=`` to each call).
        counts: what a call is, ``"epochs"`` or ``"steps"``: the training summary's field for the count.

    Raises:
        ConfigError: an option out of range.
        FormatError: an invalid name or tag.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        *,
        model_type: str | None = None,
        config: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        description: str = "",
        every: int | None = 1,
        monitor: str | None = "val_loss",
        mode: Literal["min", "max"] = "min",
        best_tag: str | None = "best",
        keep_last: int | None = None,
        save_optimizer: bool = False,
        counts: Literal["epochs", "steps"] = "epochs",
    ) -> None:
        if not isinstance(store, Store):
            raise ConfigError(f"Checkpointer needs a fracstore Store, not {type(store).__name__}")
        check_name(name)
        if best_tag is not None:
            check_name(best_tag, what="tag")
        if mode not in ("min", "max"):
            raise ConfigError(f"mode= takes 'min' or 'max', not {mode!r}")
        if counts not in ("epochs", "steps"):
            raise ConfigError(f"counts= takes 'epochs' or 'steps', not {counts!r}")
        if isinstance(tags, str):
            raise ConfigError(f"tags= takes a list of labels, e.g. tags=[{tags!r}], not a single string")
        self.store = store
        self.name = name
        self.model_type = model_type
        self.config = dict(config or {})
        self.tags = tuple(tags)
        self.description = description
        self.every = _count_option("every", every)
        self.monitor = monitor
        self.mode = mode
        self.best_tag = best_tag
        self.keep_last = _count_option("keep_last", keep_last)
        self.save_optimizer = bool(save_optimizer)
        self.counts = counts
        self._started = time.perf_counter()
        self._count = 0
        self._history: dict[str, list[float | int | None]] = {}
        self._last_metrics: dict[str, float] = {}
        self._saved: list[SavedModel] = []
        self._saved_at = 0  # the count of the last save, so finish() does not save the same state twice
        self._deleted: list[str] = []
        self._best: SavedModel | None = None
        self._best_value: float | None = None

    # -- what it has seen and done ----------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Calls so far."""
        return self._count

    @property
    def history(self) -> dict[str, list[float | int | None]]:
        """Every metric per call (None where a call did not report it), plus the count itself (a copy)."""
        return {key: list(values) for key, values in self._history.items()}

    @property
    def saved(self) -> tuple[SavedModel, ...]:
        """Every checkpoint saved, oldest first (including those deleted since by ``keep_last``)."""
        return tuple(self._saved)

    @property
    def deleted(self) -> tuple[str, ...]:
        """The checkpoints ``keep_last`` deleted (``name@version``), in order."""
        return tuple(self._deleted)

    @property
    def best(self) -> SavedModel | None:
        """The best checkpoint so far by the monitored metric, or None."""
        return self._best

    @property
    def best_value(self) -> float | None:
        """The monitored metric's value at the best checkpoint, or None."""
        return self._best_value

    @property
    def duration_s(self) -> float:
        """Seconds since the checkpointer was created (the training loop's start)."""
        return time.perf_counter() - self._started

    def summary(self, *, converged: bool | None = None) -> TrainingSummary:
        """The training summary a checkpoint saved now would carry."""
        losses = [float(v) for v in self._history.get("loss", ()) if v is not None and not math.isnan(v)]
        val_losses = [float(v) for v in self._history.get("val_loss", ()) if v is not None and not math.isnan(v)]
        return TrainingSummary(
            duration_s=self.duration_s,
            epochs=self._count if self.counts == "epochs" else None,
            steps=self._count if self.counts == "steps" else None,
            converged=converged,
            final_loss=self._last_metrics.get("loss"),
            best_loss=min(losses) if losses else None,
            best_val_loss=min(val_losses) if val_losses else None,
        )

    # -- the calls --------------------------------------------------------------------------------------------

    def step(
        self,
        model: torch.nn.Module,
        metrics: Mapping[str, Any],
        *,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> SavedModel | None:
        """Record one step's (or epoch's) metrics; save a checkpoint when one is due.

        Args:
            model: the model being trained.
            metrics: ``{name: number}`` for this call (tensors with one value are accepted).
            optimizer: the optimizer, required when ``save_optimizer`` is set and a checkpoint is due.

        Returns:
            the checkpoint saved by this call, or None.

        Raises:
            ConfigError: a metric that is not a number, or a missing optimizer or monitored metric when saving.
            FracstoreError: as :meth:`Store.save`, :meth:`Store.tag` and :meth:`Store.delete`.
        """
        if not isinstance(metrics, Mapping):
            raise ConfigError(f"metrics must be a mapping of names to numbers, not {type(metrics).__name__}")
        values = {str(key): _number(str(key), value) for key, value in metrics.items()}
        self._count += 1
        counter = self.counts[:-1]  # "epoch" or "step"
        for key in values:
            if key == counter:
                raise ConfigError(f"metric name {key!r} is taken by the call count; rename the metric")
            if key not in self._history:
                self._history[key] = [None] * (self._count - 1)  # a metric first reported late
        self._history.setdefault(counter, []).append(self._count)
        for key, series in self._history.items():
            if key != counter:
                series.append(values.get(key))
        self._last_metrics = values
        if self.every is not None and self._count % self.every == 0:
            return self._save(model, optimizer=optimizer, converged=None)
        return None

    def finish(
        self, model: torch.nn.Module, *, optimizer: torch.optim.Optimizer | None = None, converged: bool | None = None
    ) -> SavedModel | None:
        """Save the final state unless the last call already saved it.

        Args:
            model: the trained model.
            optimizer: as for :meth:`step`.
            converged: whether the loop's convergence criterion was met (recorded in the training summary).

        Returns:
            the checkpoint saved now, or None when the last call's checkpoint is the final state.

        Raises:
            ConfigError: nothing was recorded yet (call :meth:`step` first).
        """
        if self._count == 0:
            raise ConfigError("finish() before any step(): record at least one step's metrics first")
        if self._saved_at == self._count:
            return None
        return self._save(model, optimizer=optimizer, converged=converged)

    # -- saving, the best, and retention ----------------------------------------------------------------------

    def _better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self._best_value is None:
            return True
        return value < self._best_value if self.mode == "min" else value > self._best_value

    def _save(
        self, model: torch.nn.Module, *, optimizer: torch.optim.Optimizer | None, converged: bool | None
    ) -> SavedModel:
        # Everything that can be refused is checked before the save, so a refused call leaves no version behind.
        if self.monitor is not None and self.monitor not in self._history:
            known = ", ".join(sorted(self._last_metrics)) or "none"
            raise ConfigError(
                f"monitor={self.monitor!r} is not among the metrics reported so far ({known}); pass one of them "
                "as monitor=, or monitor=None to track no best checkpoint"
            )
        files = None
        if self.save_optimizer:
            if optimizer is None:
                raise ConfigError("save_optimizer=True needs optimizer= in the call that saves; pass the optimizer")
            files = optimizer_state_files(optimizer)
        saved = self.store.save(
            model,
            name=self.name,
            model_type=self.model_type,
            config=self.config,
            metrics=self._last_metrics,
            history=self.history,
            tags=self.tags,
            description=self.description,
            training=self.summary(converged=converged),
            files=files,
        )
        self._saved.append(saved)
        self._saved_at = self._count
        value = self._last_metrics.get(self.monitor) if self.monitor is not None else None
        if value is not None and self._better(value):
            self._best, self._best_value = saved, value
            if self.best_tag is not None:
                self.store.tag(saved.ref, self.best_tag)
        if self.keep_last is not None:
            self._prune(self.keep_last)
        return saved

    def _prune(self, keep: int) -> None:
        """Delete this checkpointer's checkpoints older than the newest ``keep``, except tagged ones and the best.

        Only its own checkpoints are candidates: other runs' versions of the same name are not this loop's to
        delete. A tag is checked at the registry just before the delete, so a version someone tagged meanwhile
        (``name:prod``) stays.
        """
        gone = set(self._deleted)
        best = None if self._best is None else self._best.ref
        for saved in self._saved[:-keep]:
            if saved.ref in gone or saved.ref == best:
                continue
            try:
                record = self.store.resolve(saved.ref)
            except NotFoundError:
                gone.add(saved.ref)  # deleted by someone else: nothing to do
                continue
            if record.tags:
                continue
            self._deleted.extend(self.store.delete(saved.ref))
            gone.add(saved.ref)


# -- optimizer state without pickle ------------------------------------------------------------------------------


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """Optimizer state as JSON: JSON objects are reserved for tagged forms, so plain data round-trips exactly."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}  # JSON has no NaN or infinity
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        # A copy: safetensors refuses tensors that share memory, and the optimizer keeps changing its own.
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": key}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, int | str):
                raise FormatError(f"optimizer state {where} has a key {key!r}; only int and str keys can be stored")
            items.append([key, _encode(item, tensors, f"{where}[{key!r}]")])
        return {"dict": items}
    raise FormatError(
        f"optimizer state {where} holds a {type(value).__name__}, which cannot be stored without pickle; "
        "save_optimizer=True supports tensors, numbers, strings, None, lists, tuples and dicts"
    )


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        ((kind, body),) = value.items()
        if kind == "tensor" and isinstance(body, str) and body in tensors:
            return tensors[body]
        if kind == "float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if kind == "tuple" and isinstance(body, list):
            return tuple(_decode(v, tensors) for v in body)
        if kind == "dict" and isinstance(body, list):
            out = {}
            for pair in body:
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int | str)):
                    raise FormatError(f"optimizer state: malformed dict item {pair!r:.80}")
                out[pair[0]] = _decode(pair[1], tensors)
            return out
    raise FormatError(f"optimizer state: unknown or malformed value {value!r:.80}")


def optimizer_state_files(optimizer: torch.optim.Optimizer) -> dict[str, bytes]:
    """The optimizer's state dict as two artifact files for :meth:`Store.save`'s ``files=``: its tensors as
    safetensors (:data:`OPTIMIZER_TENSORS`) and the rest as JSON (:data:`OPTIMIZER_STRUCTURE`).

    Raises:
        FormatError: the state holds something other than tensors and plain data.
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = {
        "format": _STRUCTURE_FORMAT,
        "version": _STRUCTURE_VERSION,
        "optimizer": type(optimizer).__qualname__,
        "state_dict": _encode(optimizer.state_dict(), tensors, "state_dict"),
    }
    text = json.dumps(structure, sort_keys=True, allow_nan=False, separators=(",", ":"))
    return {OPTIMIZER_TENSORS: safetensors.torch.save(tensors), OPTIMIZER_STRUCTURE: text.encode()}


def optimizer_state_from_files(files: Mapping[str, bytes], *, optimizer: str | None = None) -> dict[str, Any]:
    """The state dict :func:`optimizer_state_files` wrote, ready for ``optimizer.load_state_dict``.

    Args:
        files: the two files' bytes, by their names.
        optimizer: the class name the state must come from (e.g. ``"Adam"``); None accepts any.

    Raises:
        NotFoundError: a file is missing.
        FormatError: the files are not an optimizer state, or come from another optimizer class.
    """
    for path in (OPTIMIZER_TENSORS, OPTIMIZER_STRUCTURE):
        if path not in files:
            raise NotFoundError(f"no {path}: the checkpoint was saved without save_optimizer=True", what=path)
    try:
        structure = json.loads(files[OPTIMIZER_STRUCTURE])
        tensors = safetensors.torch.load(bytes(files[OPTIMIZER_TENSORS]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"the optimizer state files cannot be decoded: {exc}") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError (no builtin base) for a bad header
        raise FormatError(f"{OPTIMIZER_TENSORS} is not a safetensors file: {exc}") from exc
    if not isinstance(structure, dict) or structure.get("format") != _STRUCTURE_FORMAT:
        raise FormatError(f"{OPTIMIZER_STRUCTURE} is not a fracstore optimizer state")
    if structure.get("version") != _STRUCTURE_VERSION:
        raise FormatError(f"{OPTIMIZER_STRUCTURE} has version {structure.get('version')!r}; upgrade fracstore")
    if optimizer is not None and structure.get("optimizer") != optimizer:
        raise FormatError(
            f"the saved optimizer state is from {structure.get('optimizer')!r}, not {optimizer!r}; "
            "restore it into the same optimizer class"
        )
    state = _decode(structure.get("state_dict"), tensors)
    if not isinstance(state, dict):
        raise FormatError(f"{OPTIMIZER_STRUCTURE} holds no state dict")
    return state


def restore_optimizer(optimizer: torch.optim.Optimizer, store: Store, ref: str) -> None:
    """Load the optimizer state saved with checkpoint ``ref`` into ``optimizer`` (built over the same parameters,
    in the same order, as the one that was saved; its tensors move to the parameters' devices).

    Raises:
        NotFoundError: no such version, or it was saved without optimizer state.
        FormatError: the state is malformed or from another optimizer class.
    """
    exact = store.resolve(ref).ref  # a ref error is reported as such, and both files come from one version
    try:
        files = {path: store.read_file(exact, path) for path in (OPTIMIZER_TENSORS, OPTIMIZER_STRUCTURE)}
    except NotFoundError as exc:
        raise NotFoundError(
            f"{exact} has no optimizer state: save it with Checkpointer(..., save_optimizer=True) and pass "
            "optimizer= to the call that saves",
            what=exact,
            store=store.url,
        ) from exc
    state = optimizer_state_from_files(files, optimizer=type(optimizer).__qualname__)
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(
            f"the optimizer state of {ref} does not fit this optimizer ({exc}); build it over the same parameters "
            "with the same parameter groups"
        ) from exc
