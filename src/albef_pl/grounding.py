"""Weakly supervised grounding: Grad-CAM maps of a text over an image, and box scoring.

ALBEF grounds a referring expression without ever training on boxes: the gradient of the
image-text score with respect to attention probabilities shows which image patches the
score depends on. Two maps are available:

- ``itm``: cross-attention of one fusion layer (text queries, image-patch keys), weighted by
  the gradient of the ITM "match" logit, averaged over heads and over the real text tokens.
- ``itc``: self-attention of one ViT block, the row of the image [CLS] token, weighted by the
  gradient of the image-text contrastive similarity, averaged over heads.

The (h, w) patch map is then upsampled to the image's own size, every proposal box is
scored by the map mass inside it divided by the square root of its area, and the best box
counts as correct when its IoU with the ground-truth box is at least 0.5.

Everything here works on plain modules and tensors; no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from albef_pl.models.albef import ALBEF
from albef_pl.models.text import MultiHeadAttention

__all__ = [
    "GRADCAM_MODES",
    "IOU_THRESHOLD",
    "best_box",
    "box_iou_inclusive",
    "box_scores",
    "fusion_attention",
    "gradcam",
    "itc_gradcam",
    "itm_gradcam",
    "upsample_map",
]

GRADCAM_MODES = ("itm", "itc")
#: A box counts as found when its IoU with the ground truth reaches this (ALBEF, RefCOCO+).
IOU_THRESHOLD = 0.5


# ---------------------------------------------------------------------------------------------
# Grad-CAM
def _patch_grid(num_patches: int) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} image patches do not form a square grid")
    return side, side


def _graph_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Copies that autograd may record: tensors made under inference mode (Lightning's
    # default for evaluation) cannot be saved for backward; their clones, made outside it
    # (inside _gradients_on), can.
    return tuple(t.detach().clone() for t in tensors)


@contextmanager
def _gradients_on() -> Iterator[None]:
    """Record a graph even inside Lightning's ``inference_mode`` or ``no_grad`` evaluation."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def fusion_attention(model: ALBEF, block_num: int) -> MultiHeadAttention:
    """The cross-attention of BERT layer ``block_num`` (counted over text then fusion layers,
    as the original's ``block_num``: 8 is the third fusion layer of a 6 + 6 split)."""
    num_text = len(model.text_encoder.layers)
    num_fusion = len(model.fusion_encoder.layers)
    if not num_text <= block_num < num_text + num_fusion:
        raise ValueError(
            f"block_num={block_num} is not a fusion layer: layers {num_text}.."
            f"{num_text + num_fusion - 1} cross-attend to the image ({num_text} text layers, "
            f"{num_fusion} fusion layers)"
        )
    return model.fusion_encoder.layers[block_num - num_text].crossattention.self


def itm_gradcam(
    model: ALBEF,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    block_num: int,
) -> torch.Tensor:
    """Grad-CAM of the ITM match logit on one fusion layer's cross-attention.

    Args:
        model: the backbone (in eval mode for deterministic maps).
        image_embeds: (B, 1 + h*w, Dv) image tokens.
        text_embeds: (B, L, D) text-encoder states.
        attention_mask: (B, L) 1 for real tokens, 0 for padding.
        block_num: BERT layer index of the fusion layer (see :func:`fusion_attention`).

    Returns:
        (B, h, w) non-negative map.
    """
    attn = fusion_attention(model, block_num)
    attn.save_attention = True
    try:
        with _gradients_on():
            image_embeds, text_embeds, mask = _graph_inputs(image_embeds, text_embeds,
                                                            attention_mask)
            # The image tokens require grad so that a graph reaches the probabilities even
            # when every weight is frozen.
            image_embeds.requires_grad_(True)
            logits = model.itm_logits(text_embeds, mask, image_embeds)  # (B, 2)
            probs = attn.attention_probs  # (B, H, L, 1 + h*w)
            (grads,) = torch.autograd.grad(logits[:, 1].sum(), probs)
    finally:
        attn.save_attention = False
        attn.attention_probs = None
    return _itm_map(probs.detach(), grads, mask)


def _itm_map(probs: torch.Tensor, grads: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, H, L, 1 + P) probabilities and gradients -> (B, h, w): drop the image [CLS]
    column, keep positive gradients, mean over heads, mean over real text tokens."""
    cam = probs[..., 1:].float() * grads[..., 1:].float().clamp_min(0)  # (B, H, L, P)
    per_token = cam.mean(dim=1)  # (B, L, P)
    m = mask.to(per_token.dtype)[:, :, None]  # (B, L, 1)
    # NOTE: the original multiplies by the mask but divides by the full length L, padding
    # included, so a text's map shrinks with the padding of its batch; we average over the
    # real tokens only.
    per_image = (per_token * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, P)
    return per_image.view(-1, *_patch_grid(per_image.shape[1]))


class _ProbsRecorder(nn.Module):
    """Stands in for a timm attention's ``attn_drop`` (applied right after the softmax) and
    keeps its input, the attention probabilities, on the graph."""

    def __init__(self, dropout: nn.Module) -> None:
        super().__init__()
        self.dropout = dropout
        self.probs: torch.Tensor | None = None

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        self.probs = probs
        return self.dropout(probs)


@contextmanager
def _recording_vit_attention(model: ALBEF, block_num: int) -> Iterator[_ProbsRecorder]:
    blocks = model.visual_encoder.blocks
    if not -len(blocks) <= block_num < len(blocks):
        raise ValueError(f"block_num={block_num} is not a ViT block (the ViT has {len(blocks)})")
    attn = blocks[block_num].attn
    fused, dropout = attn.fused_attn, attn.attn_drop
    recorder = _ProbsRecorder(dropout)
    attn.fused_attn = False  # the explicit softmax path, which calls attn_drop
    attn.attn_drop = recorder
    try:
        yield recorder
    finally:
        attn.fused_attn, attn.attn_drop = fused, dropout


def itc_gradcam(
    model: ALBEF, image: torch.Tensor, text_feat: torch.Tensor, block_num: int
) -> torch.Tensor:
    """Grad-CAM of the ITC similarity on the [CLS] row of one ViT block's self-attention.

    Args:
        model: the backbone.
        image: (B, 3, S, S) normalised images.
        text_feat: (B, E) unit-norm text features (the image's own text in each row).
        block_num: ViT block index (negative counts from the end).

    Returns:
        (B, h, w) non-negative map.
    """
    with _recording_vit_attention(model, block_num) as rec, _gradients_on():
        image, text_feat = _graph_inputs(image, text_feat)
        image.requires_grad_(True)
        image_feat = model.image_feature(model.encode_image(image))  # (B, E)
        sim = (image_feat.float() * text_feat.float()).sum(dim=-1) / model.temp  # (B,)
        probs = rec.probs  # (B, H, N, N)
        (grads,) = torch.autograd.grad(sim.sum(), probs)
    cam = probs.detach()[:, :, 0, 1:].float() * grads[:, :, 0, 1:].float().clamp_min(0)
    per_image = cam.mean(dim=1)  # (B, P)
    return per_image.view(-1, *_patch_grid(per_image.shape[1]))


def gradcam(
    model: ALBEF,
    image: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mode: str = "itm",
    block_num: int = 8,
) -> torch.Tensor:
    """(B, h, w) Grad-CAM maps of each text over its image, by ``mode`` (``itm`` or ``itc``)."""
    if mode not in GRADCAM_MODES:
        raise ValueError(f"gradcam mode must be one of {GRADCAM_MODES}, got {mode!r}")
    with torch.no_grad():
        text_embeds = model.encode_text(input_ids, attention_mask)  # (B, L, D)
        if mode == "itm":
            image_embeds = model.encode_image(image)  # (B, N, Dv)
        else:
            text_feat = model.text_feature(text_embeds, attention_mask)  # (B, E)
    if mode == "itm":
        return itm_gradcam(model, image_embeds, text_embeds, attention_mask, block_num)
    return itc_gradcam(model, image, text_feat, block_num)


# ---------------------------------------------------------------------------------------------
# Boxes
def upsample_map(cam: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(h, w) map -> (height, width), bicubic, as the original (on the image's own size)."""
    up = F.interpolate(cam[None, None].float(), size=(int(height), int(width)), mode="bicubic",
                       align_corners=False)
    return up[0, 0]


def _pixel_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """(K, 4+) [x, y, w, h, ...] -> (K, 4) integer [x, y, w, h] (truncated; w, h at least 1)."""
    b = boxes[:, :4].to(torch.float64).trunc().long()
    b[:, 2:] = b[:, 2:].clamp_min(1)
    return b


def box_scores(heatmap: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Map mass inside each box over the square root of its area: (K,) scores.

    Boxes are [x, y, w, h] in pixels of ``heatmap`` (H, W); coordinates are truncated to
    integers, and the pixels ``[y, y + h) x [x, x + w)`` that lie inside the map are summed,
    while the divisor is ``sqrt(w * h)`` of the whole box (the original slices an array the
    same way). The square root favours neither tiny boxes (a mean would) nor huge ones (a
    sum would).
    """
    height, width = heatmap.shape
    b = _pixel_boxes(boxes.cpu())
    x0, y0 = b[:, 0].clamp(0, width), b[:, 1].clamp(0, height)
    x1, y1 = (b[:, 0] + b[:, 2]).clamp(0, width), (b[:, 1] + b[:, 3]).clamp(0, height)
    # Summed-area table with a zero first row and column: sum of [y0, y1) x [x0, x1) in O(1).
    table = F.pad(heatmap.detach().cpu().double().cumsum(0).cumsum(1), (1, 0, 1, 0))
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return (inside / (b[:, 2] * b[:, 3]).double().sqrt()).float()


def box_iou_inclusive(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of [x, y, w, h] boxes with the inclusive-pixel convention of RefCOCO's tools.

    A box covers pixels ``x .. x + w - 1``; the boxes intersect only where the first covered
    pixel is strictly before the last (``x1 < x2``), so an overlap one pixel wide counts as
    none, and the intersection is ``(x2 - x1 + 1) * (y2 - y1 + 1)``. Union areas are
    ``w * h``. Broadcasts over leading dimensions.
    """
    a, b = a[..., :4].double(), b[..., :4].double()
    ix1, iy1 = torch.maximum(a[..., 0], b[..., 0]), torch.maximum(a[..., 1], b[..., 1])
    ix2 = torch.minimum(a[..., 0] + a[..., 2] - 1, b[..., 0] + b[..., 2] - 1)
    iy2 = torch.minimum(a[..., 1] + a[..., 3] - 1, b[..., 1] + b[..., 3] - 1)
    overlap = (ix1 < ix2) & (iy1 < iy2)
    inter = torch.where(overlap, (ix2 - ix1 + 1) * (iy2 - iy1 + 1), torch.zeros_like(ix1))
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return (inter / union).float()


def best_box(
    cam: torch.Tensor, proposals: torch.Tensor, width: int, height: int
) -> tuple[int, torch.Tensor]:
    """Index of the proposal the (h, w) map points at, and the map at (height, width)."""
    heatmap = upsample_map(cam, width, height)
    return int(box_scores(heatmap, proposals).argmax()), heatmap
