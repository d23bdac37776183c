"""Classifiers of the embedded digits, trained on the real training digits only, for scoring what
models generate (benchmarks only: the library needs none of this).

- ``feature_net()``: a small CNN (the usual MNIST practice for a Fréchet distance on digits:
  conv 32 → conv 64 → conv 128, 3×3, ReLU and 2×2 max-pool each, then a 128-unit ReLU layer, the
  features, and a 10-way linear layer), trained with a fixed seed on one thread, so it is the
  same network on every run; it is cached under ``$ATTNFLOW_BENCH_CACHE`` (default
  ``~/.cache/attnflow_zoo_bench``) by a key of its recipe and the training digits, and retrained
  when the file is missing.
- ``pixel_svm()``: an RBF-kernel SVM on raw pixels (scikit-learn's defaults, C = 10), the "simple
  classifier" of issue 20; it needs scikit-learn (``pip install scikit-learn``), a benchmark
  dependency only.

Images: the digits as every zoo model sees them, 1×32×32 uint8 (28×28 zero-padded).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attnflow_zoo.data import datasets

SHAPE = (1, 32, 32)
#: Everything that makes the feature network what it is; a change gives a new cache file.
RECIPE = {"version": 1, "seed": 0, "epochs": 8, "batch_size": 64, "lr": 1e-3, "features": 128}


def digits(split: str) -> tuple[Tensor, Tensor]:
    """(N×1×32×32 uint8 images, (N,) int64 labels) of the embedded digits' ``split``."""
    images, labels = datasets.load_labelled("digits", split, SHAPE)
    assert labels is not None
    return images, labels


class FeatureNet(nn.Module):
    """uint8 1×32×32 -> 128 features (``features``) -> 10 logits (``forward``)."""

    def __init__(self, width: int = RECIPE["features"]) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1),
                                    nn.Conv2d(64, 128, 3, padding=1)])
        self.hidden = nn.Linear(128 * 4 * 4, width)
        self.head = nn.Linear(width, 10)

    def features(self, x_u8: Tensor) -> Tensor:
        h = x_u8.float() / 127.5 - 1.0
        for conv in self.convs:
            h = F.max_pool2d(F.relu(conv(h)), 2)
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, x_u8: Tensor) -> Tensor:
        return self.head(self.features(x_u8))


def _cache_dir() -> Path:
    return Path(os.environ.get("ATTNFLOW_BENCH_CACHE",
                               Path.home() / ".cache" / "attnflow_zoo_bench"))


def _key(images: Tensor, labels: Tensor) -> str:
    h = hashlib.sha256(repr(sorted(RECIPE.items())).encode())
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()[:16]


def _train(images: Tensor, labels: Tensor) -> FeatureNet:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums, so the same network, on every machine run
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RECIPE["seed"])
            net = FeatureNet()
        g = torch.Generator().manual_seed(RECIPE["seed"])
        opt = torch.optim.Adam(net.parameters(), lr=RECIPE["lr"])
        b = RECIPE["batch_size"]
        for _ in range(RECIPE["epochs"]):
            order = torch.randperm(len(images), generator=g)
            for start in range(0, len(images) - b + 1, b):
                idx = order[start:start + b]
                loss = F.cross_entropy(net(images[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def feature_net() -> FeatureNet:
    """The feature CNN trained on the training digits (cached; see the module docstring)."""
    images, labels = digits("train")
    path = _cache_dir() / f"digits_cnn-{_key(images, labels)}.pt"
    net = FeatureNet()
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    net = _train(images, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)
    return net


@torch.no_grad()
def features(net: FeatureNet, images_u8: Tensor, batch_size: int = 500) -> np.ndarray:
    """N×128 float64 features of uint8 N×1×32×32 images."""
    return torch.cat([net.features(images_u8[i:i + batch_size])
                      for i in range(0, len(images_u8), batch_size)]).double().numpy()


@torch.no_grad()
def cnn_accuracy(net: FeatureNet, images_u8: Tensor, labels: Tensor) -> float:
    logits = torch.cat([net(images_u8[i:i + 500]) for i in range(0, len(images_u8), 500)])
    return float((logits.argmax(1) == labels).double().mean())


def pixel_svm():
    """An RBF SVM (scikit-learn, C = 10, gamma "scale") fitted on the raw training pixels
    scaled to [0, 1]; ``svm_predict`` classifies uint8 images with it."""
    try:
        from sklearn.svm import SVC
    except ImportError as err:  # a benchmark dependency only
        raise SystemExit("this benchmark needs scikit-learn: pip install scikit-learn") from err
    images, labels = digits("train")
    return SVC(C=10.0, kernel="rbf", gamma="scale").fit(_pixels(images), labels.numpy())


def _pixels(images_u8: Tensor) -> np.ndarray:
    return images_u8.flatten(1).double().numpy() / 255.0


def svm_predict(svm, images_u8: Tensor) -> np.ndarray:
    """(N,) predicted classes of uint8 N×1×32×32 images."""
    return svm.predict(_pixels(images_u8))
