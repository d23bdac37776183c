"""One leaderboard for the whole zoo: every family at equal samples on the embedded digits.

Protocol (issue 21, point 6; point 5(c) for TarFlow against the real apple/ml-tarflow):

- data: ``digits`` (the zoo's embedded MNIST digits, 1×32×32: 4,000 train / 1,000 held-out);
- every family sees the same number of training images (``--images``): steps = images / batch
  at the batch of its own recipe; everything else of the recipe (optimizer, betas, weight
  decay, lr, warm-up in images, schedule over the run's steps, EMA, augmentation) is the
  preset's own; no validation split is carved (all 4,000 digits train);
- zoo families train with the library's ``fit``; the peers (visinf/mar-scf through
  ``benchmarks/peer.py``, apple/ml-tarflow through ``benchmarks/tarflow_peer.py``, both
  imported unmodified from outside the repo) train in a loop that reproduces ``fit``'s: the same
  batches in the same order (``fit``'s seeded permutations), the same dequantisation noise
  (``fit``'s per-step generators), the data-dependent init pass on batch 0, the zoo's optimizer,
  lr schedule and EMA built from the same ``TrainConfig``, the zoo's training step (bits/dim of
  the peer's log-density, converted to per-sample nats of the zoo's input space);
- score: mean held-out bits/dim over all 1,000 held-out digits, ``eval()`` mode (the EMA weights
  where the recipe keeps an EMA), one uniform-dequantisation sample drawn from one seed
  (``TrainConfig.eval_seed`` 0, batches of 256: the same u for every model and seed; ResFlow's
  log-det estimator draws its probes from the same generator);
- ``--seeds`` (≥ 3): the seed sets the initialisation (forked global RNG), the batch order and
  the noise, the same for every family, so the difference to MaR-Flow is paired per seed;
- sample quality: ``benchmarks/sample_quality.py`` (the conditioning work's classifier-feature
  Fréchet distance to the training digits) run as a subprocess on each zoo checkpoint (and on
  ml-tarflow's trained weights converted by ``attnflow convert``'s library function);
  ``--sample-quality`` points at it; where it is missing the column is left out;
- speed: parameters, training time per image and sampling time (one ``generate(16)`` at
  temperature 1) of every family at initialisation, in one process, interleaved rounds, as the
  median over rounds of the per-round ratio to MaR-Flow.

Every finished run is appended to ``--log`` (JSON lines) at once, so a killed run keeps its rows;
``--from-log`` prints the tables of a log, a rerun with the same ``--log`` skips the runs it holds.

    OMP_NUM_THREADS=1 python benchmarks/leaderboard.py --images 3200 --seeds 0 1 2 --jobs 2 \\
        --log runs/leaderboard.jsonl --marscf-dir ../mar-scf --mltarflow-dir ../ml-tarflow \\
        --sample-quality benchmarks/sample_quality.py          # the README's leaderboard
    OMP_NUM_THREADS=1 python benchmarks/leaderboard.py --families tarflow mltarflow \\
        tarflow_uniform tarflow_main --images 12800 --seeds 0 1 2 3 4 5 6 --rounds 0 \\
        --log runs/tarflow_vs_peer.jsonl                       # issue 21 5(c), longer
    python benchmarks/leaderboard.py --from-log runs/leaderboard.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPE = (1, 32, 32)
SAMPLE_BATCH = 16


@dataclass(frozen=True)
class Family:
    """A leaderboard row: how its model is built and which recipe trains it."""

    label: str
    kind: str  # "zoo", "marscf" or "mltarflow"
    preset: str  # the zoo preset (zoo), or whose configuration the peer copies
    overrides: dict[str, Any] = field(default_factory=dict)  # model config overrides
    recipe: str = ""  # the preset whose recipe trains it ("" = ``preset``'s)
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    shown: str = ""  # how the table names a peer's configuration
    init_from: str = ""  # "mltarflow": start from that peer's initialisation (same seed)
    diagnostic: bool = False  # not a leaderboard row: run only when named in --families

    @property
    def spec(self) -> str:
        if self.shown:
            return self.shown
        extra = ",".join(f"{k}={v}" for k, v in self.overrides.items())
        return self.preset + (f"@{extra}" if extra else "")

    @property
    def recipe_preset(self) -> str:
        return self.recipe or self.preset


#: The rows, MaR-Flow first (the reference of every ratio and paired difference).
FAMILIES: dict[str, Family] = {
    "marflow": Family("MaR-Flow", "zoo", "attnflow_imap_digits", {"attention": "none"},
                      note="the digits preset's backbone: Gaussian prior"),
    "imap": Family("AttnFlow-iMap", "zoo", "attnflow_imap_digits"),
    "itrans": Family("AttnFlow-iTrans", "zoo", "attnflow_imap_digits", {"attention": "itrans"}),
    "tarflow": Family("TarFlow", "zoo", "tarflow_digits"),
    "resflow": Family(
        "ResFlow + concat residual attention", "zoo", "resflow_concat_cifar10",
        {"in_channels": 1, "hidden_channels": 64, "blocks_per_scale": 4,
         "attention_lipschitz": "certified"},
        recipe_overrides={"warmup_images": 4000, "max_shift": 0, "flip": False},
        note="its recipe's warm-up of one epoch is one digits epoch (4,000 images); no shift "
             "or flip on digits; the certified attention bound (the preset's 'faithful' one is "
             "not contractive here: log-densities of 1e27 at initialisation, a non-finite first "
             "step); log-det: the recipe's power series (5 terms, 1 probe), an estimate"),
    "marscf": Family(
        "mar-scf (peer, visinf/mar-scf)", "marscf", "attnflow_imap_digits",
        {"num_levels": 3, "num_steps": 4, "hidden_channels": 64}, recipe="attnflow_imap_digits",
        shown="mar-scf MarScfFlow(L=3, K=4, C=64, affine), its mAR prior, 1×32×32",
        note="its own code (mAR prior, affine); no digits recipe of its own: MaR-Flow's; FD of "
             "its trained weights copied into a zoo MaR-Flow with the mAR prior "
             "(peer.copy_peer_into_zoo; log-density difference in the row)"),
    "mltarflow": Family(
        "ml-tarflow (peer, apple/ml-tarflow)", "mltarflow", "tarflow_digits",
        shown="ml-tarflow Model(P=4, width 128, 4 blocks × 2 layers, head_dim 32), 1×32×32",
        note="their Model at tarflow_digits' shape (their MetaBlock given head_dim 32 at build "
             "time); FD of their trained weights converted by `attnflow convert`'s "
             "convert_ml_tarflow (log-density difference in the row); issue 21 5(c)"),
    "tarflow_main": Family(
        "TarFlow with main's defaults before the bound", "zoo", "tarflow_digits",
        {"log_scale_bound": None, "head_bias_init": "zero"}, diagnostic=True,
        note="the digits preset as it was before log_scale_bound and head_bias_init: unbounded "
             "log-scales, zero head bias (every block the identity at init); issue 21 5(c)"),
    "tarflow_uniform": Family(
        "TarFlow, bounded, ml-tarflow's head-bias init", "zoo", "tarflow_digits",
        {"head_bias_init": "uniform"}, diagnostic=True,
        note="the digits preset (its log-scale bound) with ml-tarflow's initialisation: the same "
             "seed draws ml-tarflow's initial weights; issue 21 5(c)"),
    "tarflow_peerinit": Family(
        "TarFlow from ml-tarflow's initialisation", "zoo", "tarflow_digits", init_from="mltarflow",
        diagnostic=True,
        note="the zoo's TarFlow trained by fit from ml-tarflow's initial weights of the same seed "
             "(converted): with the same init, batches and noise the two codes should follow "
             "one trajectory up to float rounding (issue 21 5(c) diagnostic)"),
}


# --- data and the training loop of the peers ---------------------------------------------------

def load_digits() -> tuple[Tensor, Tensor]:
    from attnflow_zoo.data import datasets

    train, _ = datasets.load_labelled("digits", "train", SHAPE)
    test, _ = datasets.load_labelled("digits", "test", SHAPE)
    return train, test


def family_recipe(family: Family, **changes: Any):
    """The recipe of the family's recipe preset with its overrides (and ``changes``)."""
    from attnflow_zoo import registry

    recipe = registry.get_entry(family.recipe_preset).recipe
    return recipe.replace(**{**family.recipe_overrides, **changes})


def train_config(family: Family, images: int, seed: int):
    """The family's recipe as a ``TrainConfig``, its steps set by the image budget."""
    from attnflow_zoo.training import recipes

    recipe = family_recipe(family)
    batch = recipe.batch_size
    if images % batch:
        raise SystemExit(f"--images {images} is not a multiple of {family.label}'s batch {batch}")
    return recipes.config_from_recipe(
        recipe.replace(steps=images // batch), seed=seed, validation_fraction=0,
        eval_every=None, checkpoint_every=images // batch, keep_checkpoints=1,
        log_every=max(1, images // batch // 5))


class Peer(nn.Module):
    """A peer model seen as the zoo sees a model: ``input_shape``, ``log_density(x)`` in nats
    of the zoo's input x = x̃ − 0.5, and ``bits_per_dim(x_u8, y, generator)`` dequantised by the
    zoo's rule, so ``metrics.evaluate_bpd`` scores it with the zoo's noise."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind, self.input_shape = net, kind, SHAPE

    def log_density(self, x: Tensor, y: Tensor | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        if self.kind == "marscf":
            import peer

            return peer.peer_log_density(self.net, x)
        import tarflow_peer

        return tarflow_peer.their_log_density(self.net, x)

    def bits_per_dim(self, x_u8: Tensor, y: Tensor | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        from attnflow_zoo.data import quantize
        from attnflow_zoo.metrics import bits_per_dim

        x = quantize.to_model_space(x_u8, generator)
        return bits_per_dim(self.log_density(x), x[0].numel())


def build_peer(family: Family, args: argparse.Namespace, seed: int) -> Peer:
    """mar-scf or ml-tarflow at the family's configuration, initialised from ``seed``."""
    if family.kind == "marscf":
        import peer

        o = family.overrides
        net = peer.build_peer_model(peer.load_marscf(args.marscf_dir), in_channels=SHAPE[0],
                                    image_size=SHAPE[1], seed=seed, **o)
        return Peer(net, "marscf")
    import tarflow_peer

    from attnflow_zoo.registry import preset_config

    tf = tarflow_peer.load_peer(args.mltarflow_dir)
    config = preset_config(family.preset)
    with tarflow_peer.their_head_width(tf, config), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = tf.Model(in_channels=config.in_channels, img_size=config.image_size,
                       patch_size=config.patch_size, channels=config.width,
                       num_blocks=config.num_blocks, layers_per_block=config.layers_per_block,
                       nvp=config.affine)
    return Peer(net, "mltarflow")


def fit_peer(model: Peer, train: Tensor, config) -> tuple[nn.Module, dict[str, float]]:
    """``fit``'s loop for a peer: same batches, noise, init pass, optimizer, schedule, EMA and
    step (``fit``'s own helpers). Returns (the weights to score, the step's guard counters)."""
    from harness import TrainStep

    from attnflow_zoo.core import initialize_from_data
    from attnflow_zoo.training.datasets import model_input
    from attnflow_zoo.training.loop import _batch, _step_generator
    from attnflow_zoo.training.optim import make_ema, make_optimizer, make_scheduler

    dev = torch.device("cpu")
    per_epoch = len(train) // config.batch_size
    model.train()
    g = _step_generator(config.seed, 0, dev)
    x_u8, _ = _batch(train, None, 0, config, per_epoch, dev)
    with torch.no_grad():  # mar-scf's ActNorm initialises itself on its first forward
        initialize_from_data(model, lambda: model.log_density(model_input(x_u8, g)))
    optimizer = make_optimizer(model.parameters(), config, dev)
    scheduler = make_scheduler(optimizer, config, config.steps)
    ema = make_ema(model, config) if config.ema_decay is not None else None
    step_fn = TrainStep(model, optimizer, config.precision, model.log_density, config.grad_clip)
    for step in range(config.steps):
        x_u8, _ = _batch(train, None, step, config, per_epoch, dev)
        g = _step_generator(config.seed, step + 1, dev)
        x = model_input(x_u8, g, config.noise_std)
        scheduler.step_update(num_updates=step + 1)
        step_fn(x, g)
        if ema is not None:
            ema.update(model, step=step + 1)
    return (ema.module if ema is not None else model), step_fn.read()


# --- one run -------------------------------------------------------------------------------------

def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def log_event(path: str, event: dict) -> None:
    with open(path, "a") as f:  # one short line per write: appends from two workers stay whole
        f.write(json.dumps(event) + "\n")


def sample_quality(args: argparse.Namespace, checkpoint: Path, seed: int) -> dict | None:
    """``sample_quality.py`` on one checkpoint: its Fréchet distance (and floor), or None."""
    script = Path(args.sample_quality)
    if not script.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fd.json"
        cmd = [sys.executable, str(script), str(checkpoint), "--temperatures",
               str(args.fd_temperature), "--num-samples", str(args.fd_samples), "--seed",
               str(seed), "--json", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        result = json.loads(out.read_text())
    run = result["runs"][0]
    return {"fd": run["fd"], "fd_floor": result["floor"], "fd_nonfinite": run["nonfinite"],
            "fd_samples": run["num_samples"], "fd_temperature": run["temperature"]}


def run_zoo(family: Family, config, train: Tensor, test: Tensor, seed: int, out: Path,
            args: argparse.Namespace) -> dict:
    import attnflow_zoo as az

    if family.init_from:  # the peer's initial weights of this seed, converted
        with tempfile.TemporaryDirectory() as tmp:
            peer_model = build_peer(FAMILIES[family.init_from], args, seed)
            model = zoo_twin(FAMILIES[family.init_from], peer_model, Path(tmp) / "init").train()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = az.create_model(family.preset, **family.overrides)
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    result = az.fit(model, train, config, eval_data=test, out_dir=out, device="cpu",
                    show_progress=False)
    return {"held_out_bpd": result.eval_bpd, "train_bpd_last": result.train_bpd,
            "params": params, "train_s": time.perf_counter() - start, "checkpoint": str(out)}


def run_peer(family: Family, config, train: Tensor, test: Tensor, seed: int, out: Path,
             args: argparse.Namespace) -> dict:
    from attnflow_zoo.metrics import evaluate_bpd

    model = build_peer(family, args, seed)
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    scored, guard = fit_peer(model, train, config)
    train_s = time.perf_counter() - start
    g = torch.Generator().manual_seed(config.eval_seed)
    bpd = evaluate_bpd(scored, test, config.eval_batch_size, g, show_progress=False)
    row = {"held_out_bpd": bpd, "train_bpd_last": guard["last_loss"], "params": params,
           "train_s": train_s, "skipped_steps": guard["skipped"], "checkpoint": None}
    twin = zoo_twin(family, scored, out / "zoo")
    scored.eval()
    with torch.no_grad():
        x = (test[:16].float() + 0.5) / 256 - 0.5
        row["twin_max_abs_diff"] = float((twin.log_density(x) - scored.log_density(x)).abs().max())
    row["checkpoint"] = str(out / "zoo")
    return row


def zoo_twin(family: Family, scored: Peer, out: Path) -> nn.Module:
    """The peer's trained weights as a zoo checkpoint in ``out`` (for ``sample_quality.py``):
    ml-tarflow through ``attnflow convert``'s ``convert_ml_tarflow``, mar-scf copied into a zoo
    MaR-Flow with the mAR prior (``peer.copy_peer_into_zoo``). Returns the zoo model (eval)."""
    import attnflow_zoo as az

    out.mkdir(parents=True, exist_ok=True)
    if family.kind == "mltarflow":
        from attnflow_zoo.models.tarflow_convert import convert_ml_tarflow
        from attnflow_zoo.registry import preset_config

        path = out.parent / "ml_tarflow_trained.pth"
        torch.save(scored.net.state_dict(), path)
        twin = convert_ml_tarflow(path, out, in_channels=SHAPE[0],
                                  head_dim=preset_config(family.preset).head_dim, noise_std=0.0)
        return twin.eval()
    import peer

    twin = az.create_model(family.preset, attention="none", prior="mar", in_channels=SHAPE[0],
                           **family.overrides)
    peer.copy_peer_into_zoo(scored.net, twin)
    twin.save_pretrained(out)
    return twin.eval()


def run_one(key: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and score (family ``key``, ``seed``) in this process; the row goes to the log."""
    torch.set_num_threads(args.threads)
    family = FAMILIES[key]
    train, test = load_digits()
    config = train_config(family, args.images, seed)
    out = Path(args.out) / "ckpt" / f"{key}-s{seed}"
    began = load()
    if family.kind == "zoo":
        row = run_zoo(family, config, train, test, seed, out, args)
    else:
        row = run_peer(family, config, train, test, seed, out, args)
    fd = sample_quality(args, Path(row["checkpoint"]), seed) if row["checkpoint"] else None
    row.update(fd or {})
    row.update(family=key, label=family.label, spec=family.spec, seed=seed,
               steps=config.steps, batch=config.batch_size, images=config.steps * config.batch_size,
               recipe=_recipe_text(family, config.steps), load_start=began, load_end=load())
    log_event(args.log, {"event": "row", "row": row})
    return row


def _recipe_text(family: Family, steps: int) -> str:
    from attnflow_zoo.training import recipes

    return f"{family.recipe_preset}'s: " + recipes.summary(family_recipe(family, steps=steps))


# --- speed ---------------------------------------------------------------------------------------

def _contender(key: str, args: argparse.Namespace, x_u8: Tensor):
    """(parameters, training step at the recipe's batch, its batch, sampler) of a family."""
    from harness import TrainStep

    import attnflow_zoo as az
    from attnflow_zoo.core import initialize_from_data
    from attnflow_zoo.data import quantize
    from attnflow_zoo.training.optim import make_optimizer

    family = FAMILIES[key]
    config = train_config(family, args.images, 0)
    if family.kind == "zoo":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = az.create_model(family.preset, **family.overrides)
    else:
        model = build_peer(family, args, 0)
    x = quantize.to_model_space(x_u8[: config.batch_size], torch.Generator().manual_seed(0))
    with torch.no_grad():  # ActNorm's data init (mar-scf's initialises itself)
        initialize_from_data(model, lambda: model.log_density(x))
    step = TrainStep(model, make_optimizer(model.parameters(), config, torch.device("cpu")),
                     config.precision, model.log_density)

    def train() -> None:
        model.train()
        step(x)

    def sample() -> None:
        model.eval()
        with torch.no_grad():
            _sample(model, family)

    return sum(p.numel() for p in model.parameters()), train, config.batch_size, sample


def _sample(model: nn.Module, family: Family) -> Tensor:
    g = torch.Generator().manual_seed(0)
    if family.kind == "zoo":
        return model.generate(SAMPLE_BATCH, 1.0, g)
    if family.kind == "marscf":
        import peer

        return peer.peer_sample(model.net, SAMPLE_BATCH, seed=0)
    net = model.net
    tokens = net.num_patches
    noise = torch.randn(SAMPLE_BATCH, tokens, SHAPE[0] * net.patch_size ** 2, generator=g)
    return net.reverse(noise)


def timing(args: argparse.Namespace) -> dict:
    """Per family: parameters, seconds per training image and per sampling call, each round
    timing every family once in turn (round 0 warms up)."""
    torch.set_num_threads(args.threads)
    train, _ = load_digits()
    keys = [k for k in args.families]
    runs = {k: _contender(k, args, train) for k in keys}
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "sample": []} for k in keys}
    for r in range(args.rounds + 1):
        for k in keys:
            _, train_fn, batch, sample_fn = runs[k]
            t0 = time.perf_counter()
            train_fn()
            t1 = time.perf_counter()
            sample_fn()
            t2 = time.perf_counter()
            if r:
                times[k]["train"].append((t1 - t0) / batch)
                times[k]["sample"].append(t2 - t1)
    event = {"event": "timing", "rounds": args.rounds, "threads": args.threads, "load": load(),
             "sample_batch": SAMPLE_BATCH,
             "params": {k: runs[k][0] for k in keys}, "times": times}
    log_event(args.log, event)
    return event


# --- tables ---------------------------------------------------------------------------------------

def _ms(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    sd = st.stdev(values) if len(values) > 1 else float("nan")
    return f"{st.mean(values):.{digits}f} ± {sd:.{digits}f}"


def _paired(rows: list[dict], ref: list[dict], field_name: str) -> list[float]:
    base = {r["seed"]: r.get(field_name) for r in ref}
    return [r[field_name] - base[r["seed"]] for r in rows
            if r.get(field_name) is not None and base.get(r["seed"]) is not None]


def verdict(diffs: list[float]) -> str:
    """Lower is better: a gain stands only where the paired difference exceeds its sd."""
    if len(diffs) < 2:
        return "—"
    mean, sd = st.mean(diffs), st.stdev(diffs)
    if abs(mean) <= sd:
        return "no difference measured"
    return "better" if mean < 0 else "worse"


def _ratio(timing_event: dict | None, key: str, what: str) -> str:
    if timing_event is None or key not in timing_event["times"] \
            or "marflow" not in timing_event["times"]:
        return "—"
    mine, ref = timing_event["times"][key][what], timing_event["times"]["marflow"][what]
    ratios = [a / b for a, b in zip(mine, ref, strict=True)]
    return f"{st.median(ratios):.2f}×"


def leaderboard(rows: list[dict], timing_event: dict | None) -> str:
    """The README table: per family, mean ± sd over seeds and paired differences."""
    ref = [r for r in rows if r["family"] == "marflow"]
    has_fd = any(r.get("fd") is not None for r in rows)
    head = ["family", "configuration", "seeds", "held-out bits/dim", "Δ vs MaR-Flow (paired)",
            "bits/dim verdict"]
    head += ["FD (T = 1)", "ΔFD vs MaR-Flow (paired)", "non-finite samples"] if has_fd else []
    head += ["params", "train time / image", "sampling time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    params = (timing_event or {}).get("params", {})
    for key in [k for k in FAMILIES if any(r["family"] == k for r in rows)]:
        rs = sorted((r for r in rows if r["family"] == key), key=lambda r: r["seed"])
        d = _paired(rs, ref, "held_out_bpd") if key != "marflow" else []
        cells = [FAMILIES[key].label, f"`{rs[0]['spec']}`", str(len(rs)),
                 _ms([r["held_out_bpd"] for r in rs]), _ms(d) if d else "—", verdict(d)]
        if has_fd:
            fd = _paired(rs, ref, "fd") if key != "marflow" else []
            bad = [r["fd_nonfinite"] for r in rs if r.get("fd") is not None]
            cells += [_ms([r["fd"] for r in rs if r.get("fd") is not None], 0),
                      _ms(fd, 0) if fd else "—",
                      f"{st.mean(bad):.0f}" + (f" of {rs[0]['fd_samples']}" if "fd_samples"
                                               in rs[0] else "") if bad else "—"]
        n = params.get(key, rs[0]["params"])
        n_ref = params.get("marflow") or (ref[0]["params"] if ref else None)
        cells += [f"{n / 1e6:.2f}M" + (f" ({n / n_ref:.2f}×)" if n_ref else ""),
                  _ratio(timing_event, key, "train"), _ratio(timing_event, key, "sample")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed(rows: list[dict]) -> str:
    lines = ["| family | seed | steps × batch | held-out bits/dim | FD (non-finite) | train s | "
             "recipe | load (start → end) |", "|" + "---|" * 8]
    for key in FAMILIES:
        for r in sorted((r for r in rows if r["family"] == key), key=lambda r: r["seed"]):
            fd = (f"{r['fd']:.0f} ({r['fd_nonfinite']})" if r.get("fd") is not None else "—")
            lines.append(f"| {r['label']} | {r['seed']} | {r['steps']} × {r['batch']} | "
                         f"{r['held_out_bpd']:.4f} | {fd} | {r['train_s']:.0f} | {r['recipe']} | "
                         f"{r['load_start'][0]} → {r['load_end'][0]} |")
    return "\n".join(lines)


def tarflow_vs_peer(rows: list[dict]) -> str:
    """Issue 21 5(c): ours within one sd of theirs, or better (and, where it ran, ours from their
    initialisation against theirs)."""
    theirs = {r["seed"]: r["held_out_bpd"] for r in rows if r["family"] == "mltarflow"}
    lines = []
    for key in ("tarflow", "tarflow_uniform", "tarflow_main", "tarflow_peerinit"):
        ours = {r["seed"]: r["held_out_bpd"] for r in rows if r["family"] == key}
        seeds = sorted(set(ours) & set(theirs))
        if len(seeds) < 2:
            continue
        a, b = [ours[s] for s in seeds], [theirs[s] for s in seeds]
        d = [x - y for x, y in zip(a, b, strict=True)]
        ok = st.mean(a) <= st.mean(b) + st.stdev(b)
        lines.append(f"| {FAMILIES[key].label} | {', '.join(map(str, seeds))} | {_ms(a)} | "
                     f"{_ms(b)} | {_ms(d)} | {max(abs(x) for x in d):.2g} | "
                     f"{'yes' if ok else 'no'} |")
    if not lines:
        return ""
    return ("| ours | seeds | ours | ml-tarflow | ours − theirs (paired) | largest abs. difference "
            "| ours within one sd of theirs or better |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(lines))


def read_log(path: str) -> tuple[list[dict], dict | None, list[dict]]:
    events = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    rows = [e["row"] for e in events if e["event"] == "row"]
    timings = [e for e in events if e["event"] == "timing"]
    return rows, (timings[-1] if timings else None), [e for e in events if e["event"] == "start"]


def report(path: str) -> None:
    rows, timing_event, starts = read_log(path)
    for s in starts[-1:]:
        print(f"run: {s['images']} images per family, seeds {s['seeds']}, {s['jobs']} job(s) × "
              f"{s['threads']} thread(s), load at start {s['load']}")
    floors = {r["fd_floor"] for r in rows if r.get("fd_floor") is not None}
    if floors:
        print(f"FD floor (real held-out digits against the training digits): "
              f"{', '.join(f'{f:.2f}' for f in floors)}; non-finite samples are set to 0 "
              "(black) and kept, as sample_quality.py does")
    if timing_event:
        print(f"speed: {timing_event['rounds']} interleaved rounds, {timing_event['threads']} "
              f"thread(s), load {timing_event['load']}; ratios to MaR-Flow = median over rounds")
    print()
    print(leaderboard(rows, timing_event))
    print()
    print(per_seed(rows))
    vs = tarflow_vs_peer(rows)
    if vs:
        print()
        print("TarFlow against the real ml-tarflow (issue 21 5(c)):")
        print(vs)
    notes = [f"- {f.label}: {f.note}" for k, f in FAMILIES.items() if f.note
             and any(r["family"] == k for r in rows)]
    if notes:
        print()
        print("\n".join(notes))


# --- main ----------------------------------------------------------------------------------------

def _worker_cmd(argv: list[str], job: str, seed: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), *argv, "--worker", job,
            "--worker-seed", str(seed)]


def run_all(args: argparse.Namespace, argv: list[str]) -> None:
    done = set()
    timed = False
    if Path(args.log).is_file():
        rows, timing_event, _ = read_log(args.log)
        done = {(r["family"], r["seed"]) for r in rows}
        timed = timing_event is not None
    # longest first: the two job slots end together
    cost = {"marscf": 9, "resflow": 5, "mltarflow": 3, "tarflow": 3, "tarflow_main": 3,
            "tarflow_uniform": 3, "itrans": 2, "imap": 1.5, "marflow": 1}
    jobs = [(k, s) for s in args.seeds for k in args.families if (k, s) not in done]
    jobs.sort(key=lambda j: -cost.get(j[0], 1))
    if args.rounds and not timed:
        jobs.insert(len(jobs) // 2, ("timing", 0))
    log_event(args.log, {"event": "start", "images": args.images, "seeds": args.seeds,
                         "fd_samples": args.fd_samples, "fd_temperature": args.fd_temperature,
                         "jobs": args.jobs, "threads": args.threads, "load": load(),
                         "families": args.families, "pending": len(jobs)})
    print(f"{len(jobs)} job(s), {args.jobs} at a time; load {load()}", flush=True)

    def one(job: tuple[str, int]) -> None:
        began = time.time()
        proc = subprocess.run(_worker_cmd(argv, *job), capture_output=True, text=True)
        status = "ok" if proc.returncode == 0 else f"FAILED rc {proc.returncode}\n{proc.stderr}"
        print(f"{job[0]} seed {job[1]}: {status} ({time.time() - began:.0f} s, load {load()})",
              flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, jobs))
    report(args.log)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=list(FAMILIES),
                   default=[k for k, f in FAMILIES.items() if not f.diagnostic])
    p.add_argument("--images", type=int, default=4800,
                   help="training images every family sees (a multiple of every batch)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="speed rounds (0: no speed columns)")
    p.add_argument("--out", default="/work/runs-board", help="checkpoints go to OUT/ckpt")
    p.add_argument("--log", default="/work/runs-board/leaderboard.jsonl")
    p.add_argument("--from-log", default=None, metavar="LOG")
    p.add_argument("--marscf-dir", default=os.environ.get("MARSCF_DIR", "/work/peers/mar-scf"))
    p.add_argument("--mltarflow-dir", default=os.environ.get("MLTARFLOW_DIR", "/tmp/ml-tarflow"))
    p.add_argument("--sample-quality", default=str(Path(__file__).with_name("sample_quality.py")),
                   help="the conditioning work's sample_quality.py (missing: no FD column)")
    p.add_argument("--fd-samples", type=int, default=1000)
    p.add_argument("--fd-temperature", type=float, default=1.0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.from_log:
        report(args.from_log)
        return
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    if args.worker == "timing":
        timing(args)
    elif args.worker is not None:
        run_one(args.worker, args.worker_seed, args)
    else:
        run_all(args, [a for a in sys.argv[1:]])


if __name__ == "__main__":
    main()
