"""VQA: answer weights and question cleaning by hand, the causal decoder, the distilled
weighted loss and rank_answer against hand computations, the VQA accuracy, the teacher,
overfitting a tiny set, the data module on the shared sample and on bad files, official
checkpoints through albef_pl.convert, and the real CLI (fit, validate, predict) on the
sample."""

from __future__ import annotations

import json
import logging
import math
import types
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from albef_pl.callbacks import MomentumTeacher
from albef_pl.convert import detect_layout, export_official, load_official_into_task
from albef_pl.convert import official_layout
from albef_pl.losses import answer_nll, vqa_loss
from albef_pl.metrics import vqa_accuracy
from albef_pl.models import AnswerDecoder
from albef_pl.momentum import ema_update
from albef_pl.tasks.vqa import VQATask
from albef_pl.text import pre_question
from conftest import ROOT, SHARED, requires_shared, tiny_text, tiny_vision
from data_modules.vqa import VQADataModule, answer_weights, read_vqa_json

SAMPLE_CONF = ROOT / "conf" / "finetune" / "vqa_sample.yaml"
SAMPLE_JSON = SHARED / "data" / "vl_tasks" / "albef_format" / "vqa_sample.json"
CLS, SEP = 1, 2


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_task(seed: int = 0, **kw) -> VQATask:
    torch.manual_seed(seed)
    kw.setdefault("vision", tiny_vision())
    kw.setdefault("text", tiny_text())
    kw.setdefault("decoder_layers", 2)
    return VQATask(init_weights=False, **kw)


def _answers(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] + tokens + [SEP], padded with 0: (N, La) ids and mask."""
    full = [[CLS, *r, SEP] for r in rows]
    width = max(map(len, full))
    ids = torch.zeros(len(full), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(full):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Data rules by hand
def test_answer_weights_follow_the_original():
    ten = ["net"] * 6 + ["netting", "mesh", "pitcher", "net"]
    distinct, w = answer_weights(ten, "vqa")
    assert distinct == ["net", "netting", "mesh", "pitcher"]
    assert w == pytest.approx([0.7, 0.1, 0.1, 0.1])
    assert answer_weights(["sailboats"], "vg") == (["sailboats"], [0.5])
    assert answer_weights(["yes"], "gqa") == (["yes"], [1.0])  # any other source: like VQA


def test_pre_question_as_the_original():
    q = "What's the man's (left) T-shirt colour?? red/blue; #1*"
    assert pre_question(q) == "whats the mans left t shirt colour red blue 1"
    assert pre_question("  Is  it   ok?  ") == "  is  it   ok"  # no whitespace collapse
    long = " ".join(f"w{i}" for i in range(60))
    assert len(pre_question(long).split(" ")) == 30
    assert len(pre_question(long, 50).split(" ")) == 50


def test_vqa_accuracy_formula():
    humans = ["net"] * 2 + ["mesh"] * 5 + ["netting"] * 3
    assert vqa_accuracy("net", humans) == pytest.approx(2 / 3)
    assert vqa_accuracy("mesh", humans) == 1.0
    assert vqa_accuracy("Netting ", humans) == 1.0  # 3 of 10, case and spaces ignored
    assert vqa_accuracy("rope", humans) == 0.0
    assert vqa_accuracy("sailboats", ["sailboats"]) == 1.0  # one ground truth: exact match
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


# ---------------------------------------------------------------------------------------------
# The decoder
def test_decoder_self_attention_is_causal_and_cross_attention_sees_every_question_state():
    torch.manual_seed(0)
    cfg = tiny_text().to_bert_config()
    decoder = AnswerDecoder(cfg, num_layers=2).eval()
    ids = torch.randint(5, 128, (2, 6))
    mask = torch.ones_like(ids)
    q = torch.randn(2, 5, 32)
    q_mask = torch.ones(2, 5, dtype=torch.long)
    base = decoder(ids, mask, q, q_mask)
    assert base.shape == (2, 6, 128)

    later = ids.clone()
    later[:, 4] = (later[:, 4] + 1) % 128  # change answer token 4
    out = decoder(later, mask, q, q_mask)
    torch.testing.assert_close(out[:, :4], base[:, :4], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, 4:], base[:, 4:])

    q2 = q.clone()
    q2[:, -1] += 1.0  # the last question state reaches even the first answer position
    out = decoder(ids, mask, q2, q_mask)
    assert not torch.allclose(out[:, 0], base[:, 0])
    padded = q_mask.clone()
    padded[:, -1] = 0  # ... unless it is padding
    torch.testing.assert_close(decoder(ids, mask, q2, padded), decoder(ids, mask, q, padded))


# ---------------------------------------------------------------------------------------------
# Loss by hand
LOGITS = torch.tensor([
    [[1.0, 0.0, 2.0, -1.0], [0.5, 0.5, 0.0, 1.0], [0.0, 3.0, 0.0, 0.0]],
    [[0.0, 1.0, 0.0, 1.0], [2.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]],
])  # (N=2 answers, La=3, V=4); position t predicts token t + 1
IDS = torch.tensor([[1, 2, 3], [1, 3, 0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the second answer is one token + padding
TEACHER = torch.tensor([
    [[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 2.0], [9.0, 9.0, 9.0, 9.0]],
    [[0.0, 0.0, 0.0, 3.0], [5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0]],
])


def _logp(row):
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def test_answer_loss_without_distillation_by_hand():
    # answer 0: -log p(2 | pos 0) - log p(3 | pos 1); answer 1: -log p(3 | pos 0) only.
    a0 = -_logp([1.0, 0.0, 2.0, -1.0])[2] - _logp([0.5, 0.5, 0.0, 1.0])[3]
    a1 = -_logp([0.0, 1.0, 0.0, 1.0])[3]
    got = answer_nll(LOGITS, IDS, MASK)
    torch.testing.assert_close(got, torch.tensor([a0, a1]), atol=1e-6, rtol=0)
    # Weights 0.7 and 0.5, two questions: (0.7 a0 + 0.5 a1) / 2.
    loss = vqa_loss(got, torch.tensor([0.7, 0.5]), num_questions=2)
    assert float(loss) == pytest.approx((0.7 * a0 + 0.5 * a1) / 2, abs=1e-6)
    assert float(answer_nll(LOGITS, IDS, MASK, TEACHER, 0.0)[0]) == pytest.approx(a0, abs=1e-6)


def test_answer_loss_with_distillation_by_hand():
    alpha = 0.4
    expected = []
    for n, (length, targets) in enumerate([(2, [2, 3]), (1, [3])]):
        nll, soft = 0.0, 0.0
        for t in range(length):
            logp = _logp(LOGITS[n, t].tolist())
            q = [math.exp(v) for v in _logp(TEACHER[n, t].tolist())]
            nll -= logp[targets[t]]
            soft -= sum(qv * lv for qv, lv in zip(q, logp))
        expected.append((1 - alpha) * nll + alpha * soft)
    got = answer_nll(LOGITS, IDS, MASK, TEACHER, alpha)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# rank_answer
class BigramDecoder(torch.nn.Module):
    """Logits at position t depend only on token t (a bigram table): easy to score by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table  # (V, V)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, ids, mask, states, states_mask):
        self.calls.append(tuple(ids.shape))
        return self.table[ids] + 0.0 * states.sum()  # (N, La, V)


def test_rank_answer_scores_as_the_original_on_a_hand_built_case():
    v = 6
    table = torch.full((v, v), -2.0)
    table[CLS] = torch.tensor([-9.0, -9.0, -9.0, 2.0, 1.0, 0.0])  # first tokens: 3 > 4 > 5
    table[3] = torch.tensor([-9.0, -9.0, 0.0, -9.0, -9.0, 3.0])  # after 3: mostly 5, [SEP] weak
    table[4] = torch.tensor([-9.0, -9.0, 4.0, -9.0, -9.0, -9.0])  # after 4: [SEP]
    table[5] = torch.tensor([-9.0, -9.0, 4.0, -9.0, -9.0, -9.0])
    cands, cmask = _answers([[3], [4], [5], [3, 5]])
    model = types.SimpleNamespace(answer_decoder=BigramDecoder(table))
    states, smask = torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.long)

    def logp(prev, nxt):
        return _logp(table[prev].tolist())[nxt]

    # score = 2 log p(first) + sum of the later tokens' log p (first token counted twice).
    hand = [2 * logp(CLS, 3) + logp(3, SEP), 2 * logp(CLS, 4) + logp(4, SEP),
            2 * logp(CLS, 5) + logp(5, SEP), 2 * logp(CLS, 3) + logp(3, 5) + logp(5, SEP)]
    best = max(range(4), key=hand.__getitem__)
    assert best == 3  # "3 5": its first token ties with "3", its continuation wins

    ids, scores = VQATask.rank_answer(model, states, smask, cands, cmask, k=4)
    assert ids[0].tolist() == sorted(range(4), key=lambda i: -hand[i])
    torch.testing.assert_close(scores[0], torch.tensor(sorted(hand, reverse=True)), atol=1e-5,
                               rtol=0)
    # k = 1 keeps the first candidate with the best first token (top-k keeps the first of ties).
    ids, _ = VQATask.rank_answer(model, states, smask, cands, cmask, k=1)
    assert ids.tolist() == [[0]]
    # k larger than the list is clipped.
    assert VQATask.rank_answer(model, states, smask, cands, cmask, k=99)[0].shape == (1, 4)


def test_rank_answer_with_k_covering_the_list_equals_exhaustive_scoring():
    task = tiny_task(seed=2).eval()
    cands, cmask = _answers([[10], [11, 12], [13, 14, 15], [10, 20], [30]])
    image, ids = torch.randn(3, 3, 32, 32), torch.randint(5, 128, (3, 5))
    mask = torch.ones_like(ids)
    mask[2, 3:] = 0
    with torch.no_grad():
        states = task.encode_question(task.model, image, ids, mask)
        top, scores = task.rank_answer(task.model, states, mask, cands, cmask, k=5)
        # Exhaustive: every (question, candidate) pair through the full decoder.
        n = cands.shape[0]
        rep = states.repeat_interleave(n, 0)
        logits = task.model.answer_decoder(cands.repeat(3, 1), cmask.repeat(3, 1), rep,
                                           mask.repeat_interleave(n, 0))
        seq = -answer_nll(logits, cands.repeat(3, 1), cmask.repeat(3, 1)).view(3, n)
        first = logits[:, 0].log_softmax(-1).gather(1, cands.repeat(3, 1)[:, 1:2]).view(3, n)
        full = first + seq
    assert top[:, 0].tolist() == full.argmax(1).tolist()
    torch.testing.assert_close(scores, full.gather(1, top), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Model, teacher, learning
def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (4, 6), generator=g)
    ids[:, 0] = CLS
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    answers, amask = _answers([[10], [11, 12], [13], [14], [10], [15, 16]])
    return {"image": torch.randn(4, 3, 32, 32, generator=g), "input_ids": ids,
            "attention_mask": mask, "answer_ids": answers, "answer_mask": amask,
            "answer_weights": torch.tensor([0.7, 0.3, 1.0, 0.5, 0.5, 1.0]),
            "answer_counts": torch.tensor([2, 1, 2, 1])}


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_unused_modules_are_removed_and_every_parameter_gets_a_gradient():
    task = tiny_task()
    for owner in (task.model, task.teacher):
        for name in ("mlm_head", "vision_proj", "text_proj", "itm_head", "temp"):
            assert getattr(owner, name, None) is None, name
        lm = owner.answer_decoder.lm_head
        assert lm.word_embeddings[0] is owner.answer_decoder.embeddings.word_embeddings  # tied
    assert task.queue is None and float(task.alpha) == 0.0  # alpha ramps from 0
    task.alpha.fill_(0.4)
    loss = task.training_step(_batch(), 0)
    loss.backward()
    trainable = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("model.") for n, _ in trainable)
    assert [n for n, p in trainable if p.grad is None] == []  # DDP finds nothing unused


def test_decoder_starts_from_the_fusion_layers_embeddings_and_mlm_head():
    torch.manual_seed(0)
    from albef_pl.models import ALBEF

    backbone = ALBEF(tiny_vision(), tiny_text(), init_weights=False)
    torch.manual_seed(0)
    task = tiny_task(seed=0)  # same seed: same backbone before the heads are configured
    dec = task.model.answer_decoder
    for j in range(2):
        for name, value in backbone.fusion_encoder.layers[j].state_dict().items():
            torch.testing.assert_close(dec.layers[j].state_dict()[name], value)
    torch.testing.assert_close(dec.embeddings.word_embeddings.weight,
                               backbone.text_encoder.embeddings.word_embeddings.weight)
    torch.testing.assert_close(dec.lm_head.bias, backbone.mlm_head.bias)
    assert dec.layers[0].attention.self.causal and not dec.layers[0].crossattention.self.causal


def test_teacher_has_decoder_copies_and_follows_the_student_by_ema():
    task = tiny_task()
    dec, dec_m = task.model.answer_decoder, task.teacher.answer_decoder
    assert dec_m is not dec and torch.equal(dec_m.layers[1].output.dense.weight,
                                            dec.layers[1].output.dense.weight)
    assert not any(p.requires_grad for p in task.teacher.parameters())
    with torch.no_grad():  # a fake optimizer step
        for p in task.model.parameters():
            p.add_(0.1)
    before = {n: p.clone() for n, p in task.teacher.named_parameters()}
    callback = MomentumTeacher()
    callback.on_train_batch_end(types.SimpleNamespace(global_step=1), task, None, None, 0)
    student = dict(task.model.named_parameters())
    m = task.hparams.momentum
    for name, p in task.teacher.named_parameters():
        torch.testing.assert_close(p, m * before[name] + (1 - m) * student[name], atol=1e-6,
                                   rtol=0)
    key = "answer_decoder.layers.0.crossattention.self.query.weight"
    assert not torch.equal(dict(task.teacher.named_parameters())[key], before[key])

    # alpha ramps from 0 to 0.4 over the first epoch (the original's warm_up: True).
    trainer = types.SimpleNamespace(global_step=0, num_training_batches=10,
                                    accumulate_grad_batches=1)
    ramp = []
    for step in (0, 5, 10, 30):
        trainer.global_step = step
        ramp.append(callback.alpha_at(trainer, task))
    assert ramp == pytest.approx([0.0, 0.2, 0.4, 0.4])


def test_tiny_model_overfits_four_questions():
    task = tiny_task(seed=1)
    batch = _batch(seed=3)
    truth = [[10, 11], [12], [10, 13], [14]]  # token ids of each question's best answer
    answers, amask = _answers([[10, 11], [12], [10, 13], [14]])
    batch.update(answer_ids=answers, answer_mask=amask, answer_weights=torch.ones(4),
                 answer_counts=torch.ones(4, dtype=torch.long))
    cands, cmask = _answers([[10], [10, 11], [12], [10, 13], [14], [13, 14]])
    names = ["a", "a b", "c", "a d", "e", "d e"]
    def nll() -> float:  # mean likelihood loss of the right answers, eval mode, no teacher
        task.eval()
        with torch.no_grad():
            return float(answer_nll(task.answer_logits(task.model, batch), answers, amask).mean())

    before = nll()
    opt = torch.optim.AdamW(task.parameter_groups(), lr=3e-3)
    for _ in range(60):
        task.train()
        logits = task.answer_logits(task.model, batch)
        with torch.no_grad():
            teacher_logits = task.answer_logits(task.teacher, batch)
        loss = vqa_loss(answer_nll(logits, answers, amask, teacher_logits, 0.4), torch.ones(4), 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(task.teacher, task.model, 0.9)
    task.eval()
    task.set_answer_candidates(names, cands, cmask)
    with torch.no_grad():
        predicted = task.predict_answers(batch)
    expected = ["a b", "c", "a d", "e"]
    acc = sum(vqa_accuracy(p, [e]) for p, e in zip(predicted, expected)) / 4
    assert acc == 1.0, (predicted, truth)
    assert nll() < 0.15 * before  # about 2 log(128) nats at the start


# ---------------------------------------------------------------------------------------------
# Data
@requires_shared
def test_data_module_reads_the_shared_sample():
    root = str(SHARED / "data" / "vl_tasks")
    dm = VQADataModule(root, train_files=str(SAMPLE_JSON), val_file=str(SAMPLE_JSON),
                       image_size=32, batch_size=13, num_workers=0, pin_memory=False)
    dm.setup("fit")
    qs = dm.datasets["train"].questions
    assert len(qs) == 13 and all(Path(q.image).is_file() for q in qs)
    assert [q.dataset for q in qs].count("vg") == 8
    batch = next(iter(dm.train_dataloader()))
    raw = {q.question_id: q for q in qs}
    assert batch["image"].shape == (13, 3, 32, 32) and batch["num_skipped"] == 0
    assert int(batch["answer_counts"].sum()) == batch["answer_ids"].shape[0]
    assert (batch["answer_ids"][:, 0] == 101).all()  # [CLS] answer [SEP]
    lengths = batch["answer_mask"].sum(1)
    assert (batch["answer_ids"].gather(1, (lengths - 1)[:, None]) == 102).all()
    assert sorted(batch["answer_weights"].tolist()).count(0.5) == 8  # one per VG question
    cands = dm.answer_candidates()
    assert cands["answers"][0] == "orange"  # 11 votes: the most frequent answer first
    assert len(cands["answers"]) == len(set(cands["answers"])) == cands["input_ids"].shape[0]
    val = next(iter(dm.val_dataloader()))
    assert val["question_id"][0] == 458752000 and len(val["answers"][0]) == 10
    assert raw[458752000].answers == val["answers"][0]


def _write(root: Path, entries: list[dict]) -> Path:
    path = root / "vqa.json"
    path.write_text(json.dumps(entries))
    return path


def test_missing_and_corrupt_images_are_named_and_counted(tmp_path, caplog):
    (tmp_path / "vg").mkdir()
    Image.new("RGB", (40, 30), (60, 90, 120)).save(tmp_path / "a.jpg")
    Image.new("RGB", (40, 30), (90, 60, 120)).save(tmp_path / "vg" / "b.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    path = _write(tmp_path, [
        {"question_id": 1, "question": "What?", "image": "a.jpg", "dataset": "vqa",
         "answer": ["x", "x", "y"]},
        {"question_id": 2, "question": "Where?", "image": "gone.jpg", "answer": ["x"]},
        {"question_id": 3, "question": "Who?", "image": "bad.jpg", "answer": ["z"]},
        {"question_id": 4, "question": "How?", "image": "b.jpg", "dataset": "vg",
         "answer": "slowly"},
    ])
    dm = VQADataModule(str(tmp_path), vg_root=str(tmp_path / "vg"), train_files=str(path),
                       image_size=32, batch_size=4, num_workers=0, pin_memory=False,
                       drop_last=False)
    dm.setup("fit")
    assert dm.skipped_counts("train")["missing_image"] == 1
    assert str(tmp_path / "gone.jpg") in caplog.text
    batch = dm.train_dataloader().collate_fn([dm.datasets["train"][i] for i in range(3)])
    assert batch["num_skipped"] == 1 and "bad.jpg" in caplog.text
    assert batch["answer_counts"].tolist() == [2, 1]
    torch.testing.assert_close(batch["answer_weights"], torch.tensor([2 / 3, 1 / 3, 0.5]))


def test_bad_entry_names_the_file_and_the_entry(tmp_path):
    path = _write(tmp_path, [{"question": "a", "image": "1.jpg", "answer": ["x"]},
                             {"question": "b", "image": "2.jpg", "answer": [3]}])
    with pytest.raises(ValueError, match=r"vqa\.json: entry 1 \(question 'b'\): 'answer'"):
        read_vqa_json(path)
    path = _write(tmp_path, [{"question": "a", "answer": ["x"]}])
    with pytest.raises(ValueError, match=r"vqa\.json: entry 0 .* lacks a 'question' or 'image'"):
        read_vqa_json(path)
    path = _write(tmp_path, [{"question": "a", "image": "1.jpg"}])
    with pytest.raises(ValueError, match=r"entry 0 .* has no answer"):
        read_vqa_json(path)
    assert read_vqa_json(path, require_answer=False)[0].answers == []  # test files lack them


def test_empty_answers_are_neither_targets_nor_candidates(tmp_path, caplog):
    path = _write(tmp_path, [{"question": "a", "image": "1.jpg", "answer": ["x", "", " "]},
                             {"question": "b", "image": "1.jpg", "answer": ""}])
    with pytest.raises(ValueError, match=r"entry 1 \(question 'b'\) has no answer \(only 1 "
                                         r"empty strings\)"):
        read_vqa_json(path)
    questions = read_vqa_json(path, require_answer=False)
    assert [q.answers for q in questions] == [["x"], []]
    assert "3 empty answer strings ignored" in caplog.text


def test_broken_or_empty_json_names_the_file(tmp_path):
    path = tmp_path / "vqa.json"
    for text, message in [("", r"vqa\.json: not valid json"),
                          ("[]", r"vqa\.json: an empty list")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_vqa_json(path)


def _answer_list_module(tmp_path: Path, answers) -> VQADataModule:
    Image.new("RGB", (40, 30)).save(tmp_path / "1.jpg")
    path = _write(tmp_path, [{"question": "a", "image": "1.jpg", "answer": ["net"]},
                             {"question": "b", "image": "1.jpg", "answer": "pitcher"}])
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    return VQADataModule(str(tmp_path), train_files=str(path), val_file=str(path),
                         answer_list=str(tmp_path / "answers.json"), image_size=32,
                         batch_size=2, num_workers=0, pin_memory=False)


def test_bad_answer_list_fails_at_setup_naming_the_option(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match=r"data\.answer_list: no file at .*gone\.json"):
        VQADataModule(str(tmp_path), answer_list=str(tmp_path / "gone.json"))
    # An empty list crashed the tokenizer with an IndexError after a training epoch.
    dm = _answer_list_module(tmp_path, [])
    with pytest.raises(ValueError, match=r"data\.answer_list .*answers\.json: no answer in it"):
        dm.setup("fit")
    dm = _answer_list_module(tmp_path, ["", "net", "pitcher"])
    dm.setup("fit")
    assert dm.answer_candidates()["answers"] == ["net", "pitcher"]
    assert "1 empty answer strings ignored" in caplog.text
    # The list of another data set: every answer wrong, said once at setup.
    caplog.clear()
    dm = _answer_list_module(tmp_path, ["zebra", "giraffe"])
    dm.setup("fit")
    assert "holds none of the 2 distinct answers of train" in caplog.text


def test_batch_larger_than_the_training_set_with_drop_last_is_refused(tmp_path):
    dm = _answer_list_module(tmp_path, ["net"])
    dm.hparams.batch_size = 3
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"train: 2 questions per process, fewer than "
                                         r"data\.batch_size=3"):
        dm.train_dataloader()


# ---------------------------------------------------------------------------------------------
# Official checkpoints
def test_official_vqa_layout_at_full_size():
    with torch.device("meta"):
        task = VQATask(vision={"img_size": 384}, text={"pretrained": None}, init_weights=False)
    exported = export_official(task)
    assert list(exported) == list(official_layout("vqa"))  # 1154 keys, the original's order
    assert len(exported) == 1154


def test_official_vqa_state_dict_loads_into_the_task(tmp_path):
    source = tiny_task(seed=3)
    official = export_official(source)
    assert detect_layout(official) == "vqa"
    assert "text_decoder_m.bert.encoder.layer.1.crossattention.self.key.weight" in official
    assert torch.equal(official["text_decoder.cls.predictions.decoder.weight"],
                       official["text_decoder.bert.embeddings.word_embeddings.weight"])
    path = tmp_path / "vqa.pth"
    torch.save({"model": official}, path)

    task = tiny_task(seed=4)
    assert load_official_into_task(task, path).clean
    for key, value in source.state_dict().items():
        assert torch.equal(task.state_dict()[key], value), key

    from albef_pl.convert import main as convert

    assert convert([str(path), str(tmp_path / "vqa.ckpt"), "--task", "vqa"]) == 0
    ckpt = torch.load(tmp_path / "vqa.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["_class_path"] == "albef_pl.tasks.vqa.VQATask"
    for key, value in source.state_dict().items():
        assert torch.equal(ckpt["state_dict"][key], value), key


def test_pretraining_checkpoint_fills_the_decoder_as_vqa_py(tmp_path):
    from albef_pl.tasks import PretrainTask

    torch.manual_seed(5)
    pre = PretrainTask(vision=tiny_vision(), text=tiny_text(), embed_dim=16, queue_size=8,
                       init_weights=False)
    path = tmp_path / "ALBEF.pth"
    torch.save({"model": export_official(pre)}, path)

    task = tiny_task(seed=6, init_checkpoint=str(path))
    for owner, src in ((task.model, pre.model), (task.teacher, pre.teacher)):
        dec = owner.answer_decoder.state_dict()
        for j in range(2):
            for name, value in src.fusion_encoder.layers[j].state_dict().items():
                torch.testing.assert_close(dec[f"layers.{j}.{name}"], value)
        torch.testing.assert_close(dec["lm_head.bias"], src.mlm_head.bias)
        torch.testing.assert_close(dec["embeddings.word_embeddings.weight"],
                                   src.text_encoder.embeddings.word_embeddings.weight)


def test_pretraining_checkpoint_with_narrow_image_tokens_leaves_decoder_key_value_fresh(
    tmp_path,
):
    from albef_pl.tasks import PretrainTask

    torch.manual_seed(7)  # image tokens 16 wide, text 32: as the CPU recipes (192 vs 384)
    pre = PretrainTask(vision=tiny_vision(embed_dim=16), text=tiny_text(), embed_dim=16,
                       queue_size=8, init_weights=False)
    path = tmp_path / "small.pth"
    torch.save({"model": export_official(pre)}, path)

    task = tiny_task(seed=8, vision=tiny_vision(embed_dim=16))
    fresh = task.model.answer_decoder.layers[0].crossattention.self.key.weight.clone()
    report = load_official_into_task(task, path)
    assert report.clean
    cross = "answer_decoder.layers.0.crossattention.self."
    assert f"model.{cross}key.weight" in report.kept and f"teacher.{cross}value.weight" in report.kept
    dec = task.model.answer_decoder.layers[0].crossattention
    assert dec.self.key.weight.shape == (32, 32) and torch.equal(dec.self.key.weight, fresh)
    src = pre.model.fusion_encoder.layers[0].crossattention
    torch.testing.assert_close(dec.self.query.weight, src.self.query.weight)  # same width
    torch.testing.assert_close(dec.output.dense.weight, src.output.dense.weight)


# ---------------------------------------------------------------------------------------------
# The real CLI on the shared sample
def _tiny_override(tmp: Path) -> Path:
    override = {
        "trainer": {
            "max_epochs": 1, "limit_train_batches": 2, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(tmp),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp), "name": "csv"}},
            "callbacks": [
                {"class_path": "albef_pl.callbacks.MomentumTeacher"},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True,
                               "monitor": "val/vqa_acc", "mode": "max"}},
            ],
        },
        "model": {"init_args": {
            "vision": vars(tiny_vision()),
            "text": {**vars(tiny_text()), "vocab_size": 30522},  # real token ids
            "init_weights": False, "result_dir": str(tmp / "results"),
        }},
        "data": {"init_args": {"image_size": 32, "batch_size": 8, "eval_batch_size": 16}},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


@requires_shared
def test_cli_fit_validate_and_predict_on_the_sample(tmp_path, monkeypatch):
    from albef_pl.cli import run_cli

    monkeypatch.chdir(ROOT)  # the config's data paths are relative to the project
    base = ["--config", str(SAMPLE_CONF), "--config", str(_tiny_override(tmp_path))]
    fit = run_cli(["fit", *base])
    metrics = {k: float(v) for k, v in fit.trainer.callback_metrics.items()}
    assert fit.trainer.global_step == 2
    assert 0.0 <= metrics["val/vqa_acc"] <= 1.0 and math.isfinite(metrics["train/loss_epoch"])

    ckpt = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert "teacher.answer_decoder.layers.1.crossattention.self.key.weight" in state
    assert not any(k.startswith("queue.") for k in state)
    val = run_cli(["validate", *base, "--ckpt_path", str(ckpt)])
    assert float(val.trainer.callback_metrics["val/vqa_acc"]) == pytest.approx(
        metrics["val/vqa_acc"])

    run_cli(["predict", *base, "--ckpt_path", str(ckpt)])
    rows = json.loads((tmp_path / "results" / "vqa_result.json").read_text())
    raw = json.loads(SAMPLE_JSON.read_text())
    assert [r["question_id"] for r in rows] == [e["question_id"] for e in raw]
    candidates = {a for e in raw for a in e["answer"]}
    assert all(set(r) == {"question_id", "answer"} and r["answer"] in candidates for r in rows)
    # The accuracy of the written answers is the logged one.
    acc = sum(vqa_accuracy(r["answer"], e["answer"]) for r, e in zip(rows, raw)) / len(raw)
    assert acc == pytest.approx(metrics["val/vqa_acc"], abs=1e-6)

    # Output and evaluation options of the command line win over the checkpoint's (LightningCLI
    # put back the saved result_dir and k_test: answers went over the training run's file).
    other = tmp_path / "other"
    pred = run_cli(["predict", *base, "--ckpt_path", str(ckpt), "--model.result_dir",
                    str(other), "--model.k_test", "1"])
    assert pred.model.hparams.k_test == 1 and pred.model.hparams.result_dir == str(other)
    assert len(json.loads((other / "vqa_result.json").read_text())) == len(raw)


@requires_shared
def test_cli_constructor_error_is_one_line(tmp_path, monkeypatch, capsys):
    from albef_pl.cli import run_cli

    monkeypatch.chdir(ROOT)
    base = ["--config", str(SAMPLE_CONF), "--config", str(_tiny_override(tmp_path))]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", *base, "--model.k_test", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: model.decoder_layers and model.k_test must be >= 1, got 2 and 0" in err
    assert "Union subtypes" not in err and "Given value" not in err  # no namespace dump


def test_repeated_question_ids_are_refused_for_evaluation_and_warned_for_training(tmp_path, caplog):
    Image.new("RGB", (40, 30)).save(tmp_path / "1.jpg")
    path = _write(tmp_path, [{"question_id": 7, "question": "a", "image": "1.jpg", "answer": ["x"]},
                             {"question_id": 7, "question": "b", "image": "1.jpg", "answer": ["y"]},
                             {"question_id": 8, "question": "c", "image": "1.jpg", "answer": ["z"]}])
    dm = VQADataModule(str(tmp_path), train_files=str(path), test_file=str(path), image_size=32,
                       batch_size=1, num_workers=0, pin_memory=False)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3
    assert "train: 1 question ids occur more than once" in caplog.text
    with pytest.raises(ValueError, match=r"test: 1 question ids occur more than once in .*e\.g\. "
                                         r"\[7\]; every evaluated question needs its own id"):
        dm.setup("test")


def test_questions_without_a_readable_image_still_get_an_answer_in_the_result_file(caplog):
    from types import SimpleNamespace

    from data_modules.vqa import VQAQuestion

    task = tiny_task()
    ids, mask = _answers([[1, 5, 2], [1, 6, 2]])
    task.set_answer_candidates(["net", "pitcher"], ids, mask)
    entries = [VQAQuestion(q, "q?", f"{q}.jpg", "vqa", []) for q in (3, 4, 5)]
    dm = SimpleNamespace(datasets={"test": SimpleNamespace(entries=entries)})
    task._trainer = SimpleNamespace(datamodule=dm)
    rows = [{"question_id": 4, "answer": "pitcher"}]  # questions 3 and 5 lost their images
    with caplog.at_level(logging.WARNING):
        extra = task._answers_for_unread("test", rows)
    assert extra == [{"question_id": 3, "answer": "net"}, {"question_id": 5, "answer": "net"}]
    assert "2 questions had no readable image" in caplog.text
    assert task._answers_for_unread("test", rows + extra) == []
