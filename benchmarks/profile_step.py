"""Where a training step and a sampling call spend their time: torch.profiler op breakdown.

Builds a preset (default: the reference configuration, L = 3, K = 2, C = 256, affine, 3×32×32),
initialises it on a batch, warms up, then profiles ``--steps`` training steps (forward +
backward + Adamax) and ``--sample-reps`` sampling calls and prints the ops by self CPU time.
It also times the priors alone (their log-density forward + backward on the batch's latents,
and their sampling) against the whole step, the "prior share".

Run it against another checkout (e.g. the code before a change) with
``PYTHONPATH=/path/to/other/checkout python benchmarks/profile_step.py``.

    python benchmarks/profile_step.py --threads 1 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="marflow_cifar10_small")
    parser.add_argument("--set", default='{"num_steps": 2, "hidden_channels": 256}',
                        help="config overrides as JSON (default: the reference configuration)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sample-reps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    import attnflow_zoo as az

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = az.create_model(args.model, **json.loads(args.set))
    print("attnflow_zoo from", az.__file__)
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (args.batch_size, *model.input_shape), generator=g,
                         dtype=torch.uint8)
    model.initialize_from_data(x_u8, g)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-5)
    bf16 = args.precision == "bf16"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def train_step() -> None:
        with autocast():
            loss = model.bits_per_dim(x_u8, generator=g, grad=True).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sample() -> None:
        with torch.no_grad(), autocast():
            model.generate(16, generator=g)

    x = model.to_model_space(x_u8, g)
    with torch.no_grad():
        pieces, _ = model.encode(x)

    def prior_step() -> None:
        with autocast():
            total = sum(p.log_prob(z, c).sum() for p, (z, c) in zip(model.priors, pieces,
                                                                      strict=True))
        total.backward()

    def prior_sample() -> None:
        last = len(model.priors) - 1
        with torch.no_grad(), autocast():
            for lvl, (prior, (z, c)) in enumerate(zip(model.priors, pieces, strict=True)):
                prior.sample(16, z.shape[2], z.shape[3], None if lvl == last else c[:16],
                             1.0, g)

    for fn in (train_step, sample, prior_step, prior_sample):
        fn()
    times: dict[str, list[float]] = {k: [] for k in ("step", "prior", "sample", "prior_sample")}
    for _ in range(3):
        for key, fn in (("step", train_step), ("prior", prior_step), ("sample", sample),
                        ("prior_sample", prior_sample)):
            start = time.process_time()
            fn()
            times[key].append(time.process_time() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"CPU s (median of 3, process time): step {med['step']:.3f}, priors fwd+bwd "
          f"{med['prior']:.3f} ({med['prior'] / med['step']:.0%} of the step); sample 16 "
          f"{med['sample']:.3f}, priors' sampling {med['prior_sample']:.3f} "
          f"({med['prior_sample'] / med['sample']:.0%})")
    for name, fn, reps in (("train step", train_step, args.steps),
                           ("sample 16", sample, args.sample_reps)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n{name} ({args.precision}, {args.threads} thread(s), batch "
              f"{args.batch_size}): {total / reps / 1e6:.3f} s self CPU per call")
        print("| op | self CPU % | ms per call | calls per call |\n|---|---|---|---|")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
            print(f"| {e.key} | {e.self_cpu_time_total / total:.1%} | "
                  f"{e.self_cpu_time_total / reps / 1e3:.1f} | {e.count // reps} |")


if __name__ == "__main__":
    main()
