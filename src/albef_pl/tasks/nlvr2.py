"""NLVR2: is a sentence true of a pair of images? Text-assignment pre-training, then the
fine-tune.

Both phases read two images at once. The fusion layers come in pairs (a
:class:`~albef_pl.models.text.PairFusionEncoder`): layer ``2j`` cross-attends to the left
image and layer ``2j + 1`` to the right one, both start from pre-trained fusion layer ``j``,
and the two share their cross-attention key and value. Both images go through the ViT in one
batch, ``[lefts; rights]``, and are split after.

* :class:`NLVR2TextAssignmentTask` (the original ``Pretrain_nlvr.py``): from image-caption
  pairs, build two-image inputs whose caption belongs to the left image (label 0), the right
  image (1) or neither (2), negatives drawn among the batch's images by visual similarity;
  a three-way ``ta_head`` on the fused [CLS]; cross-entropy.
* :class:`NLVR2Task` (``NLVR.py``): a two-way classifier on the fused [CLS] (False 0,
  True 1), cross-entropy distilled from the momentum teacher exactly as SNLI-VE, alpha 0.4
  ramped over the first epoch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from albef_pl.models.albef import ALBEF
from albef_pl.models.text import PairFusionEncoder
from albef_pl.tasks.base import ALBEFTask
from albef_pl.tasks.ve import VisualEntailmentTask

_logger = logging.getLogger(__name__)

__all__ = ["LABEL_NAMES", "NLVR2Task", "NLVR2TextAssignmentTask", "encode_image_pair",
           "pair_fusion_layers", "sample_text_assignment"]

#: Name of each NLVR2 class index, as the original numbers them (label 1 if "True").
LABEL_NAMES: tuple[str, ...] = ("False", "True")
#: Text-assignment labels: the caption describes the left image, the right one, or neither.
TA_LEFT, TA_RIGHT, TA_NEITHER = 0, 1, 2
# Floor of a negative-sampling weight; see sample_text_assignment.
MIN_WEIGHT = 1e-12


def pair_fusion_layers(model: ALBEF) -> None:
    """Replace ``model``'s fusion encoder by a pair encoder with twice the layers, layers
    ``2j`` and ``2j + 1`` copied from layer ``j`` (BERT's, or random, until a checkpoint is
    loaded over them)."""
    single = model.fusion_encoder
    pair = PairFusionEncoder(model.bert_config, 2 * len(single.layers), model.vision_width,
                             single.grad_checkpointing)
    pair.duplicate_from(single)
    model.fusion_encoder = pair


def encode_image_pair(model: ALBEF, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2, 3, H, W) image pairs -> the (B, N, Dv) tokens of the left and right images,
    from one ViT pass over ``[lefts; rights]``."""
    b = image.shape[0]
    tokens = model.encode_image(torch.cat([image[:, 0], image[:, 1]]))  # (2B, N, Dv)
    return tokens[:b], tokens[b:]


class NLVR2Task(VisualEntailmentTask):
    """ALBEF fine-tuned for NLVR2: is the sentence true of the (left, right) image pair?

    Training, evaluation (``val/acc``, ``test/acc``) and ``predict``
    (``nlvr2_predictions.json``) are SNLI-VE's with two classes and two images per sample.

    Args:
        alpha: distillation weight (0.4).
        alpha_warmup: ramp alpha from 0 over the first epoch (the original's ``warm_up: True``).
        lr: peak learning rate (2e-5 in the paper).
        min_lr: final learning rate of the cosine decay.
        warmup_lr: learning rate at step 0.
        warmup_steps: warm-up optimizer steps (the original warms up over 100 iterations).
        predict_dir: folder for ``predict``'s ``nlvr2_predictions.json``; default
            ``<log dir>/predictions``.
        **kwargs: see :class:`ALBEFTask`. ``text`` describes the pre-trained BERT (12 layers,
            6 text-only for BERT-base); the task doubles its fusion layers.

    Starting weights (``init_checkpoint``): a text-assignment checkpoint (the original's
    ``pretrain_model_nlvr.pth`` or one of :class:`NLVR2TextAssignmentTask`), or a pre-training
    checkpoint (each fusion layer then fills both layers of its pair, as text assignment
    does; our shortcut, the original always goes through text assignment).

    # NOTE: the original NLVR.py copies the student into the momentum model *before* loading
    # the text-assignment weights, which hold no momentum copies: its teacher starts from BERT
    # and a random ViT. Here the teacher starts from the loaded student (albef_pl.convert
    # fills a teacher from the student whenever the checkpoint has none), as LAVIS does.
    """

    official_layout = "nlvr2"
    num_classes = len(LABEL_NAMES)
    label_names = LABEL_NAMES
    predictions_file = "nlvr2_predictions.json"

    def __init__(
        self,
        *args: Any,
        alpha: float = 0.4,
        alpha_warmup: bool = True,
        lr: float = 2e-5,
        min_lr: float = 1e-6,
        warmup_lr: float = 1e-5,
        warmup_steps: int = 100,
        predict_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args, alpha=alpha, alpha_warmup=alpha_warmup, lr=lr, min_lr=min_lr,
            warmup_lr=warmup_lr, warmup_steps=warmup_steps, predict_dir=predict_dir, **kwargs,
        )

    def configure_heads(self) -> None:
        super().configure_heads()  # the classifier (two classes); unused heads removed
        pair_fusion_layers(self.model)

    @staticmethod
    def classify(
        model: ALBEF,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, 2) logits (False, True) of ``model`` for (B, 2, 3, H, W) image pairs."""
        # Both images in one ViT pass, then the sentence alone.
        left, right = encode_image_pair(model, image)  # (B, N, Dv) each
        text_embeds = model.encode_text(input_ids, attention_mask)  # (B, L, D)

        # Even fusion layers attend to the left image, odd ones to the right.
        fused = model.fuse(text_embeds, attention_mask, (left, right))  # (B, L, D)
        return model.cls_head(model.pool(fused, attention_mask))

    @staticmethod
    def entry_fields(batch: dict[str, Any], i: int) -> dict[str, Any]:
        return {"images": list(batch["image_paths"][i]), "sentence": batch["sentence"][i]}


def sample_text_assignment(
    image_feat: torch.Tensor,
    generator: torch.Generator | None = None,
    temp: float = 0.07,
    image_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the two-image inputs of text assignment for a batch of image-caption pairs.

    For caption ``b``: with probability 1/3 each, (image ``b``, another image) is label 0,
    (another image, image ``b``) label 1, and (two other images) label 2. Other images are
    drawn from ``softmax(image_feat @ image_feat.T / temp)`` with the diagonal zeroed
    (similar images are likelier), two of them without replacement.

    # NOTE: the original draws "two others" with probability 1/3, else left or right with
    # probability 1/2 each; one draw of three equally likely kinds is the same distribution.
    # It crashes when a row has fewer non-zero weights than draws (a batch of two, or
    # similarities so peaked that the others underflow to 0); here each other image keeps a
    # weight of at least 1e-12, and a row with one other image draws only labels 0 and 1.
    # NOTE: a batch can hold one picture several times (COCO has five captions per image);
    # the original can then draw a caption's own picture as its "other image" and teach a
    # wrong label. Given ``image_ids``, pictures of the caption's own image id are never
    # drawn; a row where every other image has its id (a batch of one picture) falls back to
    # the other batch positions, as the original.

    Args:
        image_feat: (B, E) image features (unit-norm ``vision_proj`` of the image [CLS]).
        generator: random generator (the task's, for resumable draws).
        temp: temperature of the similarity softmax (fixed at 0.07 in the original).
        image_ids: optional (B,) image ids (negative: unknown); images sharing a caption's
            known id are not drawn as its other images.

    Returns:
        ``left`` and ``right`` (B,) indices into the batch's images, and ``labels`` (B,).

    Raises:
        ValueError: a batch of one image (there is no other image to draw).
    """
    b = image_feat.shape[0]
    if b < 2:
        raise ValueError("text assignment needs at least 2 images per batch to draw "
                         f"negatives from, got {b}")
    device = image_feat.device
    with torch.no_grad():
        feat = image_feat.detach().float()
        weights = (feat @ feat.T / temp).softmax(dim=1)  # (B, B)
        others = ~torch.eye(b, dtype=torch.bool, device=device)
        allowed = others
        if image_ids is not None:
            ids = image_ids.to(device).view(-1)
            same = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
            allowed = others & ~same
            allowed = torch.where(allowed.any(1, keepdim=True), allowed, others)
        n_allowed = allowed.sum(1)  # >= 1 per row
        weights = torch.where(allowed, weights.clamp_min(MIN_WEIGHT), 0.0)
        first = torch.multinomial(weights, 1, generator=generator)[:, 0]
        # Second other image, without replacement; a row with one allowed image repeats it
        # (unused: such a row draws label 0 or 1 only).
        rest = weights.scatter(1, first[:, None], 0.0)
        rest = torch.where((n_allowed > 1)[:, None], rest,
                           torch.zeros_like(rest).scatter(1, first[:, None], 1.0))
        second = torch.multinomial(rest, 1, generator=generator)[:, 0]
        # One draw in 0..5 gives a uniform label over 3 kinds, or over 2 where only one
        # other image is allowed.
        draw = torch.randint(0, 6, (b,), generator=generator, device=device)
        labels = torch.where(n_allowed > 1, draw % 3, draw % 2)

    own = torch.arange(b, device=device)
    left = torch.where(labels == TA_LEFT, own, first)
    right = torch.where(labels == TA_LEFT, first, torch.where(labels == TA_RIGHT, own, second))
    return left, right, labels


class NLVR2TextAssignmentTask(ALBEFTask):
    """NLVR2's text-assignment pre-training on image-caption pairs (``Pretrain_nlvr.py``).

    Batches are those of :class:`~data_modules.PretrainDataModule` (``image``,
    ``input_ids``, ``attention_mask``). Every caption is paired with two images built by
    :func:`sample_text_assignment`, the pair goes through the two-image fusion, and
    ``ta_head`` = Linear(D, 3) on the fused [CLS] (or ``text.pooling``) says which image the
    caption describes. Loss: cross-entropy. Logged: ``{train,val}/loss``, ``{train,val}/acc``.

    Args:
        ta_temp: temperature of the negative-sampling softmax (0.07, fixed in the original).
        lr: peak learning rate (2e-5).
        min_lr: final learning rate of the cosine decay (1e-5 in the original).
        warmup_lr: learning rate at step 0.
        warmup_steps: warm-up optimizer steps (100 iterations in the original).
        **kwargs: see :class:`ALBEFTask` (``queue_size``, ``momentum``, ``alpha`` and
            ``distill`` are accepted and unused: this phase has no queue and no teacher).

    # NOTE: as in the original, the projections and the temperature are kept (an official
    # ``pretrain_model_nlvr.pth`` holds them) and only ``vision_proj`` is used, without
    # gradient, to draw negatives. The original leaves them trainable but gives them no
    # gradient, so they never change; here they are frozen, which changes nothing in the
    # weights and lets DDP run without ``find_unused_parameters``. The MLM and ITM heads are
    # removed, as the original's model has none.
    """

    official_layout = "nlvr2_ta"
    uses_queue = False
    uses_teacher = False
    clamp_temp = False

    def __init__(
        self,
        *args: Any,
        ta_temp: float = 0.07,
        lr: float = 2e-5,
        min_lr: float = 1e-5,
        warmup_lr: float = 1e-5,
        warmup_steps: int = 100,
        **kwargs: Any,
    ) -> None:
        if ta_temp <= 0:
            raise ValueError(f"model.ta_temp must be > 0, got {ta_temp}")
        super().__init__(*args, lr=lr, min_lr=min_lr, warmup_lr=warmup_lr,
                         warmup_steps=warmup_steps, **kwargs)
        self.save_hyperparameters("ta_temp")
        self.train_acc = MulticlassAccuracy(3, average="micro")
        self.val_acc = MulticlassAccuracy(3, average="micro")

    def configure_heads(self) -> None:
        self.model.ta_head = nn.Linear(self.model.hidden_size, 3)
        self.model.mlm_head = None
        self.model.itm_head = None
        for module in (self.model.vision_proj, self.model.text_proj):
            module.requires_grad_(False)
        self.model.temp.requires_grad_(False)
        pair_fusion_layers(self.model)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3) text-assignment logits and their (B,) labels for image-caption pairs.

        ``image_ids`` (the data's ``image_id``, when it has one) keep a caption's own picture
        out of its negatives.
        """
        model = self.model
        image_embeds = model.encode_image(image)  # (B, N, Dv)
        text_embeds = model.encode_text(input_ids, attention_mask)  # (B, L, D)

        # Negatives by visual similarity (no gradient), then the image pair of each caption.
        with torch.no_grad():
            feat = F.normalize(model.vision_proj(image_embeds[:, 0]).float(), dim=-1)
        left, right, labels = sample_text_assignment(feat, generator, self.hparams.ta_temp,
                                                      image_ids)

        fused = model.fuse(text_embeds, attention_mask,
                           (image_embeds[left], image_embeds[right]))  # (B, L, D)
        return model.ta_head(model.pool(fused, attention_mask)), labels

    def step(self, batch: dict[str, Any], stage: str, batch_idx: int) -> torch.Tensor:
        # Validation draws from a fixed per-batch generator, so epochs compare.
        gen = (self.generator if stage == "train"
               else torch.Generator(self.device).manual_seed(batch_idx))
        logits, labels = self(batch["image"], batch["input_ids"], batch["attention_mask"], gen,
                              batch.get("image_id"))
        loss = F.cross_entropy(logits.float(), labels)

        b = labels.shape[0]
        train = stage == "train"
        metric = self.train_acc if train else self.val_acc
        metric(logits.detach().argmax(1), labels)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=train, on_epoch=True,
                 batch_size=b)
        self.log(f"{stage}/acc", metric, on_step=train, on_epoch=True, batch_size=b)
        if train and self._trainer is not None and self.trainer.optimizers:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("train/lr", lr, on_step=True, batch_size=b)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.step(batch, "train", batch_idx)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.step(batch, "val", batch_idx)
