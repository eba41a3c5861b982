"""Retrieval metrics: the rank of the ground truth and recall at K as a hit rate.

ALBEF (like UNITER, ViLT and CLIP) reports image-text retrieval as a hit rate: an image
counts as retrieved at K when *any* of its captions is among its K best-scored texts, a
caption when its image is among its K best-scored images. The score matrices may hold any
real numbers, including the ``-100`` that two-stage evaluation writes outside the re-ranked
candidates and negative ITM logits.

# NOTE: ``torchmetrics.retrieval.RetrievalRecall`` is not used. Its recall counts only
# relevant items whose score is above zero (``torch.where(preds > 0, target, 0)`` in
# torchmetrics 1.x), so every negative ITM logit or ``-100`` is dropped, and it returns
# |relevant in top K| / |relevant| (0.2 for one of five captions found) rather than the
# any-hit rate the papers report. The metric is therefore written by hand here.
"""

from __future__ import annotations

import math

from collections.abc import Sequence

import torch

__all__ = ["ground_truth_ranks", "retrieval_recall", "vqa_accuracy"]

# Rows per block when scanning score matrices: bounds the boolean masks built here.
_ROW_CHUNK = 1024


def _as_targets(targets: Sequence[Sequence[int]] | Sequence[int] | torch.Tensor) -> list[list[int]]:
    """Normalise ``[[3, 4], ...]`` or ``[3, 4, ...]`` (one target per row) to lists."""
    if isinstance(targets, torch.Tensor):
        targets = targets.tolist()
    out = []
    for t in targets:
        if isinstance(t, Sequence):
            out.append([int(x) for x in t])
        else:
            out.append([int(t)])
    return out


def ground_truth_ranks(
    scores: torch.Tensor, targets: Sequence[Sequence[int]] | Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """0-based rank of the best-placed ground-truth column of each row.

    Ties are broken against the ground truth: the rank is the number of non-target columns
    whose score is at least the best target score. A target outside the re-ranked
    candidates (score -100, tied with every other non-candidate) is therefore never counted
    as a hit, whatever the sort order of equal values would have been.

    Args:
        scores: (N, M) scores, higher is better.
        targets: for each row, the list of its ground-truth columns (or a single column).

    Returns:
        (N,) long ranks; a row without targets gets rank M (never a hit).
    """
    targets = _as_targets(targets)
    n, m = scores.shape
    if len(targets) != n:
        raise ValueError(f"{len(targets)} target lists for a score matrix of {n} rows")
    ranks = torch.empty(n, dtype=torch.long)
    for start in range(0, n, _ROW_CHUNK):
        block = scores[start : start + _ROW_CHUNK].float().cpu()  # (C, M)
        rows = targets[start : start + _ROW_CHUNK]
        is_target = torch.zeros_like(block, dtype=torch.bool)
        r = torch.tensor([i for i, t in enumerate(rows) for _ in t], dtype=torch.long)
        c = torch.tensor([j for t in rows for j in t], dtype=torch.long)
        if len(c):
            if int(c.min()) < 0 or int(c.max()) >= m:
                raise ValueError(f"target column out of range [0, {m})")
            is_target[r, c] = True
        best = block.masked_fill(~is_target, float("-inf")).amax(dim=1, keepdim=True)  # (C, 1)
        ahead = ((block >= best) & ~is_target).sum(dim=1)
        has_target = is_target.any(dim=1)
        ranks[start : start + len(rows)] = torch.where(has_target, ahead, torch.full_like(ahead, m))
    return ranks


def retrieval_recall(
    score_i2t: torch.Tensor,
    score_t2i: torch.Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall at K in both directions, in percent, as ALBEF's ``itm_eval`` reports it.

    Args:
        score_i2t: (N_i, N_t) score of every text for every image.
        score_t2i: (N_t, N_i) score of every image for every text.
        img2txt: for each image, the indices of its captions.
        txt2img: for each caption, the index of its image.
        ks: cut-offs.

    Returns:
        ``txt_r{K}`` (image-to-text: text retrieval), ``img_r{K}`` (text-to-image: image
        retrieval) for each K, ``txt_r_mean``, ``img_r_mean`` and ``r_mean`` (their mean).
    """
    n_i, n_t = score_i2t.shape
    if tuple(score_t2i.shape) != (n_t, n_i):
        raise ValueError(f"score_t2i has shape {tuple(score_t2i.shape)}, expected {(n_t, n_i)}")
    i2t_ranks = ground_truth_ranks(score_i2t, img2txt)
    t2i_ranks = ground_truth_ranks(score_t2i, txt2img)

    out: dict[str, float] = {}
    for prefix, ranks in (("txt", i2t_ranks), ("img", t2i_ranks)):
        for k in ks:
            out[f"{prefix}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
        out[f"{prefix}_r_mean"] = sum(out[f"{prefix}_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def chance_recall(
    img2txt: Sequence[Sequence[int]], num_texts: int, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """What :func:`retrieval_recall` gives in expectation for random scores, in percent.

    Text retrieval: an image with ``c`` of the ``T`` captions is a hit at K unless all K
    top-ranked captions are others, ``1 - C(T - c, K) / C(T, K)``; image retrieval: ``K / N``.
    """
    n_i = len(img2txt)
    out: dict[str, float] = {}
    for k in ks:
        hits = []
        for captions in img2txt:
            c = len(captions)
            k_t = min(k, num_texts)
            hits.append(1.0 - (math.comb(num_texts - c, k_t) / math.comb(num_texts, k_t)))
        out[f"txt_r{k}"] = 100.0 * sum(hits) / max(1, n_i)
        out[f"img_r{k}"] = 100.0 * min(k, n_i) / max(1, n_i)
    for prefix in ("txt", "img"):
        out[f"{prefix}_r_mean"] = sum(out[f"{prefix}_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one predicted answer: ``min(#annotators who gave it / 3, 1)``.

    Answers are compared after lower-casing and stripping. A question with fewer than three
    ground-truth answers (Visual Genome, GQA: one each) divides by their number instead, so
    an exact match scores 1.

    # NOTE: the official VQA evaluation also normalises punctuation, articles and number
    # words and averages the formula over the ten 9-annotator subsets; the candidates of
    # ALBEF's answer list are already normalised, and the server (EvalAI) computes the
    # reported numbers, so the simple form is used for ``val/vqa_acc``.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = prediction.strip().lower()
    hits = sum(a.strip().lower() == pred for a in answers)
    return min(1.0, hits / min(3, len(answers)))
