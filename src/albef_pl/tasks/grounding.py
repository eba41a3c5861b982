"""Weakly supervised visual grounding (RefCOCO+): retrieval training, Grad-CAM evaluation.

Training is exactly :class:`RetrievalTask`'s (ITC with image-id positives and queue, ITM with
hard negatives, momentum distillation) on (image, referring expression) pairs; no box is
ever seen. Evaluation asks where the model looks: a Grad-CAM map of each expression over its
image (:mod:`albef_pl.grounding`) scores every proposal box, and the best one is correct
when its IoU with the ground truth is at least 0.5.

Evaluation needs gradients. The maps are computed under ``torch.inference_mode(False)`` and
``torch.enable_grad()`` on copies of the inputs, so they also work under Lightning's default
``inference_mode=True``; the shipped configs still set ``trainer.inference_mode: false``,
which spares those copies.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from albef_pl.grounding import (
    GRADCAM_MODES,
    IOU_THRESHOLD,
    best_box,
    box_iou_inclusive,
    gradcam,
)
from albef_pl.models.text import TextConfig
from albef_pl.tasks.retrieval import RetrievalTask

_logger = logging.getLogger(__name__)

__all__ = ["GroundingExample", "GroundingTask"]


@dataclass
class GroundingExample:
    """One evaluated expression, kept for the heat-map picture.

    Attributes:
        image_path: the image file.
        text: the expression.
        cam: (h, w) Grad-CAM map on the model's patch grid.
        bbox: ground-truth [x, y, w, h].
        chosen: the chosen proposal [x, y, w, h].
        iou: IoU of the chosen box with the ground truth.
        width: image width (the boxes' frame).
        height: image height.
    """

    image_path: str
    text: str
    cam: torch.Tensor
    bbox: list[float]
    chosen: list[float]
    iou: float
    width: int
    height: int


def _check_block_num(mode: str, block_num: int, vision: Any = None, text: Any = None, *,
                     depth: int | None = None, num_text: int | None = None,
                     num_fusion: int | None = None) -> None:
    """Raise ``ValueError`` naming ``model.block_num`` unless it is a fusion layer (``itm``,
    counted over text then fusion layers) or a ViT block (``itc``, negative from the end).
    Sizes come from the built model, or else from the ``vision`` and ``text`` configurations
    (configs or dicts, as the task receives them; what they leave open is not checked)."""
    if mode == "itm":
        if num_text is None:
            if isinstance(text, dict):
                text = TextConfig(**text)
            if not isinstance(text, TextConfig):
                text = TextConfig() if text is None else None
            if text is None:
                return
            num_text = text.num_text_layers
            num_fusion = text.to_bert_config().num_hidden_layers - num_text
        if not num_text <= block_num < num_text + num_fusion:
            raise ValueError(
                f"model.block_num={block_num} is not a fusion layer: layers {num_text}.."
                f"{num_text + num_fusion - 1} cross-attend to the image ({num_text} text "
                f"layers, {num_fusion} fusion layers; gradcam_mode itm)")
        return
    if depth is None:
        depth = vision.get("depth") if isinstance(vision, dict) else getattr(vision, "depth",
                                                                             None)
        if depth is None:  # the timm model's own depth: checked once it is built
            return
    if not -depth <= block_num < depth:
        raise ValueError(f"model.block_num={block_num} is not a ViT block (gradcam_mode itc; "
                         f"the ViT has {depth} blocks, -{depth}..{depth - 1})")


class GroundingTask(RetrievalTask):
    """ALBEF weakly supervised grounding: ``loss = ITC + ITM``; accuracy of Grad-CAM boxes.

    Args:
        gradcam_mode: ``itm`` (cross-attention of a fusion layer, the original's default) or
            ``itc`` (the [CLS] row of a ViT block's self-attention).
        block_num: with ``itm`` a BERT layer index counted over text then fusion layers (8 =
            the third fusion layer of ALBEF's 6 + 6 split, the original's setting); with
            ``itc`` a ViT block index. ``None``: the layer at the same relative depth, i.e.
            text layers + (fusion layers - 1) // 2 (8 for BERT-base) with ``itm``, and
            2/3 of the ViT's depth (8 of 12) with ``itc``.
        num_examples: expressions kept from each validation for the heat-map picture
            (``GroundingExamplesPlotter``).
        **kwargs: see :class:`RetrievalTask` (its ``k_test``, ``rerank`` ... are unused here).

    Logged: ``{val,test}/acc`` (all expressions), ``{stage}/acc_<split>`` for each subset
    when a file holds several (RefCOCO+ ``testA``, ``testB``), ``{stage}/chance_acc`` (the
    accuracy of a proposal drawn at random), ``{stage}/num_expressions``.
    """

    def __init__(
        self,
        *args: Any,
        gradcam_mode: str = "itm",
        block_num: int | None = None,
        num_examples: int = 6,
        **kwargs: Any,
    ) -> None:
        if gradcam_mode not in GRADCAM_MODES:
            raise ValueError(f"model.gradcam_mode must be one of {GRADCAM_MODES}, "
                             f"got {gradcam_mode!r}")
        if num_examples < 0:
            raise ValueError(f"model.num_examples must be >= 0, got {num_examples}")
        if block_num is not None:  # before any weight is built or loaded
            _check_block_num(gradcam_mode, int(block_num), kwargs.get("vision"),
                             kwargs.get("text"))
        super().__init__(*args, **kwargs)
        self.save_hyperparameters("gradcam_mode", "block_num", "num_examples")
        self._check_block()
        self._counts: dict[str, list[float]] = {}
        self._predictions: list[dict[str, Any]] = []
        self.grounding_examples: list[GroundingExample] = []

    @property
    def block_num(self) -> int:
        """The layer (``itm``) or ViT block (``itc``) whose attention makes the map."""
        h = self.hparams
        if h.block_num is not None:
            return int(h.block_num)
        # NOTE: the original has no size-aware default (its README passes 8); the configs
        # set 8, and unset it follows the depth of this model.
        if h.gradcam_mode == "itm":
            num_text = len(self.model.text_encoder.layers)
            return num_text + (len(self.model.fusion_encoder.layers) - 1) // 2
        return 2 * len(self.model.visual_encoder.blocks) // 3

    def _check_block(self) -> None:
        """The built model's layers (the default, or a ``block_num`` set after building)."""
        _check_block_num(self.hparams.gradcam_mode, self.block_num,
                         depth=len(self.model.visual_encoder.blocks),
                         num_text=len(self.model.text_encoder.layers),
                         num_fusion=len(self.model.fusion_encoder.layers))

    # ---- evaluation
    def ground(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Grad-CAM maps, chosen boxes and their IoU with the ground truth for one batch.

        Returns a dict of ``cam`` (B, h, w), ``chosen`` (B,) proposal index, ``iou`` (B,),
        ``chance`` (B,) the fraction of proposals that would be correct.
        """
        h = self.hparams
        was_training = self.model.training
        self.model.eval()  # deterministic maps (no dropout), whatever the caller's mode
        try:
            cam = gradcam(self.model, batch["image"], batch["input_ids"],
                          batch["attention_mask"], h.gradcam_mode, self.block_num)
        finally:
            self.model.train(was_training)
        cam = cam.detach().float().cpu()
        chosen, iou, chance = [], [], []
        # NOTE: boxes are scored one expression at a time on the CPU (upsampling and a
        # summed-area table each): measured 4-6 CPU ms per expression on COCO-size images
        # with 10-100 proposals, 0.4% of the paper model's CPU Grad-CAM pass and about 2 CPU
        # minutes over RefCOCO+'s three evaluation splits (docs/benchmarks.md).
        for b, proposals in enumerate(batch["proposals"]):
            width, height = (int(v) for v in batch["size"][b])
            gt = batch["bbox"][b].cpu()
            k, _ = best_box(cam[b], proposals.cpu(), width, height)
            ious = box_iou_inclusive(proposals.cpu(), gt[None])
            chosen.append(k)
            iou.append(float(ious[k]))
            chance.append(float((ious >= IOU_THRESHOLD).float().mean()))
        return {"cam": cam, "chosen": torch.tensor(chosen), "iou": torch.tensor(iou),
                "chance": torch.tensor(chance)}

    def _evaluate_batch(self, batch: dict[str, Any], stage: str) -> None:
        if "image" not in batch:  # every image of the batch was unreadable (counted)
            return
        out = self.ground(batch)
        for b, split in enumerate(batch["split"]):
            counts = self._counts.setdefault(split, [0.0, 0.0, 0.0])
            counts[0] += float(out["iou"][b] >= IOU_THRESHOLD)
            counts[1] += 1.0
            counts[2] += float(out["chance"][b])
        if stage == "val":
            self._keep_examples(batch, out)

    def _keep_examples(self, batch: dict[str, Any], out: dict[str, Any]) -> None:
        room = self.hparams.num_examples - len(self.grounding_examples)
        for b in range(min(room, len(batch["text"]))):
            k = int(out["chosen"][b])
            width, height = (int(v) for v in batch["size"][b])
            self.grounding_examples.append(GroundingExample(
                image_path=batch["image_path"][b], text=batch["text"][b], cam=out["cam"][b],
                bbox=batch["bbox"][b].tolist(), chosen=batch["proposals"][b][k].tolist(),
                iou=float(out["iou"][b]), width=width, height=height,
            ))

    def _reset_eval(self) -> None:
        super()._reset_eval()
        self._counts = {}

    def on_validation_epoch_start(self) -> None:
        self._reset_eval()
        self.grounding_examples = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_batch(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_batch(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per expression: ``ref_id``, ``text``, ``image``, the chosen ``box``, the ground
        truth ``bbox``, their ``iou`` and ``correct`` (these three None for an entry without
        ground truth); also written, for every process's
        expressions, to ``grounding_predictions.json`` in ``predict_dir``."""
        if "image" not in batch:
            return []
        out = self.ground(batch)
        rows = []
        for b in range(len(batch["text"])):
            labelled = not bool(batch["bbox"][b].isnan().any())  # a NaN box: no ground truth
            rows.append({
                "ref_id": batch["ref_id"][b], "text": batch["text"][b],
                "image": batch["image_path"][b], "split": batch["split"][b],
                "box": batch["proposals"][b][int(out["chosen"][b])].tolist(),
                "bbox": batch["bbox"][b].tolist() if labelled else None,
                "iou": round(float(out["iou"][b]), 4) if labelled else None,
                "correct": bool(out["iou"][b] >= IOU_THRESHOLD) if labelled else None})
        self._predictions.extend(rows)
        return rows

    def on_predict_epoch_start(self) -> None:
        self._reset_eval()
        self._predictions: list[dict[str, Any]] = []

    def on_validation_epoch_end(self) -> None:
        self.check_evaluation_data("val")
        if self.trainer.sanity_checking:  # a partial set
            self._reset_eval()
            return
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self.check_evaluation_data("test")
        self._log_accuracy("test")

    def on_predict_epoch_end(self) -> None:
        # A pass that decoded no image is refused, not written as an empty predictions file
        # (accuracy 0% of 0 expressions) over a good one.
        self.check_evaluation_data("predict")
        self._reset_eval()
        rows = self._predictions
        if self.trainer.world_size > 1 and dist.is_initialized():
            parts: list[list[dict[str, Any]]] = [[] for _ in range(self.trainer.world_size)]
            dist.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        if not self.trainer.is_global_zero:
            return
        out_dir = self._predict_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        labelled = [r for r in rows if r["correct"] is not None]
        acc = sum(r["correct"] for r in labelled) / len(labelled) if labelled else None
        settings = {"gradcam_mode": self.hparams.gradcam_mode, "block_num": self.block_num}
        with open(out_dir / "grounding_predictions.json", "w") as f:
            json.dump({"settings": settings, "acc": acc, "expressions": rows}, f, indent=1)
        _logger.info("predictions of %d expressions written to %s (accuracy %s)", len(rows),
                     out_dir / "grounding_predictions.json",
                     "none: no ground truth" if acc is None
                     else f"{100 * acc:.1f}% of {len(labelled)} with ground truth")

    def _log_accuracy(self, stage: str) -> None:
        counts = self._all_counts()
        self._reset_eval()
        total = [sum(c[i] for c in counts.values()) for i in range(3)]
        if not total[1]:
            _logger.warning("%s: no expression evaluated", stage)
            return
        # Every process holds the summed counts, so the logged values agree (ModelCheckpoint
        # reads the monitored one on every rank).
        logged = {f"{stage}/chance_acc": total[2] / total[1],
                  f"{stage}/num_expressions": total[1]}
        if len(counts) > 1:
            logged.update({f"{stage}/acc_{name}": c[0] / c[1] for name, c in counts.items()})
        self.log_dict(logged)
        self.log(f"{stage}/acc", total[0] / total[1], prog_bar=True)
        _logger.info("%s: grounding accuracy %.1f%% of %d expressions (a random proposal: "
                     "%.1f%%)%s", stage, 100 * total[0] / total[1], int(total[1]),
                     100 * total[2] / total[1],
                     "".join(f"; {n} {100 * c[0] / c[1]:.1f}%" for n, c in counts.items())
                     if len(counts) > 1 else "")

    def _all_counts(self) -> dict[str, list[float]]:
        """(correct, total, chance sum) per subset, summed over processes."""
        if self.trainer.world_size == 1 or not dist.is_initialized():
            return self._counts
        parts: list[dict[str, list[float]]] = [{} for _ in range(self.trainer.world_size)]
        dist.all_gather_object(parts, self._counts)
        out: dict[str, list[float]] = {}
        for part in parts:
            for name, c in part.items():
                acc = out.setdefault(name, [0.0, 0.0, 0.0])
                for i in range(3):
                    acc[i] += c[i]
        return dict(sorted(out.items()))
