"""`factory train`: every registry model trains (tiny preset), checkpoints reload and reproduce, interrupted
training resumes to the same result, and bad input is a one-line error that leaves no checkpoint behind."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from factory.checkpoints import checkpoint_path, load_reconstructor, read_checkpoint, strip_checkpoint
from factory.cli import main
from factory.config import FactoryError
from factory.models import MODEL_NAMES, PAPER_EPOCH_SIZE, build_model, get_spec
from factory.regime import measure_regime, regime_images
from factory.train import (
    TrainConfig,
    epoch_order,
    list_training_images,
    plan_run,
    prepare_sample,
    split_heldout,
    train,
)


def tiny_run(name: str, data: Path, checkpoints: Path, **changes) -> TrainConfig:
    """Seconds on one core: 64x64 crops, 8 samples per epoch, batch 4 (2 steps per epoch)."""
    settings = dict(
        model=name,
        data=(str(data),),
        epochs=2,
        save_at=(1, 2),
        epoch_size=8,
        image_size=64,
        batch_size=4,
        lr=1e-3,  # one rate that moves every tiny model within 4 steps (the reference rates are for long runs)
        preset="tiny",
        checkpoints=str(checkpoints),
        workers=0,
        progress=False,
        regime_size=64,  # the regime of each saved epoch on 64x64 LR images: fast for every tiny model
    )
    settings.update(changes)
    return TrainConfig(**settings)


def fast_reconstructor(model: torch.nn.Module) -> torch.nn.Module:
    """DDIM with 2 sampling steps instead of the preset's 10, so a 256x256 call stays under a second."""
    if hasattr(model.config, "sampling_steps"):
        model.config = dataclasses.replace(model.config, sampling_steps=2)
    return model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tiny_model_trains_two_epochs_and_checkpoints_reproduce(name, photo_folder, tmp_path):
    result = train(tiny_run(name, photo_folder, tmp_path / "checkpoints"))
    assert result.final_loss < result.initial_loss
    assert (result.start_epoch, result.end_epoch, result.steps) == (0, 2, 4)
    paths = [checkpoint_path(tmp_path / "checkpoints", name, epoch) for epoch in (1, 2)]
    assert result.checkpoints == paths and all(path.is_file() for path in paths)

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    first = load_reconstructor(paths[1], model_name=name)
    second = load_reconstructor(paths[1], model_name=name)
    assert (first.epoch, first.steps, first.preset) == (2, 4, "tiny")
    output = first.model.reconstruct(x, generator=torch.Generator().manual_seed(5))
    again = second.model.reconstruct(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(output, again)
    # Epoch 1 is another model: its reconstruction differs from epoch 2's.
    earlier = load_reconstructor(paths[0], model_name=name).model.reconstruct(
        x, generator=torch.Generator().manual_seed(5)
    )
    assert not torch.equal(earlier, output)
    for size in (64, 256):
        big = torch.rand(1, 3, size, size)
        x_hat = fast_reconstructor(first.model).reconstruct(big, generator=torch.Generator().manual_seed(0))
        assert x_hat.shape == big.shape and x_hat.min() >= 0 and x_hat.max() <= 1


@pytest.mark.parametrize("name", ["vae", "vqvae2"])
def test_interrupted_training_resumes_to_the_uninterrupted_result(name, photo_folder, tmp_path):
    straight = train(tiny_run(name, photo_folder, tmp_path / "straight"))
    # "Interrupted" after epoch 1: the first call stops there; the restart asks for the full run.
    first = train(tiny_run(name, photo_folder, tmp_path / "resumed", epochs=1, save_at=(1,)))
    assert first.end_epoch == 1
    resumed = train(tiny_run(name, photo_folder, tmp_path / "resumed"))
    assert resumed.start_epoch == 1 and resumed.end_epoch == 2
    assert resumed.checkpoints == [checkpoint_path(tmp_path / "resumed", name, 2)]
    assert resumed.existing == [checkpoint_path(tmp_path / "resumed", name, 1)]
    # It started from epoch 1's state: its loss before training is epoch 1's loss.
    assert resumed.initial_loss == pytest.approx(first.final_loss)
    a = read_checkpoint(checkpoint_path(tmp_path / "straight", name, 2))
    b = read_checkpoint(checkpoint_path(tmp_path / "resumed", name, 2))
    assert a["steps"] == b["steps"] == straight.steps
    assert a["weights"].keys() == b["weights"].keys()
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
    assert resumed.final_loss == straight.final_loss
    # A third call has nothing left to do and rewrites nothing.
    before = checkpoint_path(tmp_path / "resumed", name, 2).stat().st_mtime_ns
    again = train(tiny_run(name, photo_folder, tmp_path / "resumed"))
    assert again.checkpoints == [] and again.start_epoch == 2
    assert checkpoint_path(tmp_path / "resumed", name, 2).stat().st_mtime_ns == before


def test_a_checkpoint_without_optimiser_state_is_not_resumed_from(photo_folder, tmp_path):
    """A checkpoint without optimiser state (as the package ships them) is kept as the run's epoch 1, but the run
    to epoch 2 starts from scratch rather than from it with fresh Adam moments, and ends where an uninterrupted
    run does."""
    straight = train(tiny_run("vqvae", photo_folder, tmp_path / "straight"))
    train(tiny_run("vqvae", photo_folder, tmp_path / "shipped", epochs=1, save_at=(1,)))
    first = checkpoint_path(tmp_path / "shipped", "vqvae", 1)
    strip_checkpoint(first, first)  # as the shipped checkpoints are
    assert "optimizer" not in read_checkpoint(first)
    again = train(tiny_run("vqvae", photo_folder, tmp_path / "shipped"))
    assert again.start_epoch == 0 and again.existing == [first] and again.steps == straight.steps
    a = read_checkpoint(checkpoint_path(tmp_path / "straight", "vqvae", 2))["weights"]
    b = read_checkpoint(checkpoint_path(tmp_path / "shipped", "vqvae", 2))["weights"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_shipped_checkpoint_is_the_embedded_default_run_and_its_regime_recomputes():
    """The VQ-VAE-2 epoch-8 checkpoint shipped with the package (SHIPPED_CHECKPOINTS) is the run the build's
    embedded default trains: same model config, recipe, epoch size, seed and photos (so changing any of
    EMBEDDED_DEFAULT_* without retraining it fails here). It holds no optimiser state, and its recorded regime is
    what its weights measure on the same photos."""
    from factory.sources import list_sources
    from factory.train import (
        EMBEDDED_DEFAULT_RECIPE,
        EMBEDDED_DEFAULT_STEPS_PER_EPOCH,
        SHIPPED_CHECKPOINTS,
        shipped_checkpoint,
        training_for_build,
    )

    photos = [source.path for source in list_sources().files]
    config = training_for_build(
        model="vqvae2", epoch=8, checkpoints="unused", data=photos, embedded_default_lr_size=64
    )
    shipped = shipped_checkpoint(config)
    assert shipped == SHIPPED_CHECKPOINTS / "vqvae2" / "epoch-8.pt"
    payload = read_checkpoint(shipped)
    assert "optimizer" not in payload and "rng" not in payload
    assert payload["steps"] == 8 * EMBEDDED_DEFAULT_STEPS_PER_EPOCH
    assert payload["training"]["samples_seen"] == payload["steps"] * EMBEDDED_DEFAULT_RECIPE.batch_size
    loaded = load_reconstructor(shipped, model_name="vqvae2")
    plan = plan_run(config)
    images = regime_images(plan.heldout, config.regime_size, config.regime_scale)
    recomputed = measure_regime(loaded.model, images, seed=config.seed)
    for key in ("psnr", "ssim", "delta_e", "checkerboard", "delta_b"):
        assert loaded.regime[key] == pytest.approx(recomputed[key], abs=1e-3), key


def test_results_do_not_depend_on_worker_processes(photo_folder, tmp_path):
    in_process = train(tiny_run("vae", photo_folder, tmp_path / "a", epochs=1, save_at=(1,), workers=0))
    with_workers = train(tiny_run("vae", photo_folder, tmp_path / "b", epochs=1, save_at=(1,), workers=2))
    a = read_checkpoint(in_process.checkpoints[0])["weights"]
    b = read_checkpoint(with_workers.checkpoints[0])["weights"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_another_run_in_the_checkpoint_folder_is_refused(photo_folder, tmp_path):
    train(tiny_run("vae", photo_folder, tmp_path, epochs=1, save_at=(1,)))
    with pytest.raises(FactoryError, match=r"another training run \(seed 0 vs 1\)"):
        train(tiny_run("vae", photo_folder, tmp_path, epochs=1, save_at=(1,), seed=1))


def test_unreadable_images_are_skipped_and_counted(photo_folder, tmp_path, caplog):
    (photo_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (photo_folder / "nested" / "empty.jpg").write_bytes(b"")
    result = train(tiny_run("vae", photo_folder, tmp_path, epochs=1, save_at=(1,), epoch_size=16))
    assert result.files == 8
    # Each epoch visits every file at least once (epoch size 16 >= 8 files), so both bad ones were replaced.
    assert result.skipped_images >= 2
    assert "unreadable" in caplog.text


def test_tiny_imagenet_layout_and_epoch_order(tmp_path, photos):
    image = photos["astronaut"][:64, :64]
    for wnid in ("n01443537", "n01629819"):
        folder = tmp_path / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for index in range(3):
            Image.fromarray(image).save(folder / f"{wnid}_{index}.JPEG")
        (tmp_path / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    files, fingerprint = list_training_images([tmp_path / "train"])
    assert len(files) == 6 and all(path.suffix == ".JPEG" for path in files)
    assert files == sorted(files)
    assert list_training_images([tmp_path / "train"])[1] == fingerprint
    # An epoch of 15 samples from 6 files: whole permutations, each file used 2 or 3 times.
    order = epoch_order(6, 15, seed=0, epoch=1)
    assert len(order) == 15 and sorted(order[:6]) == list(range(6)) and sorted(order[6:12]) == list(range(6))
    assert not np.array_equal(order, epoch_order(6, 15, seed=0, epoch=2))


def run_cli(*arguments: str):
    return CliRunner().invoke(main, list(arguments))


def assert_one_line_error(result, checkpoints: Path, *fragments: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]
    assert not checkpoints.exists() or not any(checkpoints.rglob("*"))


def test_cli_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, photo_folder):
    checkpoints = tmp_path / "checkpoints"
    common = ["--epochs", "1", "--preset", "tiny", "--image-size", "64", "--checkpoints", str(checkpoints)]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(
        run_cli("train", "--model", "vae", "--data", str(empty), *common), checkpoints, "no image"
    )

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(b"not a png")
    (corrupt / "b.jpg").write_bytes(b"")
    jpeg = photo_folder / "astronaut.jpg"
    (corrupt / "c.jpg").write_bytes(jpeg.read_bytes()[:200])  # truncated in the header
    (corrupt / "notes.txt").write_text("not an image")
    result = run_cli("train", "--model", "vae", "--data", str(corrupt), *common)
    assert_one_line_error(result, checkpoints, "no usable image among 3")

    result = run_cli("train", "--model", "resnet", "--data", str(photo_folder), *common)
    assert_one_line_error(result, checkpoints, "unknown model 'resnet'", "vqvae2")

    result = run_cli("train", "--model", "vae", "--data", str(photo_folder), *common, "--save-at", "1,4")
    assert_one_line_error(result, checkpoints, "--save-at 4 is beyond --epochs 1")

    missing = tmp_path / "nowhere"
    assert_one_line_error(
        run_cli("train", "--model", "vae", "--data", str(missing), *common), checkpoints, "not found"
    )


@pytest.mark.parametrize(
    "name, message",
    [
        ("vqvae", "--image-size 50 must be a multiple of 4 for vqvae (e.g. 48)"),
        ("vqvae2", "--image-size 50 must be a multiple of 8 for vqvae2 (e.g. 48)"),
        ("mae", "--image-size 50 must be a multiple of 8 for mae (e.g. 48)"),  # tiny preset: 8-pixel patches
        ("vae", "VAEConfig: image_size 50 not divisible by 2**3"),
        ("ddim", "--image-size 50 must be a multiple of 8 for ddim (e.g. 48)"),
    ],
)
def test_an_image_size_the_model_cannot_take_is_a_one_line_error(tmp_path, photo_folder, name, message):
    checkpoints = tmp_path / "checkpoints"
    arguments = ["--epochs", "1", "--preset", "tiny", "--image-size", "50", "--checkpoints", str(checkpoints)]
    result = run_cli("train", "--model", name, "--data", str(photo_folder), *arguments)
    assert_one_line_error(result, checkpoints, message)


def test_cli_trains_and_reports(photo_folder, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    result = run_cli(
        "train",
        "--model",
        "vae",
        "--data",
        str(photo_folder),
        "--epochs",
        "1",
        "--epoch-size",
        "4",
        "--batch-size",
        "4",
        "--image-size",
        "64",
        "--preset",
        "tiny",
        "--checkpoints",
        str(checkpoints),
        "--workers",
        "0",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {checkpoint_path(checkpoints, 'vae', 1)}" in result.stdout
    assert "images/s" in result.stdout


def test_help_describes_every_option():
    top = run_cli("--help")
    assert top.exit_code == 0 and "train" in top.output
    result = run_cli("train", "--help")
    assert result.exit_code == 0
    command = main.commands["train"]
    for parameter in command.params:
        assert parameter.help, f"{parameter.name} has no help text"
        for option in parameter.opts:
            assert option in result.output, option
    for option in (
        "--model",
        "--data",
        "--epochs",
        "--save-at",
        "--epoch-size",
        "--image-size",
        "--batch-size",
        "--lr",
        "--preset",
        "--checkpoints",
        "--seed",
        "--device",
        "--workers",
    ):
        assert option in result.output


def test_decoded_images_cache_is_bounded_by_bytes_and_least_recently_used(tmp_path):
    """Plain LRU semantics, checked by hand: three 3 KB images into a 7 KB cache keep the two most recent ones."""
    from PIL import Image

    from factory.train import DecodedImages

    paths = []
    for index in range(3):
        path = tmp_path / f"{index}.png"
        Image.fromarray(np.full((32, 32, 3), index, np.uint8)).save(path)
        paths.append(path)
    cache = DecodedImages(max_bytes=7 * 1024)
    first = cache.load(paths[0])
    assert cache.load(paths[0]) is first  # a hit returns the decoded array itself
    cache.load(paths[1])
    cache.load(paths[0])  # 0 becomes the most recent
    cache.load(paths[2])  # 3 x 3,072 bytes > 7 KiB: the least recent (1) goes
    assert list(cache.images) == [(str(paths[0]), 1), (str(paths[2]), 1)] and cache.bytes == 2 * 32 * 32 * 3
    assert int(cache.load(paths[1])[0, 0, 0]) == 1
    # Downscaled (the embedded default's LR-scale crops) is another entry: the project's bicubic, quantised.
    assert cache.load(paths[2], downscale=4).shape == (8, 8, 3) and (str(paths[2]), 4) in cache.images


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_defaults_are_the_papers_epoch_and_the_reference_recipe(name, photo_folder):
    """With no overrides an epoch is the paper's 45,000 Tiny-ImageNet samples (Section 3.2), whatever the folder
    holds, and batch, learning rate and optimiser are the model's reference recipe (its module's RECIPE)."""
    plan = plan_run(TrainConfig(model=name, data=(str(photo_folder),)))
    recipe = get_spec(name).recipe
    assert plan.epoch_size == PAPER_EPOCH_SIZE == 45_000
    assert (plan.batch_size, plan.lr) == (recipe.batch_size, recipe.lr)
    assert plan.image_size == get_spec(name).native_size
    expected = {
        "vqvae": (128, 2e-4),
        "vqvae2": (128, 3e-4),
        "mae": (64, 3.75e-5),
        "vae": (64, 5e-3),
        "ddim": (64, 2e-5),
    }
    assert (recipe.batch_size, recipe.lr) == expected[name]
    overridden = plan_run(
        TrainConfig(model=name, data=(str(photo_folder),), epoch_size=100, batch_size=8, lr=1e-3)
    )
    assert (overridden.epoch_size, overridden.batch_size, overridden.lr) == (100, 8, 1e-3)


def test_the_model_spec_owns_its_optimiser():
    """MAE's recipe: AdamW, betas (0.9, 0.95), weight decay 0.05 on the weights but not on biases and norms (1-d
    parameters, timm's add_weight_decay); `lr` overrides the recipe's rate and `recipe` the whole recipe."""
    spec = get_spec("mae")
    model = build_model("mae", preset="tiny")
    optimizer = spec.configure_optimizer(model)
    decayed, plain = optimizer.param_groups
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.05, 0.0)
    assert {id(p) for p in decayed["params"]} == {id(p) for p in model.parameters() if p.ndim > 1}
    assert {id(p) for p in plain["params"]} == {id(p) for p in model.parameters() if p.ndim <= 1}
    assert all(
        group["betas"] == (0.9, 0.95) and group["lr"] == spec.recipe.lr for group in optimizer.param_groups
    )
    assert {group["lr"] for group in spec.configure_optimizer(model, lr=1e-3).param_groups} == {1e-3}
    other = dataclasses.replace(spec.recipe, weight_decay=0.0, betas=(0.5, 0.9))
    assert {
        (g["weight_decay"], g["betas"]) for g in spec.configure_optimizer(model, recipe=other).param_groups
    } == {(0.0, (0.5, 0.9))}


def test_a_recipe_without_weight_decay_steps_exactly_as_torch_adam():
    """VQ-VAE-2's reference optimiser is Adam (rosinality's train_vqvae.py): the spec's AdamW at weight decay 0 takes
    the very steps torch.optim.Adam takes."""
    torch.manual_seed(0)
    ours, reference = build_model("vqvae2", preset="tiny"), build_model("vqvae2", preset="tiny")
    reference.load_state_dict(ours.state_dict())
    optimizers = (
        get_spec("vqvae2").configure_optimizer(ours),
        torch.optim.Adam(reference.parameters(), lr=get_spec("vqvae2").recipe.lr),
    )
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for model, optimizer in zip((ours, reference), optimizers, strict=True):
        for _ in range(2):
            torch.manual_seed(2)
            loss, _ = model.loss(x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-7)


def test_the_input_pipeline_upscales_tiny_imagenet_images_as_the_reference(photos):
    """rosinality's Resize(256) + CenterCrop(256) on a 64x64 image is a 4x bilinear upscale (torchvision's default,
    antialiased): VQ-VAE-2's recipe gives exactly torch's bilinear interpolation of the image."""
    image = np.ascontiguousarray(photos["astronaut"][::8, ::8][:64, :64])
    recipe = get_spec("vqvae2").recipe
    sample = prepare_sample(image, 256, recipe, np.random.default_rng(0))
    x = torch.tensor(image).permute(2, 0, 1)[None].float() / 255
    expected = torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear", antialias=True)[0].clamp(
        0, 1
    )
    assert sample.shape == (3, 256, 256) and torch.equal(sample, expected)
    # MAE's RandomResizedCrop: a 224 square, a crop drawn per sample.
    mae = get_spec("mae").recipe
    first = prepare_sample(photos["coffee"], 224, mae, np.random.default_rng(1))
    second = prepare_sample(photos["coffee"], 224, mae, np.random.default_rng(2))
    assert first.shape == second.shape == (3, 224, 224) and not torch.equal(first, second)


def test_heldout_split_is_left_out_of_training(tmp_path):
    files = [tmp_path / f"{index:03d}.png" for index in range(100)]
    training, heldout = split_heldout(files, 64)
    assert len(heldout) == 10 and not set(heldout) & set(training) and len(training) == 90
    assert split_heldout(files[:9], 64) == (files[:9], [])


def test_checkpoint_regime_equals_a_recomputation_from_its_weights(photo_folder, tmp_path):
    """The regime stored with a checkpoint is what factory.regime measures with the checkpoint's own weights on the
    same images; the summary prints it and every checkpoint records its training (samples seen, batch, lr)."""
    config = tiny_run("vqvae2", photo_folder, tmp_path / "checkpoints")
    result = train(config)
    plan = plan_run(config)
    images = regime_images(plan.heldout, config.regime_size, config.regime_scale)
    for epoch in (1, 2):
        loaded = load_reconstructor(checkpoint_path(tmp_path / "checkpoints", "vqvae2", epoch))
        stored = loaded.regime
        assert stored["split"] == "training" and stored["size"] == 64 and stored["images"] == len(images) > 0
        recomputed = measure_regime(loaded.model, images, seed=config.seed)
        for key in ("psnr", "ssim", "delta_e", "checkerboard", "delta_b"):
            assert stored[key] == pytest.approx(recomputed[key], abs=1e-4), key
        assert loaded.training["samples_seen"] == epoch * 8
        assert (loaded.training["batch_size"], loaded.training["lr"]) == (4, 1e-3)
        assert result.regimes[epoch]["psnr"] == stored["psnr"]
    assert any(line.startswith("epoch 2 regime: PSNR") for line in result.summary_lines())


def test_figure_3_preview_has_one_column_per_saved_epoch(photo_folder, tmp_path):
    from PIL import Image as PILImage

    from factory.preview import MARGIN

    train(
        tiny_run("vqvae", photo_folder, tmp_path / "checkpoints", epochs=3, save_at=(1, 2, 3), epoch_size=4)
    )
    out = tmp_path / "figure3.png"
    result = run_cli(
        "preview",
        "--checkpoints",
        str(tmp_path / "checkpoints"),
        "--model",
        "vqvae",
        "--images",
        str(photo_folder),
        "--n",
        "2",
        "--size",
        "32",
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "2 images x 3 epochs of vqvae" in result.output
    sheet = PILImage.open(out)
    zoom = 128 // 32
    columns = 3 + 1  # one per saved epoch, then the input
    assert sheet.width == MARGIN + columns * (32 * zoom + MARGIN)
    missing = run_cli(
        "preview", "--checkpoints", str(tmp_path / "none"), "--model", "vqvae", "--out", str(out)
    )
    assert missing.exit_code != 0 and "no checkpoints under" in missing.output


def test_a_run_that_trains_says_so_first_with_steps_and_an_estimate(photo_folder, tmp_path, caplog):
    """One line before the first step: the steps it will take and a time estimate from timed steps; none when every
    checkpoint is already there."""
    import logging

    with caplog.at_level(logging.WARNING, logger="factory.train"):
        train(tiny_run("vqvae2", photo_folder, tmp_path / "checkpoints"))
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("training ")]
    assert len(lines) == 1
    assert lines[0].startswith(
        "training vqvae2 (tiny) epochs 1-2: 4 steps of 4 (8 samples an epoch, lr 0.001), about "
    )
    assert "s a step, 2 timed" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="factory.train"):
        train(tiny_run("vqvae2", photo_folder, tmp_path / "checkpoints"))
    assert not [record for record in caplog.records if record.getMessage().startswith("training ")]
