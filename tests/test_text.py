"""Caption cleaning and tokenization, including the golden ids of the original tokenizer."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from albef_pl.text import (
    CaptionTokenizer,
    build_tokenizer,
    default_text_model_dir,
    is_usable_caption,
    pre_caption,
    pre_question,
)

SHARED = Path(__file__).parents[1].parent / "shared"
GOLDEN_IO = SHARED / "golden" / "albef_tiny_io.json"


def test_pre_caption_rules() -> None:
    raw = 'A Man\'s (tall) dog-walker/runner!  <person> said: "hi"; ~ok*#?'
    assert pre_caption(raw) == "a mans tall dog walker runner person said hi ok"


def test_pre_caption_truncates_words_and_strips() -> None:
    raw = "  " + " ".join(f"w{i}" for i in range(40)) + "\n"
    cleaned = pre_caption(raw, max_words=30)
    assert cleaned.split(" ") == [f"w{i}" for i in range(30)]
    assert pre_caption("...", max_words=30) == ""


def test_pre_question_keeps_inner_spacing_and_rstrips() -> None:
    assert pre_question("What's the man-made thing? ") == "whats the man made thing"
    assert pre_question("a b c d", max_words=2) == "a b"


def test_is_usable_caption() -> None:
    assert is_usable_caption("a red circle")
    assert is_usable_caption("café au lait")
    assert not is_usable_caption("")
    assert not is_usable_caption("2019 12")
    assert not is_usable_caption("красный круг слева")
    assert not is_usable_caption("一只猫 a")


def test_default_dir_holds_the_vocabulary() -> None:
    directory = default_text_model_dir()
    assert (directory / "vocab.txt").is_file()
    assert build_tokenizer() is build_tokenizer(str(directory))


def test_caption_tokenizer_layouts() -> None:
    albef = CaptionTokenizer(max_length=6)
    out = albef(["a red circle", "a red circle left of a blue square"])
    assert out["input_ids"].dtype == torch.int64 and out["attention_mask"].dtype == torch.int64
    # [CLS] a red circle [PAD] [PAD] / [CLS] + 5 pieces (truncated, no [SEP]).
    assert out["input_ids"].tolist() == [
        [101, 1037, 2417, 4418, 0, 0],
        [101, 1037, 2417, 4418, 2187, 1997],
    ]
    assert out["attention_mask"].sum(1).tolist() == [4, 6]

    stock = CaptionTokenizer(max_length=6, append_sep=True, padding="max_length")
    out = stock(["a red circle", "a red circle left of a blue square"])
    assert out["input_ids"].tolist() == [
        [101, 1037, 2417, 4418, 102, 0],
        [101, 1037, 2417, 4418, 2187, 102],
    ]


def test_caption_tokenizer_special_ids_and_pickle() -> None:
    tok = CaptionTokenizer()
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0,
        101,
        102,
        103,
    )
    assert tok.vocab_size == 30522
    clone = pickle.loads(pickle.dumps(tok))
    assert clone(["a dog"])["input_ids"].tolist() == tok(["a dog"])["input_ids"].tolist()
    with pytest.raises(ValueError):
        CaptionTokenizer(padding="do_not_pad")


@pytest.mark.skipif(not GOLDEN_IO.is_file(), reason=f"golden vectors not found at {GOLDEN_IO}")
def test_golden_tokenization_matches_original() -> None:
    inputs = json.loads(GOLDEN_IO.read_text())["inputs"]
    cleaned = [pre_caption(c, max_words=30) for c in inputs["captions_raw"]]
    assert cleaned == inputs["captions_clean"]

    out = CaptionTokenizer(max_length=25)(cleaned)
    assert out["input_ids"].tolist() == inputs["input_ids"]
    assert out["attention_mask"].tolist() == inputs["attention_mask"]
