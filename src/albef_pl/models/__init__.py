"""Plain PyTorch modules: no Lightning, no files, no data. Usable from a notebook."""

from albef_pl.models.albef import ALBEF
from albef_pl.models.text import (
    AnswerDecoder,
    FusionEncoder,
    MLMHead,
    PairFusionEncoder,
    TextConfig,
    TextEncoder,
)
from albef_pl.models.vision import VisionConfig, build_vision_encoder

__all__ = [
    "ALBEF",
    "AnswerDecoder",
    "FusionEncoder",
    "MLMHead",
    "PairFusionEncoder",
    "TextConfig",
    "TextEncoder",
    "VisionConfig",
    "build_vision_encoder",
]
