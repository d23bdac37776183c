"""Publishing a checkpoint: the model card (from its run record, the measured metrics and its
recipe), the pre-push checks, and the upload (one commit; offline is one clear error)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch

from .. import registry
from .._io import atomic_write_text
from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_config, read_run_record, resolve_local
from ..data import quantize
from ..errors import CheckpointError
from ..factory import list_models, load_model
from ..online import offline_mode
from ..training import recipes
from .modelcard import render_card

PLACEHOLDER_REPO = "<user>/<repo>"
CARD_NAME = "README.md"


def check_round_trip(model: Any, num_images: int = 4, seed: int = 0) -> float:
    """Max |inverse(forward(x)) − x| on a few dequantised random images (labelled every class
    in turn for a class-conditional model); raises
    ``CheckpointError`` above half a quantisation step (1/512), where samples would change."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise CheckpointError(f"{type(model).__name__} has no input_shape; cannot check "
                              "its round trip before pushing")
    gen = torch.Generator().manual_seed(seed)
    x_u8 = torch.randint(0, 256, (num_images, *shape), generator=gen, dtype=torch.uint8)
    x = quantize.to_model_space(x_u8, gen).to(_device_of(model))
    k = int(getattr(model, "num_classes", 0) or 0)
    labels = (torch.arange(num_images) % k,) if k else ()  # a class-conditional model's
    with torch.no_grad():
        out = model(x, *labels)
        # Density models return (z, logdet); a bare bijection (the validator) returns z.
        z, logdet = out if isinstance(out, tuple) else (out, None)
        x_rec = model.inverse(z, *labels)
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


def recipe_for_card(preset: str | None, run: dict[str, Any] | None) -> dict[str, Any] | None:
    """The entry's recipe as card sentences and how ``run`` departs from it (None: no recipe)."""
    if not preset or preset not in list_models():
        return None
    recipe = registry.get_entry(preset).recipe
    if recipe is None:
        return None
    return {"name": recipe.name, "lines": recipes.describe(recipe),
            "deviations": recipes.deviations(recipe, run) if run else []}


def build_card(checkpoint_dir: str | os.PathLike[str], repo_id: str = PLACEHOLDER_REPO, *,
               metrics: dict[str, Any] | None = None, preset: str | None = None,
               left_out: list[str] | None = None) -> Any:
    """The model card (``huggingface_hub.ModelCard``) of a local checkpoint: its config.json, its
    run record (``run.json``, if training wrote one), its recipe and ``metrics`` (the schema of
    ``evaluation.results``)."""
    directory = resolve_local(checkpoint_dir)
    payload = read_config(directory)
    preset = preset or payload.get("preset")
    run = read_run_record(directory)
    return render_card(architecture=payload["architecture"], config=payload["config"],
                       preset=preset, repo_id=repo_id, metrics=metrics, run=run,
                       recipe=recipe_for_card(preset, run), left_out=left_out)


def write_card(checkpoint_dir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
               repo_id: str | None = None, *, metrics: dict[str, Any] | None = None,
               preset: str | None = None, left_out: list[str] | None = None) -> Path:
    """Render the card (``build_card``) into ``output`` (default: the checkpoint's README.md)."""
    card = build_card(checkpoint_dir, repo_id or PLACEHOLDER_REPO, metrics=metrics,
                      preset=preset, left_out=left_out)
    path = Path(output) if output is not None else resolve_local(checkpoint_dir) / CARD_NAME
    return atomic_write_text(path, str(card))


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of the HTTP stack when the Hub cannot be reached (refused, DNS, timeout)."""
    found: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):  # the HTTP client huggingface_hub uses, by version
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_repo_id(repo_id: str) -> None:
    """``CheckpointError`` unless ``repo_id`` is a valid ``owner/name`` Hub repo id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise CheckpointError(f"{repo_id!r} is not a valid Hub repo id (user/name)") from err
    if "/" not in repo_id:
        raise CheckpointError(f"give the repo with its owner, e.g. user/{repo_id}")


def push_checkpoint(checkpoint_dir: str | os.PathLike[str], repo_id: str, *,
                    metrics: dict[str, Any] | None = None, private: bool = False,
                    preset: str | None = None, token: str | None = None,
                    commit_message: str | None = None, card: str | None = None,
                    dry_run: bool = False, card_out: str | os.PathLike[str] | None = None) -> str:
    """Check a local checkpoint and upload exactly config.json, model.safetensors, README.md.

    The checkpoint is loaded strictly, its round trip is checked (``check_round_trip``), the model
    card is rendered (``build_card``, with ``metrics``) unless ``card`` gives its text, and the
    three files go to ``repo_id`` in one commit. Returns the commit URL.

    ``dry_run``: every check, and the card written to ``card_out`` (default: the checkpoint's
    README.md); nothing is sent. Returns the card's path. Offline (``HF_HUB_OFFLINE``) or an
    unreachable Hub is a one-line ``CheckpointError`` and nothing is uploaded.
    """
    check_repo_id(repo_id)
    directory = resolve_local(os.fspath(checkpoint_dir))
    model = load_model(directory)
    check_round_trip(model)
    payload = read_config(directory)
    text = card if card is not None else str(build_card(directory, repo_id, metrics=metrics,
                                                        preset=preset))
    if dry_run:
        return str(atomic_write_text(Path(card_out) if card_out is not None
                                     else directory / CARD_NAME, text))
    if offline_mode():
        raise CheckpointError(f"cannot push to {repo_id!r}: the Hub is offline (HF_HUB_OFFLINE "
                              "is set); unset it, or use --dry-run to write the card locally")
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    operations = [
        CommitOperationAdd(CONFIG_NAME, str(directory / CONFIG_NAME)),
        CommitOperationAdd(WEIGHTS_NAME, str(directory / WEIGHTS_NAME)),
        CommitOperationAdd(CARD_NAME, text.encode("utf-8")),
    ]
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, repo_type="model",
                                 commit_message=commit_message
                                 or f"Upload {payload['architecture']} with attnflow_zoo")
    except HfHubHTTPError as err:  # the Hub answered: a refusal (token, rights, name)
        raise CheckpointError(f"upload to {repo_id!r} failed, nothing was uploaded: "
                              f"{_first_line(err)} (check your token and the repo name)"
                              ) from err
    except _transport_errors() as err:
        raise CheckpointError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to "
                              f"push {repo_id!r} ({_first_line(err)}); nothing was uploaded — "
                              "check the network or HF_ENDPOINT, or use --dry-run") from err
    return str(info.commit_url)
