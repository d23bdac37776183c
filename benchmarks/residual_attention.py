"""Speed of residual attention in the validation model (Zha et al.), per kind × Lipschitz mode.

Model: squeeze(2) + one ResidualAttention on 3×32×32 inputs (12×16×16 inside), batch 64, as in
the paper's validation experiment. Columns: one training step (forward + MSE + backward + Adam),
the inverse with early stopping (iterations used, converged?), the inverse with exactly 50
iterations (the original's fixed cost), and ‖J_g‖₂ by power iteration, at random init, on
uniform random images in [−0.5, 0.5).

    python benchmarks/residual_attention.py [--threads 2] [--batch-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from attnflow_zoo.layers.residual import InverseNotConvergedWarning
from attnflow_zoo.layers.residual_attention import KINDS
from attnflow_zoo.models.validator import InvertibilityValidator, InvertibilityValidatorConfig


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _bench(kind: str, lipschitz: str, x: torch.Tensor, target: torch.Tensor,
           gen: torch.Generator, repeats: int) -> str:
    torch.manual_seed(0)  # PyTorch's default conv init
    model = InvertibilityValidator(InvertibilityValidatorConfig(kind=kind, lipschitz=lipschitz))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), target).backward()
        opt.step()

    model.train()
    train_s = _time(step, repeats)
    model.eval()
    with torch.no_grad():
        y = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InverseNotConvergedWarning)
        start = time.perf_counter()
        _, info = model.inverse_with_info(y)
        inverse_s = time.perf_counter() - start
        fixed_s = _time(lambda: model.inverse(y, max_iter=50, tol=0.0), 1)
    jac = model.jacobian_norm(x[:8], num_iterations=20, generator=gen).max().item()
    return (f"{kind:<9} {lipschitz:<9} {train_s:>12.3f} {inverse_s:>10.3f} "
            f"{info.iterations:>5d} {str(info.converged):>5} {fixed_s:>13.3f} {jac:>9.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    size = args.image_size
    x = torch.rand(args.batch_size, 3, size, size, generator=gen) - 0.5
    target = torch.randn(args.batch_size, 12, size // 2, size // 2, generator=gen)
    print(f"batch {args.batch_size}, 3×{size}×{size} (12×{size // 2}×{size // 2} inside), "
          f"{args.threads} threads")
    header = (f"{'kind':<9} {'lipschitz':<9} {'train step s':>12} {'inverse s':>10} "
              f"{'iters':>5} {'conv':>5} {'50-iter inv s':>13} {'‖J_g‖₂':>9}")
    print(header)
    print("-" * len(header))
    for lipschitz in ("faithful", "certified"):
        for kind in KINDS:
            print(_bench(kind, lipschitz, x, target, gen, args.repeats))

if __name__ == "__main__":
    main()
