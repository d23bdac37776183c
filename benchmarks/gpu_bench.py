"""The GPU benchmark behind benchmarks/gpu.sh: one table of img/s and peak memory.

Rows: (configuration, variant). Configurations: the reference configuration (``marflow``
L = 3, K = 2, C = 256, affine) and ``attnflow_imap_cifar10`` (paper scale, K = 32, C = 512).
Variants: ``fp32`` (eager), ``bf16`` (``attnflow_zoo.precision``), ``bf16+graph`` (the
sync-free training step and the sampler captured whole by ``torch.cuda.graph`` and replayed),
``bf16+compile`` (``attnflow_zoo.compilation``; the first call, compilation included, is a
column of its own). Columns: training img/s (forward + backward + Adamax, ``harness.TrainStep``),
sampling img/s, peak memory of each (``torch.cuda.max_memory_allocated``), first-call seconds,
and whether a training step ran under ``torch.cuda.set_sync_debug_mode("error")``.

Every row runs in its own subprocess with its own time limit, so one failing or slow variant
costs its row (marked with the reason), not the table. No downloads: models are built from
presets, data are random bytes.

    python benchmarks/gpu_bench.py --budget 280            # what gpu.sh runs
    python benchmarks/gpu_bench.py --device cpu --tiny     # a dry run of every code path on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {
    "reference": ("marflow_cifar10_small", {"num_steps": 2, "hidden_channels": 256}),
    "attnflow_imap_cifar10": ("attnflow_imap_cifar10", {}),
}
TINY = {"reference": ("marflow_tiny", {}), "attnflow_imap_cifar10": ("attnflow_imap_tiny", {})}
VARIANTS = ("fp32", "bf16", "bf16+graph", "bf16+compile")
#: Share of the budget each variant's subprocess may use (compilation takes longest).
SHARE = {"fp32": 0.8, "bf16": 0.8, "bf16+graph": 1.0, "bf16+compile": 2.6}


def _timed_loop(fn, sync, seconds: float, min_reps: int = 3, max_reps: int = 50) -> float:  # noqa: ANN001
    """Seconds per call of ``fn``: one call to size the loop, then enough calls for
    ``seconds`` (within [min_reps, max_reps])."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - start
    reps = max(min_reps, min(max_reps, int(seconds / max(once, 1e-6))))
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def _worker(args: argparse.Namespace) -> dict:
    import torch
    from harness import TrainStep, make_sampler

    import attnflow_zoo as az
    from attnflow_zoo.compilation import compile_log_density, compile_sampling

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    name, overrides = (TINY if args.tiny else CONFIGS)[args.config]
    variant = args.variant
    precision = "bf16" if variant.startswith("bf16") else "fp32"
    torch.manual_seed(0)
    model = az.create_model(name, **overrides).to(dev)
    g = torch.Generator(dev).manual_seed(0)
    x_u8 = torch.randint(0, 256, (args.batch_size, *model.input_shape), device=dev,
                         dtype=torch.uint8, generator=g)
    model.initialize_from_data(x_u8, g)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-5, capturable=cuda)
    x = model.to_model_space(x_u8, g)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    row: dict = {"config": args.config, "model": name, "variant": variant,
                 "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    compiled = variant.endswith("+compile")
    step = TrainStep(model, opt, precision, compile_log_density(model) if compiled else None)
    sampler = make_sampler(model, precision, compile_sampling(model) if compiled else None)
    start = time.perf_counter()
    step(x)
    sync()
    row["first_train_s"] = time.perf_counter() - start
    step(x)  # the first call only initialises the optimizer state
    if cuda:
        try:
            torch.cuda.set_sync_debug_mode("error")
            step(x)
            sync_free = "yes"
        except RuntimeError as err:
            sync_free = f"no: {str(err).splitlines()[0][:60]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
        row["sync_free_step"] = sync_free

    train_fn = lambda: step(x)  # noqa: E731
    model.eval()
    sample_fn = lambda: sampler(args.sample_size, 1.0, g)  # noqa: E731
    start = time.perf_counter()
    sample_fn()
    sync()
    row["first_sample_s"] = time.perf_counter() - start
    model.train()
    if variant.endswith("+graph"):
        train_fn, sample_fn = _graphed(model, step, x, args.sample_size, precision, g)

    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    sec = _timed_loop(train_fn, sync, args.seconds)
    row["train_img_s"] = args.batch_size / sec
    if cuda:
        row["train_peak_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
        torch.cuda.reset_peak_memory_stats(dev)
    model.eval()
    sec = _timed_loop(sample_fn, sync, args.seconds)
    row["sample_img_s"] = args.sample_size / sec
    if cuda:
        row["sample_peak_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    row["finite"] = bool(int(step.skipped) == 0)
    return row


def _graphed(model, step, x, sample_size: int, precision: str, g):  # noqa: ANN001, ANN202
    """The training step and the sampler captured whole by ``torch.cuda.graph``.

    Inputs are static buffers (the batch ``x``; the sampler's noise, redrawn into its buffers
    before each replay). Autocast's weight cache is off inside the capture, as the CUDA-graph
    notes require.
    """
    import torch

    from attnflow_zoo.precision import autocast_for

    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static_x)
    torch.cuda.current_stream().wait_stream(side)
    train_graph = torch.cuda.CUDAGraph()
    step.autocast_cache = False
    with torch.cuda.graph(train_graph):
        step(static_x)

    model.eval()
    noise = model.draw_noise(sample_size, 1.0, g)

    def run_sampler() -> torch.Tensor:
        with torch.no_grad(), autocast_for(static_x.device, precision, cache_enabled=False):
            return model.generate_from_noise(sample_size, 1.0, noise)

    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run_sampler()
    torch.cuda.current_stream().wait_stream(side)
    sample_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(sample_graph):
        run_sampler()

    def sample() -> None:
        fresh = model.draw_noise(sample_size, 1.0, g)
        for buf, new in zip(noise, fresh, strict=True):
            if buf is not None:
                buf.copy_(new)
        sample_graph.replay()

    model.train()
    return train_graph.replay, sample


def _row_line(r: dict) -> str:
    def num(key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "–"
    return (f"| {r['config']} ({r.get('model', '')}) | {r['variant']} | "
            f"{num('train_img_s', '.1f')} | {num('sample_img_s', '.1f')} | "
            f"{num('train_peak_gb', '.2f')} | {num('sample_peak_gb', '.2f')} | "
            f"{num('first_train_s', '.1f')} / {num('first_sample_s', '.1f')} | "
            f"{r.get('sync_free_step', '–')} | {r.get('error', '')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=280.0,
                        help="seconds for the whole table (shared among the rows)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sample-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument("--tiny", action="store_true", help="tiny presets (a dry run)")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "VARIANT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.config, args.variant = args.worker
        import torch

        if args.device == "cpu":
            torch.set_num_threads(min(8, os.cpu_count() or 1))
        print(json.dumps(_worker(args)), flush=True)
        return

    jobs = [(c, v) for c in args.configs for v in args.variants]
    deadline = time.monotonic() + args.budget
    rows = []
    for i, (config, variant) in enumerate(jobs):
        left = deadline - time.monotonic()
        share = sum(SHARE[v] for _, v in jobs[i:])
        limit = max(10.0, left * SHARE[variant] / share)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, variant,
               "--device", args.device, "--batch-size", str(args.batch_size),
               "--sample-size", str(args.sample_size), "--seconds", str(args.seconds)]
        if args.tiny:
            cmd.append("--tiny")
        print(f"[{i + 1}/{len(jobs)}] {config} {variant} (limit {limit:.0f} s)",
              file=sys.stderr, flush=True)
        start = time.monotonic()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            if out.returncode == 0:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            else:
                reason = (out.stderr.strip().splitlines() or ["?"])[-1][:90]
                rows.append({"config": config, "variant": variant, "error": reason})
        except subprocess.TimeoutExpired:
            rows.append({"config": config, "variant": variant,
                         "error": f"over its {limit:.0f} s limit"})
        print(f"    {time.monotonic() - start:.0f} s: {_row_line(rows[-1])}", file=sys.stderr,
              flush=True)
    print(f"\nbatch {args.batch_size} (training), {args.sample_size} (sampling); device "
          f"{args.device}")
    print("| configuration | variant | train img/s | sample img/s | train peak GiB | "
          "sample peak GiB | first train / sample call, s | sync-free step | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_row_line(r))


if __name__ == "__main__":
    main()
