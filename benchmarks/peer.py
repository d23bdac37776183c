"""The real visinf/mar-scf, imported unmodified from a clone outside the repo, on any device.

mAR-SCF's code (Mahajan et al., CVPR 2020; github.com/visinf/mar-scf) is written for CUDA and
PyTorch 1.0. This module imports it as is from ``peer_dir`` and patches, at import / call time
only, what breaks on a CPU machine or a current PyTorch:

- ``collections.Iterable`` (removed in Python 3.10; ``convolutional_rnn/utils.py``) is set to
  ``collections.abc.Iterable`` when missing;
- ``.cuda()`` calls (``InvertibleConv1x1`` inverse, the prior's sampling buffers) are routed to
  the model's device while a peer call runs (``torch.Tensor.cuda`` is swapped back afterwards);
- the prior's hard-coded batch size (``ChannelPriorUniScale.batch_size``, used for its zero
  start frame and for the number of samples) is set to the batch at hand before every call;
- ``FlowNet`` builds its prior for 3×32×32 whatever the image shape (``ChannelPriorMultiScale(
  batch_size, 3, 32, 32, L, ...)``): for another shape the prior is rebuilt with mar-scf's own
  class at the right (C, H, W), so 1-channel and other sizes work too.

Conventions (checked against ``marscf_main.MarScfFlow.normal_flow``): mar-scf's data is
x = x_u8/255 − 0.5 (``ToTensor`` + ``Normalize(0.5, 1)``), dequantised *inside* the model as
x + u/256 with the global RNG, and its nll adds −D·ln 256 to the objective before dividing by
D·ln 2. Here we bypass ``normal_flow`` and call its ``FlowNet`` directly on x̃ − 0.5 with
x̃ = (x_u8 + u)/256 (the zoo's ``quantize.dequantize``), so ``peer_log_density`` is log p(x̃) in
nats of exactly the zoo's input, and bits/dim follows from the zoo's one rule
bpd = (−log p(x̃) + D ln 256)/(D ln 2). ``peer_native_bits_per_dim`` reproduces mar-scf's own
scoring for comparison (its x_u8/255 range costs log2(256/255) ≈ 0.0056 bits/dim).

Public API (used by quality.py, and by a speed benchmark)::

    marscf = load_marscf("/work/peers/mar-scf")
    model = build_peer_model(marscf, num_levels=3, num_steps=2, hidden_channels=256,
                             in_channels=3, image_size=32, seed=0)
    log_p = peer_log_density(model, x)             # x = x̃ − 0.5, (B,) nats
    bpd = peer_bits_per_dim(model, x_u8, generator=g)
    x_u8 = peer_sample(model, 16, seed=0)
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import importlib
import math
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

_LOADED: dict[str, types.SimpleNamespace] = {}


def load_marscf(peer_dir: str | Path) -> types.SimpleNamespace:
    """Import mar-scf from its clone ``peer_dir``; returns a namespace of its modules.

    Attributes: ``main`` (``marscf_main``: ``MarScfFlow``, ``FlowNet``, ``FlowStep``),
    ``prior`` (``mar_prior.corr_prior``), ``common`` (``flow_modules.common_modules``),
    ``affine`` (``flow_modules.affine_coupling``), ``dir`` (the resolved path).
    Idempotent per path. Its top-level packages (``flow_modules``, ``mar_prior``, ``utils``)
    enter ``sys.modules`` under those names.
    """
    root = Path(peer_dir).expanduser().resolve()
    if str(root) in _LOADED:
        return _LOADED[str(root)]
    if not (root / "marscf_main.py").is_file():
        raise FileNotFoundError(f"{root} is not a visinf/mar-scf clone (no marscf_main.py); "
                                "clone it and pass its path as --peer-dir")
    if not hasattr(collections, "Iterable"):  # Python ≥ 3.10 dropped the alias it uses
        collections.Iterable = collections.abc.Iterable  # type: ignore[attr-defined]
    sys.path.insert(0, str(root))
    try:
        ns = types.SimpleNamespace(
            main=importlib.import_module("marscf_main"),
            prior=importlib.import_module("mar_prior.corr_prior"),
            common=importlib.import_module("flow_modules.common_modules"),
            affine=importlib.import_module("flow_modules.affine_coupling"),
            dir=root,
        )
    finally:
        sys.path.remove(str(root))
    _LOADED[str(root)] = ns
    return ns


def build_peer_model(marscf: types.SimpleNamespace, *, num_levels: int = 3, num_steps: int = 2,
                     hidden_channels: int = 256, coupling: str = "affine", in_channels: int = 3,
                     image_size: int = 32, batch_size: int = 16,
                     seed: int | None = None) -> nn.Module:
    """mar-scf's ``MarScfFlow(batch_size, (H, W, C), coupling, L, K, C_hidden)``.

    Its constructor draws from the global torch RNG (layer init) and numpy's global RNG
    (``InvertibleConv1x1``'s rotation); with ``seed`` both are seeded inside a forked torch RNG
    and a saved-and-restored numpy state, so the caller's global streams are left untouched.
    The prior is rebuilt (mar-scf's own ``ChannelPriorMultiScale``, same arguments as
    ``FlowNet`` uses) when the images are not 3×32×32, for which ``FlowNet`` hard-codes it.
    ``batch_size`` only sizes the prior's buffers; every peer call here resets it.
    """
    import numpy as np

    shape = [image_size, image_size, in_channels]  # mar-scf's image_shape is HWC
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
                np.random.seed(seed)
            model = marscf.main.MarScfFlow(batch_size, shape, coupling, num_levels, num_steps,
                                           hidden_channels)
            if (in_channels, image_size) != (3, 32):
                model.flow.c_prior = marscf.prior.ChannelPriorMultiScale(
                    batch_size, in_channels, image_size, image_size, num_levels, mog=False,
                    dp_rate=0, num_layers=3, hidden_size=32)
    finally:
        if seed is not None:
            np.random.set_state(np_state)
    model.peer_shape = (in_channels, image_size, image_size)
    return model


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def peer_call(model: nn.Module, batch_size: int) -> Iterator[None]:
    """Context for any call into the peer model: its priors get ``batch_size`` and its
    ``.cuda()`` calls go to the model's device (restored on exit)."""
    for prior in model.flow.c_prior.prior_list:
        prior.batch_size = batch_size
    device = _device(model)
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self.to(device)  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def peer_log_density(model: nn.Module, x: Tensor) -> Tensor:
    """log p(x) in nats, (B,), of mar-scf's flow + mAR prior at x = x̃ − 0.5 (the zoo's input
    space; x̃ ∈ [0, 1)^D already dequantised). No −D·ln 256 term is included."""
    with peer_call(model, x.shape[0]):
        _, objective = model.flow(x, logdet=x.new_zeros(x.shape[0]), reverse=False)
    return objective


def peer_bits_per_dim(model: nn.Module, x_u8: Tensor,
                      generator: torch.Generator | None = None) -> Tensor:
    """Bits/dim per image, (B,), by the zoo's rule (one uniform-dequantisation sample drawn
    with ``generator`` through ``attnflow_zoo.data.quantize.dequantize``)."""
    from attnflow_zoo.data import quantize

    x = quantize.dequantize(x_u8.to(_device(model)), generator=generator) - 0.5
    d = x[0].numel()
    return (-peer_log_density(model, x) + d * math.log(256.0)) / (d * math.log(2.0))


def peer_native_bits_per_dim(model: nn.Module, x_u8: Tensor) -> Tensor:
    """mar-scf's own scoring, (B,): ``MarScfFlow.normal_flow`` on x_u8/255 − 0.5 with its own
    dequantisation (global torch RNG), as its ``test_model`` does."""
    x = x_u8.to(_device(model)).float() / 255.0 - 0.5
    with peer_call(model, x.shape[0]):
        _, nll, _ = model(x, reverse=False)
    return nll


@torch.no_grad()
def peer_sample(model: nn.Module, num_samples: int, seed: int | None = None) -> Tensor:
    """``num_samples`` uint8 images B×C×H×W from mar-scf's sampler (``reverse_flow``, its
    temperature is fixed at 1: its prior ignores ``eps_std``).

    mar-scf draws its noise from the global torch RNG; with ``seed`` that happens inside a
    forked RNG seeded with it. Outputs are mapped x ↦ floor(256·(x + 0.5)) clamped to 0..255
    (the zoo's ``quantize.quantize``).
    """
    from attnflow_zoo.data import quantize

    device = _device(model)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), peer_call(model, num_samples):
        if seed is not None:
            torch.manual_seed(seed)
        x = model(None, None, reverse=True, eps_std=1.0)
    return quantize.quantize(x + 0.5)


# --- diagnostic: the same function in the zoo's parameterisation ----------------------------

def copy_peer_into_zoo(peer: nn.Module, ours: nn.Module) -> None:
    """Copy a mar-scf affine model's parameters into a zoo ``AttnFlow`` of the same (L, K, C,
    hidden) with ``attention="none"`` and ``prior="mar"``, so both compute the same function
    (a check that the architectures agree; reaches into the zoo's module layout).

    Mapping: ActNorm (bias, logs) → (bias, log_scale); InvConv (p, l, u, log_s, sign_s) →
    (perm, lower, upper, log_s, sign_s); NN_net conv1/conv2 (+ their actnorms) and conv3
    (Conv2dZeros) → CouplingNet [0], [1], [3], [4], [6]; prior ``z1_cond_network`` → ``embed``,
    ``conv_embed`` (input [z, emb]) → ``in_z`` (channel 0, bias) + ``in_cond`` (channels 1:),
    LSTM (i, f, g, o; b_ih + b_hh) → ConvLSTM (i, f, o, g; one bias), ``conv_out1`` → ``out``.
    """
    steps = [m for m in peer.flow.layers if type(m).__name__ == "FlowStep"]
    ours_steps = [step for level in ours.levels for step in list(level)[1:]]
    if len(steps) != len(ours_steps):
        raise ValueError(f"{len(steps)} peer steps vs {len(ours_steps)} zoo steps")

    def put(dst: Tensor, src: Tensor) -> None:
        if dst.numel() != src.numel():
            raise ValueError(f"shape mismatch {tuple(dst.shape)} vs {tuple(src.shape)}")
        dst.copy_(src.reshape(dst.shape))

    def actnorm(dst: nn.Module, src: nn.Module) -> None:
        put(dst.bias, src.bias)
        put(dst.log_scale, src.logs)
        dst.initialized.fill_(bool(src.is_initialized))

    def reorder(w: Tensor) -> Tensor:  # (i, f, g, o) -> (i, f, o, g) along dim 0
        i, f, g, o = w.chunk(4, 0)
        return torch.cat([i, f, o, g], 0)

    with torch.no_grad():
        for src, dst in zip(steps, ours_steps, strict=True):
            act, inv, coup = list(dst)[:3]
            actnorm(act, src.actnormlayer)
            s = src.invert_1x1_layer
            put(inv.perm, s.p)
            put(inv.lower, s.l)
            put(inv.upper, s.u)
            put(inv.log_s, s.log_s)
            put(inv.sign_s, s.sign_s)
            nn_src, nn_dst = src.coupling.NN_net, coup.net
            put(nn_dst[0].weight, nn_src.conv1.weight)
            actnorm(nn_dst[1], nn_src.conv1.actnorm)
            put(nn_dst[3].weight, nn_src.conv2.weight)
            actnorm(nn_dst[4], nn_src.conv2.actnorm)
            put(nn_dst[6].conv.weight, nn_src.conv3.weight)
            put(nn_dst[6].conv.bias, nn_src.conv3.bias)
            put(nn_dst[6].logs, nn_src.conv3.logs)
        for src, dst in zip(peer.flow.c_prior.prior_list, ours.priors, strict=True):
            enc = src.prior_lstm
            w_in = enc.conv_embed.weight
            put(dst.in_z.weight, w_in[:, :1])
            put(dst.in_z.bias, enc.conv_embed.bias)
            if dst.cond_channels > 0:
                put(dst.in_cond.weight, w_in[:, 1:])
                put(dst.embed[0].weight, src.z1_cond_network[0].weight)
                put(dst.embed[0].bias, src.z1_cond_network[0].bias)
                put(dst.embed[2].weight, src.z1_cond_network[2].weight)
                put(dst.embed[2].bias, src.z1_cond_network[2].bias)
            for layer, (ih, hh) in enumerate(zip(dst.lstm.ih, dst.lstm.hh, strict=True)):
                lstm = enc.lstm
                put(ih.weight, reorder(getattr(lstm, f"weight_ih_l{layer}")))
                put(ih.bias, reorder(getattr(lstm, f"bias_ih_l{layer}")
                                     + getattr(lstm, f"bias_hh_l{layer}")))
                put(hh.weight, reorder(getattr(lstm, f"weight_hh_l{layer}")))
            put(dst.out.weight, enc.conv_out1.weight)
            put(dst.out.bias, enc.conv_out1.bias)
