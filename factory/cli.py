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

# --- stream commands ---


if __name__ == "__main__":
    main()
