"""Bounded inverses side by side: the soft-clipped parameterisation against the old unbounded one.

Trains ``attnflow_imap_digits`` on the embedded digits with its own recipe (``train_preset``,
what ``attnflow train --model attnflow_imap_digits --dataset digits --steps N --seed S`` runs),
once with today's defaults ("new": soft-clipped coupling log-scales, iMap gates and Gaussian
prior log σ) and once with those three keys at ``AttnFlowConfig.LEGACY_DEFAULTS`` ("old":
unbounded, what checkpoints from before load as), for each seed. Each run keeps its folder
(checkpoints, run.json) under ``--out`` as ``{old,new}-s{seed}``.

``report`` reads the folders back: held-out bits/dim (the run's own score of the 1,000 held-out
digits), and for each model 256 samples at T = 1.0 and 0.7 (``generate``, seed 0) and the
interpolations between 14 pairs of held-out digits (8 frames each), counted before the uint8
conversion: non-finite images, and finite images out of range
(``data.quantize.unrepresentable``).

    OMP_NUM_THREADS=1 python benchmarks/bounded.py train --seeds 0 1 2 3 --steps 900 \\
        --out /tmp/bounded --jobs 2
    OMP_NUM_THREADS=1 python benchmarks/bounded.py report --out /tmp/bounded
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PRESET = "attnflow_imap_digits"
BOUND_KEYS = ("coupling_log_scale_bound", "imap_log_gate_bound", "prior_log_std_bound")
VARIANTS = ("old", "new")


def overrides(variant: str) -> dict[str, object]:
    """The config overrides of a variant: none for "new", the legacy values for "old"."""
    from attnflow_zoo.models.attnflow import AttnFlowConfig

    if variant == "new":
        return {}
    return {k: AttnFlowConfig.LEGACY_DEFAULTS[k] for k in BOUND_KEYS}


def train_one(variant: str, seed: int, steps: int, out: Path) -> None:
    import torch

    from attnflow_zoo.training import train_preset
    from attnflow_zoo.training.recipes import train_config

    torch.set_num_threads(1)
    config = train_config(PRESET, steps=steps, seed=seed)
    result = train_preset(PRESET, "digits", config, out_dir=out / f"{variant}-s{seed}",
                          overrides=overrides(variant), device="cpu", show_progress=False)
    print(f"{variant}-s{seed}: held-out {result.eval_bpd:.4f}", flush=True)


def train_all(args: argparse.Namespace) -> None:
    jobs = [(v, s) for s in args.seeds for v in VARIANTS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(job: tuple[str, int]) -> int:
        variant, seed = job
        log = args.out / f"{variant}-s{seed}.log"
        cmd = [sys.executable, __file__, "_one", variant, str(seed), str(args.steps),
               str(args.out)]
        with log.open("w") as fh:
            return subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)

    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for job, code in zip(jobs, pool.map(run, jobs), strict=True):
            print(f"{job[0]}-s{job[1]}: exit {code}", flush=True)


def heldout_bpd(run: Path) -> float:
    metrics = json.loads((run / "run.json").read_text())["metrics"]
    return next(m["value"] for m in metrics if m["split"] == "test")


def counts(model, seed: int = 0) -> dict[str, tuple[int, int]]:  # noqa: ANN001
    """{what: (non-finite, out of range)} for samples at T = 1.0, 0.7 and interpolations, by
    the library's rule (``data.quantize.checked_images``)."""
    import torch

    from attnflow_zoo.data import datasets, quantize
    from attnflow_zoo.evaluation import latents

    def count(x: torch.Tensor) -> tuple[int, int]:
        checked = quantize.checked_images(x)
        return checked.num_nonfinite, checked.num_out_of_range

    out: dict[str, tuple[int, int]] = {}
    with torch.no_grad():
        for t in (1.0, 0.7):
            out[f"T={t}"] = count(model.generate(
                256, temperature=t, generator=torch.Generator().manual_seed(seed)))
    test = datasets.load_images("digits", "test", image_size=model.config.image_size)[:28]
    frames = [(r.num_nonfinite, r.num_out_of_range) for r in
              (latents.interpolate(model, test[i], test[i + 1], 8) for i in range(0, 28, 2))]
    out["interpolate"] = (sum(f[0] for f in frames), sum(f[1] for f in frames))
    return out


def report(args: argparse.Namespace) -> None:
    import torch

    import attnflow_zoo as az

    torch.set_num_threads(1)
    rows: dict[tuple[str, int], dict] = {}
    for run in sorted(args.out.glob("*-s*")):
        if not run.is_dir() or not (run / "run.json").exists():
            continue
        variant, seed = run.name.split("-s")
        model = az.load_model(run).eval()
        rows[variant, int(seed)] = {"bpd": heldout_bpd(run), **counts(model)}
        print(run.name, rows[variant, int(seed)], flush=True)
    seeds = sorted({s for _, s in rows})
    print("\n| seed | old bits/dim | new bits/dim | new − old | non-finite / out of range "
          "T=1 old → new | T=0.7 old → new | interpolate (112 frames) old → new |")
    print("|---|---|---|---|---|---|---|")
    for s in seeds:
        o, n = rows.get(("old", s)), rows.get(("new", s))
        if o is None or n is None:
            continue
        cells = [f"{o[k][0]}/{o[k][1]} → {n[k][0]}/{n[k][1]}"
                 for k in ("T=1.0", "T=0.7", "interpolate")]
        print(f"| {s} | {o['bpd']:.4f} | {n['bpd']:.4f} | {n['bpd'] - o['bpd']:+.4f} | "
              + " | ".join(cells) + " |")
    paired = [s for s in seeds if ("old", s) in rows and ("new", s) in rows]
    for v in VARIANTS:
        vals = [rows[v, s]["bpd"] for s in paired]
        if len(vals) > 1:
            print(f"{v}: {statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f} "
                  f"({len(vals)} seeds)")
    diffs = [rows["new", s]["bpd"] - rows["old", s]["bpd"] for s in paired]
    if len(diffs) > 1:
        print(f"new − old: {statistics.mean(diffs):+.4f} ± {statistics.stdev(diffs):.4f} "
              f"(sd of the paired differences, {len(diffs)} seeds)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        variant, seed, steps, out = sys.argv[2:6]
        train_one(variant, int(seed), int(steps), Path(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train old and new for every seed")
    train.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    train.add_argument("--steps", type=int, default=900)
    train.add_argument("--jobs", type=int, default=2)
    train.add_argument("--out", type=Path, required=True)
    rep = sub.add_parser("report", help="the table of the run folders in --out")
    rep.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    train_all(args) if args.command == "train" else report(args)


if __name__ == "__main__":
    main()
