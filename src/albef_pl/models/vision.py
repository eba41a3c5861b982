"""Image encoder: a timm VisionTransformer that returns every token after the final norm."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import timm
import torch
from torch import nn

_logger = logging.getLogger(__name__)


@dataclass
class VisionConfig:
    """How to build the image encoder.

    Any timm ViT name works; the size fields, when set, override the named model's so that a
    tiny test model and ViT-B/16 come from the same code.

    Attributes:
        model_name: timm model name, e.g. ``vit_base_patch16_224`` (ALBEF's ViT-B/16).
        img_size: input resolution (256 for pre-training, 384 for fine-tuning).
        patch_size: override of the named model's patch size.
        embed_dim: override of the token width.
        depth: override of the number of blocks.
        num_heads: override of the number of attention heads.
        mlp_ratio: override of the MLP hidden ratio.
        drop_path_rate: stochastic depth rate (ALBEF uses 0).
        grad_checkpointing: recompute block activations in backward to save memory.
        pretrained: load timm's weights for ``model_name`` (needs the network or a timm cache).
        checkpoint_path: local weights file (a DeiT/timm ``.pth`` or ``.safetensors``), loaded
            with the position embeddings resized to ``img_size``. Takes precedence over
            ``pretrained``.
    """

    model_name: str = "vit_base_patch16_224"
    img_size: int = 256
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    pretrained: bool = False
    checkpoint_path: str | None = None


def build_vision_encoder(cfg: VisionConfig) -> nn.Module:
    """Build the timm ViT described by ``cfg``, without classifier head or pooling.

    The returned module's parameter names (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
    ``blocks.N.attn.qkv`` ...) are those of ALBEF's own ViT, so official weights load by name.
    """
    overrides = {
        k: getattr(cfg, k)
        for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
        if getattr(cfg, k) is not None
    }
    found = re.search(r"patch(\d+)", cfg.model_name)
    patch = cfg.patch_size or (int(found.group(1)) if found else None)
    if patch and cfg.img_size % patch:
        raise ValueError(
            f"vision.img_size={cfg.img_size} is not a multiple of the patch size {patch}: the "
            "last pixels of every row and column would be ignored; choose a multiple"
        )
    use_timm_weights = cfg.pretrained and cfg.checkpoint_path is None
    model = timm.create_model(
        cfg.model_name,
        pretrained=use_timm_weights,
        img_size=cfg.img_size,
        num_classes=0,
        global_pool="",
        drop_path_rate=cfg.drop_path_rate,
        **overrides,
    )
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.checkpoint_path is not None:
        from albef_pl.checkpoints import load_vit_weights

        load_vit_weights(model, cfg.checkpoint_path)
    return model


def vision_width(encoder: nn.Module) -> int:
    """Token width of a timm ViT."""
    return int(encoder.embed_dim)


def encode_image(encoder: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """All image tokens after the final norm: (B, 1 + num_patches, D); ``[:, 0]`` is [CLS]."""
    return encoder.forward_features(image)
