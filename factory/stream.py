"""The streaming consumer: aligned (LR, HR) training patches straight from the shards, for (distributed) SR training.

    dataset = PairedPatches("shards/vqvae2-ep8", patch_size=64, scale=4, manifests="manifests", where="delta_e < 5")
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=4)

Decoding a pair is the cost, so each decoded pair gives `patches_per_pair` random crops, spread over the batch by a
shuffle buffer. `where` (the SQL predicate of `factory query`) is resolved once against the manifests: samples
that don't match are skipped before decoding, shards without a match are never opened, and shards without a
manifest (not committed) are never read. A shard root (`shards/`) stands for all its datasets; with manifests, the
pairs a filtered dataset copied from its parent are then read once. Every (rank, DataLoader worker) reads its own
disjoint set of shards; with `epoch_length` every rank yields exactly that many patches per epoch (cycling over its
shards with a fresh order when they run out), so every DDP rank runs the same number of steps and none waits
forever on the others.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import webdataset
from torch.utils.data import IterableDataset, get_worker_info

from factory.config import FactoryError
from factory.shards import decode_image

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
    import pyarrow.fs

    scheme = url.partition("://")[0]
    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(url)
        root = path.rstrip("/")
        entries = filesystem.get_file_info(
            pyarrow.fs.FileSelector(root, allow_not_found=True, recursive=True)
        )
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise FactoryError(f"cannot list {url}: {error}") from None
    by_depth: dict[int, list[str]] = {0: [], 1: []}
    for entry in entries:
        depth = entry.path[len(root) + 1 :].count("/")
        if entry.type == pyarrow.fs.FileType.File and entry.base_name.endswith(".tar") and depth in by_depth:
            by_depth[depth].append(f"{scheme}://{entry.path}")
    return _visible(by_depth[0]) or _visible(by_depth[1])


def open_shard(url: str):
    """A readable binary stream of one shard: pyarrow for s3:// and gs://, webdataset's gopen for the rest."""
    if _is_object_store(url):
        import pyarrow.fs

        filesystem, path = pyarrow.fs.FileSystem.from_uri(url)
        return filesystem.open_input_stream(path)
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


def _keys_to_read(matched: Mapping[str, list[dict]]) -> dict[str, frozenset[str]]:
    """Shard URL -> the keys to read from it, each pair once: a shard root holds a filtered dataset beside its
    parent, and the copy's rows repeat the parent's keys with the same bytes (`query.unique_pairs` keeps the first,
    in URL order, and refuses one key with other bytes). Shards left with nothing to read are dropped."""
    from factory.query import unique_pairs

    rows = unique_pairs([{**row, "url": url} for url, shard_rows in matched.items() for row in shard_rows])
    keys: dict[str, set[str]] = {}
    for row in rows:
        keys.setdefault(row["url"], set()).add(row["key"])
    return {url: frozenset(members) for url, members in keys.items()}


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


def _split_name(name: str) -> tuple[str, str]:
    """Tar member name -> (sample key, field), as webdataset does: the key is everything before the basename's
    first dot (`dir/0001.hr.npy.zst` -> `dir/0001`, `hr.npy.zst`)."""
    directory, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), field


def _complete(key: str | None, fields: dict[str, tuple[str, bytes]], url: str) -> bool:
    if key is None:
        return False
    missing = [name for name in IMAGE_FIELDS if name not in fields]
    if missing:
        logger.warning(
            "skipping sample %s in %s: no %s (truncated or incomplete shard)", key, url, "/".join(missing)
        )
        return False
    return True


def iterate_pairs(
    url: str, keys: frozenset[str] | None = None
) -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
    """(key, {"hr": (member name, bytes), "lr": ...}) for each complete sample of one shard, in shard order.

    Members of samples not in `keys` are skipped without being read into memory; a truncated or corrupt shard ends
    with a warning after its last complete sample, never an exception."""
    current_key: str | None = None
    wanted = False  # whether current_key is selected
    fields: dict[str, tuple[str, bytes]] = {}
    try:
        with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, field = _split_name(member.name)
                if key != current_key:
                    if wanted and _complete(current_key, fields, url):
                        yield current_key, fields
                    current_key, fields = key, {}
                    wanted = keys is None or key in keys
                kind = field.split(".", 1)[0]
                if wanted and kind in IMAGE_FIELDS:
                    fields[kind] = (field, archive.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        # Whatever was fully read stays usable: the pair being read is kept if both images arrived whole.
        logger.warning("shard %s ends early (%s); keeping the complete samples before it", url, error)
    if wanted and _complete(current_key, fields, url):
        yield current_key, fields


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


class PairedPatches(IterableDataset):
    """Aligned (LR, HR) patches from WebDataset shards: {"lr": (3, p, p), "hr": (3, scale*p, scale*p), "key": str},
    float32 in [0, 1].

    urls: shard URLs of one dataset (see `expand_urls`), or, with `weights`, one such entry per dataset to mix.
    patch_size: LR patch side p (the HR patch is scale*p).
    scale: HR size / LR size of the pairs.
    manifests: the manifest root; with it only committed shards (with a manifest) are read, and `where` applies.
    where: SQL predicate over the manifest columns (as `factory query`), e.g. "delta_e < 5 AND label != 'fog'".
    patches_per_pair: crops per decoded pair.
    augment: random flips and transposes (the 8 symmetries of the square).
    shuffle: shuffle-buffer size in patches (0: stream order).
    weights: sampling weight of each dataset in `urls` (mixing: each patch comes from dataset i with probability
        w_i / sum(w)).
    epoch_length: patches per rank per epoch; the shards are cycled (new order each pass) to fill it, so every
        rank yields exactly this many. None: one pass over this rank's shards (single process; with several ranks
        and manifests, the selected pairs x patches_per_pair / world size, else an error: ranks would differ).
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
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if patch_size < 1 or scale < 1 or patches_per_pair < 1 or shuffle < 0:
            raise FactoryError("patch_size, scale and patches_per_pair must be >= 1 and shuffle >= 0")
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

        # Resolve the manifests once: per shard URL, the keys to read (None: all); unselected shards are dropped.
        self.selected_pairs: int | None = None
        self.shard_keys: list[dict[str, frozenset[str] | None]] = []
        if manifests is not None:
            selection = selected_rows_by_shard(manifests, where, scale)
            self.selected_pairs = 0
            for index, shards in enumerate(datasets):
                matched = {url: _match_shard(url, selection) for url in shards}
                kept = _keys_to_read({url: rows for url, rows in matched.items() if rows})
                if not kept:
                    raise FactoryError(
                        f"the manifests under {manifests} select no pair in dataset {index} ({shards[0]}...)"
                    )
                self.selected_pairs += sum(len(keys) for keys in kept.values())  # type: ignore[arg-type]
                self.shard_keys.append(kept)
        else:
            self.shard_keys = [dict.fromkeys(shards) for shards in datasets]
            for index, shards in enumerate(datasets):
                folders = sorted({PurePosixPath(url).parent.name for url in shards})
                if len(folders) > 1:
                    logger.warning(
                        "dataset %d spans %d datasets (%s) and no manifests are given: every shard is read, "
                        "uncommitted ones and a filtered copy's pairs (again) included; pass manifests= to read "
                        "each committed pair once",
                        index,
                        len(folders),
                        ", ".join(folders),
                    )
        self.weights = np.asarray(weights, dtype=np.float64) / float(sum(weights))

        if epoch_length is None and self.world_size > 1:
            if self.selected_pairs is None:
                raise FactoryError(
                    "with several ranks, give epoch_length (or manifests) so every rank runs as many steps"
                )
            epoch_length = self.selected_pairs * patches_per_pair // self.world_size
        self.epoch_length = epoch_length
        self.patch_size, self.scale = patch_size, scale
        self.patches_per_pair, self.augment, self.shuffle = patches_per_pair, augment, shuffle
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """A new epoch: a new shard order, crop positions and shuffle (call before iterating the DataLoader)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.epoch_length is None:
            raise TypeError("PairedPatches has no length without epoch_length")
        return self.epoch_length

    def _worker(self) -> tuple[int, int, int]:
        """(global worker index, number of workers in all ranks, workers in this rank)."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * workers + worker, self.world_size * workers, workers

    def _dataset_patches(self, index: int, generator: np.random.Generator, cycle: bool) -> Iterator[Patch]:
        """Patches of dataset `index` from this worker's shards, crop by crop."""
        member, members, _ = self._worker()
        shards = sorted(self.shard_keys[index])
        if len(shards) >= members:
            mine, sample_stride = shards[member::members], 1
        else:
            # Fewer shards than readers: every reader opens every shard and keeps every members-th sample
            # (disjoint samples, not disjoint shards). More shards than ranks x workers avoids this.
            logger.warning(
                "%d shards for %d readers: splitting by sample, every reader reads every shard",
                len(shards),
                members,
            )
            mine, sample_stride = shards, members
        while True:
            emitted = 0
            seen = 0
            for position in generator.permutation(len(mine)) if cycle else range(len(mine)):
                url = mine[position]
                for key, fields in iterate_pairs(url, self.shard_keys[index][url]):
                    seen += 1
                    if sample_stride > 1 and (seen - 1) % sample_stride != member:
                        continue
                    try:
                        hr = decode_image(*fields["hr"])
                        lr = decode_image(*fields["lr"])
                    except (ValueError, OSError) as error:
                        logger.warning("skipping pair %s in %s: %s", key, url, error)
                        continue
                    patches = crop_patches(
                        lr,
                        hr,
                        key,
                        patch_size=self.patch_size,
                        scale=self.scale,
                        count=self.patches_per_pair,
                        augment=self.augment,
                        generator=generator,
                    )
                    emitted += len(patches)
                    yield from patches
            if not cycle:
                return
            if emitted == 0:
                raise FactoryError(
                    f"no usable pair in this reader's shards of dataset {index} ({len(mine)} shards): each was "
                    "skipped, and the warnings above say why (e.g. LR smaller than the patch size)"
                )

    def _mixed(self, generator: np.random.Generator, cycle: bool) -> Iterator[Patch]:
        """Patches drawn from dataset i with probability w_i (renormalised when a one-pass dataset runs out)."""
        streams = {
            index: self._dataset_patches(index, generator, cycle) for index in range(len(self.shard_keys))
        }
        weights = {index: self.weights[index] for index in streams if self.weights[index] > 0}
        while weights:
            indices = list(weights)
            probabilities = np.array([weights[index] for index in indices])
            index = (
                indices[0]
                if len(indices) == 1
                else indices[generator.choice(len(indices), p=probabilities / probabilities.sum())]
            )
            try:
                yield next(streams[index])
            except StopIteration:
                del weights[index]

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

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | str]]:
        member, _, workers = self._worker()
        worker = member - self.rank * workers
        generator = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        cycle = self.epoch_length is not None
        quota = None
        if self.epoch_length is not None:
            # This rank's epoch_length, split over its DataLoader workers (the same split on every rank).
            quota = self.epoch_length // workers + (1 if worker < self.epoch_length % workers else 0)
            if quota == 0:
                return
        emitted = 0
        for patch in self._shuffled(self._mixed(generator, cycle), generator):
            yield {"lr": to_tensor(patch.lr), "hr": to_tensor(patch.hr), "key": patch.key}
            emitted += 1
            if quota is not None and emitted >= quota:
                return
