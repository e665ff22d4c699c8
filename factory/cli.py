"""The `factory` command line. Subcommands only parse options, build a config and call one function.

    factory build --model vqvae2 --epoch 8 --out shards/      the main job (see `factory build --help`)
    factory train --model vqvae2 --data tiny-imagenet-200/     undertrained reconstructor checkpoints
"""

from __future__ import annotations

import functools
import logging
import sys

import click

from factory.config import FactoryError


def user_errors(command):
    """Turn FactoryError (bad input, bad options) into a one-line message and exit status 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FactoryError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def parse_int_list(text: str) -> tuple[int, ...]:
    """'4,8,16' -> (4, 8, 16); a malformed list is a one-line error."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="factory")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """An offline dataset factory for blind image super-resolution.

    Undertrained reconstructors (VQ-VAE, VQ-VAE-2, MAE, VAE, DDIM) degrade bicubic LR images; the (degraded LR, HR)
    pairs are written to WebDataset shards with Parquet manifests recording each pair's provenance, CIEDE2000 colour
    difference and degradation label.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


# --- train commands ---

# --- build commands ---

# --- classifier commands ---

# --- manifest commands ---

MANIFESTS_HELP = "Manifest root: every dataset under it is included."
SHARDS_HELP = "Shard root (the manifests' `shard` column is relative to it)."
WHERE_HELP = "SQL predicate over the manifest columns, e.g. \"delta_e < 5 AND label = 'gaussian_noise'\"."


@main.command("query")
@click.argument("expression")
@click.option("--manifests", "manifests_root", default="manifests", show_default=True, help=MANIFESTS_HELP)
@click.option(
    "--format", "output_format", type=click.Choice(["table", "csv", "json", "keys"]), default="table",
    show_default=True, help="table: aligned text; csv; json: one JSON object a line; keys: one pair key a line.",
)
@user_errors
def query_command(expression: str, manifests_root: str, output_format: str) -> None:
    """Query the manifests of all datasets with SQL.

    EXPRESSION is a predicate over the manifest columns ("delta_e < 5 AND label = 'gaussian_noise'") or a whole
    query over the view `manifests` ("SELECT dataset, avg(delta_e) FROM manifests GROUP BY dataset"). The query
    can read the manifests and nothing else.
    """
    from factory.query import format_table, is_full_query, query

    table = query(manifests_root, expression)
    click.echo(format_table(table, output_format, summary=not is_full_query(expression)), nl=False)


@main.command("filter")
@click.option("--where", required=True, help=WHERE_HELP)
@click.option("--shards", "shards_root", default="shards", show_default=True, help=SHARDS_HELP)
@click.option("--manifests", "manifests_root", default="manifests", show_default=True, help=MANIFESTS_HELP)
@click.option("--out", required=True, help="Shard root for the new dataset (written to OUT/NAME/).")
@click.option("--out-manifests", default=None, help="Manifest root for the new dataset [default: --manifests].")
@click.option("--name", default=None, help="Name of the new dataset [default: <parent>-where-<hash of --where>].")
@click.option("--pairs-per-shard", default=1000, show_default=True, type=click.IntRange(min=1), help="Pairs per new shard.")
@user_errors
def filter_command(where, shards_root, manifests_root, out, out_manifests, name, pairs_per_shard) -> None:
    """Write a new dataset with exactly the pairs matching --where (payloads copied byte for byte)."""
    from pathlib import Path

    from factory.query import FilterConfig, filter_dataset

    summary = filter_dataset(
        FilterConfig(
            where=where, shards_root=Path(shards_root), manifests_root=Path(manifests_root), out=Path(out),
            out_manifests=Path(out_manifests) if out_manifests else None, name=name, pairs_per_shard=pairs_per_shard,
        )
    )
    click.echo(f"{summary.dataset}: {summary.pairs} pairs in {len(summary.shards)} shards from {', '.join(summary.parent_datasets)}")


@main.command("stats")
@click.option("--manifests", "manifests_root", default="manifests", show_default=True, help=MANIFESTS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON instead of a table.")
@click.option("--plots", default=None, help="Folder to write the figures (PNG) to.")
@user_errors
def stats_command(manifests_root: str, as_json: bool, plots: str | None) -> None:
    """Per dataset: pairs, colour difference (mean, median, p95), labels, entropy H, rejects; optional figures."""
    from pathlib import Path

    from factory.stats import StatsConfig, dataset_stats

    report = dataset_stats(StatsConfig(manifests_root=Path(manifests_root), plots=Path(plots) if plots else None))
    click.echo(report.to_json() if as_json else report.to_text(), nl=False)


@main.command("preview")
@click.option("--shards", "shards_root", default="shards", show_default=True, help=SHARDS_HELP)
@click.option("--manifests", "manifests_root", default="manifests", show_default=True, help=MANIFESTS_HELP)
@click.option("--where", default=None, help=WHERE_HELP + " Default: all pairs.")
@click.option("--n", "count", default=16, show_default=True, type=click.IntRange(min=1, max=1024), help="Pairs to show.")
@click.option("--out", required=True, help="Contact sheet to write (PNG).")
@user_errors
def preview_command(shards_root, manifests_root, where, count, out) -> None:
    """A contact sheet: HR, bicubic LR and degraded LR per pair, with key, colour difference and label."""
    from pathlib import Path

    from factory.preview import PreviewConfig, make_preview

    summary = make_preview(
        PreviewConfig(shards_root=Path(shards_root), manifests_root=Path(manifests_root), where=where, count=count, out=Path(out))
    )
    click.echo(f"{summary.out}: {summary.pairs} pairs")


@main.command("export")
@click.option("--format", "export_format", type=click.Choice(["basicsr"]), default="basicsr", show_default=True,
              help="basicsr: hr/ and lr/ PNG folders with meta_info files for BasicSR / Real-ESRGAN paired datasets.")
@click.option("--shards", "shards_root", default="shards", show_default=True, help=SHARDS_HELP)
@click.option("--manifests", "manifests_root", default="manifests", show_default=True, help=MANIFESTS_HELP)
@click.option("--where", default=None, help=WHERE_HELP + " Default: all pairs.")
@click.option("--out", required=True, help="Folder to create (must not exist, or be empty).")
@user_errors
def export_command(export_format, shards_root, manifests_root, where, out) -> None:
    """Export pairs as PNG folders that BasicSR / Real-ESRGAN paired datasets read as they are."""
    from pathlib import Path

    from factory.export import ExportConfig, export_basicsr

    summary = export_basicsr(
        ExportConfig(shards_root=Path(shards_root), manifests_root=Path(manifests_root), where=where, out=Path(out))
    )
    click.echo(f"{summary.out}: {summary.pairs} pairs (hr/, lr/, {', '.join(summary.meta_info_files)})")


# --- stream commands ---


if __name__ == "__main__":
    main()
