"""VQA data: ALBEF's ``vqa_{train,val,test}.json``, ``vg_qa.json`` and ``answer_list.json``.

Each question file is a json list of ``{"question_id", "question", "image", "dataset",
"answer"}``:

- ``image``: path relative to ``vqa_root`` (``dataset`` ``vqa``, and any other dataset such
  as the shared sample's ``gqa``) or to ``vg_root`` (``dataset`` ``vg``);
- ``dataset``: ``vqa`` when absent;
- ``answer``: the human answers, a list of strings (VQA: ten annotators) or one string
  (Visual Genome); required for training, optional for evaluation (test-dev has none).

Training answers are weighted as in the original: each distinct VQA answer by
``count / len(answers)``, each VG answer by 0.5 (any other dataset like VQA). Questions pass
through :func:`albef_pl.text.pre_question` (30 words for training, 50 for evaluation).

Training batches hold ``image`` (B, 3, S, S), the questions' ``input_ids`` and
``attention_mask`` (B, Lq), the answers of all questions flattened: ``answer_ids`` and
``answer_mask`` (N, La) as ``[CLS] answer [SEP] [PAD]..``, ``answer_weights`` (N,) and
``answer_counts`` (B,) (answers per question, in order). Evaluation batches hold ``image``,
``input_ids``, ``attention_mask``, ``question_id`` (list, as in the file) and ``answers``
(list of B lists of human answers, empty when unknown). Both hold ``num_skipped``: samples
whose image failed to decode are dropped from their batch and counted.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from albef_pl.text import CaptionTokenizer, pre_question
from data_modules.listed import (
    ImageEntryDataset,
    ListedDataModule,
    as_file_list,
    check_files,
    check_loader_options,
    check_tokenizer,
    load_json,
)

_logger = logging.getLogger(__name__)

__all__ = ["VQADataModule", "VQADataset", "VQAQuestion", "answer_weights", "read_vqa_json"]

#: Weight of each Visual Genome answer (one per question), as in the original.
VG_WEIGHT = 0.5


@dataclass
class VQAQuestion:
    """One question.

    Attributes:
        question_id: as in the file (an int for VQA v2).
        question: the raw question.
        image: image path (its root joined).
        dataset: ``vqa``, ``vg`` or another source name.
        answers: the human answers (empty when unknown).
    """

    question_id: Any
    question: str
    image: str
    dataset: str
    answers: list[str] = field(default_factory=list)


def answer_weights(answers: Sequence[str], dataset: str) -> tuple[list[str], list[float]]:
    """Distinct answers and their training weights.

    VQA (and any dataset but ``vg``): ``count / len(answers)`` (ten annotators give
    multiples of 0.1); VG: 0.5 each.
    """
    counts = Counter(answers)
    distinct = list(counts)
    if dataset == "vg":
        return distinct, [VG_WEIGHT] * len(distinct)
    return distinct, [counts[a] / len(answers) for a in distinct]


def read_vqa_json(
    path: str | Path, vqa_root: str = "", vg_root: str | None = None,
    require_answer: bool = True,
) -> list[VQAQuestion]:
    """Read one ALBEF-style VQA json file.

    Raises:
        ValueError: the file is not a list, or an entry lacks ``question`` or ``image``, or
            has answers that are not strings (or none where required); the message names
            the file and the entry.
    """
    data = load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a json list of {{question_id, question, image, "
                         f"dataset, answer}} entries, found {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: an empty list, no question entry")
    vg_root = vqa_root if vg_root is None else vg_root
    out = []
    blank = 0
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("question"), str) \
                or not isinstance(entry.get("image"), str):
            raise ValueError(f"{where} ({str(entry)[:120]}) lacks a 'question' or 'image' string")
        answers = entry.get("answer", [])
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where} (question {entry['question']!r}): 'answer' must be a "
                             f"string or a list of strings, got {answers!r}"[:300])
        given = len(answers)
        # An empty answer would be a training target ("[CLS] [SEP]") and a candidate.
        answers = [a for a in answers if a.strip()]
        blank += given - len(answers)
        if require_answer and not answers:
            raise ValueError(f"{where} (question {entry['question']!r}) has no answer"
                             + (f" (only {given} empty strings)" if given else ""))
        dataset = str(entry.get("dataset", "vqa"))
        root = vg_root if dataset == "vg" else vqa_root
        out.append(VQAQuestion(entry.get("question_id", i), entry["question"],
                               os.path.join(root, entry["image"]), dataset, answers))
    if blank:
        _logger.warning("%s: %d empty answer strings ignored", path, blank)
    return out


class VQADataset(ImageEntryDataset):
    """Questions with their image: items hold ``image``, ``text`` (the question after
    :func:`pre_question`) and ``entry`` (the :class:`VQAQuestion`); ``None`` when the image is
    unreadable (see the collates).

    Args:
        questions: the entries.
        transform: PIL image (not yet decoded) -> tensor.
        max_words: words kept by :func:`pre_question` (30 train, 50 test in the original).
    """

    def __init__(self, questions: Sequence[VQAQuestion], transform, max_words: int) -> None:
        super().__init__(questions, transform, functools.partial(_question, max_words=max_words))

    @property
    def questions(self) -> list[VQAQuestion]:
        """The entries."""
        return self.entries


def _question(entry: VQAQuestion, max_words: int) -> str:
    return pre_question(entry.question, max_words)


class VQATrainCollate:
    """Questions, flattened weighted answers (``answer[SEP]``) and per-question counts."""

    def __init__(self, questions: CaptionTokenizer, answers: CaptionTokenizer) -> None:
        self.questions = questions
        self.answers = answers

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = [x for x in items if x is not None]
        if not good:
            return {"num_skipped": len(items)}
        texts, weights, counts = [], [], []
        for x in good:
            distinct, w = answer_weights(x["entry"].answers, x["entry"].dataset)
            texts += distinct
            weights += w
            counts.append(len(distinct))
        q = self.questions([x["text"] for x in good])
        a = self.answers(texts)
        return {
            "image": torch.stack([x["image"] for x in good]),
            "input_ids": q["input_ids"],
            "attention_mask": q["attention_mask"],
            "answer_ids": a["input_ids"],
            "answer_mask": a["attention_mask"],
            "answer_weights": torch.tensor(weights, dtype=torch.float32),
            "answer_counts": torch.tensor(counts, dtype=torch.long),
            "num_skipped": len(items) - len(good),
        }


class VQAEvalCollate:
    """Questions with their ids and human answers (for the accuracy and the result file)."""

    def __init__(self, questions: CaptionTokenizer) -> None:
        self.questions = questions

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = [x for x in items if x is not None]
        if not good:
            return {"num_skipped": len(items)}
        q = self.questions([x["text"] for x in good])
        return {
            "image": torch.stack([x["image"] for x in good]),
            "input_ids": q["input_ids"],
            "attention_mask": q["attention_mask"],
            "question_id": [x["entry"].question_id for x in good],
            "answers": [list(x["entry"].answers) for x in good],
            "num_skipped": len(items) - len(good),
        }


class VQADataModule(ListedDataModule):
    """VQA v2 (+ Visual Genome QA) data for fine-tuning and evaluation.

    Args:
        vqa_root: folder the image paths of ``vqa`` entries (and of any dataset but ``vg``)
            are relative to (COCO images).
        vg_root: folder of the ``vg`` entries' images; default ``vqa_root``.
        train_files: training json files (the original: vqa_train, vqa_val, vg_qa).
        val_file: json file(s) evaluated after every epoch (the original has none).
        test_file: json file(s) for ``test`` (``vqa_test.json``).
        predict_file: json file(s) for ``predict``; default ``test_file``.
        answer_list: ``answer_list.json`` (a json list of candidate strings); without it the
            distinct answers of the training files (else of the evaluation files) are the
            candidates, most frequent first.
        image_size: side length of the model's input (384 in the paper).
        batch_size: training questions per process (32 in the paper).
        eval_batch_size: evaluation questions per process (16 in the paper).
        num_workers: data-loader workers per process.
        tokenizer: tokenizer directory or hub name; ``None`` = the offline MiniLM vocabulary.
        max_length: question token cap, [CLS] included (the original does not truncate; 50
            words fit).
        answer_max_length: answer token cap, [CLS] and [SEP] included.
        max_words: question words kept for training (30); evaluation keeps ``eval_max_words``.
        eval_max_words: question words kept for evaluation (50).
        check_images: drop entries whose image file does not exist at setup, naming them.
        pin_memory: pin host memory in the loaders.
        drop_last: drop the last incomplete training batch (as the original).
    """

    item_one, item_name = "question", "questions"
    train_option = "train_files"

    def __init__(
        self,
        vqa_root: str,
        vg_root: str | None = None,
        train_files: str | list[str] | None = None,
        val_file: str | list[str] | None = None,
        test_file: str | list[str] | None = None,
        predict_file: str | list[str] | None = None,
        answer_list: str | None = None,
        image_size: int = 384,
        batch_size: int = 32,
        eval_batch_size: int = 16,
        num_workers: int = 4,
        tokenizer: str | None = None,
        max_length: int = 80,
        answer_max_length: int = 32,
        max_words: int = 30,
        eval_max_words: int = 50,
        check_images: bool = True,
        pin_memory: bool = True,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        check_files(train_files=train_files, val_file=val_file, test_file=test_file,
                    predict_file=predict_file, answer_list=answer_list)
        check_loader_options(image_size=image_size, batch_size=batch_size,
                             eval_batch_size=eval_batch_size, num_workers=num_workers,
                             max_length=max_length, answer_max_length=answer_max_length,
                             max_words=max_words, eval_max_words=eval_max_words)
        check_tokenizer(tokenizer)
        self.save_hyperparameters()
        self._candidates: dict[str, Any] | None = None

    # ---- reading
    def _split_files(self, split: str) -> list[str]:
        h = self.hparams
        if split == "predict":
            return as_file_list(h.predict_file or h.test_file)
        if split == "train":
            return as_file_list(h.train_files)
        return as_file_list(getattr(h, f"{split}_file"))

    def _read(self, split: str, files: list[str]) -> list[VQAQuestion]:
        h = self.hparams
        out: list[VQAQuestion] = []
        for f in files:
            out += read_vqa_json(f, h.vqa_root, h.vg_root, require_answer=split == "train")
        seen = Counter(q.question_id for q in out)
        repeated = sorted((qid for qid, n in seen.items() if n > 1), key=str)
        if repeated:
            message = (f"{split}: {len(repeated)} question ids occur more than once in "
                       f"{', '.join(files)}, e.g. {repeated[:5]}")
            if split != "train":
                # Results are keyed by question id (EvalAI, vqa_result.json): refuse.
                raise ValueError(message + "; every evaluated question needs its own id")
            _logger.warning("%s (training uses each entry as given)", message)
        return out

    def _roots(self) -> str:
        h = self.hparams
        return f"data.vqa_root={h.vqa_root!r} / vg_root={h.vg_root!r}"

    def _make_dataset(self, split: str, entries: list[VQAQuestion], transform) -> VQADataset:
        h = self.hparams
        return VQADataset(entries, transform, h.max_words if split == "train" else h.eval_max_words)

    def _describe(self, split: str, entries: list[VQAQuestion]) -> None:
        _logger.info("%s: %d questions on %d images (%s)", split, len(entries),
                     len({q.image for q in entries}), dict(Counter(q.dataset for q in entries)))

    def _after_setup(self) -> None:
        if any(split in self.datasets for split in ("val", "test", "predict")):
            self.answer_candidates()  # a bad answer list fails now, not after an epoch

    # ---- candidate answers
    def candidate_answers(self) -> list[str]:
        """The answers ranked at evaluation: ``answer_list`` or those of the data files."""
        h = self.hparams
        if h.answer_list:
            answers = load_json(h.answer_list)
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"data.answer_list {h.answer_list}: expected a json list of "
                                 "answer strings")
            kept = [a for a in answers if a.strip()]
            if len(kept) < len(answers):
                _logger.warning("data.answer_list %s: %d empty answer strings ignored",
                                h.answer_list, len(answers) - len(kept))
            if not kept:
                raise ValueError(f"data.answer_list {h.answer_list}: no answer in it")
            self._check_coverage(kept)
            return kept
        for split in ("train", "val", "test", "predict"):
            files = self._split_files(split)
            counts = Counter(a for q in self._read("eval", files) for a in q.answers)
            if counts:
                # Most frequent first, ties alphabetically: the same list on every process.
                return sorted(counts, key=lambda a: (-counts[a], a))
        raise ValueError("no candidate answers: set data.answer_list (answer_list.json) or "
                         "give files with answers")

    def _check_coverage(self, answers: list[str]) -> None:
        """Warn when the answer list holds none of the answers of the data set up so far
        (the list of another data set: every prediction would be wrong)."""
        known = {a.strip().lower() for a in answers}
        for split, dataset in self.datasets.items():
            truth = {a.strip().lower() for q in dataset.entries for a in q.answers}
            if truth and not truth & known:
                _logger.warning(
                    "data.answer_list %s holds none of the %d distinct answers of %s: every "
                    "answer there will be wrong. Is it the list of this data set?",
                    self.hparams.answer_list, len(truth), split)

    def answer_candidates(self) -> dict[str, Any]:
        """``answers`` (list of N strings) with their ``input_ids`` and ``attention_mask``
        (N, La) as ``[CLS] answer [SEP] [PAD]..``, for :meth:`VQATask.rank_answer`."""
        if self._candidates is None:
            answers = self.candidate_answers()
            tokens = self._answer_tokenizer()(answers)
            self._candidates = {"answers": answers, **tokens}
            _logger.info("%d candidate answers", len(answers))
        return self._candidates

    # ---- loaders
    def _question_tokenizer(self) -> CaptionTokenizer:
        h = self.hparams
        return CaptionTokenizer(h.tokenizer, h.max_length)

    def _answer_tokenizer(self) -> CaptionTokenizer:
        # The original appends eos='[SEP]' to every answer string.
        h = self.hparams
        return CaptionTokenizer(h.tokenizer, h.answer_max_length, append_sep=True)

    def _train_collate(self) -> VQATrainCollate:
        return VQATrainCollate(self._question_tokenizer(), self._answer_tokenizer())

    def _eval_collate(self) -> VQAEvalCollate:
        return VQAEvalCollate(self._question_tokenizer())
