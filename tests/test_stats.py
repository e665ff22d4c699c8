"""`factory stats`: numbers and figures against values computed by hand on a small dataset.

The hand computations are written out in the comments (numpy's default linear-interpolation percentile:
position = 0.95 * (n - 1) in the sorted values).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from manifest_fixtures import PairSpec, make_dataset
from PIL import Image

from factory.cli import main
from factory.config import FactoryError
from factory.corruptions import CORRUPTIONS
from factory.filter import FilterConfig, filter_dataset
from factory.stats import (
    FIGURE_NAMES,
    StatsConfig,
    compute_stats,
    dataset_stats,
    delta_e_histogram_figure,
    epoch_figure,
    label_distribution_figure,
)

NOISE, JPEG, DEFOCUS = "gaussian_noise", "jpeg_compression", "defocus_blur"


@pytest.fixture(scope="module")
def roots(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("stats")
    shards, manifests = root / "shards", root / "manifests"
    specs_a = [PairSpec(1, NOISE), PairSpec(2, NOISE), PairSpec(3, JPEG), PairSpec(4, NOISE), PairSpec(10)]
    make_dataset(shards, manifests, "vqvae2-ep4", specs_a, photos, epoch=4, rejects=2)
    specs_b = [PairSpec(2, DEFOCUS), PairSpec(2, NOISE), PairSpec(2, DEFOCUS), PairSpec(6, NOISE)]
    make_dataset(shards, manifests, "vqvae2-ep8", specs_b, photos, epoch=8)
    make_dataset(
        shards, manifests, "mae-ep8", [PairSpec(5, JPEG), PairSpec(7, JPEG)], photos, model="mae", epoch=8
    )
    make_dataset(
        shards, manifests, "bicubic", [PairSpec(0.5), PairSpec(1.5)], photos, model="bicubic", epoch=None
    )
    # A filtered subset of vqvae2-ep8 (delta_e 6 only): counted per dataset, left out of the per-epoch curves.
    filter_dataset(
        FilterConfig(
            where="delta_e > 5 AND dataset = 'vqvae2-ep8'",
            shards_root=shards,
            manifests_root=manifests,
            out=shards,
            name="vqvae2-high",
        )
    )
    return {"shards": shards, "manifests": manifests}


def test_per_dataset_numbers(roots):
    report = compute_stats(roots["manifests"])
    by_name = {item.dataset: item for item in report.datasets}
    assert sorted(by_name) == ["bicubic", "mae-ep8", "vqvae2-ep4", "vqvae2-ep8", "vqvae2-high"]

    a = by_name["vqvae2-ep4"]
    # [1, 2, 3, 4, 10]: mean 20 / 5 = 4, median 3, p95 at position 3.8: 4 + 0.8 * (10 - 4) = 8.8
    assert (a.pairs, a.model, a.epoch, a.rejects, a.derived) == (5, "vqvae2", 4, 2, False)
    assert (a.delta_e_mean, a.delta_e_median, a.delta_e_p95) == pytest.approx((4.0, 3.0, 8.8))
    assert a.labels[NOISE] == 3 and a.labels[JPEG] == 1 and sum(a.labels.values()) == 4 and a.unlabelled == 1
    assert list(a.labels) == list(CORRUPTIONS)

    b = by_name["vqvae2-ep8"]
    # [2, 2, 2, 6]: mean 3, median 2, p95 at position 2.85: 2 + 0.85 * (6 - 2) = 5.4
    assert (b.delta_e_mean, b.delta_e_median, b.delta_e_p95) == pytest.approx((3.0, 2.0, 5.4))
    assert (b.labels[DEFOCUS], b.labels[NOISE], b.rejects) == (2, 2, 0)

    high = by_name["vqvae2-high"]
    assert (high.pairs, high.derived, high.delta_e_mean) == (1, True, pytest.approx(6.0))
    assert by_name["bicubic"].epoch is None and by_name["bicubic"].delta_e_mean == pytest.approx(1.0)


def test_epoch_curves_pool_per_model_and_skip_derived(roots):
    curves = compute_stats(roots["manifests"]).curves
    # vqvae2: epoch 4 mean 4.0 (5 pairs), epoch 8 mean 3.0 (4 pairs, the filtered copy not counted again);
    # mae: epoch 8 mean (5 + 7) / 2 = 6; bicubic has no epoch and gives no curve.
    assert sorted(curves) == ["mae", "vqvae2"]
    assert [(p.epoch, p.pairs, p.delta_e_mean) for p in curves["vqvae2"]] == [(4, 5, 4.0), (8, 4, 3.0)]
    assert [(p.epoch, p.pairs, p.delta_e_mean) for p in curves["mae"]] == [(8, 2, 6.0)]


def test_entropy_is_the_classifiers_on_the_label_histogram(roots):
    by_name = {item.dataset: item for item in compute_stats(roots["manifests"]).datasets}
    # vqvae2-ep4's labelled pairs: 3 gaussian_noise, 1 jpeg -> P = (3/4, 1/4); Eq. 2 in nats (the classifier's
    # unit): -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623
    expected = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert by_name["vqvae2-ep4"].entropy == pytest.approx(expected)
    # vqvae2-ep8: 2 defocus, 2 noise -> ln 2
    assert by_name["vqvae2-ep8"].entropy == pytest.approx(np.log(2))
    assert by_name["bicubic"].entropy is None  # nothing labelled


def test_histogram_figure_counts_by_hand():
    values = {"a": np.array([1.0, 2.0, 3.0, 4.0, 10.0]), "b": np.array([2.0, 2.0, 2.0, 6.0])}
    figure = delta_e_histogram_figure(values, bins=[0.0, 2.5, 5.0, 7.5, 10.0])
    panels = [axis for axis in figure.axes if axis.get_visible()]
    heights = {axis.get_title(): [patch.get_height() for patch in axis.patches] for axis in panels}
    # a: {1, 2} < 2.5, {3, 4} < 5, none < 7.5, 10 in the last (closed) bin; b: three 2s, one 6
    assert heights == {"a": [2, 2, 0, 1], "b": [3, 0, 1, 0]}


@pytest.mark.parametrize("datasets", [1, 2, 4])
def test_histogram_titles_lie_inside_the_figure(datasets):
    """The title was cut off on both sides with one dataset (#16 item 7): every title's drawn box (matplotlib's
    get_window_extent, at the dpi the figure is saved with) must lie inside the figure's box."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from factory.stats import FIGURE_DPI

    values = {f"vqvae2-ep{4 * 2**index}-where-0123abcd": np.arange(6.0) + index for index in range(datasets)}
    figure = delta_e_histogram_figure(values)
    figure.set_dpi(FIGURE_DPI)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    bounds = figure.bbox
    titles = [*figure.texts, *(axis.title for axis in figure.axes if axis.get_visible())]
    assert "Colour difference" in figure.texts[0].get_text() and len(titles) == 1 + datasets
    for title in titles:
        box = title.get_window_extent(canvas.get_renderer())
        inside = bounds.x0 <= box.x0 and box.x1 <= bounds.x1 and bounds.y0 <= box.y0 and box.y1 <= bounds.y1
        assert inside, f"{title.get_text()!r}: {box} outside {bounds}"


def test_epoch_and_label_figures_show_the_numbers(roots):
    report = compute_stats(roots["manifests"])
    curves = {name: [(p.epoch, p.delta_e_mean) for p in points] for name, points in report.curves.items()}
    figure = epoch_figure(curves, "mean ΔE", "test", references={"bicubic": 1.0})
    lines = {line.get_label(): line.get_xydata().tolist() for line in figure.axes[0].get_lines()}
    assert lines["vqvae2"] == [[4, 4.0], [8, 3.0]] and lines["mae"] == [[8, 6.0]]
    assert lines["bicubic"][0][1] == 1.0

    # Figure 8 analogue: H per (model, epoch) from the pooled labels. vqvae2 ep 4: 3 noise + 1 jpeg (the unlabelled
    # pair skipped) -> 0.5623 nats; ep 8: 2 defocus + 2 noise -> ln 2; mae ep 8: 2 jpeg -> 0.
    entropy = {name: [(p.epoch, p.entropy) for p in points] for name, points in report.curves.items()}
    figure = epoch_figure(entropy, "entropy H", "test")
    lines = {line.get_label(): line.get_xydata() for line in figure.axes[0].get_lines()}
    np.testing.assert_allclose(
        lines["vqvae2"], [[4, -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))], [8, np.log(2)]]
    )
    np.testing.assert_allclose(lines["mae"], [[8, 0.0]], atol=1e-12)

    labelled = {item.dataset: item.labels for item in report.datasets if sum(item.labels.values())}
    shares = np.asarray(label_distribution_figure(labelled).axes[0].images[0].get_array())
    row = list(labelled).index("vqvae2-ep4")
    expected = np.zeros(len(CORRUPTIONS))
    expected[CORRUPTIONS.index(NOISE)], expected[CORRUPTIONS.index(JPEG)] = (
        0.75,
        0.25,
    )  # 3 and 1 of 4 labelled
    np.testing.assert_allclose(shares[row], expected)


def test_plots_are_real_pngs(roots, tmp_path):
    report = dataset_stats(StatsConfig(manifests_root=roots["manifests"], plots=tmp_path / "figures"))
    names = {path.name for path in report.figures}
    assert {
        FIGURE_NAMES["entropy_vs_epoch"],
        FIGURE_NAMES["delta_e_histogram"],
        FIGURE_NAMES["delta_e_vs_epoch"],
        FIGURE_NAMES["label_distribution"],
    } <= names
    for path in report.figures:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 300 and image.height >= 200
            extrema = image.convert("L").getextrema()
            assert extrema[1] - extrema[0] > 100  # something drawn, not a blank canvas
    assert not list((tmp_path / "figures").glob(".*"))  # no temporary files left
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(FactoryError, match="--plots .*a-file is a file"):
        dataset_stats(StatsConfig(manifests_root=roots["manifests"], plots=tmp_path / "a-file"))


def test_cli_json_and_text(roots):
    runner = CliRunner()
    result = runner.invoke(main, ["stats", "--manifests", str(roots["manifests"]), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    by_name = {item["dataset"]: item for item in payload["datasets"]}
    assert (
        by_name["vqvae2-ep4"]["delta_e_p95"] == pytest.approx(8.8) and by_name["vqvae2-ep4"]["rejects"] == 2
    )

    text = runner.invoke(main, ["stats", "--manifests", str(roots["manifests"])]).output.splitlines()
    assert text[0].split()[:4] == ["dataset", "model", "epoch", "pairs"]
    assert any(line.startswith("vqvae2-ep4") and "gaussian_noise 75%" in line for line in text)

    missing = runner.invoke(main, ["stats", "--manifests", "/nonexistent/manifests"])
    assert missing.exit_code == 2 and missing.output.startswith("error: ")


def test_stats_needs_no_torch():
    """`factory stats` reads manifests only: importing it must not pay torch's start-up (seconds on a CPU node)."""
    import subprocess
    import sys

    code = "import sys, factory.stats, factory.query, factory.manifests; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


def test_one_unreadable_manifest_is_named_and_the_other_datasets_are_described(tmp_path, photos):
    # One damaged file stopped stats for every dataset.
    from factory.manifests import REJECTS_NAME, manifest_files

    shards, manifests = tmp_path / "shards", tmp_path / "manifests"
    make_dataset(shards, manifests, "good", [PairSpec(1), PairSpec(3)], photos, pairs_per_shard=1)
    make_dataset(shards, manifests, "damaged", [PairSpec(2)], photos, rejects=1)
    (damaged,) = manifest_files(manifests, "damaged")
    damaged.write_bytes(b"not parquet")
    (manifests / "damaged" / REJECTS_NAME).write_bytes(b"")
    result = CliRunner().invoke(main, ["stats", "--manifests", str(manifests), "--json"])
    assert result.exit_code == 1
    by_name = {item["dataset"]: item for item in json.loads(result.stdout)["datasets"]}
    assert by_name["good"]["pairs"] == 2 and by_name["good"]["delta_e_mean"] == pytest.approx(2.0)
    assert by_name["damaged"]["pairs"] == 0
    assert str(damaged) in result.stderr and str(manifests / "damaged" / REJECTS_NAME) in result.stderr


def test_the_checkpoint_regime_from_the_card_is_shown_and_plotted(tmp_path, photos):
    """A dataset's card records the regime of the checkpoint that made it (factory build copies it from the
    checkpoint); stats reports it per dataset, with the medians of the pairs' PSNR, SSIM and checkerboard index,
    and draws regime_vs_epoch.png from it."""
    from factory.stats import StatsConfig, dataset_stats

    shards, manifests = tmp_path / "shards", tmp_path / "manifests"
    regimes = {}
    for epoch in (4, 8):
        name = f"vqvae2-ep{epoch}"
        make_dataset(
            shards, manifests, name, [PairSpec(delta_e=1.0), PairSpec(delta_e=3.0)], photos, epoch=epoch
        )
        regimes[name] = {"psnr": 20.0 + epoch, "ssim": 0.5 + epoch / 100, "delta_e": 9.0 - epoch / 2}
        regimes[name].update(checkerboard=1.5, delta_b=0.4, images=7, split="held-out", size=64)
        card = {"checkpoint": {"model": "vqvae2", "epoch": epoch, "regime": regimes[name]}}
        (manifests / name / "_card.json").write_text(json.dumps(card))
    report = dataset_stats(StatsConfig(manifests_root=manifests, plots=tmp_path / "figures"))
    for item in report.datasets:
        assert item.regime == regimes[item.dataset]
        assert item.psnr_median is not None and item.ssim_median is not None
    assert (tmp_path / "figures" / "regime_vs_epoch.png").is_file()
    text = report.to_text()
    assert "vqvae2-ep8: checkpoint regime at epoch 8: PSNR (dB) 28.000, SSIM 0.580" in text
