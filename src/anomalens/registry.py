"""Name -> detector class. Each method file registers itself with @register."""

from __future__ import annotations

import importlib
from typing import Any

_REGISTRY: dict[str, type] = {}

# method modules imported on first use, so `import anomalens` stays light
_BUILTIN_MODULES = (
    "anomalens.models.patchcore",
    "anomalens.models.padim",
    "anomalens.models.classical",
    "anomalens.models.autoencoder",
    "anomalens.models.fanogan",
    "anomalens.models.ganomaly",
    "anomalens.models.stfpm",
    "anomalens.models.reverse_distillation",
    "anomalens.models.efficientad",
    "anomalens.models.utrad",
    "anomalens.models.vtadl",
    "anomalens.models.simplenet",
    "anomalens.models.draem",
    "anomalens.models.pyramid_ae",
    "anomalens.models.piade",
    "anomalens.models.vqganodip",
    "anomalens.models.capsnet",
    "anomalens.models.unet",
    "anomalens.models.cyclegan_ad",
    "anomalens.models.multi",
)


def register(cls: type) -> type:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"detector name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available() -> list[str]:
    """Names accepted by `create`."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_class(name: str) -> type:
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create(name: str, **options: Any):
    """`anomalens.create("patchcore", coreset_ratio=0.01)` -> an unfitted detector."""
    return get_class(name)(**options)
