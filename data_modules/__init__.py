"""LightningDataModules that hand ALBEF tasks plain tensors and token ids.

Exports resolve lazily, so the shard writer and the synthetic-data command start without
importing Lightning or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data_modules.grounding import GroundingDataModule
    from data_modules.nlvr2 import NLVR2DataModule
    from data_modules.pretrain import PretrainDataModule, SkippedSamplesLogger
    from data_modules.retrieval import RetrievalDataModule
    from data_modules.shards import SKIP_REASONS, EpochLoader, ShardStream
    from data_modules.ve import VEDataModule
    from data_modules.vqa import VQADataModule

_EXPORTS = {
    "NLVR2DataModule": "data_modules.nlvr2",
    "PretrainDataModule": "data_modules.pretrain",
    "SkippedSamplesLogger": "data_modules.pretrain",
    "GroundingDataModule": "data_modules.grounding",
    "RetrievalDataModule": "data_modules.retrieval",
    "SKIP_REASONS": "data_modules.shards",
    "EpochLoader": "data_modules.shards",
    "ShardStream": "data_modules.shards",
    "VEDataModule": "data_modules.ve",
    "VQADataModule": "data_modules.vqa",
}

__all__ = [
    "SKIP_REASONS",
    "EpochLoader",
    "GroundingDataModule",
    "NLVR2DataModule",
    "PretrainDataModule",
    "RetrievalDataModule",
    "ShardStream",
    "SkippedSamplesLogger",
    "VEDataModule",
    "VQADataModule",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data_modules' has no attribute {name!r}")
