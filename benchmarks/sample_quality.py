"""Sample quality of digits models as a number on CPU: the Fréchet distance between the features
of a small CNN trained on the real training digits (``digits_classifiers.feature_net``, fixed
seed, cached) of a model's samples and of the real training digits — the usual MNIST practice
(an "FID" with a digits classifier in place of Inception). The zoo's ``frechet_distance`` and
``feature_statistics`` compute it.

    OMP_NUM_THREADS=1 python benchmarks/sample_quality.py runs/a runs/b/step-0001500 ... \\
        [--temperatures 0.7 1.0] [--num-samples 1000] [--seed 0] [--json out.json]

Prints first the floor: the real held-out digits (1,000) against the training digits (4,000),
what a model whose samples were real digits would score with as many samples; then, per
checkpoint and temperature, ``--num-samples`` samples (seeded ``--seed``; a class-conditional
model draws every class in turn), how many were non-finite (set to 0 before the uint8
conversion and kept: a model that blows up pays for it) and their distance. Also the feature
CNN's held-out accuracy, as a check that it is a digits classifier. Lower is better; compare
numbers at the same ``--num-samples`` only (the estimate is biased upward for small N).

A checkpoint is a folder written by ``save_pretrained`` or a training ``--out`` folder (its
newest checkpoint). The models must take 1×32×32 images (the embedded digits as the zoo's
digits presets see them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import digits_classifiers as dc  # noqa: E402

import attnflow_zoo as az  # noqa: E402
from attnflow_zoo.data.quantize import from_model_space  # noqa: E402
from attnflow_zoo.evaluation.fid import feature_statistics, frechet_distance  # noqa: E402
from attnflow_zoo.hub import resolve_checkpoint  # noqa: E402


def distance(net: dc.FeatureNet, images_u8: torch.Tensor, reference) -> float:
    stats = feature_statistics(dc.features(net, images_u8))
    return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)


@torch.no_grad()
def model_samples(model, num_samples: int, temperature: float, seed: int,
                  batch_size: int = 250) -> tuple[torch.Tensor, int]:
    """(uint8 samples, how many were non-finite); the generator is seeded once."""
    g = torch.Generator().manual_seed(seed)
    images, nonfinite = [], 0
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        y = ((torch.arange(start, start + n) % model.num_classes) if model.num_classes
             else None)
        x = model.generate(n, temperature=temperature, generator=g, y=y)
        finite = torch.isfinite(x)
        nonfinite += int((~finite.flatten(1).all(1)).sum())
        images.append(from_model_space(torch.where(finite, x, torch.zeros(()))))
    return torch.cat(images), nonfinite


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="*")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    net = dc.feature_net()
    train, _ = dc.digits("train")
    heldout, heldout_labels = dc.digits("test")
    reference = feature_statistics(dc.features(net, train))
    floor = distance(net, heldout, reference)
    print(f"feature CNN: held-out accuracy {dc.cnn_accuracy(net, heldout, heldout_labels):.4f}")
    print(f"floor: real held-out digits ({len(heldout)}) vs train ({len(train)}): {floor:.3f}")
    rows = []
    for path in args.checkpoints:
        model = az.load_model(resolve_checkpoint(path)).eval()
        for t in args.temperatures:
            images, bad = model_samples(model, args.num_samples, t, args.seed)
            fd = distance(net, images, reference)
            rows.append({"checkpoint": str(path), "temperature": t, "fd": fd,
                         "num_samples": args.num_samples, "nonfinite": bad, "seed": args.seed})
            print(f"{path}  T={t}: FD {fd:.3f} ({args.num_samples} samples, {bad} non-finite, "
                  f"seed {args.seed})")
    if args.json is not None:
        args.json.write_text(json.dumps({"floor": floor, "num_heldout": len(heldout),
                                         "num_train": len(train), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
