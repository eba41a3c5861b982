"""NLVR2 data: ALBEF's ``nlvr_{train,dev,test}.json``.

Each file is a json list of ``{"images": [left, right], "sentence", "label"}``:

- ``images``: two image paths relative to ``image_root`` (the left and the right image);
- ``sentence``: the statement, cleaned by :func:`albef_pl.text.pre_caption`;
- ``label``: ``"True"``/``"False"`` (the original's strings, any case), a json bool, or 1/0.
  Other keys are ignored.

Batches hold ``image`` (B, 2, 3, S, S) (left then right), ``input_ids`` and
``attention_mask`` (B, L), ``label`` (B,) (1 = True, 0 = False, -1 for an unlabelled predict
entry), ``index`` (B,) the entry's position in its split, ``image_paths`` (B lists of two
paths) and ``sentence`` (B raw strings), and ``num_skipped``: samples with an image that fails
to decode are dropped from their batch and counted (a batch of nothing but failures holds
only that count).
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
from PIL import Image

from albef_pl.tasks.nlvr2 import LABEL_NAMES
from albef_pl.text import CaptionTokenizer, pre_caption
from data_modules.listed import (
    IMAGE_ERRORS,
    ImageEntryDataset,
    ListedDataModule,
    as_file_list,
    check_files,
    check_loader_options,
    check_tokenizer,
    load_json,
)

_logger = logging.getLogger(__name__)

__all__ = ["NLVR2DataModule", "NLVR2Dataset", "NLVR2Pair", "parse_nlvr2_label",
           "read_nlvr2_json"]

NO_LABEL = -1


@dataclass
class NLVR2Pair:
    """One (left image, right image, sentence, label) entry.

    Attributes:
        images: the two image paths (``image_root`` joined), left first.
        sentence: the raw statement.
        label: 1 (True), 0 (False), -1 when unlabelled.
        index: position of the entry in its file(s).
    """

    images: tuple[str, str]
    sentence: str
    label: int
    index: int


def parse_nlvr2_label(value: Any) -> int:
    """1 for a true statement, 0 for a false one: ``"True"``/``"False"`` (any case, as the
    original's files), json ``true``/``false``, or 1/0.

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        if name in ("true", "false"):
            return int(name == "true")
        if name in ("0", "1"):
            return int(name)
    raise ValueError(f"label {value!r} is not one of 'True', 'False', true, false, 1, 0")


def read_nlvr2_json(
    path: str | Path, image_root: str = "", require_label: bool = True, start: int = 0
) -> list[NLVR2Pair]:
    """Read one NLVR2 json file.

    Args:
        path: the json file (a list of ``{images, sentence, label}``).
        image_root: folder the image paths are relative to.
        require_label: raise on an entry without ``label`` (predict files may lack it).
        start: index of the file's first entry (files of one split are numbered on).

    Raises:
        ValueError: the file is not such a list, or an entry lacks two image strings or a
            sentence, or has a label that is not an NLVR2 label; the message names the file
            and the entry.
    """
    data = load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a json list of {{images, sentence, label}} "
                         f"entries, found {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: an empty list, no {{images, sentence, label}} entry")
    pairs = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        images = entry.get("images") if isinstance(entry, dict) else None
        if not (isinstance(images, list) and len(images) == 2
                and all(isinstance(p, str) and p for p in images)):
            raise ValueError(f"{where} ({str(entry)[:120]}) needs 'images', a list of two "
                             "image paths (left, right)")
        if not isinstance(entry.get("sentence"), str):
            raise ValueError(f"{where} (images {images}) lacks a 'sentence' string")
        if not pre_caption(entry["sentence"]):
            raise ValueError(f"{where} (images {images}): sentence {entry['sentence']!r} is "
                             "empty once punctuation is removed; give a statement or remove "
                             "the entry")
        if "label" in entry:
            try:
                label = parse_nlvr2_label(entry["label"])
            except ValueError as err:
                raise ValueError(f"{where} (images {images}): {err}") from None
        elif require_label:
            raise ValueError(f"{where} (images {images}) has no 'label' (fit, validate and "
                             "test need labels; predict takes unlabelled files)")
        else:
            label = NO_LABEL
        paths = (os.path.join(image_root, images[0]), os.path.join(image_root, images[1]))
        pairs.append(NLVR2Pair(paths, entry["sentence"], label, start + i))
    return pairs


def _sentence(pair: NLVR2Pair, max_words: int) -> str:
    return pre_caption(pair.sentence, max_words)


class NLVR2Dataset(ImageEntryDataset):
    """Samples of two images and a sentence: items hold ``image`` (2, 3, S, S), ``text``
    (the sentence after :func:`pre_caption`) and ``entry`` (the :class:`NLVR2Pair`);
    ``None`` when either image is unreadable (see the collate).

    Each image gets its own draw of the (random) transform, as in the original.

    Args:
        pairs: the entries.
        transform: PIL image (not yet decoded) -> tensor.
        max_words: words kept by :func:`pre_caption`.
    """

    def __init__(self, pairs: Sequence[NLVR2Pair], transform, max_words: int = 30) -> None:
        super().__init__(pairs, transform, functools.partial(_sentence, max_words=max_words))

    @property
    def pairs(self) -> list[NLVR2Pair]:
        """The entries."""
        return self.entries

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        entry = self.entries[i]
        images = []
        for path in entry.images:
            try:
                with Image.open(path) as img:
                    images.append(self.transform(img))
            except IMAGE_ERRORS as err:
                _logger.warning("skipped entry %d, unreadable image %s (%s: %s)", entry.index,
                                path, type(err).__name__, err)
                return None
        return {"image": torch.stack(images), "text": self.text_of(entry), "entry": entry}


class NLVR2Collate:
    """Stack image pairs, tokenize sentences, drop samples whose image failed (and count
    them)."""

    def __init__(self, tokenizer: CaptionTokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = [x for x in items if x is not None]
        if not good:
            return {"num_skipped": len(items)}
        tokens = self.tokenizer([x["text"] for x in good])
        pairs = [x["entry"] for x in good]
        return {
            "image": torch.stack([x["image"] for x in good]),  # (B, 2, 3, S, S)
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "label": torch.tensor([p.label for p in pairs], dtype=torch.long),
            "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
            "image_paths": [list(p.images) for p in pairs],
            "sentence": [p.sentence for p in pairs],
            "num_skipped": len(items) - len(good),
        }


class NLVR2DataModule(ListedDataModule):
    """NLVR2 data for fine-tuning and evaluation.

    Args:
        image_root: folder the json image paths are relative to (the NLVR2 images).
        train_file: training json file(s) (``nlvr_train.json``).
        val_file: validation json file(s) (``nlvr_dev.json``), evaluated after every epoch.
        test_file: test json file(s) (``nlvr_test.json``, test-P).
        predict_file: json file(s) for ``predict`` (labels optional); default ``test_file``.
        image_size: side length of the model's input (384 in the paper).
        batch_size: training batch per process (16 in the paper).
        eval_batch_size: evaluation batch per process (16 in the paper).
        num_workers: data-loader workers per process.
        tokenizer: tokenizer directory or hub name; ``None`` = the offline MiniLM vocabulary
            (bert-base-uncased's).
        max_length: token cap, [CLS] included. The original pads to the longest sentence and
            does not truncate; its sentences are at most ``max_words`` words.
        max_words: words kept by :func:`pre_caption`.
        append_sep: end sentences with [SEP] (stock BERT) instead of ALBEF's [CLS]-only layout.
        check_images: drop entries with an image file that does not exist at setup, naming
            them.
        pin_memory: pin host memory in the loaders.
        drop_last: drop the last incomplete training batch (as the original).
    """

    item_one, item_name = "pair", "pairs"
    probe_decodable = True

    def __init__(
        self,
        image_root: str,
        train_file: str | list[str] | None = None,
        val_file: str | list[str] | None = None,
        test_file: str | list[str] | None = None,
        predict_file: str | list[str] | None = None,
        image_size: int = 384,
        batch_size: int = 16,
        eval_batch_size: int = 16,
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
    @staticmethod
    def _image_files(item: NLVR2Pair) -> tuple[str, ...]:
        return item.images

    def _split_files(self, split: str) -> list[str]:
        h = self.hparams
        if split == "predict":
            return as_file_list(h.predict_file or h.test_file)
        return as_file_list(getattr(h, f"{split}_file"))

    def _read(self, split: str, files: list[str]) -> list[NLVR2Pair]:
        h = self.hparams
        pairs: list[NLVR2Pair] = []
        for f in files:
            pairs += read_nlvr2_json(f, h.image_root, require_label=split != "predict",
                                     start=len(pairs))
        return pairs

    def _roots(self) -> str:
        return f"data.image_root={self.hparams.image_root!r}"

    def _make_dataset(self, split: str, entries: list[NLVR2Pair], transform) -> NLVR2Dataset:
        return NLVR2Dataset(entries, transform, self.hparams.max_words)

    def _describe(self, split: str, entries: list[NLVR2Pair]) -> None:
        counts = {name: sum(p.label == c for p in entries) for c, name in enumerate(LABEL_NAMES)}
        images = {path for p in entries for path in p.images}
        _logger.info("%s: %d pairs of %d images (%s)", split, len(entries), len(images),
                     ", ".join(f"{n} {k}" for k, n in counts.items()))

    # ---- loaders
    def _collate(self) -> NLVR2Collate:
        h = self.hparams
        return NLVR2Collate(CaptionTokenizer(h.tokenizer, h.max_length, h.append_sep))

    _train_collate = _eval_collate = _collate
