"""VQA v2: answer a question about an image by ranking a fixed list of candidate answers.

The question attends to the image in the fusion layers; its fused states feed an answer
decoder (causal self-attention, cross-attention to the question states, an LM head tied to
its own word embeddings), which starts from the fusion layers, the text embeddings and the
MLM head, as in the original ``VQA.py``. Training maximises the likelihood of each human
answer (``[CLS] answer [SEP]``), distilled from the momentum teacher and weighted by how
many annotators gave it; inference ranks the candidate list (``rank_answer``). There is no
ITC, ITM, MLM or queue.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from albef_pl.losses import answer_nll, vqa_loss
from albef_pl.metrics import vqa_accuracy
from albef_pl.models.albef import ALBEF
from albef_pl.models.text import AnswerDecoder, init_bert_weights
from albef_pl.tasks.base import ALBEFTask

_logger = logging.getLogger(__name__)

__all__ = ["VQATask", "copy_matching"]


def copy_matching(dst: nn.Module, src: nn.Module) -> list[str]:
    """Copy every tensor of ``src`` whose name and shape exist in ``dst``; return the names of
    ``dst`` left as they were."""
    source = src.state_dict()
    left = []
    with torch.no_grad():
        for name, value in dst.state_dict().items():
            if name in source and source[name].shape == value.shape:
                value.copy_(source[name])
            else:
                left.append(name)
    return left


class VQATask(ALBEFTask):
    """ALBEF fine-tuned for VQA as answer generation over a candidate list.

    Args:
        decoder_layers: answer-decoder layers (6 in the paper); layer ``j`` starts from
            fusion layer ``j``.
        k_test: candidates re-scored with the full decoder per question (128 in the paper).
        alpha: distillation weight (0.4), ramped from 0 over the first epoch
            (``alpha_warmup``, the original's ``warm_up: True``).
        lr: peak learning rate (2e-5 in the paper).
        min_lr: final learning rate of the cosine decay.
        warmup_lr: learning rate at step 0.
        warmup_steps: warm-up optimizer steps (the original: 400 iterations).
        result_dir: folder of ``vqa_result.json`` (test and predict); default
            ``<log dir>/results``.
        **kwargs: see :class:`ALBEFTask` (``embed_dim``, ``temp``, ``queue_size`` and
            ``empty_queue`` are accepted and unused: this task has no contrastive part).
    """

    #: Layout of the original's ``model_vqa.ALBEF`` for albef_pl.convert.
    official_layout = "vqa"
    uses_queue = False
    clamp_temp = False

    def __init__(
        self,
        *args: Any,
        decoder_layers: int = 6,
        k_test: int = 128,
        alpha: float = 0.4,
        alpha_warmup: bool = True,
        lr: float = 2e-5,
        min_lr: float = 1e-6,
        warmup_lr: float = 1e-5,
        warmup_steps: int = 400,
        result_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if decoder_layers < 1 or k_test < 1:
            raise ValueError(f"model.decoder_layers and model.k_test must be >= 1, got "
                             f"{decoder_layers} and {k_test}")
        self._decoder_layers = decoder_layers  # read by configure_heads inside super()
        super().__init__(
            *args, alpha=alpha, alpha_warmup=alpha_warmup, lr=lr, min_lr=min_lr,
            warmup_lr=warmup_lr, warmup_steps=warmup_steps, **kwargs,
        )
        self.save_hyperparameters("decoder_layers", "k_test", "result_dir")
        self.val_acc = MeanMetric()
        self.test_acc = MeanMetric()
        self._candidates: tuple[list[str], torch.Tensor, torch.Tensor] | None = None
        self._results: list[dict[str, Any]] = []

    def configure_heads(self) -> None:
        # NOTE: the original's VQA model keeps only the encoders and the decoder (no
        # projections, ITM head, MLM head, temperature or queues); they are removed here,
        # before the teacher is copied, so DDP finds no parameter without a gradient.
        # The decoder starts from the model as it stands: embeddings from the text
        # encoder's, layer j from fusion layer j (cross-attention included where the widths
        # agree), LM head from the MLM head. With an official or our pre-training checkpoint
        # (model.init_checkpoint) albef_pl.convert then does exactly what VQA.py does. From
        # BERT weights alone the original's decoder would hold BERT layers 0..5 instead.
        m = self.model
        decoder = AnswerDecoder(m.bert_config, self._decoder_layers,
                                m.text_encoder.grad_checkpointing)
        init_bert_weights(decoder)
        fresh = copy_matching(decoder.embeddings, m.text_encoder.embeddings)
        fusion = m.fusion_encoder.layers
        for j, layer in enumerate(decoder.layers):
            if j < len(fusion):
                fresh += [f"layers.{j}.{n}" for n in copy_matching(layer, fusion[j])]
        fresh += [f"lm_head.{n}" for n in copy_matching(decoder.lm_head, m.mlm_head)]
        if fresh:
            _logger.info("answer decoder: %d tensors not taken from the encoder (fresh), "
                         "e.g. %s", len(fresh), fresh[:4])
        m.answer_decoder = decoder
        for name in ("mlm_head", "vision_proj", "text_proj", "itm_head"):
            setattr(m, name, None)
        m.temp = None

    # ---- forward
    @staticmethod
    def encode_question(
        model: ALBEF, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, Lq, D) question states of ``model`` (the student or the teacher)."""
        image_embeds = model.encode_image(image)  # (B, N, Dv)
        text_embeds = model.encode_text(input_ids, attention_mask)  # (B, Lq, D)
        return model.fuse(text_embeds, attention_mask, image_embeds)

    @classmethod
    def answer_logits(
        cls, model: ALBEF, batch: dict[str, Any]
    ) -> torch.Tensor:
        """(N, La, V) decoder logits of every answer of the batch, each answer attending to
        its own question's states."""
        q_states = cls.encode_question(model, batch["image"], batch["input_ids"],
                                       batch["attention_mask"])
        counts = batch["answer_counts"]
        q_states = q_states.repeat_interleave(counts, dim=0)  # (N, Lq, D)
        q_mask = batch["attention_mask"].repeat_interleave(counts, dim=0)
        return model.answer_decoder(batch["answer_ids"], batch["answer_mask"], q_states, q_mask)

    @staticmethod
    def rank_answer(
        model: ALBEF,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        k: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank candidate answers for each question, as the original does.

        The first answer token's probability (one decoder step from [CLS]) picks the ``k``
        most likely candidates; each is then scored with the full decoder.

        Args:
            model: the student (or teacher).
            question_states: (B, Lq, D) fused question states.
            question_mask: (B, Lq) question mask.
            answer_ids: (N, La) tokenised candidates ``[CLS] .. [SEP] [PAD]``.
            answer_mask: (N, La) their mask.
            k: candidates kept after the first token (clipped to N).

        Returns:
            (B, k) candidate indices, best first, and their (B, k) scores
            ``log p(first token) + log p(whole answer)``.
        """
        b, n = question_states.shape[0], answer_ids.shape[0]
        k = min(k, n)

        # One step from [CLS]: log-probability of each candidate's first token, (B, N).
        start = answer_ids[:1, :1].expand(b, 1)
        first = model.answer_decoder(start, torch.ones_like(start), question_states,
                                     question_mask)[:, 0]
        first_logp = F.log_softmax(first.float(), dim=-1)[:, answer_ids[:, 1]]
        top_logp, top_ids = first_logp.topk(k, dim=1)  # (B, k)

        # The k candidates of each question in one block: (B * k, La).
        # NOTE: like the original, this materialises (B * k, La, V) logits in one pass; at the
        # paper's 16 questions x 128 candidates that is about 1 GB in bf16.
        ids = answer_ids[top_ids].flatten(0, 1)
        mask = answer_mask[top_ids].flatten(0, 1)
        states = question_states.repeat_interleave(k, dim=0)
        q_mask = question_mask.repeat_interleave(k, dim=0)
        logits = model.answer_decoder(ids, mask, states, q_mask)
        seq_logp = -answer_nll(logits, ids, mask).view(b, k)

        # NOTE: as in the original, the first token's log-probability is counted twice (it
        # is also part of seq_logp). The original then softmaxes the k scores; the order,
        # and so the answer, is the same.
        scores = top_logp + seq_logp
        order = scores.argsort(dim=1, descending=True)
        return top_ids.gather(1, order), scores.gather(1, order)

    # ---- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if "image" not in batch:  # every image of the batch was unreadable (already counted)
            return None
        logits = self.answer_logits(self.model, batch)
        alpha = float(self.alpha) if self.hparams.distill else 0.0
        teacher_logits = None
        if alpha > 0:
            with torch.no_grad():
                teacher_logits = self.answer_logits(self.teacher, batch)
        per_answer = answer_nll(logits, batch["answer_ids"], batch["answer_mask"],
                                teacher_logits, alpha)
        b = batch["image"].shape[0]
        loss = vqa_loss(per_answer, batch["answer_weights"], b)

        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=b)
        self.log("train/alpha", alpha, on_step=True, batch_size=b)
        if self._trainer is not None and self.trainer.optimizers:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("train/lr", lr, on_step=True, batch_size=b)
        return loss

    # ---- evaluation
    def set_answer_candidates(
        self, answers: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> None:
        """The candidate list ranked at evaluation (``answer_list.json`` tokenised)."""
        if len(answers) != input_ids.shape[0]:
            raise ValueError(f"{len(answers)} answers but {input_ids.shape[0]} token rows")
        self._candidates = (list(answers), input_ids, attention_mask)

    def _load_candidates(self) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "answer_candidates"):
            c = dm.answer_candidates()
            self.set_answer_candidates(c["answers"], c["input_ids"], c["attention_mask"])
        elif self._candidates is None:
            raise ValueError("VQA evaluation needs candidate answers: use data_modules.vqa."
                             "VQADataModule or call set_answer_candidates()")

    def predict_answers(self, batch: dict[str, Any]) -> list[str]:
        """The best candidate answer of each question of the batch (student model)."""
        answers, ids, mask = self._candidates
        ids, mask = ids.to(self.device), mask.to(self.device)
        states = self.encode_question(self.model, batch["image"], batch["input_ids"],
                                      batch["attention_mask"])
        top_ids, _ = self.rank_answer(self.model, states, batch["attention_mask"], ids, mask,
                                      self.hparams.k_test)
        return [answers[i] for i in top_ids[:, 0].tolist()]

    def _evaluate(self, batch: dict[str, Any], stage: str) -> list[dict[str, Any]]:
        if "image" not in batch:
            return []
        predicted = self.predict_answers(batch)
        scores = [vqa_accuracy(p, truth) for p, truth in zip(predicted, batch["answers"])
                  if truth]
        if stage in ("val", "test") and scores:
            metric = self.val_acc if stage == "val" else self.test_acc
            metric.update(torch.tensor(scores, device=self.device))
            self.log(f"{stage}/vqa_acc", metric, on_epoch=True, prog_bar=True,
                     batch_size=len(scores))
        return [{"question_id": q, "answer": a}
                for q, a in zip(batch["question_id"], predicted)]

    def on_validation_epoch_start(self) -> None:
        self._load_candidates()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_test_epoch_start(self) -> None:
        self._load_candidates()
        self._results = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._results.extend(self._evaluate(batch, "test"))

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._write_results("test")

    def on_predict_epoch_start(self) -> None:
        self._load_candidates()
        self._results = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        rows = self._evaluate(batch, "predict")
        self._results.extend(rows)
        return rows

    def on_predict_epoch_end(self) -> None:
        self._write_results("predict")

    def _write_results(self, split: str) -> None:
        """``vqa_result.json`` = [{question_id, answer}] for the EvalAI server."""
        rows = self._results
        if self.trainer.world_size > 1:
            parts: list[list[dict[str, Any]]] = [[] for _ in range(self.trainer.world_size)]
            dist.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        self._results = []
        if not self.trainer.is_global_zero:
            return
        rows += self._answers_for_unread(split, rows)
        out_dir = self._result_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "vqa_result.json"
        with open(path, "w") as f:
            json.dump(rows, f)
        _logger.info("%d answers written to %s", len(rows), path)

    def _answers_for_unread(self, split: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows for questions of the data module's ``split`` that have no answer yet.

        Questions whose image could not be decoded are dropped from their batch; EvalAI wants
        an answer for every question, so each gets the first candidate of the answer list
        (a guess, counted in a warning).
        """
        dataset = getattr(getattr(self.trainer, "datamodule", None), "datasets", {}).get(split)
        entries = getattr(dataset, "entries", None)
        if not entries or not self._candidates:
            return []
        answered = {r["question_id"] for r in rows}
        missing = [e.question_id for e in entries if e.question_id not in answered]
        if not missing:
            return []
        guess = self._candidates[0][0]
        _logger.warning("%d questions had no readable image (e.g. %s); answered %r (the first "
                        "candidate) so that the result file covers every question",
                        len(missing), missing[:5], guess)
        return [{"question_id": q, "answer": guess} for q in missing]

    def _result_dir(self) -> Path:
        if self.hparams.result_dir:
            return Path(self.hparams.result_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "results"
