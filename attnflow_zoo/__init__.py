"""attnflow_zoo: normalizing flows with invertible attention, on the Hugging Face Hub."""

from .core import FlowModel, FlowSequential, InvertibleModule
from .data import load_images
from .errors import (
    AttnFlowError,
    CheckpointError,
    ConfigError,
    DataError,
    ShapeError,
    TrainingError,
)
from .hub import load_model
from .metrics import bits_per_dim
from .models.attnflow import AttnFlow, AttnFlowConfig
from .models.resflow import ResFlow, ResFlowConfig
from .models.validator import InvertibilityValidator, InvertibilityValidatorConfig
from .registry import create_model, list_models, register_model
from .training import TrainConfig, evaluate_bpd, fit

__version__ = "0.1.0"

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
    "ResFlow",
    "ResFlowConfig",
    "ShapeError",
    "TrainConfig",
    "TrainingError",
    "bits_per_dim",
    "create_model",
    "evaluate_bpd",
    "fit",
    "list_models",
    "load_images",
    "load_model",
    "register_model",
]
