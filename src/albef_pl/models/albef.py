"""The ALBEF backbone: image encoder, text encoder, fusion encoder and their heads."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from albef_pl.models.text import (
    FusionEncoder,
    MLMHead,
    TextConfig,
    TextEncoder,
    init_bert_weights,
    pool_states,
)
from albef_pl.models.vision import VisionConfig, build_vision_encoder, encode_image


@dataclass
class Features:
    """What the unimodal encoders produce for one batch.

    Attributes:
        image_embeds: (B, N, Dv) image tokens; ``[:, 0]`` is the image [CLS].
        text_embeds: (B, L, D) text-encoder states.
        image_feat: (B, E) L2-normalised projection of the image [CLS].
        text_feat: (B, E) L2-normalised projection of the text [CLS].
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    image_feat: torch.Tensor
    text_feat: torch.Tensor


class ALBEF(nn.Module):
    """Image encoder, text encoder, fusion encoder, projections, ITM and MLM heads.

    Args:
        vision: image encoder configuration.
        text: text/fusion encoder configuration.
        embed_dim: size of the contrastive embedding (256 in ALBEF).
        temp: initial value of the learnable temperature.
        init_weights: load BERT (``text.pretrained``) and ViT weights; ``False`` leaves random
            weights (a checkpoint will be loaded afterwards, or a test).
    """

    def __init__(
        self,
        vision: VisionConfig | None = None,
        text: TextConfig | None = None,
        embed_dim: int = 256,
        temp: float = 0.07,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        vision = vision or VisionConfig()
        text = text or TextConfig()
        if not init_weights:
            vision = dataclasses.replace(vision, pretrained=False, checkpoint_path=None)
        bert_cfg = text.to_bert_config()
        k = text.num_text_layers

        self.visual_encoder = build_vision_encoder(vision)
        vision_width = int(self.visual_encoder.embed_dim)
        self.text_encoder = TextEncoder(bert_cfg, k, text.grad_checkpointing)
        self.fusion_encoder = FusionEncoder(
            bert_cfg, bert_cfg.num_hidden_layers - k, vision_width, text.grad_checkpointing
        )
        self.mlm_head = MLMHead(bert_cfg, self.text_encoder.embeddings.word_embeddings)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(bert_cfg.hidden_size, embed_dim)
        self.itm_head = nn.Linear(bert_cfg.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(temp))
        self.bert_config = bert_cfg
        self.pooling = text.pooling

        self.apply(self._init_new_weights)
        if init_weights and text.pretrained is not None:
            from albef_pl.checkpoints import load_bert_weights

            load_bert_weights(self, text.pretrained)

    @staticmethod
    def _init_new_weights(module: nn.Module) -> None:
        # BERT's initialiser (normal 0.02) for everything BERT-side; timm initialised the ViT.
        if isinstance(module, (TextEncoder, FusionEncoder, MLMHead)):
            init_bert_weights(module)

    @property
    def vision_width(self) -> int:
        return int(self.visual_encoder.embed_dim)

    @property
    def hidden_size(self) -> int:
        return int(self.bert_config.hidden_size)

    # ---- unimodal encoders
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, Dv) image tokens."""
        return encode_image(self.visual_encoder, image)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) states of the text-only layers."""
        return self.text_encoder(input_ids, attention_mask)

    def image_feature(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) -> (B, E) unit-norm contrastive feature of the image [CLS]."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, L, D) text or fused states -> (B, D) by ``text.pooling`` ([CLS] by default)."""
        return pool_states(states, attention_mask, self.pooling)

    def text_feature(
        self, text_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L, D) -> (B, E) unit-norm contrastive feature of the text [CLS] (or mean)."""
        return F.normalize(self.text_proj(self.pool(text_embeds, attention_mask)), dim=-1)

    def features(
        self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Features:
        """Run both unimodal encoders and project their [CLS] tokens."""
        image_embeds = self.encode_image(image)
        text_embeds = self.encode_text(input_ids, attention_mask)
        return Features(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            image_feat=self.image_feature(image_embeds),
            text_feat=self.text_feature(text_embeds, attention_mask),
        )

    # ---- multimodal
    def fuse(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor | Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Fusion layers over text states attending to image tokens: (B, L, D).

        ``image_embeds`` is one (B, N, Dv) tensor, or a pair of them when the fusion encoder
        is a :class:`~albef_pl.models.text.PairFusionEncoder` (NLVR2).
        """
        return self.fusion_encoder(text_embeds, attention_mask, image_embeds)

    def itm_logits(
        self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        """(B, 2) match logits (column 1 = match) from the fused [CLS] (or mean)."""
        fused = self.fuse(text_embeds, attention_mask, image_embeds)
        return self.itm_head(self.pool(fused, attention_mask))

    def mlm_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        """All layers (text then fusion) over possibly masked ids: (B, L, D)."""
        text = self.encode_text(input_ids, attention_mask)
        return self.fuse(text, attention_mask, image_embeds)

    def mlm_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Vocabulary logits, (B, L, V), or (P, V) at a boolean (B, L) ``positions`` mask.

        Computing the vocabulary projection only at masked positions gives the same loss as
        the original's full (B, L, V) logits at a fraction of the cost.
        """
        hidden = self.mlm_hidden(input_ids, attention_mask, image_embeds)
        if positions is not None:
            hidden = hidden[positions]
        return self.mlm_head(hidden)


def make_teacher(model: ALBEF) -> ALBEF:
    """A frozen copy of ``model`` for momentum distillation.

    ALBEF keeps momentum copies of both encoders, the fusion layers, the projections and the
    MLM head; the ITM head and the temperature have no copy.
    """
    teacher = copy.deepcopy(model)
    del teacher.itm_head
    del teacher.temp
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher




__all__ = ["ALBEF", "Features", "make_teacher"]
