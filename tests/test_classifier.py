"""The degradation classifier: Eq. 2 entropy against hand-computed values and scipy, training to clearly above chance
on CPU, tiled prediction, and relabelling a dataset by rewriting only its manifests."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.stats
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from factory.checkpoints import file_sha256
from factory.classifier.checkpoint import save_classifier
from factory.classifier.labeler import Labeler, tile_origins
from factory.classifier.network import build_network
from factory.classifier.relabel import dataset_entropy
from factory.classifier.synthesis import synthesise
from factory.classifier.training import ClassifierTrainConfig, train_classifier
from factory.cli import main
from factory.corruptions import CORRUPTIONS, corrupt
from factory.diversity import degradation_entropy
from factory.manifests import COMMIT_METADATA_KEY, LABEL_PROB_COLUMNS, read_manifests, verify, write_manifest
from factory.shards import encode_image
from factory.storage import Storage

# --- entropy (paper Eq. 2) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, expected",
    [
        (["fog"], 0.0),  # one class: no diversity
        (["fog", "snow"], math.log(2)),  # two equal classes: ln 2 = 0.693147
        (["fog", "fog", "fog", "snow"], 0.5623351446188083),  # -(3/4 ln 3/4 + 1/4 ln 1/4), by hand
        (list(CORRUPTIONS), math.log(15)),  # uniform over 15: the maximum, ln 15 = 2.708050
        (["fog", None, "snow", None], math.log(2)),  # unlabelled pairs do not count
    ],
)
def test_entropy_matches_hand_computed_values(labels, expected):
    assert degradation_entropy(labels) == pytest.approx(expected, abs=1e-12)


def test_entropy_agrees_with_scipy_and_takes_counts_and_a_base():
    counts = {"fog": 5, "snow": 3, "frost": 2, "contrast": 0}
    # scipy.stats.entropy normalises counts to proportions and uses the natural log by default.
    assert degradation_entropy(counts) == pytest.approx(scipy.stats.entropy([5, 3, 2]), rel=1e-12)
    assert degradation_entropy(counts, base=2) == pytest.approx(
        scipy.stats.entropy([5, 3, 2], base=2), rel=1e-12
    )
    assert degradation_entropy({"a": 1, "b": 1}, base=2) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        degradation_entropy([None, None])
    assert math.copysign(1.0, degradation_entropy(["fog", "fog"])) == 1.0  # 0.0, not -0.0 ("-0.000" in stats)


# --- training --------------------------------------------------------------------------------------------------------

# The CPU training test: resnet18 at 16x16 (tiles this small keep training near 30 s on one idle core), 64 images per
# class, 4 epochs, no JPEG storage step (at this size it hides the subtler classes), 20% held out (13 per class, 195).
# The test asks for 3x chance (20%; chance is 1/15 = 6.7%). Held-out accuracy measured on one AMD EPYC, seeds 0-4:
#   1 thread:  ATEN_CPU_CAPABILITY=default 26.7-29.7%, avx2 27.2-31.3%, avx512 (native) 27.2-32.3%
#   2 threads (seeds 0-2): default 28.7-31.3%, avx2 27.2-29.2%
# (The fixture sets one torch thread whatever OMP_NUM_THREADS says.)
# With 32 per class (90 held out) it was 14.4-25.6% over seeds 0-4 at default and failed 3x chance on another CPU
# at 18.9%: a bar inside the spread, which 64 per class lifts well clear of.
TRAIN_SETTINGS = dict(
    arch="resnet18", per_class=64, size=16, epochs=4, batch_size=32, seed=0, storage_jpeg_quality=None
)
CHANCE = 1 / len(CORRUPTIONS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, photos):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("classifier")
    config = ClassifierTrainConfig(
        data="unused", out=str(folder / "classifier.safetensors"), **TRAIN_SETTINGS
    )
    return train_classifier(config, sources=list(photos.values()))


def test_synthesis_is_balanced_deterministic_and_covers_every_severity(photos):
    first = synthesise(list(photos.values()), per_class=20, size=16, seed=3)
    second = synthesise(list(photos.values()), per_class=20, size=16, seed=3)
    assert first.images.shape == (300, 16, 16, 3) and first.images.dtype == np.uint8
    np.testing.assert_array_equal(first.images, second.images)
    assert np.bincount(first.labels).tolist() == [20] * 15
    assert set(first.severities.tolist()) == {1, 2, 3, 4, 5}


def test_classifier_trains_clearly_above_chance(trained):
    assert trained.accuracy >= 3 * CHANCE, trained.accuracy  # >= 20%; measured 26.7-32.3% (TRAIN_SETTINGS)
    assert trained.confusion.shape == (15, 15) and trained.confusion.sum() == 15 * round(64 * 0.2)
    assert trained.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for output in (trained.checkpoint, trained.figure, trained.metrics):
        assert output.stat().st_mode & 0o044 == 0o044  # shared outputs: readable by group and others
    metrics = json.loads(trained.metrics.read_text())
    assert metrics["accuracy"] == pytest.approx(trained.accuracy) and metrics["classes"] == list(CORRUPTIONS)


def test_training_is_reproducible_for_a_seed(tmp_path, photos):
    """Same config and seed, same CPU thread count: the same weights, bit for bit (the metadata differs: it records
    the output path)."""
    settings = {**TRAIN_SETTINGS, "per_class": 4, "epochs": 1, "threads": 1}
    checkpoints = []
    for run in ("a", "b"):
        config = ClassifierTrainConfig(data="unused", out=str(tmp_path / run / "c.safetensors"), **settings)
        checkpoints.append(train_classifier(config, sources=list(photos.values())).checkpoint)
    first, second = (load_file(path) for path in checkpoints)
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_checkpoint_loads_with_its_metadata(trained):
    labeler = Labeler.load(trained.checkpoint)
    assert labeler.classes == CORRUPTIONS and labeler.arch == "resnet18" and labeler.input_size == 16
    assert labeler.sha256 == hashlib.sha256(trained.checkpoint.read_bytes()).hexdigest()
    labels, probabilities = labeler.predict(torch.rand(3, 3, 16, 16))
    assert len(labels) == 3 and set(labels) <= set(CORRUPTIONS)
    assert probabilities.shape == (3, 15)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))


def test_foreign_or_missing_checkpoint_is_a_clear_error(tmp_path):
    from factory.config import FactoryError

    with pytest.raises(FactoryError, match="no classifier"):
        Labeler.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(FactoryError, match="not a safetensors classifier"):
        Labeler.load(tmp_path / "junk.safetensors")


# --- tiles: how a large LR image meets a small classifier --------------------------------------------------------------


def test_tile_origins_cover_the_image():
    assert tile_origins(256, 64) == [0, 64, 128, 192]  # non-overlapping
    assert tile_origins(100, 64) == [0, 36]  # an end-aligned last tile covers the remainder
    assert tile_origins(64, 64) == [0]


def test_prediction_is_the_mean_over_non_overlapping_tiles(trained):
    labeler = Labeler.load(trained.checkpoint)
    image = torch.rand(2, 3, 64, 48)  # 4 x 3 tiles of 16
    _, probabilities = labeler.predict(image)
    expected = torch.stack(
        [
            labeler.predict(image[:, :, top : top + 16, left : left + 16])[1]
            for top in range(0, 64, 16)
            for left in range(0, 48, 16)
        ]
    ).mean(dim=0)
    torch.testing.assert_close(probabilities, expected)
    # Sizes that are not multiples of the tile, and images smaller than one tile, are handled too.
    assert labeler.predict(torch.rand(1, 3, 21, 40))[1].shape == (1, 15)
    assert labeler.predict(torch.rand(1, 3, 10, 10))[1].shape == (1, 15)


def test_tiles_keep_the_noise_that_resizing_erases(photos):
    """Why tiles: the classifier must see pixel-scale degradations. A 256x256 image with severity-3 gaussian noise
    keeps its noise in every 64x64 tile (the high-frequency residual of each tile is the image's), while the same
    image resized to 64x64 (the alternative) has lost most of it: antialiased resizing averages 16 pixels into one,
    dividing independent noise's standard deviation by about 4."""
    from factory.color import bicubic_resize

    clean = np.ascontiguousarray(photos["astronaut"][100:356, 100:356])
    noisy = corrupt(clean, "gaussian_noise", 3, seed=0)

    def noise_level(image: torch.Tensor) -> float:
        # Residual against a 3x3 box blur (a crude denoiser); the photo's own detail is subtracted out below.
        box = torch.nn.functional.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=False)
        return float((image - box).std())

    def as_tensor(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255

    tiles_noisy = [
        noise_level(as_tensor(noisy)[..., t : t + 64, s : s + 64])
        for t in range(0, 256, 64)
        for s in range(0, 256, 64)
    ]
    tiles_clean = [
        noise_level(as_tensor(clean)[..., t : t + 64, s : s + 64])
        for t in range(0, 256, 64)
        for s in range(0, 256, 64)
    ]
    resized_noisy = noise_level(bicubic_resize(as_tensor(noisy), (64, 64)))
    resized_clean = noise_level(bicubic_resize(as_tensor(clean), (64, 64)))
    tile_excess = float(np.mean(tiles_noisy) - np.mean(tiles_clean))
    resized_excess = resized_noisy - resized_clean
    assert tile_excess > 3 * max(resized_excess, 0.0)


# --- relabelling a dataset: only the manifests change -------------------------------------------------------------------


def make_dataset(
    root: Path, photos, dataset: str = "toy", shards: int = 2, per_shard: int = 3
) -> tuple[Path, Path]:
    """A small dataset in the factory layout: tar shards (key.hr.png, key.lr.png, key.json) and one manifest per
    shard with its commit record, as `factory build` writes them (factory.shards codecs, factory.manifests schema)."""
    shard_root, manifest_root = root / "shards", root / "manifests"
    (shard_root / dataset).mkdir(parents=True)
    images = list(photos.values())
    for shard_index in range(shards):
        relative = f"{dataset}/{dataset}-{shard_index:06d}.tar"
        rows, buffer = [], io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for pair in range(per_shard):
                key = f"{dataset}_{shard_index}_{pair}"
                hr = np.ascontiguousarray(images[pair % len(images)][:128, :128])
                lr = (
                    hr[::4, ::4]
                    if pair % 2
                    else corrupt(np.ascontiguousarray(hr[::2, ::2]), "gaussian_noise", 4, pair)
                )
                hr_bytes, lr_bytes = encode_image(hr, "png"), encode_image(np.ascontiguousarray(lr), "png")
                row = dict(
                    key=key, dataset=dataset, model="bicubic", source=f"photo{pair}.png", source_root="test",
                    source_sha256="0" * 64, crop_top=0, crop_left=0, crop_height=128, crop_width=128, scale=4,
                    delta_e=0.5, delta_e_p95=1.0, psnr=30.0, ssim=0.9, color_corrected=False, shard=relative,
                    codec="png", hr_bytes=len(hr_bytes), lr_bytes=len(lr_bytes),
                    hr_sha256=hashlib.sha256(hr_bytes).hexdigest(), lr_sha256=hashlib.sha256(lr_bytes).hexdigest(),
                    seed=0, factory_version="test",
                )  # fmt: skip
                for name, data in (
                    ("hr.png", hr_bytes),
                    ("lr.png", lr_bytes),
                    ("json", json.dumps(row).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                rows.append(row)
        (shard_root / relative).write_bytes(buffer.getvalue())
        commit = {"shard": relative, "shard_bytes": len(buffer.getvalue()),
                  "shard_sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}  # fmt: skip
        write_manifest(Storage(manifest_root), relative.replace(".tar", ".parquet"), rows, commit)
    return shard_root, manifest_root


def tree_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): file_sha256(path) for path in sorted(root.rglob("*")) if path.is_file()
    }


def test_label_rewrites_only_the_manifests(tmp_path, photos, trained):
    shard_root, manifest_root = make_dataset(tmp_path, photos)
    shards_before = tree_digests(shard_root)
    before = read_manifests(manifest_root, "toy")
    assert before.column("label").null_count == len(before)
    assert dataset_entropy(manifest_root, "toy") is None

    result = CliRunner().invoke(
        main,
        ["label", "--classifier", str(trained.checkpoint), "--shards", str(shard_root), "--manifests",
         str(manifest_root), "--dataset", "toy"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "labelled 6 pair(s) in 2 manifest(s)" in result.output

    assert tree_digests(shard_root) == shards_before  # shards byte-identical
    after = read_manifests(manifest_root, "toy")
    assert after.column("label").null_count == 0 and set(after.column("label").to_pylist()) <= set(
        CORRUPTIONS
    )
    assert set(after.column("classifier_sha256").to_pylist()) == {file_sha256(trained.checkpoint)}
    probabilities = np.stack([after.column(name).to_numpy() for name in LABEL_PROB_COLUMNS], axis=1)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    chosen = probabilities[
        np.arange(6), [CORRUPTIONS.index(label) for label in after.column("label").to_pylist()]
    ]
    np.testing.assert_allclose(after.column("label_prob").to_numpy(), chosen, rtol=1e-6)
    np.testing.assert_allclose(chosen, probabilities.max(axis=1), rtol=1e-6)
    # The other columns are untouched, the commit record is kept, and the dataset still verifies.
    unchanged = [
        name for name in before.schema.names if name not in ("label", "label_prob", "classifier_sha256")
    ]
    unchanged = [name for name in unchanged if name not in LABEL_PROB_COLUMNS]
    assert after.select(unchanged).equals(before.select(unchanged))
    for path in sorted((manifest_root / "toy").glob("toy-*.parquet")):
        assert COMMIT_METADATA_KEY in pq.read_schema(path).metadata
    assert verify(shard_root, manifest_root, "toy").ok
    # Entropy over the new labels (Eq. 2), as the command reported it.
    labels = after.column("label").to_pylist()
    assert dataset_entropy(manifest_root, "toy") == pytest.approx(degradation_entropy(labels))
    assert f"entropy H = {degradation_entropy(labels):.3f}" in result.output


def test_labelling_twice_gives_the_same_manifests(tmp_path, photos, trained):
    shard_root, manifest_root = make_dataset(tmp_path, photos)
    arguments = ["label", "--classifier", str(trained.checkpoint), "--shards", str(shard_root),
                 "--manifests", str(manifest_root)]  # fmt: skip
    assert CliRunner().invoke(main, arguments).exit_code == 0
    first = read_manifests(manifest_root)
    assert CliRunner().invoke(main, arguments).exit_code == 0
    assert read_manifests(manifest_root).equals(first)


def test_label_errors_are_one_line(tmp_path, photos, trained):
    shard_root, manifest_root = make_dataset(tmp_path, photos)
    runner = CliRunner()
    missing = runner.invoke(
        main, ["label", "--classifier", str(trained.checkpoint), "--manifests", str(tmp_path / "none")]
    )
    assert missing.exit_code == 2 and "no pair manifests" in missing.output
    (shard_root / "toy" / "toy-000001.tar").unlink()
    broken = runner.invoke(
        main,
        [
            "label",
            "--classifier",
            str(trained.checkpoint),
            "--shards",
            str(shard_root),
            "--manifests",
            str(manifest_root),
        ],
    )
    assert broken.exit_code == 2 and "missing" in broken.output and "Traceback" not in broken.output


@pytest.mark.slow
def test_build_then_relabel_leaves_bicubic_shards_byte_identical(tmp_path, trained):
    """End to end with the real build: `factory build --model bicubic --classifier` labels pairs, `factory label`
    relabels them, the shards' bytes do not change and `factory verify` passes (in-process build, no Ray)."""
    runner = CliRunner()
    shards, manifests = tmp_path / "shards", tmp_path / "manifests"
    built = runner.invoke(
        main,
        ["build", "--model", "bicubic", "--limit", "4", "--shard-size", "2", "--out", str(shards), "--manifests",
         str(manifests), "--actors", "0", "--no-progress", "--classifier", str(trained.checkpoint)],
    )  # fmt: skip
    assert built.exit_code == 0, built.output
    labelled_by_build = read_manifests(manifests, "bicubic")
    assert labelled_by_build.column("label").null_count == 0
    before = tree_digests(shards)
    relabelled = runner.invoke(main, ["label", "--classifier", str(trained.checkpoint), "--shards", str(shards),
                                      "--manifests", str(manifests), "--dataset", "bicubic"])  # fmt: skip
    assert relabelled.exit_code == 0, relabelled.output
    assert tree_digests(shards) == before
    after = read_manifests(manifests, "bicubic")
    # The same classifier on the same LR images: the same labels as the build wrote.
    assert after.column("label").to_pylist() == labelled_by_build.column("label").to_pylist()
    np.testing.assert_allclose(
        after.column("label_prob").to_numpy(), labelled_by_build.column("label_prob").to_numpy(), rtol=1e-4
    )
    assert verify(shards, manifests, "bicubic").ok

    # The dataset card carries the labels' counts and entropy H: written by the build, rewritten by `factory label`.
    def card_labels() -> dict:
        return json.loads((manifests / "bicubic" / "_card.json").read_text())["labels"]

    labels = after.column("label").to_pylist()
    assert card_labels()["entropy"] == pytest.approx(degradation_entropy(labels))
    assert card_labels()["counts"] == {name: labels.count(name) for name in CORRUPTIONS}
    assert card_labels()["classifier_sha256"] == [file_sha256(trained.checkpoint)]
    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"  # an untrained network: other labels, same wiring
    save_classifier(
        build_network("resnet18"), ClassifierTrainConfig(data="", arch="resnet18", size=16), 0.0, other
    )
    relabelled = runner.invoke(main, ["label", "--classifier", str(other), "--shards", str(shards),
                                      "--manifests", str(manifests), "--dataset", "bicubic"])  # fmt: skip
    assert relabelled.exit_code == 0, relabelled.output
    labels = read_manifests(manifests, "bicubic").column("label").to_pylist()
    assert card_labels() == {
        "counts": {name: labels.count(name) for name in CORRUPTIONS},
        "unlabelled": 0,
        "classifier_sha256": [file_sha256(other)],
        "entropy": pytest.approx(degradation_entropy(labels)),
        "entropy_unit": "nats (paper Eq. 2, natural log)",
    }


@pytest.fixture
def untrained_classifier(tmp_path) -> Path:
    """An untrained ResNet-18 classifier: its labels are arbitrary, the wiring around it is not."""
    torch.manual_seed(0)
    path = tmp_path / "untrained.safetensors"
    save_classifier(
        build_network("resnet18"), ClassifierTrainConfig(data="", arch="resnet18", size=16), 0.0, path
    )
    return path


def label_arguments(classifier: Path, shard_root: Path, manifest_root: Path) -> list[str]:
    return [
        "label",
        "--classifier",
        str(classifier),
        "--shards",
        str(shard_root),
        "--manifests",
        str(manifest_root),
    ]


def test_label_over_a_corrupt_manifest_names_it_in_one_line(tmp_path, photos, untrained_classifier):
    # It was pyarrow.lib.ArrowInvalid with a traceback, after the manifests before it had been relabelled.
    shard_root, manifest_root = make_dataset(tmp_path, photos)
    corrupt_manifest = manifest_root / "toy" / "toy-000001.parquet"
    corrupt_manifest.write_bytes(b"PAR1 truncated")
    before = tree_digests(manifest_root)
    result = CliRunner().invoke(main, label_arguments(untrained_classifier, shard_root, manifest_root))
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: unreadable manifest {corrupt_manifest}: "), line
    assert tree_digests(manifest_root) == before  # nothing relabelled


def test_label_is_refused_while_a_build_writes_the_dataset(tmp_path, photos, untrained_classifier):
    """`factory label` ignored `_build.lock`: it labelled the pairs a running build had written so far and exited 0,
    and the build went on adding unlabelled ones. It now takes the build's lock, naming a live holder."""
    import socket
    import subprocess
    import sys

    from factory.manifests import LOCK_NAME

    shard_root, manifest_root = make_dataset(tmp_path, photos)
    lock = manifest_root / "toy" / LOCK_NAME
    build = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(
            json.dumps({"pid": build.pid, "host": socket.gethostname(), "started": 0, "kind": "build"})
        )
        before = tree_digests(manifest_root)
        result = CliRunner().invoke(main, label_arguments(untrained_classifier, shard_root, manifest_root))
        assert result.exit_code == 2, result.output
        assert (
            f"error: a build is writing dataset toy (pid {build.pid} on {socket.gethostname()})"
            in result.output
        )
        assert tree_digests(manifest_root) == before
    finally:
        build.kill()
        build.wait()
    # The build is gone: its lock is taken over, the pairs labelled, and the lock released.
    result = CliRunner().invoke(main, label_arguments(untrained_classifier, shard_root, manifest_root))
    assert result.exit_code == 0, result.output
    assert read_manifests(manifest_root, "toy").column("label").null_count == 0
    assert not lock.exists()
