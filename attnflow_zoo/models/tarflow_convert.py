"""apple/ml-tarflow checkpoints <-> zoo ``TarFlow`` weights, without unpickling code.

ml-tarflow saves ``Model.state_dict()`` with ``torch.save`` (a ``.pth`` pickle). It is read here
with ``torch.load(weights_only=True)``, torch's restricted unpickler that builds tensors and
plain containers only, never code. The architecture is read off the tensors' names and shapes
(blocks, layers, width, tokens, token size, affine or not, classes, MLP expansion); what the
tensors cannot say is an argument: the image channels C (P = √(d/C)), the attention head width
(ml-tarflow's ``MetaBlock`` default 64, which its ``Model`` never changes) and the training
noise σ (ml-tarflow puts it in the file name, ``{dataset}_model_{P}_{ch}_{blocks}_{layers}_
{σ|uniform}.pth``, in its [−1, 1] data units; the zoo's model space is half that scale).

Names: ``blocks.k.attn_blocks.i.attention.*`` ↔ ``blocks.k.layers.i.attention.*``,
``…mlp.main.0`` / ``main.2`` ↔ ``…mlp.hidden`` / ``mlp.out``, ``var`` (the prior's variance,
ones in their default "nvp" mode) ↔ ``prior_log_std`` = ½ log var (the "learned" prior), and
``blocks.k.class_embed`` (K×1×W) ↔ ``class_embeddings.k.table.weight``, whose "no class" row K
is ml-tarflow's unconditional embedding, the mean of the class rows (a converted conditional
model gets ``class_dropout`` = 0.1, ml-tarflow's ``drop_label`` in its README, so that it has
that row and guides). ``attn_mask`` (a causal
triangle) is checked and dropped.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from .tarflow import TarFlow, TarFlowConfig

_ATTENTION = re.compile(r"^blocks\.(\d+)\.attn_blocks\.(\d+)\.")
#: ml-tarflow's file names: {dataset}_model_{P}_{ch}_{blocks}_{layers}_{noise std|uniform}.pth
_FILE_NAME = re.compile(r"_model_\d+_\d+_\d+_\d+_(uniform|\d+(?:\.\d+)?)\.pth$")
_MLP = {"main.0.": "hidden.", "main.2.": "out."}


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors of an ml-tarflow ``.pth`` (``torch.load(weights_only=True)``: no code is
    unpickled); a "module." / "_orig_mod." prefix (DDP, torch.compile) is removed."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: no such file") from err
    except Exception as err:  # noqa: BLE001 - a pickle with code, or not a torch file
        raise CheckpointError(f"{path} is not a plain tensor state dict that torch can read "
                              f"without unpickling code ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (ml-tarflow saves "
                              "model.state_dict())")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def noise_from_file_name(path: str | os.PathLike[str]) -> float | None:
    """σ in ml-tarflow's [−1, 1] units from its checkpoint name (0 for "uniform"), None if the
    name is not ml-tarflow's."""
    match = _FILE_NAME.search(Path(path).name)
    if match is None:
        return None
    return 0.0 if match.group(1) == "uniform" else float(match.group(1))


def config_from_state(state: dict[str, Tensor], in_channels: int = 3, head_dim: int = 64,
                      noise_std: float = 0.0) -> TarFlowConfig:
    """The ``TarFlowConfig`` of an ml-tarflow state dict (``noise_std`` in the zoo's model
    space). ``CheckpointError`` if the tensors are not an ml-tarflow ``Model``'s."""
    try:
        num_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        layers = 1 + max(int(m.group(2)) for k in state if (m := _ATTENTION.match(k)))
        width, token_dim = state["blocks.0.proj_in.weight"].shape
        num_tokens = state["blocks.0.pos_embed"].shape[0]
        hidden = state["blocks.0.attn_blocks.0.mlp.main.0.weight"].shape[0]
        out_dim = state["blocks.0.proj_out.weight"].shape[0]
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"not an ml-tarflow Model state dict ({err}); expected keys "
                              "blocks.K.proj_in / pos_embed / attn_blocks.I.* / proj_out") from err
    patch = math.isqrt(token_dim // in_channels) if token_dim % in_channels == 0 else 0
    side = math.isqrt(num_tokens)
    if patch < 1 or patch * patch * in_channels != token_dim or side * side != num_tokens:
        raise ConfigError(f"tokens of {token_dim} numbers are not P×P patches of "
                          f"{in_channels} channels over a square grid of {num_tokens}; give "
                          "the checkpoint's number of image channels (in_channels)")
    var = state.get("var")
    learned = var is not None and not torch.equal(var, torch.ones_like(var))
    class_embed = state.get("blocks.0.class_embed")
    return TarFlowConfig(
        image_size=side * patch, in_channels=in_channels, patch_size=patch, width=width,
        num_blocks=num_blocks, layers_per_block=layers, head_dim=head_dim,
        expansion=hidden // width, affine=out_dim == 2 * token_dim,
        prior="learned" if learned else "standard", data_scale=2.0,
        num_classes=0 if class_embed is None else class_embed.shape[0],
        class_dropout=0.1, noise_std=noise_std)


def from_ml_tarflow(state: dict[str, Tensor], config: TarFlowConfig) -> dict[str, Tensor]:
    """ml-tarflow tensors -> the zoo ``TarFlow``'s state dict for ``config`` (unchecked names
    pass through; ``TarFlow.load_state_dict(strict=True)`` refuses any left over)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(".attn_mask"):
            t = value.shape[0]
            if not torch.equal(value.bool(), torch.ones(t, t, dtype=torch.bool).tril()):
                raise CheckpointError(f"{key} is not a causal mask; not an ml-tarflow Model")
            continue
        if key == "var":
            if config.prior == "learned":
                out["prior_log_std"] = 0.5 * torch.log(value)
            continue
        if key.endswith(".class_embed"):
            rows = value[:, 0]
            block = key.split(".")[1]
            out[f"class_embeddings.{block}.table.weight"] = torch.cat(
                [rows, rows.mean(0, keepdim=True)])
            continue
        key = key.replace(".attn_blocks.", ".layers.")
        for theirs, ours in _MLP.items():
            key = key.replace(f".mlp.{theirs}", f".mlp.{ours}")
        out[key] = value
    return out


def to_ml_tarflow(model: TarFlow) -> dict[str, Tensor]:
    """The zoo model's weights under ml-tarflow's names and shapes (what its ``Model`` of the
    same configuration loads with ``load_state_dict(strict=True)``); the inverse of
    ``from_ml_tarflow`` (the "no class" row, which ml-tarflow computes as the class mean, is
    dropped)."""
    cfg = model.config
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "prior_log_std":
            out["var"] = torch.exp(2 * value)
            continue
        if key.startswith("class_embeddings."):
            out[f"blocks.{key.split('.')[1]}.class_embed"] = value[:cfg.num_classes, None, :]
            continue
        key = key.replace(".layers.", ".attn_blocks.")
        for theirs, ours in _MLP.items():
            key = key.replace(f".mlp.{ours}", f".mlp.{theirs}")
        out[key] = value
    t = cfg.num_tokens
    for k in range(cfg.num_blocks):
        out[f"blocks.{k}.attn_mask"] = torch.ones(t, t).tril()
    out.setdefault("var", torch.ones(t, cfg.token_dim))
    return out


def load_ml_tarflow(path: str | os.PathLike[str], *, in_channels: int = 3, head_dim: int = 64,
                    noise_std: float | None = None) -> TarFlow:
    """A zoo ``TarFlow`` holding the weights of an ml-tarflow checkpoint.

    Args:
        path: the ``.pth`` that ml-tarflow's ``train.py`` wrote (``model.state_dict()``).
        in_channels: the images' channels C (3 for every ml-tarflow configuration).
        head_dim: the attention head width (ml-tarflow: 64).
        noise_std: σ of its training noise in ml-tarflow's [−1, 1] units (0 for uniform
            dequantisation); None: read from ml-tarflow's file name, else a ``ConfigError``.
    """
    if noise_std is None:
        noise_std = noise_from_file_name(path)
        if noise_std is None:
            raise ConfigError(f"{Path(path).name} does not say the training noise in "
                              "ml-tarflow's naming (..._model_P_ch_blocks_layers_0.05.pth or "
                              "..._uniform.pth); give noise_std (0 for uniform dequantisation)")
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ConfigError(f"noise_std must be a number ≥ 0, got {noise_std!r}")
    state = read_state_dict(path)
    config = config_from_state(state, in_channels, head_dim, noise_std / 2.0)
    model = TarFlow(config)
    try:
        model.load_state_dict(from_ml_tarflow(state, config), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the tensors do not match a TarFlow of the "
                              f"configuration they imply ({str(err).splitlines()[0]})") from err
    return model


def convert_ml_tarflow(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                       in_channels: int = 3, head_dim: int = 64,
                       noise_std: float | None = None) -> TarFlow:
    """Write an ml-tarflow checkpoint as a zoo checkpoint (config.json + model.safetensors, a
    card) into ``out_dir``; returns the model (see ``load_ml_tarflow`` for the arguments)."""
    model = load_ml_tarflow(path, in_channels=in_channels, head_dim=head_dim,
                            noise_std=noise_std)
    model.save_pretrained(out_dir)
    return model
