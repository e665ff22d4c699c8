"""The build end to end on CPU with Ray (num_cpus=2): shards readable by plain WebDataset, manifests by pyarrow, metrics
equal to scikit-image's on the stored pairs, reproducible bytes, resume after SIGKILL, an actor killed mid-shard, bad
inputs recorded, the lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from faults import crash_once_worker
from PIL import Image
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from test_sources import write_awkward_inputs

from factory.build import BuildConfig, build
from factory.build.plan import plan_build
from factory.cli import main
from factory.color import downsample, quantize
from factory.config import FactoryError
from factory.manifests import CARD_NAME, LOCK_NAME, REJECTS_NAME, read_manifests, verify
from factory.quality import checkerboard_index, image_quality


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def hr_folder(tmp_path: Path, photos) -> Path:
    """Three photos (PNG and JPEG): with 128 crops every 256 px, 9 + 9 + 6 = 24 crops."""
    root = tmp_path / "hr"
    (root / "nested").mkdir(parents=True)
    Image.fromarray(photos["astronaut"]).save(root / "astronaut.png")  # 512x512
    Image.fromarray(photos["coffee"]).save(root / "nested" / "coffee.jpg", quality=95)  # 400x600
    Image.fromarray(photos["chelsea"]).save(root / "chelsea.png")  # 300x451
    return root


def config_for(tmp_path: Path, hr: Path, **overrides) -> BuildConfig:
    settings = dict(
        hr=(str(hr),),
        model="bicubic",
        crop=128,
        stride=256,
        shard_size=5,
        out=str(tmp_path / "shards"),
        manifests=str(tmp_path / "manifests"),
        actors=2,
        progress=False,
    )
    settings.update(overrides)
    return BuildConfig(**settings)


def shard_urls(config: BuildConfig, dataset: str) -> list[str]:
    return sorted(str(path) for path in (Path(config.out) / dataset).glob("*.tar"))


def bicubic_lr8(hr: np.ndarray, scale: int) -> np.ndarray:
    """The stored bicubic LR x: the project's bicubic of the HR crop, stored as 8 bits (factory.color.quantize)."""
    hr_tensor = torch.from_numpy(hr.copy()).permute(2, 0, 1)[None].float() / 255.0
    return quantize(downsample(hr_tensor, scale))[0].permute(1, 2, 0).numpy()


def skimage_delta_e(hr: np.ndarray, lr: np.ndarray, scale: int) -> float:
    """Reference: the paper's protocol with skimage's rgb2lab + deltaE_ciede2000 (float64) on the stored pair:
    bicubic(HR) as stored (8 bits, the project's bicubic) against the stored 8-bit LR."""
    reference = bicubic_lr8(hr, scale).astype(np.float64) / 255.0
    return float(deltaE_ciede2000(rgb2lab(reference), rgb2lab(lr.astype(np.float64) / 255.0)).mean())


def test_bicubic_build_reads_back_and_matches_skimage(tmp_path: Path, hr_folder: Path):
    config = config_for(tmp_path, hr_folder)
    result = build(config)
    assert (result.dataset, result.pairs, result.built_shards, result.rejects) == ("bicubic", 24, 5, [])

    table = pq.read_table(
        Path(config.manifests) / "bicubic"
    )  # pyarrow reads the manifest folder as a dataset
    samples = list(wds.WebDataset(shard_urls(config, "bicubic"), shardshuffle=False).decode("rgb8"))
    assert table.num_rows == len(samples) == 24
    assert len(set(table["key"].to_pylist())) == 24
    assert [sample["__key__"] for sample in samples] == table["key"].to_pylist()
    rows = {row["key"]: row for row in table.to_pylist()}
    for sample in samples:
        row = rows[sample["__key__"]]
        hr, lr = sample["hr.png"], sample["lr.png"]
        assert hr.shape == (128, 128, 3) and lr.shape == (32, 32, 3)
        assert sample["json"] == {name: row[name] for name in sample["json"]}  # the json member is the row
        assert np.array_equal(lr, bicubic_lr8(hr, 4))  # bicubic model: x_deg = x
        assert (
            row["delta_e"] == skimage_delta_e(hr, lr, 4) == 0.0
        )  # x_deg = x as stored: no colour difference
        assert (row["psnr"], row["ssim"]) == (100.0, pytest.approx(1.0))
    source = Image.open(hr_folder / "astronaut.png")
    first = rows[samples[0]["__key__"]]
    box = (first["crop_left"], first["crop_top"], first["crop_left"] + 128, first["crop_top"] + 128)
    assert np.array_equal(
        np.asarray(source.crop(box)), samples[0]["hr.png"]
    )  # provenance points at the pixels
    card = json.loads((Path(config.manifests) / "bicubic" / CARD_NAME).read_text())
    assert (
        card["counts"]["pairs"] == len(rows) and card["labels"] is None
    )  # no --classifier: nothing labelled
    assert pq.read_table(Path(config.manifests) / "bicubic" / REJECTS_NAME).num_rows == 0
    assert verify(config.out, config.manifests).ok

    # The same command elsewhere gives byte-identical shards; rerun in place, everything is already committed.
    again = config_for(tmp_path / "again", hr_folder, actors=0)  # in-process this time: the bytes do not care
    build(again)
    for first_url, second_url in zip(
        shard_urls(config, "bicubic"), shard_urls(again, "bicubic"), strict=True
    ):
        assert Path(first_url).read_bytes() == Path(second_url).read_bytes()
    rerun = build(config)
    assert (rerun.built_shards, rerun.skipped_shards, rerun.pairs) == (0, 5, 24)


def test_model_build_metrics_equal_skimage_on_stored_pairs(tmp_path: Path, hr_folder: Path):
    from factory.checkpoints import checkpoint_path, file_sha256, save_checkpoint
    from factory.models import build_model, make_config

    torch.manual_seed(0)
    config = make_config("vqvae2", "tiny")
    path = save_checkpoint(
        checkpoint_path(tmp_path / "checkpoints", "vqvae2", 1),
        model_name="vqvae2",
        preset="tiny",
        config=config,
        model=build_model("vqvae2", config=config),
        epoch=1,
        steps=0,
        data_fingerprint="none",
        seed=0,
        training={"batch_size": 4, "lr": 1e-3, "samples_seen": 8},
        regime={
            "psnr": 12.5,
            "ssim": 0.2,
            "delta_e": 20.0,
            "checkerboard": 30.0,
            "delta_b": -1.0,
            "images": 3,
        },
    )
    build_config = config_for(
        tmp_path,
        hr_folder,
        model="vqvae2",
        epoch=1,
        checkpoints=str(tmp_path / "checkpoints"),
        codec="zst",
        limit=10,
        actors=0,  # the same ShardWorker, in-process: Ray is covered by the other builds; this test is about metrics
    )
    result = build(build_config)
    assert (result.dataset, result.pairs) == ("vqvae2-ep1", 10)
    table = read_manifests(build_config.manifests, "vqvae2-ep1")
    assert set(table["checkpoint_sha256"].to_pylist()) == {file_sha256(path)}
    assert set(table["preset"].to_pylist()) == {"tiny"}
    rows = {row["key"]: row for row in table.to_pylist()}
    from factory.shards import decode_image

    dataset = wds.WebDataset(shard_urls(build_config, "vqvae2-ep1"), shardshuffle=False)
    for sample in dataset:
        hr, lr = (
            decode_image("hr.npy.zst", sample["hr.npy.zst"]),
            decode_image("lr.npy.zst", sample["lr.npy.zst"]),
        )
        row = rows[sample["__key__"]]
        x = bicubic_lr8(hr, 4)
        assert row["delta_e"] == pytest.approx(skimage_delta_e(hr, lr, 4), abs=1e-3)
        assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(x, lr, data_range=255), abs=1e-6)
        assert row["ssim"] == pytest.approx(
            structural_similarity(x, lr, channel_axis=2, data_range=255), abs=1e-6
        )
        assert row["psnr"] < 100  # the untrained model really degrades
        assert row["checkerboard"] == pytest.approx(
            float(
                checkerboard_index(
                    torch.tensor(lr).permute(2, 0, 1)[None], torch.tensor(x).permute(2, 0, 1)[None]
                )
            )
        )
    # The card carries the checkpoint's training record and regime as the checkpoint stores them.
    card = json.loads((Path(build_config.manifests) / "vqvae2-ep1" / CARD_NAME).read_text())
    assert (
        card["checkpoint"]["regime"]["psnr"] == 12.5 and card["checkpoint"]["training"]["samples_seen"] == 8
    )
    assert card["checkpoint"]["sha256"] == file_sha256(path) and card["checkerboard"]["median"] > 0


def test_image_quality_matches_skimage_on_random_images():
    generator = np.random.default_rng(0)
    reference = generator.integers(0, 256, (2, 24, 31, 3), dtype=np.uint8)
    degraded = np.clip(reference.astype(int) + generator.integers(-20, 21, reference.shape), 0, 255).astype(
        np.uint8
    )
    psnr, ssim = image_quality(
        torch.from_numpy(degraded).permute(0, 3, 1, 2), torch.from_numpy(reference).permute(0, 3, 1, 2)
    )
    for index in range(2):
        expected = structural_similarity(reference[index], degraded[index], channel_axis=2, data_range=255)
        assert ssim[index].item() == pytest.approx(expected, abs=1e-10)
        assert psnr[index].item() == pytest.approx(
            peak_signal_noise_ratio(reference[index], degraded[index], data_range=255), abs=1e-10
        )


@pytest.mark.parametrize("layouts", [("nhwc", "nhwc"), ("nchw", "nhwc"), ("nchw", "nchw")])
def test_image_quality_window_sums_equal_avg_pool_bit_for_bit(layouts):
    """image_quality's window means by cumulative sums must equal the avg_pool2d form exactly (whatever the memory
    layout of its inputs), so a manifest row, and the shard's json member, keep their bytes."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 40, 37, 3), generator=generator, dtype=torch.uint8) for _ in range(2)]
    degraded, reference = (
        image.permute(0, 3, 1, 2) if layout == "nhwc" else image.permute(0, 3, 1, 2).contiguous()
        for image, layout in zip(images, layouts, strict=True)
    )
    a, b = degraded.double(), reference.double()

    def mean_filter(t):
        return F.avg_pool2d(t, 7, stride=1)

    norm = 49 / 48
    mean_a, mean_b = mean_filter(a), mean_filter(b)
    var_a = norm * (mean_filter(a * a) - mean_a * mean_a)
    var_b = norm * (mean_filter(b * b) - mean_b * mean_b)
    cov = norm * (mean_filter(a * b) - mean_a * mean_b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / (
        (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    )
    expected = ssim_map.flatten(2).mean(dim=2).mean(dim=1)
    assert torch.equal(image_quality(degraded, reference)[1], expected)


def test_bad_and_awkward_inputs(tmp_path: Path, photos):
    folder = tmp_path / "inputs"
    expected = write_awkward_inputs(folder, photos["astronaut"][:256, :320])
    config = config_for(tmp_path, folder, stride=128, max_pixels=200_000, name="awkward", actors=0)
    result = build(config)
    good = {name for name, reason in expected.items() if reason is None}
    table = read_manifests(config.manifests, "awkward")
    assert set(table["source"].to_pylist()) == good
    assert result.pairs == table.num_rows == 6 * len(good)  # 256x320 with 128 crops every 128 px: 2 x 3
    rejects = pq.read_table(Path(config.manifests) / "awkward" / REJECTS_NAME).to_pylist()
    assert {row["source"]: row["reason"] for row in rejects} == {
        name: reason for name, reason in expected.items() if reason is not None
    }
    assert all(row["detail"] for row in rejects)
    assert verify(config.out, config.manifests).ok


@pytest.mark.slow  # ~1 min on two busy cores: three actors start
def test_actor_killed_mid_shard_loses_and_duplicates_nothing(tmp_path: Path, hr_folder: Path):
    marker = tmp_path / "crashed"
    config = config_for(tmp_path, hr_folder, batch_size=2)
    result = build(config, worker_class=crash_once_worker(marker))  # the first worker to write a batch dies
    assert marker.is_file()  # an actor did die
    table = read_manifests(config.manifests, "bicubic")
    assert result.pairs == table.num_rows == 24
    assert len(set(table["key"].to_pylist())) == 24
    assert verify(config.out, config.manifests).ok


@pytest.mark.slow  # ~1 min on two busy cores: a second Ray starts in the subprocess
@pytest.mark.parametrize("model", ["bicubic", "realesrgan", "bsrgan"])
def test_sigkill_mid_build_then_rerun_is_exactly_once(tmp_path: Path, hr_folder: Path, model: str):
    """SIGKILL the whole build (driver, embedded Ray, actors: its process group) after two shards, then rerun; the
    classical degraders too (each pair draws from its own (seed, key) generator, so a rebuilt shard is the same)."""
    config = config_for(tmp_path, hr_folder, model=model, crop=64, stride=128, shard_size=3, actors=1)
    planned = plan_build(config)
    command = [sys.executable, "-m", "factory.cli", "build", "--hr", str(hr_folder), "--model", model]
    command += ["--crop", "64", "--stride", "128", "--shard-size", "3", "--actors", "1", "--num-cpus", "1"]
    command += ["--out", config.out, "--manifests", config.manifests, "--no-progress"]
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    manifest_folder = Path(config.manifests) / model
    deadline = time.monotonic() + 120
    try:
        while len(list(manifest_folder.glob("*.parquet"))) < 2 and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    committed_before = len(
        [path for path in manifest_folder.glob("*.parquet") if not path.name.startswith("_")]
    )
    assert 2 <= committed_before < len(planned.shards)  # killed mid-way
    assert (manifest_folder / LOCK_NAME).is_file()  # left behind by the dead build: taken over below

    result = build(config)
    assert result.skipped_shards >= 2 and result.built_shards + result.skipped_shards == len(planned.shards)
    table = read_manifests(config.manifests, model)
    assert result.pairs == table.num_rows == planned.crops
    assert sorted(table["key"].to_pylist()) == sorted(
        crop.key for shard in planned.shards for crop in shard.crops
    )
    runner = CliRunner()
    outcome = runner.invoke(main, ["verify", config.out, "--manifests", config.manifests])
    assert outcome.exit_code == 0, outcome.output
    assert not (manifest_folder / LOCK_NAME).exists()


def test_a_running_build_holds_the_lock(tmp_path: Path, hr_folder: Path):
    config = config_for(tmp_path, hr_folder, limit=2, actors=0)
    lock = Path(config.manifests) / "bicubic" / LOCK_NAME
    lock.parent.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f'{{"pid": {sleeper.pid}, "host": "{os.uname().nodename}", "started": 0}}')
        with pytest.raises(FactoryError, match="another build"):
            build(config)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert build(config).pairs == 2  # the holder is gone: its lock is taken over


def test_dry_run_writes_nothing(tmp_path: Path, hr_folder: Path):
    config = config_for(tmp_path, hr_folder, dry_run=True)
    result = build(config)
    assert (result.plan["crops"], result.plan["shards"], result.plan["images"]) == (24, 5, 3)
    assert result.estimated_bytes > 0
    assert not Path(config.out).exists() and not Path(config.manifests).exists()


def test_more_inputs_after_a_partial_last_shard_are_refused_and_the_dry_run_says_so(
    tmp_path: Path, hr_folder: Path
):
    """#16 item 5: a resume with more inputs changes the crops of the partial last shard; the run is refused as a
    different build, and the dry run says beforehand that it would be, and why."""
    build(config_for(tmp_path, hr_folder, limit=7, actors=0))  # shards of 5: the second holds 2 crops
    grown = config_for(tmp_path, hr_folder, limit=12, actors=0)
    said = "\n".join(build(replace(grown, dry_run=True)).summary_lines())
    assert "the real run would be refused: dataset bicubic already holds shard bicubic-000001" in said
    assert "holds 2 planned crops and this plan puts 5 in it" in said
    with pytest.raises(FactoryError, match="holds 2 planned crops and this plan puts 5 in it") as refused:
        build(grown)
    assert str(refused.value) in said  # the dry run gives the real run's own message
    same = "\n".join(build(config_for(tmp_path, hr_folder, limit=7, actors=0, dry_run=True)).summary_lines())
    assert "refused" not in same  # the same build resumes


def test_dry_run_checks_what_a_run_checks_before_writing(tmp_path: Path, hr_folder: Path):
    # Each of these printed a plan and exited 0; the real run then failed (or trained for hours first).
    runner = CliRunner()
    out, manifests = tmp_path / "shards", tmp_path / "manifests"
    base = [
        "build",
        "--hr",
        str(hr_folder),
        "--crop",
        "128",
        "--out",
        str(out),
        "--manifests",
        str(manifests),
    ]
    base += ["--dry-run", "--no-progress"]
    for extra, said in (
        (["--model", "bicubic", "--classifier", str(tmp_path / "missing.safetensors")], "no classifier at"),
        (["--model", "vqvae2", "--epoch", "8", "--checkpoints", str(tmp_path), "--no-train"], "not found"),
        (["--model", "vqvae2", "--checkpoints", str(tmp_path)], "give --epoch"),
        (["--model", "realesrgan", "--epoch", "8"], "--epoch is for reconstructors"),
    ):
        result = runner.invoke(main, [*base, *extra])
        assert result.exit_code == 2, result.output
        assert said in result.output and result.output.count("\n") == 1, result.output
    # An unknown --model is click's usage error listing the degraders; a config naming one, a one-line error.
    result = runner.invoke(main, [*base, "--model", "nosuchmodel"])
    assert result.exit_code == 2 and "'nosuchmodel' is not one of 'vqvae'" in result.output, result.output
    with pytest.raises(FactoryError, match="unknown degrader 'nosuchmodel'; known degraders: bicubic, "):
        build(config_for(tmp_path, hr_folder, model="nosuchmodel", dry_run=True))
    assert not out.exists() and not manifests.exists()


def test_dry_run_says_whether_the_checkpoint_is_there_or_trained_first(tmp_path: Path, hr_folder: Path):
    from factory.checkpoints import checkpoint_path, save_checkpoint
    from factory.models import build_model, make_config

    config = config_for(
        tmp_path, hr_folder, model="vqvae2", epoch=1, checkpoints=str(tmp_path / "ck"), dry_run=True
    )
    path = checkpoint_path(config.checkpoints, "vqvae2", 1)
    missing = f"  checkpoint {path} is missing: vqvae2 is trained to epoch 1 first"
    assert missing in build(config).summary_lines()
    assert not path.exists()
    model_config = make_config("vqvae2", "tiny")
    model = build_model("vqvae2", config=model_config)
    save_checkpoint(
        path,
        model_name="vqvae2",
        preset="tiny",
        config=model_config,
        model=model,
        epoch=1,
        steps=0,
        data_fingerprint="none",
        seed=0,
    )
    lines = build(config).summary_lines()
    assert any(line.startswith(f"  checkpoint {path} (sha256 ") for line in lines), lines
    bicubic = build(config_for(tmp_path, hr_folder, dry_run=True)).summary_lines()
    assert "  checkpoint none (bicubic: the LR is not degraded)" in bicubic


def test_other_settings_into_an_existing_dataset_are_refused(tmp_path: Path, hr_folder: Path):
    """A resume with other settings is refused, naming what differs (the commit records keep the settings)."""
    from factory.classifier.checkpoint import save_classifier
    from factory.classifier.network import build_network
    from factory.classifier.training import ClassifierTrainConfig

    build(config_for(tmp_path, hr_folder, limit=3, actors=0))
    with pytest.raises(FactoryError, match=r"different build \(codec 'png' -> 'zst'\)"):
        build(config_for(tmp_path, hr_folder, limit=3, codec="zst", actors=0))
    classifier = tmp_path / "classifier.safetensors"
    save_classifier(
        build_network("resnet18"), ClassifierTrainConfig(data="", arch="resnet18", size=16), 0.0, classifier
    )
    with pytest.raises(FactoryError, match=r"classifier_sha256 None -> '[0-9a-f]{64}'; .*run `factory label"):
        build(config_for(tmp_path, hr_folder, limit=3, classifier=str(classifier), actors=0))


def test_nothing_buildable_is_an_error(tmp_path: Path, hr_folder: Path):
    outcome = CliRunner().invoke(
        main,
        [
            "build",
            "--hr",
            str(hr_folder),
            "--model",
            "bicubic",
            "--crop",
            "2048",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert outcome.exit_code == 2 and "nothing could be built" in outcome.output


@pytest.mark.parametrize(
    "option, value",
    [
        ("--epoch", "0"),
        ("--shard-size", "0"),
        ("--batch-size", "-2"),
        ("--stride", "0"),
        ("--limit", "-1"),
        ("--threads", "0"),
        ("--num-cpus", "0"),
        ("--max-pixels", "0"),
        ("--actors", "-1"),  # Ray started and hung on this one
    ],
)
def test_counts_below_one_are_a_one_line_error_before_anything_runs(tmp_path: Path, option: str, value: str):
    outcome = CliRunner().invoke(
        main,
        [
            "build",
            "--limit",
            "1",
            option,
            value,
            "--out",
            str(tmp_path / "s"),
            "--checkpoints",
            str(tmp_path),
        ],
    )
    least = 0 if option == "--actors" else 1
    assert outcome.exit_code == 2 and f"{option} must be at least {least}" in outcome.output, outcome.output
    assert f"got {value}" in outcome.output
    assert (
        not (tmp_path / "s").exists() and not (tmp_path / "vqvae2").exists()
    )  # nothing trained, nothing written


def test_classifier_fills_the_label_columns(tmp_path: Path, hr_folder: Path):
    from factory.checkpoints import file_sha256
    from factory.classifier.checkpoint import save_classifier
    from factory.classifier.labeler import Labeler
    from factory.classifier.network import build_network
    from factory.classifier.training import ClassifierTrainConfig
    from factory.corruptions import CORRUPTIONS
    from factory.manifests import LABEL_PROB_COLUMNS

    torch.manual_seed(0)
    path = (
        tmp_path / "classifier.safetensors"
    )  # an untrained ResNet-18: the labels are arbitrary, the wiring is not
    save_classifier(
        build_network("resnet18"), ClassifierTrainConfig(data="", arch="resnet18", size=16), 0.0, path
    )
    config = config_for(tmp_path, hr_folder, classifier=str(path), limit=4, actors=0)
    build(config)
    rows = {row["key"]: row for row in read_manifests(config.manifests, "bicubic").to_pylist()}
    labeler = Labeler.load(path)
    for sample in wds.WebDataset(shard_urls(config, "bicubic"), shardshuffle=False).decode("rgb8"):
        row = rows[sample["__key__"]]
        # Reference: the classifier itself on the stored 8-bit LR read back from the shard.
        lr = torch.from_numpy(sample["lr.png"].copy()).permute(2, 0, 1)[None].float() / 255.0
        labels, probabilities = labeler.predict(lr)
        assert row["label"] == labels[0] in CORRUPTIONS
        assert [row[name] for name in LABEL_PROB_COLUMNS] == pytest.approx(
            probabilities[0].tolist(), abs=1e-5
        )
        assert row["label_prob"] == pytest.approx(max(probabilities[0].tolist()), abs=1e-6)
        assert row["classifier_sha256"] == file_sha256(path)


def test_embedded_default_trains_its_checkpoint_with_the_embedded_recipe(tmp_path: Path, monkeypatch):
    """Without --hr and --train-data, a missing VQ-VAE-2 checkpoint is trained with the embedded default's recipe
    (factory.train's EMBEDDED_DEFAULT_* constants): LR-sized crops (256 / 4 = 64), its steps an epoch, the `embedded`
    preset, the regime measured at the LR size; with --hr, with train's defaults (the paper's epoch and recipe)."""
    import factory.train
    from factory.build.driver import ensure_checkpoint
    from factory.sources import list_sources
    from factory.train import (
        EMBEDDED_DEFAULT_PRESET,
        EMBEDDED_DEFAULT_RECIPE,
        EMBEDDED_DEFAULT_STEPS_PER_EPOCH,
    )

    seen = []
    monkeypatch.setattr(factory.train, "train", lambda config: seen.append(config))
    embedded = BuildConfig(epoch=8, checkpoints=str(tmp_path / "checkpoints"), shipped_checkpoint=False)
    with pytest.raises(FactoryError, match="not written"):  # the stand-in trainer writes nothing
        ensure_checkpoint(embedded, list_sources().files)
    steps = EMBEDDED_DEFAULT_STEPS_PER_EPOCH * EMBEDDED_DEFAULT_RECIPE.batch_size
    assert (seen[0].image_size, seen[0].epoch_size, seen[0].epochs, seen[0].regime_size) == (64, steps, 8, 64)
    assert (seen[0].recipe, seen[0].preset) == (EMBEDDED_DEFAULT_RECIPE, EMBEDDED_DEFAULT_PRESET)
    with pytest.raises(FactoryError, match="not written"):
        with_hr = config_for(
            tmp_path, tmp_path, model="vqvae2", epoch=8, checkpoints=str(tmp_path / "checkpoints")
        )
        ensure_checkpoint(with_hr, list_sources().files)
    assert (seen[1].image_size, seen[1].epoch_size, seen[1].lr, seen[1].recipe) == (None, None, None, None)
    assert seen[1].preset == "paper" and seen[1].regime_size == 256
    # --no-progress (config_for's) silences training's bar too.
    assert seen[0].progress and not seen[1].progress
    with pytest.raises(FactoryError, match="not written"):  # --crop 200: LR 50, trained on whole 48x48 crops
        ensure_checkpoint(
            BuildConfig(epoch=8, checkpoints=str(tmp_path / "checkpoints"), crop=200), list_sources().files
        )
    assert seen[2].image_size == 48


def test_embedded_default_copies_the_checkpoint_shipped_for_its_run(tmp_path: Path, monkeypatch):
    """Without --hr, a missing VQ-VAE-2 epoch-8 checkpoint is the one shipped with the package (factory.train's
    SHIPPED_CHECKPOINTS), copied byte for byte, nothing trained; --dry-run says so. A run the shipped file is not
    of (another seed, another crop) and --no-shipped-checkpoint train as before."""
    import factory.train
    from factory.build.driver import ensure_checkpoint
    from factory.checkpoints import file_sha256
    from factory.sources import list_sources
    from factory.train import SHIPPED_CHECKPOINTS

    trained = []
    monkeypatch.setattr(factory.train, "train", lambda config: trained.append(config))
    checkpoints = tmp_path / "checkpoints"
    dry = build(
        BuildConfig(
            epoch=8,
            checkpoints=str(checkpoints),
            out=str(tmp_path / "s"),
            manifests=str(tmp_path / "m"),
            dry_run=True,
        )
    )
    assert "copied first from the one shipped with factory" in dry.checkpoint_plan
    path = ensure_checkpoint(BuildConfig(epoch=8, checkpoints=str(checkpoints)), list_sources().files)
    assert path == checkpoints / "vqvae2" / "epoch-8.pt" and not trained
    assert file_sha256(path) == file_sha256(SHIPPED_CHECKPOINTS / "vqvae2" / "epoch-8.pt")
    for other in (
        BuildConfig(epoch=8, checkpoints=str(tmp_path / "a"), seed=1),
        BuildConfig(epoch=8, checkpoints=str(tmp_path / "b"), crop=200),
        BuildConfig(epoch=8, checkpoints=str(tmp_path / "c"), shipped_checkpoint=False),
    ):
        with pytest.raises(FactoryError, match="not written"):  # the stand-in trainer writes nothing
            ensure_checkpoint(other, list_sources().files)
    assert [config.seed for config in trained] == [1, 0, 0] and trained[1].image_size == 48


def test_build_starts_its_own_ray_even_when_ray_address_points_elsewhere(tmp_path: Path, hr_folder: Path):
    """No --address means an embedded local Ray (ray.init(address="local")): a RAY_ADDRESS left in the environment
    (here a port nothing listens on) must neither be joined nor break the build."""
    command = [sys.executable, "-m", "factory.cli", "build", "--hr", str(hr_folder), "--model", "bicubic"]
    command += ["--crop", "128", "--stride", "256", "--shard-size", "50", "--actors", "1", "--num-cpus", "1"]
    command += ["--out", str(tmp_path / "shards"), "--manifests", str(tmp_path / "manifests")]
    environment = dict(os.environ, RAY_ADDRESS="127.0.0.1:9")
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert verify(str(tmp_path / "shards"), str(tmp_path / "manifests"), "bicubic").ok


# Runs `factory build` with the arguments given, then prints the authentication mode the process's Ray ran with.
BUILD_THEN_AUTH_MODE = """
import sys
from factory.cli import main
try:
    main(sys.argv[1:], prog_name="factory")
except SystemExit as end:
    if end.code:
        raise
from ray._raylet import AuthenticationMode, get_authentication_mode
print("token" if get_authentication_mode() == AuthenticationMode.TOKEN else "not token")
"""


def test_the_embedded_ray_keeps_token_authentication_and_says_nothing_of_it(tmp_path: Path, hr_folder: Path):
    """Ray 2.60 warned "Token authentication is enabled for this Ray cluster" on every build (#16 item 7): the
    embedded Ray asks for token authentication by name (RAY_AUTH_MODE=token), which keeps it on and quiet. The
    environment is cleared of RAY_AUTH_MODE, which this module's own ray.init has set."""
    command = [sys.executable, "-c", BUILD_THEN_AUTH_MODE, "build", "--hr", str(hr_folder), "--model", "bicubic",
               "--crop", "128", "--stride", "256", "--shard-size", "50", "--actors", "1", "--num-cpus", "1",
               "--out", str(tmp_path / "shards"), "--manifests", str(tmp_path / "manifests"), "--no-progress"]  # fmt: skip
    environment = {name: value for name, value in os.environ.items() if name != "RAY_AUTH_MODE"}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "Token authentication" not in finished.stderr, finished.stderr
    assert finished.stdout.strip().splitlines()[-1] == "token"  # still secure: the cluster wanted a token


# --- what cannot be written: one line, no retry, nothing half-written (#16 item 2) -------------------------------------


def test_an_out_that_cannot_be_written_is_one_line(tmp_path: Path, hr_folder: Path):
    (tmp_path / "file").write_text("a regular file")
    for out, manifests in (
        (tmp_path / "file" / "s", tmp_path / "m"),
        (tmp_path / "s", tmp_path / "file" / "m"),
    ):
        outcome = CliRunner().invoke(
            main,
            ["build", "--hr", str(hr_folder), "--model", "bicubic", "--crop", "128", "--limit", "2",
             "--actors", "0", "--out", str(out), "--manifests", str(manifests), "--no-progress"],
        )  # fmt: skip
        assert outcome.exit_code == 2, outcome.output
        (line,) = outcome.output.strip().splitlines()
        assert line.startswith("error: cannot write ") and line.endswith(": Not a directory"), line


# Runs `factory` with a disk that fills once `committed` shards are written: every HashingWriter (the tar stream of
# one shard) after the first `committed` raises ENOSPC after 4 KiB, as a real full disk does mid-tar.
FULL_DISK_CLI = """
import errno, os, sys
import factory.shards
from factory.cli import main

class FullDisk(factory.shards.HashingWriter):
    opened = 0

    def __init__(self, stream):
        super().__init__(stream)
        FullDisk.opened += 1
        self.full = FullDisk.opened > int(os.environ["COMMITTED"])

    def write(self, data):
        if self.full and self.size + len(data) > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)

factory.shards.HashingWriter = FullDisk
main(sys.argv[1:], prog_name="factory")
"""


def temporaries(*folders: Path) -> list[Path]:
    return [path for folder in folders for path in folder.rglob(".*.tmp")]


def test_a_full_disk_in_process_is_one_line_and_leaves_committed_shards(tmp_path: Path, hr_folder: Path):
    """--actors 0: an OSError traceback, then "Exception ignored ... I/O operation on closed file" (the tar stream
    flushed into its closed file when collected). Now: one line; committed shards stay; a rerun completes."""
    config = config_for(tmp_path, hr_folder, actors=0)
    command = [sys.executable, "-c", FULL_DISK_CLI, "build", "--hr", str(hr_folder), "--model", "bicubic"]
    command += ["--crop", "128", "--stride", "256", "--shard-size", "5", "--actors", "0", "--no-progress"]
    command += ["--out", config.out, "--manifests", config.manifests]
    finished = subprocess.run(
        command, env=dict(os.environ, COMMITTED="2"), capture_output=True, text=True, timeout=300
    )
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert finished.stderr.strip().splitlines() == [
        f"error: cannot write {config.out}/bicubic/bicubic-000002.tar: No space left on device"
    ]
    assert not temporaries(Path(config.out), Path(config.manifests))
    report = verify(config.out, config.manifests, "bicubic")  # the two committed shards, whole
    assert report.ok and report.shards == 2, report.problems
    committed = {path.name: path.read_bytes() for path in (Path(config.out) / "bicubic").glob("*.tar")}

    result = build(config)  # the disk has room again
    assert (result.skipped_shards, result.built_shards, result.pairs) == (2, 3, 24)
    assert {name: (Path(config.out) / "bicubic" / name).read_bytes() for name in committed} == committed
    assert verify(config.out, config.manifests).ok


def test_a_full_disk_on_ray_fails_at_once_without_retries(tmp_path: Path, hr_folder: Path):
    """With Ray a full disk was retried three times, worker tracebacks printed, and a 0-byte temporary left."""
    from factory.build.worker import ShardWorker

    attempts = tmp_path / "attempts"

    class FullDiskWorker(ShardWorker):  # defined here: Ray ships it to the actor by value
        def build_shard(self, task):
            if task.index < 2:
                return super().build_shard(task)
            import errno

            import factory.shards

            with attempts.open("a") as file:
                file.write(f"{task.stem}\n")

            class FullDisk(factory.shards.HashingWriter):
                def write(self, data):
                    if self.size + len(data) > 4096:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    return super().write(data)

            factory.shards.HashingWriter = FullDisk  # in the actor's process
            return super().build_shard(task)

    config = config_for(tmp_path, hr_folder, actors=1)  # one actor: shards 0 and 1 commit first
    with pytest.raises(FactoryError, match=r"bicubic-000002.tar: No space left on device$") as raised:
        build(config, worker_class=FullDiskWorker)
    assert "\n" not in str(raised.value)
    assert attempts.read_text().splitlines() == ["bicubic-000002"]  # tried once: no retry can help
    assert not temporaries(Path(config.out), Path(config.manifests))
    report = verify(config.out, config.manifests, "bicubic")
    assert report.ok and report.shards == 2, report.problems


def test_a_resume_onto_a_labelled_dataset_says_the_new_pairs_are_not(tmp_path: Path, hr_folder: Path):
    from factory.classifier.checkpoint import save_classifier
    from factory.classifier.network import build_network
    from factory.classifier.relabel import LabelConfig, label_dataset
    from factory.classifier.training import ClassifierTrainConfig

    classifier = tmp_path / "classifier.safetensors"
    save_classifier(
        build_network("resnet18"), ClassifierTrainConfig(data="", arch="resnet18", size=16), 0.0, classifier
    )
    build(config_for(tmp_path, hr_folder, limit=5, actors=0))  # one shard
    label_dataset(LabelConfig(str(classifier), str(tmp_path / "shards"), str(tmp_path / "manifests")))
    result = build(config_for(tmp_path, hr_folder, limit=10, actors=0))  # the same build, one shard more
    assert (result.skipped_shards, result.built_shards) == (1, 1)
    assert "5 of the 5 pairs this run added are not labelled, while 5 earlier pairs are" in result.labels_note
    assert "factory label" in result.labels_note and result.labels_note in "\n".join(result.summary_lines())
    # Labelled, then resumed again with nothing new: nothing to say.
    label_dataset(LabelConfig(str(classifier), str(tmp_path / "shards"), str(tmp_path / "manifests")))
    assert build(config_for(tmp_path, hr_folder, limit=10, actors=0)).labels_note is None
