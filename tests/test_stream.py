"""PairedPatches: alignment, where= selection, truncated shards, exact epochs over ranks and workers, uniform runs,
mixing, partial and stale shards, DDP step counts."""

from __future__ import annotations

import io
import logging
import os
import socket
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sr_pairs import crops, write_pairs
from torch.utils.data import DataLoader

from factory.color import downsample
from factory.config import FactoryError
from factory.filter import FilterConfig, filter_dataset
from factory.manifests import read_manifests
from factory.stream import PairedPatches, expand_urls, iterate_pairs, plan_pass

SCALE = 4


@pytest.fixture(scope="module")
def pairs(photos):
    return crops(photos, size=128, per_photo=3)  # 18 HR crops of 128x128 -> LR 32x32


@pytest.fixture(scope="module")
def small_pairs(photos):
    return crops(photos, size=64, per_photo=9)  # 54 HR crops of 64x64 -> LR 16x16


@pytest.fixture
def uneven(tmp_path, small_pairs):
    """39 pairs in 3 shards of 16, 16 and 7 (the issue's case): fewer shards than 2 ranks x 2 workers, unequal."""
    pairs = small_pairs[:39]
    write_pairs(tmp_path / "shards", tmp_path / "manifests", pairs, per_shard=16)
    return tmp_path / "shards", tmp_path / "manifests", pairs


@pytest.fixture
def built(tmp_path, pairs):
    shards = write_pairs(tmp_path / "shards", tmp_path / "manifests", pairs, per_shard=3, codec="zst")
    return tmp_path / "shards", tmp_path / "manifests", shards


def _bicubic_build(root: Path, photos: dict, codec: str) -> Path:
    """`factory build --model bicubic` (in-process, no Ray) over two photos cut into 128 crops."""
    from click.testing import CliRunner
    from PIL import Image

    from factory.cli import main

    (root / "hr").mkdir(parents=True)
    for name in ("coffee", "chelsea"):
        Image.fromarray(photos[name]).save(root / "hr" / f"{name}.png")
    result = CliRunner().invoke(
        main,
        [
            "build",
            "--model",
            "bicubic",
            "--hr",
            str(root / "hr"),
            "--crop",
            "128",
            "--stride",
            "256",
            "--shard-size",
            "3",
            "--codec",
            codec,
            "--out",
            str(root / "shards"),
            "--manifests",
            str(root / "manifests"),
            "--actors",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    return root / "shards" / "bicubic"


@pytest.mark.parametrize("codec", ["zst", "png"])
def test_patches_are_aligned(tmp_path, photos, codec):
    shards = _bicubic_build(tmp_path, photos, codec)
    dataset = PairedPatches(
        str(shards),
        patch_size=16,
        scale=SCALE,
        manifests=tmp_path / "manifests",
        patches_per_pair=4,
        shuffle=8,
    )
    samples = list(dataset)
    assert len(samples) == dataset.selected_pairs * 4 > 0
    for sample in samples:
        lr, hr = sample["lr"], sample["hr"]
        assert lr.shape == (3, 16, 16) and hr.shape == (3, 64, 64)
        assert lr.dtype == hr.dtype == torch.float32 and 0 <= lr.min() and hr.max() <= 1
        # Reference: the project's bicubic of the HR patch is the LR patch (up to 8-bit rounding: the LR was stored
        # as uint8) away from a 2-pixel border, where the kernel of the whole image saw pixels outside the patch.
        reference = downsample(hr[None], SCALE)[0]
        assert (reference - lr)[:, 2:-2, 2:-2].abs().max() <= 1 / 255 + 1e-4
        # The same check fails for a crop off by one LR pixel: the test can tell aligned from misaligned.
        shifted = downsample(hr[None, :, SCALE:, SCALE:], SCALE)[0]
        assert (shifted - lr[:, :-1, :-1])[:, 2:-2, 2:-2].abs().max() > 4 / 255


def test_augmentation_covers_the_eight_symmetries(built):
    shards_root, _, _ = built
    dataset = PairedPatches(
        str(shards_root / "bicubic"), patch_size=32, scale=SCALE, patches_per_pair=40, shuffle=0
    )
    # A whole 32x32 LR image as the patch: every sample of a key is one of the 8 symmetries of the same LR image.
    seen: dict[str, set[bytes]] = {}
    for sample in dataset:
        seen.setdefault(sample["key"], set()).add(sample["lr"].numpy().tobytes())
    assert max(len(variants) for variants in seen.values()) == 8
    plain = PairedPatches(
        str(shards_root / "bicubic"), patch_size=32, scale=SCALE, patches_per_pair=5, shuffle=0, augment=False
    )
    assert all(
        len({s["lr"].numpy().tobytes() for s in plain if s["key"] == key}) == 1 for key in list(seen)[:2]
    )


def test_where_streams_exactly_the_selected_keys(built, caplog):
    shards_root, manifests_root, shards = built
    where = "label = 'defocus_blur' AND delta_e < 1.2"
    # Reference: the same predicate evaluated by pyarrow on the manifest table (not DuckDB).
    table = read_manifests(manifests_root)
    mask = pc.and_(pc.equal(table["label"], "defocus_blur"), pc.less(table["delta_e"], 1.2))
    expected = sorted(table.filter(mask)["key"].to_pylist())
    assert 0 < len(expected) < len(table)
    selected_shards = set(table.filter(mask)["shard"].to_pylist())
    # A shard without a selected pair is never opened: make one unreadable and expect no warning about it.
    untouched = next(path for path in shards if f"bicubic/{path.name}" not in selected_shards)
    untouched.write_bytes(b"not a tar")
    dataset = PairedPatches(
        str(shards_root / "bicubic"),
        patch_size=8,
        scale=SCALE,
        manifests=manifests_root,
        where=where,
        patches_per_pair=1,
        shuffle=0,
    )
    with caplog.at_level(logging.WARNING, logger="factory.stream"):
        keys = sorted(sample["key"] for sample in dataset)
    assert keys == expected
    assert not caplog.records
    assert dataset.selected_pairs == len(expected)


def test_where_without_matches_is_a_clear_error(built):
    shards_root, manifests_root, _ = built
    with pytest.raises(FactoryError, match="select no pair"):
        PairedPatches(str(shards_root / "bicubic"), manifests=manifests_root, where="delta_e > 1000")


def test_truncated_shard_keeps_complete_samples_with_a_warning(built, caplog):
    shards_root, _, shards = built
    whole = [key for key, _ in iterate_pairs(str(shards[0]))]
    with tarfile.open(shards[0]) as archive:  # cut inside the second sample's HR payload
        cut = next(member.offset_data for member in archive if member.name == f"{whole[1]}.hr.npy.zst") + 100
    shards[0].write_bytes(shards[0].read_bytes()[:cut])
    with caplog.at_level(logging.WARNING, logger="factory.stream"):
        kept = [key for key, _ in iterate_pairs(str(shards[0]))]
        samples = list(
            PairedPatches([str(path) for path in shards], patch_size=8, patches_per_pair=1, shuffle=0)
        )
    assert kept == whole[:1]
    assert any("ends early" in record.message for record in caplog.records)
    assert len(samples) == len(kept) + 3 * (len(shards) - 1)


def test_an_incomplete_sample_is_skipped(tmp_path, pairs):
    shard = write_pairs(tmp_path / "shards", tmp_path / "manifests", pairs[:2], per_shard=2)[0]
    with tarfile.open(shard) as archive:
        members = [(member, archive.extractfile(member).read()) for member in archive]
    with tarfile.open(shard, "w") as archive:  # drop the first sample's HR
        for member, data in members:
            if not (member.name.startswith(pairs[0][0]) and ".hr." in member.name):
                archive.addfile(member, io.BytesIO(data))
    assert [key for key, _ in iterate_pairs(str(shard))] == [pairs[1][0]]


def test_weighted_mixing(tmp_path, pairs):
    write_pairs(tmp_path / "shards", tmp_path / "manifests", pairs[:6], dataset="first", per_shard=3)
    write_pairs(tmp_path / "shards", tmp_path / "manifests", pairs[6:12], dataset="second", per_shard=3)
    first = {key for key, _ in pairs[:6]}
    dataset = PairedPatches(
        [str(tmp_path / "shards" / "first"), str(tmp_path / "shards" / "second")],
        weights=[3, 1],
        patch_size=8,
        patches_per_pair=2,
        epoch_length=800,
        shuffle=0,
        augment=False,
    )
    share = np.mean([sample["key"] in first for sample in dataset])
    # Binomial(800, 0.75): standard deviation 0.015; 4 of them.
    assert abs(share - 0.75) < 0.06


def _ddp_reader(rank: int, world_size: int, shards_dir: str, port: int, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # No rank/world_size given: the dataset reads them from torch.distributed. No manifests: the tar listing.
        dataset = PairedPatches(shards_dir, patch_size=8, patches_per_pair=1, batch_size=4, seed=3)
        steps, keys = 0, []
        for batch in DataLoader(dataset, batch_size=4, num_workers=2, multiprocessing_context="fork"):
            keys += batch["key"]
            step = torch.ones(1)
            # A collective per step, as DDP's gradient all-reduce: unequal counts would hang.
            dist.all_reduce(step)
            steps += 1
        torch.save({"steps": steps, "keys": keys}, Path(results) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_with_two_workers_read_one_exact_epoch(tmp_path, uneven):
    """2 ranks x 2 workers under a real process group over 16/16/7 pairs: 4 readers of ceil(39 / 4) = 10 patches,
    padded to 12 (3 batches of 4): 6 steps each, every pair at least once, 48 - 39 = 9 repeats."""
    shards_root, _, pairs = uneven
    with socket.socket() as probe:  # a free port for the rendezvous (other test runs may hold 29500)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(
        _ddp_reader,
        args=(2, str(shards_root / "bicubic"), port, str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert [result["steps"] for result in results] == [6, 6]
    read = Counter(key for result in results for key in result["keys"])
    assert set(read) == {key for key, _ in pairs} and sum(read.values()) == 48


def test_a_scale_mismatch_is_refused(built):
    shards_root, manifests_root, _ = built
    with pytest.raises(FactoryError, match="pairs are x4 but .* at x2"):
        PairedPatches(str(shards_root / "bicubic"), scale=2, manifests=manifests_root)
    # Without manifests every pair is skipped (crops would be misaligned), and a stream with nothing usable stops.
    with pytest.raises(FactoryError, match="no usable pair"):
        list(PairedPatches(str(shards_root / "bicubic"), scale=2, patch_size=8, epoch_length=10))


def test_a_shard_root_streams_the_datasets_in_it(tmp_path, pairs):
    """`--shards shards/` (the build's --out) means every dataset under it; where= then picks among them."""
    shards_root, manifests_root = tmp_path / "shards", tmp_path / "manifests"
    alpha = write_pairs(shards_root, manifests_root, pairs[:9], dataset="alpha", per_shard=3)
    beta = write_pairs(shards_root, manifests_root, pairs[9:], dataset="beta", per_shard=3)
    (shards_root / "alpha" / ".hidden.tar").write_bytes(b"")  # hidden names are never shards
    assert expand_urls(shards_root) == [str(path) for path in alpha + beta]
    assert expand_urls(shards_root / "beta") == [str(path) for path in beta]
    dataset = PairedPatches(
        str(shards_root), patch_size=8, manifests=manifests_root, where="dataset = 'beta'", patches_per_pair=1
    )
    assert sorted(sample["key"] for sample in dataset) == sorted(key for key, _ in pairs[9:])
    with pytest.raises(FactoryError, match="no shards"):
        expand_urls(manifests_root)  # Parquet files only
    # A mistyped local path is an error now, not a shard that "ends early" in every reader once training started.
    with pytest.raises(FactoryError, match="no such shard or folder: .*nowhere"):
        expand_urls(tmp_path / "nowhere")
    with pytest.raises(FactoryError, match=r"beta-000003.tar \(and 1 more\)"):
        expand_urls(f"{shards_root}/beta/beta-{{000000..000004}}.tar")  # beta has shards 0-2


def test_a_filtered_copy_under_the_same_root_is_read_once(tmp_path, pairs, caplog):
    """`factory filter` copies pairs (same keys, same bytes) into a new dataset beside its parent: streaming the
    root with manifests reads each pair once; two entries (parent and copy, mixed by weight) keep both."""
    shards_root, manifests_root = tmp_path / "shards", tmp_path / "manifests"
    write_pairs(shards_root, manifests_root, pairs[:9], dataset="alpha", per_shard=3)
    filter_dataset(FilterConfig("delta_e < 0.5", shards_root, manifests_root, shards_root, name="alpha-low"))
    read = [
        sample["key"]
        for sample in PairedPatches(
            str(shards_root), patch_size=8, manifests=manifests_root, patches_per_pair=1
        )
    ]
    assert sorted(read) == sorted(key for key, _ in pairs[:9])  # 9 pairs, not 9 + the 5 copies

    mixed = PairedPatches(
        [str(shards_root / "alpha"), str(shards_root / "alpha-low")],
        weights=[1, 1],
        patch_size=8,
        manifests=manifests_root,
        epoch_length=10,
    )
    assert mixed.selected_pairs == 9 + 5  # each entry keeps its own pairs: oversampling by mixing still works

    with caplog.at_level(logging.WARNING, logger="factory.stream"):
        PairedPatches(
            str(shards_root), patch_size=8, epoch_length=1
        )  # no manifests: cannot tell copies apart
    assert "spans 2 datasets (alpha, alpha-low)" in caplog.text


def test_pipe_urls_match_their_manifests(built):
    shards_root, manifests_root, shards = built
    urls = [f"pipe:cat {path}" for path in shards]
    dataset = PairedPatches(
        urls, patch_size=8, manifests=manifests_root, where="delta_e < 0.5", patches_per_pair=1, shuffle=0
    )
    table = read_manifests(manifests_root)
    expected = sorted(table.filter(pc.less(table["delta_e"], 0.5))["key"].to_pylist())
    assert sorted(sample["key"] for sample in dataset) == expected


# --------------------------------------------------------------------------------------------------------------------
# Exact epochs, uniform runs: ranks and DataLoader workers simulated in this process (rank/world_size given, the
# worker info patched where the dataset asks for it); the gloo test above runs the real thing once.
# --------------------------------------------------------------------------------------------------------------------


def _as_worker(worker: int, workers: int):
    """Be DataLoader worker `worker` of `workers` (0: the main process) for the dataset, in this process."""
    info = SimpleNamespace(id=worker, num_workers=workers) if workers else None
    return mock.patch("factory.stream.get_worker_info", return_value=info)


def _ranks(urls, world: int = 2, **options) -> list[PairedPatches]:
    return [
        PairedPatches(urls, rank=rank, world_size=world, patch_size=8, shuffle=0, augment=False, **options)
        for rank in range(world)
    ]


def _epoch(datasets: list[PairedPatches], workers: int, epoch: int) -> list[list[str]]:
    """The keys every reader (rank x worker) yields in `epoch`, one list per reader."""
    readers = []
    for dataset in datasets:
        dataset.set_epoch(epoch)
        for worker in range(max(workers, 1)):
            with _as_worker(worker, workers):
                readers.append([sample["key"] for sample in dataset])
    return readers


def _run(datasets: list[PairedPatches], workers: int, epochs: int) -> Counter:
    return Counter(
        key for epoch in range(epochs) for keys in _epoch(datasets, workers, epoch) for key in keys
    )


@pytest.mark.parametrize("sizes", [[16, 16, 7], [5], [3, 1, 0, 9, 2], [1, 1]])
@pytest.mark.parametrize("readers", [1, 3, 4, 8])
@pytest.mark.parametrize("patches_per_pair", [1, 3])
def test_the_readers_plans_cut_every_pair_exactly_and_pad_at_most_readers_x_batch_minus_one(
    sizes, readers, patches_per_pair
):
    def plans(multiple):
        return [
            plan_pass(
                sizes,
                patches_per_pair=patches_per_pair,
                readers=readers,
                reader=reader,
                generator=np.random.default_rng([7, 2]),  # the same seed in every reader, as the dataset does
                multiple=multiple,
            )
            for reader in range(readers)
        ]

    cut = Counter()
    for pieces in plans(None):
        assert len({piece.shard for piece in pieces}) == len(
            pieces
        )  # each shard opened once, read front to back
        assert all(list(piece.counts) == sorted(piece.counts) for piece in pieces)
        cut.update({(piece.shard, pair): count for piece in pieces for pair, count in piece.counts.items()})
    assert cut == {
        (shard, pair): patches_per_pair for shard, size in enumerate(sizes) for pair in range(size)
    }
    if sum(sizes) * patches_per_pair >= readers:
        padded = [sum(sum(piece.counts.values()) for piece in pieces) for pieces in plans(4)]
        assert len(set(padded)) == 1 and padded[0] % 4 == 0
        assert 0 <= sum(padded) - sum(cut.values()) <= readers * 4 - 1


@pytest.mark.parametrize("manifests", [True, False])
@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_delivers_every_pair_once_over_ranks_and_workers(uneven, workers, manifests):
    shards_root, manifests_root, pairs = uneven
    datasets = _ranks(
        str(shards_root / "bicubic"),
        manifests=manifests_root if manifests else None,
        patches_per_pair=1,
        batch_size=4,
        seed=5,
    )
    for epoch in (0, 1):
        readers = _epoch(datasets, workers, epoch)
        read = Counter(key for keys in readers for key in keys)
        assert set(read) == {key for key, _ in pairs}
        # Every reader yields as many whole batches (so every rank runs as many steps); the padding that takes
        # repeats at most readers x batch - 1 pairs (here 4 readers x 12 or 2 x 20: 9 or 1).
        assert len({len(keys) for keys in readers}) == 1 and len(readers[0]) % 4 == 0
        assert (
            len(readers) * len(readers[0]) - len(pairs)
            == sum(read.values()) - len(pairs)
            <= len(readers) * 4 - 1
        )


@pytest.mark.parametrize("workers", [0, 2])
def test_fifty_epochs_draw_every_pair_equally_often(uneven, workers):
    """The old split gave each reader its shards for good: over 16/16/7 pairs the 7 were drawn 1.44x as often."""
    shards_root, manifests_root, pairs = uneven
    datasets = _ranks(
        str(shards_root / "bicubic"), manifests=manifests_root, patches_per_pair=8, batch_size=4
    )
    drawn = _run(datasets, workers, epochs=50)
    assert set(drawn) == {key for key, _ in pairs}
    assert max(drawn.values()) / min(drawn.values()) <= 1.1


@pytest.mark.parametrize("workers", [0, 2])
def test_a_where_selection_is_exact_per_epoch_and_uniform_over_a_run(uneven, workers):
    shards_root, manifests_root, pairs = uneven
    selected = {
        key for key, _ in pairs[:25]
    }  # delta_e = index / 10: 16 pairs of the first shard, 9 of the second
    datasets = _ranks(
        str(shards_root / "bicubic"), manifests=manifests_root, where="delta_e < 2.45", patches_per_pair=8
    )
    readers = _epoch(datasets, workers, epoch=0)
    assert Counter(key for keys in readers for key in keys) == dict.fromkeys(
        selected, 8
    )  # 200 = 4 x 50 or 2 x 100
    drawn = _run(datasets, workers, epochs=50)
    assert set(drawn) == selected and max(drawn.values()) / min(drawn.values()) <= 1.1


@pytest.mark.parametrize("workers", [0, 2])
def test_two_weighted_datasets_keep_their_weights_and_a_uniform_rate_inside_each(
    tmp_path, small_pairs, workers
):
    first, second = small_pairs[:39], small_pairs[39:]  # 16/16/7 and 8/7 pairs
    write_pairs(tmp_path / "shards", tmp_path / "manifests", first, dataset="first", per_shard=16)
    write_pairs(tmp_path / "shards", tmp_path / "manifests", second, dataset="second", per_shard=8)
    datasets = _ranks(
        [str(tmp_path / "shards" / "first"), str(tmp_path / "shards" / "second")],
        weights=[3, 1],
        manifests=tmp_path / "manifests",
        patches_per_pair=8,
    )
    assert datasets[0].epoch_length == 54 * 8 // 2  # as many patches as one pass over both
    drawn = _run(datasets, workers, epochs=50)
    counts = [[drawn[key] for key, _ in part] for part in (first, second)]
    # 21,600 patches: the share of the first has a standard deviation of 0.003, the ratio of 0.05 (1.6%).
    assert abs(sum(counts[0]) / sum(counts[1]) / 3 - 1) < 0.05
    for part in counts:
        assert min(part) > 0 and max(part) / min(part) <= 1.1


# --------------------------------------------------------------------------------------------------------------------
# Partial, corrupt and stale shards: an error by default, a summary line with allow_partial, a warning without
# manifests. The shard hit is the last (7 pairs), the sample hit its second.
# --------------------------------------------------------------------------------------------------------------------


def _member_boundary_cut(shard: Path, other: Path) -> None:
    with tarfile.open(shard) as archive:
        second = [member for member in archive if member.name.endswith(".hr.npy.zst")][1]
    shard.write_bytes(shard.read_bytes()[: second.offset])  # before the second sample's first header


def _mid_member_cut(shard: Path, other: Path) -> None:
    with tarfile.open(shard) as archive:
        second = [member for member in archive if member.name.endswith(".hr.npy.zst")][1]
    shard.write_bytes(shard.read_bytes()[: second.offset_data + 100])


def _flipped_byte(shard: Path, other: Path) -> None:
    with tarfile.open(shard) as archive:
        second = [member for member in archive if member.name.endswith(".hr.npy.zst")][1]
    data = bytearray(shard.read_bytes())
    data[second.offset_data + second.size // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def _another_build(shard: Path, other: Path) -> None:
    shard.write_bytes(
        other.read_bytes()
    )  # the same name and keys, other images: a rebuild with other settings


FAULTS = {
    "member boundary cut": (_member_boundary_cut, "expected 7, read 1, missing 6, corrupt 0"),
    "mid-member cut": (_mid_member_cut, "expected 7, read 1, missing 6, corrupt 0"),
    "flipped payload byte": (_flipped_byte, "expected 7, read 6, missing 0, corrupt 1"),
    "another build": (_another_build, "expected 7, read 0, missing 0, corrupt 7"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_partial_corrupt_or_stale_shard_fails_and_allow_partial_prints_the_counts(
    tmp_path, uneven, small_pairs, fault, caplog
):
    shards_root, manifests_root, pairs = uneven
    # Another build of the same dataset: the same keys, each with the image of another crop.
    other = [(key, image) for (key, _), (_, image) in zip(pairs[32:], small_pairs[40:47], strict=True)]
    (other_shard,) = write_pairs(tmp_path / "other", tmp_path / "other-manifests", other, per_shard=16)
    damage, counts = FAULTS[fault]
    damage(shards_root / "bicubic" / "bicubic-000002.tar", other_shard)
    url = str(shards_root / "bicubic")

    strict = PairedPatches(url, patch_size=8, manifests=manifests_root, patches_per_pair=1, shuffle=0)
    with pytest.raises(FactoryError, match=f"bicubic/bicubic-000002.tar: {counts}.*allow_partial"):
        list(strict)

    lenient = PairedPatches(
        url, patch_size=8, manifests=manifests_root, patches_per_pair=1, shuffle=0, allow_partial=True
    )
    with caplog.at_level(logging.WARNING, logger="factory.stream"):
        read = [sample["key"] for sample in lenient]
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and f"bicubic/bicubic-000002.tar: {counts}" in lines[0]
    assert "epoch 0, rank 0" in lines[0] and len(read) == 32 + int(counts.split("read ")[1].split(",")[0])
    # A cut shard is also shorter than its commit record says; a flipped byte or another build's images of the
    # same keys need not change the size (a tar is padded to 10 KiB records): their payload sha256s tell.
    assert ("its commit record says" in lines[0]) == fault.endswith("cut")


@pytest.mark.parametrize("fault", ["member boundary cut", "mid-member cut"])
def test_without_manifests_a_cut_shard_is_a_warning_with_the_counts(tmp_path, uneven, fault, caplog):
    shards_root, _, _ = uneven
    FAULTS[fault][0](shards_root / "bicubic" / "bicubic-000002.tar", tmp_path)
    with caplog.at_level(logging.WARNING, logger="factory.stream"):
        dataset = PairedPatches(str(shards_root / "bicubic"), patch_size=8, patches_per_pair=1, shuffle=0)
        assert len(list(dataset)) == 32 + 1  # the complete pairs of the listing, each once
    (line,) = [record.getMessage() for record in caplog.records]
    samples = 2 if fault == "mid-member cut" else 1  # the cut sample's HR header is there, its data is not
    assert f"bicubic-000002.tar: {samples} samples in its tar listing, 1 complete" in line
    assert ("ends early" if fault == "mid-member cut" else "without the end-of-archive marker") in line
