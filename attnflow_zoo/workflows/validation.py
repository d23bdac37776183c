"""The "validating invertibility" experiment of Zha et al. 2021 (SPEC §2.4): train the validator
model to a random target, invert held-out images by fixed-point iteration, report the figures.

The model itself is ``models.validator.InvertibilityValidator``; ``attnflow validate`` runs
``validate`` here.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._io import atomic_path, atomic_write_text, check_writable, make_dir
from ..core import resolve_device
from ..data import datasets, quantize
from ..errors import ConfigError, DataError, ShapeError, check_positive_int
from ..layers.residual import InverseNotConvergedWarning
from ..layers.residual_attention import KINDS
from ..models.base import image_hw
from ..models.validator import InvertibilityValidator, InvertibilityValidatorConfig
from ..progress import progress


def _check_images(images: Tensor, name: str, config: InvertibilityValidatorConfig) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ShapeError(f"{name} must be a uint8 B×C×H×W tensor, got {images.dtype} "
                         f"{tuple(images.shape)}")
    h, w = image_hw(config.image_size)
    if tuple(images.shape[1:]) != (config.in_channels, h, w):
        raise ShapeError(f"{name} have shape {tuple(images.shape[1:])} but the config expects "
                         f"{(config.in_channels, h, w)}; set in_channels / image_size to match")
    if h % 2 or w % 2:
        raise ShapeError(f"the squeeze needs even H and W, got {h}×{w}; crop the images")


def _psnr(mse: Tensor) -> Tensor:
    # Peak 1: images on [0, 1]. Float tensors, not saved 8-bit files.
    return 10.0 * torch.log10(1.0 / mse)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def run_validation(config: InvertibilityValidatorConfig, train_images_u8: Tensor,
                   test_images_u8: Tensor, *, epochs: int = 100, batch_size: int = 64,
                   lr: float = 3e-3, num_train: int = 1000, num_test: int = 1000,
                   inverse_iterations: tuple[int, ...] = (10, 50, 100),
                   generator: torch.Generator | None = None, device: str | torch.device = "cpu",
                   out_dir: str | Path | None = None, num_grid_images: int = 32,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one validator as in the paper, invert held-out images, report the figures.

    Training: the first ``num_train`` train images, dequantised by ``quantize.to_model_space``
    (fresh noise each epoch), shuffled, batches of ``batch_size`` (last partial batch dropped,
    as the original loader), MSE to ONE fixed N(0, I) target of the output's batch shape,
    Adam(lr). Evaluation: the first ``num_test`` test images are mapped forward and recovered
    by the fixed-point inverse for each of ``inverse_iterations`` (stopping early once
    converged); MSE and PSNR (dB, peak 1) on float tensors. Every random number (weights,
    target, order, noise, power iteration) comes from ``generator``: one seed, one result.

    Args:
        config: the validator; its in_channels / image_size must match the images.
        train_images_u8, test_images_u8: uint8 N×C×H×W.
        out_dir: if given, writes ``figures.json``, ``reconstructions.png`` (originals left,
            reconstructions after ``config.inverse_max_iter`` iterations right), ``checkpoint/``.
        extra: entries copied into the result (e.g. the dataset name).

    Returns:
        A JSON-plain dict: per iteration count ``verdict`` (``inverse_verdict``: "converged",
        "not converged" or "diverged"; "converged elsewhere" for a fixed point more than half a
        grey level from the image, another preimage of a non-injective layer), ``mse``,
        ``psnr_db``, ``min_psnr_db`` (worst image; these three None for a diverged inverse),
        ``converged_fraction``, ``max_residual``, ``iterations`` (the most any batch used),
        ``seconds`` (cumulative: one run is continued from count to count); plus ``verdict``
        (the main count's), ``jacobian_norm`` (max / mean over ≤ 16 test images),
        ``lipschitz_bound`` (certified), ``seconds_per_epoch``, ``seconds_per_step`` and the
        final training loss.
    """
    _check_images(train_images_u8, "train images", config)
    _check_images(test_images_u8, "test images", config)
    check_settings(epochs=epochs, batch_size=batch_size, num_train=num_train, num_test=num_test)
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    device = resolve_device(device) if isinstance(device, str) else device
    train = train_images_u8[:num_train]
    test = test_images_u8[:num_test]
    if len(train) == 0 or len(test) == 0:
        raise ShapeError("run_validation needs at least one train and one test image")
    batch_size = min(batch_size, len(train))
    model = build_validator(config, generator).to(device)
    c, h, w = model.input_shape
    target = torch.randn((batch_size, 4 * c, h // 2, w // 2), generator=generator).to(device)
    loss_value, epoch_seconds = _train(model, train, target, epochs, lr, generator, device)
    x_test = quantize.to_model_space(test, generator)
    counts = sorted(set(inverse_iterations) | {config.inverse_max_iter})
    entries, recon_main = _invert(model, x_test, batch_size, counts, device)
    main_entry = entries[config.inverse_max_iter]
    if main_entry["verdict"] != "converged":
        warnings.warn(f"validator ({config.kind}, {config.lipschitz}): the inverse "
                      f"{main_entry['verdict']} in {config.inverse_max_iter} iterations "
                      f"({main_entry['converged_fraction']:.1%} of the test images converged)",
                      InverseNotConvergedWarning, stacklevel=2)
    # ≤ 16 images and never more than a training batch (full-scale CelebA: N² = 9701² energies).
    probe = x_test[: min(16, batch_size)].to(device)
    jac = model.jacobian_norm(probe, num_iterations=20, generator=generator)
    result: dict[str, Any] = {
        **(extra or {}), "kind": config.kind, "lipschitz": config.lipschitz,
        "gate": model.attention.gate, "image_shape": [c, h, w], "num_train": len(train),
        "num_test": len(test), "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "final_train_loss": _finite(loss_value),
        "seconds_per_epoch": sum(epoch_seconds) / max(1, len(epoch_seconds)),
        "seconds_per_step": sum(epoch_seconds) / max(1, epochs * (len(train) // batch_size)),
        "jacobian_norm": {"max": _finite(float(jac.max())), "mean": _finite(float(jac.mean())),
                          "num_images": len(probe)},
        "inverse": {str(k): entries[k] for k in counts if k in inverse_iterations},
        "inverse_main": {"max_iter": config.inverse_max_iter, **main_entry},
        "verdict": main_entry["verdict"]}
    if config.lipschitz == "certified":
        with torch.no_grad():
            result["lipschitz_bound"] = float(model.attention.lipschitz_bound())
    if out_dir is not None:
        result["out_dir"] = str(_write(out_dir, model, result, x_test[:num_grid_images],
                                       recon_main[:num_grid_images]))
    return result


def _write(out_dir: str | Path, model: InvertibilityValidator, result: dict[str, Any],
           originals: Tensor, reconstructions: Tensor) -> Path:
    """``reconstructions.png``, ``checkpoint/`` and ``figures.json`` into ``out_dir``."""
    out = make_dir(out_dir)
    save_comparison(originals + 0.5, reconstructions + 0.5, out / "reconstructions.png")
    model.cpu().save_pretrained(out / "checkpoint")
    atomic_write_text(out / "figures.json", json.dumps(result, indent=2) + "\n")
    return out


def build_validator(config: InvertibilityValidatorConfig, generator: torch.Generator
                    ) -> InvertibilityValidator:
    """The validator with its initial weights and spectral-norm vectors drawn from
    ``generator``: the layers draw from the global RNG, so it is forked (left as it was) and
    seeded with a number drawn from ``generator``."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return InvertibilityValidator(config)


def _train(model: InvertibilityValidator, train: Tensor, target: Tensor, epochs: int, lr: float,
           generator: torch.Generator, device: torch.device) -> tuple[float, list[float]]:
    """Adam(lr) on MSE(model(x), target) over ``epochs`` shuffled passes (last partial batch
    dropped); (the last loss, seconds per epoch)."""
    batch_size = target.shape[0]
    num_batches = len(train) // batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.MSELoss()
    model.train()
    epoch_seconds: list[float] = []
    loss_value = math.nan
    with progress("validate: train", total=epochs * num_batches) as advance:
        for _ in range(epochs):
            start = time.perf_counter()
            order = torch.randperm(len(train), generator=generator)
            for b in range(num_batches):
                idx = order[b * batch_size : (b + 1) * batch_size]
                x = quantize.to_model_space(train[idx], generator).to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), target)
                loss.backward()
                optimizer.step()
                loss_value = float(loss.detach())
                advance(1, loss=f"{loss_value:.4f}")
            epoch_seconds.append(time.perf_counter() - start)
    model.eval()
    return loss_value, epoch_seconds


def inverse_verdict(residual: Tensor, previous: Tensor | None, tol: float) -> str:
    """What a fixed-point inverse did, from its per-image residuals ‖x_{t+1} − x_t‖_∞ now and at
    the previous iteration count: "converged" (every residual ≤ ``tol``), "diverged" (a
    non-finite residual, one past 1 — the width of the data range [−½, ½] — or a worst
    residual that grew since ``previous``: a contraction's only shrink), else "not converged"
    (still shrinking, not there yet)."""
    if bool((residual <= tol).all()):
        return "converged"
    worst = float(residual.max())
    grew = previous is not None and math.isfinite(float(previous.max())) and \
        worst > float(previous.max())
    if not math.isfinite(worst) or worst > 1.0 or grew:
        return "diverged"
    return "not converged"


def _invert(model: InvertibilityValidator, x_test: Tensor, batch_size: int, counts: list[int],
            device: torch.device) -> tuple[dict[int, dict[str, Any]], Tensor]:
    """The fixed-point inverse of ``model(x_test)`` after each of ``counts`` iterations: one run
    per batch, continued from count to count (10, then 40 more, …), so the iterates are those
    of a single run; a converged batch stops. Returns (figures per count, the reconstructions
    at the last count)."""
    tol = model.config.inverse_tol
    with torch.no_grad():
        outputs = [model(x_test[i : i + batch_size].to(device))
                   for i in range(0, len(x_test), batch_size)]
    current: list[Tensor | None] = [None] * len(outputs)
    done = [0] * len(outputs)
    residuals: list[Tensor] = [torch.full((len(y),), math.inf) for y in outputs]
    entries: dict[int, dict[str, Any]] = {}
    previous: Tensor | None = None
    seconds = 0.0
    recon = x_test
    for max_iter in counts:
        start = time.perf_counter()
        with warnings.catch_warnings():
            # Non-convergence is reported in the figures (and warned about once after).
            warnings.simplefilter("ignore", InverseNotConvergedWarning)
            for b, y in enumerate(outputs):
                if done[b] >= max_iter or bool((residuals[b] <= tol).all()):
                    continue
                init = None if current[b] is None else current[b].to(device)
                x, info = model.inverse_with_info(y, max_iter=max_iter - done[b], init=init)
                current[b] = x.cpu()
                residuals[b] = info.residual_per_sample
                done[b] += info.iterations
        seconds += time.perf_counter() - start
        recon = torch.cat([r for r in current if r is not None])
        residual = torch.cat(residuals)
        entries[max_iter] = _figures(recon, x_test, residual, previous, tol, max(done), seconds)
        previous = residual
    return entries, recon


def _figures(recon: Tensor, x_test: Tensor, residual: Tensor, previous: Tensor | None,
             tol: float, iterations: int, seconds: float) -> dict[str, Any]:
    """One iteration count's figures (see ``run_validation``)."""
    verdict = inverse_verdict(residual, previous, tol)
    if verdict == "converged" and not float((recon - x_test).abs().max()) <= 1 / 512:
        # A fixed point, but not the image: g is no contraction there and x + g(x) has another
        # preimage (the error is more than half a grey level).
        verdict = "converged elsewhere"
    err = (recon - x_test).pow(2).flatten(1).mean(1)  # per image, [0, 1] scale
    mse = err.mean()
    shown = verdict != "diverged"  # a diverged run's PSNR is not a measurement of inversion
    return {
        "verdict": verdict,
        "mse": _finite(float(mse)) if shown else None,
        "psnr_db": _finite(float(_psnr(mse))) if shown else None,
        "min_psnr_db": _finite(float(_psnr(err.max()))) if shown else None,
        "converged_fraction": float((residual <= tol).float().mean()),
        "max_residual": _finite(float(residual.max())),
        "iterations": iterations,
        "seconds": seconds,
    }


def check_settings(**values: int | None) -> None:
    """``ConfigError`` unless every given count (epochs, batch size, limit, …) is ≥ 1: zero epochs
    would "invert" an untrained layer, the identity, and report a perfect PSNR."""
    for name, value in values.items():
        if value is not None:
            check_positive_int(name, value)


def save_comparison(originals: Tensor, reconstructions: Tensor, path: str | Path,
                    nrow: int = 8) -> None:
    """One PNG: a grid of ``originals`` (left) and of ``reconstructions`` (right), in [0, 1]."""
    from torchvision.utils import make_grid, save_image

    left = make_grid(originals.clamp(0, 1), nrow=nrow, pad_value=1.0)
    right = make_grid(torch.nan_to_num(reconstructions, nan=0.0).clamp(0, 1), nrow=nrow,
                      pad_value=1.0)
    gap = torch.ones(left.shape[0], left.shape[1], 8)
    with atomic_path(path) as tmp:
        save_image(torch.cat([left, gap, right], dim=2), tmp, format="png")


def validate(kind: str, dataset: str, out_dir: str | Path, *, fullscale: bool = False,
             lipschitz: str = "faithful", epochs: int | None = None, limit: int = 1000,
             batch_size: int | None = None, seed: int = 0,
             device: str | torch.device = "cpu") -> dict[str, Any]:
    """The experiment end to end on a named dataset or a local image folder (``attnflow
    validate``): load ``limit`` train and test images (seeded random subsets,
    ``datasets.LIMIT_RULE``), ``run_validation``, write figures, grid and checkpoint to ``out_dir``.

    CelebA is center-cropped to 178 and resized to 32×32 unless ``fullscale`` (218×178, batch 1,
    1 epoch by default). Defaults otherwise: 100 epochs, batch 64 (the paper).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown attention {kind!r}; choose one of {', '.join(KINDS)}")
    check_settings(epochs=epochs, limit=limit, batch_size=batch_size)
    check_writable(out_dir, is_dir=True)
    device = resolve_device(device) if isinstance(device, str) else device
    if lipschitz not in ("faithful", "certified"):
        raise ConfigError(f"lipschitz must be 'faithful' or 'certified', got {lipschitz!r}")
    if fullscale and dataset != "celeba":
        raise DataError("`fullscale` is only defined for celeba (218×178 images)")
    image_size = None if fullscale else (32 if dataset == "celeba" else None)
    train = datasets.load_images(dataset, "train", image_size=image_size, limit=limit)
    test = datasets.load_images(dataset, "test", image_size=image_size, limit=limit)
    _, c, h, w = train.shape
    config = InvertibilityValidatorConfig(kind=kind, lipschitz=lipschitz, in_channels=c,
                                          image_size=h if h == w else (h, w))
    if epochs is None:
        epochs = 1 if fullscale else 100
    if batch_size is None:
        batch_size = 1 if fullscale else 64
    return run_validation(config, train, test, epochs=epochs, batch_size=batch_size,
                          num_train=limit, num_test=limit,
                          generator=torch.Generator().manual_seed(seed), device=device,
                          out_dir=out_dir, extra={"dataset": dataset, "fullscale": fullscale})


