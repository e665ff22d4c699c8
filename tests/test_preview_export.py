"""`factory preview` (contact sheet) and `factory export --format basicsr` (paired PNG folders + meta_info).

References: exported and previewed pixels are compared with the shard payloads decoded by Pillow / numpy; the
meta_info formats are those BasicSR's `paired_paths_from_meta_info_file` ("<gt name> (H,W,C)", LQ found under the
same base name) and Real-ESRGAN's `RealESRGANPairedDataset` ("<gt path>, <lq path>") document.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from manifest_fixtures import PairSpec, make_dataset, sample_payloads, write_shard
from PIL import Image

from factory.cli import main
from factory.color import downsample
from factory.config import FactoryError
from factory.export import ExportConfig, export_basicsr
from factory.filter import FilterConfig, filter_dataset
from factory.preview import PreviewConfig, make_preview
from factory.shards import decode_image


@pytest.fixture(scope="module")
def roots(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("preview_export")
    shards, manifests = root / "shards", root / "manifests"
    specs = [PairSpec(index, "gaussian_noise") for index in range(6)]
    rows = make_dataset(shards, manifests, "vqvae2-ep8", specs, photos)
    specs = [PairSpec(index + 0.5) for index in range(5)]
    rows += make_dataset(
        shards, manifests, "mae-ep4", specs, photos, model="mae", epoch=4, codec="zst", pairs_per_shard=2
    )
    payloads = {}
    for path in sorted(shards.glob("*/*.tar")):
        payloads.update(sample_payloads(path))
    return {"shards": shards, "manifests": manifests, "payloads": payloads, "rows": rows}


def stored(payloads: dict, key: str, side: str) -> np.ndarray:
    """The payload of `key` decoded from the shard, whatever its codec."""
    (extension,) = [name for name in payloads[key] if name.startswith(f"{side}.")]
    return decode_image(extension, payloads[key][extension])


@pytest.mark.parametrize("where", [None, "delta_e >= 2 AND delta_e < 5"])
def test_export_round_trips_pixels(roots, tmp_path, where):
    out = tmp_path / "export"
    summary = export_basicsr(
        ExportConfig(shards_root=roots["shards"], manifests_root=roots["manifests"], where=where, out=out)
    )
    low, high = (-1.0, 99.0) if where is None else (2.0, 5.0)
    expected_keys = sorted(row["key"] for row in roots["rows"] if low <= row["delta_e"] < high)
    # vqvae2 delta_e 0..5 and mae 0.5..4.5: [2, 5) holds 2, 3, 4 and 2.5, 3.5, 4.5
    assert summary.pairs == len(expected_keys) == (11 if where is None else 6)
    exported_rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(row["key"] for row in exported_rows) == expected_keys
    assert sorted(path.stem for path in (out / "hr").iterdir()) == expected_keys
    assert sorted(path.stem for path in (out / "lr").iterdir()) == expected_keys
    for key in expected_keys:
        for side in ("hr", "lr"):
            with Image.open(out / side / f"{key}.png") as image:
                assert image.format == "PNG" and image.mode == "RGB"
                np.testing.assert_array_equal(np.asarray(image), stored(roots["payloads"], key, side))

    # BasicSR: the GT name is the text before the first space, the LQ has the same base name; the shape is the GT's.
    lines = (out / "meta_info.txt").read_text().splitlines()
    assert len(lines) == len(expected_keys)
    for line in lines:
        name, shape = line.split(" ")
        assert (out / "hr" / name).is_file() and (out / "lr" / name).is_file()
        height, width, channels = (int(part) for part in shape.strip("()").split(","))
        assert (height, width, channels) == stored(roots["payloads"], Path(name).stem, "hr").shape
    # Real-ESRGAN: "gt, lq" relative to dataroot_gt and dataroot_lq.
    for line in (out / "meta_info_pairs.txt").read_text().splitlines():
        gt, lq = line.split(", ")
        assert (out / "hr" / gt).is_file() and (out / "lr" / lq).is_file()
    options = yaml.safe_load((out / "basicsr_dataset.yml").read_text())
    assert options["type"] == "PairedImageDataset" and options["scale"] == 4
    assert Path(options["dataroot_gt"]) == out.absolute() / "hr"
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary folder left


def test_a_filtered_dataset_and_its_parent_export_each_pair_once(tmp_path, photos):
    """README's flow: `factory filter --where P` then `factory export --where P` over the same manifests. The filtered
    copy repeats its parent's keys with the same bytes; a key holding other bytes elsewhere is refused."""
    shards, manifests = tmp_path / "shards", tmp_path / "manifests"
    rows = make_dataset(shards, manifests, "vqvae2-ep8", [PairSpec(index) for index in range(6)], photos)
    filter_dataset(FilterConfig("delta_e < 3", shards, manifests, shards, name="vqvae2-ep8-low"))
    summary = export_basicsr(ExportConfig(shards, manifests, "delta_e < 3", tmp_path / "export"))
    expected = sorted(row["key"] for row in rows if row["delta_e"] < 3)
    assert (
        summary.pairs == 3
        and sorted(path.stem for path in (tmp_path / "export" / "hr").iterdir()) == expected
    )
    exported = pq.read_table(tmp_path / "export" / "manifest.parquet").to_pylist()
    assert {row["dataset"] for row in exported} == {"vqvae2-ep8"}  # the parent stands for the pair
    again = filter_dataset(FilterConfig("delta_e < 3", shards, manifests, shards, name="again"))
    assert (again.pairs, again.parent_datasets) == (3, ["vqvae2-ep8"])  # filter deduplicates the same way

    other_row = {**rows[0], "dataset": "other"}
    hr = np.zeros((32, 32, 3), np.uint8)
    write_shard(shards, manifests, "other", 0, [(other_row, hr, hr[::4, ::4])])
    with pytest.raises(FactoryError, match="holds different images in datasets 'again' and 'other'"):
        export_basicsr(ExportConfig(shards, manifests, "delta_e < 3", tmp_path / "conflict"))
    assert not (tmp_path / "conflict").exists()


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_on_error(roots, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something.txt").write_text("keep me")
    with pytest.raises(FactoryError, match="not an empty folder"):
        export_basicsr(ExportConfig(roots["shards"], roots["manifests"], None, out))
    assert [path.name for path in out.iterdir()] == ["something.txt"]
    with pytest.raises(FactoryError, match="no pairs match"):
        export_basicsr(ExportConfig(roots["shards"], roots["manifests"], "delta_e > 99", tmp_path / "none"))
    assert not (tmp_path / "none").exists()


def test_export_refuses_a_damaged_payload(roots, tmp_path, photos):
    # A copy of one dataset with one flipped byte inside an HR payload: export must stop, not write a wrong image.
    shards, manifests = tmp_path / "shards", tmp_path / "manifests"
    make_dataset(shards, manifests, "broken", [PairSpec(1.0), PairSpec(2.0)], photos)
    shard = shards / "broken" / "broken-000000.tar"
    data = bytearray(shard.read_bytes())
    offset = data.index(b"IDAT") + 10  # inside the first PNG's pixel data
    data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(FactoryError, match="does not match its manifest"):
        export_basicsr(ExportConfig(shards, manifests, None, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_preview_sheet_shows_the_stored_pixels(roots, tmp_path):
    out = tmp_path / "sheet.png"
    summary = make_preview(
        PreviewConfig(roots["shards"], roots["manifests"], where="model = 'mae'", count=3, out=out)
    )
    assert summary.pairs == 3 and len(summary.cells) == 3
    with Image.open(out) as image:
        assert image.format == "PNG"
        sheet = np.asarray(image.convert("RGB"))
    for cell in summary.cells:
        hr = stored(roots["payloads"], cell.key, "hr")
        lr = stored(roots["payloads"], cell.key, "lr")
        # Fixture HR 32 px, scale 4: LR 8 px, enlarged x32 (nearest) to 256 px; the HR x8.
        assert (cell.height, cell.width, cell.zoom) == (256, 256, 32)

        def crop(column: int, cell=cell) -> np.ndarray:
            left = cell.lefts[column]
            return sheet[cell.top : cell.top + cell.height, left : left + cell.width]

        np.testing.assert_array_equal(crop(0), np.kron(hr, np.ones((8, 8, 1), dtype=np.uint8)))
        np.testing.assert_array_equal(crop(2), np.kron(lr, np.ones((32, 32, 1), dtype=np.uint8)))
        # The bicubic LR column: the project's bicubic (factory.color.downsample) of the HR, rounded to 8 bits.
        hr_tensor = torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255
        bicubic = (downsample(hr_tensor, 4) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(crop(1), np.kron(bicubic, np.ones((32, 32, 1), dtype=np.uint8)))
        # A caption under the row: dark text pixels between this row and the next.
        caption = sheet[cell.top + cell.height : cell.top + cell.height + 20]
        assert (caption.min(axis=2) < 100).sum() > 50


def test_cli_preview_and_export(roots, tmp_path):
    runner = CliRunner()
    common = ["--shards", str(roots["shards"]), "--manifests", str(roots["manifests"])]
    result = runner.invoke(main, ["preview", *common, "--n", "4", "--out", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "p.png") as image:
        image.verify()
    result = runner.invoke(
        main,
        [
            "export",
            "--format",
            "basicsr",
            *common,
            "--where",
            "label IS NOT NULL",
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "e" / "lr").iterdir())) == 6
    bad = runner.invoke(main, ["preview", *common, "--where", "delta_e <", "--out", str(tmp_path / "q.png")])
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and bad.output.count("\n") == 1
    # --out: a folder or a name without an image extension is refused; .jpg writes a JPEG.
    for out, message in ((tmp_path, "is a folder"), (tmp_path / "sheet.txt", "image extension")):
        bad = runner.invoke(main, ["preview", *common, "--n", "2", "--out", str(out)])
        assert bad.exit_code == 2 and message in bad.output and bad.output.count("\n") == 1, bad.output
    assert (
        runner.invoke(main, ["preview", *common, "--n", "2", "--out", str(tmp_path / "s.jpg")]).exit_code == 0
    )
    with Image.open(tmp_path / "s.jpg") as image:
        assert image.format == "JPEG"


@pytest.mark.slow
def test_on_a_real_bicubic_build(tmp_path):
    """End to end on `factory build --model bicubic` output (Ray, ~1 min on 2 busy cores): filter passes verify, the
    preview's bicubic column equals the stored LR (the bicubic model's LR is the bicubic LR), export round-trips."""
    from factory.manifests import verify

    runner = CliRunner()
    shards, manifests = tmp_path / "shards", tmp_path / "manifests"
    build = runner.invoke(
        main,
        [
            "build",
            "--model",
            "bicubic",
            "--crop",
            "128",
            "--stride",
            "256",
            "--limit",
            "6",
            "--shard-size",
            "4",
            "--num-cpus",
            "2",
            "--actors",
            "1",
            "--device",
            "cpu",
            "--out",
            str(shards),
            "--manifests",
            str(manifests),
        ],
    )
    assert build.exit_code == 0, build.output
    filtered = runner.invoke(
        main,
        [
            "filter",
            "--where",
            # A bicubic build has ΔE 0 everywhere (x_deg is x), so select on the crop grid instead.
            "crop_left < (SELECT max(crop_left) FROM manifests)",
            "--shards",
            str(shards),
            "--manifests",
            str(manifests),
            "--out",
            str(shards),
            "--name",
            "bicubic-low",
        ],
    )
    assert filtered.exit_code == 0, filtered.output
    report = verify(shards, manifests)
    assert report.ok, report.problems
    assert sorted(report.datasets) == ["bicubic", "bicubic-low"]

    summary = make_preview(PreviewConfig(shards, manifests, "dataset = 'bicubic'", 6, tmp_path / "sheet.png"))
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB"))
    for cell in summary.cells:
        bicubic_column = sheet[cell.top : cell.top + cell.height, cell.lefts[1] : cell.lefts[1] + cell.width]
        degraded_column = sheet[cell.top : cell.top + cell.height, cell.lefts[2] : cell.lefts[2] + cell.width]
        np.testing.assert_array_equal(bicubic_column, degraded_column)

    out = tmp_path / "export"
    export_basicsr(ExportConfig(shards, manifests, "dataset = 'bicubic-low'", out))
    payloads = {}
    for path in sorted((shards / "bicubic-low").glob("*.tar")):
        payloads.update(sample_payloads(path))
    assert sorted(path.stem for path in (out / "lr").iterdir()) == sorted(payloads)
    for key, members in payloads.items():
        assert (out / "hr" / f"{key}.png").read_bytes() == members["hr.png"]  # PNG copied byte for byte
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO((out / "lr" / f"{key}.png").read_bytes()))),
            stored(payloads, key, "lr"),
        )


def test_preview_refuses_an_out_in_a_missing_folder(roots, tmp_path):
    # It made the folder, so a typo in the path went unnoticed.
    out = tmp_path / "nonexistent" / "dir" / "pv.png"
    common = ["--shards", str(roots["shards"]), "--manifests", str(roots["manifests"])]
    result = CliRunner().invoke(main, ["preview", *common, "--n", "2", "--out", str(out)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"no folder {out.parent}" in result.output
    assert not (tmp_path / "nonexistent").exists()


def test_preview_and_export_take_the_first_in_the_order_asked(roots, tmp_path):
    by_delta_e = sorted(roots["rows"], key=lambda row: -row["delta_e"])
    worst = make_preview(
        PreviewConfig(
            roots["shards"],
            roots["manifests"],
            None,
            count=3,
            out=tmp_path / "w.png",
            order_by="delta_e DESC",
        )
    )
    assert [cell.key for cell in worst.cells] == [row["key"] for row in by_delta_e[:3]]
    drawn = [
        make_preview(
            PreviewConfig(
                roots["shards"], roots["manifests"], None, count=4, out=tmp_path / "r.png", random_seed=seed
            )
        ).cells
        for seed in (5, 5, 6)
    ]
    assert (
        [cell.key for cell in drawn[0]] == [cell.key for cell in drawn[1]] != [cell.key for cell in drawn[2]]
    )
    common = ["--shards", str(roots["shards"]), "--manifests", str(roots["manifests"])]
    result = CliRunner().invoke(
        main, ["export", *common, "--n", "2", "--order-by", "delta_e DESC", "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == 0, result.output
    assert sorted(path.stem for path in (tmp_path / "e" / "hr").iterdir()) == sorted(
        row["key"] for row in by_delta_e[:2]
    )
    result = CliRunner().invoke(
        main, ["preview", *common, "--random", "--seed", "1", "--out", str(tmp_path / "c.png")]
    )
    assert result.exit_code == 0, result.output


def test_an_export_killed_mid_write_leaves_nothing_a_rerun_does_not_clear(roots, tmp_path):
    """kill -9 mid-export left its hidden temporary folder beside --out for good; the rerun now deletes it."""
    from manifest_fixtures import run_killed_mid_write

    out = tmp_path / "export"
    arguments = ["export", "--format", "basicsr", "--shards", str(roots["shards"]), "--manifests",
                 str(roots["manifests"]), "--out", str(out)]  # fmt: skip
    run_killed_mid_write("factory.export", "_png", 5, arguments)  # mid-way through the pairs
    assert not out.exists()
    (left,) = tmp_path.glob(".export.*.tmp")
    assert any(left.rglob("*.png"))

    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    assert len(list((out / "hr").glob("*.png"))) == len(roots["rows"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]  # the dead run's folder is gone


def test_an_export_out_that_cannot_be_written_is_one_line(roots, tmp_path):
    (tmp_path / "file").write_text("a regular file")
    arguments = ["export", "--format", "basicsr", "--shards", str(roots["shards"]), "--manifests",
                 str(roots["manifests"]), "--out", str(tmp_path / "file" / "export")]  # fmt: skip
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: cannot write {tmp_path / 'file' / 'export'}: Not a directory"
