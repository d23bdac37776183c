"""attnflow_zoo: normalizing flows with invertible attention, on the Hugging Face Hub.

Names are imported lazily (PEP 562): ``import attnflow_zoo`` is cheap, and importing a low part
of the package (``attnflow_zoo.layers``) never loads the Hub client, checkpoints or models.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

#: The public names, listed once: name -> the module that defines it. Every submodule is
#: reachable too (``az.latents`` imports ``attnflow_zoo.evaluation.latents`` on first use).
_EXPORTS = {
    "AttnFlowError": "errors", "CheckpointError": "errors", "ConfigError": "errors",
    "DataError": "errors", "OutputError": "errors", "ShapeError": "errors",
    "TrainingError": "errors",
    "InvertibleModule": "core", "FlowSequential": "core",
    "FlowModel": "models.base",
    "AttnFlow": "models.attnflow", "AttnFlowConfig": "models.attnflow",
    "ResFlow": "models.resflow", "ResFlowConfig": "models.resflow",
    "TarFlow": "models.tarflow", "TarFlowConfig": "models.tarflow",
    "InvertibilityValidator": "models.validator",
    "InvertibilityValidatorConfig": "models.validator",
    "register_model": "registry",
    "create_model": "factory", "load_model": "factory", "list_models": "factory",
    "describe_models": "factory",
    "load_images": "data.datasets",
    "bits_per_dim": "metrics", "evaluate_bpd": "metrics",
    "TrainConfig": "training", "fit": "training",
}
#: Subpackages whose modules are also reachable by their short name (``az.sampling``).
_GROUPS = ("data", "evaluation", "publishing", "workflows", "training", "models", "layers")

__all__ = list(_EXPORTS)


def _submodule(name: str) -> Any:
    for prefix in ("", *(f"{group}." for group in _GROUPS)):
        if importlib.util.find_spec(f"{__name__}.{prefix}{name}") is not None:
            return importlib.import_module(f".{prefix}{name}", __name__)
    return None


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name.startswith("_") or (value := _submodule(name)) is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
