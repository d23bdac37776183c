"""Latent priors: the mAR conv-LSTM channel prior (SPEC §3) and the diagonal Gaussian prior."""

from __future__ import annotations

import pytest
import torch

from attnflow_zoo.layers.nets import ConvLSTM
from attnflow_zoo.priors import GaussianPrior, MARPrior
from attnflow_zoo.testing import check_gradients, perturb_parameters

PRIORS = {
    "mar_cond": lambda: MARPrior(6, cond_channels=4, hidden_channels=8, num_layers=3,
                                 kernel_size=5, dilation=2, cond_hidden_channels=8,
                                 embed_channels=3, output_init="zero"),
    "mar_uncond": lambda: MARPrior(5, hidden_channels=8, num_layers=2, kernel_size=3,
                                   output_init="zero"),
    "gauss_cond": lambda: GaussianPrior(6, cond_channels=4),
    "gauss_uncond": lambda: GaussianPrior(5),
}


def _prior(name: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A prior moved away from its (zero-initialised, N(0, I)) starting point."""
    prior = PRIORS[name]()
    perturb_parameters(prior, 0.2, torch.Generator().manual_seed(3))
    return prior.to(dtype).eval()


def _inputs(prior: torch.nn.Module, b: int, h: int, w: int, dtype: torch.dtype = torch.float64,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, prior.num_channels, h, w, generator=g, dtype=dtype)
    cond = (torch.randn(b, prior.cond_channels, h, w, generator=g, dtype=dtype)
            if prior.cond_channels else None)
    return z, cond


@pytest.mark.parametrize("name", PRIORS)
def test_starts_as_standard_normal(name: str) -> None:
    prior = PRIORS[name]().double()
    z, cond = _inputs(prior, 2, 4, 4)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(prior.log_prob(z, cond), expected)


@pytest.mark.parametrize(("output_init", "lstm_learns"), [("random", True), ("zero", False)])
def test_output_init_decides_whether_the_lstm_learns_at_init(output_init: str,
                                                             lstm_learns: bool) -> None:
    """The Decision behind output_init: a zero output conv cuts every gradient into the
    conv-LSTM at initialisation; mAR-SCF's random one lets it learn from the first step."""
    prior = MARPrior(6, cond_channels=4, hidden_channels=8, num_layers=2, kernel_size=3,
                     output_init=output_init).double()
    z, cond = _inputs(prior, 2, 4, 4)
    prior.log_prob(z, cond).sum().backward()
    grads = [p.grad for p in prior.lstm.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().max() > 0 for g in grads) == lstm_learns


@pytest.mark.parametrize("name", PRIORS)
@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 6, 10), (5, 16, 12)])
def test_log_prob_any_size_and_batch(name: str, shape: tuple[int, int, int]) -> None:
    """Any batch size (a last partial batch included) and any H×W; each sample alone = in batch."""
    prior = _prior(name)
    z, cond = _inputs(prior, *shape)
    logp = prior.log_prob(z, cond)
    assert logp.shape == (shape[0],) and torch.isfinite(logp).all()
    for i in range(shape[0]):
        alone = prior.log_prob(z[i: i + 1], None if cond is None else cond[i: i + 1])
        torch.testing.assert_close(alone, logp[i: i + 1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["mar_cond", "mar_uncond"])
def test_mar_is_autoregressive_over_channels(name: str) -> None:
    """(μ_c, σ_c) depend on z_{<c} only: changing channel j moves channels > j, not ≤ j."""
    prior = _prior(name)
    z, cond = _inputs(prior, 2, 5, 5)
    mean, log_std = prior.mean_and_log_std(z, cond)
    j = 2
    z2 = z.clone()
    z2[:, j] += 1.0
    mean2, log_std2 = prior.mean_and_log_std(z2, cond)
    torch.testing.assert_close(mean2[:, : j + 1], mean[:, : j + 1], rtol=0, atol=1e-12)
    torch.testing.assert_close(log_std2[:, : j + 1], log_std[:, : j + 1], rtol=0, atol=1e-12)
    assert (mean2[:, j + 1:] - mean[:, j + 1:]).abs().max() > 1e-6


@pytest.mark.parametrize("name", PRIORS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sample_draws_from_the_density_it_scores(name: str, temperature: float) -> None:
    """The sequential sampler and the teacher-forced density agree: the noise recovered as
    (z − μ(z_<c)) / (T·σ(z_<c)) is exactly the generator's N(0, 1) draws, channel by channel."""
    prior = _prior(name)
    b, h, w = 3, 6, 5
    _, cond = _inputs(prior, b, h, w)
    z = prior.sample(b, h, w, cond, temperature, torch.Generator().manual_seed(7))
    assert z.shape == (b, prior.num_channels, h, w) and z.dtype == torch.float64
    mean, log_std = prior.mean_and_log_std(z, cond)
    eps = (z - mean) / (temperature * torch.exp(log_std))
    g = torch.Generator().manual_seed(7)
    if isinstance(prior, MARPrior):
        ref = torch.cat([torch.randn(b, 1, h, w, generator=g, dtype=torch.float64)
                         for _ in range(prior.num_channels)], 1)
    else:
        ref = torch.randn(z.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(eps, ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", PRIORS)
def test_temperature_zero_gives_the_mean(name: str) -> None:
    prior = _prior(name)
    _, cond = _inputs(prior, 2, 4, 4)
    z = prior.sample(2, 4, 4, cond, 0.0, torch.Generator().manual_seed(1))
    z_other = prior.sample(2, 4, 4, cond, 0.0, torch.Generator().manual_seed(2))
    torch.testing.assert_close(z, z_other, rtol=0, atol=0)
    mean, _ = prior.mean_and_log_std(z, cond)
    torch.testing.assert_close(z, mean, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", PRIORS)
def test_gradients_reach_every_parameter(name: str) -> None:
    prior = PRIORS[name]()
    z, cond = _inputs(prior, 2, 4, 4, torch.float32)
    check_gradients(prior, z, nll=lambda p, v: -p.log_prob(v, cond).mean())


def test_conv_lstm_schedules_agree() -> None:
    """Layer-major teacher forcing (batched input convs) = step-major fused-conv stepping."""
    lstm = ConvLSTM(3, 8, num_layers=3, kernel_size=5, dilation=2).double()
    x_seq = torch.randn(6, 2, 3, 7, 9, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    outs = lstm(x_seq)
    state = lstm.begin(x_seq[0])
    stepped = torch.stack([lstm.step(x, state).clone() for x in x_seq])
    torch.testing.assert_close(outs, stepped, rtol=1e-12, atol=1e-12)
    assert outs.shape == (6, 2, 8, 7, 9)


# --- the optimised prior against a straightforward implementation of the same model ---------

def _reference_conv_lstm(lstm: ConvLSTM, x_seq: torch.Tensor) -> torch.Tensor:
    """The conv-LSTM as written in the papers: per step and layer, gates = Conv_ih(x) +
    Conv_hh(h), plain autograd, nothing batched, fused or preallocated."""
    for ih, hh in zip(lstm.ih, lstm.hh, strict=True):
        h = c = torch.zeros(x_seq.shape[1], lstm.hidden_channels, *x_seq.shape[3:],
                            dtype=x_seq.dtype)
        outs = []
        for x in x_seq:
            gates = ih(x) + hh(h)
            i, f, o, g = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        x_seq = torch.stack(outs)
    return x_seq


def _reference_mean_and_log_std(prior: MARPrior, z: torch.Tensor, cond: torch.Tensor | None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """mAR-SCF's formulation: step c's input is Conv_in([z_{c−1}, emb(z1)]), one frame at a
    time (Conv_in on the concatenation = in_z + in_cond, the prior's two weight blocks)."""
    b, c, h, w = z.shape
    weight = prior.in_z.weight
    emb = None
    if cond is not None:
        emb = prior.embed(cond)
        weight = torch.cat([weight, prior.in_cond.weight], 1)
    frames = []
    for step in range(c):
        prev = z[:, step - 1: step] if step else torch.zeros_like(z[:, :1])
        inp = prev if emb is None else torch.cat([prev, emb], 1)
        frames.append(torch.nn.functional.conv2d(inp, weight, prior.in_z.bias,
                                                 padding=prior.in_z.padding))
    out = torch.stack([prior.out(hs) for hs in _reference_conv_lstm(prior.lstm,
                                                                    torch.stack(frames))])
    return out[:, :, 0].transpose(0, 1), out[:, :, 1].transpose(0, 1)


@pytest.mark.parametrize("num_channels,cond_channels,layers,kernel,dilation", [
    (6, 4, 3, 5, 2), (5, 0, 2, 3, 1), (1, 3, 2, 3, 1)])
def test_mar_prior_equals_a_straightforward_implementation(
        num_channels: int, cond_channels: int, layers: int, kernel: int, dilation: int) -> None:
    """Forward (μ, log σ), log p, and the gradients of log p w.r.t. every parameter, z and z1
    equal the reference's on random weights (float64); one channel (no recurrence) included."""
    prior = MARPrior(num_channels, cond_channels, hidden_channels=8, num_layers=layers,
                     kernel_size=kernel, dilation=dilation, cond_hidden_channels=8,
                     embed_channels=3)
    perturb_parameters(prior, 0.3, torch.Generator().manual_seed(5))
    prior = prior.double()
    z, cond = _inputs(prior, 3, 7, 6, seed=1)
    z.requires_grad_()
    if cond is not None:
        cond.requires_grad_()
    leaves = [*prior.parameters(), z] + ([cond] if cond is not None else [])
    mean, log_std = prior.mean_and_log_std(z, cond)
    ref_mean, ref_log_std = _reference_mean_and_log_std(prior, z, cond)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(log_std, ref_log_std, rtol=1e-10, atol=1e-10)
    # A weighting that makes every output matter differently (a plain sum would hide errors
    # that cancel across channels).
    wts = torch.randn(mean.shape, generator=torch.Generator().manual_seed(2), dtype=mean.dtype)
    loss = prior.log_prob(z, cond).sum() + (wts * (mean + 2 * log_std)).sum()
    ref_loss = (torch.distributions.Normal(ref_mean, ref_log_std.exp()).log_prob(z).sum()
                + (wts * (ref_mean + 2 * ref_log_std)).sum())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, leaves, allow_unused=True)
    names = [n for n, _ in prior.named_parameters()] + ["z", "cond"]
    for name, got, want in zip(names, grads, ref_grads, strict=False):
        if want is None:
            assert got is None or not got.any(), name
            continue
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("temperature", [0.8, 0.0])
def test_mar_sampler_equals_a_straightforward_ancestral_sampler(temperature: float) -> None:
    """The preallocated fused-conv sampler = re-running the reference density on the channels
    drawn so far and drawing the next one with the same noise."""
    prior = _prior("mar_cond")
    b, h, w = 2, 5, 4
    _, cond = _inputs(prior, b, h, w)
    z = prior.sample(b, h, w, cond, temperature, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    eps = [torch.randn(b, 1, h, w, generator=g, dtype=torch.float64)
           for _ in range(prior.num_channels)]
    ref = torch.zeros_like(z)
    for c in range(prior.num_channels):
        mean, log_std = _reference_mean_and_log_std(prior, ref, cond)
        ref[:, c] = mean[:, c] + temperature * log_std[:, c].exp() * eps[c][:, 0]
    torch.testing.assert_close(z, ref, rtol=1e-10, atol=1e-10)
