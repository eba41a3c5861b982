"""NLVR2: the two-image fusion (shared key/value, layer alternation), fusion layers duplicated
from pre-training, the distilled loss by hand, text-assignment sampling, the teacher after
init_checkpoint, the data module on the shared sample and on bad files, official checkpoints
through albef_pl.convert, and the real CLI (fit, validate, predict) on the sample."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from albef_pl.cli import run_cli
from albef_pl.convert import (
    convert_state_dict,
    detect_layout,
    export_official,
    load_official_into_task,
    official_layout,
)
from albef_pl.convert import main as convert
from albef_pl.models.text import FusionEncoder, PairFusionEncoder
from albef_pl.tasks import PretrainTask
from albef_pl.tasks.nlvr2 import (
    LABEL_NAMES,
    NLVR2Task,
    NLVR2TextAssignmentTask,
    sample_text_assignment,
)
from conftest import ROOT, SHARED, requires_shared, tiny_text, tiny_vision
from data_modules.nlvr2 import NLVR2DataModule, parse_nlvr2_label, read_nlvr2_json

SAMPLE_CONF = ROOT / "conf" / "finetune" / "nlvr2_sample.yaml"
SAMPLE_JSON = SHARED / "data" / "vl_tasks" / "albef_format" / "nlvr_sample.json"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_task(seed: int = 0, cls=NLVR2Task, **kw):
    torch.manual_seed(seed)
    kw.setdefault("vision", tiny_vision())
    kw.setdefault("text", tiny_text(pooling="mean"))
    if cls is NLVR2TextAssignmentTask:
        kw.setdefault("embed_dim", 16)
    return cls(init_weights=False, **kw)


def tiny_pretrain(seed: int = 5) -> PretrainTask:
    torch.manual_seed(seed)
    return PretrainTask(vision=tiny_vision(), text=tiny_text(pooling="mean"), embed_dim=16,
                        queue_size=8, init_weights=False)


def batch_of(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (b, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return {"image": torch.randn(b, 2, 3, 32, 32, generator=g), "input_ids": ids,
            "attention_mask": mask, "label": torch.arange(b) % 2}


# ---------------------------------------------------------------------------------------------
# The two-image fusion encoder
def test_pair_layers_share_key_and_value_objects_and_stay_equal_after_a_step():
    task = tiny_task()
    layers = task.model.fusion_encoder.layers
    assert isinstance(task.model.fusion_encoder, PairFusionEncoder) and len(layers) == 4
    for owner in (task.model, task.teacher):  # the teacher's copy keeps the sharing
        fl = owner.fusion_encoder.layers
        for j in (0, 2):
            even, odd = fl[j].crossattention.self, fl[j + 1].crossattention.self
            assert even.key.weight is odd.key.weight and even.value.bias is odd.value.bias
            assert even.query.weight is not odd.query.weight
            assert fl[j].crossattention.output is not fl[j + 1].crossattention.output
    state = task.model.fusion_encoder.state_dict()
    assert "layers.0.crossattention.self.key.weight" in state  # both names are stored
    assert "layers.1.crossattention.self.key.weight" in state
    # named_parameters (and so the optimizer) sees a shared tensor once: 4 tensors per pair.
    assert len(state) - len(dict(task.model.fusion_encoder.named_parameters())) == 2 * 4

    before = {k: v.clone() for k, v in state.items()}
    opt = torch.optim.SGD(task.parameter_groups(), lr=0.5)
    task.training_step(batch_of(), 0).backward()
    opt.step()
    after = task.model.fusion_encoder.state_dict()
    for name in ("key.weight", "key.bias", "value.weight", "value.bias"):
        even = after[f"layers.0.crossattention.self.{name}"]
        assert torch.equal(even, after[f"layers.1.crossattention.self.{name}"])
        assert not torch.equal(even, before[f"layers.0.crossattention.self.{name}"])
    # Queries start equal (layer 0 and 1 from the same layer) but train apart.
    q = "crossattention.self.query.weight"
    assert torch.equal(before[f"layers.0.{q}"], before[f"layers.1.{q}"])
    assert not torch.equal(after[f"layers.0.{q}"], after[f"layers.1.{q}"])


def test_even_layers_see_the_left_image_and_odd_layers_the_right_one():
    torch.manual_seed(0)
    cfg = tiny_text().to_bert_config()
    fusion = PairFusionEncoder(cfg, 4, encoder_width=24).eval()
    seen: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(fusion.layers):
        layer.crossattention.register_forward_hook(
            lambda m, args, out, i=i: seen.__setitem__(i, args[2]))
        layer.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out))
    text, mask = torch.randn(2, 5, 32), torch.ones(2, 5)
    left, right = torch.randn(2, 3, 24), torch.randn(2, 3, 24)
    fusion(text, mask, (left, right))
    assert [seen[i] is (left, right)[i % 2] for i in range(4)] == [True] * 4
    first = {i: o.clone() for i, o in outputs.items()}

    fusion(text, mask, (left, right + 1.0))  # only the right image changes
    assert torch.equal(outputs[0], first[0])  # layer 0 read only the left image
    assert not torch.allclose(outputs[1], first[1])  # layer 1 read the right one
    with pytest.raises(ValueError, match="tokens of 2 images"):
        fusion(text, mask, (left,))
    with pytest.raises(ValueError, match="even number of layers"):
        PairFusionEncoder(cfg, 3, encoder_width=24)


def test_swapping_the_images_changes_the_logits():
    task = tiny_task().eval()
    # Fresh pair layers are copies of one layer, so left-then-right and right-then-left
    # differ only at second order; training sets them apart, as this does.
    with torch.no_grad():
        for layer in task.model.fusion_encoder.layers[1::2]:
            for name in ("query", "key", "value"):
                getattr(layer.crossattention.self, name).weight.normal_(0, 0.5)
    batch = batch_of()
    with torch.no_grad():
        logits = task(batch["image"], batch["input_ids"], batch["attention_mask"])
        swapped = task(batch["image"].flip(1), batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (3, 2)
    assert (logits - swapped).abs().max() > 1e-3


def test_layers_of_a_pair_start_from_one_fusion_layer():
    torch.manual_seed(0)
    cfg = tiny_text().to_bert_config()
    single = FusionEncoder(cfg, 2, encoder_width=24)
    pair = PairFusionEncoder(cfg, 4, encoder_width=24)
    pair.duplicate_from(single)
    src = single.state_dict()
    for key, value in pair.state_dict().items():
        _, i, rest = key.split(".", 2)
        assert torch.equal(value, src[f"layers.{int(i) // 2}.{rest}"]), key
    with pytest.raises(ValueError, match="cannot fill"):
        PairFusionEncoder(cfg, 2, encoder_width=24).duplicate_from(single)


# ---------------------------------------------------------------------------------------------
# Starting weights
@pytest.mark.parametrize("form", ["official", "ours"])
def test_pretraining_checkpoint_fills_both_layers_of_each_pair(tmp_path, form: str):
    pre = tiny_pretrain()
    path = tmp_path / "pre.pth"
    torch.save({"model": export_official(pre)} if form == "official"
               else {"state_dict": pre.state_dict()}, path)
    task = tiny_task(seed=6, init_checkpoint=str(path))
    for owner, src in (("model", pre.model), ("teacher", pre.teacher)):
        ours = getattr(task, owner).fusion_encoder.state_dict()
        theirs = src.fusion_encoder.state_dict()
        for key, value in ours.items():
            _, i, rest = key.split(".", 2)
            torch.testing.assert_close(value, theirs[f"layers.{int(i) // 2}.{rest}"],
                                       rtol=0, atol=0, msg=f"{owner}.{key}")
    # The classifier is new; its teacher copy equals the student's.
    assert torch.equal(task.teacher.cls_head[0].weight, task.model.cls_head[0].weight)

    ta = tiny_task(seed=7, cls=NLVR2TextAssignmentTask, init_checkpoint=str(path))
    theirs = pre.model.fusion_encoder.state_dict()
    for key, value in ta.model.fusion_encoder.state_dict().items():
        _, i, rest = key.split(".", 2)
        assert torch.equal(value, theirs[f"layers.{int(i) // 2}.{rest}"]), key
    assert torch.equal(ta.model.vision_proj.weight, pre.model.vision_proj.weight)


@pytest.mark.parametrize("form", ["official", "ours"])
def test_teacher_starts_from_the_text_assignment_weights(tmp_path, form: str):
    ta = tiny_task(seed=3, cls=NLVR2TextAssignmentTask)
    with torch.no_grad():  # weights that no fresh model has
        for p in ta.model.parameters():
            p.add_(0.05)
    path = tmp_path / "ta.pth"
    torch.save({"model": export_official(ta)} if form == "official"
               else {"state_dict": ta.state_dict()}, path)

    task = tiny_task(seed=4, init_checkpoint=str(path))
    student = dict(task.model.named_parameters())
    teacher = dict(task.teacher.named_parameters())
    assert set(student) == set(teacher)
    for name, p in teacher.items():
        assert torch.equal(p, student[name]), name  # the original's teacher stays BERT's
    src = ta.model.state_dict()
    for key, value in task.teacher.state_dict().items():
        if not key.startswith("cls_head."):
            assert torch.equal(value, src[key]), key


# ---------------------------------------------------------------------------------------------
# Loss
def _log_softmax(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def test_training_loss_is_the_distilled_cross_entropy_by_hand():
    task = tiny_task(seed=2).eval()  # no dropout, so the step can be recomputed
    with torch.no_grad():  # a teacher that differs from the student
        for p in task.teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    task.alpha.fill_(0.4)
    batch = batch_of(4, seed=1)
    loss = task.training_step(batch, 0)
    with torch.no_grad():
        s = task(batch["image"], batch["input_ids"], batch["attention_mask"]).tolist()
        t = task.classify(task.teacher, batch["image"], batch["input_ids"],
                          batch["attention_mask"]).tolist()
    hand = 0.0
    for row, t_row, y in zip(s, t, batch["label"].tolist()):
        logp, q = _log_softmax(row), [math.exp(v) for v in _log_softmax(t_row)]
        hand += 0.6 * -logp[y] - 0.4 * sum(qc * lc for qc, lc in zip(q, logp))
    assert float(loss) == pytest.approx(hand / 4, abs=1e-5)
    assert abs(s[0][0] - t[0][0]) > 1e-4  # the teacher term mattered

    task.alpha.fill_(0.0)  # alpha 0 (start of the warm-up): plain cross-entropy
    plain = -sum(_log_softmax(r)[y] for r, y in zip(s, batch["label"].tolist())) / 4
    assert float(task.training_step(batch, 0)) == pytest.approx(plain, abs=1e-5)


def test_fine_tune_defaults_follow_the_paper():
    task = tiny_task()
    h = task.hparams
    assert (h.alpha, h.alpha_warmup, h.lr, h.min_lr, h.warmup_lr, h.warmup_steps) == (
        0.4, True, 2e-5, 1e-6, 1e-5, 100)
    assert float(task.alpha) == 0.0  # ramped up by MomentumTeacher over the first epoch
    assert task.model.cls_head[2].out_features == 2 and LABEL_NAMES == ("False", "True")
    for name in ("mlm_head", "vision_proj", "text_proj", "itm_head", "temp"):
        assert getattr(task.model, name, None) is None, name
    assert task.queue is None


# ---------------------------------------------------------------------------------------------
# Text assignment
def test_text_assignment_labels_are_a_third_each_and_negatives_never_the_positive():
    g = torch.Generator().manual_seed(0)
    feat = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    counts = torch.zeros(3)
    draws = 3000
    for _ in range(draws):
        left, right, labels = sample_text_assignment(feat, g)
        own = torch.arange(6)
        counts += torch.bincount(labels, minlength=3)
        for lab, l_, r_, o in zip(labels.tolist(), left.tolist(), right.tolist(), own.tolist()):
            if lab == 0:
                assert l_ == o and r_ != o
            elif lab == 1:
                assert r_ == o and l_ != o
            else:
                assert o not in (l_, r_) and l_ != r_
    share = counts / counts.sum()
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.015), share  # 18,000 labels


def test_text_assignment_negatives_follow_visual_similarity():
    # Images 0 and 1 are near twins; 2..4 point elsewhere: at temperature 0.07 image 0's
    # negative is image 1 with probability e^(1/0.07) / (e^(1/0.07) + 3) ~ 1.
    feat = torch.tensor([[1.0, 0, 0, 0], [0.999, 0.045, 0, 0], [0, 0, 1.0, 0],
                         [0, 0, 0, 1.0], [0, 0, -1.0, 0]])
    feat = torch.nn.functional.normalize(feat, dim=-1)
    g = torch.Generator().manual_seed(1)
    firsts = []
    for _ in range(200):
        left, right, labels = sample_text_assignment(feat, g)
        firsts.append(right[0] if labels[0] == 0 else left[0])
    assert sum(int(f) == 1 for f in firsts) >= 198

    # A batch of two has one other image: labels 0 and 1 only; a batch of one has none.
    left, right, labels = sample_text_assignment(feat[:2], torch.Generator().manual_seed(0))
    assert set(labels.tolist()) <= {0, 1}
    assert set(torch.stack([left, right], 1).tolist()[0]) == {0, 1}
    with pytest.raises(ValueError, match="at least 2 images"):
        sample_text_assignment(feat[:1])
    # Similarities so peaked that the other weights underflow to 0 still draw two others.
    left, right, labels = sample_text_assignment(feat, torch.Generator().manual_seed(0), 1e-4)
    assert ((left != right) | (labels != 2)).all()


def test_text_assignment_task_trains_its_head_and_keeps_the_projections():
    task = tiny_task(cls=NLVR2TextAssignmentTask)
    assert task.teacher is None and task.queue is None
    assert task.model.ta_head.out_features == 3
    assert task.model.mlm_head is None and task.model.itm_head is None
    frozen = [n for n, p in task.model.named_parameters() if not p.requires_grad]
    assert sorted(frozen) == ["temp", "text_proj.bias", "text_proj.weight",
                              "vision_proj.bias", "vision_proj.weight"]
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(5, 3, 32, 32, generator=g),
             "input_ids": torch.randint(5, 128, (5, 6), generator=g),
             "attention_mask": torch.ones(5, 6, dtype=torch.long)}
    loss = task.training_step(batch, 0)
    assert 0.5 < float(loss) < 3.0  # near log(3) for a fresh head
    loss.backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP finds no unused parameter


# ---------------------------------------------------------------------------------------------
# Official checkpoints
@pytest.mark.parametrize("cls,layout,keys", [(NLVR2Task, "nlvr2", 1136),
                                             (NLVR2TextAssignmentTask, "nlvr2_ta", 571)])
def test_official_layout_at_full_size(cls, layout: str, keys: int):
    with torch.device("meta"):
        task = cls(vision={"img_size": 384 if layout == "nlvr2" else 256},
                   text={"pretrained": None}, init_weights=False)
    exported = export_official(task)
    assert list(exported) == list(official_layout(layout))  # in the original's order
    assert len(exported) == keys
    assert len(task.model.fusion_encoder.layers) == 12


@pytest.mark.parametrize("source,cls,img_size", [
    ("pretrain", NLVR2TextAssignmentTask, 256), ("pretrain", NLVR2Task, 384),
    ("nlvr2_ta", NLVR2Task, 384), ("nlvr2", NLVR2Task, 384),
    ("nlvr2_ta", NLVR2TextAssignmentTask, 256)])
def test_official_files_fill_the_full_size_tasks(source: str, cls, img_size: int):
    with torch.device("meta"):
        task = cls(vision={"img_size": img_size}, text={"pretrained": None}, init_weights=False)
    official = {k: torch.empty(s, device="meta") for k, s in official_layout(source).items()}
    out, report = convert_state_dict(official, task.state_dict(), task.official_layout)
    assert report.clean, report.summary()
    fresh = {k for k, why in report.kept.items() if "new head" in why}
    copied = {k for k, why in report.kept.items() if "copied from the student" in why}
    heads = {f"{o}.cls_head.{i}.{w}" for o in ("model", "teacher") for i in (0, 2)
             for w in ("weight", "bias")}
    if source == "pretrain":  # each official fusion layer fills a pair
        key = "crossattention.self.query.weight"
        for j in range(6):
            src = official[f"text_encoder.bert.encoder.layer.{6 + j}.{key}"]
            assert out[f"model.fusion_encoder.layers.{2 * j}.{key}"] is src
            assert out[f"model.fusion_encoder.layers.{2 * j + 1}.{key}"] is src
        assert fresh == ({"model.ta_head.weight", "model.ta_head.bias"} if cls is
                         NLVR2TextAssignmentTask else heads)
    elif (source, cls) == ("nlvr2_ta", NLVR2Task):  # the teacher from the student
        assert fresh == heads and copied == {  # every teacher tensor but the classifier's
            k for k in task.state_dict() if k.startswith("teacher.") and k not in heads}
    else:
        assert fresh == set() and copied == set()
    assert set(out) | set(report.kept) == set(task.state_dict())


@pytest.mark.parametrize("cls,task_name", [(NLVR2Task, "nlvr2"),
                                           (NLVR2TextAssignmentTask, "nlvr2_ta")])
def test_export_load_and_convert_command_are_lossless(tmp_path, cls, task_name: str):
    source = tiny_task(seed=3, cls=cls)
    if source.teacher is not None:
        with torch.no_grad():
            for p in source.teacher.parameters():
                p.add_(0.01)
    official = export_official(source)
    assert detect_layout(official) == task_name
    assert "text_encoder.encoder.layer.5.crossattention.self.key.weight" in official  # 2 + 4
    path = tmp_path / f"{task_name}.pth"
    torch.save({"model": official}, path)

    task = tiny_task(seed=4, cls=cls)
    assert load_official_into_task(task, path).clean
    for key, value in source.state_dict().items():
        assert torch.equal(task.state_dict()[key], value), key

    # albef-pl-convert builds the task at the pre-trained depth (2 text + 2 fusion layers).
    assert convert([str(path), str(tmp_path / "out.ckpt"), "--task", task_name,
                    "--vision-heads", "2", "--text-heads", "2"]) == 0
    ckpt = torch.load(tmp_path / "out.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["_class_path"] == f"{cls.__module__}.{cls.__name__}"
    assert ckpt["hyper_parameters"]["text"]["num_hidden_layers"] == 4
    for key, value in source.state_dict().items():
        if key != "alpha":
            assert torch.equal(ckpt["state_dict"][key], value), key


# ---------------------------------------------------------------------------------------------
# Data
def test_labels_are_true_false_strings_bools_or_bits():
    assert [parse_nlvr2_label(v) for v in ("True", "false", " TRUE ", True, False, 1, 0, "0")] \
        == [1, 0, 1, 1, 0, 1, 0, 0]
    for bad in ("yes", 2, -1, None, 1.0, "maybe"):
        with pytest.raises(ValueError, match="is not one of 'True', 'False'"):
            parse_nlvr2_label(bad)


@requires_shared
def test_data_module_reads_the_shared_sample():
    dm = NLVR2DataModule(str(SHARED / "data" / "vl_tasks"), train_file=str(SAMPLE_JSON),
                         val_file=str(SAMPLE_JSON), image_size=32, batch_size=4,
                         eval_batch_size=8, num_workers=0, pin_memory=False)
    dm.setup("fit")
    pairs = dm.datasets["train"].pairs
    assert len(pairs) == 8 and all(Path(p).is_file() for e in pairs for p in e.images)
    raw = json.loads(SAMPLE_JSON.read_text())
    assert [p.label for p in pairs] == [int(e["label"] == "True") for e in raw]
    assert dm.skipped_counts("train") == {"missing_image": 0, "corrupt_image": 0}
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (8, 2, 3, 32, 32) and batch["num_skipped"] == 0
    assert not torch.equal(batch["image"][0, 0], batch["image"][0, 1])  # left != right
    assert batch["index"].tolist() == list(range(8))
    assert batch["image_paths"][0][1].endswith("images/nlvr2/dev-850-0-img1.png")
    assert batch["sentence"][0] == raw[0]["sentence"]
    assert (batch["input_ids"][:, 0] == 101).all()  # [CLS], no [SEP] (ALBEF's layout)


def _write(root: Path, entries: list) -> Path:
    path = root / "nlvr.json"
    path.write_text(json.dumps(entries))
    return path


def test_missing_and_corrupt_images_are_named_and_counted(tmp_path, caplog):
    for k, name in enumerate(["a", "b", "c"]):
        Image.new("RGB", (40, 30), (60 * k, 90, 120)).save(tmp_path / f"{name}.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    path = _write(tmp_path, [
        {"images": ["a.png", "b.png"], "sentence": "Two Dogs!", "label": "True"},
        {"images": ["a.png", "gone.png"], "sentence": "x", "label": "False"},
        {"images": ["bad.png", "c.png"], "sentence": "y", "label": True},
        {"images": ["c.png", "a.png"], "sentence": "z", "label": 0},
    ])
    dm = NLVR2DataModule(str(tmp_path), train_file=str(path), image_size=32, batch_size=4,
                         num_workers=0, pin_memory=False, drop_last=False)
    dm.setup("fit")
    assert dm.skipped_counts("train")["missing_image"] == 1
    assert str(tmp_path / "gone.png") in caplog.text
    assert [p.index for p in dm.datasets["train"].pairs] == [0, 2, 3]
    batch = next(iter(dm.train_dataloader()))
    assert batch["num_skipped"] == 1 and "bad.png" in caplog.text
    assert sorted(batch["label"].tolist()) == [0, 1]
    texts = dict(zip(batch["label"].tolist(), batch["sentence"]))
    assert texts[1] == "Two Dogs!"  # raw in the batch; pre_caption'd for the tokenizer
    assert batch["image"].shape == (2, 2, 3, 32, 32)


@pytest.mark.parametrize("entry,message", [
    ({"images": ["a.png"], "sentence": "s", "label": "True"}, r"entry 1 .* list of two image"),
    ({"images": "a.png", "sentence": "s", "label": "True"}, r"entry 1 .* list of two image"),
    ({"images": ["a.png", None], "sentence": "s", "label": "True"}, r"entry 1 .* two image"),
    ({"images": ["a.png", "b.png"], "label": "True"}, r"entry 1 \(images .*\) lacks a 'sen"),
    ({"images": ["a.png", "b.png"], "sentence": "s", "label": "yes"},
     r"entry 1 \(images \['a.png', 'b.png'\]\): label 'yes' is not one of"),
    ({"images": ["a.png", "b.png"], "sentence": "s"}, r"entry 1 .* has no 'label'"),
    ({"images": ["a.png", "b.png"], "sentence": "", "label": 1},
     r"entry 1 \(images .*\): sentence '' is empty once punctuation is removed"),
    ({"images": ["a.png", "b.png"], "sentence": " ?!... ", "label": 1},
     r"entry 1 .*: sentence ' \?!\.\.\. ' is empty"),
])
def test_bad_entries_name_the_file_and_the_entry(tmp_path, entry, message):
    good = {"images": ["a.png", "b.png"], "sentence": "s", "label": "False"}
    path = _write(tmp_path, [good, entry])
    with pytest.raises(ValueError, match=r"nlvr\.json: " + message):
        read_nlvr2_json(path)


def test_bad_files_are_named_and_predict_files_may_lack_labels(tmp_path):
    path = tmp_path / "nlvr.json"
    for text, message in [("", r"nlvr\.json: not valid json"), ("[]", "an empty list"),
                          ('{"images": []}', "expected a json list")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_nlvr2_json(path)
    path = _write(tmp_path, [{"images": ["a.png", "b.png"], "sentence": "s"}])
    pair = read_nlvr2_json(path, image_root="/img", require_label=False)[0]
    assert pair.label == -1 and pair.images == ("/img/a.png", "/img/b.png")
    with pytest.raises(FileNotFoundError, match=r"data\.test_file: no file at .*nope\.json"):
        NLVR2DataModule(str(tmp_path), test_file=str(tmp_path / "nope.json"))


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
        "data": {"init_args": {"image_size": 32, "batch_size": 4, "eval_batch_size": 8}},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


@requires_shared
def test_cli_fit_validate_and_predict_on_the_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's data paths are relative to the project
    base = ["--config", str(SAMPLE_CONF), "--config", str(_tiny_override(tmp_path))]
    fit = run_cli(["fit", *base])
    metrics = {k: float(v) for k, v in fit.trainer.callback_metrics.items()}
    assert fit.trainer.global_step == 2
    assert metrics["val/acc"] * 8 == pytest.approx(round(metrics["val/acc"] * 8))  # 8 pairs
    assert math.isfinite(metrics["train/loss_epoch"])
    assert float(fit.model.alpha) == pytest.approx(0.2)  # half way up the 2-step ramp

    ckpt = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert "teacher.cls_head.2.weight" in state and "model.fusion_encoder.layers.3." \
        "crossattention.self.key.weight" in state
    val = run_cli(["validate", *base, "--ckpt_path", str(ckpt)])
    assert float(val.trainer.callback_metrics["val/acc"]) == pytest.approx(metrics["val/acc"])

    run_cli(["predict", *base, "--ckpt_path", str(ckpt)])
    out = json.loads((tmp_path / "predictions" / "nlvr2_predictions.json").read_text())
    rows = out["predictions"]
    assert out["labels"] == ["False", "True"] and len(rows) == 8
    assert rows[0]["images"][0].endswith("images/nlvr2/dev-850-0-img0.png")
    assert rows[0]["label"] == "False" and rows[1]["label"] == "True"
    assert rows[0]["prediction"] in ("False", "True")
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert out["accuracy"] == pytest.approx(metrics["val/acc"])


@pytest.mark.parametrize("config,expected", [
    ("nlvr2.yaml", ("lr: 2.0e-05", "min_lr: 1.0e-06", "batch_size: 16", "max_epochs: 10",
                    "img_size: 384", "alpha_warmup: true", "devices: 8", "bf16-mixed",
                    "NLVR2Task", "NLVR2DataModule")),
    ("nlvr2_ta.yaml", ("lr: 2.0e-05", "min_lr: 1.0e-05", "batch_size: 64", "max_epochs: 1",
                       "img_size: 256", "ta_temp: 0.07", "NLVR2TextAssignmentTask",
                       "PretrainDataModule")),
])
def test_paper_recipes_print_their_values(config: str, expected, capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(ROOT / "conf" / "finetune" / config),
                 "--print_config"])
    out = capsys.readouterr().out
    for value in expected:
        assert value in out, value


def test_text_assignment_fits_under_lightning_without_a_teacher():
    import lightning as L
    from torch.utils.data import DataLoader

    from albef_pl.callbacks import MomentumTeacher

    g = torch.Generator().manual_seed(0)
    rows = [{"image": torch.randn(3, 32, 32, generator=g),
             "input_ids": torch.randint(5, 128, (6,), generator=g),
             "attention_mask": torch.ones(6, dtype=torch.long)} for _ in range(8)]
    task = tiny_task(cls=NLVR2TextAssignmentTask, lr=1e-3, warmup_steps=0)
    head = task.model.ta_head.weight.clone()
    proj = task.model.vision_proj.weight.clone()
    callback = MomentumTeacher()  # a config may name it; without a teacher it does nothing
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(task, DataLoader(rows, batch_size=4))
    assert trainer.global_step == 2 and callback.updates == 0
    assert not torch.equal(task.model.ta_head.weight, head)
    assert torch.equal(task.model.vision_proj.weight, proj)  # frozen, as never updated there
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert 0.0 <= float(trainer.callback_metrics["train/acc"]) <= 1.0


# ---------------------------------------------------------------------------------------------
# Bad input through the CLI: one line, exit status 2, no traceback
def _refuse_to_build(cls, monkeypatch) -> None:
    """Make building ``cls`` fail the test (its signature kept for the CLI's parser)."""
    import functools

    @functools.wraps(cls.__init__)
    def refuse(*args, **kwargs):
        pytest.fail(f"{cls.__name__} was built before the bad option was refused")

    monkeypatch.setattr(cls, "__init__", refuse)


def _main_fails(args: list[str], capsys) -> str:
    from albef_pl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _pairs_dir(tmp: Path, entries: list | None = None) -> list[str]:
    """Three small images and an NLVR2 file of four pairs (or ``entries``) under ``tmp``, as
    data options for every split."""
    for k in range(3):
        Image.new("RGB", (40, 30), (80 * k, 90, 120)).save(tmp / f"ok{k}.jpg")
    if entries is None:
        entries = [{"images": [f"ok{k % 3}.jpg", f"ok{(k + 1) % 3}.jpg"], "sentence": "a dog",
                    "label": bool(k % 2)} for k in range(4)]
    path = _write(tmp, entries)
    return ["--data.image_root", str(tmp), "--data.train_file", str(path),
            "--data.val_file", str(path), "--data.test_file", str(path),
            "--data.drop_last", "false"]


@pytest.mark.parametrize("option,value", [("batch_size", "0"), ("eval_batch_size", "0"),
                                          ("batch_size", "-2"), ("image_size", "0"),
                                          ("max_words", "0")])
def test_cli_refuses_sizes_below_one_before_the_model_is_built(
    tmp_path, monkeypatch, capsys, option, value
):
    monkeypatch.chdir(ROOT)
    _refuse_to_build(NLVR2Task, monkeypatch)
    err = _main_fails(["fit", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), *_pairs_dir(tmp_path),
                       f"--data.{option}", value], capsys)
    assert f"data.{option} must be an integer >= 1, got {value}" in err


def test_cli_predict_on_a_file_whose_images_all_fail_to_decode_writes_nothing(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("ALBEF_PL_TRACEBACK", raising=False)
    data = _pairs_dir(tmp_path)
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "ok0.jpg").read_bytes()[:200])
    (tmp_path / "predict.json").write_text(json.dumps([
        {"images": ["zero.jpg", "ok1.jpg"], "sentence": "a dog"},
        {"images": ["ok2.jpg", "cut.jpg"], "sentence": "two dogs"}]))
    err = _main_fails(["predict", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), *data,
                       "--data.predict_file", str(tmp_path / "predict.json"),
                       "--data.check_images", "false"], capsys)  # found in the pass, not setup
    assert f"error: predict: none of the 2 images read from {tmp_path / 'predict.json'} " \
           "could be decoded" in err
    assert not (tmp_path / "predictions" / "nlvr2_predictions.json").exists()


@pytest.mark.parametrize("split,mixed", [("train", False), ("val", False), ("train", True)])
def test_cli_a_split_whose_images_all_fail_to_decode_stops_before_training(
    tmp_path, monkeypatch, capsys, split, mixed
):
    monkeypatch.chdir(ROOT)
    data = _pairs_dir(tmp_path)
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "ok0.jpg").read_bytes()[:200])
    broken = tmp_path / "broken.json"
    good = "ok1.jpg" if mixed else "cut.jpg"  # mixed: each pair has one image that decodes
    broken.write_text(json.dumps([{"images": ["zero.jpg", good], "sentence": "a dog",
                                   "label": True}, {"images": [good, "cut.jpg"],
                                                    "sentence": "no dog", "label": False}]))
    monkeypatch.setattr(NLVR2Task, "training_step",
                        lambda *a, **k: pytest.fail("trained on a split that cannot decode"))
    err = _main_fails(["fit", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), *data, f"--data.{split}_file",
                       str(broken)], capsys)
    assert f"{split}: not one of the 2 pairs read from {broken} can be decoded (" in err
    assert f"e.g. {tmp_path / 'zero.jpg'} (UnidentifiedImageError" in err
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_cli_a_tokenizer_that_cannot_load_is_refused_before_the_model_is_built(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(ROOT)
    _refuse_to_build(NLVR2Task, monkeypatch)
    err = _main_fails(["fit", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), *_pairs_dir(tmp_path),
                       "--data.tokenizer", str(tmp_path / "no_tokenizer")], capsys)
    assert f"data.tokenizer: cannot load a tokenizer from '{tmp_path / 'no_tokenizer'}'" in err


@requires_shared
def test_cli_text_assignment_on_real_shards_then_the_fine_tune_starts_from_it(
    tmp_path, monkeypatch
):
    """The TA sample recipe on shards of the real COCO sample: fit, validate from its
    checkpoint (same val/acc), and the NLVR2 sample fine-tune starting from it."""
    from data_modules.shard_writer import main as write_shards

    coco = SHARED / "data/coco_sample"
    for src, out in (("albef_train.json", "shards"), ("albef_test.json", "val_shards")):
        write_shards(["--json", str(coco / src), "--image-root", str(coco),
                      "--out", str(tmp_path / out), "--samples-per-shard", "32"])
    ta = ["--config", str(ROOT / "conf/finetune/nlvr2_ta_sample.yaml"),
          "--model.init_checkpoint", "null", "--model.init_args.vision.depth", "1",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
          "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
          "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
          "--data.train_shards", str(tmp_path / "shards"),
          "--data.val_shards", str(tmp_path / "val_shards"),
          "--data.num_train_samples", "16", "--data.batch_size", "8", "--data.num_workers", "0"]
    fit = run_cli(["fit", *ta])
    assert fit.trainer.global_step == 2
    val_acc = float(fit.trainer.callback_metrics["val/acc"])
    assert val_acc * 8 == pytest.approx(round(val_acc * 8))  # one batch of 8 captions
    ckpt = tmp_path / "ta.ckpt"
    fit.trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state["model.ta_head.weight"].shape == (3, 384)
    assert "model.fusion_encoder.layers.5.crossattention.self.key.weight" in state  # 3 pairs

    val = run_cli(["validate", *ta, "--ckpt_path", str(ckpt)])
    assert float(val.trainer.callback_metrics["val/acc"]) == pytest.approx(val_acc)

    monkeypatch.chdir(ROOT)  # the NLVR2 sample's data paths are relative to the project
    fine = run_cli(["fit", "--config", str(SAMPLE_CONF), "--model.init_checkpoint", str(ckpt),
                    "--model.init_args.vision.depth", "1",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
                    "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
                    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                    "--trainer.limit_val_batches", "1"])
    layer = "fusion_encoder.layers.4.crossattention.self.query.weight"
    torch.testing.assert_close(fine.model.model.state_dict()[layer].cpu(),
                               state[f"model.{layer}"], rtol=0, atol=1e-3)  # one Adam step


def test_text_assignment_never_draws_a_captions_own_picture_as_another_image():
    # Six captions of three pictures (two captions each), as a COCO batch holds them.
    g = torch.Generator().manual_seed(0)
    feat = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    feat[1], feat[3], feat[5] = feat[0], feat[2], feat[4]  # same picture, same feature
    ids = torch.tensor([7, 7, 8, 8, 9, 9])
    counts = torch.zeros(3)
    for _ in range(500):
        left, right, labels = sample_text_assignment(feat, g, image_ids=ids)
        counts += torch.bincount(labels, minlength=3)
        for o, (lab, l_, r_) in enumerate(zip(labels.tolist(), left.tolist(), right.tolist())):
            negatives = {0: [r_], 1: [l_], 2: [l_, r_]}[lab]
            assert all(ids[n] != ids[o] for n in negatives), (o, lab, l_, r_)
    assert torch.allclose(counts / counts.sum(), torch.full((3,), 1 / 3), atol=0.03)
    # Without ids, the twin picture (at weight ~1 for temperature 0.07) is drawn almost always.
    left, right, labels = sample_text_assignment(feat, torch.Generator().manual_seed(0))
    first = torch.where(labels == 0, right, left)
    assert (ids[first] == ids).float().mean() > 0.5

    # Captions 0-2 of picture 7, caption 3 of picture 8: the first three have one allowed
    # other image, so labels 0 and 1 only; caption 3 has three.
    ids2 = torch.tensor([7, 7, 7, 8])
    seen = set()
    for seed in range(40):
        left, right, labels = sample_text_assignment(feat[:4], torch.Generator().manual_seed(seed),
                                                     image_ids=ids2)
        assert set(labels[:3].tolist()) <= {0, 1}
        assert (torch.where(labels[:3] == 0, right[:3], left[:3]) == 3).all()
        seen |= set(labels.tolist())
    assert seen == {0, 1, 2}
    # One picture under every caption, and unknown ids (-1): fall back to other positions.
    for fallback in (torch.tensor([5, 5, 5]), torch.tensor([-1, -1, -1])):
        left, right, labels = sample_text_assignment(feat[:3], g, image_ids=fallback)
        assert ((left != torch.arange(3)) | (labels != 1)).all()
