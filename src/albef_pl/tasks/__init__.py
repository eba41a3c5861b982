"""One LightningModule per phase, all built on :class:`ALBEFTask`."""

from albef_pl.tasks.base import ALBEFTask
from albef_pl.tasks.nlvr2 import NLVR2Task, NLVR2TextAssignmentTask
from albef_pl.tasks.pretrain import PretrainTask
from albef_pl.tasks.ve import VisualEntailmentTask
from albef_pl.tasks.vqa import VQATask

__all__ = ["ALBEFTask", "NLVR2Task", "NLVR2TextAssignmentTask", "PretrainTask",
           "VisualEntailmentTask", "VQATask"]
