"""attnflow_zoo: normalizing flows with invertible attention, on the Hugging Face Hub.

Names are imported lazily (PEP 562): ``import attnflow_zoo`` is cheap, and importing a low part
of the package (``attnflow_zoo.layers``) never loads the Hub client, checkpoints or models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "AttnFlowError": "errors", "CheckpointError": "errors", "ConfigError": "errors",
    "DataError": "errors", "OutputError": "errors", "ShapeError": "errors",
    "TrainingError": "errors",
    "InvertibleModule": "core", "FlowSequential": "core",
    "FlowModel": "models.base",
    "AttnFlow": "models.attnflow", "AttnFlowConfig": "models.attnflow",
    "ResFlow": "models.resflow", "ResFlowConfig": "models.resflow",
    "InvertibilityValidator": "models.validator",
    "InvertibilityValidatorConfig": "models.validator",
    "register_model": "registry",
    "create_model": "factory", "load_model": "factory", "list_models": "factory",
    "describe_models": "factory",
    "load_images": "data",
    "bits_per_dim": "metrics",
    "TrainConfig": "training", "fit": "training",
    "evaluate_bpd": "evaluation",
}
_SUBMODULES = {"core", "data", "errors", "evaluation", "factory", "layers", "metrics", "models",
               "priors", "registry", "sampling", "testing", "training", "validation",
               "checkpoint", "hub", "modelcard", "publish", "progress", "logdet_estimators"}

__all__ = [
    "AttnFlow",
    "AttnFlowConfig",
    "AttnFlowError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FlowModel",
    "FlowSequential",
    "InvertibilityValidator",
    "InvertibilityValidatorConfig",
    "InvertibleModule",
    "OutputError",
    "ResFlow",
    "ResFlowConfig",
    "ShapeError",
    "TrainConfig",
    "TrainingError",
    "bits_per_dim",
    "create_model",
    "describe_models",
    "evaluate_bpd",
    "fit",
    "list_models",
    "load_images",
    "load_model",
    "register_model",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .core import FlowSequential, InvertibleModule
    from .data import load_images
    from .errors import (
        AttnFlowError,
        CheckpointError,
        ConfigError,
        DataError,
        OutputError,
        ShapeError,
        TrainingError,
    )
    from .evaluation import evaluate_bpd
    from .factory import create_model, describe_models, list_models, load_model
    from .metrics import bits_per_dim
    from .models.attnflow import AttnFlow, AttnFlowConfig
    from .models.base import FlowModel
    from .models.resflow import ResFlow, ResFlowConfig
    from .models.validator import InvertibilityValidator, InvertibilityValidatorConfig
    from .registry import register_model
    from .training import TrainConfig, fit
