"""Speed and memory of AttnFlow / MaR-Flow presets: training and sampling throughput.

Per configuration, in a fresh subprocess (so peak memory is that configuration's alone):
parameters, training images/s (forward + backward + Adamax step), sampling images/s, the
inverse round-trip error max|f⁻¹(f(x)) − x| on the dequantised batch (float32, eval mode),
and peak memory (CPU: ``resource.getrusage`` max RSS of the subprocess; CUDA:
``torch.cuda.max_memory_allocated``).

On a shared, loaded CPU the wall times are inflated; the CPU-time columns (process time per
step / per sampling call) are what the work itself cost (with 1 thread ≈ a quiet machine's wall
time). ×ref compares wall-clock img/s with the reference.

The reference configuration is the one the mAR-SCF code was timed at: L = 3, K = 2, C = 256,
affine coupling, 3×32×32, batch 16, 2 CPU threads; it measured 1.51 s per training step
(10.6 img/s), 0.59 s to sample 16 images (27 img/s) and 1.07 GB peak memory.

    python benchmarks/speed.py                       # the reference config, none / imap / itrans
    python benchmarks/speed.py --models marflow_cifar10_small attnflow_imap_cifar10_small
    python benchmarks/speed.py --models marflow_cifar10_small --set num_steps=4 hidden_channels=256
    python benchmarks/speed.py --device cuda --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

#: mAR-SCF's measurements at the reference configuration (batch 16, 2 CPU threads).
REFERENCE = {"train_img_s": 10.6, "sample_img_s": 27.0, "peak_gb": 1.07}

#: The reference configuration as overrides of a 32×32 RGB preset (L = 3 there already).
REFERENCE_OVERRIDES = {"num_steps": 2, "hidden_channels": 256, "coupling": "affine"}
REFERENCE_MODELS = ["marflow_cifar10_small", "attnflow_imap_cifar10_small",
                    "attnflow_itrans_cifar10_small"]


def _worker(args: argparse.Namespace) -> dict:
    """Measure one configuration in this process; returns the row."""
    import resource
    import time

    import torch

    import attnflow_zoo as az
    from attnflow_zoo import data

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = json.loads(args.overrides)
    model = az.create_model(args.worker, **overrides).to(device)
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (args.batch_size, *model.input_shape), generator=g,
                         dtype=torch.uint8).to(device)
    # Noise inside the timed calls comes from a generator on the model's device, so a GPU run
    # does not time CPU random numbers and host-to-device copies.
    g = torch.Generator(device=device).manual_seed(0)
    opt = torch.optim.Adamax(model.parameters(), lr=8e-4)
    # The recipe's linear warm-up (TrainConfig.warmup_steps = 200): costs nothing to time, and
    # without it a few full-lr steps on noise can blow the paper-scale model up (NaN round trip).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 200))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        loss = model.bits_per_dim(x_u8, generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    model.train()
    for _ in range(args.warmup):  # the first call also runs ActNorm's data-dependent init
        train_step()
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        train_step()
    sync()
    step_s = (time.perf_counter() - start) / args.steps
    step_cpu_s = (time.process_time() - cpu_start) / args.steps

    model.eval()
    with torch.no_grad():
        model.generate(args.sample_batch_size, generator=g)  # warm-up
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(args.sample_reps):
            model.generate(args.sample_batch_size, temperature=0.7, generator=g)
        sync()
        sample_s = (time.perf_counter() - start) / args.sample_reps
        sample_cpu_s = (time.process_time() - cpu_start) / args.sample_reps
        x = data.dequantize(x_u8, g) - 0.5  # round trip on data (samples of a model trained
        z, _ = model(x)                      # for a few steps on noise can be off-manifold)
        round_trip = (model.inverse(z) - x).abs().max().item()

    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
    else:  # ru_maxrss is in kB on Linux
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {
        "model": args.worker + ("" if not overrides else " " + json.dumps(overrides)),
        "device": args.device, "threads": args.threads, "batch": args.batch_size,
        "params_M": params / 1e6, "step_s": step_s, "step_cpu_s": step_cpu_s,
        "sample_cpu_s": sample_cpu_s,
        "train_img_s": args.batch_size / step_s,
        "sample_s": sample_s, "sample_img_s": args.sample_batch_size / sample_s,
        "round_trip": round_trip, "peak_gb": peak_gb,
    }


def _run_one(name: str, overrides: dict, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name,
           "--overrides", json.dumps(overrides), "--device", args.device,
           "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--sample-batch-size", str(args.sample_batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--sample-reps", str(args.sample_reps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    head = ("| model | device | thr | params | s/step | cpu s/step | train img/s | ×ref | "
            "sample s | cpu sample s | sample img/s | ×ref | peak GB | round trip |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['device']} | {r['threads']} | {r['params_M']:.2f}M | "
            f"{r['step_s']:.3f} | {r['step_cpu_s']:.3f} | {r['train_img_s']:.1f} | "
            f"{r['train_img_s'] / REFERENCE['train_img_s']:.2f} | {r['sample_s']:.3f} | "
            f"{r['sample_cpu_s']:.3f} | "
            f"{r['sample_img_s']:.1f} | {r['sample_img_s'] / REFERENCE['sample_img_s']:.2f} | "
            f"{r['peak_gb']:.2f} | {r['round_trip']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None,
                        help="presets to time as registered (default: the reference config "
                             "applied to marflow / attnflow_imap / attnflow_itrans)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for --models, e.g. num_steps=4 (JSON values)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sample-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--sample-reps", type=int, default=3, help="timed sampling calls")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        print(json.dumps(_worker(args)))
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda but CUDA is not available")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    jobs = ([(m, overrides) for m in args.models] if args.models
            else [(m, REFERENCE_OVERRIDES) for m in REFERENCE_MODELS])
    rows = []
    for name, overrides in jobs:
        rows.append(_run_one(name, overrides, args))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(f"reference mAR-SCF (L=3, K=2, C=256, batch 16, 2 threads): "
          f"{REFERENCE['train_img_s']} train img/s, {REFERENCE['sample_img_s']} sample img/s, "
          f"{REFERENCE['peak_gb']} GB")
    print(_table(rows))
    base = next((r for r in rows if r["model"].startswith("marflow")), None)
    if base is not None:
        for r in rows:
            if r is not base:
                print(f"{r['model']}: step time {r['step_s'] / base['step_s'] - 1:+.0%} vs "
                      f"{base['model']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
