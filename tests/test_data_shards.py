"""Shard streaming: epoch arithmetic per rank and worker, bad data, captions, mixing, sizes."""

from __future__ import annotations

import collections
import json
import logging
import re
import tarfile
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from shard_helpers import (
    COCO_SAMPLE,
    image_bytes,
    sample_members,
    truncated_jpeg,
    write_good_shards,
    write_tar,
)

from albef_pl.text import build_tokenizer
from data_modules import SKIP_REASONS, PretrainDataModule, SkippedSamplesLogger
from data_modules.shards import expand_shards, read_num_samples, read_shard_sizes


def make_dm(**kwargs) -> PretrainDataModule:
    defaults = dict(batch_size=4, num_workers=0, image_size=16, shuffle_buffer=8, seed=0)
    defaults.update(kwargs)
    return PretrainDataModule(**defaults)


def ids_of(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["image_id"].tolist()]


def test_train_batches_per_epoch_equal_on_two_ranks_with_two_workers(tmp_path: Path) -> None:
    write_good_shards(tmp_path, [20, 20, 20])  # 60 samples
    per_rank = []
    for rank in range(2):
        dm = make_dm(train_shards=str(tmp_path), num_workers=2)
        dm.set_world(rank, 2)
        loader = dm.train_dataloader()
        epochs = [list(loader) for _ in range(2)]
        assert len(loader) == 60 // (2 * 4) == 7
        assert [len(e) for e in epochs] == [7, 7]
        assert all(b["image"].shape == (4, 3, 16, 16) for e in epochs for b in e)
        assert all(b["input_ids"].shape[0] == 4 for e in epochs for b in e)
        assert ids_of(epochs[0]) != ids_of(epochs[1])  # a new draw each epoch
        per_rank.append(ids_of(epochs[0]))
    assert per_rank[0] != per_rank[1]  # ranks draw independently

    # An explicit sample count overrides the sizes file.
    dm = make_dm(train_shards=str(tmp_path), num_train_samples=40)
    dm.set_world(1, 2)
    assert len(dm.train_dataloader()) == 5 == len(list(dm.train_dataloader()))


def test_batch_layout_and_tokens(tmp_path: Path) -> None:
    write_good_shards(tmp_path, [6])
    batch = next(iter(make_dm(train_shards=str(tmp_path)).train_dataloader()))
    assert set(batch) == {"image", "input_ids", "attention_mask", "image_id"}
    assert batch["image"].dtype == torch.float32
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    ids = batch["input_ids"]
    assert (ids[:, 0] == 101).all() and not (ids == 102).any()  # [CLS] and no [SEP]
    text = build_tokenizer().decode(ids[0][batch["attention_mask"][0].bool()][1:])
    assert text == f"a photo number {batch['image_id'][0].item()}"


def test_val_full_batches_and_equal_counts_on_ranks(tmp_path: Path) -> None:
    write_good_shards(tmp_path, [10, 7, 5])  # 22 samples
    dm = make_dm(val_shards=str(tmp_path), num_workers=2)
    batches = list(dm.val_dataloader())
    assert len(batches) == 22 // 4 == 5
    assert all(len(b["image"]) == 4 for b in batches)
    ids = ids_of(batches)
    assert len(set(ids)) == 20 and set(ids) <= set(range(22))
    assert [len(list(dm.val_dataloader())) for _ in range(2)] == [5, 5]

    # Two ranks: shards 0+2 (15) and 1 (7) -> one full batch each, never more.
    counts = []
    for rank in range(2):
        dm = make_dm(val_shards=str(tmp_path), num_workers=2)
        dm.set_world(rank, 2)
        loader = dm.val_dataloader()
        counts.append((len(loader), len(list(loader))))
    assert counts == [(1, 1), (1, 1)]


def test_test_split_reads_test_shards_else_the_validation_shards(tmp_path: Path) -> None:
    write_good_shards(tmp_path / "val", [8])  # ids 0..7
    write_good_shards(tmp_path / "test", [12], first_id=100)  # ids 100..111
    dm = make_dm(val_shards=str(tmp_path / "val"))
    assert sorted(ids_of(list(dm.test_dataloader()))) == list(range(8))
    dm = make_dm(val_shards=str(tmp_path / "val"), test_shards=str(tmp_path / "test"))
    assert sorted(ids_of(list(dm.test_dataloader()))) == list(range(100, 112))
    assert sorted(ids_of(list(dm.val_dataloader()))) == list(range(8))
    assert set(dm.skipped_counts("test").values()) == {0}
    with pytest.raises(FileNotFoundError, match="data.test_shards"):
        make_dm(val_shards=str(tmp_path / "val"), test_shards=str(tmp_path / "nowhere"))


def write_bad_shard(path: Path) -> None:
    good = [m for i in range(4) for m in sample_members(f"good{i}", f"a good caption {i}", i)]
    write_tar(
        path,
        good[:4]
        + [("corrupt.jpg", b"not an image at all"), ("corrupt.txt", b"a corrupt image")]
        + [("trunc.jpg", truncated_jpeg()), ("trunc.txt", b"a truncated image")]
        + [("nocap.png", image_bytes())]
        + [("noimg.txt", b"a caption without image")]
        + [("emptycap.png", image_bytes()), ("emptycap.txt", b"  ... !! ")]
        + [("cyrillic.png", image_bytes()), ("cyrillic.txt", "красный круг".encode())]
        + [("badjson.png", image_bytes()), ("badjson.json", b"{not json")]
        # Out of order: two samples whose image and caption members are interleaved.
        + [("ooo1.png", image_bytes()), ("ooo2.png", image_bytes())]
        + [("ooo1.txt", b"first"), ("ooo2.txt", b"second")]
        + good[4:],
    )


EXPECTED_IN_SHARD = {
    "corrupt_image": 2,
    "missing_caption": 2,  # no caption member; a json member that does not parse
    "missing_image": 1,
    "empty_caption": 1,
    "unusable_caption": 1,
    "out_of_order": 2,
}


def test_every_bad_case_is_skipped_and_counted(tmp_path: Path, caplog) -> None:
    write_bad_shard(tmp_path / "shard-000000.tar")
    write_tar(tmp_path / "shard-000001.tar", [])  # a valid tar without members
    (tmp_path / "shard-000002.tar").write_bytes(b"")  # a zero-byte file
    (tmp_path / "shard-000003.tar").write_bytes(b"this is no tar file" * 40)

    # Sizes files count every written sample, bad ones included: 18 samples here, but
    # only 4 are usable, so the epoch is filled by repeating the first batch.
    dm = make_dm(val_shards=str(tmp_path), num_val_samples=18, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="data_modules"):
        batches = list(dm.val_dataloader())
    assert len(batches) == 9
    assert ids_of(batches[:2]) == [0, 1, 2, 3]
    assert ids_of(batches[2:]) == [0, 1] * 7
    expected = dict.fromkeys(SKIP_REASONS, 0)
    expected.update(EXPECTED_IN_SHARD, empty_shard=2, unreadable_shard=1)
    assert dm.skipped_counts("val") == expected
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped a sample" in messages  # the rate-limited warning during the epoch
    assert "skipped 12 samples or shards" in messages  # the epoch summary
    assert "ran out after 2 of 9 batches; repeating the first batch" in messages



def cut_at_member(path: Path, index: int, extra: int = 0) -> None:
    """Cut a tar file at the header of its member ``index`` (plus ``extra`` bytes of it)."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[index].offset
    path.write_bytes(path.read_bytes()[: offset + extra])


def test_tar_cut_at_a_member_header_counts_the_lost_samples(tmp_path: Path, caplog) -> None:
    paths = write_good_shards(tmp_path, [6, 6])  # sizes.json records 6 + 6
    cut_at_member(paths[0], 5)  # members: 0.png 0.json 1.png 1.json 2.png | 2.json ... lost
    dm = make_dm(val_shards=str(tmp_path), batch_size=2)
    with caplog.at_level(logging.WARNING, logger="data_modules"):
        batches = list(dm.val_dataloader())
    assert sorted(set(ids_of(batches))) == [0, 1, 6, 7, 8, 9, 10, 11]
    counts = dm.skipped_counts("val")
    # Sample 2 lost its caption member; samples 3, 4, 5 were never read.
    assert counts["missing_caption"] == 1 and counts["truncated_shard"] == 3
    assert sum(counts.values()) == 12 - 8
    messages = caplog.text
    assert f"shard {paths[0]} is truncated" in messages
    assert "3 of its 6 samples (sizes.json) were lost" in messages
    assert "Re-download the file or re-write it" in messages

    # Cut inside a header, no sizes file: the shard is counted once, the loss is unknown.
    (tmp_path / "sizes.json").unlink()
    cut_at_member(paths[1], 4, extra=100)
    dm = make_dm(val_shards=str(tmp_path), batch_size=2, num_val_samples=6)  # reads all
    with caplog.at_level(logging.WARNING, logger="data_modules"):
        assert ids_of(list(dm.val_dataloader())) == [0, 1, 6, 7, 0, 1]
    counts = dm.skipped_counts("val")
    assert counts["truncated_shard"] == 2 and counts["missing_caption"] == 1
    assert f"shard {paths[1]} is truncated: it ends inside a member header" in caplog.text
    assert "unknown number of samples were lost" in caplog.text



def test_val_sizes_file_that_over_counts_is_named_in_the_warning(tmp_path: Path, caplog) -> None:
    write_good_shards(tmp_path, [5])
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps({"shard-000000.tar": 12, "total": 12}))  # 7 too many
    dm = make_dm(val_shards=str(tmp_path), batch_size=2)
    with caplog.at_level(logging.WARNING, logger="data_modules"):
        batches = list(dm.val_dataloader())
    assert len(batches) == 12 // 2 and ids_of(batches) == [0, 1, 2, 3] + [0, 1] * 4
    assert "ran out after 2 of 6 batches; repeating the first batch" in caplog.text
    assert (
        f"{sizes} count 12 samples in this rank's 1 shards; 5 were found (5 usable, 0 skipped): "
        "the sizes file over-counts by 7 samples, which sets too many val batches. Re-write it "
        "(albef-pl-shards --force) or set num_val_samples."
    ) in caplog.text
    # The test split names its own option.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_modules"):
        list(make_dm(val_shards=str(tmp_path), batch_size=2).test_dataloader())
    assert "too many test batches" in caplog.text and "set num_test_samples." in caplog.text


def test_skip_counts_travel_back_from_workers(tmp_path: Path) -> None:
    write_bad_shard(tmp_path / "shard-000000.tar")
    dm = make_dm(train_shards=str(tmp_path), num_train_samples=32, batch_size=4, num_workers=2)
    loader = dm.train_dataloader()
    assert len(list(loader)) == 8
    counts = dm.skipped_counts()
    # Every pass over the shard meets each bad case once; workers read whole shards.
    passes = counts["out_of_order"] // 2
    assert passes >= 8  # 32 good samples need at least 8 passes over 4 good ones
    # Counts travel with batches, and each of the 2 workers reads up to 2 batches (here: 2
    # passes) ahead, so a reason met late in a pass may lag by up to 4 passes.
    lag = 2 * 2
    for reason, per_pass in EXPECTED_IN_SHARD.items():
        assert (passes - lag) * per_pass <= counts[reason] <= passes * per_pass


def test_all_bad_source_fails_loudly_instead_of_hanging(tmp_path: Path) -> None:
    write_tar(tmp_path / "shard-000000.tar", [])
    dm = make_dm(train_shards=str(tmp_path), num_train_samples=8)
    with pytest.raises(RuntimeError, match="no usable sample"):
        list(dm.train_dataloader())



def test_source_whose_every_image_fails_to_decode_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    write_tar(
        bad / "shard-000000.tar",
        [m for i in range(4) for m in ((f"{i}.jpg", b"not an image"), (f"{i}.txt", b"a caption"))],
    )
    write_good_shards(tmp_path / "good", [8])
    # Alone, or mixed with a good source: the bad source fails after 200 shard draws.
    for index, sources in enumerate([[str(bad)], [str(tmp_path / "good"), str(bad)]]):
        weights = [1.0, 9.0][-len(sources) :]  # 200 bad draws come with about 90 good samples
        dm = make_dm(train_shards=sources, num_train_samples=400, train_weights=weights)
        with pytest.raises(RuntimeError) as info:
            list(dm.train_dataloader())
        message = str(info.value)
        shard = bad / "shard-000000.tar"
        assert f"train: source {index} {str(bad)!r} (1 shards, e.g. {shard})" in message
        assert "gave no image that decodes in 200 shard draws in a row" in message
        corrupt = int(re.search(r"'corrupt_image': (\d+)", message).group(1))
        failed = int(re.search(r"\((\d+) failed decodes", message).group(1))
        assert failed == corrupt  # only this source fails, and never succeeds
        # Raised at the first decode of a draw-200 image: the images of 199 draws and 1 to 4
        # of the 200th were drawn, of which at most 8 (the shuffle buffer) are not decoded.
        assert 4 * 199 + 1 - 8 <= corrupt <= 4 * 200


def test_caption_lists_draw_all_captions_over_epochs(tmp_path: Path) -> None:
    captions = [f"caption number {w}" for w in ("one", "two", "three", "four", "five")]
    write_tar(tmp_path / "shard-000000.tar", sample_members("only", captions, 7))
    dm = make_dm(train_shards=str(tmp_path), num_train_samples=4, batch_size=4)
    loader = dm.train_dataloader()
    tokenizer = build_tokenizer()
    drawn = collections.Counter()
    for _ in range(10):
        for batch in loader:
            for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
                drawn[tokenizer.decode(row[mask.bool()][1:])] += 1
    assert set(drawn) == set(captions)
    assert sum(drawn.values()) == 40 and min(drawn.values()) >= 3


def test_caption_member_forms(tmp_path: Path) -> None:
    img = image_bytes()
    write_tar(
        tmp_path / "shard-000000.tar",
        [("a.png", img), ("a.txt", b"Plain TEXT caption.")]
        + [("b.png", img), ("b.json", json.dumps("a json string").encode())]
        + [("c.png", img), ("c.json", json.dumps({"caption": "img2dataset style"}).encode())]
        + [("d.jpg", image_bytes(fmt="JPEG")), ("d.json", json.dumps(["list", "list"]).encode())],
    )
    dm = make_dm(val_shards=str(tmp_path), num_val_samples=4, batch_size=4)
    (batch,) = list(dm.val_dataloader())
    tokenizer = build_tokenizer()
    texts = [
        tokenizer.decode(r[m.bool()][1:])
        for r, m in zip(batch["input_ids"], batch["attention_mask"])
    ]
    assert texts == ["plain text caption", "a json string", "img2dataset style", "list"]
    assert "image_id" not in batch


def test_sources_mix_by_weight(tmp_path: Path) -> None:
    write_good_shards(tmp_path / "a", [10], first_id=0)
    write_good_shards(tmp_path / "b", [10], first_id=100)
    sources = [str(tmp_path / "a"), str(tmp_path / "b")]

    dm = make_dm(train_shards=sources, train_weights=[1.0, 0.0], num_train_samples=40)
    assert all(i < 100 for i in ids_of(list(dm.train_dataloader())))

    dm = make_dm(train_shards=sources, train_weights=[3.0, 1.0], num_train_samples=400)
    ids = ids_of(list(dm.train_dataloader()))
    share_a = sum(i < 100 for i in ids) / len(ids)
    assert 0.65 < share_a < 0.85


def test_shard_lists_and_sizes(tmp_path: Path) -> None:
    paths = write_good_shards(tmp_path, [3, 4, 5])
    pattern = str(tmp_path / "shard-{000000..000002}.tar")
    assert expand_shards(pattern) == [str(p) for p in paths]
    assert expand_shards(str(tmp_path)) == [str(p) for p in paths]
    assert expand_shards([str(paths[0]), str(paths[2])]) == [str(paths[0]), str(paths[2])]
    assert read_num_samples(expand_shards(pattern)) == 12
    assert read_shard_sizes([str(paths[1])]) == {str(paths[1]): 4}
    (tmp_path / "sizes.json").unlink()
    assert read_num_samples([str(p) for p in paths]) is None
    with pytest.raises(ValueError, match="num_train_samples"):
        make_dm(train_shards=pattern).train_dataloader()


def test_img2dataset_directory_works_as_is(tmp_path: Path) -> None:
    for shard in range(2):
        members = []
        for i in range(3):
            key = f"{shard:05d}{i:04d}"
            meta = {"caption": f"web caption {key}", "url": "http://x", "status": "success"}
            members += [
                (f"{key}.jpg", image_bytes(fmt="JPEG")),
                (f"{key}.txt", f"web caption {key}".encode()),
            ]
            members += [(f"{key}.json", json.dumps(meta).encode())]
        write_tar(tmp_path / f"{shard:05d}.tar", members)
        stats = {"count": 4, "successes": 3, "failed_to_download": 1}
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
        (tmp_path / f"{shard:05d}.parquet").write_bytes(b"PAR1")
    dm = make_dm(train_shards=str(tmp_path), batch_size=3)
    loader = dm.train_dataloader()
    assert len(loader) == 2
    assert [b["image"].shape[0] for b in loader] == [3, 3]
    assert dm.skipped_counts() == dict.fromkeys(SKIP_REASONS, 0)


@pytest.mark.skipif(not COCO_SAMPLE.is_dir(), reason=f"COCO sample not found at {COCO_SAMPLE}")
def test_real_coco_shards_feed_pretraining_batches(tmp_path: Path) -> None:
    from data_modules.shard_writer import samples_from_albef_json, write_shards

    samples = samples_from_albef_json([COCO_SAMPLE / "albef_train.json"], COCO_SAMPLE)
    result = write_shards(
        samples, tmp_path / "shards", samples_per_shard=40, image_root=COCO_SAMPLE
    )
    assert result.total == 104 and not result.skipped

    dm = make_dm(
        train_shards=str(tmp_path / "shards"), batch_size=8, image_size=256, shuffle_buffer=16
    )
    loader = dm.train_dataloader()
    assert len(loader) == 104 // 8
    known_ids = {
        int(e["image_id"]) for e in json.loads((COCO_SAMPLE / "albef_train.json").read_text())
    }
    for batch, _ in zip(loader, range(2)):
        assert batch["image"].shape == (8, 3, 256, 256)
        assert torch.isfinite(batch["image"]).all() and batch["image"].std() > 0.3
        assert batch["input_ids"].shape[1] <= 25
        assert (batch["input_ids"][:, 0] == 101).all()
        assert set(batch["image_id"].tolist()) <= known_ids
    assert sum(dm.skipped_counts().values()) == 0


class _MeanImageModel(L.LightningModule):
    """The smallest module that consumes the batches: a linear map of the image means."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.steps_per_epoch: list[int] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        assert batch["input_ids"].dtype == torch.int64 and "skipped" not in batch
        return self.layer(batch["image"].mean((2, 3))).pow(2).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self.layer(batch["image"].mean((2, 3))).pow(2).mean())

    def on_train_epoch_start(self) -> None:
        self.steps_per_epoch.append(0)

    def on_train_batch_end(self, *args) -> None:
        self.steps_per_epoch[-1] += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_sees_the_length_and_logs_skips(tmp_path: Path) -> None:
    write_bad_shard(tmp_path / "train" / "shard-000000.tar")
    write_good_shards(tmp_path / "val", [9])
    dm = make_dm(
        train_shards=str(tmp_path / "train"),
        num_train_samples=12,
        val_shards=str(tmp_path / "val"),
        batch_size=4,
    )
    model = _MeanImageModel()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SkippedSamplesLogger()],
    )
    trainer.fit(model, datamodule=dm)
    assert len(trainer.train_dataloader) == 3 == trainer.num_training_batches
    assert model.steps_per_epoch == [3, 3]
    assert trainer.num_val_batches == [2]
    metrics = trainer.callback_metrics
    assert metrics["train/skipped_out_of_order"] >= 2 * 3  # at least 3 passes over the shard
    assert metrics["train/skipped_empty_shard"] == 0 and metrics["val/skipped_corrupt_image"] == 0
    assert dm.state_dict()["epochs"]["train"] == 2


def test_missing_local_shards_fail_with_a_clear_message(tmp_path: Path) -> None:
    write_good_shards(tmp_path, [2])
    # Checked when the data module is built, before any model or loader exists.
    with pytest.raises(FileNotFoundError, match="data.train_shards: .*1 of 2 local files missing"):
        make_dm(train_shards=str(tmp_path / "shard-{000000..000001}.tar"))
    with pytest.raises(FileNotFoundError, match="data.val_shards: .*1 of 1 local files missing"):
        make_dm(val_shards=str(tmp_path / "no_such_dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty'?: no .tar files found there"):
        make_dm(train_shards=str(tmp_path / "empty"))
    # and again when the loader is made (shards removed after the module was built)
    dm = make_dm(train_shards=str(tmp_path / "shard-000000.tar"))
    (tmp_path / "shard-000000.tar").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 1 local files missing"):
        dm.train_dataloader()


def test_unloadable_tokenizer_fails_when_the_data_module_is_built(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.tokenizer: cannot load a tokenizer from"):
        make_dm(tokenizer=str(tmp_path / "no_vocab_here"))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_restored_epoch_counter_replays_that_epochs_draws(tmp_path: Path, num_workers: int) -> None:
    """Resume: a data module given the saved epoch counter draws what the uninterrupted run
    drew in that epoch, with or without worker processes."""
    write_good_shards(tmp_path, [12, 12])
    loader = make_dm(train_shards=str(tmp_path), num_workers=num_workers).train_dataloader()
    uninterrupted = [ids_of(list(loader)) for _ in range(3)]
    assert uninterrupted[1] != uninterrupted[2]

    resumed = make_dm(train_shards=str(tmp_path), num_workers=num_workers)
    resumed.load_state_dict({"epochs": {"train": 2}})
    assert ids_of(list(resumed.train_dataloader())) == uninterrupted[2]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_restored_position_inside_an_epoch_continues_that_epochs_draws(
    tmp_path: Path, num_workers: int
) -> None:
    """Mid-epoch resume: the batches after the saved position are the uninterrupted run's,
    also with two workers (whose batches interleave), and the next epoch follows as usual."""
    write_good_shards(tmp_path, [12, 12])
    loader = make_dm(train_shards=str(tmp_path), num_workers=num_workers).train_dataloader()
    uninterrupted = [[b["image_id"].tolist() for b in loader] for _ in range(3)]
    assert len(uninterrupted[1]) == 6

    resumed = make_dm(train_shards=str(tmp_path), num_workers=num_workers)
    resumed.load_state_dict({"epochs": {"train": 1}, "train_batch": 4})
    again = resumed.train_dataloader()
    assert [b["image_id"].tolist() for b in again] == uninterrupted[1][4:]
    assert [b["image_id"].tolist() for b in again] == uninterrupted[2]


def test_the_saved_position_counts_batches_taken_not_batches_prefetched(tmp_path: Path) -> None:
    write_good_shards(tmp_path, [12, 12])
    dm = make_dm(train_shards=str(tmp_path))
    assert dm.state_dict() == {"epochs": {}, "train_batch": 0}
    loader = dm.train_dataloader()
    assert dm.state_dict() == {"epochs": {"train": 0}, "train_batch": 0}
    it = iter(loader)
    next(it), next(it), next(it)  # Lightning fetches one batch ahead of the step
    loader.consumed = 2  # what on_before_batch_transfer counted
    assert dm.state_dict() == {"epochs": {"train": 0}, "train_batch": 2}
    loader.consumed += len(list(it)) + 1  # the epoch ends
    assert dm.state_dict() == {"epochs": {"train": 1}, "train_batch": 0}
    it = iter(loader)  # the next epoch has started, nothing taken yet
    assert dm.state_dict() == {"epochs": {"train": 1}, "train_batch": 0}
    next(it)
    assert dm.state_dict() == {"epochs": {"train": 1}, "train_batch": 0}


class _IdRecorder(_MeanImageModel):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[list[int]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.ids.append(batch["image_id"].tolist())
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, *args) -> None:  # a resumed epoch has no epoch start
        pass


def test_lightning_resume_from_a_mid_epoch_checkpoint_trains_on_the_same_batches(
    tmp_path: Path,
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    write_good_shards(tmp_path / "train", [12, 12])  # 6 batches of 4 per epoch

    def fit(ckpt_path=None) -> _IdRecorder:
        model = _IdRecorder()
        every_8 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8,
                                  save_top_k=-1, filename="{step}")
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                            callbacks=[every_8], enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=make_dm(train_shards=str(tmp_path / "train")),
                    ckpt_path=ckpt_path)
        return model

    whole = fit().ids  # saves step=8.ckpt, 2 batches into epoch 1, as a crash would find it
    assert len(whole) == 12 and whole[:6] != whole[6:]
    ckpt = tmp_path / "ckpt" / "step=8.ckpt"
    state = torch.load(ckpt, weights_only=False)["PretrainDataModule"]
    assert state == {"epochs": {"train": 1}, "train_batch": 2}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fit(ckpt_path=ckpt).ids == whole[8:]
    assert not [w for w in caught if "not resumable" in str(w.message)]
