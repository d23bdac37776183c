"""Hugging Face Hub integration shared by every zoo model class.

Every model class inherits ``ZooHubMixin`` (through ``FlowModel`` or directly), so it saves
``config.json`` + ``model.safetensors`` and loads with ``from_pretrained(repo_id | dir)``.
"""

from __future__ import annotations

from huggingface_hub import PyTorchModelHubMixin


class ZooHubMixin(
    PyTorchModelHubMixin,
    library_name="attnflow_zoo",
    tags=["normalizing-flows", "attnflow_zoo"],
):
    """Hub save/load for zoo models: safetensors weights plus the config dataclass as JSON."""
