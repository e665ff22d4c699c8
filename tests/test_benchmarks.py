"""The benchmark harness (`python -m benchmarks`) imports and turns a real measurement into table rows.

Only the cheapest section runs here (the colour module against skimage on 4 pairs, a second or two); the whole
command is not part of CI (issue 9).
"""

from __future__ import annotations

import inspect
import math
import pkgutil
import re

import benchmarks
from benchmarks import bench_degraders, suite


def test_colour_section_gives_a_positive_figure_with_its_target():
    rows, raw = suite.colour(quick=True)
    by_name = {row.name: row for row in rows if not row.variant}
    row = by_name["ciede2000_speedup_vs_skimage"]
    assert row.measured > 0 and math.isfinite(row.measured)
    assert row.target == ">= 5" and row.holds == (row.measured >= 5)
    assert raw["skimage_pairs_per_s"] > 0 and raw["ours_float32_uint8_pairs_per_s"] > 0
    # The ratio is ours over skimage, measured in the same run; the mean ΔE agrees with skimage's.
    assert raw["ours_float32_uint8_max_abs_diff_of_means"] < 1e-3
    table = suite.format_table(rows)
    assert "| ciede2000_speedup_vs_skimage |" in table and ("| yes |" in table or "| no |" in table)


def test_machine_header_names_cores_device_and_versions():
    described = suite.machine()
    assert described["cores"] >= 1 and described["cpu_model"]
    for name in ("python", "torch", "numpy", "skimage", "ray", "pyarrow"):
        assert described[name]
    assert "device:" in suite.format_header(described)


def test_every_section_is_registered_once():
    """The sections are the suite's functions that return a section's (rows, raw figures): each is registered under
    its own name, once, and every benchmark module a section calls is one of the package's modules."""
    sections = {
        name: function
        for name, function in inspect.getmembers(suite, inspect.isfunction)
        if function.__module__ == suite.__name__
        and str(inspect.signature(function).return_annotation) == "tuple[list[Figure], dict]"
    }
    registered = {**suite.SECTIONS, **suite.GPU_SECTIONS}
    assert len(registered) == len(suite.SECTIONS) + len(suite.GPU_SECTIONS)
    assert sorted(registered.values(), key=id) == sorted(sections.values(), key=id)
    assert all(name == function.__name__ for name, function in suite.SECTIONS.items())
    modules = {module.name for module in pkgutil.iter_modules(benchmarks.__path__)}
    called = {
        name
        for function in sections.values()
        for name in re.findall(r"\b(bench_\w+)\.", inspect.getsource(function))
    }
    assert called and called <= modules, called - modules


def test_degraders_section_turns_a_real_measurement_into_ratio_rows():
    """bench_degraders on 4 small crops (128², a few seconds; the figures themselves are defined at 1024²)."""
    raw = bench_degraders.run(quick=True, hr_size=128)
    rows = {(row.name, row.variant): row for row in suite.degrader_rows(raw)}
    for name in ("realesrgan", "bsrgan"):
        versus_numpy = rows["classical_vs_numpy_reference", name]
        expected = raw[f"{name}_pairs_per_core_s"] / raw[f"{name}_numpy_pairs_per_core_s"]
        assert versus_numpy.measured == expected and math.isfinite(expected) and expected > 0
        assert versus_numpy.target == ">= 5" and versus_numpy.holds == (expected >= 5)
        versus_bicubic = rows["classical_vs_bicubic", name]
        assert versus_bicubic.measured == raw[f"{name}_pairs_per_core_s"] / raw["bicubic_pairs_per_core_s"]
        assert versus_bicubic.target == ">= 0.8"
    assert "| classical_vs_bicubic (bsrgan) |" in suite.format_table(list(rows.values()))
