"""The base task: backbone, momentum teacher, queues, ITC + ITM, optimizer and schedule.

Subclasses add their head, their loss and their metric; everything that must survive a
restart (student, teacher, queues, alpha, random generator) lives in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.profiler import record_function

from albef_pl.losses import itc_loss, itm_loss, sample_hard_negatives
from albef_pl.models import ALBEF, TextConfig, VisionConfig
from albef_pl.models.albef import Features, make_teacher
from albef_pl.momentum import FeatureQueue

_logger = logging.getLogger(__name__)

# Parameters that AdamW must not decay, besides every bias and every 1-d (norm) weight.
# Logit of a queue column not yet written (with ``empty_queue``): exp() of it is exactly 0
# in float32, and unlike -inf it gives 0, not NaN, when multiplied by a zero target.
EMPTY_LOGIT = -1.0e4
NO_DECAY_NAMES = ("pos_embed", "cls_token", "temp", "position_embeddings", "token_type_embeddings")


def _as_config(value: Any, cls: type) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    if value is None:
        return cls()
    raise TypeError(f"expected {cls.__name__} or a dict of its fields, got {type(value).__name__}")


class ALBEFTask(L.LightningModule):
    """Shared machinery of every ALBEF phase.

    Args:
        vision: image encoder configuration.
        text: text and fusion encoder configuration.
        embed_dim: contrastive embedding size.
        temp: initial learnable temperature.
        queue_size: number of past teacher features kept for ITC.
        empty_queue: start the queues empty and leave columns not yet written out of ITC.
        momentum: EMA coefficient of the teacher.
        alpha: final distillation weight.
        alpha_warmup: ramp alpha from 0 over the first epoch (see ``MomentumTeacher``).
        distill: use the teacher's soft targets (otherwise ground truth only).
        lr: peak learning rate.
        weight_decay: AdamW weight decay for weight matrices.
        min_lr: final learning rate of the cosine decay.
        warmup_lr: learning rate at step 0.
        warmup_steps: optimizer steps of linear warm-up.
        init_checkpoint: weights to start from (an official ALBEF ``.pth`` or one of ours).
        seed: seed of the task's own generator (masking, hard negatives).
        init_weights: load the pretrained BERT/ViT weights named in the configs.

    # NOTE: ``empty_queue: true`` is ours. The original fills its queues with random unit
    # vectors that serve as ITC negatives until overwritten. When the encoders start with
    # nearly identical features for every input (a ViT from scratch, the MiniLM text
    # encoder), the cheapest way to beat 1024+ random negatives is to map every image and
    # caption to one direction, and short runs then stay collapsed (in-batch retrieval at
    # exactly chance). Empty columns remove that pull. The default, ``false``, matches the
    # original for parity and for runs from pretrained DeiT/BERT.
    """

    #: Clamp the temperature to [0.001, 0.5] before each step (pre-training does).
    clamp_temp = True
    #: Keep an image-id queue (retrieval, grounding).
    queue_with_idx = False
    #: Build the ITC feature queues (tasks without ITC, such as SNLI-VE, have none).
    uses_queue = True
    #: Keep a momentum teacher (NLVR2 text assignment has none).
    uses_teacher = True

    def __init__(
        self,
        vision: VisionConfig | None = None,
        text: TextConfig | None = None,
        embed_dim: int = 256,
        temp: float = 0.07,
        queue_size: int = 65536,
        empty_queue: bool = False,
        momentum: float = 0.995,
        alpha: float = 0.4,
        alpha_warmup: bool = True,
        distill: bool = True,
        lr: float = 1e-4,
        weight_decay: float = 0.02,
        min_lr: float = 1e-5,
        warmup_lr: float = 1e-5,
        warmup_steps: int = 2000,
        init_checkpoint: str | None = None,
        seed: int = 42,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        vision = _as_config(vision, VisionConfig)
        text = _as_config(text, TextConfig)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"model.alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"model.momentum must be in [0, 1), got {momentum}")
        for name, value in (("lr", lr), ("warmup_lr", warmup_lr), ("min_lr", min_lr),
                            ("weight_decay", weight_decay), ("warmup_steps", warmup_steps)):
            if value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"model.{name} must be {'> 0' if name == 'lr' else '>= 0'}, "
                                 f"got {value}")
        if queue_size < 1 or embed_dim < 1:
            raise ValueError(f"model.queue_size and model.embed_dim must be >= 1, got "
                             f"{queue_size} and {embed_dim}")
        if init_checkpoint and not Path(init_checkpoint).is_file():
            raise FileNotFoundError(
                f"model.init_checkpoint: no file at {init_checkpoint}. Train or convert one "
                "first (e.g. `make pretrain-sample` for the COCO-sample recipes, or "
                "`albef-pl-convert ALBEF.pth ...`), or set it to null."
            )
        self.save_hyperparameters(ignore=["vision", "text"])
        self.hparams["vision"] = dataclasses.asdict(vision)
        self.hparams["text"] = dataclasses.asdict(text)

        self.model = ALBEF(vision, text, embed_dim, temp, init_weights=init_weights)
        self.configure_heads()
        self.teacher = make_teacher(self.model) if self.uses_teacher else None
        self.queue = (
            FeatureQueue(
                embed_dim, queue_size, with_idx=self.queue_with_idx, start_empty=empty_queue
            )
            if self.uses_queue
            else None
        )
        self.register_buffer("alpha", torch.tensor(0.0 if alpha_warmup else alpha))
        self._generator: torch.Generator | None = None
        if init_checkpoint:
            self.load_init_checkpoint(init_checkpoint)

    # ---- hooks for subclasses
    def configure_heads(self) -> None:
        """Add task heads to ``self.model`` before the teacher is copied from it."""

    def load_init_checkpoint(self, path: str) -> None:
        """Load starting weights (official ALBEF layout or ours) into this task."""
        from albef_pl.checkpoints import load_checkpoint_into_task
        from albef_pl.convert import WrongCheckpointError

        try:
            load_checkpoint_into_task(self, path)
        except WrongCheckpointError as err:  # the layout's name alone can hide the task's
            raise WrongCheckpointError(f"model.init_checkpoint of {type(self).__name__}: "
                                       f"{err}") from None

    # ---- randomness that survives a restart
    @property
    def generator(self) -> torch.Generator:
        """The task's generator for MLM masking and hard negatives."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self.hparams.seed + self.global_rank)
        return self._generator

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Every training batch draws its randomness (dropout, masking, hard negatives) from
        # generators seeded by (seed, rank, epoch, batch), so a run resumed from a checkpoint
        # continues with exactly the draws of an uninterrupted run, however many numbers
        # Lightning and the data loaders consumed in between.
        key = (self.hparams.seed, self.global_rank, self.current_epoch, batch_idx)
        seed = hash(key) % (2**63)
        torch.manual_seed(seed)
        self.generator.manual_seed(seed + 1)

    # ---- evaluation data that could not be read
    def on_validation_epoch_end(self) -> None:
        self.check_evaluation_data("val")

    def on_test_epoch_end(self) -> None:
        self.check_evaluation_data("test")

    def check_evaluation_data(self, split: str) -> None:
        """Stop with a :class:`~albef_pl.errors.DataError` naming the files when a whole
        evaluation pass decoded no image (every process together), instead of the run ending
        later on a missing metric. Data modules without a pass tally are not checked.
        Subclasses that override the epoch-end hooks call ``super()`` first."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        take = getattr(datamodule, "take_pass_tally", None)
        if take is None or trainer.sanity_checking:
            return
        counts = torch.tensor(take(split), dtype=torch.float32, device=self.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        datamodule.check_pass(split, int(counts[0]), int(counts[1]))

    def configure_callbacks(self):
        from albef_pl.callbacks import MomentumTeacher

        if not self.uses_teacher or any(
            isinstance(c, MomentumTeacher) for c in self.trainer.callbacks
        ):
            return []
        return [MomentumTeacher()]

    # ---- ITC + ITM, shared by pre-training, retrieval and grounding
    def contrastive_and_matching(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        idx: torch.Tensor | None = None,
        update_queue: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """ITC with the queue and ITM with in-batch hard negatives for one batch.

        Returns a dict with ``loss_itc``, ``loss_itm``, student and teacher
        :class:`Features` (``student``, ``teacher``) and ``sim_i2t`` (B, B + Q).
        """
        alpha = float(self.alpha) if self.hparams.distill else 0.0
        if self.clamp_temp:
            with torch.no_grad():
                self.model.temp.clamp_(0.001, 0.5)
        temp = self.model.temp

        # Student and teacher unimodal features.
        with record_function("albef/student_encoders"):
            s = self.model.features(image, input_ids, attention_mask)
        with torch.no_grad(), record_function("albef/teacher_encoders"):
            t = self.teacher.features(image, input_ids, attention_mask)
            image_feat_all = torch.cat([t.image_feat.float().T, self.queue.image_queue], dim=1)
            text_feat_all = torch.cat([t.text_feat.float().T, self.queue.text_queue], dim=1)
            idx_all = None if idx is None else torch.cat([idx.view(-1), self.queue_ids()])
            sim_i2t_m = t.image_feat.float() @ text_feat_all / temp  # (B, B + Q)
            sim_t2i_m = t.text_feat.float() @ image_feat_all / temp
            filled = self.queue.filled()  # None unless the queue started empty
            if filled is not None:
                empty = torch.cat([filled.new_zeros(t.text_feat.shape[0]), ~filled])
                sim_i2t_m = sim_i2t_m.masked_fill(empty, EMPTY_LOGIT)
                sim_t2i_m = sim_t2i_m.masked_fill(empty, EMPTY_LOGIT)

        # ITC: student features against [teacher batch; queue].
        sim_i2t = s.image_feat.float() @ text_feat_all / temp
        sim_t2i = s.text_feat.float() @ image_feat_all / temp
        if filled is not None:
            sim_i2t = sim_i2t.masked_fill(empty, EMPTY_LOGIT)
            sim_t2i = sim_t2i.masked_fill(empty, EMPTY_LOGIT)
        itc = itc_loss(sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, alpha, idx, idx_all)
        if update_queue:
            self.queue.enqueue(t.image_feat, t.text_feat, idx if self.queue.with_idx else None)

        # ITM: positives plus one hard negative per text and per image, in one fusion pass.
        b = image.shape[0]
        with record_function("albef/hard_negatives"):
            neg = sample_hard_negatives(
                sim_i2t[:, :b], sim_t2i[:, :b], idx,
                generator if generator is not None else self.generator,
            )
        vt, vi = neg.text_valid, neg.image_valid
        text_rows = torch.cat([torch.arange(b, device=self.device), torch.nonzero(vt)[:, 0],
                               neg.text_for_image[vi]])
        image_rows = torch.cat([torch.arange(b, device=self.device), neg.image_for_text[vt],
                                torch.nonzero(vi)[:, 0]])
        with record_function("albef/itm_fusion"):
            logits = self.model.itm_logits(
                s.text_embeds[text_rows], attention_mask[text_rows], s.image_embeds[image_rows]
            )
        loss_itm = itm_loss(logits[:b], logits[b:])
        return {
            "loss_itc": itc.loss,
            "loss_itm": loss_itm,
            "student": s,
            "teacher": t,
            "sim_i2t": sim_i2t,
            "itm_logits": logits,
        }

    def queue_ids(self) -> torch.Tensor:
        """(Q,) image ids of the queue columns; -100 (never a positive) without an id queue."""
        if self.queue.with_idx:
            return self.queue.idx_queue[0]
        return torch.full((self.queue.queue_size,), -100, dtype=torch.long, device=self.device)

    # ---- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight matrices decay; biases, norms, embeddings-of-position, class
        token and temperature do not.

        # NOTE: the original decays ``temp``, ``pos_embed`` and ``cls_token`` (it never asks the
        # ViT for its no-decay list); we follow timm and BERT practice and exempt them.
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAMES):
                no_decay.append(p)
            else:
                decay.append(p)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def lr_at(self, step: int, total_steps: int) -> float:
        """Linear warm-up from ``warmup_lr`` then cosine decay to ``min_lr``, per step.

        # NOTE: the original steps its cosine once per epoch and its warm-up every 100
        # iterations; a per-step schedule with the same end points is smoother and does not
        # depend on the epoch length.
        """
        h = self.hparams
        if step < h.warmup_steps:
            return h.warmup_lr + (h.lr - h.warmup_lr) * step / max(1, h.warmup_steps)
        progress = (step - h.warmup_steps) / max(1, total_steps - h.warmup_steps)
        progress = min(1.0, progress)
        return h.min_lr + 0.5 * (h.lr - h.min_lr) * (1 + math.cos(math.pi * progress))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.hparams.lr)
        total = int(self.trainer.estimated_stepping_batches)
        lr = self.hparams.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.lr_at(step, total) / lr
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def log_common(self, stage: str, batch_size: int) -> None:
        """Log alpha, temperature and learning rate under ``stage/``."""
        on_step = stage == "train"
        self.log(f"{stage}/alpha", float(self.alpha), on_step=on_step, batch_size=batch_size)
        self.log(f"{stage}/temp", self.model.temp.detach(), on_step=on_step, batch_size=batch_size)
        if stage == "train" and self._trainer is not None and self.trainer.optimizers:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("train/lr", lr, on_step=True, batch_size=batch_size)
