"""Retrieval: two-stage scoring against exhaustive scoring, sharding across processes, the
data module's layouts and bad files, checkpoint resizing, and the real CLI on the COCO
sample (fit, zero-shot validate, predict)."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from PIL import Image

from albef_pl.models import ALBEF
from albef_pl.rerank import NOT_CANDIDATE, exhaustive_itm_scores, itc_topk, two_stage_scores
from conftest import ROOT, requires_shared, tiny_text, tiny_vision
from data_modules.retrieval import RetrievalDataModule, RetrievalEvalStream, read_retrieval_json

SAMPLE_CONF = ROOT / "conf" / "finetune" / "retrieval_coco_sample.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy 2-core machine every
    parallel region waits for a descheduled thread (measured 50x slower fusion passes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Scoring
def _tiny_set(n_i: int = 5, n_t: int = 13, seed: int = 0):
    """A random tiny backbone and the embeddings of random images and (padded) captions."""
    torch.manual_seed(seed)
    model = ALBEF(tiny_vision(), tiny_text(), embed_dim=16, init_weights=False).eval()
    images = torch.randn(n_i, 3, 32, 32)
    ids = torch.randint(5, 128, (n_t, 9))
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0  # some captions are shorter: padding must not change their score
    with torch.no_grad():
        image_embeds, text_embeds = model.encode_image(images), model.encode_text(ids, mask)
        image_feat, text_feat = model.image_feature(image_embeds), model.text_feature(text_embeds)
    return model, image_embeds, text_embeds, mask, image_feat, text_feat


def test_k_test_covering_the_set_equals_exhaustive_reranking():
    model, ie, te, mask, fi, ft = _tiny_set()
    scores = two_stage_scores(model, fi, ft, ie, torch.arange(5), te, mask, k_test=13,
                              fusion_batch_size=7)
    exhaustive = exhaustive_itm_scores(model, ie, te, mask, fusion_batch_size=4)
    torch.testing.assert_close(scores.i2t, exhaustive, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.t2i, exhaustive.T, atol=1e-5, rtol=0)
    assert scores.num_fusion_pairs == 5 * 13  # each pair once, though a candidate both ways


def test_small_k_test_scores_only_the_itc_top_k():
    model, ie, te, mask, fi, ft = _tiny_set()
    k = 3
    scores = two_stage_scores(model, fi, ft, ie, torch.arange(5), te, mask, k_test=k)
    exhaustive = exhaustive_itm_scores(model, ie, te, mask)
    _, top_t = itc_topk(fi, ft, k)
    _, top_i = itc_topk(ft, fi, k)
    for score, top, ref in ((scores.i2t, top_t, exhaustive), (scores.t2i, top_i, exhaustive.T)):
        candidate = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)
        assert (candidate.sum(1) == k).all()
        assert (score[~candidate] == NOT_CANDIDATE).all()
        torch.testing.assert_close(score[candidate], ref[candidate], atol=1e-5, rtol=0)


def test_itc_only_and_itc_plus_itm_scores():
    model, ie, te, mask, fi, ft = _tiny_set()
    itc = two_stage_scores(model, fi, ft, ie, torch.arange(5), te, mask, rerank=False)
    torch.testing.assert_close(itc.i2t, fi @ ft.T)
    torch.testing.assert_close(itc.t2i, (fi @ ft.T).T)
    assert itc.num_fusion_pairs == 0
    both = two_stage_scores(model, fi, ft, ie, torch.arange(5), te, mask, k_test=13,
                            add_itc=True)
    itm = two_stage_scores(model, fi, ft, ie, torch.arange(5), te, mask, k_test=13)
    torch.testing.assert_close(both.i2t, itm.i2t + fi @ ft.T, atol=1e-5, rtol=0)


def test_similarities_and_match_logits_leave_bf16_autocast():
    model, ie, te, mask, fi, ft = _tiny_set()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        itc = two_stage_scores(model, fi, ft, ie, torch.arange(5), te, mask, rerank=False)
        _, top = itc_topk(fi, ft, 4)
    torch.testing.assert_close(itc.i2t, fi @ ft.T)  # fp32 values, not bf16-rounded
    assert torch.equal(top, itc_topk(fi, ft, 4)[1])


def test_every_image_must_be_held_once():
    model, ie, te, mask, fi, ft = _tiny_set()
    with pytest.raises(ValueError, match="exactly one process"):
        two_stage_scores(model, fi, ft, ie[:4], torch.arange(4), te, mask, k_test=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, out_dir: str, body) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.save(body(rank, world), Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _on_two_processes(body, tmp_path: Path) -> list[dict]:
    """``body(rank, world)`` in 2 gloo processes; what each returned, by rank."""
    # fork: the children reuse the imported modules (spawn would re-import them, ~10 s).
    mp.start_processes(_gloo_worker, args=(2, _free_port(), str(tmp_path), body), nprocs=2,
                       start_method="fork")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _sharded_scores(rank: int, world: int) -> dict:
    model, ie, te, mask, fi, ft = _tiny_set(n_i=7, n_t=17)
    mine = torch.arange(rank, 7, world)  # images held here (uneven: 4 and 3)
    scores = two_stage_scores(model, fi, ft, ie[mine], mine, te, mask, k_test=4,
                              fusion_batch_size=5)
    return {"i2t": scores.i2t, "t2i": scores.t2i, "pairs": scores.num_fusion_pairs}


def test_sharded_scoring_equals_one_process_and_splits_the_fusion_work(tmp_path):
    parts = _on_two_processes(_sharded_scores, tmp_path)
    model, ie, te, mask, fi, ft = _tiny_set(n_i=7, n_t=17)
    single = two_stage_scores(model, fi, ft, ie, torch.arange(7), te, mask, k_test=4)
    for part in parts:
        torch.testing.assert_close(part["i2t"], single.i2t, atol=1e-5, rtol=0)
        torch.testing.assert_close(part["t2i"], single.t2i, atol=1e-5, rtol=0)
    # No pair was scored twice: the ranks' pairs add up to the single process's.
    assert parts[0]["pairs"] + parts[1]["pairs"] == single.num_fusion_pairs


def _eval_batches(n_i: int = 5, per_image: int = 2) -> tuple[dict, dict]:
    """One image batch and one caption batch of a tiny evaluation set (RetrievalEvalStream's
    fields)."""
    g = torch.Generator().manual_seed(3)
    n_t = n_i * per_image
    ids = torch.randint(5, 128, (n_t, 9), generator=g)
    images = {"image": torch.randn(n_i, 3, 32, 32, generator=g), "image_index": torch.arange(n_i),
              "image_valid": torch.ones(n_i, dtype=torch.bool),
              "image_path": [f"{i}.jpg" for i in range(n_i)], "num_images": n_i, "num_texts": n_t}
    texts = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "text_index": torch.arange(n_t), "caption": [f"c{t}" for t in range(n_t)],
             "text_image_index": torch.arange(n_t) // per_image, "num_images": n_i,
             "num_texts": n_t}
    return images, texts


def _eval_task(world: int, rank: int):
    from types import SimpleNamespace

    from albef_pl.tasks.retrieval import RetrievalTask

    torch.manual_seed(0)
    task = RetrievalTask(vision=tiny_vision(), text=tiny_text(), embed_dim=16, queue_size=8,
                         k_test=3, fusion_batch_size=4).eval()
    task._trainer = SimpleNamespace(world_size=world, global_rank=rank)
    task._reset_eval()
    return task


def _scores_with_an_empty_share(rank: int, world: int) -> dict:
    task = _eval_task(world, rank)
    images, texts = _eval_batches()
    pick = lambda b, rows: {k: (v[rows] if torch.is_tensor(v) and v.dim() else  # noqa: E731
                                [v[r] for r in rows.tolist()] if isinstance(v, list) else v)
                            for k, v in b.items()}
    if rank == 0:  # every image and the first captions; rank 1: the other captions only
        task.embed_batch(images)
        task.embed_batch(pick(texts, torch.arange(0, 4)))
    else:
        task.embed_batch(pick(texts, torch.arange(4, 10)))
    with torch.no_grad():
        data = task._gather("val")
        scores = task.rank(data)
    return {"i2t": scores.i2t, "t2i": scores.t2i, "txt2img": data.txt2img}


def test_a_process_without_images_takes_part_in_the_evaluation(tmp_path):
    # A set with fewer image batches than processes: rank 1 embeds captions but no image.
    parts = _on_two_processes(_scores_with_an_empty_share, tmp_path)
    task = _eval_task(1, 0)
    for batch in _eval_batches():
        task.embed_batch(batch)
    with torch.no_grad():
        data = task._gather("val")
        single = task.rank(data)
    assert single.i2t.shape == (5, 10)
    for part in parts:
        assert part["txt2img"] == data.txt2img
        torch.testing.assert_close(part["i2t"], single.i2t, atol=1e-5, rtol=0)
        torch.testing.assert_close(part["t2i"], single.t2i, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Data
def _write_images(root: Path, names: list[str]) -> None:
    for k, name in enumerate(names):
        Image.new("RGB", (40, 30), (40 * k % 255, 80, 120)).save(root / name)


def test_json_layouts_group_captions_by_image(tmp_path):
    train = [{"image": "a.jpg", "caption": "A dog.", "image_id": 7},
             {"image": "b.jpg", "caption": "A cat.", "image_id": 9},
             {"image": "a.jpg", "caption": "The dog runs", "image_id": 7}]
    test = [{"image": "a.jpg", "caption": ["one", "two"]}, {"image": "b.jpg", "caption": ["x"]}]
    karpathy = {"images": [
        {"filepath": "val2014", "filename": "c.jpg", "split": "test", "cocoid": 3,
         "sentences": [{"raw": "c1"}, {"raw": "c2"}]},
        {"filepath": "train2014", "filename": "d.jpg", "split": "restval", "cocoid": 4,
         "sentences": [{"raw": "d1"}]},
    ]}
    for name, data in (("train", train), ("test", test), ("karpathy", karpathy)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))

    groups = read_retrieval_json(tmp_path / "train.json")
    assert [(g.image, g.captions, g.image_id) for g in groups] == [
        ("a.jpg", ["A dog.", "The dog runs"], 7), ("b.jpg", ["A cat."], 9)]
    test_groups = read_retrieval_json(tmp_path / "test.json")
    assert [g.captions for g in test_groups] == [["one", "two"], ["x"]]
    assert [g.image for g in read_retrieval_json(tmp_path / "karpathy.json", "test")] == [
        "val2014/c.jpg"]
    assert [g.image for g in read_retrieval_json(tmp_path / "karpathy.json", "train")] == [
        "train2014/d.jpg"]


def test_data_module_ids_bad_and_missing_images(tmp_path, caplog):
    _write_images(tmp_path, ["a.jpg", "b.jpg"])
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    train = [{"image": n, "caption": f"photo {k}", "image_id": n}
             for k, n in enumerate(["a.jpg", "bad.jpg", "b.jpg", "a.jpg", "gone.jpg"])]
    test = [{"image": n, "caption": [f"{n} one", f"{n} two"]}
            for n in ["a.jpg", "bad.jpg", "b.jpg"]]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    dm = RetrievalDataModule(str(tmp_path), train_file=str(tmp_path / "train.json"),
                             test_file=str(tmp_path / "test.json"), image_size=32,
                             batch_size=4, num_workers=0, pin_memory=False, drop_last=False)
    dm.setup("fit")
    dm.setup("test")
    assert dm.skipped_counts("train")["missing_image"] == 1
    assert "gone.jpg" in caplog.text
    # idx: one contiguous id per image_id, shared by both captions of a.jpg.
    assert [(Path(p).name, i) for p, _, i in dm.train_set.pairs] == [
        ("a.jpg", 0), ("a.jpg", 0), ("bad.jpg", 1), ("b.jpg", 2)]

    batch = next(iter(dm.train_dataloader()))  # the unreadable image is dropped and counted
    assert batch["image"].shape[0] == 3 and batch["num_skipped"] == 1
    assert "bad.jpg" in caplog.text

    stream = dm.eval_stream("test")
    (images,) = [b for b in stream if "image" in b]
    assert images["image_valid"].tolist() == [True, False, True]


def test_eval_stream_shards_every_sample_exactly_once(tmp_path):
    names = [f"{k}.jpg" for k in range(7)]
    _write_images(tmp_path, names)
    captions = [f"caption {j}" for j in range(23)]
    txt2img = [j % 7 for j in range(23)]
    from albef_pl.text import CaptionTokenizer
    from albef_pl.transforms import eval_transform

    seen_i, seen_t = [], []
    for rank in range(3):
        stream = RetrievalEvalStream([str(tmp_path / n) for n in names], captions, txt2img,
                                     eval_transform(16), CaptionTokenizer(max_length=8),
                                     image_batch_size=2, text_batch_size=4, rank=rank,
                                     world_size=3)
        batches = list(stream)
        assert len(batches) == len(stream)
        for b in batches:
            if "image" in b:
                seen_i += b["image_index"].tolist()
            else:
                seen_t += b["text_index"].tolist()
                assert b["text_image_index"].tolist() == [txt2img[j] for j in b["text_index"]]
    assert sorted(seen_i) == list(range(7)) and sorted(seen_t) == list(range(23))


# ---------------------------------------------------------------------------------------------
# Weights
@pytest.mark.parametrize("source", ["pretrain", "retrieval"])
def test_init_checkpoint_resizes_position_embeddings(tmp_path, source):
    from albef_pl.tasks import PretrainTask
    from albef_pl.tasks.retrieval import RetrievalTask

    cls = PretrainTask if source == "pretrain" else RetrievalTask
    small = cls(vision=tiny_vision(img_size=32), text=tiny_text(), embed_dim=16, queue_size=8,
                init_weights=False)
    path = tmp_path / "small.ckpt"
    torch.save({"state_dict": small.state_dict()}, path)
    big = RetrievalTask(vision=tiny_vision(img_size=48), text=tiny_text(), embed_dim=16,
                        queue_size=8, init_weights=False, init_checkpoint=str(path))
    pos = big.model.visual_encoder.pos_embed
    assert pos.shape == (1, 1 + 9, 32)
    torch.testing.assert_close(pos[:, 0], small.model.visual_encoder.pos_embed[:, 0])
    assert big.teacher.visual_encoder.pos_embed.shape == pos.shape
    torch.testing.assert_close(big.model.itm_head.weight, small.model.itm_head.weight)
    torch.testing.assert_close(big.model.temp, small.model.temp)
    assert big.model.mlm_head is None  # retrieval trains no MLM
    if source == "pretrain":
        assert (big.queue.idx_queue == -100).all()


# ---------------------------------------------------------------------------------------------
# The real CLI on the COCO sample
def _tiny_override(tmp: Path) -> Path:
    override = {
        "trainer": {
            "max_epochs": 1, "limit_train_batches": 3, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(tmp),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp), "name": "csv"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True}},
            ],
        },
        "model": {"init_args": {
            "vision": vars(tiny_vision()),
            "text": {**vars(tiny_text()), "vocab_size": 30522},  # the real tokenizer's ids
            "embed_dim": 16, "queue_size": 32, "init_checkpoint": None, "init_weights": False,
            "k_test": 8, "predict_dir": str(tmp / "predictions"),
        }},
        "data": {"init_args": {"image_size": 32, "batch_size": 8, "num_workers": 0}},
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
def test_cli_fit_zero_shot_validate_and_predict_on_the_coco_sample(tmp_path, monkeypatch):
    from albef_pl.cli import main

    monkeypatch.chdir(ROOT)  # the config's data paths are relative to the project
    base = ["--config", str(SAMPLE_CONF), "--config", str(_tiny_override(tmp_path))]
    main(["fit", *base])
    fit = _last_metrics(tmp_path / "csv")
    assert fit["val/num_images"] == 30 and fit["val/num_texts"] == 150
    assert 0 <= fit["val/img_r1"] <= fit["val/img_r5"] <= fit["val/img_r10"] <= 100
    assert fit["val/r_mean"] == pytest.approx((fit["val/txt_r_mean"] + fit["val/img_r_mean"]) / 2)

    # Zero-shot ITC ranking of the checkpoint at a larger resolution (resized on load).
    last = tmp_path / "ckpt" / "last.ckpt"
    main(["validate", *base, "--model.init_checkpoint", str(last), "--model.rerank", "false",
          "--model.vision.img_size", "48", "--data.image_size", "48"])
    zero = _last_metrics(tmp_path / "csv")
    assert zero["val/num_texts"] == 150 and 0 <= zero["val/r_mean"] <= 100

    main(["predict", *base, "--ckpt_path", str(last)])
    out = json.loads((tmp_path / "predictions" / "retrieval_predictions.json").read_text())
    assert len(out["images"]) == 30 and len(out["captions"]) == 150
    assert all(len(e["top_captions"]) == 10 and len(e["captions"]) == 5 for e in out["images"])
    assert all(len(e["top_images"]) == 10 for e in out["captions"])
    assert set(out["metrics"]) >= {"txt_r1", "img_r10", "r_mean"}
    assert (tmp_path / "predictions" / "retrieval_top5.png").stat().st_size > 1000


@pytest.mark.parametrize("name", ["retrieval_coco.yaml", "retrieval_flickr.yaml"])
def test_paper_configs_parse(name, capsys):
    from albef_pl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "conf" / "finetune" / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["lr"] == 1e-5
    assert printed["model"]["init_args"]["vision"]["img_size"] == 384


def test_a_batch_without_image_indices_is_refused_with_the_data_module_to_use():
    from albef_pl.tasks.retrieval import RetrievalTask

    task = RetrievalTask(vision=tiny_vision(), text=tiny_text(), embed_dim=16, queue_size=8,
                         init_weights=False)
    ids = torch.randint(5, 128, (2, 6))
    batch = {"image": torch.randn(2, 3, 32, 32), "input_ids": ids,
             "attention_mask": torch.ones_like(ids)}  # a pre-training batch: no "idx"
    with pytest.raises(KeyError, match="RetrievalDataModule"):
        task.training_step(batch, 0)
