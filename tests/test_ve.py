"""SNLI-VE: the distilled loss against the hand formula, labels, the teacher, overfitting a
tiny set, the data module on the shared sample and on bad files, official checkpoints
through albef_pl.convert, and the real CLI (fit, validate, predict) on the sample."""

from __future__ import annotations

import json
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
from albef_pl.losses import classifier_loss
from albef_pl.momentum import ema_update
from albef_pl.tasks.ve import LABEL_NAMES, LABELS, VisualEntailmentTask
from conftest import ROOT, SHARED, requires_shared, tiny_text, tiny_vision
from data_modules.listed import UnpaddedDistributedSampler
from data_modules.ve import VEDataModule, parse_label, read_ve_json

SAMPLE_CONF = ROOT / "conf" / "finetune" / "ve_sample.yaml"
SAMPLE_JSON = SHARED / "data" / "vl_tasks" / "albef_format" / "ve_sample.json"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_task(seed: int = 0, **kw) -> VisualEntailmentTask:
    torch.manual_seed(seed)
    kw.setdefault("vision", tiny_vision())
    kw.setdefault("text", tiny_text(pooling="mean"))
    return VisualEntailmentTask(init_weights=False, **kw)


# ---------------------------------------------------------------------------------------------
# Loss and labels
LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 1.0]])
TEACHER = torch.tensor([[1.0, 0.0, 0.0], [-2.0, 1.0, 3.0]])
TARGETS = torch.tensor([0, 2])


def _log_softmax(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def _softmax(row: list[float]) -> list[float]:
    return [math.exp(v) for v in _log_softmax(row)]


def test_loss_without_distillation_is_cross_entropy_by_hand():
    hand = -sum(_log_softmax(r)[y] for r, y in zip(LOGITS.tolist(), TARGETS.tolist())) / 2
    assert float(classifier_loss(LOGITS, TARGETS)) == pytest.approx(hand, abs=1e-6)
    # alpha 0 ignores the teacher.
    assert float(classifier_loss(LOGITS, TARGETS, TEACHER, 0.0)) == pytest.approx(hand, abs=1e-6)


def test_loss_with_distillation_matches_the_hand_formula():
    alpha = 0.4
    total = 0.0
    for row, t_row, y in zip(LOGITS.tolist(), TEACHER.tolist(), TARGETS.tolist()):
        logp, q = _log_softmax(row), _softmax(t_row)
        total += (1 - alpha) * -logp[y] - alpha * sum(qc * lc for qc, lc in zip(q, logp))
    got = classifier_loss(LOGITS, TARGETS, TEACHER, alpha)
    assert float(got) == pytest.approx(total / 2, abs=1e-6)
    # Worked on paper: rows 0.6228 (CE 0.2413, distillation 1.1949) and 0.6011 (0.5514, 0.6758).
    assert float(got) == pytest.approx(0.6120053, abs=1e-6)


def test_labels_follow_the_original_numbering():
    assert LABELS == {"entailment": 2, "neutral": 1, "contradiction": 0}
    assert LABEL_NAMES == ("contradiction", "neutral", "entailment")
    assert [parse_label(v) for v in ("entailment", "Neutral ", "CONTRADICTION", 2, 0, "1")] == [
        2, 1, 0, 2, 0, 1]
    for bad in ("yes", 3, -1, True, None, 1.0):
        with pytest.raises(ValueError, match="not"):
            parse_label(bad)


# ---------------------------------------------------------------------------------------------
# Model, teacher, learning
@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_unused_modules_are_removed_and_every_parameter_gets_a_gradient():
    task = tiny_task()
    for owner in (task.model, task.teacher):
        for name in ("mlm_head", "vision_proj", "text_proj", "itm_head", "temp"):
            assert getattr(owner, name, None) is None, name
    assert task.queue is None
    assert not any(k.startswith("queue.") for k in task.state_dict())
    assert float(task.alpha) == pytest.approx(0.4)  # constant from step 0 (no warm-up)

    image, ids, mask = torch.randn(3, 3, 32, 32), torch.randint(5, 128, (3, 7)), torch.ones(3, 7)
    loss = task.training_step({"image": image, "input_ids": ids, "attention_mask": mask.long(),
                               "label": torch.tensor([0, 1, 2])}, 0)
    loss.backward()
    trainable = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("model.") for n, _ in trainable)
    assert [n for n, p in trainable if p.grad is None] == []  # DDP finds nothing unused


def test_teacher_has_a_head_and_follows_the_student_by_ema():
    task = tiny_task()
    head, head_m = task.model.cls_head, task.teacher.cls_head
    assert head_m is not head and torch.equal(head_m[2].weight, head[2].weight)
    assert not any(p.requires_grad for p in task.teacher.parameters())

    with torch.no_grad():  # a fake optimizer step
        for p in task.model.parameters():
            p.add_(0.1)
    before = {n: p.clone() for n, p in task.teacher.named_parameters()}
    callback = MomentumTeacher()
    trainer = types.SimpleNamespace(global_step=1)
    callback.on_train_batch_end(trainer, task, None, None, 0)
    student = dict(task.model.named_parameters())
    m = task.hparams.momentum
    for name, p in task.teacher.named_parameters():
        expected = m * before[name] + (1 - m) * student[name]
        torch.testing.assert_close(p, expected, atol=1e-6, rtol=0)
    assert not torch.equal(task.teacher.cls_head[0].weight, before["cls_head.0.weight"])
    callback.on_train_batch_end(trainer, task, None, None, 1)  # same step: no second update
    assert callback.updates == 1


def test_tiny_model_overfits_four_pairs():
    task = tiny_task(seed=1)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 3, 32, 32, generator=g)
    ids = torch.randint(5, 128, (4, 6), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    labels = torch.tensor([2, 1, 0, 1])
    opt = torch.optim.AdamW(task.parameter_groups(), lr=1e-3)
    for _ in range(40):
        task.train()
        logits = task(image, ids, mask)
        with torch.no_grad():
            teacher_logits = task.classify(task.teacher, image, ids, mask)
        loss = classifier_loss(logits, labels, teacher_logits, 0.4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(task.teacher, task.model, 0.9)
    task.eval()
    with torch.no_grad():
        pred = task(image, ids, mask).argmax(1)
    assert pred.tolist() == labels.tolist()
    assert float(loss.detach()) < 0.5


# ---------------------------------------------------------------------------------------------
# Data
@requires_shared
def test_data_module_reads_the_shared_sample():
    dm = VEDataModule(str(SHARED / "data" / "vl_tasks"), train_file=str(SAMPLE_JSON),
                      val_file=str(SAMPLE_JSON), image_size=32, batch_size=16, num_workers=0,
                      pin_memory=False)
    dm.setup("fit")
    pairs = dm.datasets["train"].pairs
    assert len(pairs) == 16 and all(Path(p.image).is_file() for p in pairs)
    assert sorted(sum(p.label == c for p in pairs) for c in range(3)) == [4, 6, 6]
    assert dm.skipped_counts("train") == {"missing_image": 0, "corrupt_image": 0}
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["num_skipped"] == 0
    assert batch["index"].tolist() == list(range(16))
    raw = json.loads(SAMPLE_JSON.read_text())
    assert batch["label"].tolist() == [LABELS[e["label"]] for e in raw]
    assert batch["sentence"][0] == raw[0]["sentence"]
    assert (batch["input_ids"][:, 0] == 101).all()  # [CLS], no [SEP] (ALBEF's layout)


def _write(root: Path, entries: list[dict]) -> Path:
    path = root / "ve.json"
    path.write_text(json.dumps(entries))
    return path


def test_bare_ids_missing_and_corrupt_images_are_named_and_counted(tmp_path, caplog):
    for k, name in enumerate(["101", "102"]):
        Image.new("RGB", (40, 30), (60 * k, 90, 120)).save(tmp_path / f"{name}.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    path = _write(tmp_path, [
        {"image": "101", "sentence": "A Dog, running!", "label": "entailment"},
        {"image": "gone", "sentence": "x", "label": 0},
        {"image": "bad.jpg", "sentence": "y", "label": 1},
        {"image": "102", "sentence": "z", "label": "contradiction"},
    ])
    dm = VEDataModule(str(tmp_path), train_file=str(path), image_size=32, batch_size=4,
                      num_workers=0, pin_memory=False, drop_last=False)
    dm.setup("fit")
    assert dm.skipped_counts("train")["missing_image"] == 1
    assert str(tmp_path / "gone.jpg") in caplog.text  # '.jpg' added to a bare id
    batch = next(iter(dm.train_dataloader()))
    assert batch["num_skipped"] == 1 and "bad.jpg" in caplog.text
    assert batch["label"].tolist() == [2, 0] or batch["label"].tolist() == [0, 2]
    texts = dict(zip(batch["label"].tolist(), batch["sentence"]))
    assert texts[2] == "A Dog, running!"  # raw in the batch; pre_caption'd for the tokenizer


def test_bad_label_names_the_file_and_the_entry(tmp_path):
    path = _write(tmp_path, [{"image": "1", "sentence": "a", "label": "neutral"},
                             {"image": "2", "sentence": "b", "label": "maybe"}])
    with pytest.raises(ValueError, match=r"ve\.json: entry 1 \(image '2'\): label 'maybe'"):
        read_ve_json(path)
    path = _write(tmp_path, [{"image": "1", "sentence": "a"}])
    with pytest.raises(ValueError, match=r"ve\.json: entry 0 .* has no 'label'"):
        read_ve_json(path)
    assert read_ve_json(path, require_label=False)[0].label == -1  # predict files may lack it


def test_broken_json_empty_list_and_non_string_fields_name_the_file(tmp_path):
    path = tmp_path / "ve.json"
    for text, message in [("", r"ve\.json: not valid json"),
                          ('[{"image": ', r"ve\.json: not valid json \(Expecting value"),
                          ("[]", r"ve\.json: an empty list")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_ve_json(path)
    # null would have become the hypothesis "None" and the image "None.jpg"
    for field in ("sentence", "image"):
        entry = {"image": "1", "sentence": "a", "label": 0, field: None}
        path = _write(tmp_path, [entry])
        with pytest.raises(ValueError, match=r"entry 0 .* lacks an 'image' or 'sentence' str"):
            read_ve_json(path)
    path = _write(tmp_path, [{"image": "1", "sentence": "a"}])
    with pytest.raises(ValueError, match="predict takes unlabelled files"):
        read_ve_json(path)


def test_missing_json_file_is_named_by_its_option_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.val_file: no file at .*nope\.json"):
        VEDataModule(str(tmp_path), train_file=None, val_file=str(tmp_path / "nope.json"))


def test_batch_larger_than_the_training_set_with_drop_last_is_refused(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "1.jpg")
    path = _write(tmp_path, [{"image": "1", "sentence": "a", "label": k % 3} for k in range(5)])
    dm = VEDataModule(str(tmp_path), train_file=str(path), image_size=32, batch_size=8,
                      num_workers=0, pin_memory=False)
    dm.setup("fit")
    # Lightning would stop fit at once with "No training batches" and exit 0.
    with pytest.raises(ValueError, match=r"train: 5 pairs per process, fewer than "
                                         r"data\.batch_size=8 .* --data\.drop_last false"):
        dm.train_dataloader()
    dm.hparams.drop_last = False
    assert len(dm.train_dataloader()) == 1


def test_evaluation_sampler_gives_every_pair_to_exactly_one_process():
    data = list(range(7))
    shares = [list(UnpaddedDistributedSampler(data, 3, r)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(UnpaddedDistributedSampler(data, 3, r)) for r in range(3)] == [3, 2, 2]


# ---------------------------------------------------------------------------------------------
# Official checkpoints
def test_official_ve_layout_at_full_size():
    with torch.device("meta"):
        task = VisualEntailmentTask(vision={"img_size": 384}, text={"pretrained": None},
                                    init_weights=False)
    exported = export_official(task)
    assert list(exported) == list(official_layout("snli_ve"))  # 824 keys, in the original's order
    assert len(exported) == 824


def test_official_ve_state_dict_loads_into_the_task(tmp_path):
    source = tiny_task(seed=3)
    official = export_official(source)
    assert detect_layout(official) == "snli_ve"
    assert "cls_head_m.2.weight" in official and "text_encoder.encoder.layer.3.crossattention." \
        "self.key.weight" in official
    path = tmp_path / "ve.pth"
    torch.save({"model": official}, path)

    task = tiny_task(seed=4)
    report = load_official_into_task(task, path)
    assert report.clean
    for key, value in source.state_dict().items():
        assert torch.equal(task.state_dict()[key], value), key

    # The command line: albef-pl-convert ve.pth ve.ckpt --task ve (a Lightning checkpoint).
    from albef_pl.convert import main as convert

    assert convert([str(path), str(tmp_path / "ve.ckpt"), "--task", "ve"]) == 0
    ckpt = torch.load(tmp_path / "ve.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["_class_path"] == "albef_pl.tasks.ve.VisualEntailmentTask"
    for key, value in source.state_dict().items():
        assert torch.equal(ckpt["state_dict"][key], value), key


def test_pretraining_checkpoint_initialises_encoders_and_a_fresh_head(tmp_path):
    from albef_pl.tasks import PretrainTask

    torch.manual_seed(5)
    pre = PretrainTask(vision=tiny_vision(), text=tiny_text(), embed_dim=16, queue_size=8,
                       init_weights=False)
    path = tmp_path / "ALBEF.pth"
    torch.save({"model": export_official(pre)}, path)

    task = tiny_task(seed=6, vision=tiny_vision(img_size=48), init_checkpoint=str(path))
    pos = task.model.visual_encoder.pos_embed
    assert pos.shape == (1, 1 + 9, 32)  # 32 -> 48 px, resized as 256 -> 384 in the paper
    torch.testing.assert_close(pos[:, 0], pre.model.visual_encoder.pos_embed[:, 0])
    w = "fusion_encoder.layers.1.crossattention.self.value.weight"
    torch.testing.assert_close(task.model.state_dict()[w], pre.model.state_dict()[w])
    torch.testing.assert_close(task.teacher.state_dict()[w], pre.teacher.state_dict()[w])
    assert torch.equal(task.teacher.cls_head[0].weight, task.model.cls_head[0].weight)


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
                               "monitor": "val/acc", "mode": "max"}},
            ],
        },
        "model": {"init_args": {
            "vision": vars(tiny_vision()),
            "text": {**vars(tiny_text(pooling="mean")), "vocab_size": 30522},  # real token ids
            "init_weights": False, "predict_dir": str(tmp / "predictions"),
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
    assert 0.0 <= metrics["val/acc"] <= 1.0 and math.isfinite(metrics["train/loss_epoch"])
    assert metrics["val/acc"] * 16 == pytest.approx(round(metrics["val/acc"] * 16))  # 16 pairs

    ckpt = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert "teacher.cls_head.2.weight" in state and not any(k.startswith("queue.") for k in state)
    val = run_cli(["validate", *base, "--ckpt_path", str(ckpt)])
    assert float(val.trainer.callback_metrics["val/acc"]) == pytest.approx(metrics["val/acc"])

    run_cli(["predict", *base, "--ckpt_path", str(ckpt)])
    out = json.loads((tmp_path / "predictions" / "ve_predictions.json").read_text())
    rows = out["predictions"]
    assert len(rows) == 16 and rows[0]["sentence"] == "A toddler sleeps outside."
    assert rows[0]["image"].endswith("images/visual_entailment/2248275918.jpg")
    assert rows[0]["label"] == "contradiction" and rows[0]["prediction"] in LABELS
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert out["accuracy"] == pytest.approx(metrics["val/acc"])


@requires_shared
def test_cli_predict_without_any_checkpoint_warns_of_untrained_weights(
    tmp_path, monkeypatch, caplog
):
    from albef_pl.cli import run_cli

    monkeypatch.chdir(ROOT)
    base = ["--config", str(SAMPLE_CONF), "--config", str(_tiny_override(tmp_path))]
    run_cli(["predict", *base, "--trainer.limit_predict_batches", "1"])
    assert "predict without --ckpt_path or model.init_checkpoint" in caplog.text
    assert (tmp_path / "predictions" / "ve_predictions.json").is_file()  # still written


def _own_files(tmp: Path, val_text: str | None = None, corrupt_val: bool = False) -> list[str]:
    """Options pointing the VE sample config at two tiny readable training pairs and a val
    file in ``tmp``: broken json (``val_text``) or pairs whose images do not decode."""
    for name in ("1", "2"):
        Image.new("RGB", (40, 30), (80, 90, 100)).save(tmp / f"{name}.jpg")
    (tmp / "bad1.jpg").write_bytes(b"not a jpeg")
    (tmp / "bad2.jpg").write_bytes(b"")
    train = tmp / "train.json"
    train.write_text(json.dumps([{"image": n, "sentence": "a b", "label": 0} for n in "12"]))
    val = tmp / "val.json"
    if val_text is not None:
        val.write_text(val_text)
    elif corrupt_val:
        val.write_text(json.dumps([{"image": f"bad{k}", "sentence": "c", "label": 1}
                                   for k in (1, 2)]))
    return ["--data.image_root", str(tmp), "--data.train_file", str(train),
            "--data.val_file", str(val), "--data.test_file", "null",
            "--data.batch_size", "2", "--data.eval_batch_size", "2"]


def _main_fails(args: list[str], capsys) -> str:
    from albef_pl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_cli_broken_val_json_found_at_setup_is_one_line_without_traceback(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("ALBEF_PL_TRACEBACK", raising=False)
    err = _main_fails(["fit", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), *_own_files(tmp_path, '[{"image": ')],
                      capsys)
    assert "error: data (VEDataModule, set-up): " in err
    assert f"{tmp_path / 'val.json'}: not valid json" in err
    assert "Traceback" not in err


def test_cli_validation_whose_images_all_fail_to_decode_names_the_file(
    tmp_path, monkeypatch, capsys
):
    # Before: the run trained an epoch and stopped on ModelCheckpoint's "could not find the
    # monitored key val/acc", which says nothing about the images.
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("ALBEF_PL_TRACEBACK", raising=False)
    err = _main_fails(["fit", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), *_own_files(tmp_path, corrupt_val=True),
                       "--trainer.num_sanity_val_steps", "0"], capsys)
    assert (f"val: none of the 2 images read from {tmp_path / 'val.json'} could be decoded"
            in err)
    assert "monitored key" not in err and "Traceback" not in err


@pytest.mark.parametrize("module, option, value", [
    ("ve", "batch_size", 0), ("ve", "eval_batch_size", 0), ("ve", "max_words", 0),
    ("vqa", "batch_size", -2), ("vqa", "answer_max_length", 0),
    ("retrieval", "text_batch_size", 0), ("retrieval", "num_workers", -1),
])
def test_fine_tuning_data_sizes_below_their_minimum_are_refused_by_name(module, option, value,
                                                                       tmp_path):
    """At construction (before the model is built), not as a DataLoader traceback later."""
    from data_modules.retrieval import RetrievalDataModule
    from data_modules.vqa import VQADataModule

    cls = {"ve": VEDataModule, "vqa": VQADataModule, "retrieval": RetrievalDataModule}[module]
    kwargs = {"vqa_root" if module == "vqa" else "image_root": str(tmp_path)}
    with pytest.raises(ValueError, match=rf"data\.{option} must be an integer >= \d, got {value}"):
        cls(**kwargs, **{option: value})


def test_fine_tuning_tokenizer_that_cannot_load_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"data\.tokenizer: cannot load a tokenizer from"):
        VEDataModule(str(tmp_path), tokenizer=str(tmp_path / "no_vocab"))
