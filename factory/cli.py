"""The `factory` command line. Subcommands only parse options, build a config and call one function.

factory build --model vqvae2 --epoch 8 --out shards/      the main job (see `factory build --help`)
factory train --model vqvae2 --data tiny-imagenet-200/     undertrained reconstructor checkpoints
"""

from __future__ import annotations

import functools
import logging
import sys

import click

from factory.classifier import ARCHITECTURES as CLASSIFIER_ARCHITECTURES
from factory.codec_names import CODECS
from factory.config import FactoryError
from factory.degraders import DEGRADER_NAMES
from factory.devices import DEFAULT_DEVICE, DEVICE_HELP
from factory.models import MODEL_NAMES
from factory.sr import ARCHITECTURES as SR_ARCHITECTURES
from factory.sr import PRESET_NAMES as SR_PRESET_NAMES


def device_option(what: str = ""):
    """--device, with factory.devices' one default and names for every command; `what` says what runs on it."""
    return click.option(
        "--device", default=DEFAULT_DEVICE, show_default=True, help=f"Torch device{what}: {DEVICE_HELP}."
    )


def names(choices) -> str:
    """'a, b or c' from a registry's names."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}"


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


@main.command("train")
@click.option(
    "--model",
    required=True,
    help=f"Reconstructor to train, by registry name: {names(MODEL_NAMES)}.",
)
@click.option(
    "--data",
    required=True,
    multiple=True,
    type=click.Path(path_type=str),
    help="Training images: a folder (searched recursively; Tiny-ImageNet's train/ works as is) or an image file. "
    "Repeat for several.",
)
@click.option("--epochs", default=64, show_default=True, type=int, help="Train up to this epoch.")
@click.option(
    "--save-at",
    default=None,
    help="Comma-separated epochs to write checkpoints at [default: the paper's 4,8,16,32,64 up to --epochs, and "
    "--epochs]. An epoch beyond --epochs is an error.",
)
@click.option(
    "--epoch-size",
    default=None,
    type=int,
    help="Samples per epoch, drawn from the images as consecutive random permutations [default: 45000, the "
    "paper's Tiny-ImageNet epoch, whatever the folder holds].",
)
@click.option(
    "--image-size",
    default=None,
    type=int,
    help="Side of the square training crops [default: the model's native size: 64 vae, 224 mae, 256 others].",
)
@click.option(
    "--batch-size",
    default=None,
    type=int,
    help="Images per optimiser step [default: the model's reference batch (its RECIPE in factory/models/); the "
    "run's first line says it].",
)
@click.option(
    "--lr",
    default=None,
    type=float,
    help="Learning rate [default: the model's reference rate (its RECIPE in factory/models/); the run's first line "
    "says it].",
)
@click.option(
    "--regime-size",
    default=256,
    show_default=True,
    type=int,
    help="LR side at which each saved epoch's regime (PSNR, SSIM, ΔE, checkerboard index) is measured: the "
    "build's (1024 crops / 4).",
)
@click.option(
    "--heldout",
    default=64,
    show_default=True,
    type=int,
    help="Images held out of training to measure the regime on (at most one in ten; none below 10 images).",
)
@click.option(
    "--regime-data",
    multiple=True,
    type=click.Path(path_type=str),
    help="Measure the regime on these images (folder or file; repeatable) instead of a held-out split.",
)
@click.option(
    "--preset",
    default="paper",
    show_default=True,
    help="Model preset: paper (the reference implementations' sizes), tiny (seconds on a CPU, for tests); vqvae and "
    "vqvae2 also have embedded (paper sizes with dead-code restarts, the build's embedded default).",
)
@click.option(
    "--checkpoints",
    default="checkpoints",
    show_default=True,
    type=click.Path(path_type=str),
    help="Checkpoint root; files go to <checkpoints>/<model>/epoch-<E>.pt.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed for initialisation, data order, crops and noise.",
)
@device_option()
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=int,
    help="Image-decoding worker processes (0: in-process).",
)
@click.option(
    "--bf16/--no-bf16",
    default=True,
    show_default=True,
    help="bf16 autocast for the forward pass on CUDA (no effect on CPU).",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@user_errors
def train_command(
    model,
    data,
    epochs,
    save_at,
    epoch_size,
    image_size,
    batch_size,
    lr,
    regime_size,
    heldout,
    regime_data,
    preset,
    checkpoints,
    seed,
    device,
    workers,
    bf16,
    progress,
) -> None:
    """Train a reconstructor from scratch and write undertrained checkpoints at chosen epochs.

    Resumes from the newest checkpoint of the same run (same model, config, data, seed and settings) when
    restarted.
    """
    from factory.train import TrainConfig, train

    config = TrainConfig(
        model=model,
        data=tuple(data),
        epochs=epochs,
        save_at=None if save_at is None else parse_int_list(save_at),
        epoch_size=epoch_size,
        image_size=image_size,
        batch_size=batch_size,
        lr=lr,
        regime_size=regime_size,
        heldout=heldout,
        regime_data=tuple(regime_data),
        preset=preset,
        checkpoints=checkpoints,
        seed=seed,
        device=device,
        workers=workers,
        bf16=bf16,
        progress=progress,
    )
    for line in train(config).summary_lines():
        click.echo(line)


# --- build commands ---


def _lab_shift_option(context, parameter, value: str | None) -> tuple[float, float, float] | None:
    """'L,a,b' -> (ΔL*, Δa*, Δb*)."""
    if value is None:
        return None
    try:
        components = tuple(float(part) for part in value.split(","))
    except ValueError:
        components = ()
    if len(components) != 3:
        raise click.BadParameter(f"expected three numbers L,a,b such as 0,4,-2.5, got {value!r}")
    return components


@main.command("build")
@click.option(
    "--hr",
    "hr",
    multiple=True,
    type=click.Path(file_okay=False),
    help="HR image folder (recursive); repeatable. DF2K: --hr DIV2K_train_HR/ --hr Flickr2K_HR/. Without --hr/--hr-list: scikit-image's bundled colour photos, cut into 256 crops.",
)
@click.option(
    "--hr-list",
    "hr_list",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="File listing HR image paths, one a line (relative to the file's folder); repeatable.",
)
@click.option(
    "--model",
    default="vqvae2",
    show_default=True,
    type=click.Choice([*MODEL_NAMES, *DEGRADER_NAMES]),
    help="Degrader: a reconstructor at --epoch (x = bicubic(HR), then G(x)), or one of "
    f"{names(DEGRADER_NAMES)} (bicubic: the undegraded baseline; the classical pipelines take "
    "--degradation-config).",
)
@click.option(
    "--epoch",
    default=None,
    type=int,
    help="Training epoch of the reconstructor's checkpoint (required for reconstructors, e.g. 8).",
)
@click.option(
    "--degradation-config",
    "degradation_config",
    default=None,
    type=click.Path(dir_okay=False),
    help="YAML of the classical degrader's options: realesrgan takes Real-ESRGAN's training option file as it is "
    "(e.g. train_realesrnet_x4plus.yml) or a flat mapping of its keys; bsrgan a flat mapping.",
)
@click.option(
    "--checkpoints",
    default="checkpoints",
    show_default=True,
    help="Checkpoint root: <checkpoints>/<model>/epoch-<E>.pt.",
)
@click.option(
    "--preset",
    default=None,
    help="Model preset for training a missing checkpoint (default: train's default).",
)
@click.option(
    "--train-data",
    "train_data",
    multiple=True,
    type=click.Path(),
    help="Images to train a missing checkpoint on (default: the HR images); repeatable.",
)
@click.option(
    "--train/--no-train",
    "train_missing",
    default=True,
    show_default=True,
    help="Train a missing checkpoint first, or stop with an error.",
)
@click.option(
    "--shipped-checkpoint/--no-shipped-checkpoint",
    "shipped_checkpoint",
    default=True,
    show_default=True,
    help="Embedded default (no --hr): use the checkpoint shipped with factory when it is the run this build "
    "would train, or train it here.",
)
@click.option(
    "--scale", default=4, show_default=True, type=int, help="Downsampling factor: HR size / LR size."
)
@click.option(
    "--crop",
    default=None,
    type=int,
    help="HR crop side in pixels [default: 1024; 256 with the embedded default photos].",
)
@click.option(
    "--stride",
    default=None,
    type=int,
    help="Step of the crop grid [default: crop / 2, which gives DF2K ~20,700 crops of 1024].",
)
@click.option("--limit", default=None, type=int, help="Build only the first N crops of the plan.")
@click.option(
    "--out",
    default="shards",
    show_default=True,
    help="Shard root (folder or URI such as s3://bucket/prefix).",
)
@click.option("--manifests", default="manifests", show_default=True, help="Manifest root (folder or URI).")
@click.option(
    "--name",
    default=None,
    help="Dataset name [default: <model>-ep<E> for a reconstructor, else the degrader's name].",
)
@click.option(
    "--shard-size", "shard_size", default=1000, show_default=True, type=int, help="Pairs per shard."
)
@click.option(
    "--codec",
    default="png",
    show_default=True,
    type=click.Choice(list(CODECS)),
    help="Payload codec: png (any WebDataset reader) or zst (zstd-compressed .npy, faster to decode).",
)
@click.option(
    "--batch-size", "batch_size", default=8, show_default=True, type=int, help="Crops per device batch."
)
@device_option(" of the workers")
@click.option(
    "--actors",
    default=None,
    type=int,
    help="Worker actors [default: one per GPU; one per CPU without GPUs]; 0 runs in this process without Ray.",
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster to use: 'auto' or ray://host:10001 [default: an embedded local Ray].",
)
@click.option(
    "--num-cpus", "num_cpus", default=None, type=int, help="CPUs of the embedded Ray [default: all]."
)
@click.option(
    "--threads",
    default=None,
    type=int,
    help="Torch threads per worker [default: the embedded Ray's CPUs / actors; torch's choice on a cluster].",
)
@click.option(
    "--bf16",
    is_flag=True,
    help="Run the reconstructor under bf16 autocast on CUDA (faster; no effect on CPU).",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Build seed: every pair draws its degradation from a generator seeded by (seed, its key).",
)
@click.option(
    "--max-pixels",
    "max_pixels",
    default=None,
    type=int,
    help="Reject larger images as decompression bombs [default: Pillow's 89,478,485].",
)
@click.option(
    "--color-correct",
    "color_correct",
    is_flag=True,
    help="Correct the degraded LR's colours towards the bicubic LR.",
)
@click.option(
    "--color-shift",
    "color_shift",
    default=None,
    callback=_lab_shift_option,
    metavar="L,a,b",
    help="--model bicubic only: shift every LR in CIELAB by (ΔL*, Δa*, Δb*), e.g. --color-shift=0,4,-2.5 "
    "(the paper's colour-difference datasets, Figures 10 and 11) [default name: bicubic-lab<L>_<a>_<b>].",
)
@click.option(
    "--target-delta-e",
    "target_delta_e",
    default=None,
    type=click.FloatRange(min=0.0, min_open=True),
    help="--model bicubic only: shift each LR in CIELAB along (0, 1, 1) until its mean CIEDE2000 to the bicubic "
    "LR is this [default name: bicubic-de<X>]; not with --color-shift.",
)
@click.option(
    "--classifier",
    default=None,
    type=click.Path(dir_okay=False),
    help="Degradation classifier checkpoint: fills the label columns.",
)
@click.option(
    "--dry-run",
    "dry_run",
    is_flag=True,
    help="Print the plan (images, crops, shards, actors, estimated bytes) and write nothing.",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@user_errors
def build_command(**options) -> None:
    """Build (degraded LR, HR) pairs into WebDataset shards with Parquet manifests (the main job).

    Rerunning the same command resumes: committed shards are skipped, partial ones redone.
    """
    from factory.build import BuildConfig, build

    for name in ("hr", "hr_list", "train_data"):
        options[name] = tuple(options[name])
    result = build(BuildConfig(**options, command=" ".join(sys.argv)))
    click.echo("\n".join(result.summary_lines()))


@main.command("verify")
@click.argument("shards_dir")
@click.option("--manifests", default="manifests", show_default=True, help="Manifest root (folder or URI).")
@click.option("--dataset", default=None, help="Verify this dataset only [default: every dataset found].")
@user_errors
def verify_command(shards_dir: str, manifests: str, dataset: str | None) -> None:
    """Check that every shard is readable and agrees with its manifest (keys, sizes, sha256s), with no orphan or
    missing shards and no duplicate keys. Exits 1 listing the problems."""
    from factory.manifests import verify

    report = verify(shards_dir, manifests, dataset)
    click.echo(
        f"checked {len(report.datasets)} dataset(s), {report.shards} shard(s), {report.samples} sample(s): "
        + ("ok" if report.ok else f"{len(report.problems)} problem(s)")
    )
    for problem in report.problems:
        click.echo(f"  {problem}")
    if not report.ok:
        sys.exit(1)


# --- classifier commands ---


@main.group("classifier")
def classifier_group() -> None:
    """The degradation classifier (15 Tiny-ImageNet-C classes) behind the labels and the entropy H (paper 4.3.1)."""


@classifier_group.command("train")
@click.option(
    "--data",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder of source images (any photos; random crops get corrupted).",
)
@click.option(
    "--arch",
    default="resnet152",
    show_default=True,
    type=click.Choice(CLASSIFIER_ARCHITECTURES),
    help="torchvision ResNet, trained from scratch (resnet152 as in the paper).",
)
@click.option(
    "--per-class",
    "per_class",
    default=2000,
    show_default=True,
    type=int,
    help="Synthetic images per class (Tiny-ImageNet-C: 2,000).",
)
@click.option(
    "--size", default=64, show_default=True, type=int, help="Input size in pixels (Tiny-ImageNet-C: 64)."
)
@click.option("--epochs", default=10, show_default=True, type=int, help="Passes over the training split.")
@click.option(
    "--batch-size", "batch_size", default=64, show_default=True, type=int, help="Images per optimiser step."
)
@click.option(
    "--learning-rate",
    "learning_rate",
    default=2e-3,
    show_default=True,
    type=float,
    help="AdamW peak learning rate (one-cycle schedule).",
)
@click.option(
    "--holdout",
    "holdout_fraction",
    default=0.2,
    show_default=True,
    type=float,
    help="Fraction of each class held out for accuracy and the confusion matrix.",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of the synthesis, split and training."
)
@device_option()
@click.option("--threads", default=None, type=int, help="Torch CPU threads [default: torch's choice].")
@click.option(
    "--out",
    default="classifier.safetensors",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Checkpoint path; .confusion.png and .metrics.json are written beside it.",
)
@user_errors
def classifier_train_command(**options) -> None:
    """Synthesise a Tiny-ImageNet-C-like set from DATA, train the classifier, report held-out accuracy."""
    from factory.classifier.training import ClassifierTrainConfig, train_classifier

    result = train_classifier(ClassifierTrainConfig(**options))
    click.echo(f"held-out accuracy {result.accuracy:.1%} (chance {1 / 15:.1%})")
    click.echo(f"checkpoint {result.checkpoint}\nconfusion matrix {result.figure}\nmetrics {result.metrics}")
    for true, predicted, fraction in result.most_confused[:5]:
        click.echo(f"  {true} -> {predicted}: {fraction:.0%}")


@main.command("label")
@click.option(
    "--classifier",
    required=True,
    type=click.Path(dir_okay=False),
    help="Classifier checkpoint from `factory classifier train`.",
)
@click.option("--shards", default="shards", show_default=True, help="Shard root (folder or URI).")
@click.option("--manifests", default="manifests", show_default=True, help="Manifest root (folder or URI).")
@click.option(
    "--dataset",
    default=None,
    help="Label this dataset only [default: every dataset under the manifest root].",
)
@click.option(
    "--batch-size",
    "batch_size",
    default=64,
    show_default=True,
    type=int,
    help="LR images per classifier call.",
)
@device_option()
@user_errors
def label_command(**options) -> None:
    """(Re)label a dataset's pairs: rewrites only its Parquet manifests and its card's labels (atomically); shards
    stay byte-identical."""
    from factory.classifier.relabel import LabelConfig, label_dataset

    result = label_dataset(LabelConfig(**options))
    click.echo(f"labelled {result.pairs} pair(s) in {result.manifests} manifest(s)")
    for dataset, entropy in result.entropy.items():
        click.echo(
            f"  {dataset}: entropy H = {entropy:.3f} nats over {sum(result.counts[dataset].values())} pair(s)"
        )


# --- manifest commands ---


def order_options(command):
    """--order-by, --random and --seed: the order of the matching pairs (preview and export take the first --n)."""
    command = click.option("--seed", default=0, show_default=True, type=int, help="Seed of --random.")(
        command
    )
    command = click.option(
        "--random",
        "random_order",
        is_flag=True,
        help="A random order drawn from --seed (the same seed gives the same order).",
    )(command)
    return click.option(
        "--order-by",
        "order_by",
        default=None,
        help='Manifest columns, each optionally ASC or DESC, e.g. "delta_e DESC" [default: manifest order].',
    )(command)


def exit_if_manifests_left_out(manifests_root: str) -> None:
    """After a query or stats answer that left out unreadable manifests (each named in a warning): exit status 1,
    since the answer covers only the others."""
    if "://" in manifests_root:
        return
    from factory.manifests import unreadable_manifests

    left_out = unreadable_manifests(manifests_root)
    if left_out:
        names = ", ".join(str(path) for path in left_out)
        click.echo(f"error: left out {len(left_out)} unreadable manifest(s): {names}", err=True)
        sys.exit(1)


MANIFESTS_HELP = "Manifest root: every dataset under it is included."
SHARDS_HELP = "Shard root (the manifests' `shard` column is relative to it)."
WHERE_HELP = "SQL predicate over the manifest columns, e.g. \"delta_e < 5 AND label = 'gaussian_noise'\"."


@main.command("query")
@click.argument("expression")
@click.option("--manifests", "manifests_root", default="manifests", show_default=True, help=MANIFESTS_HELP)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "csv", "json", "keys"]),
    default="table",
    show_default=True,
    help="table: aligned text; csv; json: one JSON object a line; keys: one pair key a line.",
)
@order_options
@user_errors
def query_command(expression, manifests_root, output_format, order_by, random_order, seed) -> None:
    """Query the manifests of all datasets with SQL.

    EXPRESSION is a predicate over the manifest columns ("delta_e < 5 AND label = 'gaussian_noise'") or a whole
    query over the view `manifests` ("SELECT dataset, avg(delta_e) FROM manifests GROUP BY dataset"). The query
    can read the manifests and nothing else.
    """
    from factory.query import format_table, is_full_query, query

    predicate = not is_full_query(expression)
    table = query(
        manifests_root,
        expression,
        columns=["key"] if output_format == "keys" and predicate else None,  # keys: read no other column
        order_by=order_by,
        random_seed=seed if random_order else None,
        skip_unreadable=True,
    )
    click.echo(format_table(table, output_format, summary=predicate), nl=False)
    exit_if_manifests_left_out(manifests_root)


@main.command("filter")
@click.option("--where", required=True, help=WHERE_HELP)
@click.option("--shards", "shards_root", default="shards", show_default=True, help=SHARDS_HELP)
@click.option("--manifests", "manifests_root", default="manifests", show_default=True, help=MANIFESTS_HELP)
@click.option(
    "--out", required=True, help="Shard root for the new dataset (written to OUT/NAME/); a folder or URI."
)
@click.option(
    "--out-manifests",
    default=None,
    help="Manifest root for the new dataset [default: --manifests]; a folder or URI.",
)
@click.option(
    "--name", default=None, help="Name of the new dataset [default: <parent>-where-<hash of --where>]."
)
@click.option(
    "--pairs-per-shard",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Pairs per new shard.",
)
@user_errors
def filter_command(where, shards_root, manifests_root, out, out_manifests, name, pairs_per_shard) -> None:
    """Write a new dataset with exactly the pairs matching --where (payloads copied byte for byte)."""
    from factory.filter import FilterConfig, filter_dataset

    summary = filter_dataset(
        FilterConfig(
            where=where,
            shards_root=shards_root,
            manifests_root=manifests_root,
            out=out,
            out_manifests=out_manifests,
            name=name,
            pairs_per_shard=pairs_per_shard,
        )
    )
    click.echo(
        f"{summary.dataset}: {summary.pairs} pairs in {len(summary.shards)} shards from {', '.join(summary.parent_datasets)}"
    )


@main.command("stats")
@click.option("--manifests", "manifests_root", default="manifests", show_default=True, help=MANIFESTS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON instead of a table.")
@click.option("--plots", default=None, help="Folder to write the figures (PNG) to.")
@user_errors
def stats_command(manifests_root: str, as_json: bool, plots: str | None) -> None:
    """Per dataset: pairs, colour difference (mean, median, p95), labels, entropy H, rejects; optional figures."""
    from pathlib import Path

    from factory.stats import StatsConfig, dataset_stats

    # manifests_root stays a string: Path("s3://bucket/m") would be "s3:/bucket/m".
    report = dataset_stats(StatsConfig(manifests_root=manifests_root, plots=Path(plots) if plots else None))
    click.echo(report.to_json() if as_json else report.to_text(), nl=False)
    exit_if_manifests_left_out(manifests_root)


@main.command("preview")
@click.option("--shards", "shards_root", default="shards", show_default=True, help=SHARDS_HELP)
@click.option("--manifests", "manifests_root", default="manifests", show_default=True, help=MANIFESTS_HELP)
@click.option("--where", default=None, help=WHERE_HELP + " Default: all pairs.")
@click.option(
    "--n", "count", default=16, show_default=True, type=click.IntRange(min=1, max=1024), help="Pairs to show."
)
@click.option("--out", required=True, help="Contact sheet to write (PNG).")
@click.option(
    "--checkpoints",
    default=None,
    type=click.Path(path_type=str),
    help="Draw the paper's Figure 3 instead: one column per saved epoch of <checkpoints>/<model>/ (with --model), "
    "then the input; no build needed.",
)
@click.option("--model", default=None, help="With --checkpoints: the reconstructor whose epochs to draw.")
@click.option(
    "--images",
    multiple=True,
    type=click.Path(path_type=str),
    help="With --checkpoints: input images (folder or file; repeatable) [default: scikit-image's colour photos]. "
    "Each is cut and downsampled as the build makes an LR image (see --size); --n of them are drawn.",
)
@click.option(
    "--size",
    default=64,
    show_default=True,
    type=click.IntRange(min=16),
    help="With --checkpoints: LR side drawn.",
)
@device_option(" (with --checkpoints)")
@order_options
@user_errors
def preview_command(
    shards_root,
    manifests_root,
    where,
    count,
    out,
    order_by,
    random_order,
    seed,
    checkpoints,
    model,
    images,
    size,
    device,
):
    """A contact sheet: HR, bicubic LR and degraded LR per pair, with key, colour difference and label; or, with
    --checkpoints and --model, the paper's Figure 3 (reconstructions per saved epoch)."""
    from pathlib import Path

    if checkpoints is not None:
        _epoch_preview(checkpoints, model, images, size, count, Path(out), device)
        return
    from factory.preview import PreviewConfig, make_preview

    summary = make_preview(
        PreviewConfig(
            shards_root=shards_root,
            manifests_root=manifests_root,
            where=where,
            count=count,
            out=Path(out),
            order_by=order_by,
            random_seed=seed if random_order else None,
        )
    )
    click.echo(f"{summary.out}: {summary.pairs} pairs")


def _epoch_preview(checkpoints, model, images, size, count, out, device) -> None:
    """`factory preview --checkpoints`: the Figure-3 sheet of every saved epoch of `model`."""
    from pathlib import Path

    from factory.devices import resolve_device
    from factory.preview import epoch_sheet
    from factory.regime import reconstructions_by_epoch, regime_images
    from factory.sources import find_images, list_sources

    if model is None:
        raise FactoryError("--checkpoints needs --model (the reconstructor whose epochs to draw)")
    files = [p for item in images for p in (find_images(item) if Path(item).is_dir() else [Path(item)])]
    files = files or [Path(source.path) for source in list_sources().files]
    inputs = regime_images(files[:count], size)
    if len(inputs) == 0:
        raise FactoryError(f"no readable image among {len(files[:count])} input files")
    device_name = str(resolve_device(device))
    columns = [
        (
            f"epoch {epoch}\n" + (f"{r['psnr']:.1f} dB, {r['ssim']:.2f}" if r.get("images") else ""),
            recon,
        )
        for epoch, r, recon in reconstructions_by_epoch(checkpoints, model, inputs, device_name)
    ]
    zoom = max(1, 128 // size)
    epoch_sheet([*columns, ("input", inputs)], out, zoom=zoom)
    click.echo(f"{out}: {len(inputs)} images x {len(columns)} epochs of {model}")


@main.command("export")
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["basicsr"]),
    default="basicsr",
    show_default=True,
    help="basicsr: hr/ and lr/ PNG folders with meta_info files for BasicSR / Real-ESRGAN paired datasets.",
)
@click.option("--shards", "shards_root", default="shards", show_default=True, help=SHARDS_HELP)
@click.option("--manifests", "manifests_root", default="manifests", show_default=True, help=MANIFESTS_HELP)
@click.option("--where", default=None, help=WHERE_HELP + " Default: all pairs.")
@click.option("--out", required=True, help="Folder to create (must not exist, or be empty).")
@click.option(
    "--n", "count", default=None, type=click.IntRange(min=1), help="Export the first N pairs [default: all]."
)
@order_options
@user_errors
def export_command(
    export_format, shards_root, manifests_root, where, out, count, order_by, random_order, seed
) -> None:
    """Export pairs as PNG folders that BasicSR / Real-ESRGAN paired datasets read as they are."""
    from pathlib import Path

    from factory.export import ExportConfig, export_basicsr

    summary = export_basicsr(
        ExportConfig(
            shards_root=shards_root,
            manifests_root=manifests_root,
            where=where,
            out=Path(out),
            count=count,
            order_by=order_by,
            random_seed=seed if random_order else None,
        )
    )
    click.echo(f"{summary.out}: {summary.pairs} pairs (hr/, lr/, {', '.join(summary.meta_info_files)})")


# --- stream commands ---


def _float_list(text: str | None) -> tuple[float, ...] | None:
    """'3,1' -> (3.0, 1.0); None stays None."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


@main.command("eval")
@click.option(
    "--model", required=True, help="SR weights: an official checkpoint or `factory finetune`'s model.pth."
)
@click.option(
    "--lr",
    "lr_folder",
    required=True,
    help="Folder of LR inputs (NTIRE 2018 x4m names, NTIRE 2020 or same names).",
)
@click.option("--hr", "hr_folder", required=True, help="Folder of ground-truth HR images.")
@click.option(
    "--out",
    default="runs/eval",
    show_default=True,
    help="Output folder: sr/*.png, metrics.csv, summary.json.",
)
@click.option(
    "--y-channel", is_flag=True, help="PSNR / SSIM on the BT.601 Y channel (BasicSR's test_y_channel)."
)
@click.option(
    "--crop-border",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Pixels dropped on each side before the metrics (BasicSR: the scale).",
)
@click.option(
    "--lpips-weights",
    default=None,
    help="LPIPS-alex weights file (the lpips package's LPIPS state dict); without it no LPIPS.",
)
@click.option(
    "--arch",
    "architecture",
    type=click.Choice(SR_ARCHITECTURES),
    default=None,
    help="Expected architecture (checked against the weights).",
)
@device_option()
@user_errors
def eval_command(
    model, lr_folder, hr_folder, out, y_channel, crop_border, lpips_weights, architecture, device
) -> None:
    """Super-resolve LR images, save the outputs and report PSNR / SSIM (/ LPIPS) against HR."""
    from factory.evaluate import EvalConfig, evaluate

    summary = evaluate(
        EvalConfig(
            model=model,
            lr=lr_folder,
            hr=hr_folder,
            out=out,
            y_channel=y_channel,
            crop_border=crop_border,
            lpips_weights=lpips_weights,
            architecture=architecture,
            device=device,
        )
    )
    lpips = "n/a" if summary.lpips is None else f"{summary.lpips:.4f}"
    rejected = ""
    if summary.rejected:
        first = summary.rejected[0]
        rejected = f"; {len(summary.rejected)} rejected, e.g. {first.lr.name}: {first.reason}"
    click.echo(
        f"{summary.images} images: PSNR {summary.psnr:.2f} dB, SSIM {summary.ssim:.4f}, LPIPS {lpips} "
        f"({summary.csv}){rejected}"
    )


@main.command("finetune")
@click.option(
    "--arch",
    "architecture",
    type=click.Choice(SR_ARCHITECTURES),
    required=True,
    help="SR network to fine-tune.",
)
@click.option(
    "--pretrained",
    default=None,
    help="Official (or fine-tuned) weights (.pth/.pt/.safetensors); without it a random --preset network.",
)
@click.option(
    "--preset",
    type=click.Choice(SR_PRESET_NAMES),
    default="paper",
    show_default=True,
    help="Network shape without --pretrained: the official models' or a tiny test one.",
)
@click.option(
    "--shards",
    multiple=True,
    required=True,
    help="A dataset's shard folder (or a shard root: all its datasets), brace pattern or URL list; repeat for "
    "several datasets (see --weights).",
)
@click.option(
    "--weights", "dataset_weights", default=None, help="Mixing weights, one per --shards, e.g. '3,1'."
)
@click.option(
    "--manifests", default=None, help="Manifest root: read only committed shards, and apply --where."
)
@click.option(
    "--where",
    default=None,
    help='SQL predicate over the manifest columns, e.g. "delta_e < 5" (needs --manifests).',
)
@click.option(
    "--allow-partial",
    is_flag=True,
    help="With --manifests, train on what a partial, corrupt or stale shard holds: one line per epoch with the "
    "counts, not an error.",
)
@click.option(
    "--iters",
    "iterations",
    default=10_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Optimiser steps (on every rank).",
)
@click.option(
    "--batch-size",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Patches per rank and step.",
)
@click.option(
    "--patch-size",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="LR patch side (HR: scale x).",
)
@click.option(
    "--lr",
    "learning_rate",
    default=1e-4,
    show_default=True,
    type=float,
    help="Adam learning rate (constant).",
)
@click.option(
    "--patches-per-pair",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Random crops per decoded pair.",
)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=0),
    help="DataLoader workers per rank [default: what the cores and the shards allow, at most 4].",
)
@click.option(
    "--checkpoint-every",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Iterations between checkpoints.",
)
@click.option(
    "--log-every",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    help="Iterations between loss / throughput log lines.",
)
@click.option("--no-amp", is_flag=True, help="Train in float32 on GPU (default: bfloat16 autocast).")
@click.option("--no-resume", is_flag=True, help="Start over even if OUT/checkpoints holds a checkpoint.")
@click.option("--seed", default=0, show_default=True, type=int, help="Initialisation and data-order seed.")
@click.option(
    "--out",
    default="runs/finetune",
    show_default=True,
    help="Output folder (checkpoints, log.jsonl, model.pth).",
)
@click.option(
    "--loss",
    type=click.Choice(["l1", "esrgan"]),
    default="l1",
    show_default=True,
    help="l1: the pre-trained models' objective; esrgan: L1 + VGG19 perceptual + relativistic GAN.",
)
@click.option(
    "--vgg-weights",
    default=None,
    help="VGG19 weights file for --loss esrgan (torchvision's vgg19 state dict).",
)
@user_errors
def finetune_command(
    architecture,
    pretrained,
    preset,
    shards,
    dataset_weights,
    manifests,
    where,
    allow_partial,
    iterations,
    batch_size,
    patch_size,
    learning_rate,
    patches_per_pair,
    workers,
    checkpoint_every,
    log_every,
    no_amp,
    no_resume,
    seed,
    out,
    loss,
    vgg_weights,
) -> None:
    """Fine-tune EDSR / ESRGAN / SwinIR / HAT on streamed pairs; runs as is or under torchrun (DDP)."""
    from factory.finetune import FinetuneConfig, finetune

    result = finetune(
        FinetuneConfig(
            architecture=architecture,
            pretrained=pretrained,
            preset=preset,
            shards=tuple(shards),
            dataset_weights=_float_list(dataset_weights),
            manifests=manifests,
            where=where,
            allow_partial=allow_partial,
            iterations=iterations,
            batch_size=batch_size,
            patch_size=patch_size,
            learning_rate=learning_rate,
            patches_per_pair=patches_per_pair,
            workers=workers,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            amp=not no_amp,
            resume=not no_resume,
            seed=seed,
            out=out,
            loss=loss,
            vgg_weights=vgg_weights,
        )
    )
    if result.rank == 0:  # one result line, not one per process
        click.echo(
            f"{result.weights}: {result.iterations} iterations, loss {result.final_loss:.5f}, "
            f"{result.patches_per_second:.1f} patches/s"
        )


# --- study ---


@main.command("study")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option(
    "--address",
    default=None,
    help="Ray cluster to run on ('auto', 'ray://host:10001') [default: an embedded local Ray].",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the stage graph with each stage's state (done, stale, to run); write nothing.",
)
@click.option(
    "--only",
    multiple=True,
    help="Run only these stages (ids or shell patterns such as 'eval.*', comma-separated) and what they need; "
    "repeatable.",
)
@click.option("--num-cpus", default=None, type=int, help="CPUs of the embedded Ray [default: all].")
@user_errors
def study_command(
    config_file: str, address: str | None, dry_run: bool, only: tuple[str, ...], num_cpus
) -> None:
    """Run a whole study (train -> build -> label -> stats -> fine-tune -> eval -> report) from one YAML file.

    Rerunning resumes: done stages are skipped, partial ones redone, and a changed config reruns only the stages
    downstream of the change. Exit status: the number of failed stages (at most 100).
    """
    from factory.study.config import load_study
    from factory.study.runner import run_study

    outcome = run_study(
        load_study(config_file),
        address=address,
        dry_run=dry_run,
        only=[item for value in only for item in value.split(",") if item],
        num_cpus=num_cpus,
    )
    if not dry_run:
        click.echo(
            f"study: {len(outcome.done)} stage(s) run, {len(outcome.skipped_done)} already done, "
            f"{len(outcome.failed)} failed, {len(outcome.blocked)} not run (a stage they need failed)"
        )
    sys.exit(outcome.exit_status)


if __name__ == "__main__":
    main()
