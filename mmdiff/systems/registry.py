"""Name → system registry: the ``system:`` key of a config picks one.

A system is a subclass of :class:`mmdiff.systems.base.System` decorated with
:func:`register_system`; a built-in one also has its line in ``_BUILTIN``, so that
:func:`system_names` lists it without importing torch-heavy modules and config checks stay fast.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Type

# Built-in systems, one line each: name → module that registers it when imported.
_BUILTIN: Dict[str, str] = {
    "autoencoder": "mmdiff.systems.autoencoder",
    "text_to_image": "mmdiff.systems.text_to_image",
    "contrastive": "mmdiff.systems.contrastive",
    "captioning": "mmdiff.systems.captioning",
    "prior": "mmdiff.systems.prior",
}
_REGISTRY: Dict[str, type] = {}


def register_system(name: str) -> Callable[[Type], Type]:
    """Class decorator: make a :class:`~mmdiff.systems.base.System` buildable as ``system: NAME``."""

    def wrap(cls: Type) -> Type:
        _REGISTRY[name] = cls
        cls.system_name = name
        return cls

    return wrap


def system_names() -> set[str]:
    """All known system names (built-in and registered)."""
    return set(_BUILTIN) | set(_REGISTRY)


def builtin_system_names() -> list[str]:
    """The names of the systems mmdiff ships, sorted."""
    return sorted(_BUILTIN)


def get_system(name: str) -> type:
    """The :class:`~mmdiff.systems.base.System` class registered as ``name``."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name]
