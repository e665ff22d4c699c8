"""The streaming consumer: aligned (LR, HR) training patches straight from the shards, for (distributed) SR training.

    dataset = PairedPatches("shards/vqvae2-ep8", patch_size=64, scale=4, manifests="manifests", where="delta_e < 5")
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=4)

Decoding a pair is the cost, so each decoded pair gives `patches_per_pair` random crops, spread over the batch by a
shuffle buffer. `where` (the SQL predicate of `factory query`) is resolved once against the manifests: samples
that don't match are skipped before decoding, shards without a match are never opened, and shards without a
manifest (not committed) are never read. A shard root (`shards/`) stands for all its datasets; with manifests, the
pairs a filtered dataset copied from its parent are then read once.

An epoch is exact. With manifests the selected pairs are known before reading: one epoch cuts every one of them
exactly `patches_per_pair` times, over all ranks and DataLoader workers ("readers"). The readers agree on a shard
order drawn from (seed, epoch), lay the epoch's patches out in it and each takes its slice: a reader reads few
shards, each front to back, and a pair on the boundary of two slices is decoded by both, each cutting its share
(`plan_pass`). The one exception is padding: every reader yields as many patches, a whole number of batches
(`batch_size`), which takes at most readers x batch_size - 1 extra crops of pairs already in the epoch, the
convention of DistributedSampler. Then every rank runs as many steps. Without manifests an epoch is the same over
the complete pairs of each shard's tar listing (read at construction: a local shard by seeking from header to
header, any other URL by reading it through); pairs that turn out corrupt on reading are left out of it.
With `epoch_length` (and when mixing datasets by weight) an epoch is that many patches per rank cut from an endless
run of such passes, each epoch going on where the last stopped: over a run every pair is cut equally often, and
mixing keeps its weights in expectation with a uniform rate inside each dataset.

Nothing partial or stale trains in silence. With manifests every payload is checked against its sha256 as it is
read, and each shard's size against its commit record; per shard and reader the pairs expected, read, missing and
corrupt are counted. A shard that ends early, holds a payload of another sha256 or is another build's (its size
differs from its commit record) is an error naming it and the counts; with `allow_partial` it is one summary line
per epoch and reader. Without manifests the same counts, against the tar's own listing, are warnings.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import webdataset
from torch.utils.data import IterableDataset, get_worker_info

from factory.config import FactoryError, error_line
from factory.shards import decode_image, read_samples, sample_key
from factory.storage import Storage

logger = logging.getLogger(__name__)

IMAGE_FIELDS = ("hr", "lr")  # a sample needs both; json (the manifest row) is not needed for training


@dataclass(frozen=True)
class Patch:
    """One aligned crop pair, still uint8 (H, W, 3) views into the decoded pair: no copy until it is emitted."""

    lr: np.ndarray  # (p, p, 3) uint8
    hr: np.ndarray  # (scale*p, scale*p, 3) uint8
    key: str


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard URLs: a folder (its *.tar, sorted; for a shard root, its datasets' *.tar), a brace pattern
    (`d/d-{000000..000009}.tar`), `::`-separated lists, an object-store folder or shard (`s3://bucket/shards/<dataset>`,
    `gs://...`, read through pyarrow), or anything webdataset's gopen opens (`pipe:...`, http)."""
    if isinstance(urls, (str, os.PathLike)):
        urls = [urls]
    expanded: list[str] = []
    for url in urls:
        url = os.fspath(url)
        if os.path.isdir(url):
            # A dataset folder, or a shard root (`shards/`): then the shards of every dataset in it.
            shards = _visible(Path(url).glob("*.tar")) or _visible(Path(url).glob("*/*.tar"))
            if not shards:
                raise FactoryError(f"no shards (*.tar) in {url} or in its dataset folders")
            expanded += shards
        elif _is_object_store(url) and not url.endswith(".tar") and "{" not in url:
            shards = _object_store_shards(url)
            if not shards:
                raise FactoryError(f"no shards (*.tar) in {url} or in its dataset folders")
            expanded += shards
        else:
            expanded += webdataset.shardlists.expand_urls(url)
    # A local path that does not exist is a typo, said now rather than as a shard that "ends early" mid-training.
    missing = [url for url in expanded if ":" not in url.split("/")[0] and not os.path.exists(url)]
    if missing:
        raise FactoryError(
            f"no such shard or folder: {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return expanded


# Object stores are read through pyarrow's filesystems, the layer the build writes with (endpoint and credentials
# from the environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...); webdataset's gopen would shell out to a CLI.
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs")


def _is_object_store(url: str) -> bool:
    scheme, separator, _ = url.partition("://")
    return bool(separator) and scheme.lower() in OBJECT_STORE_SCHEMES


def _visible(paths) -> list[str]:
    """Sorted paths without hidden names (an interrupted write's `.name.XXXX.tmp` never ends in .tar, but a user's
    `.name.tar` should not be read either)."""
    return sorted(str(path) for path in paths if not Path(path).name.startswith("."))


def _object_store_shards(url: str) -> list[str]:
    """The *.tar objects under the object-store folder `url`: directly in it (`s3://bucket/shards/<dataset>`), or,
    for a shard root (`s3://bucket/shards`), in its dataset folders; sorted."""
    storage = Storage(url)
    try:
        direct = [storage.uri(name) for name in storage.list_files() if name.endswith(".tar")]
        if direct:
            return _visible(direct)
        return _visible(
            storage.uri(f"{folder}/{name}")
            for folder in storage.list_dirs()
            for name in storage.list_files(folder)
            if name.endswith(".tar")
        )
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise FactoryError(f"cannot list {url}: {error_line(error)}") from None


def open_shard(url: str):
    """A readable binary stream of one shard: Storage (pyarrow) for s3:// and gs://, webdataset's gopen for the
    rest."""
    if _is_object_store(url):
        folder, _, name = url.rpartition("/")
        return Storage(folder).open_stream(name)
    return webdataset.gopen(url, "rb")


def distributed_position() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when it is initialised, else torchrun's RANK / WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def selected_rows_by_shard(
    manifests: str | os.PathLike, where: str | None, scale: int | None = None
) -> dict[str, list[dict]]:
    """shard path (relative to the shard root, as in the manifests) -> the rows (key, dataset, hr_sha256, lr_sha256)
    `where` selects in it (one query). With `scale`, selected pairs of another scale are an error (their patches
    would not be aligned)."""
    from factory.query import select

    table = select(manifests, where, columns=["key", "dataset", "shard", "scale", "hr_sha256", "lr_sha256"])
    scales = set(table.column("scale").to_pylist())
    if scale is not None and scales - {scale}:
        found = ", ".join(f"x{value}" for value in sorted(scales))
        raise FactoryError(f"the selected pairs are {found} but the patches are asked for at x{scale}")
    rows: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        rows.setdefault(row["shard"], []).append(row)
    return rows


def _rows_to_read(matched: Mapping[str, list[dict]]) -> dict[str, list[dict]]:
    """Shard URL -> the rows to read from it, each pair once, in manifest order: a shard root holds a filtered
    dataset beside its parent, and the copy's rows repeat the parent's keys with the same bytes
    (`query.unique_pairs` keeps the first, in URL order, and refuses one key with other bytes). Shards left with
    nothing to read are dropped."""
    from factory.query import unique_pairs

    rows = unique_pairs([{**row, "url": url} for url, shard_rows in matched.items() for row in shard_rows])
    kept: dict[str, list[dict]] = {}
    for row in rows:
        kept.setdefault(row["url"], []).append(row)
    return kept


def _match_shard(url: str, selection: Mapping[str, list[dict]]) -> list[dict] | None:
    """The selected rows of the shard at `url` (matched by its path ending in the manifest's relative shard path),
    or None when the manifests select nothing in it."""
    # `pipe:aws s3 cp s3://bucket/root/d/d-000000.tar -`: the shard is the command's argument ending in .tar
    candidates = [token for token in url.split() if token.endswith(".tar")]
    path = PurePosixPath((candidates[-1] if candidates else url).replace("\\", "/"))
    for depth in (2, 1, 3):  # `<dataset>/<dataset>-NNNNNN.tar` is the layout; try it first
        if len(path.parts) >= depth:
            suffix = "/".join(path.parts[-depth:])
            if suffix in selection:
                return selection[suffix]
    return None


@dataclass
class ReadOutcome:
    """How reading one shard went, for a caller that counts rather than warns."""

    error: str | None = None  # why the shard ended early (a truncated or unreadable tar), None if it did not


def _complete(
    key: str | None, fields: dict[str, tuple[str, bytes]], url: str, outcome: ReadOutcome | None
) -> bool:
    if key is None:
        return False
    missing = [name for name in IMAGE_FIELDS if name not in fields]
    if missing and outcome is None:  # a counting caller reports the pair as missing instead
        logger.warning(
            "skipping sample %s in %s: no %s (truncated or incomplete shard)", key, url, "/".join(missing)
        )
    return not missing


def iterate_pairs(
    url: str, keys: frozenset[str] | None = None, outcome: ReadOutcome | None = None
) -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
    """(key, {"hr": (member name, bytes), "lr": ...}) for each complete sample of one shard, in shard order
    (`factory.shards.read_samples`, the one tar reader).

    Members of samples not in `keys` are skipped without being read into memory; a truncated or corrupt shard ends
    after its last complete sample, never with an exception: with a warning, or, given `outcome`, noted there (and
    samples without both images are skipped without a warning: the caller counts them as missing)."""

    def ended(error: BaseException) -> None:
        # Whatever was fully read stays usable: the pair being read is kept if both images arrived whole.
        if outcome is None:
            logger.warning("shard %s ends early (%s); keeping the complete samples before it", url, error)
        else:
            outcome.error = error_line(error)

    try:
        stream = open_shard(url)
    except (OSError, ValueError) as error:
        ended(error)
        return
    with stream:
        for sample in read_samples(stream, keys=keys, kinds=IMAGE_FIELDS, on_end=ended):
            fields = {name.split(".", 1)[0]: (name, data) for name, data in sample.members.items()}
            if _complete(sample.key, fields, url, outcome):
                yield sample.key, fields


@dataclass
class ShardListing:
    """What a shard's tar headers say: its samples in order, the complete ones (both images), and why it ends
    early, if it does."""

    samples: list[str]
    complete: list[str]
    problem: str | None = None


def list_pairs(url: str) -> ShardListing:
    """The samples of one shard from its tar headers: a local shard is listed by seeking from header to header (its
    payloads are not read); any other URL is read through once. A member whose data is cut off, or a tar that stops
    before its end-of-archive marker (a cut at a member boundary, which tar readers take for the end), is found."""
    kinds: dict[str, set[str]] = {}  # key -> the images among its members, in shard order
    local = os.path.isfile(url)
    problem, last = None, None
    try:
        stream = open(url, "rb") if local else open_shard(url)  # noqa: SIM115 - closed by the with below
        with stream, tarfile.open(fileobj=stream, mode="r:" if local else "r|*") as archive:
            for member in archive:
                last = member
                key, field = sample_key(member.name)
                kind = field.split(".", 1)[0]
                if member.isfile() and kind in IMAGE_FIELDS:
                    kinds.setdefault(key, set()).add(kind)
                elif member.isfile():
                    kinds.setdefault(key, set())
            # Two zero blocks end a tar; a shard cut between members lacks them, and tarfile stops there quietly.
            if local and os.path.getsize(url) - archive.offset < 2 * tarfile.BLOCKSIZE:
                problem = "it ends without the end-of-archive marker (cut between members)"
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        problem = f"it ends early ({error_line(error)})"
        cut = not local or (last is not None and last.offset_data + last.size > os.path.getsize(url))
        if cut and last is not None and last.isfile():  # the member read last is the one cut off
            key, field = sample_key(last.name)
            kinds.get(key, set()).discard(field.split(".", 1)[0])
    complete = [key for key, found in kinds.items() if found.issuperset(IMAGE_FIELDS)]
    return ShardListing(samples=list(kinds), complete=complete, problem=problem)


def crop_patches(
    lr: np.ndarray,
    hr: np.ndarray,
    key: str,
    *,
    patch_size: int,
    scale: int,
    count: int,
    augment: bool,
    generator: np.random.Generator,
) -> list[Patch]:
    """`count` random aligned crops of one pair. lr: (h, w, 3), hr: (>= scale*h, >= scale*w, 3), both uint8.

    The LR crop at (top, left) pairs with the HR crop at (scale*top, scale*left): HR pixel block
    [scale*i, scale*(i+1)) is what LR pixel i was made from (bicubic antialiased downsampling, align_corners=False).
    Augmentation is the SR convention (EDSR, BasicSR): horizontal flip, vertical flip and transpose, each with
    probability 1/2 (the 8 symmetries of the square), the same on both images. All are views: no pixel is copied."""
    height, width = lr.shape[:2]
    if hr.shape[0] // scale != height or hr.shape[1] // scale != width:
        # HR may exceed scale x LR by less than `scale` pixels (cut to a multiple of the scale); anything else is
        # another scale or not a pair, and its crops would not be aligned.
        logger.warning("skipping pair %s: HR %s is not %d x LR %s", key, hr.shape[:2], scale, lr.shape[:2])
        return []
    if height < patch_size or width < patch_size:
        logger.warning(
            "skipping pair %s: LR %s is smaller than the patch size %d", key, lr.shape[:2], patch_size
        )
        return []
    tops = generator.integers(0, height - patch_size + 1, size=count)
    lefts = generator.integers(0, width - patch_size + 1, size=count)
    flips = generator.random((count, 3)) < 0.5 if augment else np.zeros((count, 3), dtype=bool)
    patches = []
    for top, left, (horizontal, vertical, transpose) in zip(tops, lefts, flips, strict=True):
        lr_patch = lr[top : top + patch_size, left : left + patch_size]
        hr_patch = hr[scale * top : scale * (top + patch_size), scale * left : scale * (left + patch_size)]
        if horizontal:
            lr_patch, hr_patch = lr_patch[:, ::-1], hr_patch[:, ::-1]
        if vertical:
            lr_patch, hr_patch = lr_patch[::-1], hr_patch[::-1]
        if transpose:
            lr_patch, hr_patch = lr_patch.transpose(1, 0, 2), hr_patch.transpose(1, 0, 2)
        patches.append(Patch(lr=lr_patch, hr=hr_patch, key=key))
    return patches


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 view -> (3, H, W) float32 in [0, 1], in one copy (layout change and conversion together)."""
    array = np.empty((3, *image.shape[:2]), dtype=np.float32)
    np.multiply(image.transpose(2, 0, 1), np.float32(1 / 255), out=array, casting="unsafe")
    return torch.from_numpy(array)


# --------------------------------------------------------------------------------------------------------------------
# Epochs: which reader cuts which patches of which pair
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPairs:
    """What the consumer knows of one shard before reading it: the pairs to read and what to check them against."""

    url: str
    name: str  # in messages: the manifest's shard path (`<dataset>/<dataset>-NNNNNN.tar`), else the URL
    keys: tuple[
        str, ...
    ]  # the selected pairs (manifests) or the complete ones of the tar listing, in shard order
    sha256: Mapping[str, tuple[str, str]] | None = None  # key -> (HR, LR) payload sha256, from the manifest
    shard_bytes: int | None = None  # the tar's size in its commit record (the manifest's Parquet metadata)


@dataclass(frozen=True)
class Piece:
    """A reader's part of one shard in one pass: pair index in the shard -> patches to cut from it, ascending (the
    shard is read front to back)."""

    shard: int  # index into the dataset's shards
    counts: dict[int, int]


def reader_share(pairs: int, patches_per_pair: int, readers: int, reader: int) -> int:
    """Patches reader `reader` of `readers` cuts in one pass before padding: its slice of the pass's patches."""
    total = pairs * patches_per_pair
    return (reader + 1) * total // readers - reader * total // readers


def plan_pass(
    sizes: Sequence[int],
    *,
    patches_per_pair: int,
    readers: int,
    reader: int,
    generator: np.random.Generator,
    multiple: int | None = None,
) -> list[Piece]:
    """One reader's part of one pass over a dataset whose shards hold `sizes` pairs. Every reader draws the same
    shard order from `generator` (seeded alike everywhere), lays the pass's patches out in that order (pair after
    pair, `patches_per_pair` each, a shard's pairs in their order in it) and takes the slice [reader x T / readers,
    (reader + 1) x T / readers) of the T patches: every pair is cut exactly `patches_per_pair` times over all
    readers, a reader reads few shards, each front to back, and a pair on a slice boundary is decoded by both
    neighbours, each cutting its share.

    multiple: pad every reader to the same count, the largest slice rounded up to this multiple (a batch), with
    extra crops of its own pairs: at most readers x multiple - 1 in all (the convention of DistributedSampler, which
    repeats samples so that every rank gets as many). None: no padding."""
    total = sum(sizes) * patches_per_pair
    start, stop = reader * total // readers, (reader + 1) * total // readers
    pieces, offset = [], 0
    for shard in generator.permutation(len(sizes)):
        first, end = offset, offset + sizes[shard] * patches_per_pair
        offset = end
        low, high = max(start, first), min(stop, end)
        if low >= high:
            continue
        counts = {}
        for pair in range((low - first) // patches_per_pair, (high - 1 - first) // patches_per_pair + 1):
            pair_start = first + pair * patches_per_pair
            counts[pair] = min(high, pair_start + patches_per_pair) - max(low, pair_start)
        pieces.append(Piece(int(shard), counts))
    if multiple is not None and pieces:
        largest = -(-total // readers)
        padding = -(-largest // multiple) * multiple - (stop - start)
        # Pairs drawn at random (after the shard order, which every reader must draw alike): always the first
        # would favour the pairs that open a slice, and over a run every pair is padded equally often.
        slots = [(piece, pair) for piece in pieces for pair in piece.counts]
        for index in generator.choice(len(slots), size=padding, replace=padding > len(slots)):
            piece, pair = slots[index]
            piece.counts[pair] += 1
    return pieces


def _skip(pieces: list[Piece], patches: int) -> list[Piece]:
    """The pieces without their first `patches` patches (where the previous epoch stopped in this pass)."""
    kept = []
    for piece in pieces:
        counts = {}
        for pair, count in piece.counts.items():
            dropped = min(patches, count)
            patches -= dropped
            if count > dropped:
                counts[pair] = count - dropped
        if counts:
            kept.append(Piece(piece.shard, counts))
    return kept


@dataclass
class ShardTally:
    """The pairs of one shard as one reader met them in one epoch: expected (its part), read (whole and, with
    manifests, with the manifest's sha256), corrupt (another sha256, or undecodable), missing (never found)."""

    expected: int = 0
    read: int = 0
    corrupt: int = 0
    reasons: dict[str, None] = field(default_factory=dict)  # an ordered set

    @property
    def missing(self) -> int:
        return self.expected - self.read - self.corrupt

    @property
    def partial(self) -> bool:
        return bool(self.missing or self.corrupt or self.reasons)

    def counts(self) -> str:
        return f"expected {self.expected}, read {self.read}, missing {self.missing}, corrupt {self.corrupt}"

    def describe(self, name: str) -> str:
        return f"{name}: {self.counts()}" + (f" ({'; '.join(self.reasons)})" if self.reasons else "")


def _shard_size(url: str) -> int | None:
    """The size of a local or object-store shard (None for pipes and http: not known before reading)."""
    if os.path.isfile(url):
        return os.path.getsize(url)
    if _is_object_store(url):
        import pyarrow.fs

        try:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(url)
            return filesystem.get_file_info(path).size
        except (OSError, ValueError):
            return None
    return None


def _payloads_match(shard: ShardPairs, key: str, fields: dict[str, tuple[str, bytes]]) -> bool:
    """Whether both payloads hash to the manifest's sha256 (True without manifests: nothing to compare with)."""
    if shard.sha256 is None:
        return True
    hr_sha256, lr_sha256 = shard.sha256[key]
    return (
        hashlib.sha256(fields["hr"][1]).hexdigest() == hr_sha256
        and hashlib.sha256(fields["lr"][1]).hexdigest() == lr_sha256
    )


class PairedPatches(IterableDataset):
    """Aligned (LR, HR) patches from WebDataset shards: {"lr": (3, p, p), "hr": (3, scale*p, scale*p), "key": str},
    float32 in [0, 1].

    urls: shard URLs of one dataset (see `expand_urls`), or, with `weights`, one such entry per dataset to mix.
    patch_size: LR patch side p (the HR patch is scale*p).
    scale: HR size / LR size of the pairs.
    manifests: the manifest root; with it only committed shards (with a manifest) are read, `where` applies, and
        every payload is checked against its manifest sha256 as it is read.
    where: SQL predicate over the manifest columns (as `factory query`), e.g. "delta_e < 5 AND label != 'fog'".
    patches_per_pair: crops per decoded pair.
    augment: random flips and transposes (the 8 symmetries of the square).
    shuffle: shuffle-buffer size in patches (0: stream order).
    weights: sampling weight of each dataset in `urls` (mixing: each patch comes from dataset i with probability
        w_i / sum(w)).
    epoch_length: patches per rank per epoch, cut from an endless run of passes that goes on where the previous
        epoch stopped. None: one exact pass (one dataset), or, with weights, as many patches as one pass over all.
    batch_size: with epoch_length None, every reader is padded to the same whole number of batches of this size.
    allow_partial: with manifests, a shard that is partial, corrupt or another build's is one summary line per
        epoch, not an error.
    seed: base seed; the stream of (seed, epoch, rank, worker) is reproducible.
    rank, world_size: override torch.distributed / RANK, WORLD_SIZE.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Sequence[str | os.PathLike]],
        *,
        patch_size: int = 64,
        scale: int = 4,
        manifests: str | os.PathLike | None = None,
        where: str | None = None,
        patches_per_pair: int = 8,
        augment: bool = True,
        shuffle: int = 256,
        weights: Sequence[float] | None = None,
        epoch_length: int | None = None,
        batch_size: int = 1,
        allow_partial: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if patch_size < 1 or scale < 1 or patches_per_pair < 1 or shuffle < 0 or batch_size < 1:
            raise FactoryError(
                "patch_size, scale, patches_per_pair and batch_size must be >= 1 and shuffle >= 0"
            )
        if where is not None and manifests is None:
            raise FactoryError("where= needs manifests= (the predicate is evaluated on the manifests)")
        if weights is None:
            datasets = [expand_urls(urls)]  # type: ignore[arg-type]
            weights = [1.0]
        else:
            if isinstance(urls, (str, os.PathLike)) or len(urls) != len(weights):
                raise FactoryError("weights= needs one entry in urls per dataset, as many as weights")
            datasets = [expand_urls(entry) for entry in urls]  # type: ignore[arg-type]
        if any(weight < 0 for weight in weights) or sum(weights) <= 0:
            raise FactoryError(f"dataset weights must be >= 0 with a positive sum, got {list(weights)}")
        position = distributed_position()
        self.rank = position[0] if rank is None else rank
        self.world_size = position[1] if world_size is None else world_size
        if manifests is not None:
            self.shards = _manifest_shards(datasets, manifests, where, scale)
            self.selected_pairs: int | None = sum(
                len(shard.keys) for shards in self.shards for shard in shards
            )
        else:
            self.shards = [_listed_shards(index, urls) for index, urls in enumerate(datasets)]
            self.selected_pairs = None
        self.weights = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        if epoch_length is None and len(self.shards) > 1:
            drawn = [shards for shards, weight in zip(self.shards, self.weights, strict=True) if weight > 0]
            pairs = sum(len(shard.keys) for shards in drawn for shard in shards)
            epoch_length = -(-pairs * patches_per_pair // self.world_size)
        self.epoch_length = epoch_length
        self.patch_size, self.scale = patch_size, scale
        self.patches_per_pair, self.augment, self.shuffle = patches_per_pair, augment, shuffle
        self.batch_size, self.allow_partial = batch_size, allow_partial
        # Only the manifests say what a shard must hold; without them the tar's own listing is all there is.
        self.strict = manifests is not None and not allow_partial
        self.seed, self.epoch = seed, 0

    @property
    def shard_keys(self) -> list[dict[str, frozenset[str]]]:
        """Per dataset: shard URL -> the keys to read from it."""
        return [{shard.url: frozenset(shard.keys) for shard in shards} for shards in self.shards]

    def set_epoch(self, epoch: int) -> None:
        """A new epoch: a new shard order, crop positions and shuffle, and with epoch_length the next stretch of
        the run of passes (call before iterating the DataLoader)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.epoch_length is None:
            raise TypeError(
                "PairedPatches has no length without epoch_length (it depends on the DataLoader workers)"
            )
        return self.epoch_length

    def _worker(self) -> tuple[int, int, int]:
        """(global worker index, number of workers in all ranks, workers in this rank)."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * workers + worker, self.world_size * workers, workers

    def _read_piece(
        self,
        shard: ShardPairs,
        wanted: dict[str, int],
        generator: np.random.Generator,
        tally: dict[str, ShardTally],
    ) -> Iterator[Patch]:
        """The patches of the pairs `wanted` (key -> patches to cut) of one shard, read front to back and no further
        than the last of them; each payload checked against its manifest sha256 as it arrives. The tally of the
        shard gets what was expected, read and corrupt (a piece cut short by the epoch's end counts what it met);
        a partial shard is an error at once when strict."""
        count = tally.setdefault(shard.name, ShardTally())
        size = _shard_size(shard.url) if shard.shard_bytes is not None else None
        if size is not None and size != shard.shard_bytes:
            count.reasons[
                f"{size} bytes, its commit record says {shard.shard_bytes}: cut, changed or another build's"
            ] = None
        outcome, met, corrupt, finished, done = ReadOutcome(), 0, 0, False, set()
        try:
            with contextlib.closing(iterate_pairs(shard.url, frozenset(wanted), outcome)) as pairs:
                for key, fields in pairs:
                    if key in done:  # a sample written twice is one pair
                        continue
                    done.add(key)
                    met += 1
                    pair = self._decode(shard, key, fields) if _payloads_match(shard, key, fields) else None
                    if pair is None:
                        corrupt += 1
                    else:
                        yield from self._crop(*pair, key, wanted[key], generator)
                    if met == len(wanted):
                        break
            finished = True
        finally:
            count.expected += len(wanted) if finished else met
            count.read += met - corrupt
            count.corrupt += corrupt
        if outcome.error is not None:
            count.reasons[f"it ends early: {outcome.error}"] = None
        if self.strict and count.partial:
            member, _, workers = self._worker()
            raise FactoryError(
                f"shard {count.describe(shard.name)} in epoch {self.epoch} (rank {self.rank}, DataLoader worker "
                f"{member - self.rank * workers}): rebuild it (factory verify says what differs), or pass "
                "allow_partial=True (--allow-partial) to train on what is there"
            )

    @staticmethod
    def _decode(shard: ShardPairs, key: str, fields) -> tuple[np.ndarray, np.ndarray] | None:
        """(LR, HR) of a pair, None when a payload does not decode (counted as corrupt)."""
        try:
            return decode_image(*fields["lr"]), decode_image(*fields["hr"])
        except (ValueError, OSError) as error:
            logger.debug("pair %s in %s does not decode: %s", key, shard.name, error)
            return None

    def _crop(
        self, lr: np.ndarray, hr: np.ndarray, key: str, count: int, generator: np.random.Generator
    ) -> list[Patch]:
        return crop_patches(
            lr,
            hr,
            key,
            patch_size=self.patch_size,
            scale=self.scale,
            count=count,
            augment=self.augment,
            generator=generator,
        )

    def _dataset_patches(
        self, index: int, start: int | None, generator: np.random.Generator, tally: dict[str, ShardTally]
    ) -> Iterator[Patch]:
        """This reader's patches of dataset `index`. start None: the exact pass of this epoch, padded to a whole
        number of batches. Else endless: passes 0, 1, 2, ... one after another, from patch `start` of this
        reader's part of them (each pass gives every reader a fixed share, so where an epoch starts is known
        without reading the ones before)."""
        reader, readers, _ = self._worker()
        shards = self.shards[index]
        sizes = [len(shard.keys) for shard in shards]
        share = reader_share(sum(sizes), self.patches_per_pair, readers, reader)
        if share == 0:
            raise FactoryError(
                f"dataset {index} has {sum(sizes)} pairs x {self.patches_per_pair} patches for {readers} readers: "
                "this one has none; select more pairs or use fewer workers"
            )
        pass_number, skip = (self.epoch, 0) if start is None else divmod(start, share)
        while True:
            # The same generator in every reader: they must agree on the shard order to split it.
            order = np.random.default_rng([self.seed, index, pass_number])
            multiple = self.batch_size if start is None else None
            plan = plan_pass(
                sizes,
                patches_per_pair=self.patches_per_pair,
                readers=readers,
                reader=reader,
                generator=order,
                multiple=multiple,
            )
            emitted = 0
            for piece in _skip(plan, skip):
                shard = shards[piece.shard]
                wanted = {shard.keys[pair]: count for pair, count in piece.counts.items()}
                for patch in self._read_piece(shard, wanted, generator, tally):
                    emitted += 1
                    yield patch
            if start is None:
                return
            if emitted == 0 and skip == 0:
                raise FactoryError(
                    f"no usable pair in this reader's part of dataset {index} ({len(plan)} shards): each was "
                    "skipped, and the warnings above say why (e.g. LR smaller than the patch size)"
                )
            pass_number, skip = pass_number + 1, 0

    def _mixed(
        self, quota: int, generator: np.random.Generator, tally: dict[str, ShardTally]
    ) -> Iterator[Patch]:
        """`quota` patches, each from dataset i with probability w_i: how many from each is drawn per epoch
        (multinomial), so every dataset's stream goes on where the previous epochs left it."""
        member, _, workers = self._worker()
        worker = member - self.rank * workers

        def drawn(epoch: int) -> np.ndarray:
            return np.random.default_rng([self.seed, epoch, self.rank, worker, 1]).multinomial(
                quota, self.weights
            )

        starts = sum(
            (drawn(epoch) for epoch in range(self.epoch)), np.zeros(len(self.weights), dtype=np.int64)
        )
        counts = drawn(self.epoch)
        streams = {
            index: self._dataset_patches(index, int(starts[index]), generator, tally)
            for index in range(len(self.shards))
            if counts[index]
        }
        order = np.repeat(np.arange(len(counts)), counts)
        generator.shuffle(order)
        try:
            for index in order:
                yield next(streams[int(index)])
        finally:
            for stream in streams.values():
                stream.close()

    def _shuffled(self, patches: Iterator[Patch], generator: np.random.Generator) -> Iterator[Patch]:
        """A shuffle buffer of up to `shuffle` patches: each emitted patch is a random one of the buffer, so the
        crops of one pair end up in different batches. The buffer starts emitting at 16 patches and grows to its
        size by emitting one patch for every two that arrive (no long stall before the first batch)."""
        if self.shuffle <= 1:
            yield from patches
            return
        buffer: list[Patch] = []
        start = min(16, self.shuffle)
        for arrivals, patch in enumerate(patches, start=1):
            buffer.append(patch)
            if len(buffer) < start or (len(buffer) < self.shuffle and arrivals % 2):
                continue
            slot = int(generator.integers(len(buffer)))
            buffer[slot], buffer[-1] = buffer[-1], buffer[slot]
            yield buffer.pop()
        generator.shuffle(buffer)  # type: ignore[arg-type]
        yield from buffer

    def _summarise(self, tally: dict[str, ShardTally], worker: int) -> None:
        """One line per epoch and reader for the partial shards it met (allow_partial, or no manifests)."""
        partial = {name: count for name, count in tally.items() if count.partial}
        if not partial:
            return
        totals = ShardTally(
            expected=sum(count.expected for count in tally.values()),
            read=sum(count.read for count in tally.values()),
            corrupt=sum(count.corrupt for count in tally.values()),
        )
        logger.warning(
            "epoch %d, rank %d, DataLoader worker %d: %s of %s partial; %s",
            self.epoch,
            self.rank,
            worker,
            f"{len(partial)} shard{'s' if len(partial) > 1 else ''}",
            totals.counts(),
            "; ".join(count.describe(name) for name, count in partial.items()),
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | str]]:
        member, _, workers = self._worker()
        worker = member - self.rank * workers
        generator = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        tally: dict[str, ShardTally] = {}
        if self.epoch_length is None:
            patches = self._dataset_patches(0, None, generator, tally)
        else:
            # This rank's epoch_length, split over its DataLoader workers (the same split on every rank).
            quota = self.epoch_length // workers + (1 if worker < self.epoch_length % workers else 0)
            patches = self._mixed(quota, generator, tally)
        try:
            for patch in self._shuffled(patches, generator):
                yield {"lr": to_tensor(patch.lr), "hr": to_tensor(patch.hr), "key": patch.key}
        finally:
            patches.close()
            if not self.strict:
                self._summarise(tally, worker)


def _manifest_shards(
    datasets: list[list[str]], manifests: str | os.PathLike, where: str | None, scale: int
) -> list[list[ShardPairs]]:
    """Per dataset, its shards with selected pairs: the keys (manifest order), their payload sha256s and the shard's
    size in its commit record. Resolved once, by one query; unselected shards are dropped."""
    from factory.manifests import read_commit
    from factory.storage import Storage

    selection = selected_rows_by_shard(manifests, where, scale)
    storage = Storage(manifests)
    result = []
    for index, urls in enumerate(datasets):
        matched = {url: _match_shard(url, selection) for url in urls}
        kept = _rows_to_read({url: rows for url, rows in matched.items() if rows})
        if not kept:
            raise FactoryError(
                f"the manifests under {manifests} select no pair in dataset {index} ({urls[0]}...)"
            )
        shards = []
        for url, rows in sorted(kept.items()):
            name = rows[0]["shard"]
            commit = read_commit(storage, name.removesuffix(".tar") + ".parquet") or {}
            digests = {row["key"]: (row["hr_sha256"], row["lr_sha256"]) for row in rows}
            shards.append(ShardPairs(url, name, tuple(digests), digests, commit.get("shard_bytes")))
        result.append(shards)
    return result


def _listed_shards(index: int, urls: list[str]) -> list[ShardPairs]:
    """Without manifests: the complete pairs each shard's tar listing names, with a warning for a shard whose
    listing finds a cut or samples without both images (they are left out of every epoch)."""
    folders = sorted({PurePosixPath(url).parent.name for url in urls})
    if len(folders) > 1:
        logger.warning(
            "dataset %d spans %d datasets (%s) and no manifests are given: every shard is read, uncommitted ones "
            "and a filtered copy's pairs (again) included; pass manifests= to read each committed pair once",
            index,
            len(folders),
            ", ".join(folders),
        )
    shards = []
    for url in urls:
        listing = list_pairs(url)
        incomplete = len(listing.samples) - len(listing.complete)
        if incomplete or listing.problem:
            logger.warning(
                "shard %s: %d samples in its tar listing, %d complete, %d without both images%s; the complete "
                "ones are read",
                url,
                len(listing.samples),
                len(listing.complete),
                incomplete,
                f"; {listing.problem}" if listing.problem else "",
            )
        if listing.complete:
            shards.append(ShardPairs(url, url, tuple(listing.complete)))
    if not shards:
        raise FactoryError(f"no complete pair in the shards of dataset {index} ({urls[0]}...)")
    return shards
