"""One architecture per file; importing this package registers every preset."""

from . import attnflow  # noqa: F401
from .resflow import ResFlow, ResFlowConfig  # noqa: F401
from .validator import InvertibilityValidator, InvertibilityValidatorConfig  # noqa: F401
