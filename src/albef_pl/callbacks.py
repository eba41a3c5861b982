"""The momentum teacher's schedule as a Lightning callback."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from albef_pl.momentum import ema_update

_logger = logging.getLogger(__name__)


class MomentumTeacher(Callback):
    """Updates the EMA teacher once per optimizer step and ramps the distillation weight.

    Guarded on ``trainer.global_step``: under gradient accumulation the teacher moves once per
    optimizer step, not once per micro-batch, and after a resume it continues from the
    restored step.

    # NOTE: the original updates the teacher at the start of every forward; updating right
    # after each optimizer step instead gives the same teacher at every forward (the update at
    # the very first forward is a no-op there, since teacher and student start equal).

    Args:
        momentum: EMA coefficient; defaults to the task's ``momentum`` (0.995).
        alpha: final distillation weight; defaults to the task's ``alpha`` (0.4).
        alpha_ramp_steps: optimizer steps over which alpha rises linearly from 0. ``None``
            ramps over the first epoch, as the original; 0 disables the ramp.
    """

    def __init__(
        self,
        momentum: float | None = None,
        alpha: float | None = None,
        alpha_ramp_steps: int | None = None,
    ) -> None:
        self.momentum = momentum
        self.alpha = alpha
        self.alpha_ramp_steps = alpha_ramp_steps
        self.last_step = 0
        self.updates = 0

    def _ramp_steps(self, trainer: L.Trainer) -> int:
        if self.alpha_ramp_steps is not None:
            return self.alpha_ramp_steps
        batches = trainer.num_training_batches
        if batches == float("inf"):
            raise ValueError(
                "MomentumTeacher ramps alpha over the first epoch, but the training data has no "
                "length: give the data module a sample count or set alpha_ramp_steps"
            )
        return max(1, int(batches) // trainer.accumulate_grad_batches)

    def alpha_at(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Distillation weight for the coming step."""
        target = self.alpha if self.alpha is not None else float(pl_module.hparams.alpha)
        if not getattr(pl_module.hparams, "alpha_warmup", True):
            return target
        ramp = self._ramp_steps(trainer)
        if ramp <= 0:
            return target
        return target * min(1.0, trainer.global_step / ramp)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        pl_module.alpha.fill_(self.alpha_at(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        if trainer.global_step <= self.last_step:
            return  # accumulating: no optimizer step happened on this batch
        if getattr(pl_module, "teacher", None) is None:  # a task without teacher
            self.last_step = trainer.global_step
            return
        m = self.momentum if self.momentum is not None else float(pl_module.hparams.momentum)
        ema_update(pl_module.teacher, pl_module.model, m)
        self.last_step = trainer.global_step
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "updates": self.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict.get("last_step", 0))
        self.updates = int(state_dict.get("updates", 0))
