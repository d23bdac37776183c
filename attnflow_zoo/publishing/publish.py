"""Publishing a checkpoint: the model card (from its run record, the measured metrics and its
recipe), the pre-push checks, and the upload (one commit; offline is one clear error)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import registry
from .._io import atomic_write_text
from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, Checkpoint, config_to_dict, resolve_local
from ..data import datasets, quantize
from ..errors import AttnFlowError, CheckpointError, ConfigError
from ..evaluation import results
from ..factory import list_models, load_checkpoint
from ..online import offline_mode
from ..progress import note
from ..registry import Recipe
from ..training import recipes
from .modelcard import render_card

PLACEHOLDER_REPO = "<user>/<repo>"
CARD_NAME = "README.md"
#: Images the pre-push round trip checks, and the temperature of the model's own samples that
#: stand in for its training data when that is not at hand.
ROUND_TRIP_IMAGES = 8
ROUND_TRIP_TEMPERATURE = 0.7


def round_trip_inputs(model: Any, run: dict[str, Any] | None,
                      num_images: int = ROUND_TRIP_IMAGES, seed: int = 0
                      ) -> tuple[Tensor, Tensor | None, str]:
    """(uint8 images the model is meant for, their labels for a class-conditional model, what
    they are): ``num_images`` of its training split when its run record names data that loads
    here (a seeded subset, ``datasets.LIMIT_RULE``), else its own samples at
    ``ROUND_TRIP_TEMPERATURE`` (seeded; every class in turn), else (a model that cannot
    sample) uniform random images."""
    shape = tuple(model.input_shape)
    device = _device_of(model)
    k = model.num_classes
    turns = model.default_labels(num_images) if k else None  # every class in turn
    data = (run or {}).get("dataset") or {}
    source = data.get("name") or data.get("path")
    if source:
        split = data.get("train_split") or "train"
        try:
            images, labels = datasets.load_labelled(source, split, shape, limit=num_images)
        except AttnFlowError:  # not at hand here (offline and not cached, a moved folder)
            pass
        else:
            return (images, labels if k else None,
                    f"{len(images)} {split} images of {source}, its training data")
    gen = torch.Generator(device=device).manual_seed(seed)
    if callable(getattr(model, "sample", None)):
        with torch.no_grad():
            images = model.sample(num_images, temperature=ROUND_TRIP_TEMPERATURE, generator=gen,
                                  **({"y": turns} if k else {}))
        return images.cpu(), turns, (f"{num_images} of its own samples at temperature "
                                     f"{ROUND_TRIP_TEMPERATURE:g}")
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (num_images, *shape), generator=gen, dtype=torch.uint8),
            turns, f"{num_images} random images")


def check_round_trip(model: Any, images_u8: Tensor | None = None, labels: Tensor | None = None,
                     *, what: str = "the images", seed: int = 0) -> float:
    """Max |inverse(forward(x)) − x| over dequantised ``images_u8`` (default: 4 uniform random
    images) and, for a class-conditional model, their ``labels`` (default: every class in
    turn); ``CheckpointError`` with the numbers above half a quantisation step (1/512), where
    samples would change, or for a non-finite log-determinant. ``what`` names the images in
    the message."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise CheckpointError(f"{type(model).__name__} has no input_shape; cannot check "
                              "its round trip before pushing")
    gen = torch.Generator().manual_seed(seed)
    if images_u8 is None:
        images_u8 = torch.randint(0, 256, (4, *shape), generator=gen, dtype=torch.uint8)
    x = quantize.to_model_space(images_u8, gen).to(_device_of(model))
    k = model.num_classes
    if k and labels is None:
        labels = model.default_labels(len(images_u8))  # a conditional model is a FlowModel
    given = (labels.to(x.device),) if k else ()  # a class-conditional model's
    with torch.no_grad():
        out = model(x, *given)
        # Density models return (z, logdet); a bare bijection (the validator) returns z.
        z, logdet = out if isinstance(out, tuple) else (out, None)
        x_rec = model.inverse(z, *given)
    if logdet is not None and not torch.isfinite(logdet).all():
        bad = int((~torch.isfinite(logdet)).sum())
        raise CheckpointError(f"the checkpoint gives a non-finite log-determinant on {bad} of "
                              f"{what}; refusing to push it")
    per_image = (x_rec - x).abs().flatten(1).amax(1).nan_to_num(nan=float("inf"))
    err = float(per_image.max())
    if not err <= 1 / 512:
        off = int((per_image > 1 / 512).sum())
        raise CheckpointError(
            f"the checkpoint's round trip inverse(forward(x)) is off by up to {err:.3g} (more "
            f"than 1/512) on {off} of {what} (median {float(per_image.median()):.3g}); refusing "
            "to push a model that does not invert")
    return err


def _device_of(model: Any) -> Any:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return "cpu"


def entry_recipe(preset: str | None) -> Recipe | None:
    """The recipe of the zoo entry a checkpoint names (None: no such entry, or no recipe)."""
    if not preset or preset not in list_models():
        return None
    return registry.get_entry(preset).recipe


def card_recipe(recipe: Recipe | None, run: dict[str, Any] | None) -> dict[str, Any] | None:
    """The recipe as card sentences and how ``run`` departs from it (None: no recipe)."""
    if recipe is None:
        return None
    return {"name": recipe.name, "lines": recipes.describe(recipe),
            "deviations": recipes.deviations(recipe, run) if run else []}


def card_preset(preset: str | None, payload: dict[str, Any]) -> str | None:
    """The zoo entry a card describes: the checkpoint's own (``config.json``'s ``preset``), or
    ``preset`` when it is a zoo entry that agrees with the checkpoint. ``ConfigError`` for an
    unknown entry, or one that names another entry than the checkpoint's or (for a checkpoint
    without one) another architecture or config."""
    recorded = payload.get("preset")
    if preset is None or preset == recorded:
        return recorded
    entry = registry.get_entry(preset)  # an unknown name: ConfigError with close matches
    if recorded is not None:
        raise ConfigError(f"the checkpoint was built from zoo entry {recorded!r}; a card for "
                          f"{preset!r} would describe another model (leave preset out to use "
                          "the checkpoint's own)")
    if entry.model_cls.__name__ != payload["architecture"]:
        raise ConfigError(f"zoo entry {preset!r} is a {entry.model_cls.__name__}, the checkpoint "
                          f"a {payload['architecture']}; its card would describe another model")
    ours, theirs = payload["config"], config_to_dict(entry.config)
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
        detail = ", ".join(f"{k}={ours.get(k)!r} (the entry: {theirs.get(k)!r})"
                           for k in diff[:3])
        raise ConfigError(f"the checkpoint is not zoo entry {preset!r}: {detail}"
                          + (f" and {len(diff) - 3} more" if len(diff) > 3 else ""))
    return preset


def card_metrics(ckpt: Checkpoint, metrics: dict[str, Any] | None,
                 run_metrics: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """(the metrics a card of ``ckpt`` shows, notes on what was left off).

    Given ``metrics`` are checked (``results.check_metrics``) and must score this checkpoint:
    a ``step`` other than the checkpoint's is a ``ConfigError``. Without them, the run's own
    scores (``run_metrics``, else the ``metrics.json`` beside the checkpoint or in its run
    folder) are shown as ``results.publishable`` allows when they score this checkpoint's
    step, and left off with a note when they score another.
    """
    step, directory = ckpt.step, ckpt.directory
    if metrics is not None:
        results.check_metrics(metrics)
        if metrics.get("step") is not None and step is not None and metrics["step"] != step:
            raise ConfigError(f"the metrics score step {metrics['step']}, but this checkpoint "
                              f"is step {step}; score this checkpoint (evaluate it as JSON) "
                              "or leave the metrics out")
        return metrics, []
    if run_metrics is not None:
        return _run_scores(run_metrics, step, "the run's metrics")
    for folder in (directory, directory.parent):
        path = folder / results.METRICS_NAME
        if path.is_file():
            return _run_scores(results.load_metrics(path), step, str(path))
    return {}, []


def _run_scores(found: dict[str, Any], step: int | None, source: str
                ) -> tuple[dict[str, Any], list[str]]:
    """``card_metrics`` of a run's own scores (from ``source``)."""
    if found.get("step") is not None and step is not None and found["step"] != step:
        return {}, [f"{source} scores step {found['step']}, not this checkpoint's step "
                    f"{step}; its numbers are not shown"]
    return results.publishable(found)


def make_card(ckpt: Checkpoint, recipe: Recipe | None, repo_id: str = PLACEHOLDER_REPO, *,
              metrics: dict[str, Any] | None = None, left_out: list[str] | None = None,
              preset: str | None = None, run_metrics: dict[str, Any] | None = None) -> Any:
    """The model card (``huggingface_hub.ModelCard``) of an open checkpoint: its config.json, its
    run record (``run.json``, if training wrote one), its entry's ``recipe`` and ``metrics``
    (the schema of ``evaluation.results``; default: the run's own scores, ``run_metrics`` or
    its ``metrics.json``, ``card_metrics``). ``preset``: the entry it shows (default: the
    checkpoint's own).

    What the card states must hold for the checkpoint: ``repo_id`` must be a valid repo id and
    ``metrics`` possible and of its step; anything else is a ``ConfigError`` /
    ``CheckpointError``.
    """
    if repo_id != PLACEHOLDER_REPO:
        check_repo_id(repo_id)
    shown, notes = card_metrics(ckpt, metrics, run_metrics)
    return render_card(architecture=ckpt.architecture, config=ckpt.payload["config"],
                       preset=preset or ckpt.preset, repo_id=repo_id, metrics=shown,
                       run=ckpt.run, recipe=card_recipe(recipe, ckpt.run),
                       left_out=[*(left_out or []), *notes])


def build_card(checkpoint_dir: str | os.PathLike[str] | Checkpoint,
               repo_id: str = PLACEHOLDER_REPO, *, metrics: dict[str, Any] | None = None,
               preset: str | None = None, left_out: list[str] | None = None) -> Any:
    """``make_card`` of the checkpoint at ``checkpoint_dir`` (a run folder: its latest) with the
    recipe of ``preset``, a zoo entry that agrees with it (``card_preset``; default: the entry
    its config.json names)."""
    ckpt = (checkpoint_dir if isinstance(checkpoint_dir, Checkpoint)
            else Checkpoint.open(checkpoint_dir))
    preset = card_preset(preset, ckpt.payload)
    return make_card(ckpt, entry_recipe(preset), repo_id, metrics=metrics, left_out=left_out,
                     preset=preset)


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

    The model card is rendered (``build_card``, with ``metrics``) unless ``card`` gives its
    text; then ``upload``. Returns the commit URL.

    ``dry_run``: every check, and the card written to ``card_out`` (default: the checkpoint's
    README.md); nothing is sent. Returns the card's path.
    """
    check_repo_id(repo_id)
    ckpt = Checkpoint.open(os.fspath(checkpoint_dir))
    text = card if card is not None else str(build_card(ckpt, repo_id, metrics=metrics,
                                                        preset=preset))
    if not dry_run:
        return upload(ckpt, repo_id, text, private=private, token=token,
                      commit_message=commit_message)
    checked = _round_trip(ckpt, load_checkpoint(ckpt))
    written = atomic_write_text(Path(card_out) if card_out is not None
                                else ckpt.directory / CARD_NAME, text)
    note(checked)
    return str(written)


def _round_trip(ckpt: Checkpoint, model: Any) -> str:
    """The pre-push round trip of ``ckpt``'s model on the images it is meant for
    (``round_trip_inputs``, ``check_round_trip``), as a line to show."""
    images, labels, what = round_trip_inputs(model, ckpt.run)
    return (f"round trip: max |inverse(forward(x)) − x| = "
            f"{check_round_trip(model, images, labels, what=what):.2g} on {what}")


def upload(ckpt: Checkpoint, repo_id: str, card: str, *, private: bool = False,
           token: str | None = None, commit_message: str | None = None) -> str:
    """Upload an open checkpoint with the card text ``card`` to ``repo_id`` in one commit, after
    loading it strictly and checking its round trip (``_round_trip``). Returns the commit URL.
    Offline (``HF_HUB_OFFLINE``) or an unreachable Hub is a one-line ``CheckpointError`` and
    nothing is uploaded."""
    check_repo_id(repo_id)
    model = load_checkpoint(ckpt)  # strictly: a damaged checkpoint is said first
    if offline_mode():
        raise CheckpointError(f"cannot push to {repo_id!r}: the Hub is offline (HF_HUB_OFFLINE "
                              "is set); unset it, or use `dry_run` to write the card locally")
    checked = _round_trip(ckpt, model)
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    operations = [
        CommitOperationAdd(CONFIG_NAME, str(ckpt.directory / CONFIG_NAME)),
        CommitOperationAdd(WEIGHTS_NAME, str(ckpt.directory / WEIGHTS_NAME)),
        CommitOperationAdd(CARD_NAME, card.encode("utf-8")),
    ]
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, repo_type="model",
                                 commit_message=commit_message
                                 or f"Upload {ckpt.architecture} with attnflow_zoo")
    except HfHubHTTPError as err:  # the Hub answered: a refusal (token, rights, name)
        raise CheckpointError(f"upload to {repo_id!r} failed, nothing was uploaded: "
                              f"{_first_line(err)} (check your token and the repo name)"
                              ) from err
    except _transport_errors() as err:
        raise CheckpointError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to "
                              f"push {repo_id!r} ({_first_line(err)}); nothing was uploaded — "
                              "check the network or HF_ENDPOINT, or use `dry_run`") from err
    note(checked)
    return str(info.commit_url)
