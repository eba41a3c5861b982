"""One LightningModule per phase, all built on :class:`ALBEFTask`."""

from albef_pl.tasks.base import ALBEFTask
from albef_pl.tasks.pretrain import PretrainTask

__all__ = ["ALBEFTask", "PretrainTask"]
