"""albef_pl: ALBEF (Align before Fuse) vision-language pre-training in PyTorch Lightning."""

from albef_pl.models import ALBEF, TextConfig, VisionConfig

__all__ = ["ALBEF", "TextConfig", "VisionConfig"]
__version__ = "0.1.0"
