"""SNLI-VE data: ALBEF's ``ve_{train,dev,test}.json`` and the shared sample's layout.

Each file is a json list of ``{"image", "sentence", "label"}``:

- ``image``: a Flickr30K id without extension (the original's files: the path is
  ``image_root/<image>.jpg``) or a path with an extension relative to ``image_root`` (the
  shared sample's ``images/visual_entailment/<id>.jpg``);
- ``sentence``: the hypothesis, cleaned by :func:`albef_pl.text.pre_caption`;
- ``label``: ``entailment``/``neutral``/``contradiction`` (any case) or its index 2/1/0.
  Other keys (the sample's ``premise_caption``) are ignored.

Batches hold ``image`` (B, 3, S, S), ``input_ids`` and ``attention_mask`` (B, L), ``label``
(B,) (-1 for an unlabelled predict entry), ``index`` (B,) the entry's position in its split,
``image_path`` and ``sentence`` (lists of B raw strings), and ``num_skipped``: samples whose
image failed to decode are dropped from their batch and counted (a batch of nothing but
failures holds only that count).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from albef_pl.tasks.ve import LABELS
from albef_pl.text import CaptionTokenizer, pre_caption
from data_modules.listed import (
    ImageEntryDataset,
    ListedDataModule,
    as_file_list,
    check_files,
    check_loader_options,
    check_tokenizer,
    load_json,
)

_logger = logging.getLogger(__name__)

__all__ = ["VEDataModule", "VEDataset", "VEPair", "parse_label",
           "read_ve_json"]

NO_LABEL = -1


@dataclass
class VEPair:
    """One (image, sentence, label) entry.

    Attributes:
        image: image path (``image_root`` joined, ``.jpg`` added to a bare id).
        sentence: the raw hypothesis.
        label: class index (see :data:`albef_pl.tasks.ve.LABELS`), -1 when unlabelled.
        index: position of the entry in its file(s).
    """

    image: str
    sentence: str
    label: int
    index: int


def parse_label(value: Any) -> int:
    """Class index of a label given as a name (any case) or as 0, 1, 2.

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(LABELS):
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        if name in LABELS:
            return LABELS[name]
        if name.isdigit() and int(name) < len(LABELS):
            return int(name)
    raise ValueError(f"label {value!r} is not one of {sorted(LABELS)} or 0, 1, 2")


def read_ve_json(
    path: str | Path, image_root: str = "", require_label: bool = True, start: int = 0
) -> list[VEPair]:
    """Read one SNLI-VE json file.

    Args:
        path: the json file (a list of ``{image, sentence, label}``).
        image_root: folder the image names are relative to.
        require_label: raise on an entry without ``label`` (predict files may lack it).
        start: index of the file's first entry (files of one split are numbered on).

    Raises:
        ValueError: the file is not such a list, or an entry lacks a field or has a label
            that is not a SNLI-VE label; the message names the file and the entry.
    """
    data = load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a json list of {{image, sentence, label}} entries, "
                         f"found {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: an empty list, no {{image, sentence, label}} entry")
    pairs = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                or not isinstance(entry.get("sentence"), str):
            raise ValueError(f"{where} ({str(entry)[:120]}) lacks an 'image' or 'sentence' "
                             "string")
        if "label" in entry:
            try:
                label = parse_label(entry["label"])
            except ValueError as err:
                raise ValueError(f"{where} (image {entry['image']!r}): {err}") from None
        elif require_label:
            raise ValueError(f"{where} (image {entry['image']!r}) has no 'label' (fit, "
                             "validate and test need labels; predict takes unlabelled files)")
        else:
            label = NO_LABEL
        image = entry["image"]
        if not os.path.splitext(image)[1]:  # a bare Flickr30K id, as in the original files
            image += ".jpg"
        pairs.append(VEPair(os.path.join(image_root, image), entry["sentence"], label,
                            start + i))
    return pairs


class VEDataset(ImageEntryDataset):
    """(image, sentence, label) samples: items hold ``image``, ``text`` (the sentence after
    :func:`pre_caption`) and ``entry`` (the :class:`VEPair`); ``None`` when the image is
    unreadable (see the collate).

    Args:
        pairs: the entries.
        transform: PIL image (not yet decoded) -> tensor.
        max_words: words kept by :func:`pre_caption`.
    """

    def __init__(self, pairs: Sequence[VEPair], transform, max_words: int = 30) -> None:
        super().__init__(pairs, transform, functools.partial(_sentence, max_words=max_words))

    @property
    def pairs(self) -> list[VEPair]:
        """The entries."""
        return self.entries


def _sentence(pair: VEPair, max_words: int) -> str:
    return pre_caption(pair.sentence, max_words)


class VECollate:
    """Stack images, tokenize sentences, drop samples whose image failed (and count them)."""

    def __init__(self, tokenizer: CaptionTokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = [x for x in items if x is not None]
        if not good:
            return {"num_skipped": len(items)}
        tokens = self.tokenizer([x["text"] for x in good])
        pairs = [x["entry"] for x in good]
        return {
            "image": torch.stack([x["image"] for x in good]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "label": torch.tensor([p.label for p in pairs], dtype=torch.long),
            "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
            "image_path": [p.image for p in pairs],
            "sentence": [p.sentence for p in pairs],
            "num_skipped": len(items) - len(good),
        }


class VEDataModule(ListedDataModule):
    """SNLI-VE data for fine-tuning and evaluation.

    Args:
        image_root: folder the json image names are relative to (Flickr30K images).
        train_file: training json file(s) (``ve_train.json``).
        val_file: validation json file(s) (``ve_dev.json``), evaluated after every epoch.
        test_file: test json file(s) (``ve_test.json``).
        predict_file: json file(s) for ``predict`` (labels optional); default ``test_file``.
        image_size: side length of the model's input (384 in the paper).
        batch_size: training batch per process (32 in the paper).
        eval_batch_size: evaluation batch per process (64 in the paper).
        num_workers: data-loader workers per process.
        tokenizer: tokenizer directory or hub name; ``None`` = the offline MiniLM vocabulary
            (bert-base-uncased's).
        max_length: token cap, [CLS] included. The original pads to the longest sentence and
            does not truncate; its sentences are at most ``max_words`` words, which fit in
            the default 64 word pieces.
        max_words: words kept by :func:`pre_caption`.
        append_sep: end sentences with [SEP] (stock BERT) instead of ALBEF's [CLS]-only layout.
        check_images: drop entries whose image file does not exist at setup, naming them.
        pin_memory: pin host memory in the loaders.
        drop_last: drop the last incomplete training batch (as the original).
    """

    item_one, item_name = "pair", "pairs"

    def __init__(
        self,
        image_root: str,
        train_file: str | list[str] | None = None,
        val_file: str | list[str] | None = None,
        test_file: str | list[str] | None = None,
        predict_file: str | list[str] | None = None,
        image_size: int = 384,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 4,
        tokenizer: str | None = None,
        max_length: int = 64,
        max_words: int = 30,
        append_sep: bool = False,
        check_images: bool = True,
        pin_memory: bool = True,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        check_files(train_file=train_file, val_file=val_file, test_file=test_file,
                    predict_file=predict_file)
        check_loader_options(image_size=image_size, batch_size=batch_size,
                             eval_batch_size=eval_batch_size, num_workers=num_workers,
                             max_length=max_length, max_words=max_words)
        check_tokenizer(tokenizer)
        self.save_hyperparameters()

    # ---- reading
    def _split_files(self, split: str) -> list[str]:
        h = self.hparams
        if split == "predict":
            return as_file_list(h.predict_file or h.test_file)
        return as_file_list(getattr(h, f"{split}_file"))

    def _read(self, split: str, files: list[str]) -> list[VEPair]:
        h = self.hparams
        pairs: list[VEPair] = []
        for f in files:
            pairs += read_ve_json(f, h.image_root, require_label=split != "predict",
                                  start=len(pairs))
        return pairs

    def _roots(self) -> str:
        return f"data.image_root={self.hparams.image_root!r}"

    def _make_dataset(self, split: str, entries: list[VEPair], transform) -> VEDataset:
        return VEDataset(entries, transform, self.hparams.max_words)

    def _describe(self, split: str, entries: list[VEPair]) -> None:
        counts = [sum(p.label == c for p in entries) for c in range(len(LABELS))]
        _logger.info("%s: %d pairs of %d images (contradiction/neutral/entailment %s)",
                     split, len(entries), len({p.image for p in entries}), counts)

    # ---- loaders
    def _collate(self) -> VECollate:
        h = self.hparams
        return VECollate(CaptionTokenizer(h.tokenizer, h.max_length, h.append_sep))

    _train_collate = _eval_collate = _collate
