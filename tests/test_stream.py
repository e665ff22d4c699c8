"""PairedPatches: alignment, where= selection, truncated shards, rank/worker splitting, mixing, DDP step counts."""

from __future__ import annotations

import io
import logging
import os
import socket
import tarfile
from pathlib import Path

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
from factory.manifests import read_manifests
from factory.query import FilterConfig, filter_dataset
from factory.stream import PairedPatches, expand_urls, iterate_pairs

SCALE = 4


@pytest.fixture(scope="module")
def pairs(photos):
    return crops(photos, size=128, per_photo=3)  # 18 HR crops of 128x128 -> LR 32x32


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


def _shard_of(keys: set[str], manifests_root: Path) -> set[str]:
    table = read_manifests(manifests_root)
    lookup = dict(zip(table["key"].to_pylist(), table["shard"].to_pylist(), strict=True))
    return {lookup[key] for key in keys}


def test_ranks_and_workers_read_disjoint_shards_with_equal_lengths(built):
    shards_root, manifests_root, _ = (
        built  # 6 shards: ranks x workers = 4 readers, so two readers get 2 shards
    )
    per_rank: list[list[str]] = []
    for rank in range(2):
        dataset = PairedPatches(
            str(shards_root / "bicubic"),
            patch_size=8,
            patches_per_pair=2,
            epoch_length=30,
            rank=rank,
            world_size=2,
            seed=1,
        )
        loader = DataLoader(dataset, batch_size=5, num_workers=2, multiprocessing_context="fork")
        per_rank.append([key for batch in loader for key in batch["key"]])
    assert [len(keys) for keys in per_rank] == [30, 30]
    shards = [_shard_of(set(keys), manifests_root) for keys in per_rank]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == 6


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
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # No rank/world_size given: the dataset reads them from torch.distributed.
        dataset = PairedPatches(shards_dir, patch_size=8, patches_per_pair=2, epoch_length=21, seed=rank)
        steps, keys = 0, []
        for batch in DataLoader(dataset, batch_size=4):
            keys += batch["key"]
            step = torch.ones(1)
            dist.all_reduce(
                step
            )  # a collective per step, as DDP's gradient all-reduce: unequal counts would hang
            steps += 1
        torch.save({"steps": steps, "keys": keys}, Path(results) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_read_disjoint_shards_and_run_the_same_steps(tmp_path, pairs):
    # 5 shards over 2 ranks: rank 0 holds 3, rank 1 holds 2, yet both run ceil(21 / 4) = 6 steps.
    write_pairs(tmp_path / "shards", tmp_path / "manifests", pairs[:15], per_shard=3)
    with socket.socket() as probe:  # a free port for the rendezvous (other test runs may hold 29500)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(
        _ddp_reader,
        args=(2, str(tmp_path / "shards" / "bicubic"), port, str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert [result["steps"] for result in results] == [6, 6]
    shards = [_shard_of(set(result["keys"]), tmp_path / "manifests") for result in results]
    assert len(shards[0]) == 3 and len(shards[1]) == 2 and not shards[0] & shards[1]


def test_several_ranks_without_length_or_manifests_is_refused(built):
    shards_root, _, _ = built
    with pytest.raises(FactoryError, match="epoch_length"):
        PairedPatches(str(shards_root / "bicubic"), rank=0, world_size=2)


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
