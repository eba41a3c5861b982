"""The PNG callbacks: what they count and that they write a picture."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from albef_pl.models.albef import Features
from albef_pl.plots import RetrievalExamplesPlotter
from albef_pl.tasks import PretrainTask

from conftest import tiny_text, tiny_vision


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{int(i)}" for i in ids if int(i) > 2)


def test_retrieval_examples_count_the_images_whose_own_caption_ranks_first(tmp_path, monkeypatch):
    task = PretrainTask(vision=tiny_vision(), text=tiny_text(), embed_dim=8, queue_size=8,
                        init_weights=False)
    b = 6
    image_feat = torch.eye(8)[:b]
    text_feat = image_feat.clone()
    text_feat[[3, 4, 5]] = text_feat[[4, 5, 3]]  # images 3..5 now match another caption best

    def fake_features(image, ids, mask):
        return Features(torch.zeros(b, 2, 4), torch.zeros(b, 3, 4), image_feat, text_feat)

    monkeypatch.setattr(task.model, "features", fake_features)
    ids = torch.arange(10, 10 + b)[:, None].repeat(1, 3)  # distinct captions "w10 w10 w10", ...
    batch = {"image": torch.randn(b, 3, 32, 32), "input_ids": ids,
             "attention_mask": torch.ones_like(ids)}
    plotter = RetrievalExamplesPlotter(num_images=b, top_k=2)
    path, hits = plotter.plot(task, batch, _Tok(), tmp_path / "ex.png", epoch=0)
    assert hits == 3
    # with image ids, another caption of the same image counts: images 3 and 4 share id 3,
    # and image 4 ranks caption 3 first
    batch["image_id"] = torch.tensor([0, 1, 2, 3, 3, 5])
    _, hits = plotter.plot(task, batch, _Tok(), tmp_path / "ex2.png", epoch=0)
    assert hits == 4
    assert path.stat().st_size > 1000
    assert task.training  # the model's mode is restored


def test_summary_line_names_chance_levels(tmp_path, monkeypatch, caplog):
    plotter = RetrievalExamplesPlotter(num_images=2, top_k=1)
    plotter._batch = {"image": torch.zeros(32, 3, 8, 8)}
    monkeypatch.setattr(plotter, "plot", lambda *a, **k: (tmp_path / "x.png", 1))
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), sanity_checking=False, is_global_zero=True, log_dir=str(tmp_path),
                              default_root_dir=str(tmp_path), current_epoch=2, datamodule=None,
                              callback_metrics={"val/itc_acc_i2t": torch.tensor(0.5),
                                                "val/itm_acc": torch.tensor(0.75)})
    monkeypatch.setattr("albef_pl.plots._tokenizer", lambda trainer: _Tok())
    with caplog.at_level(logging.INFO, logger="albef_pl.plots"):
        plotter.on_validation_end(trainer, None)
    line = caplog.messages[-1]
    assert line.startswith("epoch 2 validation:")
    assert "top-1 50.0% (chance 3.1%)" in line and "ITM balanced accuracy 75.0% (chance 50%)" in line


def test_progress_lines_when_not_on_a_terminal(monkeypatch, caplog):
    from albef_pl.plots import LossCurvePlotter

    plotter = LossCurvePlotter(text_progress_every=5)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    trainer = SimpleNamespace(global_step=10, current_epoch=1, is_global_zero=True,
                              estimated_stepping_batches=40,
                              callback_metrics={"train/loss_itc_step": torch.tensor(2.5),
                                                "train/loss": torch.tensor(4.0)})
    with caplog.at_level(logging.INFO, logger="albef_pl.plots"):
        plotter.on_train_batch_end(trainer, None, None, None, 0)
        trainer.global_step = 11  # not a multiple of 5: no line
        plotter.on_train_batch_end(trainer, None, None, None, 1)
    assert caplog.messages == ["step 10/40 (epoch 1): loss_itc 2.500  loss 4.000"]
    assert plotter.history["train/loss_itc"] == [(10, 2.5), (11, 2.5)]


def test_validation_line_lists_the_val_metrics_and_nonzero_skips(caplog):
    from albef_pl.plots import LossCurvePlotter

    metrics = {"val/acc": torch.tensor(0.9375), "val/loss": torch.tensor(0.21043),
               "val/skipped_corrupt_image": torch.tensor(0.0),
               "val/skipped_missing_image": torch.tensor(2.0),
               "train/loss": torch.tensor(1.0), "val/loss_step": torch.tensor(9.0)}
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), sanity_checking=False,
                              is_global_zero=True, current_epoch=3, callback_metrics=metrics)
    plotter = LossCurvePlotter()
    with caplog.at_level(logging.INFO, logger="albef_pl.plots"):
        plotter.on_validation_end(trainer, None)
        trainer.state.fn = "validate"
        plotter.on_validation_end(trainer, None)
        trainer.sanity_checking = True  # Lightning's sanity pass: no line
        plotter.on_validation_end(trainer, None)
    assert caplog.messages == [
        "epoch 3 validation: acc 0.9375  loss 0.2104  skipped_missing_image 2",
        "validation: acc 0.9375  loss 0.2104  skipped_missing_image 2",
    ]
