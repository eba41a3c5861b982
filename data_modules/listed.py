"""What the fine-tuning data modules that read json lists (SNLI-VE, VQA) share.

Option values that name one file or several, json files named in their errors, entries whose
image file is missing at setup (named, counted, dropped), images that fail to decode in a
worker (counted by the collate function and reported with the batch, since worker processes
cannot update the module's counters), the set-up of each split and the loaders.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import lightning as L
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from albef_pl.errors import DataError, data_errors
from albef_pl.transforms import eval_transform, finetune_transform

_logger = logging.getLogger(__name__)

__all__ = ["IMAGE_ERRORS", "SKIP_REASONS", "ImageEntryDataset", "ListedDataModule",
           "UnpaddedDistributedSampler", "as_file_list", "check_files", "check_loader_options",
           "check_tokenizer", "check_train_batches", "load_json"]

#: Why an entry was skipped: its image was absent at setup, or failed to decode.
SKIP_REASONS: tuple[str, ...] = ("missing_image", "corrupt_image")
#: Errors that mean "this file is not a usable image"; anything else is a bug and propagates.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
#: Missing image files named in the warning (the rest are counted).
NAMED_MISSING = 10


def as_file_list(value: str | list[str] | None) -> list[str]:
    """An option naming no file (None), one file, or a list of files, as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def load_json(path: str | Path) -> Any:
    """``json.load`` of ``path``; a file that is not json raises ``ValueError`` naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:  # the decoder's message names no file
            raise ValueError(f"{path}: not valid json ({err})") from None


def check_files(**options: str | list[str] | None) -> None:
    """Raise ``FileNotFoundError`` naming the option of a json file that does not exist
    (at construction, so that the CLI reports it before the model is built)."""
    for name, value in options.items():
        for f in [value] if isinstance(value, str) else list(value or []):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"data.{name}: no file at {f}")


def check_loader_options(**options: int) -> None:
    """Raise ``ValueError`` naming the option unless ``num_workers`` is at least 0 and every
    other option (sizes: ``image_size``, ``batch_size``, ``eval_batch_size``, ``max_words``
    ...) at least 1 (at
    construction, so that the CLI reports it before the model is built; a batch size of 0
    otherwise ends in a DataLoader traceback or a division by zero)."""
    for name, value in options.items():
        least = 0 if name == "num_workers" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"data.{name} must be an integer >= {least}, got {value!r}")


def check_tokenizer(tokenizer: str | None) -> None:
    """Raise ``ValueError`` naming ``data.tokenizer`` when it cannot be loaded (at
    construction, before the model is built; the loaders would otherwise fail at the first
    batch with the hub client's traceback)."""
    from albef_pl.text import build_tokenizer

    try:
        build_tokenizer(tokenizer)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"data.tokenizer: cannot load a tokenizer from {tokenizer!r} ({err}). Give a "
            "local directory with vocab.txt, a hub name with network access, or null for the "
            "offline MiniLM package."
        ) from err


def check_train_batches(n: int, batch_size: int, drop_last: bool, world_size: int,
                        what: str) -> None:
    """Refuse a training set that yields no batch (Lightning would end ``fit`` at once and
    report success)."""
    per_process = math.ceil(n / max(world_size, 1))  # DistributedSampler pads up
    if drop_last and per_process < batch_size:
        raise ValueError(
            f"train: {per_process} {what} per process, fewer than data.batch_size="
            f"{batch_size} with data.drop_last=true, so not one training batch. Lower "
            "--data.batch_size or set --data.drop_last false."
        )


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation sampler: sample ``i`` goes to process ``i % world``, nothing repeated.

    # NOTE: the original (and torch's ``DistributedSampler``) pads the evaluation set with
    # duplicates to a multiple of the world size, so a few pairs are counted twice; here
    # every pair counts once (the accuracy metric sums counts over processes).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class _HasImage(Protocol):
    image: str


T = TypeVar("T", bound=_HasImage)


class ListedDataModule(L.LightningDataModule):
    """Base of data modules that list their entries in json files, one dataset per split.

    :meth:`setup` reads each split's files (:meth:`_split_files`, :meth:`_read`), drops the
    entries whose image is missing (when ``hparams.check_images``), refuses an empty split,
    and builds the dataset (:meth:`_make_dataset`) with the fine-tuning transform for
    training and the evaluation transform otherwise. The loaders shuffle and drop the last
    incomplete batch for training, and split evaluation sets across processes without
    repeats. Per-split skip counts are read by :class:`data_modules.SkippedSamplesLogger`
    through :meth:`skipped_counts`; batches report images that failed to decode as
    ``num_skipped``.

    Subclasses save ``image_size``, ``batch_size``, ``eval_batch_size``, ``num_workers``,
    ``pin_memory``, ``drop_last`` and ``check_images`` as hyper-parameters.
    """

    #: What one entry is called in messages, and several ("pair", "pairs").
    item_one = "entry"
    item_name = "entries"
    #: The option naming the training files, for the message when it is missing.
    train_option = "train_file"
    #: Check at setup (with ``check_images``) that at least one image of each split decodes:
    #: a split of nothing but undecodable files otherwise trains on nothing and reports
    #: success, or fails only after a whole training epoch, leaving no checkpoint.
    probe_decodable = False

    def __init__(self) -> None:
        super().__init__()
        self.datasets: dict[str, ImageEntryDataset] = {}

    # ---- what subclasses provide
    def _split_files(self, split: str) -> list[str]:
        """The json files of ``split`` ("train", "val", "test" or "predict")."""
        raise NotImplementedError

    def _read(self, split: str, files: list[str]) -> list:
        """The entries of ``files``."""
        raise NotImplementedError

    def _roots(self) -> str:
        """The image-root options, for the message of a split whose images are all missing."""
        raise NotImplementedError

    def _make_dataset(self, split: str, entries: list, transform: Callable) -> ImageEntryDataset:
        raise NotImplementedError

    def _describe(self, split: str, entries: list) -> None:
        """Log what a split holds."""

    def _after_setup(self) -> None:
        """Checks once the splits are read."""

    def _train_collate(self) -> Callable:
        raise NotImplementedError

    def _eval_collate(self) -> Callable:
        raise NotImplementedError

    # ---- set-up and loaders
    @data_errors("data ({cls}, set-up)")
    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"],
                  "predict": ["predict"]}
        for split in wanted.get(stage, ["train", "val", "test", "predict"]):
            if split in self.datasets:
                continue
            files = self._split_files(split)
            if not files:
                continue
            entries = self._read(split, files)
            if h.check_images:
                entries = self._drop_missing(entries, split)
                if self.probe_decodable:
                    self._probe_decodable(entries, split, files)
            if not entries:
                raise ValueError(f"{split}: no {self.item_one} of {', '.join(files)} has its "
                                 f"image under {self._roots()}")
            transform = (finetune_transform(h.image_size) if split == "train"
                         else eval_transform(h.image_size))
            self.datasets[split] = self._make_dataset(split, entries, transform)
            self._describe(split, entries)
        self._after_setup()

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.datasets:
            raise ValueError(f"data.{self.train_option} is required to fit")
        h = self.hparams
        world = self.trainer.world_size if self.trainer is not None else 1
        check_train_batches(len(self.datasets["train"]), h.batch_size, h.drop_last, world,
                            self.item_name)
        return DataLoader(
            self.datasets["train"], batch_size=h.batch_size, shuffle=True,
            num_workers=h.num_workers, collate_fn=self._train_collate(),
            pin_memory=h.pin_memory, drop_last=h.drop_last,
            persistent_workers=h.num_workers > 0,
        )

    def _eval_loader(self, split: str) -> DataLoader | list:
        if split not in self.datasets:
            return []
        h = self.hparams
        dataset = self.datasets[split]
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = UnpaddedDistributedSampler(dataset, self.trainer.world_size,
                                                 self.trainer.global_rank)
        batches = math.ceil(len(dataset) / h.eval_batch_size)
        return DataLoader(
            dataset, batch_size=h.eval_batch_size, shuffle=False, sampler=sampler,
            num_workers=min(h.num_workers, batches), collate_fn=self._eval_collate(),
            pin_memory=h.pin_memory,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._eval_loader("predict")

    # ---- skips
    def _count(self, split: str, reason: str, n: int) -> None:
        skipped = self.__dict__.setdefault("_skipped", {})
        counts = skipped.setdefault(split, dict.fromkeys(SKIP_REASONS, 0))
        counts[reason] += n

    def skipped_counts(self, split: str = "train") -> dict[str, int]:
        """Entries skipped so far in this process, by reason (every reason present):
        ``missing_image`` at setup, ``corrupt_image`` when decoding."""
        skipped = self.__dict__.get("_skipped", {})
        return dict(skipped.get(split, dict.fromkeys(SKIP_REASONS, 0)))

    @staticmethod
    def _image_files(item: Any) -> tuple[str, ...]:
        """The image files an entry needs (one; NLVR2 entries need two)."""
        return (item.image,)

    def _drop_missing(self, items: list[T], split: str) -> list[T]:
        """Drop entries with an image file that does not exist; warn naming some, count all."""
        files = {path for item in items for path in self._image_files(item)}
        exists = {path: os.path.isfile(path) for path in files}
        ok = [all(exists[p] for p in self._image_files(item)) for item in items]
        missing = [item for item, good in zip(items, ok) if not good]
        self._count(split, "missing_image", len(missing))
        if missing:
            names = sorted({p for item in missing for p in self._image_files(item)
                            if not exists[p]})
            _logger.warning(
                "%s: %d of %d %s skipped, their images (%d) not found, e.g. %s", split,
                len(missing), len(items), self.item_name, len(names),
                ", ".join(names[:NAMED_MISSING]),
            )
        return [item for item, good in zip(items, ok) if good]

    def _probe_decodable(self, items: list, split: str, files: list[str]) -> None:
        """Raise ``ValueError`` when not one entry of ``items`` has all its image files
        decoding. Stops at the first entry that does, so a usable split costs a decode or two;
        each file is tried once."""
        failures: dict[str, str] = {}
        tried: set[str] = set()

        def decodes(path: str) -> bool:
            if path not in tried:
                tried.add(path)
                try:
                    with Image.open(path) as img:
                        img.convert("RGB")
                except IMAGE_ERRORS as err:
                    failures[path] = f"{type(err).__name__}: {str(err)[:60]}"
            return path not in failures

        for item in items:
            if all(decodes(path) for path in self._image_files(item)):
                return
        if items:
            examples = "; ".join(f"{p} ({e})" for p, e in list(failures.items())[:3])
            raise ValueError(
                f"{split}: not one of the {len(items)} {self.item_name} read from "
                f"{', '.join(files)} can be decoded ({len(failures)} image files fail, e.g. "
                f"{examples}); replace the files or remove their entries")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Runs in the main process, so counts made in the workers arrive here with the batch.
        trainer = getattr(self, "trainer", None)
        if trainer is None or "num_skipped" not in batch or trainer.sanity_checking:
            return batch
        split = ("train" if trainer.training else "val" if trainer.validating
                 else "test" if trainer.testing else "predict")
        self._count(split, "corrupt_image", int(batch["num_skipped"]))
        tally = self.__dict__.setdefault("_pass_tally", {})
        read, dropped = tally.get(split, (0, 0))
        good = len(batch["image"]) if "image" in batch else 0
        tally[split] = (read + good, dropped + int(batch["num_skipped"]))
        return batch

    def take_pass_tally(self, split: str) -> tuple[int, int]:
        """(decoded, undecodable) samples of ``split`` since the last call, in this process;
        the tally starts again at zero."""
        return self.__dict__.setdefault("_pass_tally", {}).pop(split, (0, 0))

    def check_pass(self, split: str, decoded: int, dropped: int) -> None:
        """Raise :class:`DataError` when an evaluation pass (all processes together) decoded
        no image although it read some: its metrics would be missing (a monitored checkpoint
        would stop on "monitored key not found") and predictions empty."""
        if dropped and not decoded:
            files = ", ".join(self._split_files(split))
            raise DataError(
                f"{split}: none of the {dropped} images read from {files} could be decoded (see "
                "the 'skipped unreadable image' warnings above); replace the files or remove "
                "their entries"
            )


class ImageEntryDataset(Dataset):
    """A map-style dataset over entries that name an ``image`` file.

    Item ``i`` is ``{"image": transform(image), "text": text_of(entry), "entry": entry}``, or
    ``None`` when the image cannot be decoded (warned here; the collate function drops it and
    counts it as ``num_skipped``).

    Args:
        entries: the entries, each with an ``image`` path.
        transform: PIL image (not yet decoded) -> tensor.
        text_of: the cleaned text of an entry.
    """

    def __init__(self, entries: Sequence[T], transform: Callable, text_of: Callable[[T], str]):
        self.entries = list(entries)
        self.transform = transform
        self.text_of = text_of

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        entry = self.entries[i]
        try:
            with Image.open(entry.image) as img:
                image = self.transform(img)
        except IMAGE_ERRORS as err:
            _logger.warning("skipped unreadable image %s (%s: %s)", entry.image,
                            type(err).__name__, err)
            return None
        return {"image": image, "text": self.text_of(entry), "entry": entry}
