"""Two-stage image-text retrieval scoring: ITC top-k candidates, then ITM re-ranking.

ALBEF ranks a test set in two stages. The cheap unimodal features give a cosine similarity
for every (image, text) pair; for each image only its ``k_test`` most similar texts, and
for each text its ``k_test`` most similar images, go through the fusion encoder, whose ITM
"match" logit becomes the score. Everything else scores ``-100``.

The functions here never run the fusion encoder on all N_i x N_t pairs: similarities are
computed in row blocks, fusion runs on candidate pairs only (each distinct pair once, even
when it is a candidate in both directions) in batches of ``fusion_batch_size``.

Several processes share the work without counting anything twice. Each process holds the
image tokens of its own images (``image_ids``) and every text's states; it selects
candidates for its images and for the texts ``j`` with ``j % world_size == rank``, then
scores every candidate pair whose image it holds. Sums over processes (each entry written by
exactly one) assemble the result. Without a process group everything is local.

Nothing here knows about Lightning; :class:`~albef_pl.tasks.retrieval.RetrievalTask` feeds
it, and the benchmark calls it directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from albef_pl.models import ALBEF

_logger = logging.getLogger(__name__)

__all__ = [
    "NOT_CANDIDATE",
    "RetrievalScores",
    "exhaustive_itm_scores",
    "itc_topk",
    "itm_match_scores",
    "two_stage_scores",
]

#: Score of every pair that was not re-ranked (the original's fill value).
NOT_CANDIDATE = -100.0


@dataclass
class RetrievalScores:
    """Dense score matrices for ranking, on the CPU.

    Attributes:
        i2t: (N_i, N_t) score of every text for every image.
        t2i: (N_t, N_i) score of every image for every text.
        num_fusion_pairs: pairs this process ran through the fusion encoder.
    """

    i2t: torch.Tensor
    t2i: torch.Tensor
    num_fusion_pairs: int = 0


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fp32(device: torch.device):
    """Leave autocast: similarities and match logits are ranked, and bf16 would tie them."""
    return torch.autocast(device_type=device.type, enabled=False)


def _sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    if _rank_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def itc_topk(
    query_feat: torch.Tensor, key_feat: torch.Tensor, k: int, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` keys by cosine similarity for each query, computed in row blocks.

    Args:
        query_feat: (Nq, E) unit-norm features.
        key_feat: (Nk, E) unit-norm features.
        k: candidates per query (at most Nk).
        chunk_size: query rows per block; memory is ``chunk_size x Nk``.

    Returns:
        (Nq, k) similarities and (Nq, k) key indices, best first.
    """
    values, indices = [], []
    for start in range(0, query_feat.shape[0], chunk_size):
        with _fp32(query_feat.device):
            sim = query_feat[start : start + chunk_size].float() @ key_feat.float().T  # (C, Nk)
        v, i = sim.topk(k, dim=1)
        values.append(v)
        indices.append(i)
    if not values:
        empty = query_feat.new_zeros((0, k))
        return empty.float(), empty.long()
    return torch.cat(values), torch.cat(indices)


@torch.no_grad()
def itm_match_scores(
    model: ALBEF,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    batch_size: int = 128,
) -> torch.Tensor:
    """ITM "match" logit (column 1) of the pairs ``(image_rows[p], text_rows[p])``.

    Args:
        model: the backbone; only its fusion encoder and ITM head run.
        image_embeds: (n, N, Dv) image tokens.
        text_embeds: (N_t, L, D) text-encoder states (may live on the CPU).
        text_mask: (N_t, L) attention masks.
        image_rows: (P,) rows of ``image_embeds``.
        text_rows: (P,) rows of ``text_embeds``.
        batch_size: pairs per fusion pass.

    Returns:
        (P,) float32 logits on ``image_embeds.device``.
    """
    device = image_embeds.device
    out = []
    for start in range(0, len(image_rows), batch_size):
        i = image_rows[start : start + batch_size].to(image_embeds.device)
        t = text_rows[start : start + batch_size].to(text_embeds.device)
        mask = text_mask[t]
        width = max(1, int(mask.sum(dim=1).max()))  # drop columns that are padding everywhere
        mask = mask[:, :width].to(device)
        fused = model.fuse(text_embeds[t, :width].to(device), mask, image_embeds[i])  # (C, L, D)
        with _fp32(device):
            out.append(model.itm_head(model.pool(fused, mask).float())[:, 1])  # "match" logit
    if not out:
        return torch.zeros(0, device=device)
    return torch.cat(out)


def _check_ownership(image_ids: torch.Tensor, num_images: int, device: torch.device) -> None:
    """Every image must be held by exactly one process."""
    owners = torch.zeros(num_images, dtype=torch.long, device=device)
    owners.index_add_(0, image_ids.to(device), torch.ones_like(image_ids, device=device))
    owners = _sum_over_processes(owners)
    if not bool((owners == 1).all()):
        bad = torch.nonzero(owners != 1)[:5, 0].tolist()
        raise ValueError(
            f"every image must be scored by exactly one process; images {bad} are held by "
            f"{[int(owners[b]) for b in bad]} processes"
        )


def _dense(
    n_rows: int, n_cols: int, columns: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """(n_rows, n_cols) CPU matrix of -100 with ``values`` at ``columns`` in each row."""
    out = torch.full((n_rows, n_cols), NOT_CANDIDATE, dtype=torch.float32)
    return out.scatter_(1, columns.cpu(), values.float().cpu())


@torch.no_grad()
def _itc_dense(image_feat: torch.Tensor, text_feat: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(N_i, N_t) cosine similarities on the CPU, computed in row blocks."""
    with _fp32(image_feat.device):
        rows = [
            (image_feat[s : s + chunk_size].float() @ text_feat.float().T).cpu()
            for s in range(0, image_feat.shape[0], chunk_size)
        ]
    return torch.cat(rows) if rows else torch.zeros(0, text_feat.shape[0])


@torch.no_grad()
def two_stage_scores(
    model: ALBEF,
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_embeds: torch.Tensor,
    image_ids: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    k_test: int = 256,
    rerank: bool = True,
    add_itc: bool = False,
    fusion_batch_size: int = 128,
    chunk_size: int = 1024,
) -> RetrievalScores:
    """Score matrices for retrieval, ALBEF's way.

    Args:
        model: the backbone (student weights, eval mode).
        image_feat: (N_i, E) unit-norm features of every image, identical on every process.
        text_feat: (N_t, E) unit-norm features of every text, identical on every process.
        image_embeds: (n, N, Dv) tokens of the images this process holds.
        image_ids: (n,) rows of ``image_feat`` those tokens belong to; over all processes
            every image is held exactly once.
        text_embeds: (N_t, L, D) text-encoder states of every text.
        text_mask: (N_t, L) their attention masks.
        k_test: candidates per query in each direction.
        rerank: re-rank candidates with ITM; ``False`` returns the full ITC similarity
            matrices (zero-shot ITC ranking, no fusion at all).
        add_itc: score = ITM logit + ITC similarity (as LAVIS) instead of the ITM logit
            alone (as the original).
        fusion_batch_size: pairs per fusion pass.
        chunk_size: query rows per similarity block.

    Returns:
        :class:`RetrievalScores`; with ``rerank`` every non-candidate entry is -100.
    """
    device = image_feat.device
    n_i, n_t = image_feat.shape[0], text_feat.shape[0]
    rank, world = _rank_world()
    image_ids = image_ids.to(device).long()
    _check_ownership(image_ids, n_i, device)

    if not rerank:
        i2t = _itc_dense(image_feat, text_feat, chunk_size)
        return RetrievalScores(i2t=i2t, t2i=i2t.T.contiguous())

    # Stage 1, image -> text: candidates for the images held here.
    k_i2t, k_t2i = min(k_test, n_t), min(k_test, n_i)
    i2t_sim, i2t_idx = itc_topk(image_feat[image_ids], text_feat, k_i2t, chunk_size)  # (n, k)

    # Stage 1, text -> image: candidates for this process's share of the texts, shared.
    my_texts = torch.arange(rank, n_t, world, device=device)
    sim, idx = itc_topk(text_feat[my_texts], image_feat, k_t2i, chunk_size)
    t2i_sim = torch.zeros(n_t, k_t2i, device=device).index_copy_(0, my_texts, sim)
    t2i_idx = torch.zeros(n_t, k_t2i, dtype=torch.long, device=device).index_copy_(0, my_texts, idx)
    t2i_sim, t2i_idx = _sum_over_processes(t2i_sim), _sum_over_processes(t2i_idx)

    # Stage 2: every candidate pair whose image is held here, each distinct pair once.
    local_row = torch.full((n_i,), -1, dtype=torch.long, device=device)
    local_row[image_ids] = torch.arange(len(image_ids), device=device)
    held = local_row[t2i_idx] >= 0  # (N_t, k)
    pair_img = torch.cat([image_ids.repeat_interleave(k_i2t), t2i_idx[held]])
    pair_txt = torch.cat([i2t_idx.reshape(-1), torch.nonzero(held)[:, 0]])
    keys, inverse = torch.unique(pair_img * n_t + pair_txt, return_inverse=True)
    logits = itm_match_scores(
        model, image_embeds, text_embeds, text_mask,
        local_row[keys // n_t], keys % n_t, fusion_batch_size,
    )[inverse]  # (pairs,)
    n_i2t = len(image_ids) * k_i2t

    # Assemble: each entry was written by exactly one process.
    i2t_score = torch.zeros(n_i, k_i2t, device=device)
    i2t_score[image_ids] = logits[:n_i2t].view(-1, k_i2t)
    i2t_full_idx = torch.zeros(n_i, k_i2t, dtype=torch.long, device=device)
    i2t_full_idx[image_ids] = i2t_idx
    i2t_full_sim = torch.zeros(n_i, k_i2t, device=device)
    i2t_full_sim[image_ids] = i2t_sim
    t2i_score = torch.zeros(n_t, k_t2i, device=device)
    t2i_score[held] = logits[n_i2t:]
    for t in (i2t_score, i2t_full_idx, i2t_full_sim, t2i_score):
        _sum_over_processes(t)

    if add_itc:
        i2t_score, t2i_score = i2t_score + i2t_full_sim, t2i_score + t2i_sim
    return RetrievalScores(
        i2t=_dense(n_i, n_t, i2t_full_idx, i2t_score),
        t2i=_dense(n_t, n_i, t2i_idx, t2i_score),
        num_fusion_pairs=len(keys),
    )


@torch.no_grad()
def exhaustive_itm_scores(
    model: ALBEF,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    fusion_batch_size: int = 128,
) -> torch.Tensor:
    """ITM match logit of every (image, text) pair, (N_i, N_t) on the CPU.

    The reference that two-stage scoring must equal when ``k_test`` covers the whole set,
    and the cost it avoids: N_i x N_t fusion passes. One process, no sharding.
    """
    n_i, n_t = image_embeds.shape[0], text_embeds.shape[0]
    block = max(1, (8 * fusion_batch_size) // max(1, n_t))  # images per block of pairs
    rows = []
    for start in range(0, n_i, block):
        img = torch.arange(start, min(n_i, start + block)).repeat_interleave(n_t)
        txt = torch.arange(n_t).repeat(len(img) // max(1, n_t))
        scores = itm_match_scores(
            model, image_embeds, text_embeds, text_mask, img, txt, fusion_batch_size
        )
        rows.append(scores.view(-1, n_t).cpu())
    return torch.cat(rows) if rows else torch.zeros(0, n_t)
