"""TarFlow side by side with the real apple/ml-tarflow: parity of weights, densities and samples,
and speed and memory, in one process (memory: one subprocess per model).

ml-tarflow's ``transformer_flow.py`` (Zhai et al. 2024; github.com/apple/ml-tarflow) is imported
unmodified from ``--peer-dir`` (a checkout outside this repository, e.g. ``git --git-dir=...
show HEAD:transformer_flow.py > /tmp/ml-tarflow/transformer_flow.py``). One call-time patch,
for the float64 parity only: its layers cast their input with ``x.float()`` before every
LayerNorm and exponential (float32 by design); inside ``float64_peer()`` ``Tensor.float`` leaves
float64 tensors as they are, so its model runs in float64 end to end.

Parity (``--parity``): their ``Model`` is built at random (its init, then every weight moved by
N(0, 0.02²), the output heads scaled down so that 8 blocks of exp(a) stay finite at random),
saved with ``torch.save`` and turned into a zoo checkpoint by ``attnflow convert``'s library
function; then on the same inputs

- log-density: ours = log N(z; 0, I) + logdet in nats per sample; theirs from ``Model.forward``:
  −½‖z‖² − D/2·ln 2π + T·d·mean-logdet + D·ln 2 (their data are 2x: [−1, 1]);
- inverse: our ``decode(ε)`` against their ``reverse(ε)`` / 2, with and without
  attention-temperature guidance (unconditional; ``guidance``, ``attn_temp``) and annealing,
  and (class-conditional) classifier-free guidance;
- denoising: our ``denoise`` at σ/2 against the step of their sample notebook,
  x ← x − B·D·σ²·∇ loss (their loss is a mean over the batch and dimensions);

in float64 (relative density difference ≤ 1e-10) and float32 (≤ 1e-5); the inverses are held to
the same numbers relative to the largest |x|. For a class-conditional model the "no class" row
is set to their class mean in the comparison's dtype (the converter stores it in float32;
ml-tarflow takes the mean at run time).

Speed (``--speed``): at a digits-sized (``tarflow_digits``: 1×32×32, P = 4, width 128, 4 × 2)
and a CIFAR-sized (``tarflow_cifar10_small``: 3×32×32, P = 2, width 256, 4 × 4) configuration,
the same weights in both; interleaved rounds, each timing one training step (forward, backward,
AdamW (0.9, 0.95) wd 1e-4; ours: the training loop's sync-free ``TrainStep``, theirs: their
train.py's loss and step) in fp32 and in bf16 autocast (ours: ``attnflow_zoo.precision``;
theirs: ``torch.autocast`` around forward and loss as in their train.py, without their fp16
GradScaler, which bf16 does not need), and one sampling call (fp32). Ratios ours/theirs are
taken per round; the table gives their median and range. Peak memory: each model's training
step and sampling call in a subprocess of its own, peak RSS (VmHWM) above the RSS after
building the model (CPU), or max allocated (CUDA); also our model in their plain step, which
tells the model's own memory from the zoo's step's (its non-finite guard keeps a copy of the
weights and the gradients allocated between steps).

    OMP_NUM_THREADS=1 python benchmarks/tarflow_peer.py --peer-dir /tmp/ml-tarflow --parity
    OMP_NUM_THREADS=1 python benchmarks/tarflow_peer.py --peer-dir /tmp/ml-tarflow --speed \\
        --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

import attnflow_zoo as az
from attnflow_zoo.models.tarflow_convert import convert_ml_tarflow

_LOADED: dict[str, types.ModuleType] = {}
#: name -> (preset, training batch, sampling batch)
CONFIGS = {"digits": ("tarflow_digits", 32, 16), "cifar": ("tarflow_cifar10_small", 16, 16)}


def load_peer(peer_dir: str | Path) -> types.ModuleType:
    """ml-tarflow's ``transformer_flow`` module from ``peer_dir`` (imported unmodified)."""
    root = Path(peer_dir).expanduser().resolve()
    if str(root) in _LOADED:
        return _LOADED[str(root)]
    if not (root / "transformer_flow.py").is_file():
        raise FileNotFoundError(f"{root} has no transformer_flow.py; fetch apple/ml-tarflow and "
                                "pass its folder as --peer-dir")
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("transformer_flow")
    finally:
        sys.path.remove(str(root))
    _LOADED[str(root)] = module
    return module


@contextlib.contextmanager
def float64_peer() -> Iterator[None]:
    """``Tensor.float`` leaves float64 tensors alone while a float64 peer call runs."""
    original = torch.Tensor.float

    def keep64(self: Tensor, *args: object, **kwargs: object) -> Tensor:
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = keep64  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.float = original  # type: ignore[method-assign]


@contextlib.contextmanager
def their_head_width(tf: types.ModuleType, config: az.TarFlowConfig) -> Iterator[None]:
    """Their ``Model`` built inside gets ``config``'s head width and MLP expansion: it has no
    such arguments, so its ``MetaBlock`` is given them at build time (the module is restored
    after; nothing of theirs is edited)."""
    original = tf.MetaBlock

    class MetaBlock(original):  # type: ignore[misc, valid-type]
        def __init__(self, *a: object, **k: object) -> None:
            super().__init__(*a, head_dim=config.head_dim, expansion=config.expansion, **k)

    tf.MetaBlock = MetaBlock
    try:
        yield
    finally:
        tf.MetaBlock = original


def build_pair(tf: types.ModuleType, config: az.TarFlowConfig, seed: int = 0,
               spread: float = 0.02) -> tuple[nn.Module, az.TarFlow]:
    """(their ``Model``, our ``TarFlow``) with the same weights: theirs drawn at random (their
    init, every weight moved by N(0, spread²), output heads ×0.3), saved with ``torch.save``
    and converted by ``attnflow convert``'s ``convert_ml_tarflow``."""
    with torch.random.fork_rng(devices=[]), their_head_width(tf, config):
        torch.manual_seed(seed)
        theirs = tf.Model(in_channels=config.in_channels, img_size=config.image_size,
                          patch_size=config.patch_size, channels=config.width,
                          num_blocks=config.num_blocks, layers_per_block=config.layers_per_block,
                          nvp=config.affine, num_classes=config.num_classes)
        with torch.no_grad():
            for p in theirs.parameters():
                p.add_(spread * torch.randn_like(p))
            for block in theirs.blocks:
                block.proj_out.weight.mul_(0.3)
                block.proj_out.bias.mul_(0.3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "peer_model_0_0_0_0_uniform.pth"
        torch.save(theirs.state_dict(), path)
        ours = convert_ml_tarflow(path, Path(tmp) / "zoo", in_channels=config.in_channels,
                                  head_dim=config.head_dim)
    return theirs, ours


def their_log_density(theirs: nn.Module, x: Tensor, y: Tensor | None = None) -> Tensor:
    """Their ``Model.forward`` on 2x as per-sample nats of x (the zoo's model space)."""
    z, _, logdets = theirs(2 * x, y)
    d = z[0].numel()
    return (-0.5 * z.pow(2).flatten(1).sum(1) - 0.5 * d * math.log(2 * math.pi)
            + logdets * d + d * math.log(2.0))


def _denoise_parity(theirs: nn.Module, ours: az.TarFlow, x: Tensor, y: Tensor | None,
                    sigma: float = 0.05) -> tuple[float, float]:
    """Our ``denoise`` (σ/2 in model space) against the step of ml-tarflow's sample notebook,
    x ← x − B·D·σ²·∇ loss on their 2x: (max abs difference, max |x|)."""
    ours.record_noise_std(sigma / 2)
    mine = ours.denoise(x, y)
    with torch.enable_grad():
        x2 = (2 * x).requires_grad_(True)
        z, _, logdets = theirs(x2, y)
        (grad,) = torch.autograd.grad(theirs.get_loss(z, logdets), [x2])
    ref = (x2 - x.shape[0] * x[0].numel() * sigma ** 2 * grad).detach() / 2
    return float((mine - ref).abs().max()), float(ref.abs().max())


def _rel(a: Tensor, b: Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def parity(tf: types.ModuleType, config: az.TarFlowConfig, dtype: torch.dtype,
           seed: int = 0) -> dict[str, float]:
    """The largest differences ours vs theirs (see the module docstring) at ``config``."""
    theirs, ours = build_pair(tf, config, seed)
    theirs, ours = theirs.to(dtype).eval(), ours.to(dtype).eval()
    if config.num_classes:
        # The checkpoint stores the "no class" row (their class mean) in float32; ml-tarflow
        # takes the mean at run time, in the model's dtype: so do we here.
        with torch.no_grad():
            for block, embedding in zip(theirs.blocks, ours.class_embeddings, strict=True):
                embedding.table.weight[-1] = block.class_embed[:, 0].mean(0)
    g = torch.Generator().manual_seed(seed + 1)
    b = 4
    x = (torch.rand(b, *ours.input_shape, generator=g, dtype=torch.float64) - 0.5).to(dtype)
    eps = torch.randn(b, config.num_tokens, config.token_dim, generator=g,
                      dtype=torch.float64).to(dtype)
    y = torch.arange(b) % config.num_classes if config.num_classes else None
    peer = float64_peer() if dtype == torch.float64 else contextlib.nullcontext()
    out: dict[str, float] = {}
    with torch.no_grad(), peer:
        out["log_density_rel"] = _rel(ours.log_density(x, y), their_log_density(theirs, x, y))
        cases = {"inverse": ({}, {})}
        if config.num_classes:
            cases["inverse_cfg_w2"] = ({"guidance": 2.0}, {"guidance": 2.0})
            cases["inverse_cfg_w2_annealed"] = ({"guidance": 2.0, "annealed": True},
                                                {"guidance": 2.0, "annealed_guidance": True})
        else:
            cases["inverse_attn_temp_w1.5_t1.3"] = (
                {"guidance": 1.5, "attention_temperature": 1.3},
                {"guidance": 1.5, "attn_temp": 1.3})
            cases["inverse_attn_temp_annealed"] = (
                {"guidance": 1.5, "attention_temperature": 1.3, "annealed": True},
                {"guidance": 1.5, "attn_temp": 1.3, "annealed_guidance": True})
        out["denoise_abs"], out["denoise_scale"] = _denoise_parity(theirs, ours, x, y)
        for name, (mine, their_kwargs) in cases.items():
            a = ours.decode(eps.clone(), y, **mine)
            ref = theirs.reverse(eps.clone(), y, **their_kwargs) / 2
            out[f"{name}_abs"] = float((a - ref).abs().max())
            out[f"{name}_scale"] = float(ref.abs().max())
    return out


# --- speed ------------------------------------------------------------------------------------
class _Contenders:
    """Training steps and samplers of theirs and ours at one configuration, same weights."""

    def __init__(self, tf: types.ModuleType, config: az.TarFlowConfig, train_batch: int,
                 sample_batch: int, device: torch.device, names: list[str]) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from harness import TrainStep

        theirs, ours = build_pair(tf, config, seed=0)
        theirs, ours = theirs.to(device).train(), ours.to(device).train()
        self.device = device
        g = torch.Generator().manual_seed(0)
        self.x = (torch.rand(train_batch, *ours.input_shape, generator=g) - 0.5).to(device)
        self.noise = torch.randn(sample_batch, config.num_tokens, config.token_dim,
                                 generator=g).to(device)
        self.fns: dict[str, Callable[[], object]] = {}

        def adamw(model: nn.Module) -> torch.optim.Optimizer:
            return torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95),
                                     weight_decay=1e-4)

        for precision in ("fp32", "bf16"):
            if f"theirs-train-{precision}" in names:
                self.fns[f"theirs-train-{precision}"] = self._their_step(theirs, adamw(theirs),
                                                                         precision)
            if f"ours-train-{precision}" in names:
                step = TrainStep(ours, adamw(ours), precision)
                self.fns[f"ours-train-{precision}"] = lambda step=step: step(self.x)
        if "ours-plain-train-fp32" in names:  # memory only: our model in their plain step
            self.fns["ours-plain-train-fp32"] = self._plain_step(ours, adamw(ours))
        self.fns["theirs-sample"] = lambda: _no_grad(lambda: theirs.reverse(self.noise.clone()))
        self.fns["ours-sample"] = lambda: _no_grad(lambda: ours.decode(self.noise.clone()))
        if "ours-sample-bounded" in names:  # the same weights under the preset's log-scale bound
            bounded = az.TarFlow(dataclasses.replace(ours.config,
                                                     log_scale_bound=config.log_scale_bound))
            bounded.load_state_dict(ours.state_dict())
            bounded = bounded.to(device).eval()
            self.fns["ours-sample-bounded"] = \
                lambda: _no_grad(lambda: bounded.decode(self.noise.clone()))
        self.fns = {k: v for k, v in self.fns.items() if k in names}

    def _their_step(self, theirs: nn.Module, opt: torch.optim.Optimizer, precision: str
                    ) -> Callable[[], None]:
        x2 = 2 * self.x
        enabled = precision == "bf16"

        def step() -> None:
            opt.zero_grad()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled):
                z, _, logdets = theirs(x2)
                loss = theirs.get_loss(z, logdets)
            loss.backward()
            opt.step()

        return step

    def _plain_step(self, ours: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        """Our model's loss in their train.py's step (no non-finite guard, no kept grads)."""

        def step() -> None:
            opt.zero_grad()
            (-ours.log_density(self.x).mean()).backward()
            opt.step()

        return step

    def timed(self, name: str) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        self.fns[name]()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def _no_grad(fn: Callable[[], object]) -> object:
    with torch.no_grad():
        return fn()


PAIRS = [("train fp32", "ours-train-fp32", "theirs-train-fp32"),
         ("train bf16 (ours) / fp32 (theirs)", "ours-train-bf16", "theirs-train-fp32"),
         ("train bf16 / bf16", "ours-train-bf16", "theirs-train-bf16"),
         ("sample fp32", "ours-sample", "theirs-sample"),
         ("sample fp32, ours with the preset's log-scale bound", "ours-sample-bounded",
          "theirs-sample")]
NAMES = ["theirs-train-fp32", "ours-train-fp32", "theirs-train-bf16", "ours-train-bf16",
         "theirs-sample", "ours-sample", "ours-sample-bounded"]


def speed(tf: types.ModuleType, which: str, rounds: int, device: torch.device
          ) -> dict[str, list[float]]:
    """Per-round seconds of every contender at configuration ``which``."""
    preset, train_batch, sample_batch = CONFIGS[which]
    runner = _Contenders(tf, az.registry.preset_config(preset), train_batch, sample_batch,
                         device, NAMES)
    for name in NAMES:  # warm-up
        runner.fns[name]()
    times: dict[str, list[float]] = {n: [] for n in NAMES}
    for r in range(rounds):
        for name in NAMES:
            times[name].append(runner.timed(name))
        print(f"  {which} round {r + 1}/{rounds}: "
              + " ".join(f"{n} {times[n][-1]:.3f}s" for n in NAMES), flush=True)
    return times


def _memory_worker(args: argparse.Namespace) -> dict[str, float]:
    """Peak memory of one contender's two calls, in this (fresh) process."""
    tf = load_peer(args.peer_dir)
    preset, train_batch, sample_batch = CONFIGS[args.which]
    device = torch.device(args.device)
    runner = _Contenders(tf, az.registry.preset_config(preset), train_batch, sample_batch,
                         device, [args.worker_memory])
    base = _status_mb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        runner.fns[args.worker_memory]()
    out = {"peak_rss_mb": _status_mb("VmHWM"), "base_rss_mb": base}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory(args: argparse.Namespace, which: str, name: str) -> dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--peer-dir", str(args.peer_dir),
           "--worker-memory", name, "--which", which, "--device", args.device,
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def speed_table(which: str, times: dict[str, list[float]], mem: dict[str, dict]) -> None:
    preset, train_batch, sample_batch = CONFIGS[which]
    print(f"\n{which} ({preset}; train batch {train_batch}, sample {sample_batch}); "
          "ours/theirs: median of per-round ratios (min–max)")
    print("| | theirs, s | ours, s | ours/theirs | target |")
    print("|---|---|---|---|---|")
    targets = {"train fp32": "≤ 1.0", "train bf16 (ours) / fp32 (theirs)": "≤ 0.7",
               "sample fp32": "≤ 0.5", "train bf16 / bf16": "-",
               "sample fp32, ours with the preset's log-scale bound": "-"}
    for label, mine, their in PAIRS:
        ratio = [a / b for a, b in zip(times[mine], times[their], strict=True)]
        print(f"| {label} | {statistics.median(times[their]):.3f} | "
              f"{statistics.median(times[mine]):.3f} | {_cell(ratio)} | {targets[label]} |")
    for kind, mine in (("train-fp32", "ours-train-fp32"), ("sample", "ours-sample"),
                       ("train-fp32", "ours-plain-train-fp32")):
        if mine in mem:
            o, t = mem[mine], mem[f"theirs-{kind}"]
            key = "cuda_peak_mb" if "cuda_peak_mb" in o else "peak_rss_mb"
            grow_o = o[key] - (o["base_rss_mb"] if key == "peak_rss_mb" else 0)
            grow_t = t[key] - (t["base_rss_mb"] if key == "peak_rss_mb" else 0)
            what = kind if mine.startswith("ours-") and "plain" not in mine else \
                f"{kind}, our model in their plain step (no guard copy, no kept grads)"
            print(f"| peak memory {what} (MB above the built model, {key}) | {grow_t:.0f} | "
                  f"{grow_o:.0f} | {grow_o / max(grow_t, 1e-9):.2f} | ≤ 1.0 |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-dir", type=Path, default=Path("/tmp/ml-tarflow"))
    parser.add_argument("--parity", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--worker-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--which", default="digits", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker_memory is not None:
        print(json.dumps(_memory_worker(args)))
        return
    tf = load_peer(args.peer_dir)
    print(f"ml-tarflow from {args.peer_dir}; device {args.device}, {args.threads} threads; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    if args.parity:
        run_parity(tf)
    if args.speed:
        for which in args.configs:
            times = speed(tf, which, args.rounds, torch.device(args.device))
            mem = {} if args.no_memory else {
                n: memory(args, which, n) for n in ("theirs-train-fp32", "ours-train-fp32",
                                                    "ours-plain-train-fp32", "theirs-sample",
                                                    "ours-sample")}
            speed_table(which, times, mem)
    print(f"load average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def run_parity(tf: types.ModuleType) -> None:
    """Parity at a small unconditional and a small class-conditional configuration."""
    small = dict(image_size=8, in_channels=3, patch_size=2, width=64, num_blocks=4,
                 layers_per_block=2, head_dim=64)
    configs = {"unconditional": az.TarFlowConfig(**small)}
    try:
        configs["class-conditional"] = az.TarFlowConfig(**small, num_classes=3)
        az.TarFlow(configs["class-conditional"])
    except az.ConfigError:
        del configs["class-conditional"]
    print("\n| configuration | dtype | log-density: max relative difference | inverse and "
          "guided inverses vs their reverse: max abs difference / max abs value |")
    print("|---|---|---|---|")
    for label, config in configs.items():
        for dtype, limit in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            out = parity(tf, config, dtype)
            inv = "; ".join(
                f"{k.removesuffix('_abs')} {v / out[k[:-4] + '_scale']:.1e} "
                f"({'ok' if v <= limit * out[k[:-4] + '_scale'] else 'FAIL'})"
                for k, v in out.items() if k.endswith("_abs"))
            ok = "ok" if out["log_density_rel"] <= limit else "FAIL"
            print(f"| {label} | {str(dtype).removeprefix('torch.')} | "
                  f"{out['log_density_rel']:.1e} ({ok}, limit {limit:g}) | {inv} |", flush=True)


if __name__ == "__main__":
    main()
