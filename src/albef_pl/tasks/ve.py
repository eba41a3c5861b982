"""SNLI-VE (visual entailment): does the image entail, contradict or leave open a sentence?

The sentence attends to the image in the fusion layers; the fused [CLS] (or the mean of
the fused states, with ``text.pooling: mean``) goes through a two-layer classifier. The
momentum teacher (vision, text, fusion and classifier) supplies soft targets, as in the
original ``VE.py``: ``loss = (1 - alpha) * CE - alpha * sum softmax(teacher) *
log_softmax(student)``, alpha constant at 0.4. There is no ITC, ITM, MLM or queue.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from albef_pl.losses import classifier_loss
from albef_pl.models.albef import ALBEF
from albef_pl.tasks.base import ALBEFTask

_logger = logging.getLogger(__name__)

__all__ = ["LABEL_NAMES", "LABELS", "VisualEntailmentTask"]

#: Class index of each SNLI-VE label, as the original numbers them.
LABELS: dict[str, int] = {"contradiction": 0, "neutral": 1, "entailment": 2}
#: Label name of each class index.
LABEL_NAMES: tuple[str, ...] = tuple(sorted(LABELS, key=LABELS.get))


class VisualEntailmentTask(ALBEFTask):
    """ALBEF fine-tuned for SNLI-VE: three-way classification of (image, sentence) pairs.

    Args:
        alpha: distillation weight (0.4, constant: ``alpha_warmup`` is off by default, as the
            original's ``warm_up: False``).
        alpha_warmup: ramp alpha over the first epoch instead.
        lr: peak learning rate (2e-5 in the paper).
        min_lr: final learning rate of the cosine decay.
        warmup_lr: learning rate at step 0.
        warmup_steps: warm-up optimizer steps (the original warms up over 100 iterations).
        predict_dir: folder for ``predict``'s ``ve_predictions.json``; default
            ``<log dir>/predictions``.
        **kwargs: see :class:`ALBEFTask` (``embed_dim``, ``temp``, ``queue_size`` and
            ``empty_queue`` are accepted and unused: this task has no contrastive part).
    """

    #: Layout of the original's ``model_ve.ALBEF`` for albef_pl.convert.
    official_layout = "snli_ve"
    uses_queue = False
    clamp_temp = False
    num_classes = len(LABELS)
    #: Name of each class index, as written in predictions.
    label_names: tuple[str, ...] = LABEL_NAMES
    #: File that ``predict`` writes under ``predict_dir``.
    predictions_file = "ve_predictions.json"

    def __init__(
        self,
        *args: Any,
        alpha: float = 0.4,
        alpha_warmup: bool = False,
        lr: float = 2e-5,
        min_lr: float = 1e-6,
        warmup_lr: float = 1e-5,
        warmup_steps: int = 100,
        predict_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args, alpha=alpha, alpha_warmup=alpha_warmup, lr=lr, min_lr=min_lr,
            warmup_lr=warmup_lr, warmup_steps=warmup_steps, **kwargs,
        )
        self.save_hyperparameters("predict_dir")
        self.train_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self._predictions: list[dict[str, Any]] = []

    def configure_heads(self) -> None:
        # NOTE: the original's VE model keeps only the encoders and the classifier (no
        # projections, ITM head, MLM head, temperature or queues). The unused modules are
        # removed here, before the teacher is copied, so that DDP finds no parameter without
        # a gradient (find_unused_parameters stays false) and the teacher copies only what
        # the loss uses; ``uses_queue = False`` keeps the base task from building queues.
        # Loading a pre-training checkpoint reports their weights as dropped, as VE.py does.
        d = self.model.hidden_size
        self.model.cls_head = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Linear(d, self.num_classes)
        )
        for name in ("mlm_head", "vision_proj", "text_proj", "itm_head"):
            setattr(self.model, name, None)
        self.model.temp = None

    # ---- forward
    @staticmethod
    def classify(
        model: ALBEF,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, 3) class logits of ``model`` (the student or the teacher)."""
        # Unimodal encoders: image tokens (B, N, Dv), text states (B, L, D).
        image_embeds = model.encode_image(image)
        text_embeds = model.encode_text(input_ids, attention_mask)

        # The sentence attends to the image; pool the fused states ([CLS] or mean).
        fused = model.fuse(text_embeds, attention_mask, image_embeds)  # (B, L, D)
        return model.cls_head(model.pool(fused, attention_mask))

    def forward(self, image, input_ids, attention_mask) -> torch.Tensor:
        """(B, 3) logits of the student."""
        return self.classify(self.model, image, input_ids, attention_mask)

    # ---- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if "image" not in batch:  # every image of the batch was unreadable (already counted)
            return None
        image, ids, mask, labels = (batch["image"], batch["input_ids"],
                                    batch["attention_mask"], batch["label"])
        logits = self(image, ids, mask)
        alpha = float(self.alpha) if self.hparams.distill else 0.0
        teacher_logits = None
        if alpha > 0:
            with torch.no_grad():
                teacher_logits = self.classify(self.teacher, image, ids, mask)
        loss = classifier_loss(logits, labels, teacher_logits, alpha)

        b = image.shape[0]
        self.train_acc(logits.detach().argmax(1), labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=b)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True, batch_size=b)
        self.log("train/alpha", alpha, on_step=True, batch_size=b)
        if self._trainer is not None and self.trainer.optimizers:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("train/lr", lr, on_step=True, batch_size=b)
        return loss

    # ---- evaluation
    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        if "image" not in batch:
            return
        logits = self(batch["image"], batch["input_ids"], batch["attention_mask"])
        labels = batch["label"]
        metric = self.val_acc if stage == "val" else self.test_acc
        metric(logits.argmax(1), labels)
        b = labels.shape[0]
        loss = classifier_loss(logits, labels)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=b)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True, batch_size=b)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # ---- predict: one JSON of every pair with its predicted label and probabilities
    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        if "image" not in batch:
            return []
        logits = self(batch["image"], batch["input_ids"], batch["attention_mask"])
        probs = logits.float().softmax(dim=1).cpu()
        rows, names = [], self.label_names
        for i, p in enumerate(probs.tolist()):
            pred = max(range(self.num_classes), key=p.__getitem__)
            row = {
                "index": int(batch["index"][i]),
                **self.entry_fields(batch, i),
                "prediction": names[pred],
                "probabilities": {name: round(p[c], 6) for c, name in enumerate(names)},
            }
            label = int(batch["label"][i])
            if label >= 0:
                row["label"] = names[label]
                row["correct"] = pred == label
            rows.append(row)
        self._predictions.extend(rows)
        return rows

    @staticmethod
    def entry_fields(batch: dict[str, Any], i: int) -> dict[str, Any]:
        """What a prediction row says about sample ``i`` of ``batch`` (image and text)."""
        return {"image": batch["image_path"][i], "sentence": batch["sentence"][i]}

    def on_predict_epoch_end(self) -> None:
        # A pass that decoded no image is refused, not written as an empty predictions file
        # over a good one.
        self.check_evaluation_data("predict")
        rows = self._predictions
        if self.trainer.world_size > 1:
            parts: list[list[dict[str, Any]]] = [[] for _ in range(self.trainer.world_size)]
            dist.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        self._predictions = []
        if not self.trainer.is_global_zero:
            return
        rows.sort(key=lambda r: r["index"])
        labelled = [r for r in rows if "correct" in r]
        accuracy = sum(r["correct"] for r in labelled) / len(labelled) if labelled else None
        out_dir = self._predict_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / self.predictions_file
        with open(path, "w") as f:
            json.dump({"labels": list(self.label_names), "accuracy": accuracy,
                       "predictions": rows}, f, indent=1)
        _logger.info("%d predictions written to %s (accuracy %s)", len(rows), path, accuracy)

    def _predict_dir(self) -> Path:
        if self.hparams.predict_dir:
            return Path(self.hparams.predict_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions"
