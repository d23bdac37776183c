"""Speed of AttnFlow's masked attention layers against the affine coupling they follow.

For each CIFAR-10 level shape of MaR-Flow (12×16×16, 24×8×8, 48×4×4) at batch 64 it times the
forward (no grad), forward + backward (of Σz + Σlogdet) and inverse (no grad) of IMap(spatial),
IMap(channel), ITrans(P=2), ITrans(P=1), and of AffineCoupling(C, hidden_channels=256) of the
same shape, and prints each time and its ratio to the coupling's. Run on CPU, and on CUDA when
available:

    python benchmarks/attention.py [--batch 64] [--repeat 5] [--threads 2] [--device cpu cuda]
        [--shapes 12x16x16 24x8x8 48x4x4] [--layers IMap ITrans]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from attnflow_zoo.layers import AffineCoupling, IMap, ITrans

SHAPES = [(12, 16, 16), (24, 8, 8), (48, 4, 4)]
COUPLING_HIDDEN = 256


def _layers(c: int, h: int, w: int) -> dict[str, Callable[[], nn.Module]]:
    return {
        f"AffineCoupling(h={COUPLING_HIDDEN})": lambda: AffineCoupling(c, COUPLING_HIDDEN),
        "IMap(spatial)": lambda: IMap(c, h, w, 0, "spatial"),
        "IMap(channel)": lambda: IMap(c, h, w, 0, "channel"),
        "ITrans(P=2)": lambda: ITrans(c, h, w, 0, patch_size=2),
        "ITrans(P=1)": lambda: ITrans(c, h, w, 0, patch_size=1),
    }


def _time(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Best wall time of fn in milliseconds over ``repeat`` calls, after two warm-up calls.

    The minimum, not the median: on a shared machine the other processes only ever add time.
    """
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def bench_layer(layer: nn.Module, x: torch.Tensor, repeat: int) -> tuple[float, float, float]:
    """(forward, forward + backward, inverse) in ms."""
    device = x.device
    with torch.no_grad():
        layer.train()
        layer(x)  # data-dependent initialisation (ActNorm inside the coupling's conditioner)
        z = layer(x)[0]

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def forward_backward() -> None:
        layer.zero_grad(set_to_none=True)
        z, logdet = layer(x)
        (z.sum() + logdet.sum()).backward()

    def inverse() -> None:
        with torch.no_grad():
            layer.inverse(z)

    return (_time(forward, device, repeat), _time(forward_backward, device, repeat),
            _time(inverse, device, repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES],
                        help="C×H×W shapes written CxHxW (default: the three CIFAR-10 levels)")
    parser.add_argument("--layers", nargs="+", default=None,
                        help="only the layers whose name starts with one of these (e.g. IMap)")
    parser.add_argument("--device", nargs="+", default=None,
                        help="devices to run on (default: cpu, plus cuda when available)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gen = torch.Generator().manual_seed(0)
    for name in devices:
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else (
            f"cpu, {torch.get_num_threads()} threads")
        print(f"\n## {label}, batch {args.batch}, float32, best of {args.repeat} (ms); "
              f"x = ratio to AffineCoupling(hidden_channels={COUPLING_HIDDEN}) of the same shape")
        print(f"{'shape':>9} | {'layer':<22} | {'fwd':>8} {'x':>5} | {'fwd+bwd':>8} {'x':>5} | "
              f"{'inverse':>8} {'x':>5}")
        for c, h, w in (tuple(int(v) for v in s.split("x")) for s in args.shapes):
            x = torch.randn((args.batch, c, h, w), generator=gen).to(device)
            base = None
            for layer_name, make in _layers(c, h, w).items():
                if layer_name == "ITrans(P=1)" and c % 2:
                    continue  # tokens of one pixel need an even C
                if args.layers and base and not layer_name.startswith(tuple(args.layers)):
                    continue  # the coupling (first) always runs: it is the reference
                times = bench_layer(make().to(device), x, args.repeat)
                base = base or times
                cells = " | ".join(f"{t:8.2f} {t / b:5.2f}" for t, b in zip(times, base,
                                                                           strict=True))
                print(f"{c:>3}×{h}×{w:<3} | {layer_name:<22} | {cells}")


if __name__ == "__main__":
    main()
