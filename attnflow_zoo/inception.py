"""The FID Inception: 2048-d pool features of the 2015-12-05 TensorFlow Inception v3.

The architecture is torchvision's ``Inception3`` with the blocks that differ in the TF graph
replaced (the port by pytorch-fid, M. Seitzer): average pools that exclude the zero padding
(TF semantics) in the A, C and first E blocks, and a max pool in the last E block. With the
ported weights (``pt_inception-2015-12-05-6726825d.pth``) its features are those of the
reference TF FID implementation (Heusel et al., 2017), so FIDs are comparable with papers.

Weights, in order: an explicit path, ``$ATTNFLOW_INCEPTION_WEIGHTS``, the file in torch hub's
checkpoint cache (where pytorch-fid also keeps it), or a download into that cache (unless
offline), checked against the SHA-256 prefix in the release file name. The ``.pth`` file is a
torch pickle; it is read with ``torch.load(weights_only=True)``, which only reconstructs tensors.
A ``.safetensors`` copy (``convert_weights``) is read as well.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import inception as tv_inception

from .errors import ConfigError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_ID = "pt_inception-2015-12-05-6726825d"
RANDOM_WEIGHTS_ID = "random-init (NOT a real FID)"
ENV_VAR = "ATTNFLOW_INCEPTION_WEIGHTS"
FEATURE_DIM = 2048


def _tf_avg_pool(x: Tensor) -> Tensor:
    # TF's 3×3 average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tv_inception.InceptionA):
    """InceptionA with the TF average pool."""

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionC(tv_inception.InceptionC):
    """InceptionC with the TF average pool."""

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionE(tv_inception.InceptionE):
    """InceptionE with the TF pool: average (first E block) or max (second E block, as in the
    2015-12-05 graph)."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
                  else _tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def fid_inception_v3() -> tv_inception.Inception3:
    """The FID Inception architecture (1008 classes, no aux head), untrained."""
    net = tv_inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False,
                                  transform_input=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    net.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    return net


class InceptionFeatures(nn.Module):
    """uint8 images B×C×H×W (C = 1 or 3, any size) → 2048-d pool features B×2048 (float32).

    x ← u8 / 255, bilinear resize to 299×299 (align_corners=False), x ← 2x − 1 (the TF input
    range), grey images repeated to RGB; then the Inception trunk up to Mixed_7c and a global
    average pool.
    """

    def __init__(self, net: tv_inception.Inception3, weights_id: str) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.weights_id = weights_id

    @torch.no_grad()
    def forward(self, images_u8: Tensor) -> Tensor:
        if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] not in (
                1, 3):
            raise ConfigError(f"FID features need uint8 B×(1|3)×H×W images, got "
                              f"{images_u8.dtype} {tuple(images_u8.shape)}")
        device = next(self.net.parameters()).device
        x = images_u8.to(device).float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1,
                      n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c,
                      n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
                      n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return x.mean(dim=(2, 3)).float()


def default_weights_path() -> Path:
    """Where the release file is cached: torch hub's checkpoint folder (shared with
    pytorch-fid)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "ATTNFLOW_OFFLINE"))


def resolve_weights(path: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """The FID Inception weight file (see the module docstring for the order); ``ConfigError``
    with instructions when none is available."""
    explicit = path or os.environ.get(ENV_VAR)
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise ConfigError(f"FID Inception weights {p} not found (from "
                              f"{'--inception-weights' if path else '$' + ENV_VAR})")
        return p
    cached = default_weights_path()
    if cached.is_file():
        if not _sha256(cached).startswith(WEIGHTS_SHA256_PREFIX):
            raise ConfigError(f"{cached} fails its SHA-256 check (corrupt download); delete it "
                              "and fetch it again")
        return cached
    how = (f"download {WEIGHTS_URL} (the pytorch-fid release file) and pass its path with "
           f"--inception-weights PATH or ${ENV_VAR}, or place it at {cached}")
    if not download or _offline():
        raise ConfigError(f"the FID Inception weights are not available offline; {how}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, str(cached),
                                       hash_prefix=WEIGHTS_SHA256_PREFIX, progress=True)
    except Exception as err:
        raise ConfigError(f"could not download the FID Inception weights ({err}); {how}") from err
    return cached


def load_inception(weights: str | os.PathLike[str] | None = None, *, random_init: bool = False,
                   generator: torch.Generator | None = None, download: bool = True,
                   device: torch.device | str = "cpu") -> InceptionFeatures:
    """The feature extractor with the standard weights, or (``random_init=True``, for tests and
    timing only) random ones: its "FID" is then not a FID, and ``weights_id`` says so.

    ``weights_id`` is ``pt_inception-2015-12-05-6726825d`` only for the release file (its SHA-256
    starts with 6726825d) or its ``convert_weights`` copy; any other file is ``custom-<sha>``.
    """
    net = fid_inception_v3()
    if random_init:
        gen = generator or torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in net.parameters():
                if p.dim() > 1:  # He-style scale keeps activations finite through 90 layers
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        return InceptionFeatures(net, RANDOM_WEIGHTS_ID).to(device)
    path = resolve_weights(weights, download=download)
    sha = _sha256(path)
    weights_id = WEIGHTS_ID if sha.startswith(WEIGHTS_SHA256_PREFIX) else f"custom-{sha[:8]}"
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("source_sha256", "").startswith(WEIGHTS_SHA256_PREFIX):
                weights_id = WEIGHTS_ID  # written by convert_weights from the release file
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{path} is not the FID Inception weight file: "
                          f"{str(err).splitlines()[0]}") from err
    return InceptionFeatures(net, weights_id).to(device)


def convert_weights(pth: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the release ``.pth`` as ``.safetensors`` (so later runs read no pickle at all)."""
    from safetensors.torch import save_file

    state = torch.load(Path(pth), map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out),
              metadata={"source_sha256": _sha256(Path(pth))})
    return Path(out)
