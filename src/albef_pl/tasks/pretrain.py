"""Pre-training: ITC + ITM + MLM (optionally weighted) with momentum distillation."""

from __future__ import annotations

from typing import Any

import torch
from torch.profiler import record_function

from albef_pl.losses import IGNORE_INDEX, mask_tokens, mlm_loss
from albef_pl.tasks.base import ALBEFTask


class PretrainTask(ALBEFTask):
    """ALBEF pre-training: ``loss = w_itc * ITC + w_itm * ITM + w_mlm * MLM`` (all weights 1 in ALBEF).

    Args:
        mlm_probability: fraction of (non-special) tokens masked for MLM.
        mask_token_id: id of [MASK] (103 in bert-base-uncased).
        special_token_ids: ids never masked ([PAD], [CLS], [SEP]).
        loss_weights: weight of each loss in the sum, ``{itc, itm, mlm}``; a loss not named
            keeps 1.0. ALBEF weighs all three 1.0 (the default). The CPU demo lowers MLM (see
            ``conf/demo.yaml``). The logged ``loss_itc/itm/mlm`` are unweighted.
        **kwargs: see :class:`ALBEFTask`.
    """

    LOSSES = ("itc", "itm", "mlm")

    def __init__(
        self,
        *args: Any,
        mlm_probability: float = 0.15,
        mask_token_id: int = 103,
        special_token_ids: tuple[int, ...] = (0, 101, 102),
        loss_weights: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"model.mlm_probability must be in (0, 1), got {mlm_probability}")
        weights = dict(loss_weights or {})
        unknown = sorted(set(weights) - set(self.LOSSES))
        if unknown:
            raise ValueError(f"model.loss_weights: unknown loss {unknown}; the losses are "
                             f"{list(self.LOSSES)}")
        if any(not (isinstance(w, (int, float)) and 0 <= w <= 1e6) for w in weights.values()):
            # also refuses NaN and inf, and weights whose loss would overflow float16/bf16 sums
            raise ValueError(f"model.loss_weights must be numbers in [0, 1e6], got {weights}")
        if weights and not any(weights.get(name, 1.0) > 0 for name in self.LOSSES):
            raise ValueError("model.loss_weights are all 0: nothing would be trained")
        super().__init__(*args, **kwargs)
        self.save_hyperparameters("mlm_probability", "mask_token_id", "special_token_ids",
                                  "loss_weights")
        self.loss_weights = {name: float(weights.get(name, 1.0)) for name in self.LOSSES}

    def mlm(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        out: dict[str, Any],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Mask, predict with image context, distil from the teacher."""
        with record_function("albef/mlm"):
            return self._mlm(input_ids, attention_mask, out, generator)

    def _mlm(self, input_ids, attention_mask, out, generator) -> torch.Tensor:
        h = self.hparams
        masked, labels = mask_tokens(
            input_ids,
            self.model.bert_config.vocab_size,
            h.mask_token_id,
            tuple(h.special_token_ids),
            h.mlm_probability,
            generator,
        )
        positions = labels != IGNORE_INDEX  # (B, L); logits only where a label exists
        logits = self.model.mlm_logits(
            masked, attention_mask, out["student"].image_embeds, positions
        )  # (P, V)
        alpha = float(self.alpha) if h.distill else 0.0
        soft = None
        if alpha > 0:
            with torch.no_grad():
                soft = self.teacher.mlm_logits(
                    masked, attention_mask, out["teacher"].image_embeds, positions
                ).float().softmax(dim=-1)
        return mlm_loss(logits, labels[positions], soft, alpha)

    def step(self, batch: dict[str, torch.Tensor], stage: str, batch_idx: int) -> torch.Tensor:
        train = stage == "train"
        # Validation draws its masks and negatives from a fixed per-batch generator so that
        # validation numbers are comparable between epochs and do not disturb training.
        gen = self.generator if train else torch.Generator(self.device).manual_seed(batch_idx)
        image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        out = self.contrastive_and_matching(
            image, ids, mask, None, train, gen
        )
        loss_mlm = self.mlm(ids, mask, out, gen)
        w = self.loss_weights
        loss = w["itc"] * out["loss_itc"] + w["itm"] * out["loss_itm"] + w["mlm"] * loss_mlm

        b = image.shape[0]
        on_step = train
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=b)
        for name, value in (("itc", out["loss_itc"]), ("itm", out["loss_itm"]), ("mlm", loss_mlm)):
            self.log(f"{stage}/loss_{name}", value, on_step=on_step, on_epoch=True, batch_size=b)
        with torch.no_grad():  # in-batch image->text top-1 of the student: learning made visible
            s = out["student"]
            top = (s.image_feat @ s.text_feat.T).argmax(1)
            image_id = batch.get("image_id")
            if image_id is not None:  # any caption of the same image counts (COCO has five)
                acc = image_id[top].eq(image_id)
            else:
                acc = top.eq(torch.arange(b, device=self.device))
            # ITM balanced accuracy: the mean of the recall on matches and on hard negatives,
            # so a head that always answers "no match" scores 0.5 (plain accuracy: 2/3).
            pred = out["itm_logits"].argmax(1)
            neg = pred[b:] if len(pred) > b else pred.new_zeros(1)  # no negative: count as 1
            itm_acc = 0.5 * (pred[:b].eq(1).float().mean() + neg.eq(0).float().mean())
        self.log(f"{stage}/itc_acc_i2t", acc.float().mean(), on_step=False, on_epoch=True,
                 batch_size=b)
        self.log(f"{stage}/itm_acc", itm_acc, on_step=False, on_epoch=True, batch_size=b)
        self.log_common(stage, b)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.step(batch, "train", batch_idx)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.step(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.step(batch, "test", batch_idx)
