"""A new task in a few lines: ITC + ITM from the base task, plus a head and a loss of its own.

Run it on the demo data (``make shards-demo`` first):

    PYTHONPATH=examples albef-pl fit --config conf/demo.yaml --model.class_path custom_task.MyTask
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from albef_pl.tasks import ALBEFTask


class MyTask(ALBEFTask):
    """ITC + ITM, plus a toy head predicting whether a caption has more than eight tokens."""

    def configure_heads(self) -> None:
        # Added before the teacher is copied, so the teacher gets a copy too.
        self.model.length_head = torch.nn.Linear(self.model.hidden_size, 2)

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self.contrastive_and_matching(
            batch["image"], batch["input_ids"], batch["attention_mask"],
            update_queue=stage == "train",
        )
        long_caption = (batch["attention_mask"].sum(1) > 8).long()
        logits = self.model.length_head(out["student"].text_embeds[:, 0])
        loss_len = F.cross_entropy(logits, long_caption)
        loss = out["loss_itc"] + out["loss_itm"] + loss_len
        b = batch["image"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=b)
        self.log(f"{stage}/loss_length", loss_len, batch_size=b)
        return loss

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.step(batch, "val")
