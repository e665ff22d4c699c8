"""The build with every kind of degrader (factory.degraders): a pair's bytes depend only on its source, crop,
degrader, checkpoint and seed (not on --batch-size or --actors), its parameters land in the manifest, and
`factory query` selects on them. CPU only, Ray with num_cpus=2, 128 crops of three photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from factory.build import BuildConfig, build
from factory.cli import main
from factory.config import FactoryError
from factory.degraders import get_degrader
from factory.manifests import CARD_NAME, read_commit, read_manifests, verify
from factory.storage import Storage


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
    Image.fromarray(photos["astronaut"]).save(root / "astronaut.png")
    Image.fromarray(photos["coffee"]).save(root / "nested" / "coffee.jpg", quality=95)
    Image.fromarray(photos["chelsea"]).save(root / "chelsea.png")
    return root


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    """Tiny checkpoints at epoch 1 of MAE (it samples its masks) and VQ-VAE-2 (deterministic), random weights."""
    from factory.checkpoints import checkpoint_path, save_checkpoint
    from factory.models import build_model, make_config

    root = tmp_path / "checkpoints"
    for name in ("mae", "vqvae2"):
        torch.manual_seed(0)
        config = make_config(name, "tiny")
        model = build_model(name, config=config)
        with (
            torch.no_grad()
        ):  # off the initialisation, so the LR depends on the input (an untrained one is flat)
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        save_checkpoint(
            checkpoint_path(root, name, 1),
            model_name=name,
            preset="tiny",
            config=config,
            model=model,
            epoch=1,
            steps=0,
            data_fingerprint="none",
            seed=0,
        )
    return root


def config_for(folder: Path, hr: Path, model: str, **overrides) -> BuildConfig:
    settings = dict(
        hr=(str(hr),),
        model=model,
        crop=128,
        stride=256,
        limit=6,
        shard_size=4,
        seed=7,
        out=str(folder / "shards"),
        manifests=str(folder / "manifests"),
        actors=0,
        progress=False,
    )
    settings.update(overrides)
    return BuildConfig(**settings)


def shard_bytes(config: BuildConfig, dataset: str) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((Path(config.out) / dataset).glob("*.tar"))}


@pytest.mark.parametrize(
    "model, dataset, epoch",
    [
        ("realesrgan", "realesrgan", None),
        ("bsrgan", "bsrgan", None),
        ("mae", "mae-ep1", 1),
        ("vqvae2", "vqvae2-ep1", 1),
    ],
)
def test_a_pair_does_not_depend_on_batch_size_or_actors(
    tmp_path: Path, hr_folder: Path, checkpoints: Path, model: str, dataset: str, epoch: int | None
):
    """Batch 1 in-process, batch 8 in-process, batch 8 on two Ray actors: the same shards, byte for byte; a
    resume with another batch size is the same build. VQ-VAE-2 draws nothing, but batched it would sum in
    another order (factory.degraders.reconstructor)."""
    common = dict(epoch=epoch, checkpoints=str(checkpoints), train_missing=False)
    one = config_for(tmp_path / "one", hr_folder, model, batch_size=1, **common)
    eight = config_for(tmp_path / "eight", hr_folder, model, batch_size=8, **common)
    actors = config_for(tmp_path / "actors", hr_folder, model, batch_size=8, actors=2, **common)
    for config in (one, eight, actors):
        assert build(config).pairs == 6
    shards = shard_bytes(one, dataset)
    assert len(shards) == 2 and shard_bytes(eight, dataset) == shards == shard_bytes(actors, dataset)
    assert verify(actors.out, actors.manifests).ok

    rows = read_manifests(one.manifests, dataset).to_pylist()
    if model != "vqvae2":  # every pair drew its own degradation (VQ-VAE-2 draws nothing)
        assert len({row["lr_sha256"] for row in rows}) == 6
    flat = get_degrader(model, {"checkpoint": _checkpoint(checkpoints, model)} if epoch else {}).flat_columns
    for row in rows:
        record = json.loads(row["degradation"])
        assert record["degrader"] == model
        assert {name: row[name] for name in ("kernel_sigma", "noise_level", "jpeg_quality")} == flat(record)
    if epoch is not None:  # a reconstructor records its checkpoint, and the seed it drew from when it samples
        assert {row["epoch"] for row in rows} == {1} and rows[0]["preset"] == "tiny"
        record = json.loads(rows[0]["degradation"])
        assert (record["checkpoint_sha256"], record["epoch"]) == (rows[0]["checkpoint_sha256"], 1)
        assert isinstance(record["generator_seed"], int) == (model == "mae")
    else:
        assert {row["epoch"] for row in rows} == {None} and rows[0]["jpeg_quality"] is not None

    # The batch size is not part of the build: rerunning batch-1's command with batch 8 finds everything committed.
    rerun = build(config_for(tmp_path / "one", hr_folder, model, batch_size=8, **common))
    assert (rerun.built_shards, rerun.skipped_shards) == (0, 2)


def _checkpoint(root: Path, model: str) -> str:
    from factory.checkpoints import checkpoint_path

    return str(checkpoint_path(root, model, 1))


@pytest.mark.parametrize("model", ["realesrgan", "bsrgan"])
def test_the_same_command_gives_byte_identical_shards(tmp_path: Path, hr_folder: Path, model: str):
    first = config_for(tmp_path / "first", hr_folder, model, limit=4)
    second = config_for(tmp_path / "second", hr_folder, model, limit=4)
    build(first)
    build(second)
    assert shard_bytes(first, model) == shard_bytes(second, model) != {}
    other_seed = config_for(tmp_path / "other", hr_folder, model, limit=4, seed=8)
    build(other_seed)
    assert shard_bytes(other_seed, model) != shard_bytes(first, model)


def test_query_selects_on_the_degradation_record_and_the_flat_columns(tmp_path: Path, hr_folder: Path):
    """`factory query` with json_extract on the `degradation` record (DuckDB's json extension is built in, so it
    works in the sandbox) and on the flat column select exactly the pairs a pyarrow scan finds."""
    options = tmp_path / "realesrgan.yml"
    options.write_text(yaml.safe_dump({"jpeg_range": [30, 70], "jpeg_range2": [60, 95]}))
    manifests = tmp_path / "manifests"
    command = ["build", "--hr", str(hr_folder), "--model", "realesrgan", "--degradation-config", str(options)]
    command += ["--crop", "128", "--stride", "256", "--limit", "12", "--shard-size", "6", "--actors", "0"]
    command += ["--out", str(tmp_path / "shards"), "--manifests", str(manifests), "--no-progress"]
    outcome = CliRunner().invoke(main, command)
    assert outcome.exit_code == 0, outcome.output

    table = pq.read_table(manifests / "realesrgan")
    records = {
        key: json.loads(text)
        for key, text in zip(table["key"].to_pylist(), table["degradation"].to_pylist(), strict=True)
    }
    expected = sorted(key for key, record in records.items() if record["first"]["jpeg_quality"] < 50)
    assert 0 < len(expected) < len(records)  # the predicate splits the dataset
    assert all(
        60 <= record["final"]["jpeg_quality"] <= 95 for record in records.values()
    )  # the config applied
    for expression in (
        "json_extract(degradation, '$.first.jpeg_quality') < 50",
        "CAST(degradation ->> '$.first.jpeg_quality' AS INTEGER) < 50",
        "jpeg_quality < 50",
    ):
        outcome = CliRunner().invoke(
            main, ["query", expression, "--manifests", str(manifests), "--format", "keys"]
        )
        assert outcome.exit_code == 0, outcome.output
        assert sorted(outcome.output.split()) == expected, expression

    card = json.loads((manifests / "realesrgan" / CARD_NAME).read_text())
    assert card["degradation"]["options"] == {"jpeg_range": [30, 70], "jpeg_range2": [60, 95]}
    assert card["degradation"]["config"]["jpeg_range"] == [30, 70]
    commit = read_commit(Storage(str(manifests)), "realesrgan/realesrgan-000000.parquet")
    assert commit["build_settings"]["degradation_options"] == card["degradation"]["options"]
    assert "batch_size" not in commit["build_settings"]


def test_epoch_and_options_must_fit_the_degrader(tmp_path: Path, hr_folder: Path):
    with pytest.raises(FactoryError, match="--epoch is for reconstructors"):
        build(config_for(tmp_path, hr_folder, "bsrgan", epoch=8))
    with pytest.raises(FactoryError, match="give --epoch"):
        build(config_for(tmp_path, hr_folder, "vqvae2"))
    options = tmp_path / "bad.yml"
    options.write_text("jpeg_quality_range: [1, 2]\n")
    with pytest.raises(FactoryError, match="unknown key"):
        build(config_for(tmp_path, hr_folder, "bsrgan", degradation_config=str(options)))
    with pytest.raises(FactoryError, match="takes no degradation options"):
        build(config_for(tmp_path, hr_folder, "vqvae2", epoch=1, degradation_config=str(options)))
    options.write_text("scale: 2\n")
    with pytest.raises(FactoryError, match="sets scale 2 but --scale is 4"):
        build(config_for(tmp_path, hr_folder, "realesrgan", degradation_config=str(options)))
    assert not (tmp_path / "shards").exists()  # refused before anything was written


def test_a_dataset_built_when_the_batch_size_mattered_is_refused_saying_so(tmp_path: Path, hr_folder: Path):
    """Commit records written before per-key draws hold the batch size among the settings: a resume is another
    build, and the refusal says why."""
    config = config_for(tmp_path, hr_folder, "bicubic", limit=2)
    build(config)
    path = Path(config.manifests) / "bicubic" / "bicubic-000000.parquet"
    table = pq.read_table(path)
    commit = json.loads(table.schema.metadata[b"factory.commit"])
    commit["build_settings"]["batch_size"] = 8
    commit["build_fingerprint"] = "from an older factory"
    metadata = {**table.schema.metadata, b"factory.commit": json.dumps(commit).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), path)
    with pytest.raises(
        FactoryError, match=r"batch_size 8 -> None; that dataset was built before pairs drew per key"
    ):
        build(config)


# --- colour-shift datasets (paper Section 4.3.2, Figures 10 and 11) ------------------------------------------------


def _pairs(shards: Path) -> list[tuple[dict, np.ndarray, np.ndarray]]:
    """(manifest row, HR, LR) of every sample in the shards under `shards`, decoded."""
    from factory.shards import decode_image, read_samples

    pairs = []
    for path in sorted(shards.glob("*.tar")):
        with path.open("rb") as stream:
            for sample in read_samples(stream):
                members = sample.members
                hr_name = next(name for name in members if name.startswith("hr."))
                lr_name = next(name for name in members if name.startswith("lr."))
                row = json.loads(members["json"])
                pairs.append(
                    (row, decode_image(hr_name, members[hr_name]), decode_image(lr_name, members[lr_name]))
                )
    return pairs


def _pillow_bicubic(hr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The reference bicubic LR: Pillow's BICUBIC (the kernel the project's bicubic matches, to rounding)."""
    return np.asarray(Image.fromarray(hr).resize(size, Image.Resampling.BICUBIC))


def test_target_delta_e_dataset_measures_the_target_against_skimage(tmp_path: Path, hr_folder: Path):
    """`factory build --model bicubic --target-delta-e 3`: the dataset is named bicubic-de3, every pair records the
    shift it got, the card records the target, and skimage's CIEDE2000 between Pillow's bicubic of each stored HR and
    its stored LR averages 3. Tolerance 0.03 (1%): each pair is calibrated to 0.1% on its stored 8-bit LR against
    our bicubic; Pillow's bicubic rounds a few reference pixels one level the other way, which moves a pair's mean
    ΔE by about 0.01 (measured on these crops)."""
    import skimage.color

    manifests = tmp_path / "manifests"
    command = ["build", "--hr", str(hr_folder), "--model", "bicubic", "--target-delta-e", "3"]
    command += ["--crop", "128", "--stride", "256", "--limit", "6", "--actors", "0", "--no-progress"]
    command += ["--out", str(tmp_path / "shards"), "--manifests", str(manifests)]
    outcome = CliRunner().invoke(main, command)
    assert outcome.exit_code == 0, outcome.output

    pairs = _pairs(tmp_path / "shards" / "bicubic-de3")
    assert len(pairs) == 6
    measured = []
    for row, hr, lr in pairs:
        reference = _pillow_bicubic(hr, (lr.shape[1], lr.shape[0]))
        per_pixel = skimage.color.deltaE_ciede2000(
            skimage.color.rgb2lab(reference), skimage.color.rgb2lab(lr)
        )
        measured.append(per_pixel.mean())
        record = json.loads(row["degradation"])
        assert record["target_delta_e"] == 3.0 and record["color_shift"][0] == 0.0  # along (0, 1, 1): L* kept
        assert (
            record["color_shift"][1] == pytest.approx(record["color_shift"][2])
            and record["color_shift"][1] > 0
        )
        assert abs(row["delta_e"] - 3.0) <= 0.003  # the manifest's ΔE measures the shift
    assert abs(np.mean(measured) - 3.0) <= 0.03, measured
    card = json.loads((manifests / "bicubic-de3" / CARD_NAME).read_text())
    assert card["degradation"]["options"] == {"target_delta_e": 3.0}
    assert card["degradation"]["config"]["target_delta_e"] == 3.0
    assert abs(card["delta_e"]["mean"] - 3.0) <= 0.003


def test_color_shift_moves_every_lr_by_the_given_lab_offset(tmp_path: Path, hr_folder: Path):
    """--color-shift=0,4,-2.5: skimage's Lab of each stored LR minus that of Pillow's bicubic of its HR is the
    offset, as a median over pixels (gamut clipping moves a few saturated ones; 8-bit rounding moves each by
    < 0.5 in L*, a*, b*)."""
    import skimage.color

    config = config_for(tmp_path, hr_folder, "bicubic", color_shift=(0.0, 4.0, -2.5), limit=3)
    assert build(config).pairs == 3
    pairs = _pairs(tmp_path / "shards" / "bicubic-lab0_4_-2p5")
    assert len(pairs) == 3
    for row, hr, lr in pairs:
        reference = _pillow_bicubic(hr, (lr.shape[1], lr.shape[0]))
        offset = skimage.color.rgb2lab(lr) - skimage.color.rgb2lab(reference)
        np.testing.assert_allclose(np.median(offset.reshape(-1, 3), axis=0), [0.0, 4.0, -2.5], atol=0.3)
        assert json.loads(row["degradation"])["color_shift"] == [0.0, 4.0, -2.5]
    card = json.loads((Path(config.manifests) / "bicubic-lab0_4_-2p5" / CARD_NAME).read_text())
    assert card["degradation"]["config"]["color_shift"] == [0.0, 4.0, -2.5]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "bicubic", "--color-shift", "0,4,1", "--target-delta-e", "3"], "mutually exclusive"),
        (["--model", "realesrgan", "--target-delta-e", "3"], "only --model bicubic"),
        (["--model", "vqvae2", "--epoch", "1", "--color-shift", "0,4,1"], "only --model bicubic"),
        (["--model", "bicubic", "--color-shift", "0,4"], "three numbers"),
        (["--model", "bicubic", "--color-shift", "nan,1,1"], "finite"),
        (["--model", "bicubic", "--target-delta-e", "0"], "x>0"),
        (["--model", "bicubic", "--target-delta-e", "3", "--color-correct"], "remove the colour shift"),
    ],
)
def test_colour_shift_options_are_checked_in_one_line(tmp_path: Path, hr_folder: Path, arguments, message):
    command = ["build", "--hr", str(hr_folder), *arguments, "--actors", "0", "--no-progress"]
    command += ["--out", str(tmp_path / "shards"), "--manifests", str(tmp_path / "manifests")]
    outcome = CliRunner().invoke(main, command)
    assert outcome.exit_code != 0 and message in outcome.output, outcome.output
    assert "Traceback" not in outcome.output and not (tmp_path / "shards").exists()
