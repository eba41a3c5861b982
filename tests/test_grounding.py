"""Weakly supervised grounding: box scoring, IoU, Grad-CAM maps, data, and the real CLI."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from albef_pl.grounding import (
    _itm_map,
    best_box,
    box_iou_inclusive,
    box_scores,
    gradcam,
    upsample_map,
)
from albef_pl.models import ALBEF
from conftest import ROOT, SHARED, requires_shared, tiny_text, tiny_vision
from data_modules.grounding import (
    GroundingDataModule,
    read_grounding_json,
    refs_from_coco_instances,
)

SAMPLE_CONF = ROOT / "conf/finetune/grounding_sample.yaml"
PAPER_CONF = ROOT / "conf/finetune/grounding.yaml"
INSTANCES = SHARED / "data/coco_sample/instances_val2017_subset100.json"
SAMPLE_IMAGES = SHARED / "data/coco_sample/images"


# ---------------------------------------------------------------------------------------------
# Box scoring and IoU, by hand
def test_the_box_holding_the_mass_wins():
    heat = torch.zeros(20, 20)
    heat[5:10, 5:10] = 1.0  # 25 units of mass in a 5x5 square at x 5..9, y 5..9
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [5.0, 5.0, 5.0, 5.0], [12.0, 0.0, 8.0, 8.0]])
    scores = box_scores(heat, boxes)
    torch.testing.assert_close(scores, torch.tensor([25 / 20, 25 / 5, 0.0]))
    assert int(scores.argmax()) == 1


def test_square_root_area_normalisation_picks_what_sum_and_mean_would_not():
    heat = torch.full((100, 100), 0.05)
    heat[:10, :10] = 1.0
    heat[:2, :2] = 2.0  # a tiny hotter spot inside the object
    obj, whole, spot = [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 100.0, 100.0], [0.0, 0.0, 2.0, 2.0]
    scores = box_scores(heat, torch.tensor([obj, whole, spot]))
    # sums 104, 599, 8 over areas 100, 10000, 4
    torch.testing.assert_close(scores, torch.tensor([104 / 10, 599 / 100, 8 / 2]))
    assert int(scores.argmax()) == 0  # the object
    sums = scores * torch.tensor([10.0, 100.0, 2.0])
    means = scores / torch.tensor([10.0, 100.0, 2.0])
    assert int(sums.argmax()) == 1 and int(means.argmax()) == 2  # the whole image, the spot


def test_box_coordinates_are_truncated_and_clipped_to_the_map():
    heat = torch.arange(100.0).view(10, 10)
    whole = box_scores(heat, torch.tensor([[0.7, 0.2, 10.9, 10.4]]))  # -> (0, 0, 10, 10)
    torch.testing.assert_close(whole, torch.tensor([heat.sum() / 10]))
    corner = box_scores(heat, torch.tensor([[8.0, 8.0, 4.0, 4.0]]))  # 2x2 inside, area 16
    torch.testing.assert_close(corner, torch.tensor([(88 + 89 + 98 + 99) / 4.0]))
    sliver = box_scores(heat, torch.tensor([[3.0, 4.0, 0.4, 1.0]]))  # width 0 -> 1 pixel
    torch.testing.assert_close(sliver, torch.tensor([43.0]))


def test_iou_inclusive_pixel_convention_by_hand():
    a = torch.tensor([0.0, 0.0, 10.0, 10.0])
    others = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],   # the same box
        [5.0, 0.0, 10.0, 10.0],   # half overlap: 5x10 of 100 + 100 - 50
        [8.0, 0.0, 10.0, 10.0],   # pixels 8..9 shared: 2x10 of 180
        [9.0, 0.0, 10.0, 10.0],   # one shared pixel column: counts as no overlap
        [20.0, 20.0, 5.0, 5.0],   # apart
        [2.0, 2.0, 4.0, 4.0],     # inside: 16 of 100
    ])
    iou = box_iou_inclusive(others, a[None])
    expected = torch.tensor([1.0, 50 / 150, 20 / 180, 0.0, 0.0, 16 / 100])
    torch.testing.assert_close(iou, expected)


def test_best_box_on_an_upsampled_patch_map():
    cam = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # mass in the bottom-right patch
    proposals = torch.tensor([[0.0, 0.0, 30.0, 20.0], [30.0, 20.0, 30.0, 20.0],
                              [0.0, 20.0, 30.0, 20.0]])
    k, heat = best_box(cam, proposals, width=60, height=40)
    assert heat.shape == (40, 60) and k == 1
    flat = upsample_map(torch.full((3, 3), 0.25), width=7, height=5)
    torch.testing.assert_close(flat, torch.full((5, 7), 0.25))


# ---------------------------------------------------------------------------------------------
# Grad-CAM
def test_itm_map_averages_real_tokens_only_by_hand():
    probs = torch.full((1, 2, 3, 5), 0.2)  # (B, heads, L, 1 + 4 patches)
    grads = torch.ones(1, 2, 3, 5)
    grads[0, 0, 0] = torch.tensor([9.0, 1.0, -1.0, 2.0, 0.0])
    grads[0, 0, 1] = torch.tensor([9.0, 0.0, 1.0, 1.0, 3.0])
    grads[0, 0, 2] = torch.tensor([9.0, 5.0, 5.0, 5.0, 5.0])  # the padding token
    mask = torch.tensor([[1, 1, 0]])
    cam = _itm_map(probs, grads, mask)
    # heads averaged: token 0 [.2 .1 .3 .1], token 1 [.1 .2 .2 .4]; padding left out of the
    # mean (the original would divide by 3 and let it shrink the map).
    torch.testing.assert_close(cam, torch.tensor([[[0.15, 0.15], [0.25, 0.25]]]))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return ALBEF(tiny_vision(img_size=64), tiny_text(), 16, init_weights=False).eval()


def _text(batch: int = 2, length: int = 5):
    ids = torch.randint(5, 128, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # the second text is shorter
    return ids, mask


@pytest.mark.parametrize("mode,block", [("itm", 2), ("itm", 3), ("itc", 1), ("itc", -1)])
def test_gradcam_shape_and_sign(tiny_model, mode, block):
    ids, mask = _text()
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    vit = [(blk.attn.fused_attn, blk.attn.attn_drop) for blk in tiny_model.visual_encoder.blocks]
    cam = gradcam(tiny_model, image, ids, mask, mode, block)
    assert cam.shape == (2, 4, 4)  # 64 px / patch 16
    assert torch.isfinite(cam).all() and (cam >= 0).all() and cam.sum() > 0
    # Evaluation hooks are undone and no weight gradient is left behind.
    assert not any(layer.crossattention.self.save_attention
                   for layer in tiny_model.fusion_encoder.layers)
    assert vit == [(blk.attn.fused_attn, blk.attn.attn_drop)
                   for blk in tiny_model.visual_encoder.blocks]
    assert all(p.grad is None for p in tiny_model.parameters())


@pytest.mark.parametrize("mode,block", [("itm", 2), ("itc", 0)])
def test_padding_tokens_do_not_change_the_map(tiny_model, mode, block):
    ids, mask = _text()
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    padded_ids = torch.cat([ids, torch.zeros(2, 7, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 7, dtype=torch.long)], dim=1)
    cam = gradcam(tiny_model, image, ids, mask, mode, block)
    cam_padded = gradcam(tiny_model, image, padded_ids, padded_mask, mode, block)
    torch.testing.assert_close(cam_padded, cam, rtol=1e-4, atol=1e-9)


def test_gradcam_works_inside_inference_mode(tiny_model):
    ids, mask = _text()
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    for mode, block in (("itm", 2), ("itc", 1)):
        outside = gradcam(tiny_model, image, ids, mask, mode, block)
        with torch.inference_mode():
            inside = gradcam(tiny_model, image, ids, mask, mode, block)
        torch.testing.assert_close(inside, outside)


@pytest.mark.parametrize("mode,block", [("itm", 2), ("itc", 1)])
def test_the_map_follows_a_planted_patch(mode, block):
    # Without position embeddings the ViT treats identical patches identically, so on a flat
    # image the map is flat, except at a planted patch, wherever it is planted.
    torch.manual_seed(0)
    model = ALBEF(tiny_vision(img_size=64), tiny_text(), 16, init_weights=False).eval()
    with torch.no_grad():
        model.visual_encoder.pos_embed.zero_()
    ids = torch.randint(5, 128, (2, 5), generator=torch.Generator().manual_seed(5))
    image = torch.full((2, 3, 64, 64), 0.5)
    cells = [(1, 2), (3, 0)]
    image[0, :, 16:32, 32:48] = -1.0
    image[1, :, 48:64, 0:16] = 2.0
    cam = gradcam(model, image, ids, torch.ones_like(ids), mode, block)
    distinct = 0
    for b, (r, c) in enumerate(cells):
        rest = torch.cat([cam[b].flatten()[: 4 * r + c], cam[b].flatten()[4 * r + c + 1:]])
        torch.testing.assert_close(rest, rest[:1].expand_as(rest))  # flat off the plant
        distinct += bool(abs(cam[b, r, c] - rest[0]) > 1e-3 * max(float(cam[b].max()), 1e-12))
    # ITC's gradients are clamped at zero, which may hide a plant (here one of the two).
    assert distinct == 2 if mode == "itm" else distinct >= 1


def test_block_num_must_name_a_layer_of_the_mode():
    from albef_pl.tasks.grounding import GroundingTask

    common = dict(vision=tiny_vision(), text=tiny_text(), embed_dim=16, queue_size=8,
                  init_weights=False)
    with pytest.raises(ValueError, match=r"not a fusion layer: layers 2\.\.3"):
        GroundingTask(**common, gradcam_mode="itm", block_num=1)
    with pytest.raises(ValueError, match="not a ViT block"):
        GroundingTask(**common, gradcam_mode="itc", block_num=2)
    with pytest.raises(ValueError, match="gradcam_mode"):
        GroundingTask(**common, gradcam_mode="cam")
    assert GroundingTask(**common, gradcam_mode="itc", block_num=-2).block_num == -2
    # Unset: the same relative depth as the original's 8 (of 6 text + 6 fusion layers).
    assert GroundingTask(**common).block_num == 2  # 2 text + (2 fusion - 1) // 2
    assert GroundingTask(**common, gradcam_mode="itc").block_num == 1  # 2/3 of 2 blocks
    six_six = GroundingTask(**{**common, "text": tiny_text(num_hidden_layers=12,
                                                            num_text_layers=6)})
    assert six_six.block_num == 8


def test_official_grounding_checkpoint_converts_to_a_grounding_task(tmp_path):
    from albef_pl.convert import export_official
    from albef_pl.convert import main as convert
    from albef_pl.tasks.grounding import GroundingTask

    torch.manual_seed(0)
    src = GroundingTask(vision=tiny_vision(), text=tiny_text(), embed_dim=16, queue_size=8,
                        init_weights=False)
    official = export_official(src)  # the retrieval layout, as the released refcoco.pth
    assert not any(k.startswith("mlm") for k in official)
    torch.save({"model": official}, tmp_path / "refcoco.pth")
    assert convert([str(tmp_path / "refcoco.pth"), str(tmp_path / "refcoco.ckpt"),
                    "--task", "grounding", "--vision-heads", "2", "--text-heads", "2"]) == 0
    loaded = GroundingTask.load_from_checkpoint(tmp_path / "refcoco.ckpt", map_location="cpu")
    assert loaded.hparams.gradcam_mode == "itm" and loaded.block_num == 2
    for key, value in src.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------
# Data
def _image(path: Path, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)


def _ref(**kw):
    ref = {"ref_id": 7, "image": "a.jpg", "text": ["the left dog", "a dog"],
           "bbox": [2.0, 3.0, 10.0, 12.0], "proposals": [[2, 3, 10, 12, 0.9], [20, 5, 15, 20]],
           "width": 40, "height": 30, "split": "testA"}
    ref.update(kw)
    return ref


def _write(path: Path, entries) -> str:
    path.write_text(json.dumps(entries))
    return str(path)


def test_reference_file_layout_and_every_text_is_a_sample(tmp_path):
    f = _write(tmp_path / "refs.json", [_ref(), _ref(ref_id=8, text="cat", split="testB")])
    refs = read_grounding_json(f, "root")
    assert [(r.ref_id, r.text, r.split, r.index) for r in refs] == [
        (7, "the left dog", "testA", 0), (7, "a dog", "testA", 1), (8, "cat", "testB", 2)]
    assert refs[0].image == "root/a.jpg" and refs[0].bbox == [2.0, 3.0, 10.0, 12.0]
    assert refs[0].proposals == [[2.0, 3.0, 10.0, 12.0], [20.0, 5.0, 15.0, 20.0]]
    train = read_grounding_json(_write(tmp_path / "t.json", [{"image": "a.jpg", "text": "x"}]),
                                with_boxes=False)
    assert train[0].bbox is None and train[0].split == "val"


@pytest.mark.parametrize("entry,message", [
    (_ref(bbox=[30.0, 3.0, 20.0, 12.0]), r"refs\.json: entry 0 \(ref_id 7, image 'a\.jpg'\), "
                                         r"bbox: box .* lies outside the 40x30 image"),
    (_ref(proposals=[]), r"entry 0 \(ref_id 7.* has no proposals"),
    (_ref(proposals=[[1, 1, 0, 5]]), r"proposal 0: box .* has no area"),
    (_ref(proposals=[[1, 1, 5]]), r"proposal 0: \[1, 1, 5\] is not a box"),
    ({k: v for k, v in _ref().items() if k != "width"}, r"ref_id 7.* has no 'width'"),
    ({"image": "a.jpg"}, r"entry 0 .* lacks an 'image' string or a 'text'"),
    (_ref(bbox=[math.nan, 3.0, 10.0, 12.0]), r"bbox: \[nan, 3\.0, 10\.0, 12\.0\] is not a box"),
    (_ref(proposals=[[1, 1, 5, math.inf]]), r"proposal 0: .* is not a box .* finite numbers"),
    (_ref(bbox=[True, 3.0, 10.0, 12.0]), r"bbox: .* is not a box"),
    (_ref(width=True, height=True), r"width True and height True must be positive"),
    (_ref(height=math.nan), r"width 40 and height nan must be positive"),
    (_ref(text=["dog", ""]), r"entry 0 \(ref_id 7, image 'a\.jpg'\): text '' is empty once "
                             r"punctuation is removed"),
    (_ref(text="?!..."), r"entry 0 .*: text '\?!\.\.\.' is empty"),
    ({"image": "a.jpg", "text": "  "}, r"entry 0 \(ref_id -1, image 'a\.jpg'\): text '  '"),
])
def test_bad_reference_entries_name_the_file_and_entry(tmp_path, entry, message):
    f = _write(tmp_path / "refs.json", [entry])
    with pytest.raises(ValueError, match=message):
        read_grounding_json(f)


def test_data_module_missing_files_unreadable_images_and_shared_ids(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="data.val_file: no file at"):
        GroundingDataModule(str(tmp_path), val_file=str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="data.coco_instances: no file at .*nope"):
        GroundingDataModule(str(tmp_path), coco_instances=str(tmp_path / "nope.json"))
    _image(tmp_path / "a.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    train = _write(tmp_path / "train.json", [
        {"image": "a.jpg", "text": "dog"}, {"image": "a.jpg", "text": "cat"},
        {"image": "gone.jpg", "text": "bird"}, {"image": "broken.jpg", "text": "cow"}])
    val = _write(tmp_path / "val.json", [_ref(), _ref(image="broken.jpg", ref_id=9)])
    with pytest.raises(ValueError, match="coco_instances builds every split"):
        GroundingDataModule(str(tmp_path), train_file=train, coco_instances=val)
    dm = GroundingDataModule(str(tmp_path), train_file=train, val_file=val, image_size=32,
                             batch_size=4, eval_batch_size=4, num_workers=0, pin_memory=False,
                             drop_last=False)
    dm.setup("fit")
    assert dm.skipped_counts("train")["missing_image"] == 1 and "gone.jpg" in caplog.text

    batch = dm.train_dataloader().collate_fn([dm.datasets["train"][i] for i in range(3)])
    assert batch["text"] == ["dog", "cat"] and batch["num_skipped"] == 1  # "cow" is broken
    assert batch["idx"].tolist() == [0, 0]  # two expressions of one image: one id
    assert "unreadable image" in caplog.text and "broken.jpg" in caplog.text

    val_batch = next(iter(dm.val_dataloader()))
    assert val_batch["num_skipped"] == 2 and val_batch["ref_id"] == [7, 7]  # two texts each
    assert val_batch["bbox"].shape == (2, 4) and val_batch["size"].tolist() == [[40, 30]] * 2
    assert [p.shape for p in val_batch["proposals"]] == [(2, 4), (2, 4)]
    assert val_batch["split"] == ["testA", "testA"]


@requires_shared
def test_coco_instances_sample():
    split = refs_from_coco_instances(INSTANCES, str(SAMPLE_IMAGES))
    train, val = split["train"], split["val"]
    assert (len(train), len({r.image for r in train})) == (136, 67)
    assert (len(val), len({r.image for r in val})) == (38, 16)
    assert not {r.image for r in train} & {r.image for r in val}
    data = json.loads(INSTANCES.read_text())
    names = {c["name"] for c in data["categories"]}
    for ref in val:
        assert ref.text in names and len(ref.proposals) >= 3
        assert ref.bbox in ref.proposals  # the ground truth is one of the proposals
        same_image = [r.text for r in val if r.image == ref.image]
        assert same_image.count(ref.text) == 1  # unambiguous
    chance = sum(float((box_iou_inclusive(torch.tensor(r.proposals), torch.tensor(r.bbox)[None])
                        >= 0.5).float().mean()) for r in val) / len(val)
    assert chance == pytest.approx(0.1544, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# The real CLI on the COCO-instances sample
def _tiny_override(tmp: Path) -> Path:
    override = {
        "trainer": {
            "max_epochs": 1, "limit_train_batches": 2, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(tmp),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp), "name": "csv"}},
            "callbacks": [
                {"class_path": "albef_pl.plots.GroundingExamplesPlotter"},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / "ckpt"), "monitor": "val/acc",
                               "mode": "max", "save_last": True}},
            ],
        },
        "model": {"init_args": {
            "vision": vars(tiny_vision(img_size=64)),
            "text": {**vars(tiny_text()), "vocab_size": 30522},  # the real tokenizer's ids
            "embed_dim": 16, "queue_size": 32, "init_checkpoint": None, "init_weights": False,
            "block_num": 3, "num_examples": 3,
        }},
        "data": {"init_args": {"image_size": 64, "batch_size": 8, "eval_batch_size": 20,
                               "num_workers": 0}},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def _last_metrics(csv_dir: Path) -> dict[str, float]:
    files = sorted(csv_dir.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    out: dict[str, float] = {}
    with open(files[-1]) as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


@requires_shared
def test_cli_fit_validate_and_test_per_split_on_the_coco_sample(tmp_path, monkeypatch):
    from albef_pl.cli import run_cli

    monkeypatch.chdir(ROOT)  # the config's data paths are relative to the project
    base = ["--config", str(SAMPLE_CONF), "--config", str(_tiny_override(tmp_path))]
    fit = run_cli(["fit", *base])
    metrics = _last_metrics(tmp_path / "csv")
    assert metrics["val/num_expressions"] == 38
    assert metrics["val/chance_acc"] == pytest.approx(0.1544, abs=1e-3)
    acc = metrics["val/acc"]
    assert 0 <= acc <= 1 and math.isclose(acc * 38, round(acc * 38), abs_tol=1e-4)
    assert fit.model.hparams.gradcam_mode == "itm"
    png = tmp_path / "csv/version_0/grounding_examples.png"
    assert png.stat().st_size > 5000
    with Image.open(png) as img:
        assert img.height > img.width  # three rows of (image, heat map)

    last = tmp_path / "ckpt" / "last.ckpt"
    val = run_cli(["validate", *base, "--ckpt_path", str(last)])
    assert float(val.trainer.callback_metrics["val/acc"]) == pytest.approx(acc)
    # The Grad-CAM options are evaluation options: --ckpt_path does not override them.
    itc = run_cli(["validate", *base, "--ckpt_path", str(last), "--model.gradcam_mode", "itc",
                   "--model.block_num", "1"])
    assert (itc.model.hparams.gradcam_mode, itc.model.hparams.block_num) == ("itc", 1)
    assert 0 <= float(itc.trainer.callback_metrics["val/acc"]) <= 1

    run_cli(["predict", *base, "--ckpt_path", str(last),
             "--model.predict_dir", str(tmp_path / "pred")])
    pred = json.loads((tmp_path / "pred" / "grounding_predictions.json").read_text())
    assert len(pred["expressions"]) == 38 and pred["acc"] == pytest.approx(acc)
    assert all(e["correct"] == (e["iou"] >= 0.5) and len(e["box"]) == 4
               for e in pred["expressions"])

    # A reference file in the RefCOCO+ layout with two subsets: one accuracy per subset.
    refs = refs_from_coco_instances(INSTANCES)["val"]
    entries = [{"ref_id": r.ref_id, "image": Path(r.image).name, "text": r.text,
                "bbox": r.bbox, "proposals": r.proposals, "width": r.width,
                "height": r.height, "split": "testA" if i % 3 else "testB"}
               for i, r in enumerate(refs)]
    test_file = _write(tmp_path / "refcoco+_test.json", entries)
    test = run_cli(["test", *base, "--ckpt_path", str(last), "--data.coco_instances", "null",
                    "--data.test_file", test_file])
    got = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    n_a = sum(e["split"] == "testA" for e in entries)
    n_b = len(entries) - n_a
    assert got["test/num_expressions"] == n_a + n_b == 38
    assert got["test/acc"] == pytest.approx(acc)  # the same expressions as validation
    assert got["test/acc"] == pytest.approx(
        (n_a * got["test/acc_testA"] + n_b * got["test/acc_testB"]) / (n_a + n_b))


def test_paper_recipe_values(capsys):
    from albef_pl.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(PAPER_CONF), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model, data, trainer = (printed[k] for k in ("model", "data", "trainer"))
    assert model["class_path"] == "albef_pl.tasks.grounding.GroundingTask"
    args = model["init_args"]
    assert (args["lr"], args["min_lr"], args["queue_size"], args["momentum"], args["alpha"]) == (
        1e-5, 1e-6, 65536, 0.995, 0.4)
    assert (args["gradcam_mode"], args["block_num"], args["vision"]["img_size"]) == ("itm", 8, 384)
    assert (data["init_args"]["batch_size"], data["init_args"]["image_size"]) == (32, 384)
    assert (trainer["max_epochs"], trainer["devices"], trainer["precision"]) == (5, 8, "bf16-mixed")
    assert trainer["inference_mode"] is False
    monitors = [c["init_args"].get("monitor") for c in trainer["callbacks"]
                if c["class_path"].endswith("ModelCheckpoint")]
    assert monitors == ["val/acc", None]  # the best by val/acc, and the newest as last.ckpt


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


def _own_files(tmp: Path, val_entries: list | None = None) -> list[str]:
    """Images, a training file and an evaluation file under ``tmp`` (instead of the COCO
    sample), as data options."""
    for k in range(3):
        _image(tmp / f"ok{k}.jpg")
    train = _write(tmp / "train.json", [{"image": f"ok{k % 3}.jpg", "text": f"thing {k}"}
                                        for k in range(4)])
    val = _write(tmp / "val.json", val_entries if val_entries is not None else
                 [_ref(ref_id=k, image=f"ok{k % 3}.jpg") for k in range(3)])
    return ["--data.image_root", str(tmp), "--data.coco_instances", "null",
            "--data.train_file", train, "--data.val_file", val, "--data.test_file", val,
            "--data.drop_last", "false", "--data.batch_size", "4"]


@pytest.mark.parametrize("option,value", [("batch_size", "0"), ("eval_batch_size", "0"),
                                          ("image_size", "-1"), ("max_words", "0")])
def test_cli_refuses_sizes_below_one_before_the_model_is_built(
    tmp_path, monkeypatch, capsys, option, value
):
    from albef_pl.tasks.grounding import GroundingTask

    monkeypatch.chdir(ROOT)
    _refuse_to_build(GroundingTask, monkeypatch)
    err = _main_fails(["fit", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), *_own_files(tmp_path),
                       f"--data.{option}", value], capsys)
    assert f"data.{option} must be an integer >= 1, got {value}" in err


def _instances(tmp: Path, change) -> str:
    data = {"images": [{"id": k, "file_name": f"ok{k % 3}.jpg", "width": 40, "height": 30}
                       for k in range(8)],
            "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
            "annotations": [{"id": 10 * k + j, "image_id": k, "category_id": 1 + j % 2,
                             "bbox": [1 + 5 * j, 2, 8, 9], "iscrowd": 0}
                            for k in range(8) for j in range(3)]}
    change(data)
    return _write(tmp / "instances.json", data)


@pytest.mark.parametrize("change,message", [
    (lambda d: d["annotations"][0].update(category_id=9),
     r"instances\.json: annotation 0 \(image 0\) has category_id 9, which 'categories' lacks"),
    (lambda d: d["annotations"][1].pop("bbox"),
     r"instances\.json: annotations\[1\] .* has no 'bbox'"),
    (lambda d: d["images"][2].pop("width"), r"instances\.json: images\[2\] .* has no 'width'"),
    # every category twice in every image: no unambiguous reference
    (lambda d: d["annotations"].extend({**a, "id": a["id"] + 1000} for a in list(
        d["annotations"])), r"train: data\.coco_instances .* gives no reference: no training "
                            r"image has a category with exactly one"),
    (lambda d: d.update(annotations=[]), r"train: data\.coco_instances .* gives no reference"),
    (lambda d: d["categories"][1].update(name="?"),
     r"instances\.json: category 2 has the name '\?', which is no expression"),
])
def test_cli_coco_instances_that_give_no_reference_or_lack_fields_are_one_line(
    tmp_path, monkeypatch, capsys, change, message
):
    monkeypatch.chdir(ROOT)
    for k in range(3):
        _image(tmp_path / f"ok{k}.jpg")
    err = _main_fails(["fit", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), "--data.image_root", str(tmp_path),
                       "--data.coco_instances", _instances(tmp_path, change)], capsys)
    assert re.search(message, err), err


def test_coco_instances_held_out_images_without_enough_boxes_say_so(tmp_path):
    f = _instances(tmp_path, lambda d: None)
    dm = GroundingDataModule(str(tmp_path), coco_instances=f, sample_min_proposals=4)
    for k in range(3):
        _image(tmp_path / f"ok{k}.jpg")
    with pytest.raises(ValueError, match=r"val: data\.coco_instances .* no held-out image "
                                         r"\(every 4th by id with at least data\.sample_min_"
                                         r"proposals=4 boxes\)"):
        dm.setup("validate")


def test_cli_predict_on_a_file_whose_images_all_fail_to_decode_writes_nothing(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("ALBEF_PL_TRACEBACK", raising=False)
    data = _own_files(tmp_path)
    (tmp_path / "zero.jpg").write_bytes(b"")
    predict = _write(tmp_path / "predict.json", [_ref(image="zero.jpg")])
    out = tmp_path / "out"
    err = _main_fails(["predict", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), *data, "--data.predict_file", predict,
                       "--model.predict_dir", str(out),
                       "--data.check_images", "false"], capsys)  # found in the pass, not setup
    assert f"error: predict: none of the 2 images read from {predict} could be decoded" in err
    assert not (out / "grounding_predictions.json").exists()


@pytest.mark.parametrize("mode,block,message", [
    ("itm", "99", r"model\.block_num=99 is not a fusion layer: layers 2\.\.3 cross-attend"),
    ("itm", "-1", r"model\.block_num=-1 is not a fusion layer: layers 2\.\.3"),
    ("itm", "1", r"model\.block_num=1 is not a fusion layer"),
    ("itc", "2", r"model\.block_num=2 is not a ViT block \(gradcam_mode itc; the ViT has 2 "
                 r"blocks, -2\.\.1\)"),
])
def test_cli_block_num_outside_the_model_is_refused_before_weights_are_built(
    tmp_path, monkeypatch, capsys, mode, block, message
):
    from albef_pl.tasks.retrieval import RetrievalTask

    monkeypatch.chdir(ROOT)
    _refuse_to_build(RetrievalTask, monkeypatch)  # GroundingTask's weights: its base's init
    err = _main_fails(["fit", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), *_own_files(tmp_path),
                       "--model.gradcam_mode", mode, "--model.block_num", block], capsys)
    assert re.search(message, err), err


def test_cli_a_training_file_whose_images_all_fail_to_decode_stops_before_training(
    tmp_path, monkeypatch, capsys
):
    from albef_pl.tasks.grounding import GroundingTask

    monkeypatch.chdir(ROOT)
    data = _own_files(tmp_path)
    (tmp_path / "zero.jpg").write_bytes(b"")
    train = _write(tmp_path / "broken.json", [{"image": "zero.jpg", "text": "a dog"}] * 4)
    monkeypatch.setattr(GroundingTask, "training_step",
                        lambda *a, **k: pytest.fail("trained on images that cannot decode"))
    err = _main_fails(["fit", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), *data, "--data.train_file", train],
                      capsys)
    assert f"train: not one of the 4 expressions read from {train} can be decoded (1 image " \
           "files fail, e.g. " in err


def test_cli_a_reference_whose_size_is_not_its_images_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    _image(tmp_path / "wide.jpg", size=(400, 3))
    refs = [_ref(ref_id=k, image=f"ok{k % 3}.jpg") for k in range(2)] + [
        _ref(ref_id=5, image="wide.jpg", text="a dog")]
    data = _own_files(tmp_path, refs)
    err = _main_fails(["validate", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), *data], capsys)
    assert f"val: ref_id 5 ('a dog') gives its image as 40x30, but {tmp_path / 'wide.jpg'} " \
           "is 400x3" in err


def test_cli_predict_without_ground_truth_writes_the_chosen_boxes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    data = _own_files(tmp_path)
    unlabelled = {k: v for k, v in _ref(ref_id=3, image="ok1.jpg", text="a cat").items()
                  if k != "bbox"}
    predict = _write(tmp_path / "predict.json", [_ref(ref_id=2, image="ok0.jpg", text="dog"),
                                                 unlabelled])
    out = tmp_path / "out"
    from albef_pl.cli import run_cli

    run_cli(["predict", "--config", str(SAMPLE_CONF), "--config", str(_tiny_override(tmp_path)),
             *data, "--data.predict_file", predict, "--model.predict_dir", str(out)])
    written = json.loads((out / "grounding_predictions.json").read_text())
    rows = {r["ref_id"]: r for r in written["expressions"]}
    assert rows[3]["bbox"] is None and rows[3]["iou"] is None and rows[3]["correct"] is None
    assert rows[3]["box"] in ([2.0, 3.0, 10.0, 12.0], [20.0, 5.0, 15.0, 20.0])
    assert rows[2]["bbox"] == [2.0, 3.0, 10.0, 12.0] and isinstance(rows[2]["correct"], bool)
    assert written["acc"] == float(rows[2]["correct"])  # over the expression with a box
    # fit, validate and test still need the ground truth
    val = _write(tmp_path / "val2.json", [unlabelled])
    err = _main_fails(["validate", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), *data, "--data.val_file", val], capsys)
    assert "val2.json: entry 0 (ref_id 3, image 'ok1.jpg') has no 'bbox'" in err


def test_cli_a_tokenizer_that_cannot_load_is_refused_before_the_model_is_built(
    tmp_path, monkeypatch, capsys
):
    from albef_pl.tasks.grounding import GroundingTask

    monkeypatch.chdir(ROOT)
    _refuse_to_build(GroundingTask, monkeypatch)
    err = _main_fails(["fit", "--config", str(SAMPLE_CONF), "--config",
                       str(_tiny_override(tmp_path)), *_own_files(tmp_path),
                       "--data.tokenizer", str(tmp_path / "no_tokenizer")], capsys)
    assert f"data.tokenizer: cannot load a tokenizer from '{tmp_path / 'no_tokenizer'}'" in err
