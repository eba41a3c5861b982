"""PretrainTask under Lightning: learning, gradient accumulation, exact resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from albef_pl.callbacks import MomentumTeacher
from albef_pl.tasks import PretrainTask

from conftest import tiny_text, tiny_vision


def make_batches(n: int, b: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(4, 128, (b, 8), generator=g)
        ids[:, 0] = 1  # [CLS]
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        ids[0, 6:] = 0
        batches.append({"image": torch.randn(b, 3, 32, 32, generator=g), "input_ids": ids,
                        "attention_mask": mask})
    return batches


def loader(batches):
    return DataLoader(batches, batch_size=None, shuffle=False)


def make_task(**kw) -> PretrainTask:
    torch.manual_seed(0)
    args = dict(vision=tiny_vision(), text=tiny_text(), embed_dim=16, queue_size=8,
                mask_token_id=3, special_token_ids=(0, 1, 2), lr=1e-3, warmup_steps=0,
                min_lr=1e-3, mlm_probability=0.3)
    args.update(kw)
    return PretrainTask(**args)


def trainer(**kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False)
    args.update(kw)
    return L.Trainer(**args)


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.losses.append({k: float(m[f"train/loss_{k}_step"]) for k in ("itc", "itm", "mlm")})


def test_tiny_model_overfits_a_fixed_batch():
    batch = make_batches(1, b=4)
    rec = LossRecorder()
    task = make_task(alpha=0.0, lr=3e-3, min_lr=3e-3)
    trainer(max_steps=150, callbacks=[rec, MomentumTeacher(alpha_ramp_steps=0)]).fit(
        task, loader(batch * 150)
    )
    for k in ("itc", "itm", "mlm"):
        first = sum(x[k] for x in rec.losses[:5]) / 5
        last = sum(x[k] for x in rec.losses[-10:]) / 10
        # ITC keeps a floor: the queue holds copies of the same batch, counted as negatives.
        assert last < (0.7 if k == "itc" else 0.5) * first, (k, first, last)


def test_gradient_accumulation_updates_teacher_once_per_optimizer_step():
    cb1, cb2 = MomentumTeacher(), MomentumTeacher()
    trainer(max_epochs=1, callbacks=[cb1]).fit(make_task(), loader(make_batches(8)))
    trainer(max_epochs=1, callbacks=[cb2], accumulate_grad_batches=2).fit(
        make_task(), loader(make_batches(8))
    )
    assert cb1.updates == 8
    assert cb2.updates == 4


def test_teacher_moves_by_the_ema_formula_after_one_step():
    task = make_task()
    before_t = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    trainer(max_steps=1).fit(task, loader(make_batches(1)))
    student = task.model.state_dict()
    name = "vision_proj.weight"
    expected = before_t[name] * 0.995 + student[name] * (1 - 0.995)
    torch.testing.assert_close(task.teacher.state_dict()[name], expected, atol=1e-7, rtol=0)


def test_alpha_ramps_over_first_epoch():
    seen = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(float(pl_module.alpha))

    trainer(max_epochs=2, callbacks=[MomentumTeacher(), Spy()]).fit(
        make_task(alpha=0.4), loader(make_batches(4))
    )
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4])


def test_resume_is_exact(tmp_path):
    batches = make_batches(3)
    # Uninterrupted: two epochs of three batches.
    rec_a = LossRecorder()
    task_a = make_task()
    trainer(max_epochs=2, callbacks=[rec_a, MomentumTeacher()]).fit(task_a, loader(batches))

    # Interrupted after the first epoch, then resumed from the checkpoint in a fresh process state.
    task_b = make_task()
    t1 = trainer(max_epochs=1, callbacks=[MomentumTeacher()])
    t1.fit(task_b, loader(batches))
    ckpt = tmp_path / "epoch0.ckpt"
    t1.save_checkpoint(ckpt)
    torch.manual_seed(12345)  # disturb the global generator on purpose
    rec_b = LossRecorder()
    task_c = make_task()
    trainer(max_epochs=2, callbacks=[rec_b, MomentumTeacher()]).fit(
        task_c, loader(batches), ckpt_path=ckpt
    )

    assert len(rec_b.losses) == 3
    for got, want in zip(rec_b.losses, rec_a.losses[3:]):
        assert got == pytest.approx(want, rel=0, abs=1e-6)
    for key, value in task_a.state_dict().items():
        if key.startswith(("teacher.", "queue.", "alpha")):
            torch.testing.assert_close(task_c.state_dict()[key], value, rtol=0, atol=1e-7,
                                       msg=key)
    assert task_c.queue.queue_ptr.item() == task_a.queue.queue_ptr.item()


@pytest.mark.parametrize("kw, match", [
    ({"lr": -1.0}, "model.lr"), ({"alpha": 2.0}, "model.alpha"), ({"queue_size": 0}, "queue_size"),
    ({"momentum": 1.0}, "model.momentum"), ({"init_checkpoint": "/nope.ckpt"}, "make pretrain"),
])
def test_out_of_range_options_fail_before_the_model_is_built(kw, match, monkeypatch):
    import albef_pl.tasks.base as base

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the options were checked")

    monkeypatch.setattr(base, "ALBEF", no_build)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        PretrainTask(vision=tiny_vision(), text=tiny_text(), **kw)


class WeightedLossRecorder(LossRecorder):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.losses[-1]["total"] = float(outputs["loss"])


def test_loss_weights_scale_each_loss_in_the_sum():
    rec = WeightedLossRecorder()
    task = make_task(loss_weights={"mlm": 0.1, "itc": 2.0})
    assert task.loss_weights == {"itc": 2.0, "itm": 1.0, "mlm": 0.1}
    trainer(max_steps=3, callbacks=[rec, MomentumTeacher()]).fit(task, loader(make_batches(3)))
    assert len(rec.losses) == 3
    for x in rec.losses:
        assert x["total"] == pytest.approx(2.0 * x["itc"] + x["itm"] + 0.1 * x["mlm"], rel=1e-5)
        assert x["total"] != pytest.approx(x["itc"] + x["itm"] + x["mlm"], rel=1e-3)


@pytest.mark.parametrize("weights, match", [
    ({"mlm": 0.1, "contrastive": 1.0}, r"unknown loss \['contrastive'\]"),
    ({"itm": -1.0}, r"in \[0, 1e6\]"), ({"itc": float("nan")}, r"in \[0, 1e6\]"),
    ({"itc": float("inf")}, r"in \[0, 1e6\]"), ({"itc": 1e300}, r"in \[0, 1e6\]"),
    ({"itc": 0, "itm": 0, "mlm": 0}, "all 0"),
])
def test_bad_loss_weights_fail_before_the_model_is_built(weights, match, monkeypatch):
    import albef_pl.tasks.base as base

    monkeypatch.setattr(base, "ALBEF", lambda *a, **k: pytest.fail("model built first"))
    with pytest.raises(ValueError, match=match):
        PretrainTask(vision=tiny_vision(), text=tiny_text(), loss_weights=weights)
