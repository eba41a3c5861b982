"""ALBEF's three objectives as plain functions: ITC, ITM with hard negatives, MLM.

Each function takes tensors and returns tensors; nothing here knows about models or
Lightning, so every loss is tested on hand-made inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Image-text contrastive (ITC)
def itc_targets(
    sim_m: torch.Tensor,
    alpha: float,
    idx: torch.Tensor | None = None,
    idx_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft ITC targets: ``alpha * softmax(sim_m) + (1 - alpha) * ground truth``.

    Args:
        sim_m: (B, B + Q) teacher similarities (already divided by the temperature).
        alpha: distillation weight in [0, 1].
        idx: (B,) image ids of the batch, or None for "the diagonal is the only positive".
        idx_all: (B + Q,) image ids of the columns (batch then queue); needed with ``idx``.

    Returns:
        (B, B + Q) targets; every row sums to one.
    """
    if idx is None:
        truth = torch.zeros_like(sim_m, dtype=torch.float32)
        truth.fill_diagonal_(1.0)  # the first B columns hold the batch's own pairs
    else:
        if idx_all is None:
            raise ValueError("itc_targets: idx_all is required when idx is given")
        pos = (idx.view(-1, 1) == idx_all.view(1, -1)).float()
        truth = pos / pos.sum(dim=1, keepdim=True)  # the diagonal keeps every row non-empty
    if alpha == 0:
        return truth
    return alpha * F.softmax(sim_m.float(), dim=1) + (1 - alpha) * truth


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``-sum_j targets_j * log_softmax(logits)_j``."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


@dataclass
class ITCOutput:
    """ITC loss and its parts.

    Attributes:
        loss: mean of the two directions.
        loss_i2t: image-to-text soft cross-entropy.
        loss_t2i: text-to-image soft cross-entropy.
    """

    loss: torch.Tensor
    loss_i2t: torch.Tensor
    loss_t2i: torch.Tensor


def itc_loss(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    sim_i2t_m: torch.Tensor,
    sim_t2i_m: torch.Tensor,
    alpha: float,
    idx: torch.Tensor | None = None,
    idx_all: torch.Tensor | None = None,
) -> ITCOutput:
    """ITC over [batch; queue] with momentum-distilled soft targets.

    ``sim_i2t`` is student image features against [teacher batch text features; text queue]
    divided by the temperature, (B, B + Q); ``sim_t2i`` likewise. The ``_m`` versions use
    teacher features on both sides and only shape the targets.
    """
    loss_i2t = soft_cross_entropy(sim_i2t, itc_targets(sim_i2t_m, alpha, idx, idx_all))
    loss_t2i = soft_cross_entropy(sim_t2i, itc_targets(sim_t2i_m, alpha, idx, idx_all))
    return ITCOutput((loss_i2t + loss_t2i) / 2, loss_i2t, loss_t2i)


# ---------------------------------------------------------------------------------------------
# Image-text matching (ITM) with in-batch hard negatives
@dataclass
class HardNegatives:
    """Sampled in-batch negatives.

    Attributes:
        image_for_text: (B,) index of a negative image for each text.
        text_for_image: (B,) index of a negative text for each image.
        text_valid: (B,) False where text b has no admissible negative image.
        image_valid: (B,) False where image b has no admissible negative text.
    """

    image_for_text: torch.Tensor
    text_for_image: torch.Tensor
    text_valid: torch.Tensor
    image_valid: torch.Tensor


def negative_mask(batch_size: int, idx: torch.Tensor | None, device) -> torch.Tensor:
    """(B, B) True where column j may serve as a negative for row b."""
    if idx is None:
        return ~torch.eye(batch_size, dtype=torch.bool, device=device)
    return idx.view(-1, 1) != idx.view(1, -1)  # never another caption of the same image


def sample_from_weights(
    weights: torch.Tensor, allowed: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One column per row, drawn with probability proportional to ``weights * allowed``.

    # NOTE: the original raises inside ``torch.multinomial`` when a row has no mass (a batch
    # of one, a batch whose items all show one image, or softmax weights that underflow).
    # Here a row whose allowed weights underflow to zero (or are not finite) falls back to a
    # uniform draw over its allowed columns, and a row with no allowed column at all is
    # reported invalid (its pair is dropped from the ITM loss). All rows are drawn in one
    # ``torch.multinomial`` call.

    Returns:
        (B,) sampled indices (0 where invalid) and (B,) validity.
    """
    w = torch.where(allowed, weights.float(), torch.zeros((), device=weights.device))
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    valid = allowed.any(dim=1)
    dead = w.sum(dim=1) <= 0
    w = torch.where(dead[:, None], allowed.float(), w)  # uniform fallback
    w = torch.where(valid[:, None], w, torch.ones_like(w))  # keep multinomial happy
    picks = torch.multinomial(w, 1, generator=generator).squeeze(1)
    return torch.where(valid, picks, torch.zeros_like(picks)), valid


def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    idx: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> HardNegatives:
    """Draw one hard negative per text and per image from in-batch similarities.

    Args:
        sim_i2t: (B, B) image-vs-text similarities of the local batch (divided by temp).
        sim_t2i: (B, B) text-vs-image similarities.
        idx: (B,) image ids; columns with the row's id are never drawn. Without ids only the
            diagonal is excluded.
        generator: random generator for reproducible draws.
    """
    with torch.no_grad():
        allowed = negative_mask(sim_i2t.shape[0], idx, sim_i2t.device)
        w_t2i = F.softmax(sim_t2i.float(), dim=1)
        w_i2t = F.softmax(sim_i2t.float(), dim=1)
        image_for_text, text_valid = sample_from_weights(w_t2i, allowed, generator)
        text_for_image, image_valid = sample_from_weights(w_i2t, allowed, generator)
    return HardNegatives(image_for_text, text_for_image, text_valid, image_valid)


def itm_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over positives (label 1) and negatives (label 0), mean over all rows."""
    logits = torch.cat([pos_logits, neg_logits], dim=0).float()
    labels = torch.cat(
        [
            torch.ones(len(pos_logits), dtype=torch.long, device=logits.device),
            torch.zeros(len(neg_logits), dtype=torch.long, device=logits.device),
        ]
    )
    return F.cross_entropy(logits, labels)


# ---------------------------------------------------------------------------------------------
# Masked language modelling (MLM)
def mask_tokens(
    input_ids: torch.Tensor,
    vocab_size: int,
    mask_token_id: int,
    special_ids: tuple[int, ...] | list[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick ``probability`` of the tokens, then 80% [MASK], 10% random, 10% kept.

    Padding and special tokens (``special_ids``, e.g. [PAD], [CLS], [SEP]) are never picked.
    # NOTE: the original excludes only [PAD] and [CLS] (its inputs carry no [SEP]); we also
    # exclude every id in ``special_ids``, which changes nothing for [SEP]-free inputs.

    Returns:
        masked ids (B, L) and labels (B, L) holding the original id where picked, -100 elsewhere.
    """
    device = input_ids.device

    def draw(p: float) -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=device) < p

    picked = draw(probability)
    for sid in special_ids:
        picked &= input_ids != sid
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    to_mask = picked & draw(0.8)
    to_random = picked & ~to_mask & draw(0.5)
    random_ids = torch.randint(
        vocab_size, input_ids.shape, generator=generator, device=device, dtype=input_ids.dtype
    )
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mlm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    soft_labels: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """``(1 - alpha) * CE + alpha * distillation``, both averaged over labelled tokens.

    Args:
        logits: (..., V) student logits, either full (B, L, V) or already gathered at the
            labelled positions (P, V).
        labels: matching (...) labels, -100 where not to be predicted.
        soft_labels: teacher probabilities (..., V) for the distillation term, taken over the
            vocabulary axis (the corrected form; the original used the sequence axis until
            2022).
        alpha: distillation weight.

    Returns:
        Scalar loss; exactly 0 (with a gradient path) when nothing is labelled.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    if not keep.any():
        return logits.sum() * 0.0
    logits, labels = logits[keep], labels[keep]
    loss = F.cross_entropy(logits, labels)
    if soft_labels is not None and alpha > 0:
        soft = soft_labels.reshape(-1, soft_labels.shape[-1])[keep].float()
        distill = -(F.log_softmax(logits, dim=-1) * soft).sum(dim=-1).mean()
        loss = (1 - alpha) * loss + alpha * distill
    return loss


def classifier_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of a classifier head, distilled from a teacher (SNLI-VE, NLVR2).

    ``(1 - alpha) * CE(logits, labels) - alpha * mean_b sum_c softmax(teacher)_c *
    log_softmax(logits)_c``; plain cross-entropy without a teacher or with ``alpha == 0``.

    Args:
        logits: (B, C) student logits.
        labels: (B,) class indices.
        teacher_logits: (B, C) momentum-teacher logits (no gradient is taken through them).
        alpha: distillation weight.

    Returns:
        Scalar loss, averaged over the batch.
    """
    logits = logits.float()
    loss = F.cross_entropy(logits, labels)
    if teacher_logits is None or alpha <= 0:
        return loss
    soft = F.softmax(teacher_logits.detach().float(), dim=1)
    distill = -(F.log_softmax(logits, dim=1) * soft).sum(dim=1).mean()
    return (1 - alpha) * loss + alpha * distill


# ---------------------------------------------------------------------------------------------
# VQA answer generation
def answer_nll(
    logits: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Per-answer language-modelling loss of the VQA decoder, summed over tokens.

    Position ``t`` of ``logits`` predicts token ``t + 1``; the first token ([CLS]) is never
    a target and padding is ignored. With a teacher: ``(1 - alpha) * NLL + alpha *
    sum_t (-sum_v softmax(teacher)_v * log_softmax(student)_v)`` over the same positions.

    Args:
        logits: (N, La, V) decoder logits of N answers.
        answer_ids: (N, La) answer token ids (``[CLS] a n s [SEP] [PAD] ..``).
        answer_mask: (N, La) 1 on tokens, 0 on padding.
        teacher_logits: (N, La, V) momentum-decoder logits, or None.
        alpha: distillation weight.

    Returns:
        (N,) loss of each answer.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (N, La-1, V)
    targets = answer_ids[:, 1:]
    keep = answer_mask[:, 1:].to(logp.dtype)  # (N, La-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    loss = (nll * keep).sum(dim=1)
    if teacher_logits is None or alpha <= 0:
        return loss
    soft = F.softmax(teacher_logits[:, :-1].detach().float(), dim=-1)
    distill = (-(soft * logp).sum(dim=-1) * keep).sum(dim=1)
    return (1 - alpha) * loss + alpha * distill


def vqa_loss(
    answer_losses: torch.Tensor, weights: torch.Tensor, num_questions: int
) -> torch.Tensor:
    """ALBEF's VQA loss: answer losses weighted (VQA: count / annotators; VG: 0.5), summed
    and divided by the number of questions (not of answers)."""
    return (weights.to(answer_losses.dtype) * answer_losses).sum() / num_questions
