"""EMA update, feature queues, and the queues across two processes."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from albef_pl.momentum import FeatureQueue, concat_all_gather, ema_update


def test_ema_update_equals_formula():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.995)
    for k, v in teacher.state_dict().items():
        expected = before[k] * 0.995 + student.state_dict()[k] * (1 - 0.995)
        assert torch.equal(v, expected), k


def test_ema_ignores_student_only_parameters():
    student = nn.ModuleDict({"a": nn.Linear(2, 2), "head": nn.Linear(2, 2)})
    teacher = nn.ModuleDict({"a": nn.Linear(2, 2)})
    ema_update(teacher, student, 0.5)  # must not fail on the missing head


def test_queue_pointer_wraps_with_any_batch_size():
    q = FeatureQueue(embed_dim=2, queue_size=5)
    feats = torch.arange(6.0).view(3, 2)
    q.enqueue(feats, feats)  # columns 0-2
    assert q.queue_ptr.item() == 3
    q.enqueue(feats + 10, feats + 10)  # columns 3, 4, then wraps to 0
    assert q.queue_ptr.item() == 1
    torch.testing.assert_close(q.image_queue[:, 3], feats[0] + 10)
    torch.testing.assert_close(q.image_queue[:, 4], feats[1] + 10)
    torch.testing.assert_close(q.image_queue[:, 0], feats[2] + 10)
    torch.testing.assert_close(q.image_queue[:, 1], feats[1])  # untouched


def test_queue_keeps_ids_and_newest_of_an_oversized_batch():
    q = FeatureQueue(embed_dim=1, queue_size=3, with_idx=True)
    assert (q.idx_queue == -100).all()
    q.enqueue(torch.arange(5.0).view(5, 1), torch.arange(5.0).view(5, 1), torch.arange(5))
    assert sorted(q.idx_queue[0].tolist()) == [2, 3, 4]
    assert sorted(q.image_queue[0].tolist()) == [2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="pass idx"):
        q.enqueue(torch.zeros(1, 1), torch.zeros(1, 1))


def test_queue_initialised_with_unit_columns():
    q = FeatureQueue(embed_dim=8, queue_size=16)
    torch.testing.assert_close(q.image_queue.norm(dim=0), torch.ones(16))


def test_gather_without_process_group_is_identity():
    t = torch.randn(3, 2)
    assert concat_all_gather(t) is t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_text, tiny_vision

    from albef_pl.tasks import PretrainTask

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # identical weights and queues on both ranks
    task = PretrainTask(vision=tiny_vision(), text=tiny_text(), embed_dim=16, queue_size=7,
                        mask_token_id=3, special_token_ids=(0, 1, 2))
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    b = 2 + rank  # unequal batch sizes on purpose
    image = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(4, 128, (b, 6), generator=g)
    out = task.contrastive_and_matching(image, ids, torch.ones_like(ids))
    torch.save(
        {"queue": task.queue.state_dict(), "image_feat_m": out["teacher"].image_feat,
         "text_feat_m": out["teacher"].text_feat},
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_two_process_gloo_queues_identical_and_hold_every_rank(tmp_path):
    mp.start_processes(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("image_queue", "text_queue", "queue_ptr"):
        assert torch.equal(r0["queue"][key], r1["queue"][key]), key
    assert r0["queue"]["queue_ptr"].item() == 5  # 2 + 3 samples gathered
    expected = torch.cat([r0["image_feat_m"], r1["image_feat_m"]])  # rank order
    torch.testing.assert_close(r0["queue"]["image_queue"][:, :5].T, expected)
    expected = torch.cat([r0["text_feat_m"], r1["text_feat_m"]])
    torch.testing.assert_close(r1["queue"]["text_queue"][:, :5].T, expected)
