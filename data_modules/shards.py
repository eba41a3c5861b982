"""WebDataset shard streaming for image-caption pairs, with bad data skipped and counted.

A shard is a tar file whose members are grouped into samples by key (the file name up to
its first dot): an image (``jpg``, ``jpeg``, ``png`` or ``webp``) and a caption in ``txt``
or ``json`` (a string, a list of captions, or an object with ``caption``/``captions``, as
img2dataset and :mod:`data_modules.shard_writer` write it). Shards are named by local
paths, directories of ``.tar`` files, brace patterns, or any URL ``webdataset.gopen`` opens.

Two streams are built on :class:`ShardStream`:

* training: shards are *resampled* (drawn with replacement, from several sources mixed by
  weight), each rank and each dataloader worker with its own seed, so every worker streams
  forever and :class:`EpochLoader` cuts a fixed number of full batches per epoch;
* validation: shards are split between ranks, then workers, and read once in order.

Every skipped sample is counted by reason (:data:`SKIP_REASONS`). Counting happens inside
the worker processes; each batch carries the counts since the previous batch under
``"skipped"``, and :class:`EpochLoader` removes that field in the main process, adds it to
its totals, warns (rate-limited) while the epoch runs and summarises at its end.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import random
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from albef_pl.text import CaptionTokenizer, is_usable_caption, pre_caption
from albef_pl.transforms import normalize_images

_logger = logging.getLogger(__name__)

__all__ = [
    "CAPTION_EXTS",
    "IMAGE_EXTS",
    "SKIP_REASONS",
    "EpochLoader",
    "ShardStream",
    "SkipCounter",
    "expand_shards",
    "is_url",
    "read_num_samples",
    "read_shard_sizes",
    "read_shard_sizes_and_files",
]

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS: tuple[str, ...] = ("json", "txt")
SIZES_FILE = "sizes.json"

# Why a sample (or a shard) was skipped. Fixed so that every rank logs the same metric names.
SKIP_REASONS: tuple[str, ...] = (
    "corrupt_image",  # the image does not decode (truncated, not an image, ...)
    "missing_image",  # a caption without an image under the same key
    "missing_caption",  # an image without a caption, or a caption member that does not parse
    "empty_caption",  # the caption is empty after cleaning
    "unusable_caption",  # the cleaned caption has no usable letters (e.g. another script)
    "out_of_order",  # members of one key are not adjacent in the tar file
    "empty_shard",  # a shard without a single member
    "unreadable_shard",  # a shard that cannot be opened or stops mid-way
    "truncated_shard",  # samples lost because a tar file ends at (or in) a member header
)

# Consecutive shards without a usable sample before a resampled source gives up.
_MAX_BARREN_DRAWS = 200

# Members webdataset treats as metadata, not sample parts (``__key__``-style names).
_META_NAME = re.compile(r"__[^/]*__($|/)")
_END_ATTR = "_albef_last_header_error"


class _EndTrackingTarInfo(tarfile.TarInfo):
    """Records on the TarFile the header error that ended it.

    ``tarfile`` ends a stream quietly on the end-of-archive zero block
    (``EOFHeaderError``), but also when the data stops at or inside a header
    (``EmptyHeaderError``, ``TruncatedHeaderError``) or a header does not parse
    (``InvalidHeaderError``); only the first is a complete file.
    """

    @classmethod
    def fromtarfile(cls, tarfile_obj: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            return super().fromtarfile(tarfile_obj)
        except tarfile.HeaderError as err:
            setattr(tarfile_obj, _END_ATTR, err)
            raise


class SkipCounter:
    """Counts skipped samples by reason in one process and warns at a limited rate.

    Args:
        where: Name of the stream for messages, e.g. ``"train rank 0 worker 1"``.
        warn_interval_s: Minimum seconds between two warnings (the first one is immediate).
    """

    def __init__(self, where: str, warn_interval_s: float = 60.0) -> None:
        self.where = where
        self.warn_interval_s = warn_interval_s
        self.totals: collections.Counter[str] = collections.Counter()
        self._pending: collections.Counter[str] = collections.Counter()
        self._last_warning = -math.inf
        self._warned_once: set[str] = set()

    def skip(self, reason: str, detail: str = "", count: int = 1) -> None:
        """Count skipped items and warn if the last warning is old enough.

        Args:
            reason: One of :data:`SKIP_REASONS`.
            detail: Where and why, for the log (shard, key, error).
            count: Number of items skipped at once (samples lost with a truncated shard).
        """
        self.totals[reason] += count
        self._pending[reason] += count
        now = time.monotonic()
        if now - self._last_warning >= self.warn_interval_s:
            self._last_warning = now
            _logger.warning(
                "%s: skipped a sample (%s: %s); skipped so far: %s",
                self.where,
                reason,
                detail,
                dict(self.totals),
            )

    def warn_once(self, key: str, message: str, *args: Any) -> None:
        """Log a warning the first time ``key`` is met by this counter (not rate-limited)."""
        if key not in self._warned_once:
            self._warned_once.add(key)
            _logger.warning("%s: " + message, self.where, *args)

    def take_pending(self) -> dict[str, int]:
        """Counts since the previous call (they travel to the main process with a batch)."""
        pending, self._pending = dict(self._pending), collections.Counter()
        return pending


# ---------------------------------------------------------------------------------------
# shard lists and sizes


def is_url(spec: str) -> bool:
    """Whether a shard name has a URL scheme (``http:``, ``pipe:``, ``s3:``...)."""
    scheme = urlparse(spec).scheme
    return len(scheme) > 1  # a Windows drive letter is not a scheme


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard specification into a list of shard paths or URLs.

    Args:
        spec: A directory (all its ``.tar`` files, sorted), a brace pattern such as
            ``data/cc3m-{000000..000331}.tar``, several patterns joined by ``::``, or a list
            of any of these.

    Returns:
        The shard list, in the given order.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    shards: list[str] = []
    for item in specs:
        if not is_url(item) and Path(item).is_dir():
            shards.extend(sorted(str(p) for p in Path(item).glob("*.tar")))
        else:
            shards.extend(expand_urls(item))
    return shards


def _read_json(location: str) -> Any | None:
    try:
        if is_url(location):
            with wds.gopen(location) as stream:
                return json.loads(stream.read())
        path = Path(location)
        return json.loads(path.read_text()) if path.is_file() else None
    except Exception as err:  # noqa: BLE001 - a missing sizes file only disables a shortcut
        _logger.debug("could not read %s: %s", location, err)
        return None


def _parent_and_name(shard: str) -> tuple[str, str]:
    if is_url(shard):
        head, _, name = shard.rpartition("/")
        return head, name
    return str(Path(shard).parent), Path(shard).name


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if is_url(parent) else str(Path(parent) / name)


def read_shard_sizes_and_files(
    shards: Sequence[str],
) -> tuple[dict[str, int], dict[str, str]] | None:
    """Like :func:`read_shard_sizes`, plus the file each size was read from.

    Returns:
        (``{shard: count}``, ``{shard: sizes file}``), or None when a size is not recorded.
    """
    sizes_files: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    files: dict[str, str] = {}
    for shard in shards:
        parent, name = _parent_and_name(shard)
        sizes_file = _join(parent, SIZES_FILE)
        if parent not in sizes_files:
            sizes_files[parent] = _read_json(sizes_file) or {}
        recorded = sizes_files[parent].get(name)
        if recorded is None:
            sizes_file = _join(parent, name.rsplit(".", 1)[0] + "_stats.json")
            recorded = (_read_json(sizes_file) or {}).get("successes")
        if recorded is None:
            _logger.debug("no recorded size for shard %s", shard)
            return None
        sizes[shard] = int(recorded)
        files[shard] = sizes_file
    return sizes, files


def read_shard_sizes(shards: Sequence[str]) -> dict[str, int] | None:
    """Number of samples in each shard, from the files written next to the shards.

    Reads ``sizes.json`` (this project's writer; ``{shard name: count, "total": n}``) in the
    shard's directory, or else img2dataset's ``<shard stem>_stats.json`` (``successes``).

    Args:
        shards: Shard paths or URLs.

    Returns:
        ``{shard: count}`` for every shard, or None when one of them has no recorded size.
    """
    found = read_shard_sizes_and_files(shards)
    return None if found is None else found[0]


def read_num_samples(shards: Sequence[str]) -> int | None:
    """Total number of samples in the shards, or None when a size is not recorded."""
    sizes = read_shard_sizes(shards)
    return None if sizes is None else sum(sizes.values())


# ---------------------------------------------------------------------------------------
# samples


def _split_name(name: str) -> tuple[str, str]:
    """``dir/abc.seg.jpg`` -> (``dir/abc``, ``seg.jpg``): keys end at the basename's first dot."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext.lower() if dot else ""


def _caption_candidates(members: dict[str, bytes]) -> list[str] | None:
    """Raw captions of a sample: json (list, string, ``caption``/``captions``) or else txt.

    Returns:
        The candidate strings, or None when no caption member parses.
    """
    found: list[str] | None = None
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        if isinstance(meta, dict):
            meta = meta.get("captions", meta.get("caption"))
        if isinstance(meta, str):
            meta = [meta]
        if isinstance(meta, list):
            found = [c for c in meta if isinstance(c, str)]
    if not found and "txt" in members:
        try:
            found = [members["txt"].decode("utf-8")]
        except UnicodeDecodeError:
            pass
    return found


def _image_id(members: dict[str, bytes]) -> int | None:
    if "json" not in members:
        return None
    try:
        meta = json.loads(members["json"])
        return int(meta["image_id"]) if isinstance(meta, dict) else None
    except (KeyError, TypeError, ValueError, UnicodeDecodeError):
        return None


class ShardStream(IterableDataset):
    """An iterable of collated batches read from WebDataset shards.

    Args:
        sources: One shard list per source (training mixes the sources by ``weights``).
        batch_size: Samples per batch.
        transform: PIL image (opened, maybe not decoded) -> tensor (3, S, S), either
            normalised float32 or uint8 (then normalised per batch with CLIP statistics).
        tokenizer: Turns the cleaned captions of a batch into ids and masks.
        resampled: Draw shards with replacement forever (training); otherwise read this
            rank's and worker's share of the shards once, in order (validation).
        weights: Relative sampling weight of each source (default: equal).
        rank: This process's rank among ``world_size`` data-parallel processes.
        world_size: Number of data-parallel processes.
        seed: Base seed; combined with epoch, rank and worker.
        shuffle_buffer: Samples held for shuffling (0 disables shuffling).
        max_words: Words kept by :func:`pre_caption`.
        name: Name of the split for messages.
        warn_interval_s: Minimum seconds between two skip warnings of one worker.
        shard_sizes: Recorded samples per shard (``sizes.json``), if known; used to count
            the samples lost with a truncated shard and to explain short validation data.
        size_files: The file each recorded size came from, for messages.
        source_names: How each source was given (a directory, pattern...), for messages.
    """

    def __init__(
        self,
        sources: Sequence[Sequence[str]],
        batch_size: int,
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: CaptionTokenizer,
        resampled: bool,
        weights: Sequence[float] | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 42,
        shuffle_buffer: int = 1000,
        max_words: int = 30,
        name: str = "train",
        warn_interval_s: float = 60.0,
        shard_sizes: Mapping[str, int] | None = None,
        source_names: Sequence[str] | None = None,
        size_files: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.sources = [list(s) for s in sources]
        if not self.sources or not all(self.sources):
            raise ValueError(f"{name}: every source needs at least one shard")
        self.weights = list(weights) if weights is not None else [1.0] * len(self.sources)
        if len(self.weights) != len(self.sources) or min(self.weights) < 0:
            raise ValueError(f"{name}: need one non-negative weight per source")
        self.batch_size = batch_size
        self.transform = transform
        self.tokenizer = tokenizer
        self.resampled = resampled
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.max_words = max_words
        self.name = name
        self.warn_interval_s = warn_interval_s
        self.shard_sizes = dict(shard_sizes or {})
        self.size_files = dict(size_files or {})
        self.source_names: list[str | None] = (
            [str(n) for n in source_names]
            if source_names is not None and len(source_names) == len(self.sources)
            else [None] * len(self.sources)
        )
        self.epoch = 0
        # Counts __iter__ calls of this copy. A persistent worker keeps the epoch it was
        # created with, so its draws use epoch + iterations; the main process (no workers)
        # is told every epoch through set_epoch and uses the epoch alone. Either way the
        # draws depend only on the epoch number, which checkpoints restore.
        self._iterations = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch, which changes every random draw of the next iteration."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        where = f"{self.name} rank {self.rank} worker {worker}"
        counter = SkipCounter(where, self.warn_interval_s)

        # Training draws differ per epoch; validation draws (caption choice) do not.
        epoch = self.epoch + (self._iterations if info is not None else 0)
        epoch_part = str(epoch) if self.resampled else "eval"
        rng = random.Random(f"{self.seed}-{epoch_part}-{self.rank}-{worker}")
        self._iterations += 1

        if self.resampled:
            samples = self._mixed_resampled(rng, counter)
        else:
            shards = [s for source in self.sources for s in source]
            mine = shards[self.rank :: self.world_size][worker::num_workers]
            samples = (s for shard in mine for s in self._shard_samples(shard, counter))

        if self.shuffle_buffer > 1:
            initial = min(self.shuffle_buffer, max(100, self.shuffle_buffer // 10))
            samples = wds.shuffle(self.shuffle_buffer, initial, rng=rng)(samples)
        decoded = self._decode(samples, rng, counter)
        yield from self._batches(decoded, counter, partial=not self.resampled)

    # -- shard reading

    def _shard_members(
        self, shard: str, counter: SkipCounter, ending: list[str]
    ) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of a shard's regular files; a cut at a header is put in ``ending``."""
        count = 0
        try:
            with wds.gopen(shard) as stream:
                tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndTrackingTarInfo)
                for info in tar:
                    if info.isreg() and not _META_NAME.match(info.name):
                        data = tar.extractfile(info).read()
                        count += 1
                        yield info.name, data
                    tar.members = []  # a stream: keep no member list
        except Exception as err:  # noqa: BLE001 - any broken shard is counted, not fatal
            if count == 0 and isinstance(err, tarfile.ReadError) and "empty file" in str(err):
                counter.skip("empty_shard", shard)
            else:
                counter.skip("unreadable_shard", f"{shard} after {count} members: {err!r}")
            return
        # A tar file ends with zero blocks. Python's tarfile also stops quietly at the end of
        # the data or at a header it cannot parse, which hides a cut or corrupt file.
        end = getattr(tar, _END_ATTR, None)
        if isinstance(end, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
            ending.append(
                "ends at a member header without the end-of-archive blocks (the file was cut)"
                if isinstance(end, tarfile.EmptyHeaderError)
                else "ends inside a member header (the file was cut)"
            )
        elif isinstance(end, tarfile.InvalidHeaderError):
            counter.skip(
                "unreadable_shard",
                f"{shard} after {count} members: invalid tar header ({end}); the rest is lost",
            )
        elif count == 0:
            counter.skip("empty_shard", shard)

    def _shard_samples(self, shard: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """Group a shard's members by key and yield complete samples with their captions."""
        pending: dict[str, set[str]] = {}  # incomplete keys, waiting for the end of the shard
        emitted: set[str] = set()
        seen: set[str] = set()
        ending: list[str] = []

        for key, members in self._groups(self._shard_members(shard, counter, ending)):
            seen.add(key)
            has_image = any(ext in members for ext in IMAGE_EXTS)
            has_caption = any(ext in members for ext in CAPTION_EXTS)
            where = f"{shard}:{key}"

            # A key met again after other keys: its members were split apart in the tar.
            if key in pending or key in emitted:
                pending.pop(key, None)
                counter.skip("out_of_order", where)
                continue
            if not (has_image and has_caption):
                pending[key] = set(members)
                continue

            emitted.add(key)
            sample = self._parse(members, where, counter)
            if sample is not None:
                yield sample

        for key, exts in pending.items():
            has_image = any(ext in exts for ext in IMAGE_EXTS)
            reason = "missing_caption" if has_image else "missing_image"
            counter.skip(reason, f"{shard}:{key} has only {sorted(exts)}")
        if ending:
            self._count_truncated(shard, ending[0], len(seen), counter)

    def _count_truncated(self, shard: str, how: str, keys_read: int, counter: SkipCounter) -> None:
        """Count a truncated shard's lost samples (by its recorded size) and say what to do."""
        recorded = self.shard_sizes.get(shard)
        if recorded is None:
            lost, lost_text = 1, "an unknown number of samples were lost (no recorded size)"
        else:
            lost = max(recorded - keys_read, 0)
            lost_text = f"{lost} of its {recorded} samples (sizes.json) were lost"
        counter.warn_once(
            shard,
            "shard %s is truncated: it %s after %d samples; %s. Re-download the file or "
            "re-write it (albef-pl-shards --force); until then its tail is skipped.",
            shard,
            how,
            keys_read,
            lost_text,
        )
        if lost:
            counter.skip("truncated_shard", f"{shard}: {lost_text} (cut after {keys_read})", lost)

    @staticmethod
    def _groups(members: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Runs of adjacent members with the same key, as (key, {ext: bytes})."""
        key, group = None, {}
        for name, data in members:
            member_key, ext = _split_name(name)
            if member_key != key and group:
                yield key, group
                group = {}
            key = member_key
            group.setdefault(ext, data)
        if group:
            yield key, group

    def _parse(
        self, members: dict[str, bytes], where: str, counter: SkipCounter
    ) -> dict[str, Any] | None:
        candidates = _caption_candidates(members)
        if candidates is None:
            counter.skip("missing_caption", f"{where}: caption member does not parse")
            return None
        cleaned = [pre_caption(c, self.max_words) for c in candidates]
        cleaned = [c for c in cleaned if c]
        if not cleaned:
            counter.skip("empty_caption", where)
            return None
        usable = [c for c in cleaned if is_usable_caption(c)]
        if not usable:
            counter.skip("unusable_caption", f"{where}: {cleaned[0][:40]!r}")
            return None

        image_ext = next(ext for ext in IMAGE_EXTS if ext in members)
        return {
            "__key__": where,
            "image_bytes": members[image_ext],
            "captions": usable,
            "image_id": _image_id(members),
        }

    def _draw_limit(self, index: int) -> int:
        """Shard draws in a row without a usable sample after which source ``index`` fails."""
        return max(_MAX_BARREN_DRAWS, 4 * len(self.sources[index]))

    def _describe_source(self, index: int) -> str:
        shards, name = self.sources[index], self.source_names[index]
        given = f" {name!r}" if name is not None else ""
        return f"source {index}{given} ({len(shards)} shards, e.g. {shards[0]})"

    def _one_source(
        self, shards: list[str], rng: random.Random, counter: SkipCounter, index: int
    ) -> Iterator[dict[str, Any]]:
        """Shards drawn with replacement, forever; fails if no shard yields anything.

        Each sample carries its source and the number of the shard draw it came from, so
        that :meth:`_decode` can fail when no image of the source has decoded for as many
        draws (a source whose every image is corrupt would otherwise loop forever).
        """
        barren, draws = 0, 0
        while True:
            produced = 0
            draws += 1
            for sample in self._shard_samples(rng.choice(shards), counter):
                produced += 1
                sample["source"], sample["draw"] = index, draws
                yield sample
            barren = 0 if produced else barren + 1
            if barren >= self._draw_limit(index):
                raise RuntimeError(
                    f"{self.name}: {self._describe_source(index)} gave no usable sample in "
                    f"{barren} shard draws in a row; skipped so far in this worker: "
                    f"{dict(counter.totals)}. Check that the shards are readable tar files "
                    "with image and caption members, or remove the source."
                )

    def _mixed_resampled(
        self, rng: random.Random, counter: SkipCounter
    ) -> Iterator[dict[str, Any]]:
        streams = [self._one_source(s, rng, counter, i) for i, s in enumerate(self.sources)]
        if len(streams) == 1:
            yield from streams[0]
            return
        indices = list(range(len(streams)))
        while True:
            (k,) = rng.choices(indices, weights=self.weights)
            yield next(streams[k])

    # -- decoding and batching

    def _decode(
        self, samples: Iterable[dict[str, Any]], rng: random.Random, counter: SkipCounter
    ) -> Iterator[dict[str, Any]]:
        # NOTE: the reference sets PIL's LOAD_TRUNCATED_IMAGES, which pads a truncated file
        # with grey; here the decode error is kept, so such images are skipped and counted.
        last_good: dict[int, int] = {}  # source -> shard draw of its last decoded image
        failed: collections.Counter[int] = collections.Counter()  # decode failures since then
        for sample in samples:
            source = sample.get("source")
            try:
                image = self.transform(Image.open(io.BytesIO(sample["image_bytes"])))
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
                counter.skip("corrupt_image", f"{sample['__key__']}: {err!r}")
                if source is not None:  # resampled: a source of only bad images never ends
                    failed[source] += 1
                    draws = sample["draw"] - last_good.get(source, 0)
                    if draws >= self._draw_limit(source):
                        raise RuntimeError(
                            f"{self.name}: {self._describe_source(source)} gave no image "
                            f"that decodes in {draws} shard draws in a row ({failed[source]} "
                            f"failed decodes, last {sample['__key__']}: {err!r}); skipped so "
                            f"far in this worker: {dict(counter.totals)}. Its images may be "
                            "corrupt or in a format PIL cannot read; check a few, or remove "
                            "the source."
                        ) from err
                continue
            if source is not None:
                last_good[source] = max(last_good.get(source, 0), sample["draw"])
                failed[source] = 0
            captions = sample["captions"]
            caption = captions[0] if len(captions) == 1 else rng.choice(captions)
            yield {"image": image, "caption": caption, "image_id": sample["image_id"]}

    def _batches(
        self, samples: Iterable[dict[str, Any]], counter: SkipCounter, partial: bool
    ) -> Iterator[dict[str, Any]]:
        chunk: list[dict[str, Any]] = []
        for sample in samples:
            chunk.append(sample)
            if len(chunk) == self.batch_size:
                yield self._collate(chunk, counter)
                chunk = []
        if chunk and partial:
            yield self._collate(chunk, counter)
        else:
            # The counts since the last batch still travel to the main process.
            yield {"skipped": counter.take_pending()}

    def _collate(self, samples: list[dict[str, Any]], counter: SkipCounter) -> dict[str, Any]:
        images = torch.stack([s["image"] for s in samples])
        if images.dtype == torch.uint8:
            images = normalize_images(images)  # one vectorised pass for the whole batch
        batch: dict[str, Any] = {"image": images}
        batch.update(self.tokenizer([s["caption"] for s in samples]))
        ids = [s["image_id"] for s in samples]
        if any(i is not None for i in ids):
            batch["image_id"] = torch.tensor([-1 if i is None else i for i in ids])
        batch["skipped"] = counter.take_pending()
        return batch


# ---------------------------------------------------------------------------------------
# the loader Lightning sees


def _concat_batches(parts: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in parts[0] if all(k in p for p in parts)]
    width = {k: max(p[k].shape[1] for p in parts) for k in ("input_ids", "attention_mask")}
    out = {}
    for key in keys:
        tensors = [p[key] for p in parts]
        if key in width:
            # Texts were padded per worker batch; pad to the common width with zeros ([PAD]).
            pad = width[key]
            tensors = [torch.nn.functional.pad(t, (0, pad - t.shape[1])) for t in tensors]
        out[key] = torch.cat(tensors)
    return out


class EpochLoader:
    """A dataloader over a :class:`ShardStream` with a fixed number of batches per epoch.

    For training the stream is infinite and every epoch yields exactly ``num_batches``
    batches of ``batch_size``. For validation the per-worker batches (the last one of each
    worker may be short) are re-cut into full batches in the main process, and exactly
    ``num_batches`` are yielded: if this rank runs out of usable data first (sizes files
    count samples that later turn out to be bad), its first batch is repeated to fill the
    epoch, with a warning, so that all ranks take the same number of steps.

    Args:
        stream: The dataset.
        num_batches: Batches per epoch on this rank (``len(loader)``).
        num_workers: Dataloader worker processes.
        pin_memory: Pin batches in page-locked memory (for CUDA).
        persistent_workers: Keep workers between epochs.
    """

    def __init__(
        self,
        stream: ShardStream,
        num_batches: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        self.stream = stream
        self.num_batches = num_batches
        self.epoch = 0
        #: Batches of the epoch in progress that training has taken (counted by the data
        #: module as they reach the model, so batches prefetched by Lightning do not count).
        self.consumed = 0
        self._current: int | None = None  # the epoch being iterated
        self._resume_at = 0
        self.totals: collections.Counter[str] = collections.Counter()
        self.last_epoch_counts: dict[str, int] = {}
        #: (samples in the batches produced, samples and shards skipped) of the last pass
        #: that read its data to the end without filling every batch; ``None`` otherwise.
        self.short_pass: tuple[int, int] | None = None
        self._last_warning = -math.inf
        self.dataloader = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
        )

    def __len__(self) -> int:
        return self.num_batches

    def skipped_counts(self) -> dict[str, int]:
        """Samples skipped so far by reason (every reason in :data:`SKIP_REASONS` is listed)."""
        return {reason: int(self.totals.get(reason, 0)) for reason in SKIP_REASONS}

    def position(self) -> tuple[int, int]:
        """(epoch, batch) where training stands: the epoch in progress and the batches of it
        already taken, or the next epoch and 0 between epochs."""
        if self._current is not None and self.consumed < self.num_batches:
            return self._current, self.consumed
        return self.epoch, 0

    def resume_at(self, epoch: int, batch: int) -> None:
        """Make the next iteration epoch ``epoch`` from its batch ``batch`` on: the batches
        before it are drawn and decoded again (not handed out), so the rest of the epoch is
        exactly what an uninterrupted run gets."""
        self.epoch, self._resume_at = epoch, batch

    # Lightning saves and restores loaders that have these two methods with the fit loop's
    # state, and warns about a mid-epoch resume of loaders without them.
    def state_dict(self) -> dict[str, int]:
        """Where training stands, as :meth:`position`."""
        epoch, batch = self.position()
        return {"epoch": epoch, "batch": batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`."""
        self.resume_at(int(state["epoch"]), int(state["batch"]))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # The epoch advances when iteration starts: a consumer may stop after len() batches.
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip, self._resume_at = self._resume_at, 0
        self.consumed, self._current = skip, epoch
        self.stream.set_epoch(epoch)
        if skip:
            _logger.info(
                "%s: resuming epoch %d at batch %d of %d; re-reading the first %d batches "
                "(decoded, not trained on) so that the rest of the epoch is the "
                "uninterrupted run's", self.stream.name, epoch, skip, self.num_batches, skip)
        epoch_counts: collections.Counter[str] = collections.Counter()
        produced, first, samples = 0, None, [0]
        batches = self._full_batches(self._counted(epoch_counts, samples))
        for batch in batches:
            produced += 1
            first = batch if first is None else first
            if produced <= skip:
                continue
            if produced == self.num_batches:
                # Stop the workers and report before handing out the last batch.
                batches.close()
                self._summarise(epoch, epoch_counts, produced, samples[0])
                yield batch
                return
            yield batch
        self._summarise(epoch, epoch_counts, produced, samples[0])
        self.short_pass = (samples[0] if produced else 0, sum(epoch_counts.values()))

        # NOTE: like a DistributedSampler's padding, repeating data keeps ranks in step at
        # the price of counting a few samples twice in this epoch's metrics.
        if first is not None:
            for _ in range(self.num_batches - produced):
                yield {k: v.clone() for k, v in first.items()}

    def _counted(
        self, epoch_counts: collections.Counter[str], samples: list[int]
    ) -> Iterator[dict[str, Any]]:
        """Worker batches with their ``skipped`` field moved into the totals.

        ``samples[0]`` counts the usable samples received (partial batches included).
        """
        # FIXME: skips a worker meets after its last batch of an epoch (read ahead) are
        # reported with the next epoch's first batch or not at all; totals may lag a little.
        for batch in self.dataloader:
            skipped = batch.pop("skipped", None) or {}
            epoch_counts.update(skipped)
            self.totals.update(skipped)
            if "image" in batch:
                samples[0] += len(batch["image"])
                yield batch

    def _full_batches(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.stream.resampled:
            yield from batches  # workers only ever emit full batches
            return
        size, held, count = self.stream.batch_size, [], 0
        for batch in batches:
            held.append(batch)
            count += len(batch["image"])
            while count >= size:
                merged = _concat_batches(held)
                yield self._trim_padding({k: v[:size] for k, v in merged.items()})
                rest = {k: v[size:] for k, v in merged.items()}
                count -= size
                held = [rest] if count else []

    def _trim_padding(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Drop all-padding text columns left over from re-cutting batches."""
        if self.stream.tokenizer.padding != "longest":
            return batch
        width = int(batch["attention_mask"].sum(1).max())
        batch["input_ids"] = batch["input_ids"][:, :width]
        batch["attention_mask"] = batch["attention_mask"][:, :width]
        return batch

    def _summarise(
        self, epoch: int, epoch_counts: collections.Counter[str], produced: int, samples: int
    ) -> None:
        self.last_epoch_counts = dict(epoch_counts)
        name = f"{self.stream.name} rank {self.stream.rank} epoch {epoch}"
        if epoch_counts:
            _logger.warning(
                "%s: skipped %d samples or shards: %s",
                name,
                sum(epoch_counts.values()),
                dict(sorted(epoch_counts.items())),
            )
        if produced < self.num_batches:
            _logger.warning(
                "%s: the data ran out after %d of %d batches; %s. %s",
                name,
                produced,
                self.num_batches,
                "repeating the first batch" if produced else "this rank has no batch at all",
                self._shortfall(samples, epoch_counts),
            )

    def _shortfall(self, samples: int, epoch_counts: collections.Counter[str]) -> str:
        """Why a read-once stream was short: recorded sizes against the samples read."""
        stream = self.stream
        shards = [s for source in stream.sources for s in source]
        mine = shards[stream.rank :: stream.world_size]
        skipped = sum(epoch_counts.values())
        needed = self.num_batches * stream.batch_size
        if stream.resampled or not all(s in stream.shard_sizes for s in mine):
            return (
                f"This rank's {len(mine)} shards gave {samples} usable samples ({skipped} "
                f"samples or shards skipped); {needed} were asked for "
                f"(num_{stream.name}_samples)."
            )
        counted = sum(stream.shard_sizes[s] for s in mine)
        where = f"{', '.join(sorted({stream.size_files.get(s, SIZES_FILE) for s in mine}))}"
        broken = sum(epoch_counts[r] for r in ("empty_shard", "unreadable_shard"))
        found = samples + skipped - broken  # skipped samples (truncated: lost ones) included
        text = (
            f"{where} count {counted} samples in this rank's {len(mine)} shards; "
            f"{found} were found ({samples} usable, {found - samples} skipped)"
        )
        if counted <= found:
            return text + "."
        if broken:
            return text + f" and {broken} shards were empty or unreadable."
        return (
            f"{text}: the sizes file over-counts by {counted - found} samples, which sets too "
            f"many {stream.name} batches. Re-write it (albef-pl-shards --force) or set "
            f"num_{stream.name}_samples."
        )
