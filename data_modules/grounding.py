"""Weakly supervised grounding data: RefCOCO+ in ALBEF's layout, or a sample built from COCO
instance boxes.

**Training files** (the original's ``refcoco+_train.json``): a json list of
``{"image": path relative to image_root, "text": referring expression}``. Training sees no
box: it is image-text retrieval, with every expression of the same image file a positive.

**Evaluation files** (``val``, ``test``, ``predict``): a json list of references, one per
referred object::

    {"ref_id": 47, "image": "train2014/COCO_train2014_000000581857.jpg",
     "text": ["lady in black", "woman on right"],     # one string or several
     "bbox": [103.9, 100.1, 233.5, 277.2],              # ground truth, [x, y, w, h] pixels
     "proposals": [[x, y, w, h], ...],                  # candidate boxes (extra values ignored)
     "width": 640, "height": 427,                       # the image's size (the boxes' frame)
     "split": "testA"}                                  # optional; reported per split

A ``predict`` file may leave out ``bbox`` (no ground truth): the chosen box is still written,
without IoU.

Each text becomes one sample (accuracy counts expressions, as the original). The README
shows how to write these files from the original's ``refcoco+_{val,test}.json``, refTools'
refs and ``dets.json``.

**COCO-instances sample** (``coco_instances``): a COCO ``instances_*.json``. Every category
that has exactly one instance in an image gives a reference: the category name is the
expression ("dog"), that instance's box the ground truth, and every box of the image the
proposals (a stand-in for detector proposals). Images are split by id: every
``sample_holdout_every``-th image goes to val (and test) if it has at least
``sample_min_proposals`` boxes, the others to train.

Batches hold ``image`` (B, 3, S, S), ``input_ids`` and ``attention_mask`` (B, L), ``idx``
(B,) a contiguous id per image file, ``text`` and ``image_path`` (lists of B strings), and
``num_skipped`` (samples whose image failed to decode: dropped and counted). Evaluation
batches add ``bbox`` (B, 4), ``proposals`` (list of B (K_i, 4) tensors), ``size`` (B, 2)
(width, height), ``ref_id`` and ``split`` (lists of B).

Bad input: a json file that is missing, not json, or has an entry without an image or text,
with a box outside its image or of no area, or with no proposals stops set-up with a
message naming the file and the entry; an image file that is missing is named, counted
(``missing_image``) and skipped; one that fails to decode is counted (``corrupt_image``) and
left out of its batch.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from albef_pl.text import CaptionTokenizer, pre_caption
from albef_pl.transforms import grounding_transform
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

__all__ = ["GroundingDataModule", "GroundingDataset", "Ref", "check_box", "read_grounding_json",
           "refs_from_coco_instances"]

#: How far (pixels) a box may reach past the image border (float boxes round outwards).
BORDER_TOLERANCE = 1.0


@dataclass
class Ref:
    """One (image, expression) sample, with its boxes when it is for evaluation.

    Attributes:
        image: image path (``image_root`` joined).
        text: the raw expression.
        ref_id: the reference's id (-1 for training pairs without one).
        split: subset name reported by evaluation (``val``, ``testA``, ``testB`` ...).
        bbox: ground-truth [x, y, w, h], or None (training).
        proposals: candidate [x, y, w, h] boxes, or None (training).
        width: image width in the boxes' frame.
        height: image height in the boxes' frame.
        index: position of the sample in its split.
        idx: contiguous id of the image file in its split (ITC positives).
    """

    image: str
    text: str
    ref_id: Any = -1
    split: str = "train"
    bbox: list[float] | None = None
    proposals: list[list[float]] | None = field(default=None, repr=False)
    width: int = 0
    height: int = 0
    index: int = 0
    idx: int = 0


def _is_number(value: Any) -> bool:
    """A finite json number (not a bool, NaN or infinity: json.load reads NaN and Infinity,
    and every comparison with NaN is false, so a NaN box would pass the checks below)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_box(box: Any, width: float, height: float, what: str) -> list[float]:
    """``box`` as [x, y, w, h] floats; ``ValueError`` (starting with ``what``) unless it has
    four numbers, a positive area, and lies inside the (width, height) image up to
    :data:`BORDER_TOLERANCE` pixels."""
    if (not isinstance(box, (list, tuple)) or len(box) < 4
            or not all(_is_number(v) for v in box[:4])):
        raise ValueError(f"{what}: {str(box)[:80]} is not a box [x, y, w, h] of finite "
                         "numbers")
    x, y, w, h = (float(v) for v in box[:4])
    if w <= 0 or h <= 0:
        raise ValueError(f"{what}: box {[x, y, w, h]} has no area")
    t = BORDER_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        raise ValueError(f"{what}: box {[x, y, w, h]} lies outside the {width}x{height} image")
    return [x, y, w, h]


def _texts(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        return list(value)
    return None


def read_grounding_json(
    path: str | Path, image_root: str = "", with_boxes: bool = True, start: int = 0,
    default_split: str = "val", require_bbox: bool = True,
) -> list[Ref]:
    """Read one grounding json file (see the module docstring for both layouts).

    Args:
        path: the json file.
        image_root: folder the image paths are relative to.
        with_boxes: an evaluation file (boxes, proposals and size required); else training.
        start: index of the file's first sample (files of one split are numbered on).
        default_split: subset name of entries without ``split``.
        require_bbox: with ``with_boxes``, raise on an entry without ``bbox`` (predict files
            may lack the ground truth; their entries get ``bbox`` None).

    Raises:
        ValueError: the file is not a non-empty list, or an entry is malformed; the message
            names the file, the entry and its ``ref_id``.
    """
    data = load_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty json list of {{image, text, ...}} "
                         f"entries, found {type(data).__name__}")
    refs: list[Ref] = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        texts = _texts(entry.get("text")) if isinstance(entry, dict) else None
        if texts is None or not isinstance(entry.get("image"), str):
            raise ValueError(f"{where} ({str(entry)[:120]}) lacks an 'image' string or a "
                             "'text' (a string or a list of strings)")
        for text in texts:
            if not pre_caption(text):
                raise ValueError(f"{where} (ref_id {entry.get('ref_id', -1)!r}, image "
                                 f"{entry['image']!r}): text {text!r} is empty once "
                                 "punctuation is removed; give an expression or remove it")
        image = os.path.join(image_root, entry["image"])
        ref = Ref(image=image, text="", ref_id=entry.get("ref_id", -1),
                  split=str(entry.get("split", default_split)))
        if with_boxes:
            where = f"{where} (ref_id {ref.ref_id!r}, image {entry['image']!r})"
            _read_boxes(entry, ref, where, require_bbox)
        for text in texts:
            refs.append(Ref(**{**vars(ref), "text": text, "index": start + len(refs)}))
    return refs


def _read_boxes(entry: dict, ref: Ref, where: str, require_bbox: bool = True) -> None:
    for key in ("bbox", "proposals", "width", "height"):
        if key not in entry and (key != "bbox" or require_bbox):
            raise ValueError(f"{where} has no '{key}' (evaluation entries need bbox, "
                             "proposals, width and height; predict entries may lack bbox)")
    width, height = entry["width"], entry["height"]
    if not all(_is_number(v) and v > 0 for v in (width, height)):
        raise ValueError(f"{where}: width {width!r} and height {height!r} must be positive")
    ref.width, ref.height = int(width), int(height)
    if "bbox" in entry:
        ref.bbox = check_box(entry["bbox"], width, height, f"{where}, bbox")
    proposals = entry["proposals"]
    if not isinstance(proposals, list) or not proposals:
        raise ValueError(f"{where} has no proposals: at least one candidate box is needed")
    ref.proposals = [check_box(p, width, height, f"{where}, proposal {k}")
                     for k, p in enumerate(proposals)]


def refs_from_coco_instances(
    path: str | Path, image_root: str = "", holdout_every: int = 4, min_proposals: int = 3
) -> dict[str, list[Ref]]:
    """References from COCO instance boxes: ``{"train": [...], "val": [...]}``.

    For each image, each category with exactly one (non-crowd) instance yields a reference
    named by the category; the proposals are every box of the image. Images sorted by id;
    position ``i`` goes to val when ``i % holdout_every == 0``. Validation keeps only images
    with at least ``min_proposals`` boxes (with one or two, picking a box is no test);
    training keeps every image, since it never sees a box.
    """
    data = load_json(path)
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise ValueError(f"{path}: not a COCO instances file (needs images, annotations and "
                         "categories)")
    for key, fields in (("categories", ("id", "name")),
                        ("annotations", ("id", "image_id", "category_id", "bbox")),
                        ("images", ("id", "file_name", "width", "height"))):
        for k, item in enumerate(data[key]):
            lacks = [f for f in fields if not isinstance(item, dict) or f not in item]
            if lacks:
                raise ValueError(f"{path}: {key}[{k}] ({str(item)[:80]}) has no "
                                 f"{', '.join(repr(f) for f in lacks)}")
    names = {c["id"]: c["name"] for c in data["categories"]}
    for cat_id, name in names.items():
        if not isinstance(name, str) or not pre_caption(name):
            raise ValueError(f"{path}: category {cat_id} has the name {name!r}, which is no "
                             "expression (empty once punctuation is removed)")
    boxes: dict[Any, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        if ann["category_id"] not in names:
            raise ValueError(f"{path}: annotation {ann['id']} (image {ann['image_id']}) has "
                             f"category_id {ann['category_id']!r}, which 'categories' lacks")
        boxes[ann["image_id"]].append(ann)
    out: dict[str, list[Ref]] = {"train": [], "val": []}
    for pos, img in enumerate(sorted(data["images"], key=lambda im: im["id"])):
        anns = boxes.get(img["id"], [])
        split = "val" if pos % holdout_every == 0 else "train"
        if split == "val" and len(anns) < min_proposals:
            continue
        counts = Counter(a["category_id"] for a in anns)
        where = f"{path}: image {img['id']} ({img['file_name']})"
        proposals = [check_box(a["bbox"], img["width"], img["height"],
                               f"{where}, annotation {a['id']}") for a in anns]
        for ann in anns:
            if counts[ann["category_id"]] != 1 or ann.get("iscrowd", 0):
                continue  # ambiguous (several instances) or a crowd region
            out[split].append(Ref(
                image=os.path.join(image_root, img["file_name"]),
                text=names[ann["category_id"]], ref_id=ann["id"], split=split,
                bbox=[float(v) for v in ann["bbox"]], proposals=proposals,
                width=int(img["width"]), height=int(img["height"]),
                index=len(out[split]),
            ))
    return out


class GroundingDataset(ImageEntryDataset):
    """Samples of :class:`Ref`: items hold ``image``, ``text`` (after :func:`pre_caption`)
    and ``entry``; ``None`` when the image cannot be decoded (counted by the collate)."""

    def __init__(self, refs: Sequence[Ref], transform, max_words: int = 30) -> None:
        super().__init__(refs, transform, functools.partial(_expression, max_words=max_words))


def _expression(ref: Ref, max_words: int) -> str:
    return pre_caption(ref.text, max_words)


class GroundingCollate:
    """Stack images, tokenize expressions, drop samples whose image failed (and count them);
    evaluation batches also carry the boxes (see the module docstring)."""

    def __init__(self, tokenizer: CaptionTokenizer, with_boxes: bool) -> None:
        self.tokenizer = tokenizer
        self.with_boxes = with_boxes

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = [x for x in items if x is not None]
        if not good:
            return {"num_skipped": len(items)}
        refs: list[Ref] = [x["entry"] for x in good]
        batch = {
            "image": torch.stack([x["image"] for x in good]),
            **self.tokenizer([x["text"] for x in good]),
            "idx": torch.tensor([r.idx for r in refs], dtype=torch.long),
            "index": torch.tensor([r.index for r in refs], dtype=torch.long),
            "text": [r.text for r in refs],
            "image_path": [r.image for r in refs],
            "num_skipped": len(items) - len(good),
        }
        if self.with_boxes:
            # A predict entry without ground truth has a NaN box (IoU NaN: not scored).
            batch["bbox"] = torch.tensor([r.bbox if r.bbox is not None else [math.nan] * 4
                                          for r in refs], dtype=torch.float32)
            batch["proposals"] = [torch.tensor(r.proposals, dtype=torch.float32) for r in refs]
            batch["size"] = torch.tensor([[r.width, r.height] for r in refs], dtype=torch.long)
            batch["ref_id"] = [r.ref_id for r in refs]
            batch["split"] = [r.split for r in refs]
        return batch


class GroundingDataModule(ListedDataModule):
    """RefCOCO+ (ALBEF layout) or the COCO-instances sample, for :class:`GroundingTask`.

    Args:
        image_root: folder the json image paths (or the COCO ``file_name``s) are relative to.
        train_file: training json file(s) (``refcoco+_train.json``).
        val_file: validation reference file(s), evaluated after every epoch.
        test_file: test reference file(s) (RefCOCO+ testA and testB, told apart by ``split``).
        predict_file: reference file(s) for ``predict``; default ``test_file``.
        coco_instances: a COCO ``instances_*.json`` to build the sample from, instead of the
            files above (train from it, val and test from its held-out images).
        sample_holdout_every: with ``coco_instances``, every n-th image is held out.
        sample_min_proposals: with ``coco_instances``, held-out images with fewer boxes are
            left out.
        image_size: side length of the model's input (384 in the paper).
        batch_size: training batch per process (32 in the paper).
        eval_batch_size: evaluation batch per process.
        num_workers: data-loader workers per process.
        tokenizer: tokenizer directory or hub name; ``None`` = the offline MiniLM vocabulary
            (bert-base-uncased's).
        max_length: token cap, [CLS] included.
        max_words: words kept by :func:`pre_caption`.
        append_sep: end texts with [SEP] (stock BERT) instead of ALBEF's [CLS]-only layout.
        hflip: flip training images horizontally at random (the original does).
        check_images: drop entries whose image file does not exist at setup, naming them.
        pin_memory: pin host memory in the loaders.
        drop_last: drop the last incomplete training batch (as the original).
    """

    item_one, item_name = "expression", "expressions"
    probe_decodable = True

    def __init__(
        self,
        image_root: str,
        train_file: str | list[str] | None = None,
        val_file: str | list[str] | None = None,
        test_file: str | list[str] | None = None,
        predict_file: str | list[str] | None = None,
        coco_instances: str | None = None,
        sample_holdout_every: int = 4,
        sample_min_proposals: int = 3,
        image_size: int = 384,
        batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 4,
        tokenizer: str | None = None,
        max_length: int = 30,
        max_words: int = 30,
        append_sep: bool = False,
        hflip: bool = True,
        check_images: bool = True,
        pin_memory: bool = True,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        check_files(train_file=train_file, val_file=val_file, test_file=test_file,
                    predict_file=predict_file, coco_instances=coco_instances)
        check_loader_options(image_size=image_size, batch_size=batch_size,
                             eval_batch_size=eval_batch_size, num_workers=num_workers,
                             max_length=max_length, max_words=max_words)
        check_tokenizer(tokenizer)
        files = (train_file, val_file, test_file, predict_file)
        if coco_instances and any(files):
            raise ValueError("data.coco_instances builds every split; leave train_file, "
                             "val_file, test_file and predict_file unset with it")
        if sample_holdout_every < 2:
            raise ValueError(f"data.sample_holdout_every must be >= 2, got {sample_holdout_every}")
        self.save_hyperparameters()
        self._sample: dict[str, list[Ref]] | None = None

    # ---- reading
    def _split_files(self, split: str) -> list[str]:
        h = self.hparams
        if h.coco_instances:
            return [h.coco_instances]
        if split == "predict":
            return as_file_list(h.predict_file or h.test_file)
        return as_file_list(getattr(h, f"{split}_file"))

    def _read(self, split: str, files: list[str]) -> list[Ref]:
        h = self.hparams
        if h.coco_instances:
            if self._sample is None:
                self._sample = refs_from_coco_instances(
                    h.coco_instances, h.image_root, h.sample_holdout_every,
                    h.sample_min_proposals)
            refs = self._sample["train" if split == "train" else "val"]
            if not refs:
                held = (f"held-out image (every {h.sample_holdout_every}th by id with at least "
                        f"data.sample_min_proposals={h.sample_min_proposals} boxes)"
                        if split != "train" else "training image")
                raise ValueError(
                    f"{split}: data.coco_instances {h.coco_instances} gives no reference: no "
                    f"{held} has a category with exactly one non-crowd instance. Give a file "
                    "with more images, or lower data.sample_min_proposals / "
                    "data.sample_holdout_every")
            return [Ref(**vars(r)) for r in refs]  # each split gets its own copies
        refs: list[Ref] = []
        for f in files:
            refs += read_grounding_json(f, h.image_root, with_boxes=split != "train",
                                        start=len(refs), default_split=split,
                                        require_bbox=split != "predict")
        return refs

    def _roots(self) -> str:
        return f"data.image_root={self.hparams.image_root!r}"

    def _make_dataset(self, split: str, entries: list[Ref], transform) -> GroundingDataset:
        h = self.hparams
        ids: dict[str, int] = {}
        for ref in entries:  # one id per image file: every expression of it is a positive
            ref.idx = ids.setdefault(ref.image, len(ids))
        if split != "train":
            self._check_sizes(entries, split)
        if split == "train":
            # NOTE: the flip is the original's, although an expression may say "left" or
            # "right" of a flipped image; data.hflip false turns it off.
            # NOTE: grounding trains on whole images (resize, no crop), unlike the crop of the
            # other fine-tunes, so that the referred object is always in the picture.
            transform = grounding_transform(h.image_size, hflip=h.hflip)
        return GroundingDataset(entries, transform, h.max_words)

    @staticmethod
    def _check_sizes(entries: list[Ref], split: str) -> None:
        """Raise ``ValueError`` naming the reference whose ``width``/``height`` (the frame of
        its boxes) differ from its image file's: the map would be scored on the wrong frame,
        silently (a wrong ``image_root`` or image). Reads image headers only; a file that does
        not open is left to the loader, which skips and counts it."""
        sizes: dict[str, tuple[int, int] | None] = {}
        for ref in entries:
            if ref.image not in sizes:
                try:
                    with Image.open(ref.image) as img:
                        sizes[ref.image] = img.size
                except IMAGE_ERRORS:
                    sizes[ref.image] = None
            size = sizes[ref.image]
            if size is not None and size != (ref.width, ref.height):
                raise ValueError(
                    f"{split}: ref_id {ref.ref_id!r} ({ref.text!r}) gives its image as "
                    f"{ref.width}x{ref.height}, but {ref.image} is {size[0]}x{size[1]}; its "
                    "boxes would be scored on the wrong frame. Check data.image_root and the "
                    "entry's image, width and height")

    def _describe(self, split: str, entries: list[Ref]) -> None:
        images = len({r.image for r in entries})
        if split == "train":
            _logger.info("train: %d expressions of %d images", len(entries), images)
            return
        subsets = Counter(r.split for r in entries)
        proposals = sum(len(r.proposals or []) for r in entries) / max(1, len(entries))
        _logger.info("%s: %d expressions of %d images (%s), %.1f proposals each", split,
                     len(entries), images, ", ".join(f"{k} {v}" for k, v in subsets.items()),
                     proposals)

    # ---- loaders
    # NOTE: expressions are tokenized with truncation at max_length (every tokenizer call here
    # truncates); the original passes max_length=30 without truncation=True, so a longer
    # expression (more than 29 word pieces in its 30 words) was not cut there.
    def _train_collate(self) -> GroundingCollate:
        h = self.hparams
        return GroundingCollate(CaptionTokenizer(h.tokenizer, h.max_length, h.append_sep),
                                with_boxes=False)

    def _eval_collate(self) -> GroundingCollate:
        h = self.hparams
        return GroundingCollate(CaptionTokenizer(h.tokenizer, h.max_length, h.append_sep),
                                with_boxes=True)

