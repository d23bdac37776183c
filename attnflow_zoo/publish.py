"""Publishing a checkpoint: the pre-push checks, the rendered model card, the upload."""

from __future__ import annotations

import os
from typing import Any

import torch

from . import data
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_config, resolve_local
from .errors import CheckpointError
from .factory import load_model
from .modelcard import render_card


def check_round_trip(model: Any, num_images: int = 4, seed: int = 0) -> float:
    """Max |inverse(forward(x)) − x| on a few dequantised random images; raises
    ``CheckpointError`` above half a quantisation step (1/512), where samples would change."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise CheckpointError(f"{type(model).__name__} has no input_shape; cannot check "
                              "its round trip before pushing")
    gen = torch.Generator().manual_seed(seed)
    x_u8 = torch.randint(0, 256, (num_images, *shape), generator=gen, dtype=torch.uint8)
    x = data.to_model_space(x_u8, gen).to(_device_of(model))
    with torch.no_grad():
        out = model(x)
        # Density models return (z, logdet); a bare bijection (the validator) returns z.
        z, logdet = out if isinstance(out, tuple) else (out, None)
        x_rec = model.inverse(z)
    if logdet is not None and not torch.isfinite(logdet).all():
        raise CheckpointError("the checkpoint gives a non-finite log-determinant; "
                              "refusing to push it")
    err = (x_rec - x).abs().max().item()
    if not err <= 1 / 512:
        raise CheckpointError(f"the checkpoint's round trip inverse(forward(x)) is off by {err:.3g}"
                              " (more than 1/512); refusing to push a model that does not invert")
    return err


def _device_of(model: Any) -> Any:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return "cpu"


def push_checkpoint(checkpoint_dir: str | os.PathLike[str], repo_id: str, *,
                    metrics: dict[str, Any] | None = None, private: bool = False,
                    preset: str | None = None, token: str | None = None,
                    commit_message: str | None = None) -> str:
    """Check a local checkpoint and upload exactly config.json, model.safetensors, README.md.

    The checkpoint is loaded strictly, its round trip is checked (``check_round_trip``), the model
    card is rendered from ``cards/`` (with ``metrics``, see ``modelcard.render_card``) and the
    three files go to ``repo_id`` in one commit. Returns the commit URL.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise CheckpointError(f"{repo_id!r} is not a valid Hub repo id (user/name)") from err
    if "/" not in repo_id:
        raise CheckpointError(f"give the repo with its owner, e.g. user/{repo_id}")
    name = os.fspath(checkpoint_dir)
    directory = resolve_local(name)
    model = load_model(directory)
    check_round_trip(model)
    payload = read_config(directory)
    card = render_card(architecture=payload["architecture"], config=model.config,
                       preset=preset or payload.get("preset"), repo_id=repo_id, metrics=metrics)
    operations = [
        CommitOperationAdd(CONFIG_NAME, str(directory / CONFIG_NAME)),
        CommitOperationAdd(WEIGHTS_NAME, str(directory / WEIGHTS_NAME)),
        CommitOperationAdd("README.md", str(card).encode("utf-8")),
    ]
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, repo_type="model",
                                 commit_message=commit_message
                                 or f"Upload {payload['architecture']} with attnflow_zoo")
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"upload to {repo_id!r} failed: {str(err).splitlines()[0]}"
                              ) from err
    return str(info.commit_url)
