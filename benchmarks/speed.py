"""Speed and memory side by side with mar-scf (visinf/mar-scf, its real code), in one run.

The peer is imported unmodified from ``--peer-dir`` (``peer.py``) and built at the same
configuration as ours — by default the reference configuration: L = 3, K = 2, C = 256, affine
couplings, 3×32×32 (ours: ``marflow_cifar10_small`` with num_steps=2, hidden_channels=256).

Per batch size:

- time, in this process, interleaved: every round runs one training step (forward + backward
  + Adamax, dequantisation included) of mar-scf and of each of our variants, then one sampling
  call of 16 images (temperature 1) of each. The ratio ours/mar-scf is taken per round, and the
  table gives its median and range over the rounds (the machine may be shared: a ratio of two
  numbers measured seconds apart is what survives that; absolute times do not);
- peak memory, each model and variant in its own subprocess (CPU: peak RSS of the process,
  VmHWM, and its increase over the RSS after building the model; CUDA: max allocated).

Variants of ours: ``fp32`` (eager), ``bf16`` (``attnflow_zoo.precision``), and with
``-compile`` appended, ``attnflow_zoo.compilation`` (the first call's cost, compilation
included, is reported separately; its rounds time the compiled steady state).
The training step is ``harness.TrainStep`` (no host synchronisation).

    python benchmarks/speed.py --peer-dir /work/peers/mar-scf
    python benchmarks/speed.py --peer-dir /work/peers/mar-scf --batch-sizes 16 --rounds 9 \\
        --variants fp32 bf16 bf16-compile
    python benchmarks/speed.py --peer-dir … --device cuda --threads 16
    python benchmarks/speed.py --peer-dir … --batch-sizes 16 --variants marflow:fp32 \\
        marflow:bf16 imap:fp32 imap:bf16 itrans:fp32 itrans:bf16     # all three in one run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REFERENCE_MODEL = "marflow_cifar10_small"
REFERENCE_OVERRIDES = {"num_steps": 2, "hidden_channels": 256, "coupling": "affine"}


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        return "n/a"


class _Runner:
    """Builds mar-scf and our variants at one batch size; train/sample closures per name."""

    def __init__(self, args: argparse.Namespace, batch_size: int, names: list[str]) -> None:
        import peer
        import torch
        from harness import TrainStep, make_sampler

        import attnflow_zoo as az
        from attnflow_zoo.compilation import compile_log_density, compile_sampling

        self.torch = torch
        self.device = torch.device(args.device)
        self.batch_size = batch_size
        self.sample_size = args.sample_batch_size
        self.first_call: dict[str, tuple[float, float]] = {}
        overrides = json.loads(args.set)
        g = torch.Generator().manual_seed(0)
        shape = (3, 32, 32)
        self.x_u8 = torch.randint(0, 256, (batch_size, *shape), generator=g,
                                  dtype=torch.uint8).to(self.device)
        self.train: dict[str, Callable[[], object]] = {}
        self.sample: dict[str, Callable[[], object]] = {}
        if "mar-scf" in names:
            marscf = peer.load_marscf(args.peer_dir)
            model = peer.build_peer_model(
                marscf, num_levels=3, num_steps=overrides.get("num_steps", 2),
                hidden_channels=overrides.get("hidden_channels", 256), batch_size=batch_size,
                seed=0).to(self.device)
            opt = torch.optim.Adamax(model.parameters(), lr=1e-5)

            def peer_train(model=model, opt=opt) -> None:
                loss = peer.peer_native_bits_per_dim(model, self.x_u8).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            self.train["mar-scf"] = peer_train
            self.sample["mar-scf"] = lambda model=model: peer.peer_sample(model,
                                                                           self.sample_size)
        for name in names:
            if name == "mar-scf":
                continue
            preset, precision, compiled = _parse_variant(name, args.model)
            torch.manual_seed(0)
            model = az.create_model(preset, **overrides).to(self.device)
            model.initialize_from_data(self.x_u8, torch.Generator(self.device).manual_seed(1))
            opt = torch.optim.Adamax(model.parameters(), lr=1e-5,
                                     capturable=self.device.type == "cuda")
            log_density = compile_log_density(model) if compiled else None
            step = TrainStep(model, opt, precision, log_density)
            gen = torch.Generator(self.device).manual_seed(2)
            self.train[name] = (lambda step=step, model=model, gen=gen:
                                step(model.to_model_space(self.x_u8, gen)))
            sampler = make_sampler(model, precision,
                                   compile_sampling(model) if compiled else None)
            self.sample[name] = (lambda sampler=sampler, gen=gen:
                                 sampler(self.sample_size, 1.0, gen))

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def warm_up(self) -> None:
        for name in self.train:
            first_train = self.timed(self.train[name])
            first_sample = self.timed(self.sample[name])
            self.first_call[name] = (first_train, first_sample)
            self.train[name]()
            self.sample[name]()


def _measure_memory(args: argparse.Namespace, batch_size: int, name: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-memory", name, "--batch-sizes",
           str(batch_size), "--device", args.device, "--threads", str(args.threads),
           "--peer-dir", str(args.peer_dir), "--model", args.model, "--set", args.set,
           "--sample-batch-size", str(args.sample_batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _memory_worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)

    def status_mb(field: str) -> float:
        # VmHWM (peak RSS) of this process image. Not getrusage's ru_maxrss: Linux keeps that
        # across fork + exec, so a subprocess would report its parent's peak.
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    runner = _Runner(args, args.batch_sizes[0], [args.worker_memory])
    base = status_mb("VmRSS")
    if runner.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runner.device)
    name = args.worker_memory
    for _ in range(2):
        runner.train[name]()
        runner.sample[name]()
    runner.sync()
    out = {"peak_rss_mb": status_mb("VmHWM"), "base_rss_mb": base}
    if runner.device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(runner.device) / 2**20
    return out


#: Short model names a variant may start with (``imap:bf16``); any preset name works too.
MODELS = {"marflow": "marflow_cifar10_small", "imap": "attnflow_imap_cifar10_small",
          "itrans": "attnflow_itrans_cifar10_small"}


def _parse_variant(name: str, default_model: str) -> tuple[str, str, str]:
    """(preset, precision, "compile" or "") of a variant ``[model:]precision[-compile]``."""
    model, _, rest = name.rpartition(":")
    precision, _, compiled = rest.partition("-")
    return MODELS.get(model, model or default_model), precision, compiled


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-dir", type=Path, default=Path("/work/peers/mar-scf"),
                        help="a clone of github.com/visinf/mar-scf (imported unmodified)")
    parser.add_argument("--model", default=REFERENCE_MODEL)
    parser.add_argument("--set", default=json.dumps(REFERENCE_OVERRIDES),
                        help="config overrides of --model as JSON (default: the reference)")
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16"],
                        help="ours: [MODEL:]PRECISION[-compile], e.g. fp32, bf16-compile, "
                        "imap:bf16 (MODEL: marflow, imap, itrans or a preset; default --model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--sample-batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    parser.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for v in args.variants:
        _, precision, compiled = _parse_variant(v, args.model)
        if precision not in ("fp32", "bf16") or compiled not in ("", "compile"):
            parser.error(f"unknown variant {v!r}")

    import torch

    torch.set_num_threads(args.threads)
    if args.worker_memory is not None:
        print(json.dumps(_memory_worker(args)))
        return
    names = ["mar-scf", *args.variants]
    print(f"{args.model} {args.set} vs mar-scf ({args.peer_dir}); device {args.device}, "
          f"{args.threads} threads, {args.rounds} rounds; load average at start {_load()}",
          flush=True)
    raw: dict = {}
    for batch_size in args.batch_sizes:
        runner = _Runner(args, batch_size, names)
        runner.warm_up()
        times: dict[str, dict[str, list[float]]] = {
            k: {n: [] for n in names} for k in ("train", "sample")}
        for r in range(args.rounds):
            for kind, fns in (("train", runner.train), ("sample", runner.sample)):
                for name in names:
                    times[kind][name].append(runner.timed(fns[name]))
            print(f"  batch {batch_size} round {r + 1}/{args.rounds}: train "
                  + " ".join(f"{n} {times['train'][n][-1]:.2f}s" for n in names)
                  + " | sample " + " ".join(f"{n} {times['sample'][n][-1]:.2f}s"
                                             for n in names), flush=True)
        memory = {} if args.no_memory else {n: _measure_memory(args, batch_size, n)
                                              for n in names}
        raw[batch_size] = {"times": times, "memory": memory, "first_call": runner.first_call}
        _print_table(batch_size, args, names, times, memory, runner.first_call)
    print(f"load average at end {_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


def _print_table(batch_size: int, args: argparse.Namespace, names: list[str],
                 times: dict, memory: dict, first_call: dict) -> None:
    ours = names[1:]
    print(f"\nbatch {batch_size} (sampling {args.sample_batch_size} images); ours/mar-scf: "
          "median of per-round ratios (min–max)")
    print("| | mar-scf | " + " | ".join(ours) + " |")
    print("|---|---|" + "---|" * len(ours))
    for kind, label in (("train", "train step"), ("sample", f"sample {args.sample_batch_size}")):
        base = times[kind]["mar-scf"]
        print(f"| {label}, s (median) | {statistics.median(base):.3f} | "
              + " | ".join(f"{statistics.median(times[kind][n]):.3f}" for n in ours) + " |")
        print(f"| {label}, ours/mar-scf | 1 | "
              + " | ".join(_cell([a / b for a, b in zip(times[kind][n], base, strict=True)])
                           for n in ours) + " |")
    if memory:
        key = "cuda_peak_mb" if "cuda_peak_mb" in memory["mar-scf"] else "peak_rss_mb"
        print(f"| peak memory, MB ({key}) | {memory['mar-scf'][key]:.0f} | "
              + " | ".join(f"{memory[n][key]:.0f}" for n in ours) + " |")
        print("| peak memory, ours/mar-scf | 1 | "
              + " | ".join(f"{memory[n][key] / memory['mar-scf'][key]:.2f}" for n in ours)
              + " |")
        if key == "peak_rss_mb":
            def grow(n: str) -> float:
                return memory[n]["peak_rss_mb"] - memory[n]["base_rss_mb"]
            print(f"| peak RSS − RSS of the built model, MB | {grow('mar-scf'):.0f} | "
                  + " | ".join(f"{grow(n):.0f} ({grow(n) / max(grow('mar-scf'), 1e-9):.2f}×)"
                               for n in ours) + " |")
    print("| first train step / first sample, s | "
          + " | ".join(f"{first_call[n][0]:.1f} / {first_call[n][1]:.1f}" for n in names)
          + " |")
    for name in ours:
        if name.endswith("-compile") and name.removesuffix("-compile") in ours:
            eager = name.removesuffix("-compile")
            for kind in ("train", "sample"):
                ratio = [a / b for a, b in zip(times[kind][name], times[kind][eager],
                                                strict=True)]
                print(f"{name} / {eager} ({kind}, steady state): {_cell(ratio)}")


if __name__ == "__main__":
    main()
