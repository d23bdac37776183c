"""Time the FID feature pipeline: N uint8 images → 2048-d Inception pool features (+ Fréchet).

    python benchmarks/fid_features.py [--num-images 1000] [--batch-size 100] [--image-size 32]
                                      [--device cpu] [--threads 2] [--weights PATH]

Without ``--weights`` the Inception has RANDOM weights: the timing is that of the real network
(same architecture and FLOPs) but the distance printed is not a FID. Images are random uint8
(the cost does not depend on their content: every image is resized to 299×299).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from attnflow_zoo import inception, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", default=None, help="FID Inception weights (else random)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    extractor = (inception.load_inception(args.weights, device=args.device) if args.weights
                 else inception.load_inception(random_init=True, generator=gen,
                                               device=args.device))
    t_build = time.perf_counter() - t0
    images = torch.randint(0, 256, (args.num_images, args.channels, args.image_size,
                                    args.image_size), generator=gen, dtype=torch.uint8)
    extractor(images[:2])  # warm-up (allocator, kernels)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    feats = metrics.image_features(images, extractor, batch_size=args.batch_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_feat = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = metrics.feature_statistics(feats, extractor.weights_id)
    other = metrics.feature_statistics(np.random.default_rng(0).normal(size=feats.shape))
    d = metrics.frechet_distance(stats.mu, stats.sigma, other.mu, other.sigma)
    t_frechet = time.perf_counter() - t0
    print(f"weights: {extractor.weights_id}")
    print(f"device={args.device} threads={args.threads} images={args.num_images} "
          f"{args.channels}x{args.image_size}x{args.image_size} batch={args.batch_size}")
    print(f"build+weights: {t_build:.2f} s")
    print(f"features: {t_feat:.2f} s  ({args.num_images / t_feat:.1f} images/s, "
          f"{1000 * t_feat / args.num_images:.1f} ms/image)")
    print(f"statistics + Fréchet distance (2048-d): {t_frechet:.2f} s  (value {d:.4g}"
          f"{'' if args.weights else ', random weights: NOT a FID'})")


if __name__ == "__main__":
    main()
