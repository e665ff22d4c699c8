"""VanillaVAE and DDIM: shapes and range at any size, determinism, training signal, paper sizes, and DDIM's
sampler and inversion checked against the closed-form optimal noise predictor for Gaussian data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from factory.models import build_model, make_config
from factory.models.ddim import DDIM
from factory.models.vae import VAE

# Small overrides so each reconstruct call takes well under a second on one core.
FAST = {"vae": {}, "ddim": {"sampling_steps": 2}}


def fast_model(name: str) -> nn.Module:
    return build_model(name, config=make_config(name, "tiny", FAST[name])).eval()


@pytest.mark.parametrize("name", ["vae", "ddim"])
@pytest.mark.parametrize("size", [(256, 256), (64, 64), (37, 53), (16, 16)])
def test_reconstruct_keeps_shape_and_range(name, size):
    model = fast_model(name)
    x = torch.rand(2, 3, *size)
    x_hat = model.reconstruct(x, generator=torch.Generator().manual_seed(0))
    assert x_hat.shape == x.shape
    assert x_hat.dtype == torch.float32
    assert torch.isfinite(x_hat).all() and x_hat.min() >= 0 and x_hat.max() <= 1


@pytest.mark.parametrize(
    "name, overrides, samples",
    [
        ("vae", {}, False),
        ("vae", {"sample_posterior": True}, True),
        ("ddim", {}, True),  # the default encoding noises the input (the paper's reverse process)
        ("ddim", {"encoding": "inversion"}, False),
    ],
)
def test_reconstruct_is_deterministic_for_a_generator(name, overrides, samples):
    model = build_model(name, config=make_config(name, "tiny", {**FAST[name], **overrides})).eval()
    with (
        torch.no_grad()
    ):  # move the weights off their (near-identity) initialisation so outputs depend on them
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    x = torch.rand(1, 3, 64, 64)
    first = model.reconstruct(x, generator=torch.Generator().manual_seed(3))
    second = model.reconstruct(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    other = model.reconstruct(x, generator=torch.Generator().manual_seed(4))
    assert model.samples == samples  # the build records a generator seed exactly then
    if samples:  # sampling variants must actually use the generator
        assert not torch.equal(first, other)
    else:  # posterior mean / DDIM inversion ignore it
        assert torch.equal(first, other)


@pytest.mark.parametrize("name", ["vae", "ddim"])
def test_loss_backpropagates_and_falls(name):
    torch.manual_seed(0)
    model = build_model(name, "tiny").train()
    x = torch.rand(4, 3, 64, 64) * 0.5 + 0.25
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        torch.manual_seed(1)  # the same noise / timesteps every step, so the losses are comparable
        loss, logs = model.loss(x)
        assert loss.ndim == 0 and all(isinstance(value, float) for value in logs.values())
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["vae", "ddim"])
def test_bf16_autocast_keeps_loss_float32_and_output_dtype(name):
    # Training and the build use bf16 autocast on CUDA; CPU autocast exercises the same dtype paths here.
    model = fast_model(name)
    x = torch.rand(2, 3, 64, 64)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss, _ = model.train().loss(x)
        x_hat = model.eval().reconstruct(x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert x_hat.dtype == x.dtype and x_hat.shape == x.shape


def test_paper_parameter_counts():
    # AntixK/PyTorch-VAE VanillaVAE (64x64, 32..512, latent 128): 3.94 M by the layer shapes in its vanilla_vae.py.
    vae = sum(p.numel() for p in VAE(make_config("vae", "paper")).parameters())
    assert 3.9e6 < vae < 4.0e6
    # DDPM's 256x256 U-Net (LSUN / CelebA-HQ): 114 M parameters (Ho et al. 2020, Appendix B).
    ddim = sum(p.numel() for p in DDIM(make_config("ddim", "paper")).parameters())
    assert 113e6 < ddim < 115e6


def test_vae_paper_preset_shapes_at_native_size():
    model = VAE(make_config("vae", "paper")).eval()
    mean, log_variance = model.encode(torch.rand(1, 3, 64, 64))
    assert mean.shape == log_variance.shape == (1, 128)
    assert model.decode(mean).shape == (1, 3, 64, 64)


def test_vae_tiles_a_large_input_at_native_scale():
    """A 256x256 input is reconstructed tile by tile: a tile that lies entirely inside the image and is covered by
    no other tile's ramp gives exactly the single-tile reconstruction there (no resize blur)."""
    model = build_model("vae", config=make_config("vae", "tiny", {"tile_overlap": 0})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    x = torch.rand(1, 3, 256, 256)
    whole = model.reconstruct(x)
    tile = model.reconstruct(x[:, :, 64:128, 128:192])
    torch.testing.assert_close(whole[:, :, 64:128, 128:192], tile)


def test_vae_tile_blending_is_seamless_for_a_constant_model():
    """If every tile's reconstruction is the input itself, blending must return the input exactly."""
    model = build_model("vae", "tiny").eval()
    model._reconstruct_tiles = lambda tiles, generator: tiles
    x = torch.rand(1, 3, 150, 211)
    torch.testing.assert_close(model.reconstruct(x), x)


def test_ddim_schedule_matches_ddpm():
    # DDPM (Ho et al. 2020, Section 4): T = 1000, beta linear from 1e-4 to 0.02, chosen so that x_T is almost pure
    # noise: abar_T = prod_t (1 - beta_t) = 4.036e-5 (a product computed independently, in float64 by hand).
    model = build_model("ddim", "tiny")
    assert model.alphas_cumprod.shape == (1000,)
    assert model.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    assert model.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)
    assert model.timesteps()[:3] == [0, 100, 200] and len(model.timesteps()) == 10


class GaussianOptimalNoise(nn.Module):
    """The exact e_theta for data x_0 ~ N(mu, sigma^2 I): x_t ~ N(sqrt(a) mu, (a sigma^2 + 1 - a) I), so
    E[e | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a sigma^2 + 1 - a), with a = abar_t."""

    def __init__(self, alphas_cumprod: torch.Tensor, mean: float, std: float) -> None:
        super().__init__()
        self.alphas_cumprod, self.mean, self.std = alphas_cumprod, mean, std

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t][:, None, None, None]
        return (1 - a).sqrt() * (x - a.sqrt() * self.mean) / (a * self.std**2 + 1 - a)


def test_ddim_with_the_exact_noise_predictor_samples_the_data_distribution():
    model = build_model(
        "ddim", config=make_config("ddim", "tiny", {"sampling_steps": 100, "clip_denoised": False})
    )
    mean, std = 0.2, 0.3
    model.unet = GaussianOptimalNoise(model.alphas_cumprod, mean, std)
    noise = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    samples = model.sample(noise)
    assert samples.mean().item() == pytest.approx(mean, abs=0.02)
    assert samples.std().item() == pytest.approx(std, rel=0.05)


def test_ddim_inversion_then_sampling_reconstructs_with_the_exact_noise_predictor():
    # DDIM paper, Section 5.4: with a good e_theta, encoding by the DDIM ODE and decoding returns the input.
    settings = {"sampling_steps": 100, "clip_denoised": False, "encoding": "inversion"}
    model = build_model("ddim", config=make_config("ddim", "tiny", settings))
    model.unet = GaussianOptimalNoise(model.alphas_cumprod, 0.0, 0.5)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x_hat = model.reconstruct(x)
    assert (x_hat - x).abs().max().item() < 0.05
    # ...and the error shrinks with more steps (a wrong index or sign in either direction would not).
    model_10 = build_model("ddim", config=make_config("ddim", "tiny", {**settings, "sampling_steps": 10}))
    model_10.unet = model.unet
    assert (model_10.reconstruct(x) - x).abs().mean() > 2 * (x_hat - x).abs().mean()
    # The encoding is a Gaussian-like latent: x_T has about unit variance.
    assert model.invert(x * 2 - 1).std().item() == pytest.approx(1.0, abs=0.3)


def test_ddim_pads_to_its_downsampling_factor():
    model = fast_model("ddim")
    assert model.size_multiple == 8
    seen = []
    original = model.unet.forward
    model.unet.forward = lambda x, t: seen.append(tuple(x.shape[-2:])) or original(x, t)
    model.reconstruct(torch.rand(1, 3, 37, 53))
    assert set(seen) == {(40, 56)}


class ZeroNoise(nn.Module):
    """An e_theta that predicts no noise at all: the limit of a barely trained network."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_the_default_encoding_hands_the_reverse_process_real_noise_which_inversion_does_not():
    """Why the default is "noise" (the paper, Section 3.2: DDIM fails through "instability in noise removal during the
    reverse process"): with an e_theta that removes nothing, DDIM inversion and decoding cancel exactly and return the
    input, whereas the noised input comes back as noise."""
    settings = {"sampling_steps": 20, "clip_denoised": False}
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    inverting = build_model("ddim", config=make_config("ddim", "tiny", {**settings, "encoding": "inversion"}))
    noising = build_model("ddim", config=make_config("ddim", "tiny", settings))
    assert noising.config.encoding == "noise"
    inverting.unet = noising.unet = ZeroNoise()
    assert (inverting.reconstruct(x) - x).abs().max().item() < 1e-4
    assert (noising.reconstruct(x, generator=torch.Generator().manual_seed(0)) - x).abs().mean().item() > 0.2
