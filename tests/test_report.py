"""The study report (factory.study.report): its tables equal what the eval runs wrote (metrics.csv, parsed here,
and the manifests, read with pyarrow), its figures show the images they claim to, and headless Chromium opens
report.html from disk with no console error and no request beyond the file and its data: images.

The study folder is made by the factory itself (tests/study_folder.py): datasets by factory.build, checkpoints with
their measured regime, evaluations by factory.evaluate on tiny EDSR weights."""

from __future__ import annotations

import csv
import html.parser
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from headless_chromium import chromium_binary, load_page
from PIL import Image
from study_folder import COLOUR_SHIFT_RUNS, EVALSET, FINETUNED_RUNS, make_study

from factory.config import FactoryError
from factory.preview import MARGIN, TEXT_HEIGHT
from factory.sources import load_rgb
from factory.study import report as report_module
from factory.study.report import METRICS, STRIP_CROP, write_report


@pytest.fixture(scope="module")
def study(tmp_path_factory, photos) -> Path:
    root = make_study(tmp_path_factory.mktemp("report") / "study", photos)
    write_report(root)
    return root


# --- reading the report back ---------------------------------------------------------------------------------------


def markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """caption -> rows as {header: cell} of every table in report.md, cells as written (bold kept as **x**)."""
    tables, caption, lines = {}, "", text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("*") and line.endswith("*") and not line.startswith("**"):
            caption = line.strip("*")
        if line.startswith("| "):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            rows = []
            index += 2  # the header and the |---| line
            while index < len(lines) and lines[index].startswith("| "):
                cells = [cell.strip() for cell in lines[index].strip("|").split("|")]
                rows.append(dict(zip(header, cells, strict=True)))
                index += 1
            tables[caption] = rows
            continue
        index += 1
    return tables


class _HtmlTables(html.parser.HTMLParser):
    """Every <table> of report.html as rows of (text, marked best) cells."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[tuple[str, bool]]]] = []
        self.cell: list[str] | None = None
        self.best = False

    def handle_starttag(self, tag, attributes):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell, self.best = [], ("class", "best") in attributes

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append(("".join(self.cell), self.best))
            self.cell = None


def csv_means(folder: Path) -> dict[str, float | None]:
    """The mean of each metric over the evaluated rows of a run's metrics.csv (None: the column is empty)."""
    rows = [row for row in csv.DictReader((folder / "metrics.csv").open()) if not row["reason"]]
    means = {}
    for metric in METRICS:
        values = [float(row[metric.key]) for row in rows if row[metric.key] != ""]
        means[metric.key] = float(np.mean(values)) if values else None
    return means


def shown(value: float | None, decimals: int, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def table_with(tables: dict[str, list[dict[str, str]]], prefix: str) -> list[dict[str, str]]:
    matches = [rows for caption, rows in tables.items() if caption.startswith(prefix)]
    assert len(matches) == 1, list(tables)
    return matches[0]


def assert_best_marked(rows: list[dict[str, str]], label: str, higher_is_better: bool) -> None:
    """Bold exactly where the column's best value is shown."""
    values = {row["run"]: row[label].strip("*") for row in rows if row[label].strip("*") != "-"}
    if not values:
        return
    pick = max if higher_is_better else min
    best = pick(values.values(), key=float)
    for row in rows:
        assert row[label].startswith("**") == (row[label].strip("*") == best), (label, row)


# --- tables --------------------------------------------------------------------------------------------------------


def test_results_table_equals_the_eval_csvs(study: Path):
    """Table 1 analogue: every run's PSNR / SSIM / LPIPS is the mean of its metrics.csv (parsed here), each Δ the
    difference of those means to the pretrained run's, the best of each column bold."""
    rows = table_with(markdown_tables((study / "report.md").read_text()), f"edsr on {EVALSET}")
    assert [row["run"] for row in rows] == list(FINETUNED_RUNS)
    means = {run: csv_means(study / "eval" / "edsr" / run / EVALSET) for run in FINETUNED_RUNS}
    for row in rows:
        for metric in METRICS:
            value, base = means[row["run"]][metric.key], means["pretrained"][metric.key]
            assert row[metric.label].strip("*") == shown(value, metric.decimals), (row["run"], metric.key)
            difference = None if row["run"] == "pretrained" or value is None else value - base
            assert row[f"Δ{metric.label}"] == shown(difference, metric.decimals, signed=True)
        assert row["images"] == str(
            len(list(csv.DictReader((study / "eval/edsr" / row["run"] / EVALSET / "metrics.csv").open())))
        )
    for metric in METRICS:
        assert_best_marked(rows, metric.label, metric.higher_is_better)
    if means["pretrained"]["lpips"] is not None:  # the lpips package was there: the column is filled
        assert all(row["LPIPS"] != "-" for row in rows)


def test_colour_shift_table_equals_the_eval_csvs_and_the_manifests(study: Path):
    rows = table_with(markdown_tables((study / "report.md").read_text()), "edsr trained from scratch")
    assert [row["run"] for row in rows] == list(COLOUR_SHIFT_RUNS)
    for row in rows:
        means = csv_means(study / "eval" / "edsr" / row["run"] / EVALSET)
        for metric in METRICS:
            assert row[metric.label].strip("*") == shown(means[metric.key], metric.decimals)
        delta_e = pq.read_table(study / "manifests" / row["run"])["delta_e"].to_numpy()
        assert row["dataset mean ΔE"] == shown(float(delta_e.mean()), 3)
        assert row["target ΔE"] == {"bicubic-de0": "0.00", "bicubic-de2": "2.00"}[row["run"]]
    for metric in METRICS:
        assert_best_marked(rows, metric.label, metric.higher_is_better)


def test_dataset_table_equals_the_manifests(study: Path):
    rows = table_with(markdown_tables((study / "report.md").read_text()), "ΔE: CIEDE2000")
    datasets = sorted(path.name for path in (study / "manifests").iterdir() if path.is_dir())
    assert sorted(row["dataset"] for row in rows) == datasets
    for row in rows:
        delta_e = pq.read_table(study / "manifests" / row["dataset"])["delta_e"].to_numpy()
        assert row["pairs"] == str(len(delta_e))
        assert row["mean ΔE"] == shown(float(delta_e.mean()), 3)
        assert row["p95 ΔE"] == shown(float(np.percentile(delta_e, 95)), 3)
    by_name = {row["dataset"]: row for row in rows}
    assert (
        by_name["vqvae2-ep1"]["epoch"] == "1" and by_name["vqvae2-ep1"]["ckpt PSNR"] != "-"
    )  # its card's regime
    assert by_name["bicubic"]["ckpt PSNR"] == "-"  # no checkpoint made it


def test_html_tables_equal_the_markdown_tables(study: Path):
    parser = _HtmlTables()
    parser.feed((study / "report.html").read_text())
    tables = list(markdown_tables((study / "report.md").read_text()).values())
    assert len(parser.tables) == len(tables) == 3
    for html_rows, markdown_rows in zip(parser.tables, tables, strict=True):
        assert [text for text, _ in html_rows[0]] == list(markdown_rows[0])
        for html_row, markdown_row in zip(html_rows[1:], markdown_rows, strict=True):
            assert [text for text, _ in html_row] == [cell.strip("*") for cell in markdown_row.values()]
            assert [best for _, best in html_row] == [cell.startswith("**") for cell in markdown_row.values()]


# --- figures -------------------------------------------------------------------------------------------------------


def test_figures_are_the_ones_linked_and_inlined(study: Path):
    text = (study / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\((report/[^)]+)\)", text)
    assert sorted(linked) == sorted(f"report/{path.name}" for path in (study / "report").iterdir())
    expected = {
        "delta_e_vs_epoch.png",  # Figure 9
        "regime_vs_epoch.png",
        "reconstructions-vqvae2.png",  # Figures 3 / 4
        "gain-edsr-tiny.png",
        "colour-shift-examples.png",  # Figure 10
        "colour-shift-edsr-tiny.png",  # Figure 11
        "sr-crops-edsr-tiny.png",
    }
    assert expected <= {Path(path).name for path in linked}
    page = (study / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(linked)
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_sr_strip_shows_the_same_crops_of_every_run(study: Path):
    """Column c of the SR-crop sheet, row r: the centre crop of run c's sr/<image r>.png, enlarged by the sheet's
    zoom; the last column the ground truth."""
    sheet = np.asarray(Image.open(study / "report" / "sr-crops-edsr-tiny.png").convert("RGB"))
    names = sorted(path.stem for path in (study / "eval/edsr/pretrained" / EVALSET / "sr").glob("*.png"))[:3]
    runs = [
        *FINETUNED_RUNS[:1],
        *sorted((*FINETUNED_RUNS[1:], *COLOUR_SHIFT_RUNS), key=report_module.natural_key),
    ]
    columns = [study / "eval/edsr" / run / EVALSET / "sr" for run in runs] + [
        study / "evalsets" / EVALSET / "hr"
    ]
    first = load_rgb(columns[0] / f"{names[0]}.png")
    side = min(STRIP_CROP, *first.shape[:2])
    zoom = report_module.zoom_for(side)
    title_height = 2 * TEXT_HEIGHT + MARGIN
    for column, folder in enumerate(columns):
        for row, name in enumerate(names):
            image = load_rgb(folder / f"{name}.png")
            top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
            crop = np.repeat(np.repeat(image[top : top + side, left : left + side], zoom, 0), zoom, 1)
            y, x = title_height + row * (side * zoom + MARGIN), MARGIN + column * (side * zoom + MARGIN)
            np.testing.assert_array_equal(
                sheet[y : y + side * zoom, x : x + side * zoom], crop, err_msg=str(folder)
            )


# --- the browser ---------------------------------------------------------------------------------------------------

FRAME = (200, 100, 0)  # figure img border, #c86400 in the page's style
TABLE_HEADER = (221, 230, 245)  # th background, #dde6f5


@pytest.mark.skipif(
    chromium_binary() is None, reason="no chromium binary (Debian: apt-get install -y chromium)"
)
def test_report_html_opens_offline_in_chromium(study: Path):
    """Headless Chromium loads report.html from disk: no console error, no request but the file and data: images;
    in its screenshot every table shows its header colour and every figure is a decoded image inside its frame."""
    page = load_page(chromium_binary(), study / "report.html")
    assert page.errors == []
    own = (study / "report.html").resolve().as_uri()
    assert page.requests[0] == own
    assert all(url == own or url.startswith("data:image/png;base64,") for url in page.requests), [
        url[:80] for url in page.requests
    ]
    tables = [box for box in page.boxes if box["tag"] == "table"]
    figures = [box for box in page.boxes if box["tag"] == "img"]
    linked = re.findall(r"!\[[^\]]*\]\((report/[^)]+)\)", (study / "report.md").read_text())
    assert len(tables) == 3 and len(figures) == len(linked)

    shot = np.asarray(Image.open(io.BytesIO(page.screenshot)).convert("RGB")).astype(int)
    for box in tables:
        region = _region(shot, box)
        header_pixels = np.all(np.abs(region - TABLE_HEADER) <= 2, axis=-1).sum()
        assert header_pixels > 0.5 * box["width"] * 10, (
            box
        )  # a header row at least 10 px high, most of its width
    for box in figures:
        assert box["naturalWidth"] > 100, (
            box
        )  # the data: URI decoded to a real image, not a broken-image icon
        region = _region(shot, box)
        frame = np.all(np.abs(region[:2] - FRAME) <= 2, axis=-1).mean()  # the top border
        inside = region[6:-6, 6:-6].reshape(-1, 3)
        assert frame > 0.9, box
        assert len(np.unique(inside, axis=0)) > 20 and (inside.min(axis=1) < 200).mean() > 0.01, box


def _region(shot: np.ndarray, box: dict) -> np.ndarray:
    top, left = round(box["y"]), round(box["x"])
    return shot[top : top + int(box["height"]), left : left + int(box["width"])]


@pytest.mark.skipif(
    chromium_binary() is None, reason="no chromium binary (Debian: apt-get install -y chromium)"
)
@pytest.mark.parametrize("keep_policy", [True, False])
def test_the_browser_check_sees_an_external_reference(study: Path, tmp_path: Path, keep_policy: bool):
    """The check above can fail: an <img> to another host in a copy of the page is refused by its policy (a console
    error), or, with the policy removed, requested (a request outside the file)."""
    page = (study / "report.html").read_text()
    if not keep_policy:
        page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
    page = page.replace("</body>", '<img src="http://127.0.0.1:9/escape.png"></body>')
    copy = tmp_path / "report.html"
    copy.write_text(page)
    loaded = load_page(chromium_binary(), copy)
    if keep_policy:
        assert any("Content Security Policy" in error for error in loaded.errors), loaded.errors
    else:
        assert "http://127.0.0.1:9/escape.png" in loaded.requests


# --- writing -------------------------------------------------------------------------------------------------------


def _report_files(root: Path) -> dict[Path, bytes]:
    paths = [root / "report.md", root / "report.html", *(root / "report").iterdir()]
    return {path.relative_to(root): path.read_bytes() for path in paths}


def _evals_only(study: Path, root: Path) -> Path:
    shutil.copytree(study / "eval", root / "eval")
    shutil.copytree(study / "evalsets", root / "evalsets")
    return root


def test_a_failed_report_leaves_the_previous_one_whole(study: Path, tmp_path: Path, monkeypatch):
    root = _evals_only(study, tmp_path / "study")
    write_report(root)
    before = _report_files(root)
    assert Path("report/sr-crops-edsr-tiny.png") in before

    def broken(*arguments):
        raise RuntimeError("killed while drawing")

    monkeypatch.setattr(report_module, "strips_section", broken)
    with pytest.raises(RuntimeError, match="killed"):
        write_report(root)
    after = _report_files(root)
    assert after == before
    assert not list(root.glob(".report-*"))  # its temporary folder is gone


def test_unfinished_evaluations_are_listed_and_left_out(study: Path, tmp_path: Path):
    root = _evals_only(study, tmp_path / "study")
    (
        root / "eval/edsr/vqvae2-ep2" / EVALSET / "summary.json"
    ).unlink()  # as an eval killed before it finished
    write_report(root)
    text = (root / "report.md").read_text()
    rows = table_with(markdown_tables(text), f"edsr on {EVALSET}")
    assert "vqvae2-ep2" not in [row["run"] for row in rows]
    assert f"eval/edsr/vqvae2-ep2/{EVALSET}" in text.split("## Not finished")[1]
    assert "No datasets yet" in text


def test_an_empty_or_missing_study_folder(tmp_path: Path):
    with pytest.raises(FactoryError, match="no study folder"):
        write_report(tmp_path / "absent")
    paths = write_report(tmp_path)
    assert "No finished evaluation yet" in paths.markdown.read_text()
    assert paths.html.read_text().startswith("<!DOCTYPE html>")
