"""Image-text retrieval data: ALBEF's retrieval json and Karpathy-style COCO / Flickr30K json.

Accepted files (image paths relative to ``image_root``):

- ALBEF train layout: a list of ``{"image", "caption": str, "image_id"}``, one entry per
  caption (``data.tar.gz`` of the original, ``albef_train.json`` of the COCO sample).
- ALBEF test layout / Karpathy-style list: ``{"image", "caption": [str, ...], "image_id"?}``,
  one entry per image.
- Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json``: ``{"images": [{"filepath"?,
  "filename", "sentences": [{"raw"}], "split"}]}``; the split is chosen by the stage (train
  takes ``train`` and ``restval``).

Training samples are ``(image, caption, idx)`` with ``idx`` a contiguous id per distinct
``image_id`` (per image path when there is none), so that ITC can treat every caption of
an image as a positive.

Evaluation batches (validate, test, predict) come from :class:`RetrievalEvalStream`, which
splits the images and the captions between processes itself: Lightning's distributed
sampler would pad the set with duplicates, and retrieval ranks every sample against every
other. Each batch holds either images or captions:

- image batch: ``image`` (B, 3, S, S), ``image_index`` (B,), ``image_valid`` (B,) bool
  (False where the file could not be decoded), ``image_path`` (list of B str);
- text batch: ``input_ids`` and ``attention_mask`` (T, L), ``text_index`` (T,),
  ``text_image_index`` (T,) the caption's image (``txt2img``), ``caption`` (list of T str);
- both: ``num_images`` and ``num_texts``, the sizes of the whole set.

``img2txt`` follows from ``text_image_index``; the task assembles the rest.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from albef_pl.errors import data_errors
from albef_pl.text import CaptionTokenizer, is_usable_caption, pre_caption
from albef_pl.transforms import eval_transform, finetune_transform
from data_modules.listed import check_loader_options, check_tokenizer

_logger = logging.getLogger(__name__)

__all__ = [
    "ImageCaptions",
    "RetrievalDataModule",
    "RetrievalEvalStream",
    "RetrievalTrainDataset",
    "read_retrieval_json",
]

# Errors that mean "this file is not a usable image"; anything else is a bug and propagates.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# How many missing files to name in one warning before only counting them.
_NAMED_MISSING = 10
# Reasons counted by ``skipped_counts`` (names shared with the pre-training data).
SKIP_REASONS: tuple[str, ...] = ("missing_image", "corrupt_image", "unusable_caption")
# Karpathy split names per stage ("restval" is training data in every published split).
_KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


@dataclass
class ImageCaptions:
    """One image and its captions.

    Attributes:
        image: path relative to the image root (or absolute).
        captions: raw captions, in file order.
        image_id: the file's id for the image (the path when the file has none).
    """

    image: str
    captions: list[str]
    image_id: Any


def read_retrieval_json(path: str | Path, split: str = "test") -> list[ImageCaptions]:
    """Read one retrieval json in any accepted layout, grouped by image in file order.

    Args:
        path: the json file.
        split: ``train``, ``val`` or ``test``; selects entries of Karpathy's
            ``{"images": [...]}`` files and is ignored for list layouts.
    """
    with open(path) as f:
        data = json.load(f)

    if isinstance(data, dict) and "images" in data:  # Karpathy dataset_*.json
        wanted = _KARPATHY_SPLITS.get(split, (split,))
        out = []
        for entry in data["images"]:
            if entry.get("split") not in wanted:
                continue
            image = os.path.join(entry.get("filepath", ""), entry["filename"])
            captions = [s["raw"] for s in entry["sentences"]]
            image_id = entry.get("cocoid", entry.get("imgid", image))
            out.append(ImageCaptions(image, captions, image_id))
        return out

    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of entries or Karpathy's {{'images': [...]}}")
    groups: dict[Any, ImageCaptions] = {}
    for entry in data:
        key = entry.get("image_id", entry["image"])
        group = groups.setdefault(key, ImageCaptions(entry["image"], [], key))
        caption = entry["caption"]
        group.captions.extend(caption if isinstance(caption, list) else [caption])
    return list(groups.values())


def _load_image(path: str, transform) -> torch.Tensor | None:
    """Decode and transform one image; None (after a warning naming it) if unusable."""
    try:
        with Image.open(path) as img:
            return transform(img)
    except _IMAGE_ERRORS as err:
        _logger.warning("skipped unreadable image %s (%s: %s)", path, type(err).__name__, err)
        return None


class RetrievalTrainDataset(Dataset):
    """(image, caption, idx) samples; an unreadable image yields ``None`` (see collate).

    Args:
        pairs: ``(image path, cleaned caption, idx)`` per sample.
        transform: PIL image (not yet decoded) -> tensor.
    """

    def __init__(self, pairs: Sequence[tuple[str, str, int]], transform) -> None:
        self.pairs = list(pairs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        path, caption, idx = self.pairs[i]
        image = _load_image(path, self.transform)
        if image is None:
            return None
        return {"image": image, "caption": caption, "idx": idx}


class TrainCollate:
    """Stack images, tokenize captions, drop samples whose image failed (and count them).

    The batch gets ``num_skipped``; a batch of nothing but failures holds only that count,
    and the task skips it.
    """

    def __init__(self, tokenizer: CaptionTokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        good = [x for x in items if x is not None]
        if not good:
            return {"num_skipped": len(items)}
        tokens = self.tokenizer([x["caption"] for x in good])
        return {
            "image": torch.stack([x["image"] for x in good]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "idx": torch.tensor([x["idx"] for x in good], dtype=torch.long),
            "num_skipped": len(items) - len(good),
        }


class RetrievalEvalStream(IterableDataset):
    """Image batches then caption batches of one evaluation set, this process's share only.

    Image ``i`` belongs to process ``i % world_size`` and caption ``j`` to ``j % world_size``,
    so across processes every sample is embedded exactly once; within a process, batches are
    dealt to data-loader workers in turn. See the module docstring for the batch layout.

    Args:
        image_paths: path of every image of the set.
        captions: every (raw) caption of the set.
        txt2img: image index of every caption.
        transform: PIL image -> tensor.
        tokenizer: caption tokenizer (padding to ``max_length``, as the original evaluates).
        max_words: words kept by :func:`pre_caption`.
        image_batch_size: images per batch.
        text_batch_size: captions per batch.
        rank: this process.
        world_size: number of processes.
    """

    def __init__(
        self,
        image_paths: Sequence[str],
        captions: Sequence[str],
        txt2img: Sequence[int],
        transform,
        tokenizer: CaptionTokenizer,
        max_words: int = 30,
        image_batch_size: int = 64,
        text_batch_size: int = 256,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(captions) != len(txt2img):
            raise ValueError("captions and txt2img differ in length")
        self.image_paths = list(image_paths)
        self.captions = list(captions)
        self.txt2img = list(txt2img)
        self.transform = transform
        self.tokenizer = tokenizer
        self.max_words = max_words
        self.image_batch_size = image_batch_size
        self.text_batch_size = text_batch_size
        self.rank = rank
        self.world_size = world_size

    @property
    def img2txt(self) -> list[list[int]]:
        """Caption indices of every image."""
        out: list[list[int]] = [[] for _ in self.image_paths]
        for j, i in enumerate(self.txt2img):
            out[i].append(j)
        return out

    def _plan(self) -> list[tuple[str, list[int]]]:
        images = list(range(self.rank, len(self.image_paths), self.world_size))
        texts = list(range(self.rank, len(self.captions), self.world_size))
        plan = [("image", images[s : s + self.image_batch_size])
                for s in range(0, len(images), self.image_batch_size)]
        plan += [("text", texts[s : s + self.text_batch_size])
                 for s in range(0, len(texts), self.text_batch_size)]
        return plan

    def __len__(self) -> int:
        return len(self._plan())

    def _image_batch(self, indices: list[int]) -> dict[str, Any]:
        tensors = [_load_image(self.image_paths[i], self.transform) for i in indices]
        shape = next((t.shape for t in tensors if t is not None), None)
        if shape is None:  # every image failed: still report them, as invalid
            probe = self.transform(Image.new("RGB", (8, 8)))
            shape = probe.shape
        return {
            "image": torch.stack([t if t is not None else torch.zeros(shape) for t in tensors]),
            "image_index": torch.tensor(indices, dtype=torch.long),
            "image_valid": torch.tensor([t is not None for t in tensors]),
            "image_path": [self.image_paths[i] for i in indices],
            "num_images": len(self.image_paths),
            "num_texts": len(self.captions),
        }

    def _text_batch(self, indices: list[int]) -> dict[str, Any]:
        raw = [self.captions[j] for j in indices]
        tokens = self.tokenizer([pre_caption(c, self.max_words) for c in raw])
        return {
            **tokens,
            "text_index": torch.tensor(indices, dtype=torch.long),
            "text_image_index": torch.tensor([self.txt2img[j] for j in indices], dtype=torch.long),
            "caption": raw,
            "num_images": len(self.image_paths),
            "num_texts": len(self.captions),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for kind, indices in self._plan()[worker::workers]:
            yield self._image_batch(indices) if kind == "image" else self._text_batch(indices)


class RetrievalDataModule(L.LightningDataModule):
    """COCO / Flickr30K retrieval data for fine-tuning and evaluation.

    Args:
        image_root: folder the json image paths are relative to.
        train_file: training json file(s).
        val_file: validation json file(s) (evaluated after every epoch).
        test_file: test json file(s).
        predict_file: json file(s) for ``predict``; defaults to ``test_file``.
        image_size: side length of the model's input (384 in the paper's fine-tunes).
        batch_size: training batch per process.
        eval_batch_size: images per evaluation batch.
        text_batch_size: captions per evaluation batch.
        num_workers: data-loader workers per process.
        tokenizer: tokenizer directory or hub name; ``None`` = the offline MiniLM vocabulary
            (bert-base-uncased's).
        max_length: token length cap, [CLS] included (30, as the original).
        max_words: words kept by :func:`pre_caption`.
        append_sep: end captions with [SEP] (stock BERT) instead of ALBEF's [CLS]-only layout.
        check_images: drop entries whose image file does not exist at setup, naming them.
        pin_memory: pin host memory in the loaders.
        drop_last: drop the last incomplete training batch (as the original).
    """

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
        text_batch_size: int = 256,
        num_workers: int = 4,
        tokenizer: str | None = None,
        max_length: int = 30,
        max_words: int = 30,
        append_sep: bool = False,
        check_images: bool = True,
        pin_memory: bool = True,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        check_loader_options(image_size=image_size, batch_size=batch_size,
                             eval_batch_size=eval_batch_size, text_batch_size=text_batch_size,
                             num_workers=num_workers, max_length=max_length, max_words=max_words)
        check_tokenizer(tokenizer)
        self.save_hyperparameters()
        self.train_set: RetrievalTrainDataset | None = None
        self.eval_sets: dict[str, tuple[list[str], list[str], list[int]]] = {}
        self._skipped: dict[str, dict[str, int]] = {}

    # ---- reading
    def _files(self, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        return [value] if isinstance(value, str) else list(value)

    def _entries(self, files: list[str], split: str) -> list[ImageCaptions]:
        karpathy_split = "test" if split == "predict" else split
        entries = [e for f in files for e in read_retrieval_json(f, karpathy_split)]
        for e in entries:
            e.image = os.path.join(self.hparams.image_root, e.image)
        if self.hparams.check_images:
            entries = self._drop_missing(entries, split)
        return entries

    def _count(self, split: str, reason: str, n: int) -> None:
        counts = self._skipped.setdefault(split, dict.fromkeys(SKIP_REASONS, 0))
        counts[reason] += n

    def skipped_counts(self, split: str = "train") -> dict[str, int]:
        """Samples skipped so far in this process, by reason (every reason present).

        ``missing_image``: entries whose file was absent at setup; ``corrupt_image``: images
        that failed to decode (training samples dropped from their batch, evaluation images
        left out of the ranking); ``unusable_caption``: training captions without usable
        text. Works with :class:`data_modules.SkippedSamplesLogger`.
        """
        return dict(self._skipped.get(split, dict.fromkeys(SKIP_REASONS, 0)))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Runs in the main process, so counts made in the workers arrive here with the batch.
        trainer = self.trainer
        if trainer is None:
            return batch
        if trainer.training and "num_skipped" in batch:
            self._count("train", "corrupt_image", int(batch["num_skipped"]))
        elif "image_valid" in batch and not trainer.sanity_checking:
            split = "val" if trainer.validating else "test" if trainer.testing else "predict"
            self._count(split, "corrupt_image", int((~batch["image_valid"]).sum()))
        return batch

    def _drop_missing(self, entries: list[ImageCaptions], split: str) -> list[ImageCaptions]:
        missing = [e.image for e in entries if not os.path.isfile(e.image)]
        self._count(split, "missing_image", len(missing))
        if missing:
            _logger.warning(
                "%s: %d of %d images not found and skipped, e.g. %s", split, len(missing),
                len(entries), ", ".join(missing[:_NAMED_MISSING]),
            )
            gone = set(missing)
            entries = [e for e in entries if e.image not in gone]
        return entries

    def _train_pairs(self, entries: list[ImageCaptions]) -> list[tuple[str, str, int]]:
        pairs, dropped = [], 0
        for idx, e in enumerate(entries):  # entries are grouped by image_id, in file order
            for caption in e.captions:
                cleaned = pre_caption(caption, self.hparams.max_words)
                if is_usable_caption(cleaned):
                    pairs.append((e.image, cleaned, idx))
                else:
                    dropped += 1
        self._count("train", "unusable_caption", dropped)
        if dropped:
            _logger.warning("train: skipped %d captions with no usable English text", dropped)
        return pairs

    @staticmethod
    def _eval_set(entries: list[ImageCaptions]) -> tuple[list[str], list[str], list[int]]:
        images = [e.image for e in entries]
        captions = [c for e in entries for c in e.captions]
        txt2img = [i for i, e in enumerate(entries) for _ in e.captions]
        return images, captions, txt2img

    @data_errors("data ({cls}, set-up)")
    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if stage in (None, "fit") and self.train_set is None and h.train_file:
            pairs = self._train_pairs(self._entries(self._files(h.train_file), "train"))
            self.train_set = RetrievalTrainDataset(pairs, finetune_transform(h.image_size))
            _logger.info("train: %d pairs of %d images", len(pairs), len({p[2] for p in pairs}))
        wanted = {"fit": ["val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        for split in wanted.get(stage, ["val", "test", "predict"]):
            if split == "predict":
                files = self._files(h.predict_file or h.test_file)
            else:
                files = self._files(getattr(h, f"{split}_file"))
            if files and split not in self.eval_sets:
                images, captions, txt2img = self._eval_set(self._entries(files, split))
                self.eval_sets[split] = (images, captions, txt2img)
                _logger.info("%s: %d images, %d captions", split, len(images), len(captions))

    # ---- loaders
    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise ValueError("data.train_file is required to fit")
        h = self.hparams
        return DataLoader(
            self.train_set,
            batch_size=h.batch_size,
            shuffle=True,
            num_workers=h.num_workers,
            collate_fn=TrainCollate(CaptionTokenizer(h.tokenizer, h.max_length, h.append_sep)),
            pin_memory=h.pin_memory,
            drop_last=h.drop_last,
            persistent_workers=h.num_workers > 0,
        )

    def eval_stream(self, split: str) -> RetrievalEvalStream:
        """This process's evaluation stream of ``split`` (``val``, ``test`` or ``predict``)."""
        h = self.hparams
        images, captions, txt2img = self.eval_sets[split]
        rank, world = self._rank_world()
        return RetrievalEvalStream(
            images, captions, txt2img,
            transform=eval_transform(h.image_size),
            tokenizer=CaptionTokenizer(h.tokenizer, h.max_length, h.append_sep, "max_length"),
            max_words=h.max_words,
            image_batch_size=h.eval_batch_size,
            text_batch_size=h.text_batch_size,
            rank=rank,
            world_size=world,
        )

    def _eval_loader(self, split: str) -> DataLoader | list:
        if split not in self.eval_sets:
            return []
        stream = self.eval_stream(split)
        workers = min(self.hparams.num_workers, len(stream))
        return DataLoader(stream, batch_size=None, num_workers=workers,
                          pin_memory=self.hparams.pin_memory)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._eval_loader("predict")
