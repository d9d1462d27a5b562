"""The model registry: entry points by name in a plain dict (timm's ``_registry.py`` shape).

A leaf: it imports nothing of videofeat, so model files register into it at import time and
the factory looks names up in it without either importing the other. It is our own dict, not
timm's global registry, so that importing videofeat never changes what ``timm.create_model``
resolves for other code in the process.

Entry points are registered when their model file is imported; ``videofeat.models`` imports
every model file, so any import of this package sees the full table.
"""

from __future__ import annotations

from typing import Any, Callable

_MODELS: dict[str, Callable[..., Any]] = {}


def register_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register a model entry point under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def is_model(name: str) -> bool:
    return name in _MODELS


def model_entrypoint(name: str) -> Callable[..., Any]:
    """The entry point registered as ``name``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]
