"""What the fine-tuning data modules that read json lists (SNLI-VE, VQA) share.

Option values that name one file or several, entries whose image file is missing at setup
(named, counted, dropped), and images that fail to decode in a worker (counted by the
collate function and reported with the batch, since worker processes cannot update the
module's counters).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from PIL import Image

_logger = logging.getLogger(__name__)

__all__ = ["IMAGE_ERRORS", "SKIP_REASONS", "ImageEntryDataset", "SkipCounting", "as_file_list"]

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


class _HasImage(Protocol):
    image: str


T = TypeVar("T", bound=_HasImage)


class SkipCounting:
    """Mixin for a ``LightningDataModule``: per-split skip counts that
    :class:`data_modules.SkippedSamplesLogger` reads through :meth:`skipped_counts`.

    Batches report images that failed to decode as ``num_skipped``.
    """

    #: What one entry is called in messages ("pairs", "questions").
    item_name = "entries"

    def _count(self, split: str, reason: str, n: int) -> None:
        skipped = self.__dict__.setdefault("_skipped", {})
        counts = skipped.setdefault(split, dict.fromkeys(SKIP_REASONS, 0))
        counts[reason] += n

    def skipped_counts(self, split: str = "train") -> dict[str, int]:
        """Entries skipped so far in this process, by reason (every reason present):
        ``missing_image`` at setup, ``corrupt_image`` when decoding."""
        skipped = self.__dict__.get("_skipped", {})
        return dict(skipped.get(split, dict.fromkeys(SKIP_REASONS, 0)))

    def _drop_missing(self, items: list[T], split: str) -> list[T]:
        """Drop entries whose image file does not exist; warn naming some, count all."""
        exists = {path: os.path.isfile(path) for path in {item.image for item in items}}
        missing = [item for item in items if not exists[item.image]]
        self._count(split, "missing_image", len(missing))
        if missing:
            names = sorted({item.image for item in missing})
            _logger.warning(
                "%s: %d of %d %s skipped, their images (%d) not found, e.g. %s", split,
                len(missing), len(items), self.item_name, len(names),
                ", ".join(names[:NAMED_MISSING]),
            )
        return [item for item in items if exists[item.image]]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Runs in the main process, so counts made in the workers arrive here with the batch.
        trainer = getattr(self, "trainer", None)
        if trainer is None or "num_skipped" not in batch or trainer.sanity_checking:
            return batch
        split = ("train" if trainer.training else "val" if trainer.validating
                 else "test" if trainer.testing else "predict")
        self._count(split, "corrupt_image", int(batch["num_skipped"]))
        return batch


class ImageEntryDataset:
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
