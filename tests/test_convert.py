"""Official ALBEF checkpoints: key conversion for every layout, loading, export, the CLI.

Full-size checks build models on the meta device (no weights are allocated); loading,
export and the command line run on tiny models with real tensors.
"""

from __future__ import annotations

import argparse
import copy
import json

import lightning as L
import pytest
import torch
from conftest import SHARED, tiny_text, tiny_vision
from torch import nn
from torch.utils.data import DataLoader

from albef_pl.convert import (
    LAYOUTS,
    OfficialSizes,
    WrongCheckpointError,
    convert_state_dict,
    detect_layout,
    drop_reason,
    export_official,
    infer_sizes,
    infer_task_layout,
    load_official_into_task,
    main,
    official_layout,
    official_to_ours,
    ours_to_official,
)
from albef_pl.models import ALBEF, TextConfig, VisionConfig
from albef_pl.models.text import BertBlock, MLMHead
from albef_pl.tasks import PretrainTask
from albef_pl.tasks.base import ALBEFTask

GOLDEN_WEIGHTS = SHARED / "golden" / "albef_tiny_state_dict.safetensors"
KEY_COUNTS = {"pretrain": 844, "retrieval": 831, "vqa": 1154, "snli_ve": 824, "nlvr2_ta": 571,
              "nlvr2": 1136}
# Entries each layout stores that carry nothing of their own: position_ids buffers and the
# tied MLM-decoder aliases (two per model with an MLM/LM head).
DROPPED_COUNTS = {"pretrain": 2 + 4, "retrieval": 2, "vqa": 4 + 4, "snli_ve": 2,
                  "nlvr2_ta": 1, "nlvr2": 2}


class RetrievalLayoutTask(ALBEFTask):
    """The retrieval layout: an id queue and no MLM head (like the original's model)."""

    queue_with_idx = True

    def configure_heads(self) -> None:
        self.model.mlm_head = None


class Holder(nn.Module):
    """A stand-in task for layouts whose task does not exist yet."""

    def __init__(self, model: nn.Module, teacher: bool = True) -> None:
        super().__init__()
        self.model = model
        if teacher:
            self.teacher = copy.deepcopy(model)


def meta_official(layout: str, sizes: OfficialSizes | None = None) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in official_layout(layout, sizes).items()}


def full_model(img_size: int = 384, layers: int = 12, drop=("vision_proj", "text_proj",
               "itm_head", "mlm_head")) -> ALBEF:
    model = ALBEF(VisionConfig(img_size=img_size), TextConfig(pretrained=None,
                  num_hidden_layers=layers), init_weights=False)
    for name in drop:
        setattr(model, name, None)
    if "itm_head" in drop and "vision_proj" in drop:
        del model.temp
    return model


def share_pair_key_value(model: ALBEF) -> None:
    """NLVR2: the two cross-attentions of a layer pair share key and value."""
    layers = model.fusion_encoder.layers
    for j in range(0, len(layers), 2):
        even, odd = layers[j].crossattention.self, layers[j + 1].crossattention.self
        even.key, even.value = odd.key, odd.value


def future_target(layout: str) -> dict[str, torch.Tensor]:
    """Meta state dicts of the later tasks, built with the names the mapping table promises."""
    with torch.device("meta"):
        if layout == "vqa":
            model = full_model()
            cfg = model.bert_config
            decoder = nn.Module()
            from transformers.models.bert.modeling_bert import BertEmbeddings

            decoder.embeddings = BertEmbeddings(cfg)
            decoder.layers = nn.ModuleList(BertBlock(cfg, cfg.hidden_size) for _ in range(6))
            decoder.lm_head = MLMHead(cfg, decoder.embeddings.word_embeddings)
            model.answer_decoder = decoder
            return Holder(model).state_dict()
        if layout == "snli_ve":
            model = full_model()
            model.cls_head = nn.Sequential(nn.Linear(768, 768), nn.ReLU(), nn.Linear(768, 3))
            return Holder(model).state_dict()
        if layout == "nlvr2_ta":
            model = full_model(256, 18, drop=("itm_head", "mlm_head"))
            model.ta_head = nn.Linear(768, 3)
            share_pair_key_value(model)
            return Holder(model, teacher=False).state_dict()
        model = full_model(384, 18)
        model.cls_head = nn.Sequential(nn.Linear(768, 768), nn.ReLU(), nn.Linear(768, 2))
        share_pair_key_value(model)
        return Holder(model).state_dict()


def full_task(cls=PretrainTask, img_size: int = 256) -> ALBEFTask:
    with torch.device("meta"):
        return cls(vision=VisionConfig(img_size=img_size), text=TextConfig(pretrained=None),
                   init_weights=False)


# ---------------------------------------------------------------------------------------------
# Names and shapes at full size
@pytest.mark.parametrize("layout", LAYOUTS)
def test_official_layout_key_counts(layout: str) -> None:
    assert len(official_layout(layout)) == KEY_COUNTS[layout]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_official_key_maps_both_ways(layout: str) -> None:
    keys = official_layout(layout)
    ours, dropped = {}, []
    for key in keys:
        if drop_reason(key) is not None:
            dropped.append(key)
            continue
        name = official_to_ours(key, layout, 6)
        assert name.startswith(("model.", "teacher.", "queue.")), name
        assert ours_to_official(name, layout, 6) == key
        ours[name] = key
    assert len(ours) + len(dropped) == len(keys)  # one to one
    assert len(dropped) == DROPPED_COUNTS[layout]
    assert all(k.endswith(("position_ids", "decoder.weight", "decoder.bias")) for k in dropped)
    assert detect_layout(meta_official(layout)) == layout


def test_mapping_table_examples() -> None:
    assert official_to_ours(
        "text_encoder.bert.encoder.layer.7.crossattention.self.key.weight", "pretrain", 6
    ) == "model.fusion_encoder.layers.1.crossattention.self.key.weight"
    assert official_to_ours("text_encoder_m.encoder.layer.5.output.dense.bias", "retrieval",
                            6) == "teacher.text_encoder.layers.5.output.dense.bias"
    assert official_to_ours("text_encoder.cls.predictions.transform.dense.weight", "pretrain",
                            6) == "model.mlm_head.transform.dense.weight"
    assert official_to_ours(
        "text_decoder_m.bert.encoder.layer.5.crossattention.self.value.bias", "vqa", 6
    ) == "teacher.answer_decoder.layers.5.crossattention.self.value.bias"
    assert official_to_ours("text_decoder.cls.predictions.bias", "vqa", 6) == (
        "model.answer_decoder.lm_head.bias")
    assert official_to_ours("cls_head_m.2.weight", "nlvr2", 6) == "teacher.cls_head.2.weight"
    assert official_to_ours("text_encoder.encoder.layer.17.attention.self.query.weight", "nlvr2",
                            6) == "model.fusion_encoder.layers.11.attention.self.query.weight"
    assert official_to_ours("idx_queue", "retrieval", 6) == "queue.idx_queue"
    assert official_to_ours("temp", "nlvr2_ta", 6) == "model.temp"
    for key, layout in [("idx_queue", "pretrain"), ("text_encoder.bert.embeddings.LayerNorm.bias",
                        "retrieval"), ("itm_head.weight", "vqa"), ("ta_head_m.weight", "nlvr2_ta")]:
        with pytest.raises(KeyError):
            official_to_ours(key, layout, 6)


def test_parameter_count_matches_the_original() -> None:
    with torch.device("meta"):
        model = ALBEF(VisionConfig(img_size=256), TextConfig(pretrained=None), init_weights=False)
    # The original pre-training model's trainable parameters (its student); the tied MLM
    # decoder counts once there as here.
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 209_937_725


@pytest.mark.parametrize("layout,cls", [("pretrain", PretrainTask),
                                        ("retrieval", RetrievalLayoutTask)])
def test_full_size_task_holds_exactly_the_official_keys(layout: str, cls) -> None:
    task = full_task(cls, img_size=256 if layout == "pretrain" else 384)
    target = task.state_dict()
    assert infer_task_layout(target) == layout
    official = meta_official(layout)
    expected = {official_to_ours(k, layout, 6): s.shape for k, s in official.items()
                if drop_reason(k) is None}
    assert set(expected) == set(target) - {"alpha"}
    assert all(tuple(target[k].shape) == tuple(s) for k, s in expected.items())

    out, report = convert_state_dict(official, target)
    assert report.clean and set(report.kept) == {"alpha"} and not report.adapted
    assert len(report.dropped) == DROPPED_COUNTS[layout]
    assert set(out) == set(expected)


@pytest.mark.parametrize("layout", ["vqa", "snli_ve", "nlvr2_ta", "nlvr2"])
def test_later_layouts_plug_into_the_documented_names(layout: str) -> None:
    target = future_target(layout)
    assert infer_task_layout(target) == layout
    out, report = convert_state_dict(meta_official(layout), target)
    assert report.clean and not report.kept, report.summary()
    assert set(out) == set(target)
    assert all(out[k].shape == target[k].shape for k in out)


def test_pretrain_into_retrieval_drops_what_the_original_drops() -> None:
    target = full_task(RetrievalLayoutTask, 384).state_dict()
    out, report = convert_state_dict(meta_official("pretrain"), target)
    assert report.clean and report.target == "retrieval"
    assert set(report.kept) == {"alpha", "queue.idx_queue"}
    ignored = {k for k, why in report.dropped.items() if "ignores it too" in why}
    assert ignored == {f"text_encoder{m}.cls.predictions.{n}" for m in ("", "_m")
                       for n in ("bias", "transform.dense.weight", "transform.dense.bias",
                                 "transform.LayerNorm.weight", "transform.LayerNorm.bias")}
    assert set(report.adapted) == {"model.visual_encoder.pos_embed",
                                   "teacher.visual_encoder.pos_embed"}  # 257 -> 577 tokens
    assert out["model.visual_encoder.pos_embed"].shape == (1, 577, 768)


def test_pretrain_into_vqa_builds_the_decoder_from_the_fusion_layers() -> None:
    official = meta_official("pretrain")
    out, report = convert_state_dict(official, future_target("vqa"))
    assert report.clean and not report.kept
    for o, m in (("model", ""), ("teacher", "_m")):
        for j in range(6):
            key = f"layers.{j}.crossattention.self.key.weight"
            src = official[f"text_encoder{m}.bert.encoder.layer.{6 + j}.{key.split('.', 2)[2]}"]
            assert out[f"{o}.answer_decoder.{key}"] is src
            assert out[f"{o}.fusion_encoder.{key}"] is src
        emb = official[f"text_encoder{m}.bert.embeddings.word_embeddings.weight"]
        assert out[f"{o}.answer_decoder.embeddings.word_embeddings.weight"] is emb
        bias = official[f"text_encoder{m}.cls.predictions.bias"]
        assert out[f"{o}.answer_decoder.lm_head.bias"] is bias
    ignored = {k for k, why in report.dropped.items() if "ignores it too" in why}
    assert ignored == {"temp", "image_queue", "text_queue", "queue_ptr", "itm_head.weight",
                       "itm_head.bias"} | {f"{p}{m}.{w}" for p in ("vision_proj", "text_proj")
                                           for m in ("", "_m") for w in ("weight", "bias")}


def test_pretrain_into_snli_ve_starts_a_new_classifier() -> None:
    out, report = convert_state_dict(meta_official("pretrain"), future_target("snli_ve"))
    assert report.clean
    assert set(report.kept) == {f"{o}.cls_head.{i}.{w}" for o in ("model", "teacher")
                                for i in (0, 2) for w in ("weight", "bias")}


def test_pretrain_into_nlvr2_text_assignment_duplicates_fusion_layers() -> None:
    official = meta_official("pretrain")
    out, report = convert_state_dict(official, future_target("nlvr2_ta"))
    assert report.clean and set(report.kept) == {"model.ta_head.weight", "model.ta_head.bias"}
    for j in range(6):
        src = official[f"text_encoder.bert.encoder.layer.{6 + j}.attention.self.query.weight"]
        for layer in (2 * j, 2 * j + 1):
            assert out[f"model.fusion_encoder.layers.{layer}.attention.self.query.weight"] is src
    assert not any(k.startswith("teacher.") for k in out)
    assert "visual_encoder_m.pos_embed" in report.dropped and "itm_head.weight" in report.dropped


def test_nlvr2_from_text_assignment_copies_the_teacher_from_the_student() -> None:
    official = meta_official("nlvr2_ta", OfficialSizes.default("nlvr2"))
    out, report = convert_state_dict(official, future_target("nlvr2"))
    assert report.clean
    copied = {k for k, why in report.kept.items() if "copied from the student" in why}
    assert copied and all(out[k] is out["model." + k.removeprefix("teacher.")] for k in copied)
    assert {k for k in report.kept if "cls_head" in k} == {
        f"{o}.cls_head.{i}.{w}" for o in ("model", "teacher") for i in (0, 2)
        for w in ("weight", "bias")}
    assert {"temp", "ta_head.weight", "vision_proj.weight"} <= set(report.dropped)


@pytest.mark.parametrize("layout", ["vqa", "snli_ve", "nlvr2", "nlvr2_ta"])
def test_downstream_checkpoint_into_pretrain_task_is_refused(layout: str) -> None:
    target = full_task().state_dict()
    with pytest.raises(WrongCheckpointError, match=f"model.pth is a {layout} checkpoint"):
        convert_state_dict(meta_official(layout), target, source="model.pth")


# ---------------------------------------------------------------------------------------------
# Tiny models with real tensors
def tiny_task(cls=PretrainTask, img_size: int = 32, queue_size: int = 8, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(vision=tiny_vision(img_size=img_size), text=tiny_text(), embed_dim=16,
               queue_size=queue_size, init_weights=False, **kw)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("cls,layout", [(PretrainTask, "pretrain"),
                                        (RetrievalLayoutTask, "retrieval")])
def test_export_then_load_is_lossless(cls, layout: str) -> None:
    src = tiny_task(cls, seed=1)
    with torch.no_grad():  # a teacher that differs from the student, and used queues
        for p in src.teacher.parameters():
            p.add_(0.01)
    src.queue.queue_ptr.fill_(3)
    official = export_official(src)
    sizes = infer_sizes(official)
    assert list(official) == list(official_layout(layout, sizes))
    assert official["text_encoder.bert.embeddings.position_ids" if layout == "pretrain"
                    else "text_encoder.embeddings.position_ids"].tolist() == [list(range(64))]

    dst = tiny_task(cls, seed=2)
    report = load_official_into_task(dst, official)
    assert report.clean and report.layout == layout
    assert_same_state(src, dst)
    again = export_official(dst)
    assert all(torch.equal(again[k], official[k]) for k in official)


@pytest.mark.skipif(not GOLDEN_WEIGHTS.is_file(), reason=f"golden file not found: {GOLDEN_WEIGHTS}")
def test_golden_round_trip_reproduces_the_original_file_bitwise() -> None:
    from safetensors.torch import load_file

    golden = load_file(str(GOLDEN_WEIGHTS))
    order = json.loads((SHARED / "golden" / "albef_tiny_io.json").read_text())
    task = PretrainTask(vision=tiny_vision(), text=tiny_text(vocab_size=30522,
                        max_position_embeddings=512), embed_dim=16, queue_size=8,
                        init_weights=False)
    load_official_into_task(task, GOLDEN_WEIGHTS)
    exported = export_official(task)
    assert list(exported) == order["state_dict_keys_in_official_order"]
    for key, value in golden.items():
        assert torch.equal(exported[key], value), key
    for alias, source in order["state_dict_omitted_tied_aliases"].items():
        assert exported[alias] is exported[source]  # tied, as in the original


def test_wrapped_prefixed_and_flat_checkpoints_load_alike() -> None:
    official = export_official(tiny_task(seed=1))
    wrapped = {"model": {f"module.{k}": v for k, v in official.items()}, "epoch": 3}
    a, b = tiny_task(seed=2), tiny_task(seed=3)
    load_official_into_task(a, official)
    load_official_into_task(b, wrapped)
    assert_same_state(a, b)


def test_checkpoint_without_momentum_weights_and_queues_copies_the_student() -> None:
    src = tiny_task(seed=1)
    official = {k: v for k, v in export_official(src).items()
                if "_m." not in k and k not in ("image_queue", "text_queue", "queue_ptr")}
    dst = tiny_task(seed=2)
    queue_before = dst.queue.image_queue.clone()
    report = load_official_into_task(dst, official)
    assert report.clean
    student = dict(dst.model.named_parameters())
    for name, p in dst.teacher.named_parameters():
        assert torch.equal(p, student[name]), name
    assert torch.equal(dst.queue.image_queue, queue_before)
    assert "copied from the student" in report.kept["teacher.visual_encoder.pos_embed"]
    assert "no queues" in report.kept["queue.image_queue"]


@pytest.mark.parametrize("queue_size", [4, 16])
def test_queue_of_another_length_keeps_the_newest_features(queue_size: int) -> None:
    src = tiny_task(seed=1)
    src.queue.queue_ptr.fill_(3)  # columns 3..7 then 0..2, oldest to newest
    dst = tiny_task(seed=2, queue_size=queue_size)
    own = dst.queue.text_queue.clone()
    report = load_official_into_task(dst, export_official(src))
    n = min(8, queue_size)
    newest = [(3 - n + j) % 8 for j in range(n)]
    assert torch.equal(dst.queue.image_queue[:, :n], src.queue.image_queue[:, newest])
    assert torch.equal(dst.queue.text_queue[:, n:], own[:, n:])  # the rest stays the task's
    assert int(dst.queue.queue_ptr) == n % queue_size
    assert "newest" in report.adapted["queue"]


def test_our_lightning_checkpoint_loads(tmp_path) -> None:
    src = tiny_task(seed=1)
    path = tmp_path / "ours.ckpt"
    torch.save({"state_dict": src.state_dict(), "epoch": 2, "hyper_parameters": {}}, path)
    dst = tiny_task(seed=2)
    report = load_official_into_task(dst, path)
    assert report.layout == "albef_pl" and report.clean and not report.kept
    assert_same_state(src, dst)


def test_wrong_kind_file_is_named_in_the_error(tmp_path) -> None:
    sizes = infer_sizes(export_official(tiny_task()))
    vqa = {k: torch.zeros(s) for k, s in official_layout(
        "vqa", OfficialSizes(**{**sizes.__dict__, "decoder_layers": 2})).items()}
    path = tmp_path / "vqa.pth"
    torch.save({"model": vqa}, path)
    with pytest.raises(WrongCheckpointError, match=rf"{path} is a vqa checkpoint.*pretrain"):
        load_official_into_task(tiny_task(), path)
    task = tiny_task()  # through the task, the message names the option and the task class
    with pytest.raises(WrongCheckpointError,
                       match=rf"^model.init_checkpoint of {type(task).__name__}: {path} is a vqa"):
        task.load_init_checkpoint(str(path))


def test_other_files_are_refused_with_a_reason(tmp_path) -> None:
    bert = tmp_path / "bert.pth"
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 2)}, bert)
    with pytest.raises(ValueError, match="not an ALBEF checkpoint"):
        load_official_into_task(tiny_task(), bert)

    pickled = tmp_path / "pickled.pth"  # an arbitrary object: refused by weights_only=True
    torch.save({"model": export_official(tiny_task()), "args": argparse.Namespace(a=1)}, pickled)
    with pytest.raises(RuntimeError, match="weights_only"):
        load_official_into_task(tiny_task(), pickled)

    narrow = PretrainTask(vision=tiny_vision(), text=tiny_text(), embed_dim=8, queue_size=8,
                          init_weights=False)  # projections of another size
    with pytest.raises(ValueError, match="does not fit the task"):
        load_official_into_task(narrow, export_official(tiny_task()))


# ---------------------------------------------------------------------------------------------
# The command line and Lightning
def _loader(n: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(104, 128, (n, 8), generator=g)  # the tiny vocabulary's word ids
    ids[:, 0] = 101  # [CLS]
    rows = [{"image": torch.randn(3, 32, 32, generator=g), "input_ids": ids[i],
             "attention_mask": torch.ones(8, dtype=torch.long)} for i in range(n)]
    return DataLoader(rows, batch_size=n)


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny task, and the CLI's conversion of its official export (read-only for tests)."""
    tmp_path = tmp_path_factory.mktemp("converted")
    src = tiny_task(seed=1)
    official = tmp_path / "official.pth"
    torch.save({"model": export_official(src), "epoch": 29}, official)
    out = tmp_path / "converted.ckpt"
    assert main([str(official), str(out), "--task", "pretrain", "--vision-heads", "2",
                 "--text-heads", "2"]) == 0
    return src, out


def test_cli_checkpoint_validates_and_reloads(converted) -> None:
    src, path = converted
    task = tiny_task(seed=5)
    _trainer().validate(task, dataloaders=_loader(), ckpt_path=path, verbose=False)
    assert_same_state(task, src)
    reloaded = PretrainTask.load_from_checkpoint(path)
    assert_same_state(reloaded, src)


def test_cli_checkpoint_starts_a_fit_at_step_zero(converted) -> None:
    src, path = converted
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["same"] = all(torch.equal(v, src.state_dict()[k])
                               for k, v in pl_module.state_dict().items())

    task = tiny_task(seed=5)
    _trainer(max_steps=1, callbacks=[Probe()], limit_val_batches=0).fit(
        task, train_dataloaders=_loader(), ckpt_path=path)
    assert seen == {"step": 0, "same": True}
    assert task.trainer.global_step == 1


def test_cli_resizes_and_exports_back(tmp_path, converted) -> None:
    src, path = converted
    official = tmp_path / "official.pth"
    torch.save(export_official(src), official)
    resized = tmp_path / "64px.ckpt"
    assert main([str(official), str(resized), "--img-size", "64", "--vision-heads", "2",
                 "--text-heads", "2"]) == 0
    ckpt = torch.load(resized, weights_only=True)
    assert ckpt["hyper_parameters"]["vision"]["img_size"] == 64
    assert ckpt["state_dict"]["teacher.visual_encoder.pos_embed"].shape == (1, 17, 32)

    back = tmp_path / "back.pth"
    assert main([str(path), str(back), "--to-official"]) == 0
    exported = torch.load(back, weights_only=True)["model"]
    original = export_official(src)
    assert list(exported) == list(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_cli_refuses_a_wrong_kind_with_exit_code(tmp_path, capsys) -> None:
    sizes = infer_sizes(export_official(tiny_task()))
    ve = {k: torch.zeros(s) for k, s in official_layout("snli_ve", sizes).items()}
    path = tmp_path / "ve.pth"
    torch.save(ve, path)
    assert main([str(path), str(tmp_path / "x.ckpt"), "--vision-heads", "2",
                 "--text-heads", "2"]) == 2
    assert "snli_ve checkpoint" in capsys.readouterr().err
