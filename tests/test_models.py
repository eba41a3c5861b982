"""Backbone behaviour: bidirectional fusion, cross-attention widths, attention paths."""

from __future__ import annotations

import torch

from albef_pl.models import ALBEF

from conftest import tiny_text, tiny_vision


def _model(**text_kw) -> ALBEF:
    torch.manual_seed(0)
    # Image width 48 differs from text width 32: cross-attention keys/values take 48.
    return ALBEF(tiny_vision(embed_dim=48, num_heads=2), tiny_text(**text_kw), embed_dim=16).eval()


def test_fusion_and_mlm_paths_are_bidirectional():
    model = _model()
    image = model.encode_image(torch.randn(1, 3, 32, 32))
    ids = torch.tensor([[1, 10, 11, 12, 13]])
    mask = torch.ones_like(ids)
    changed = ids.clone()
    changed[0, 4] = 50  # change the last token only
    with torch.no_grad():
        fused_a = model.fuse(model.encode_text(ids, mask), mask, image)
        fused_b = model.fuse(model.encode_text(changed, mask), mask, image)
        mlm_a = model.mlm_logits(ids, mask, image)
        mlm_b = model.mlm_logits(changed, mask, image)
    # An earlier token's output moves when a later token changes: no causal mask anywhere.
    assert (fused_a[0, 1] - fused_b[0, 1]).abs().max() > 1e-4
    assert (mlm_a[0, 1] - mlm_b[0, 1]).abs().max() > 1e-4


def test_padding_does_not_leak_into_outputs():
    model = _model()
    image = model.encode_image(torch.randn(1, 3, 32, 32))
    ids = torch.tensor([[1, 10, 11, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    other = ids.clone()
    other[0, 3:] = 77  # garbage under the padding
    with torch.no_grad():
        a = model.fuse(model.encode_text(ids, mask), mask, image)[0, :3]
        b = model.fuse(model.encode_text(other, mask), mask, image)[0, :3]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_image_affects_fusion_but_not_text_encoder():
    model = _model()
    ids = torch.tensor([[1, 10, 11]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        a = model.fuse(text, mask, model.encode_image(torch.randn(1, 3, 32, 32)))
        b = model.fuse(text, mask, model.encode_image(torch.randn(1, 3, 32, 32)))
    assert model.fusion_encoder.layers[0].crossattention.self.key.in_features == 48
    assert (a - b).abs().max() > 1e-4


def test_explicit_attention_path_matches_sdpa_and_keeps_probabilities():
    model = _model()
    image = model.encode_image(torch.randn(2, 3, 32, 32))
    ids = torch.tensor([[1, 10, 11, 0], [1, 12, 13, 14]])
    mask = (ids != 0).long()
    text = model.encode_text(ids, mask)
    with torch.no_grad():
        fast = model.fuse(text, mask, image)
    attn = model.fusion_encoder.layers[-1].crossattention.self
    attn.save_attention = True
    slow = model.fuse(text, mask, image)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    probs = attn.attention_probs
    assert probs.shape == (2, 2, 4, image.shape[1])  # (B, heads, L, N_img)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 4))


def test_features_are_unit_norm_and_mlm_head_tied():
    model = _model()
    f = model.features(torch.randn(3, 3, 32, 32), torch.tensor([[1, 5]] * 3), torch.ones(3, 2).long())
    torch.testing.assert_close(f.image_feat.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(f.text_feat.norm(dim=-1), torch.ones(3))
    assert "mlm_head.decoder.weight" not in model.state_dict()
    with torch.no_grad():
        model.text_encoder.embeddings.word_embeddings.weight[5].fill_(1.0)
    h = torch.randn(1, 32)
    logits = model.mlm_head(h)
    expected = model.mlm_head.transform(h) @ model.text_encoder.embeddings.word_embeddings.weight.T
    torch.testing.assert_close(logits, expected + model.mlm_head.bias)


def test_image_size_must_be_a_multiple_of_the_patch():
    import pytest

    from albef_pl.models.vision import build_vision_encoder

    with pytest.raises(ValueError, match="vision.img_size=60"):
        build_vision_encoder(tiny_vision(img_size=60, patch_size=8))
