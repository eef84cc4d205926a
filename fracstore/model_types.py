"""The model types a process knows how to build. A manifest only names a type; the code for it comes from the
caller's registration, never from the manifest (DESIGN.md section 9: a manifest never names code to import)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .errors import ConfigError, NotFoundError

T = TypeVar("T")
_registry: dict[str, type] = {}
_lock = threading.Lock()


def register_model_type(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: ``@register_model_type("pinn")`` lets fracstore build saved models of type ``"pinn"``.

    The class is built with ``cls.from_config(config)`` when it has that classmethod, else ``cls(**config)``.
    Registering the same class twice is allowed; registering another class under a taken name is an error.

    Raises:
        ConfigError: the name is empty or already taken by another class.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a model type name must be a non-empty string, not {name!r}")

    def decorate(cls: type[T]) -> type[T]:
        with _lock:
            taken = _registry.get(name)
            # The same class re-imported (a reloaded module, a notebook cell run twice) may take its name again.
            same = taken is not None and (taken.__module__, taken.__qualname__) == (cls.__module__, cls.__qualname__)
            if taken is not None and taken is not cls and not same:
                raise ConfigError(
                    f"model type {name!r} is already registered to {taken.__module__}.{taken.__qualname__}"
                )
            _registry[name] = cls
        return cls

    return decorate


def unregister_model_type(name: str) -> None:
    """Forget a registration (mostly for tests)."""
    with _lock:
        _registry.pop(name, None)


def type_name_of(obj: object) -> str | None:
    """The registered type name of ``obj``'s class, or None."""
    with _lock:
        for name, cls in _registry.items():
            if type(obj) is cls:
                return name
    return None


def build(model_type: str, config: Mapping[str, Any]) -> Any:
    """Construct a model of a registered type from its saved config.

    Raises:
        NotFoundError: the type is not registered in this process (the message says how to register it).
        ConfigError: the class rejected the config.
    """
    with _lock:
        cls = _registry.get(model_type)
        known = sorted(_registry)
    if cls is None:
        raise NotFoundError(
            f"model type {model_type!r} is not registered in this process (registered: {known or 'none'}). "
            f"Decorate its class with @fracstore.register_model_type({model_type!r}) before loading, or load the "
            "state dict with Store.load(ref) and build the module yourself",
            what=model_type,
        )
    try:
        from_config = getattr(cls, "from_config", None)
        own = copy.deepcopy(dict(config))  # the constructor may change what it is given
        return from_config(own) if callable(from_config) else cls(**own)
    except TypeError as exc:
        raise ConfigError(
            f"cannot build {cls.__qualname__} (model type {model_type!r}) from its saved config: {exc}. Give the "
            "class a from_config(config) classmethod or make its constructor accept the saved config keys"
        ) from exc
