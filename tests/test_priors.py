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
    state, stepped = None, []
    for t in range(x_seq.shape[0]):
        top, state = lstm.step(x_seq[t], state)
        stepped.append(top)
    torch.testing.assert_close(outs, torch.stack(stepped), rtol=1e-12, atol=1e-12)
    assert outs.shape == (6, 2, 8, 7, 9)
