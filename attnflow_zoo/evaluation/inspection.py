"""Pictures of a model on one image: its attention maps, and where its bits/dim go.

Attention (read by forward pre-hooks that record each attention layer's input during one
density evaluation, then computed by the layer's own map method for that input):

- iMap: the gate on the unmasked entries σ(a_p + b) per position p (``IMap.gate_map``);
- iTrans: the softmax S = softmax(Q Kᵀ/τ) over tokens, rows = query tokens (the layer applies
  A = (1 − β)I + β·S, or S + αI in the paper form; ``ITrans.attention_weights``);
- residual attention: P[i, j], the weights output position j averages the values of the
  source positions i with (``ResidualAttention.attention_map``);
- TarFlow: each causal transformer layer's softmax over tokens, averaged over heads, rows =
  query tokens in the image's token order (``TarFlowBlock.attention_maps``; a reversed block's
  triangle is the upper one).

Bits/dim: no zoo model factorises over pixels (the flow mixes them), so there is no exact
per-pixel −log p. What is exact is the per-level split of the image's bits/dim,
bpd = Σ_l −log p(z_l | cond_l)/(D ln 2) + (−log|det ∂z/∂x|)/(D ln 2) + 8, and inside a level the
prior term is a sum over the latent's positions: those per-position bits are the heat maps. The
flow's log-determinant term is one number per image (it has no position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._io import atomic_path, check_writable
from ..core import diag_normal_logpdf, resolve_device
from ..data.images import read_image
from ..errors import ConfigError
from ..layers.masked_attention import IMap, ITrans
from ..layers.residual_attention import ResidualAttention
from ..layers.tarflow import TarFlowBlock
from . import latents as latent_tools

ATTENTION_LAYERS = (IMap, ITrans, ResidualAttention, TarFlowBlock)


@dataclass(frozen=True)
class AttentionMap:
    """One attention layer's map for a batch of images.

    Attributes:
        level: how many times the image was squeezed before the layer (its input is
            H/2^level × W/2^level), 1-based; for TarFlow the block, 1-based.
        step: the layer's place among the attention layers of its level (TarFlow: of its
            block), 1-based.
        kind: "imap_gate" (values B×H_l×W_l), "itrans" (S, B×N_t×N_t, rows = query tokens),
            "residual" (P, B×N×N, column j = output position j's weights over sources i) or
            "tarflow" (causal softmax averaged over heads, B×T×T, rows = query tokens).
        values: the map (see ``kind``), on the CPU.
        grid: the (rows, columns) of the positions or tokens, row-major in the matrices.
    """

    level: int
    step: int
    kind: str
    values: Tensor
    grid: tuple[int, int]


@torch.no_grad()
def attention_maps(model: Any, x: Tensor, y: Tensor | int | None = None,
                   generator: torch.Generator | None = None) -> list[AttentionMap]:
    """Every attention layer's map for images x (model space, B×C×H×W), in forward order."""
    layers = [m for m in model.modules() if isinstance(m, ATTENTION_LAYERS)]
    if not layers:
        raise ConfigError(f"this {type(model).__name__} has no attention layers (iMap, iTrans or "
                          "residual attention) to picture; inspect an attention model")
    inputs: dict[nn.Module, tuple[Any, ...]] = {}

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        inputs.setdefault(module, args)  # the first call is the forward pass on x

    handles = [m.register_forward_pre_hook(record) for m in layers]
    try:
        model.log_density(x, y, generator=generator)
    finally:
        for h in handles:
            h.remove()
    maps: list[AttentionMap] = []
    steps: dict[int, int] = {}
    blocks = 0
    for layer in layers:
        args = inputs[layer]
        if isinstance(layer, TarFlowBlock):
            blocks += 1
            maps += _tarflow_maps(layer, args, blocks)
            continue
        h = args[0]
        level = round(math.log2(x.shape[-2] / h.shape[-2]))
        steps[level] = steps.get(level, 0) + 1
        if isinstance(layer, IMap):
            kind, values, grid = "imap_gate", layer.gate_map(h)[:, 0], tuple(h.shape[-2:])
        elif isinstance(layer, ITrans):
            p = layer.patch_size
            kind, values = "itrans", layer.attention_weights(h)
            grid = (h.shape[-2] // p, h.shape[-1] // p)
        else:
            kind, values, grid = "residual", layer.attention_map(h), tuple(h.shape[-2:])
        maps.append(AttentionMap(level, steps[level], kind, values.float().cpu(), grid))
    return maps


def _tarflow_maps(block: TarFlowBlock, args: tuple[Any, ...], index: int
                  ) -> list[AttentionMap]:
    """The maps of TarFlow block ``index`` (1-based) from its recorded (tokens, context); the
    tokens of a (square) TarFlow image are a √T × √T grid."""
    side = math.isqrt(block.num_tokens)
    grid = (side, side)
    context = args[1] if len(args) > 1 else None
    return [AttentionMap(index, i + 1, "tarflow", w.float().cpu(), grid)
            for i, w in enumerate(block.attention_maps(args[0], context))]


@dataclass(frozen=True)
class BitsPerDim:
    """An image batch's bits/dim, split by level.

    Attributes:
        total: bits/dim per image, (B,) (the model's, for x as given).
        levels: per level l, −log p(z_l | cond_l)/(D ln 2), (B,) each.
        flow: −log|det ∂z/∂x|/(D ln 2), (B,).
        maps: per level, B×H_l×W_l: −Σ_c log₂ p(z_l[c, i, j] | ·)/C_l, the bits per latent
            dimension at each position (its mean × C_l·H_l·W_l / D is ``levels[l]``).
    """

    total: Tensor
    levels: list[Tensor]
    flow: Tensor
    maps: list[Tensor]


@torch.no_grad()
def bits_per_dim_split(model: Any, x: Tensor, y: Tensor | int | None = None,
                       generator: torch.Generator | None = None) -> BitsPerDim:
    """The per-level split of the bits/dim of images x (model space); see the module docstring.
    ``levels`` + ``flow`` + 8 = ``total`` to float rounding."""
    latent_tools.check_supported(model)
    dims = math.prod(x.shape[1:])
    latents = model.encode_latents(x, y)
    params = model.latent_priors(latents, y)
    elems = [_normal_logpdf(z, m, ls) for z, (m, ls) in zip(latents, params, strict=True)]
    log_prior = sum(e.flatten(1).sum(1) for e in elems)
    total_nats = model.log_density(x, y, generator=generator)
    ln2 = math.log(2.0)
    return BitsPerDim(
        total=((-total_nats) / (dims * ln2) + 8.0).cpu(),
        levels=[(-e.flatten(1).sum(1) / (dims * ln2)).cpu() for e in elems],
        flow=(-(total_nats - log_prior) / (dims * ln2)).cpu(),
        maps=[(-e.sum(1) / (e.shape[1] * ln2)).cpu() for e in elems])


def _normal_logpdf(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(z; μ, σ²) per element (``core.diag_normal_logpdf`` before its sum)."""
    return diag_normal_logpdf(z.flatten().view(-1, 1), mean.flatten().view(-1, 1),
                              log_std.flatten().view(-1, 1)).view(z.shape)


# --- figures ---------------------------------------------------------------------------------

def _grid_position(position: tuple[float, float], grid: tuple[int, int]) -> int:
    """Row-major index in ``grid`` of a (row, column) position given as fractions of the image."""
    r = min(int(position[0] * grid[0]), grid[0] - 1)
    c = min(int(position[1] * grid[1]), grid[1] - 1)
    return r * grid[1] + c


def _show_image(ax: Any, image: Tensor) -> None:
    img = image.permute(1, 2, 0).numpy()
    ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=255,
              extent=(0, 1, 1, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(fig: Any, ax: Any, image: Tensor, heat: Tensor, title: str) -> None:
    # A grey image underneath, so the only colours are the heat map's.
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    _show_image(ax, (image.float() * weights).sum(0, keepdim=True) if image.shape[0] == 3
                else image)
    im = ax.imshow(heat.numpy(), cmap="magma", alpha=0.6, extent=(0, 1, 1, 0),
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=8)


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def attention_figures(maps: list[AttentionMap], image_u8: Tensor, folder: Path,
                      position: tuple[float, float] = (0.5, 0.5)) -> list[Path]:
    """One PNG per level, ``attention_level{l}.png`` (TarFlow: per block,
    ``attention_block{k}.png``): a row per attention layer with its map
    (iMap: the gate as a heat map and over the image; iTrans: S, rows = query tokens, and the
    row of the query token at ``position`` over the image; residual: P with rows = output
    positions, and the weights of the output position at ``position`` over the image).

    ``position`` is (row, column) as fractions of the image's height and width; it is marked.
    Image 0 of the batch is drawn. Returns the paths written.
    """
    from matplotlib.figure import Figure

    paths = []
    for level in sorted({m.level for m in maps}):
        rows = [m for m in maps if m.level == level]
        unit = "block" if rows[0].kind == "tarflow" else "level"
        fig = Figure(figsize=(7.0, 3.0 * len(rows)))
        axes = fig.subplots(len(rows), 2, squeeze=False)
        for (ax_map, ax_img), m in zip(axes, rows, strict=True):
            where = f"{unit} {level}, {'layer' if unit == 'block' else 'step'} {m.step}"
            if m.kind == "imap_gate":
                gate = m.values[0]
                im = ax_map.imshow(gate.numpy(), cmap="magma", interpolation="nearest")
                fig.colorbar(im, ax=ax_map, fraction=0.046)
                ax_map.set_title(f"{where}: iMap gate σ(a+b), {gate.min():.4g}..{gate.max():.4g}",
                                 fontsize=8)
                _overlay(fig, ax_img, image_u8, gate, "gate over the image")
                continue
            # Rows = queries: iTrans' S and TarFlow's already are; the residual P has
            # columns = outputs.
            matrix = m.values[0].T if m.kind == "residual" else m.values[0]
            query = _grid_position(position, m.grid)
            im = ax_map.imshow(matrix.numpy(), cmap="viridis", interpolation="nearest")
            fig.colorbar(im, ax=ax_map, fraction=0.046)
            name = {"itrans": "iTrans softmax S", "tarflow": "causal attention"
                    }.get(m.kind, "residual attention P")
            ax_map.set_title(f"{where}: {name} ({matrix.shape[0]} tokens; rows = queries)",
                             fontsize=8)
            ax_map.set_xlabel("key token", fontsize=7)
            ax_map.set_ylabel("query token", fontsize=7)
            _overlay(fig, ax_img, image_u8, matrix[query].reshape(m.grid),
                     f"row of query token {query} (marked)")
            ax_img.plot([position[1]], [position[0]], marker="+", color="cyan", markersize=12)
        fig.tight_layout()
        paths.append(_save(fig, folder / f"attention_{unit}{level}.png"))
    return paths


def bits_figure(split: BitsPerDim, image_u8: Tensor, path: Path) -> Path:
    """``bits_per_dim.png``: the image and, per level, its bits per latent dimension at each
    position over the image, titled with the level's share of the bits/dim (image 0)."""
    from matplotlib.figure import Figure

    n = len(split.maps)
    fig = Figure(figsize=(3.2 * (n + 1), 3.4))
    axes = fig.subplots(1, n + 1, squeeze=False)[0]
    _show_image(axes[0], image_u8)
    axes[0].set_title(f"{float(split.total[0]):.3f} bits/dim\n(flow −log|det|: "
                      f"{float(split.flow[0]):+.3f}, +8 quantisation)", fontsize=8)
    for lvl, (ax, heat) in enumerate(zip(axes[1:], split.maps, strict=True)):
        _overlay(fig, ax, image_u8, heat[0],
                 f"level {lvl + 1} prior: {float(split.levels[lvl][0]):+.3f} bits/dim\n"
                 "(bits per latent dim at each position)")
    fig.tight_layout()
    return _save(fig, path)


@torch.no_grad()
def inspect_image(model: Any, image_u8: Tensor, folder: str | Path,
                  position: tuple[int, int] | None = None, y: Tensor | int | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Write the pictures of ``model`` on one uint8 image (C×H×W) into ``folder``: the
    attention figures (if the model has attention layers) and ``bits_per_dim.png``.

    ``position``: the (row, column) pixel whose attention row / column is drawn (default the
    centre). The image is taken at its bins' centres (``latents.centred``); ``seed`` feeds
    stochastic log-determinant estimators (ResFlow). Returns {"files": [...],
    "bits_per_dim": float, "levels": [...], "flow": float}.
    """
    _, h, w = model.input_shape
    row, col = position if position is not None else (h // 2, w // 2)
    if not (0 <= row < h and 0 <= col < w):
        raise ConfigError(f"the position ({row}, {col}) lies outside the model's {h}×{w} "
                          f"image; give ROW,COL with 0 ≤ ROW < {h} and 0 ≤ COL < {w}")
    folder = Path(folder)
    model.eval()
    x = latent_tools.centred(model, image_u8[None])
    gen = torch.Generator(device=model.device).manual_seed(seed)
    files = []
    if any(isinstance(m, ATTENTION_LAYERS) for m in model.modules()):
        maps = attention_maps(model, x, y, generator=gen)
        files += attention_figures(maps, image_u8.cpu(), folder,
                                   ((row + 0.5) / h, (col + 0.5) / w))
    gen.manual_seed(seed)
    split = bits_per_dim_split(model, x, y, generator=gen)
    files.append(bits_figure(split, image_u8.cpu(), folder / "bits_per_dim.png"))
    return {"files": [str(f) for f in files], "bits_per_dim": float(split.total[0]),
            "levels": [float(v[0]) for v in split.levels], "flow": float(split.flow[0])}


def inspect_file(model: Any, path: str | Path, folder: str | Path,
                 position: tuple[int, int] | None = None, seed: int = 0,
                 device: str | torch.device = "auto") -> dict[str, Any]:
    """``inspect_image`` on an image file (``images.read_image`` fits it to the model), with the
    model moved to ``device``."""
    check_writable(folder, is_dir=True)
    image = read_image(path, model.input_shape)
    model = model.to(resolve_device(device))
    return inspect_image(model, image, folder, position, seed=seed)
