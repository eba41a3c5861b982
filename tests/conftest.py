"""Shared fixtures: tiny configurations and the location of ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

requires_shared = pytest.mark.skipif(
    not (SHARED / "data").is_dir(),
    reason=f"real sample data not found at {SHARED} (../shared beside the project); "
    "these tests need the COCO sample and golden files",
)

torch.set_num_threads(2)


def tiny_vision(**kw):
    from albef_pl.models import VisionConfig

    base = dict(model_name="vit_base_patch16_224", img_size=32, patch_size=16, embed_dim=32,
                depth=2, num_heads=2)
    base.update(kw)
    return VisionConfig(**base)


def tiny_text(**kw):
    from albef_pl.models import TextConfig

    base = dict(pretrained=None, vocab_size=128, hidden_size=32, num_hidden_layers=4,
                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                num_text_layers=2)
    base.update(kw)
    return TextConfig(**base)


@pytest.fixture
def tiny_configs():
    return tiny_vision(), tiny_text()
