"""factory eval: PSNR / SSIM equal scikit-image's on the saved outputs (RGB, and Y with a border as BasicSR), LPIPS
equals the lpips package's with the same weights, and the NTIRE folder pairing rules."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sr_pairs import bicubic_lr, crops

from factory.cli import main
from factory.config import FactoryError
from factory.evaluate import LPIPS, image_metrics, pair_folders
from factory.sr.networks import build_network, save_weights


def skimage_metrics(sr: np.ndarray, hr: np.ndarray, y_channel: bool, border: int) -> tuple[float, float]:
    """The reference: scikit-image's metrics with BasicSR's SSIM settings (Gaussian sigma 1.5, population
    covariance), on skimage's own BT.601 Y when asked."""
    if border:
        sr, hr = sr[border:-border, border:-border], hr[border:-border, border:-border]
    if y_channel:
        sr, hr = rgb2ycbcr(sr)[..., 0], rgb2ycbcr(hr)[..., 0]
    options = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    ssim = structural_similarity(sr, hr, channel_axis=None if y_channel else 2, **options)
    return peak_signal_noise_ratio(hr, sr, data_range=255), ssim


@pytest.mark.parametrize(("y_channel", "border"), [(False, 0), (True, 4), (False, 3)])
def test_metrics_equal_skimage(photos, y_channel, border):
    hr = photos["chelsea"][:96, :120]
    rng = np.random.default_rng(0)
    sr = np.clip(hr.astype(int) + rng.integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
    ours = image_metrics(sr, hr, y_channel=y_channel, crop_border=border)
    reference = skimage_metrics(sr, hr, y_channel, border)
    assert ours == pytest.approx(reference, rel=1e-9)


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


@pytest.fixture
def ntire2018(tmp_path, photos):
    """NTIRE 2018 Track 3 layout: LR `08NNx4m.png` next to HR `08NN.png` (bicubic LR stands in for the mild set)."""
    for index, (_, hr) in enumerate(
        crops({"coffee": photos["coffee"], "rocket": photos["rocket"]}, size=64, per_photo=2)
    ):
        hr = hr[:, :60]  # not a multiple of the scale: the HR is cropped to the output (mod-crop)
        _write_png(tmp_path / "hr" / f"{801 + index:04d}.png", hr)
        _write_png(tmp_path / "lr" / f"{801 + index:04d}x4m.png", bicubic_lr(hr, 4))
    return tmp_path / "lr", tmp_path / "hr"


def run_eval(weights, lr_folder, hr_folder, out, *options: str):
    arguments = [
        "eval",
        "--model",
        str(weights),
        "--lr",
        str(lr_folder),
        "--hr",
        str(hr_folder),
        "--out",
        str(out),
    ]
    return CliRunner().invoke(main, [*arguments, *options])


def test_eval_writes_outputs_and_metrics_equal_to_skimage(tmp_path, ntire2018):
    lr_folder, hr_folder = ntire2018
    weights = save_weights(build_network("edsr", "tiny"), tmp_path / "edsr.pth")
    out = tmp_path / "eval"
    result = run_eval(weights, lr_folder, hr_folder, out, "--y-channel", "--crop-border", "4")
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output and "LPIPS n/a" in result.output
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [row["name"] for row in rows] == ["0801", "0802", "0803", "0804"]
    for row in rows:
        sr = np.asarray(Image.open(out / "sr" / f"{row['name']}.png"))
        hr = np.asarray(Image.open(hr_folder / f"{row['name']}.png"))[: sr.shape[0], : sr.shape[1]]
        reference = skimage_metrics(sr, hr, y_channel=True, border=4)
        assert (float(row["psnr"]), float(row["ssim"])) == pytest.approx(reference, rel=1e-9)
        assert row["lpips"] == ""


def test_pairing_rules(tmp_path):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    names = {  # LR name -> HR name
        "0801x4m.png": "0801.png",  # NTIRE 2018 Track 3 (mild); d / w for the difficult and wild tracks
        "0802x4d.png": "0802.png",
        "0803x4.png": "0803.png",  # DIV2K bicubic
        "0804.png": "0804.png",  # NTIRE 2020 (same names), any matching folders
        "baby_LR.png": "baby_HR.png",
    }
    for lr, hr in names.items():
        _write_png(tmp_path / "lr" / lr, image)
        _write_png(tmp_path / "hr" / hr, image)
    pairs = pair_folders(tmp_path / "lr", tmp_path / "hr")
    assert {pair.lr.name: pair.hr.name for pair in pairs} == names
    _write_png(tmp_path / "lr" / "0900x4m.png", image)
    with pytest.raises(FactoryError, match="without an HR image"):
        pair_folders(tmp_path / "lr", tmp_path / "hr")


def test_missing_model_is_a_one_line_error(tmp_path, ntire2018):
    lr_folder, hr_folder = ntire2018
    result = CliRunner().invoke(
        main, ["eval", "--model", str(tmp_path / "none.pth"), "--lr", str(lr_folder), "--hr", str(hr_folder)]
    )
    assert result.exit_code == 2 and "no weights file" in result.output
    result = run_eval(tmp_path / "none.pth", tmp_path / "no-lr", hr_folder, tmp_path / "out")
    assert result.exit_code == 2 and "no weights file" in result.output  # the model is checked first
    weights = save_weights(build_network("edsr", "tiny"), tmp_path / "edsr.pth")
    result = run_eval(weights, lr_folder, hr_folder, tmp_path / "border", "--crop-border", "500")
    assert result.exit_code == 2 and "--crop-border 500 leaves 0x0 pixels; SSIM needs" in result.output
    assert not (tmp_path / "border" / "sr").exists()  # stopped before the first output
    for name, content in (("empty.pth", b""), ("text.pth", b"not weights\n")):  # an empty file: EOFError('')
        (tmp_path / name).write_bytes(content)
        result = run_eval(tmp_path / name, lr_folder, hr_folder, tmp_path / "out")
        assert result.exit_code == 2 and "cannot read weights" in result.output, result.output


def test_lpips_equals_the_lpips_package(tmp_path, ntire2018):
    lpips = pytest.importorskip("lpips")
    # The package's published linear heads (shipped in its wheel) on a random AlexNet (pnet_rand: no download).
    reference = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    torch.save(reference.state_dict(), tmp_path / "lpips_alex.pth")
    ours = LPIPS.from_file(tmp_path / "lpips_alex.pth")
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x * 2 - 1, y * 2 - 1).flatten()
        assert torch.allclose(ours(x, y), expected, rtol=1e-5, atol=1e-7)
    lr_folder, hr_folder = ntire2018
    weights = save_weights(build_network("edsr", "tiny"), tmp_path / "edsr.pth")
    result = run_eval(
        weights, lr_folder, hr_folder, tmp_path / "e", "--lpips-weights", str(tmp_path / "lpips_alex.pth")
    )
    assert result.exit_code == 0, result.output
    assert all(float(row["lpips"]) > 0 for row in csv.DictReader((tmp_path / "e" / "metrics.csv").open()))


def test_a_bad_image_is_recorded_and_the_others_evaluated(tmp_path, ntire2018):
    lr_folder, hr_folder = ntire2018
    (lr_folder / "0805x4m.png").write_bytes(b"not an image")  # e.g. a truncated download
    _write_png(hr_folder / "0805.png", np.zeros((64, 60, 3), dtype=np.uint8))
    _write_png(lr_folder / "0806x4m.png", np.zeros((8, 8, 3), dtype=np.uint8))  # not the LR of its HR image
    _write_png(hr_folder / "0806.png", np.zeros((64, 60, 3), dtype=np.uint8))
    weights = save_weights(build_network("edsr", "tiny"), tmp_path / "edsr.pth")
    out = tmp_path / "eval"
    result = run_eval(weights, lr_folder, hr_folder, out)
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output and "2 rejected, e.g. 0805x4m.png: not_an_image" in result.output
    rows = {row["name"]: row for row in csv.DictReader((out / "metrics.csv").open())}
    assert sorted(rows) == ["0801", "0802", "0803", "0804", "0805", "0806"]
    assert all(float(rows[name]["psnr"]) > 0 and rows[name]["reason"] == "" for name in ("0801", "0804"))
    assert rows["0805"]["psnr"] == "" and "not_an_image" in rows["0805"]["reason"]
    assert "0806x4m.png x4 is (32, 32), 0806.png is (64, 60)" in rows["0806"]["reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 4
    assert [(image["name"], image["lr"]) for image in summary["rejected"]] == [
        ("0805", "0805x4m.png"),
        ("0806", "0806x4m.png"),
    ]
    assert sorted(path.name for path in (out / "sr").iterdir()) == [
        f"080{index}.png" for index in range(1, 5)
    ]


def _outputs(out: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()
    }


def test_a_run_replaces_the_earlier_outputs_whole_or_not_at_all(tmp_path, ntire2018, monkeypatch):
    import factory.evaluate

    lr_folder, hr_folder = ntire2018
    out = tmp_path / "eval"
    first = save_weights(build_network("edsr", "tiny"), tmp_path / "first.pth")
    assert run_eval(first, lr_folder, hr_folder, out).exit_code == 0
    earlier = _outputs(out)
    assert len(earlier) == 4 + 2  # sr/*.png, metrics.csv, summary.json

    # Another network, interrupted at its third image: the earlier run's outputs stay as they were, all of them.
    torch.manual_seed(1)
    second = save_weights(build_network("edsr", "tiny"), tmp_path / "second.pth")
    calls = []
    original = factory.evaluate.super_resolve

    def interrupted(*arguments):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*arguments)

    monkeypatch.setattr(factory.evaluate, "super_resolve", interrupted)
    assert run_eval(second, lr_folder, hr_folder, out).exit_code == 130
    assert _outputs(out) == earlier
    monkeypatch.undo()

    # A smaller LR folder: sr/ holds its images only, not the earlier run's beside them.
    for name in ("0803x4m.png", "0804x4m.png"):
        (lr_folder / name).unlink()
    assert run_eval(second, lr_folder, hr_folder, out).exit_code == 0
    now = _outputs(out)
    assert sorted(now) == ["metrics.csv", "sr/0801.png", "sr/0802.png", "summary.json"]
    assert now["sr/0801.png"] != earlier["sr/0801.png"]
    assert json.loads(now["summary.json"])["model"] == str(second)
