"""VQ-VAE, VQ-VAE-2 and MAE: the reconstructor interface, training signal, determinism, and the paper presets' sizes
against the reference implementations' definitions (rosinality/vq-vae-2-pytorch, facebookresearch/mae, and the
VQ-VAE paper's Section 4.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factory.color import bicubic_resize
from factory.config import ConfigError
from factory.models import build_model, get_spec, make_config
from factory.models.mae import MAE, sincos_position_embedding
from factory.models.vqvae import VQVAE, VectorQuantizer
from factory.models.vqvae2 import VQVAE2

MODELS = ("vqvae", "vqvae2", "mae")
CLASSES = {"vqvae": VQVAE, "vqvae2": VQVAE2, "mae": MAE}


@pytest.fixture
def photo_batch(photos) -> torch.Tensor:
    """The astronaut photo at 64x64 with its horizontal mirror: (2, 3, 64, 64) in [0, 1]."""
    image = torch.from_numpy(photos["astronaut"]).permute(2, 0, 1)[None].float() / 255
    small = bicubic_resize(image, (64, 64))
    return torch.cat([small, small.flip(-1)])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [(256, 256), (64, 64), (100, 75)])
def test_reconstruct_keeps_shape_and_range(name, size):
    model = build_model(name, preset="tiny").eval()
    x = torch.rand(1, 3, *size)
    x_hat = model.reconstruct(x)
    assert x_hat.shape == x.shape
    assert x_hat.dtype == x.dtype
    assert torch.isfinite(x_hat).all()
    assert x_hat.min() >= 0 and x_hat.max() <= 1


@pytest.mark.parametrize("name", MODELS)
def test_loss_is_finite_and_reaches_the_first_layer(name, photo_batch):
    model = build_model(name, preset="tiny").train()
    loss, logs = model.loss(photo_batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert logs["loss"] == pytest.approx(loss.item())
    assert all(isinstance(value, float) for value in logs.values())
    loss.backward()
    # The first convolution sits before the quantiser (VQ models): a gradient there shows the straight-through path.
    first = next(module for module in model.modules() if isinstance(module, torch.nn.Conv2d))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_keeps_loss_finite_and_output_dtype(name, photo_batch):
    # The trainer and the build use bf16 autocast on CUDA; CPU autocast exercises the same dtype paths here.
    model = build_model(name, preset="tiny").train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(photo_batch)
        x_hat = model.reconstruct(photo_batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert x_hat.dtype == photo_batch.dtype and x_hat.shape == photo_batch.shape


@pytest.mark.parametrize("name", MODELS)
def test_adam_steps_on_one_photo_lower_the_loss(name, photo_batch):
    model = build_model(name, preset="tiny")

    def evaluation_loss() -> float:
        model.eval()
        torch.manual_seed(1)  # MAE's training mask comes from the global generator: the same mask both times
        with torch.no_grad():
            return model.loss(photo_batch)[0].item()

    before = evaluation_loss()
    # A high learning rate so that tens of steps show it: the VQ models first have to spread their encoder outputs
    # over more than one code before the decoder sees anything but a constant (the mean image).
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        optimiser.zero_grad()
        model.loss(photo_batch)[0].backward()
        optimiser.step()
    after = evaluation_loss()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("name", MODELS)
def test_reconstruct_is_deterministic_for_a_seed(name, photo_batch):
    model = build_model(name, preset="tiny").eval()
    first = model.reconstruct(photo_batch, generator=torch.Generator().manual_seed(7))
    second = model.reconstruct(photo_batch, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(model.reconstruct(photo_batch), model.reconstruct(photo_batch), rtol=0, atol=0)
    other = model.reconstruct(photo_batch, generator=torch.Generator().manual_seed(8))
    assert model.samples == (name == "mae")  # the build records a generator seed exactly then
    if name == "mae":
        assert not torch.equal(first, other)  # the mask is drawn from the generator
    else:
        torch.testing.assert_close(first, other, rtol=0, atol=0)  # nothing is sampled


@pytest.mark.parametrize("name", MODELS)
def test_registry_builds_each_by_name(name):
    spec = get_spec(name)
    assert spec.native_size == {"vqvae": 256, "vqvae2": 256, "mae": 224}[name]
    assert isinstance(build_model(name, preset="tiny"), CLASSES[name])
    config = make_config(name, "tiny", {"codebook_size": 32} if name != "mae" else {"mask_ratio": 0.5})
    assert isinstance(build_model(name, config=config), CLASSES[name])
    with pytest.raises(ConfigError):
        make_config(name, "tiny", {"no_such_field": 1})


def test_invalid_configs_are_config_errors():
    with pytest.raises(ConfigError):
        make_config("mae", "tiny", {"mask_ratio": 1.0})
    with pytest.raises(ConfigError):
        make_config("mae", "tiny", {"encoder_heads": 3})
    with pytest.raises(ConfigError):
        make_config("vqvae2", "tiny", {"ema_decay": 1.5})
    with pytest.raises(ConfigError):
        make_config("vqvae", "tiny", {"codebook_size": 0})


def _conv(kernel: int, inputs: int, outputs: int) -> int:
    return kernel * kernel * inputs * outputs + outputs  # weights + bias (also for transposed convolutions)


def _residual(channels: int, hidden: int) -> int:
    return _conv(3, channels, hidden) + _conv(1, hidden, channels)


def _count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_vqvae_paper_size_matches_the_paper():
    # van den Oord et al. 2017, Section 4.1: two 4x4 stride-2 convolutions, two residual blocks (3x3, 1x1), all 256
    # channels; the decoder mirrors it; plus our 1x1 to D = 64, the 3x3 from D, and the K x D codebook.
    expected = (
        _conv(4, 3, 256)
        + _conv(4, 256, 256)
        + 2 * _residual(256, 256)
        + _conv(1, 256, 64)
        + 512 * 64
        + _conv(3, 64, 256)
        + 2 * _residual(256, 256)
        + _conv(4, 256, 256)
        + _conv(4, 256, 3)
    )
    model = build_model("vqvae", preset="paper")
    assert _count(model) == expected == 4_942_915
    assert model.reconstruct(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_vqvae2_paper_size_matches_rosinality():
    # rosinality/vq-vae-2-pytorch vqvae.py, VQVAE(channel=128, n_res_block=2, n_res_channel=32, embed_dim=64,
    # n_embed=512), layer by layer; its codebooks are buffers, so they are not parameters there either.
    residuals = 2 * _residual(128, 32)
    bottom_encoder = _conv(4, 3, 64) + _conv(4, 64, 128) + _conv(3, 128, 128) + residuals
    top_encoder = _conv(4, 128, 64) + _conv(3, 64, 128) + residuals
    top_decoder = _conv(3, 64, 128) + residuals + _conv(4, 128, 64)
    decoder = _conv(3, 128, 128) + residuals + _conv(4, 128, 64) + _conv(4, 64, 3)
    quantize_convs = _conv(1, 128, 64) + _conv(1, 64 + 128, 64)
    upsample_top = _conv(4, 64, 64)
    expected = bottom_encoder + top_encoder + top_decoder + decoder + quantize_convs + upsample_top
    model = build_model("vqvae2", preset="paper")
    assert _count(model) == expected == 1_388_867
    codebooks = [buffer for name, buffer in model.named_buffers() if name.endswith(".codebook")]
    assert [tuple(codebook.shape) for codebook in codebooks] == [(512, 64), (512, 64)]


def test_mae_paper_size_matches_mae_vit_base_patch16_dec512d8b():
    # facebookresearch/mae models_mae.py with timm's Block (qkv + proj, MLP ratio 4, two LayerNorms): 12 d^2 + 13 d.
    def block(dim: int) -> int:
        return 12 * dim * dim + 13 * dim

    encoder = (
        _conv(16, 3, 768) + 768 + 12 * block(768) + 2 * 768
    )  # patch embedding, class token, blocks, norm
    decoder = (
        (768 * 512 + 512) + 512 + 8 * block(512) + 2 * 512 + (512 * 768 + 768)
    )  # embed, mask token, ..., pred
    fixed_positions = 197 * 768 + 197 * 512  # frozen nn.Parameters in the reference, buffers here
    model = build_model("mae", preset="paper")
    assert _count(model) == encoder + decoder
    assert encoder + decoder + fixed_positions == 111_907_840  # the reference's "111.9M"


def test_sincos_position_embedding_matches_mae_definition():
    # MAE util/pos_embed.py, get_2d_sincos_pos_embed(768, 14) without the class token, transcribed in NumPy.
    def one_dimensional(dim: int, positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(
        np.meshgrid(np.arange(14, dtype=np.float32), np.arange(14, dtype=np.float32))
    )  # w goes first
    reference = np.concatenate([one_dimensional(384, grid[0]), one_dimensional(384, grid[1])], axis=1)
    np.testing.assert_allclose(sincos_position_embedding(768, 14, 14).numpy(), reference, atol=1e-6)
    assert sincos_position_embedding(64, 3, 5).shape == (15, 64)


def test_mae_loss_covers_every_patch(photo_batch):
    # The paper reconstructs the entire image: the loss is the patch-count-weighted mean of masked and visible.
    model = build_model("mae", preset="tiny")
    loss, logs = model.loss(photo_batch)
    patches = 2 * (64 // 8) ** 2
    masked = 2 * ((64 // 8) ** 2 - int((64 // 8) ** 2 * 0.25))
    expected = (logs["masked"] * masked + logs["visible"] * (patches - masked)) / patches
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)


def test_quantiser_picks_the_nearest_codebook_vector():
    quantizer = VectorQuantizer(codebook_size=16, embedding_dim=4, commitment_weight=0.25, ema_decay=None)
    z = torch.randn(2, 4, 3, 5) * 0.1
    quantized = quantizer(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(flat, quantizer.codebook.detach()).argmin(
        dim=1
    )  # brute force, torch's own distance
    assert torch.equal(quantized.codes.reshape(-1), nearest)
    torch.testing.assert_close(
        quantized.latents.permute(0, 2, 3, 1).reshape(-1, 4), quantizer.codebook[nearest]
    )


def test_moving_average_codebook_changes_only_in_training_loss(photo_batch):
    model = build_model("vqvae2", preset="tiny").train()
    before = model.top_quantizer.codebook.clone()
    model.reconstruct(photo_batch)  # even in training mode, reconstruction leaves the model as it was
    assert torch.equal(model.top_quantizer.codebook, before)
    model.loss(photo_batch)
    assert not torch.equal(model.top_quantizer.codebook, before)


def rosinality_ema_step(codebook, cluster_size, codebook_sum, flat, decay=0.99, eps=1e-5):
    """rosinality/vq-vae-2-pytorch `Quantize.forward`'s training update, written out from its definition (K x D
    layout here): nearest codes, N <- decay N + (1 - decay) n, m <- decay m + (1 - decay) sum z, e = m / smoothed N."""
    codes = torch.cdist(flat, codebook).argmin(dim=1)
    one_hot = torch.nn.functional.one_hot(codes, len(codebook)).double()
    cluster_size = decay * cluster_size + (1 - decay) * one_hot.sum(0)
    codebook_sum = decay * codebook_sum + (1 - decay) * one_hot.t() @ flat
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + len(codebook) * eps) * total
    return codebook_sum / smoothed[:, None], cluster_size, codebook_sum


def test_moving_average_update_is_rosinalitys():
    """Without restarts the codebook follows the reference's update exactly (its ones-initialised cluster sizes)."""
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 4, 0.25, ema_decay=0.99).double()
    expected = (quantizer.codebook.clone(), quantizer.cluster_size.clone(), quantizer.codebook_sum.clone())
    assert torch.equal(
        expected[1], torch.ones(8)
    )  # rosinality: register_buffer("cluster_size", torch.ones(n_embed))
    for _ in range(3):
        z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
        flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
        expected = rosinality_ema_step(*expected, flat)
        quantizer(z, update_codebook=True)
    torch.testing.assert_close(quantizer.codebook.double(), expected[0])
    torch.testing.assert_close(quantizer.cluster_size.double(), expected[1])


def test_dead_codes_restart_at_encoder_outputs_and_the_paper_preset_keeps_none():
    """Jukebox's random restarts: a code whose moving-average use falls below the threshold moves onto one of the
    batch's encoder outputs, with a fresh average (N = 1, m = e); used codes follow the reference update."""
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, 0.25, ema_decay=0.99, dead_code_threshold=0.995)
    z = torch.randn(1, 4, 2, 2) * 0.01  # four outputs near the origin: a handful of codes win, the rest decay
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    used = torch.cdist(flat, quantizer.codebook).argmin(dim=1).unique()
    quantizer(z, update_codebook=True)
    dead = torch.ones(16, dtype=torch.bool)
    dead[used] = False
    assert dead.any()
    for code in dead.nonzero().flatten().tolist():
        assert any(
            torch.equal(quantizer.codebook[code], row) for row in flat
        )  # restarted at an encoder output
        assert quantizer.cluster_size[code] == 1.0
        assert torch.equal(quantizer.codebook_sum[code], quantizer.codebook[code])
    assert (quantizer.cluster_size[used] > 0.995).all()
    # The paper preset is the reference's (no restarts); `embedded` restarts, which the build's default trains.
    assert make_config("vqvae2", "paper").dead_code_threshold is None
    assert make_config("vqvae2", "embedded").dead_code_threshold == 1.0
    with pytest.raises(ConfigError, match="moving-average"):
        make_config("vqvae", "paper", {"dead_code_threshold": 1.0})


def test_embedded_preset_keeps_its_codebooks_in_use(photo_batch):
    """The collapse the restarts fix: 40 Adam steps on a photo leave the reference's bottom codebook on a handful of
    codes, the embedded preset's on many (perplexity: exp of the entropy of code use in the batch)."""
    perplexities = {}
    for preset in ("paper", "embedded"):
        torch.manual_seed(0)
        model = build_model(
            "vqvae2", config=make_config("vqvae2", preset, {"channels": 32, "codebook_size": 64})
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(40):
            loss, logs = model.loss(photo_batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        perplexities[preset] = logs["perplexity_bottom"]
    assert perplexities["paper"] < 4 and perplexities["embedded"] > 2 * perplexities["paper"]
