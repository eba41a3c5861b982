"""The real command line on every shipped YAML, and short fit -> validate runs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from albef_pl.cli import run_cli

from conftest import ROOT, SHARED, requires_shared

CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(ROOT / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path" in printed and "trainer:" in printed


def test_paper_recipe_values_are_printed(capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(ROOT / "conf/pretrain.yaml"), "--print_config"])
    out = capsys.readouterr().out
    for expected in ("queue_size: 65536", "momentum: 0.995", "alpha: 0.4", "temp: 0.07",
                     "embed_dim: 256", "img_size: 256", "lr: 0.0001", "weight_decay: 0.02",
                     "min_lr: 1.0e-05", "max_epochs: 30", "batch_size: 64", "devices: 8",
                     "precision: bf16-mixed", "num_text_layers: 6", "bert-base-uncased",
                     "deit_base_patch16_224", "broadcast_buffers: false"):
        assert expected in out, expected


def test_bad_config_fails_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: albef_pl.tasks.PretrainTask\n  init_args:\n"
                   "    queue_size: many\n")
    proc = subprocess.run(
        [sys.executable, "-m", "albef_pl", "fit", "--config", str(bad)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode != 0
    assert "queue_size" in proc.stderr
    assert not (tmp_path / "lightning_logs").exists()


def _fit_then_validate(config: Path, root: str, extra: list[str]) -> None:
    """A short fit, then validate and test from its last.ckpt."""
    short = ["--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
             "--trainer.enable_progress_bar", "false"]
    fit = run_cli(["fit", "--config", str(config), *short, *extra])
    fit_val = {k: float(v) for k, v in fit.trainer.callback_metrics.items()
               if k.startswith("val/loss")}
    assert fit_val, "fit ran no validation"
    assert all(math.isfinite(v) for v in fit_val.values())
    ckpt = Path(root) / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert any(k.startswith("teacher.") for k in state["state_dict"])
    assert "queue.image_queue" in state["state_dict"]

    val = run_cli(["validate", "--config", str(config), "--ckpt_path", str(ckpt),
                   "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                   *extra])
    # The checkpoint reproduces the validation that ended the fit (validation draws its masks
    # and negatives from fixed generators).
    for key, value in fit_val.items():
        key = key.removesuffix("_epoch")
        got = float(val.trainer.callback_metrics[key])
        assert got == pytest.approx(value, rel=1e-4, abs=1e-5), key

    # `test` loads it too; without test_shards it reads the validation shards, so its first
    # batch gives the same losses.
    test = run_cli(["test", "--config", str(config), "--ckpt_path", str(ckpt),
                    "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar",
                    "false", *extra])
    for key, value in fit_val.items():
        key = "test/" + key.removesuffix("_epoch").removeprefix("val/")
        got = float(test.trainer.callback_metrics[key])
        assert got == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_demo_fit_then_validate_smoke(tmp_path, monkeypatch, capsys):
    from data_modules.synthetic import main as synth

    monkeypatch.chdir(tmp_path)
    assert synth(["--out", "data/demo", "--num-train", "64", "--num-val", "32",
                  "--samples-per-shard", "32"]) in (0, None)
    _fit_then_validate(ROOT / "conf/demo.yaml", "runs/demo",
                       ["--data.batch_size", "8", "--data.num_workers", "0",
                        "--data.num_train_samples", "32"])
    assert (tmp_path / "runs/demo/csv/version_0/metrics.csv").is_file()
    for png in ("loss_curves.png", "retrieval_examples.png"):
        assert (tmp_path / "runs/demo/csv/version_0" / png).stat().st_size > 1000, png

    # --ckpt_path last restores every weight: the start weights (MiniLM) are not read again,
    # so a resume needs neither them nor the network.
    import albef_pl.checkpoints

    def no_start_weights(*args, **kwargs):
        raise AssertionError("BERT start weights loaded for a resume")

    monkeypatch.setattr(albef_pl.checkpoints, "load_bert_weights", no_start_weights)
    resumed = run_cli(["fit", "--config", str(ROOT / "conf/demo.yaml"), "--ckpt_path", "last",
                       "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "1",
                       "--trainer.enable_progress_bar", "false", "--data.batch_size", "8",
                       "--data.num_workers", "0", "--data.num_train_samples", "32"])
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 8

    # A size given with --ckpt_path overrides the checkpoint's: one line, exit 2.
    from albef_pl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(ROOT / "conf/demo.yaml"), "--ckpt_path", "last",
              "--model.init_args.embed_dim", "32", "--data.batch_size", "8",
              "--data.num_workers", "0", "--trainer.enable_progress_bar", "false"])
    assert exit_info.value.code == 2
    assert "the checkpoint's weights do not fit" in capsys.readouterr().err


@requires_shared
def test_coco_sample_fit_then_validate_smoke(tmp_path, monkeypatch):
    from data_modules.shard_writer import main as write_shards

    monkeypatch.chdir(tmp_path)
    coco = SHARED / "data/coco_sample"
    for src, out in (("albef_train.json", "shards"), ("albef_test.json", "val_shards")):
        write_shards(["--json", str(coco / src), "--image-root", str(coco),
                      "--out", f"data/coco_sample/{out}", "--samples-per-shard", "32"])
    _fit_then_validate(ROOT / "conf/pretrain_coco_sample.yaml", "runs/coco_sample",
                       ["--data.batch_size", "4", "--data.num_workers", "0",
                        "--data.num_train_samples", "16"])


def test_converted_official_checkpoint_validates_through_the_cli(tmp_path, monkeypatch):
    from albef_pl.convert import export_official
    from albef_pl.convert import main as convert
    from albef_pl.tasks import PretrainTask
    from data_modules.synthetic import main as synth

    from conftest import tiny_text, tiny_vision

    monkeypatch.chdir(tmp_path)
    synth(["--out", "data/demo", "--num-train", "16", "--num-val", "16",
           "--samples-per-shard", "16", "--image-size", "32"])
    torch.manual_seed(0)
    src = PretrainTask(vision=tiny_vision(), text=tiny_text(vocab_size=30522), embed_dim=16,
                       queue_size=8, init_weights=False)
    torch.save({"model": export_official(src)}, tmp_path / "official.pth")
    assert convert([str(tmp_path / "official.pth"), str(tmp_path / "ours.ckpt"),
                    "--vision-heads", "2", "--text-heads", "2"]) == 0
    # The demo config names other model sizes: the checkpoint's hyper-parameters win.
    cli = run_cli(["validate", "--config", str(ROOT / "conf/demo.yaml"),
                   "--ckpt_path", str(tmp_path / "ours.ckpt"), "--data.image_size", "32",
                   "--data.batch_size", "8", "--data.num_workers", "0",
                   "--trainer.enable_progress_bar", "false"])
    for key, value in src.model.state_dict().items():
        assert torch.equal(cli.model.model.state_dict()[key], value), key
    assert math.isfinite(float(cli.trainer.callback_metrics["val/loss"]))


def test_readme_custom_task_example_trains_smoke(tmp_path, monkeypatch):
    from data_modules.synthetic import main as synth

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    synth(["--out", "data/demo", "--num-train", "16", "--num-val", "16",
           "--samples-per-shard", "16"])
    cli = run_cli(["fit", "--config", str(ROOT / "conf/demo.yaml"),
                   "--model.class_path", "custom_task.MyTask",
                   "--data.batch_size", "8", "--data.num_workers", "0",
                   "--data.num_train_samples", "16", "--trainer.max_epochs", "1",
                   "--trainer.enable_progress_bar", "false"])
    assert type(cli.model).__name__ == "MyTask"
    assert hasattr(cli.model.teacher, "length_head")
    assert math.isfinite(float(cli.trainer.callback_metrics["val/loss_length"]))


def _cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_wrong_shard_path_fails_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # The text weights named here do not exist either: the data error must come first.
    err = _cli_error(["fit", "--config", str(ROOT / "conf/demo.yaml"),
                      "--data.train_shards", str(tmp_path / "nope"),
                      "--model.init_args.text.pretrained", str(tmp_path / "no_bert")], capsys)
    assert "data.train_shards" in err and str(tmp_path / "nope") in err
    assert "no_bert" not in err


def test_ckpt_path_last_gets_the_checks_of_an_explicit_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # conf/demo.yaml checkpoints into runs/demo/checkpoints
    folder = tmp_path / "runs/demo/checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").symlink_to("epoch=9-step=99.ckpt")  # removed by hand
    err = _cli_error(["fit", "--config", str(ROOT / "conf/demo.yaml"), "--ckpt_path", "last"],
                     capsys)
    assert "last.ckpt is a link to a missing file (epoch=9-step=99.ckpt)" in err

    (folder / "last.ckpt").unlink()
    (folder / "last.ckpt").write_bytes(b"")  # a crash while writing it
    err = _cli_error(["fit", "--config", str(ROOT / "conf/demo.yaml"), "--ckpt_path", "last"],
                     capsys)
    assert "last.ckpt: not a PyTorch checkpoint" in err
    assert "(the newest last*.ckpt, which --ckpt_path last resumes)" in err


def test_a_test_pass_that_forms_no_batch_exits_2_naming_the_shards(tmp_path, monkeypatch,
                                                                    capsys):
    from data_modules.synthetic import main as synth

    monkeypatch.chdir(tmp_path)
    synth(["--out", "data/demo", "--num-train", "16", "--num-val", "16",
           "--samples-per-shard", "16"])
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "b.tar").write_bytes(b"not a tar file" * 100)
    (junk / "sizes.json").write_text('{"b.tar": 8, "total": 8}')
    from albef_pl.cli import main

    with pytest.raises(SystemExit) as exit_info:  # main(): a DataError is one line, exit 2
        main(["test", "--config", str(ROOT / "conf/demo.yaml"), "--data.test_shards", str(junk),
              "--data.batch_size", "4", "--data.num_workers", "0",
              "--trainer.enable_progress_bar", "false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"test: not one batch could be formed from {junk}" in err
    assert "point data.test_shards elsewhere" in err

    (junk / "sizes.json").unlink()  # no count of the samples: one line too, not a traceback
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(ROOT / "conf/demo.yaml"), "--data.test_shards", str(junk),
              "--data.num_workers", "0", "--trainer.enable_progress_bar", "false"])
    assert exit_info.value.code == 2
    assert "the number of samples is unknown" in capsys.readouterr().err


def test_ckpt_path_that_is_not_a_checkpoint_is_refused_with_a_reason(tmp_path, capsys):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    err = _cli_error(["validate", "--config", str(ROOT / "conf/demo.yaml"),
                      "--ckpt_path", str(text)], capsys)
    assert str(text) in err and "not a PyTorch checkpoint" in err

    official = tmp_path / "ALBEF.pth"
    torch.save({"model": {"temp": torch.tensor(0.07)}}, official)
    err = _cli_error(["validate", "--config", str(ROOT / "conf/demo.yaml"),
                      "--ckpt_path", str(official)], capsys)
    assert str(official) in err and "albef-pl-convert" in err

    err = _cli_error(["validate", "--config", str(ROOT / "conf/demo.yaml"),
                      "--ckpt_path", str(tmp_path / "missing.ckpt")], capsys)
    assert "no such file" in err


def test_checkpoint_of_another_task_directory_and_missing_init_weights(tmp_path, capsys):
    retrieval = str(ROOT / "conf/finetune/retrieval_coco_sample.yaml")
    pretrain_ckpt = tmp_path / "pretrain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "albef_pl.tasks.PretrainTask"}},
               pretrain_ckpt)
    err = _cli_error(["validate", "--config", retrieval, "--ckpt_path", str(pretrain_ckpt)], capsys)
    assert "written by albef_pl.tasks.PretrainTask, but the config runs" in err
    assert "give a checkpoint of a RetrievalTask run" in err
    assert f"--model.init_checkpoint {pretrain_ckpt}" in err

    err = _cli_error(["validate", "--config", retrieval, "--ckpt_path", str(tmp_path)], capsys)
    assert "is a directory" in err

    err = _cli_error(["fit", "--config", retrieval,
                      "--model.init_args.init_checkpoint", str(tmp_path / "none.ckpt")], capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: model.init_checkpoint: no file at {tmp_path / 'none.ckpt'}")


@pytest.mark.parametrize("args, message", [
    (["--model.lrr", "1e-4"], "error: --model.lrr: PretrainTask has no such option (did you mean 'lr'?)"),
    (["--model.vision.img_sise", "3"],
     "error: --model.vision.img_sise: VisionConfig has no such option (did you mean 'img_size'?)"),
    (["--data.batch_sise", "3"],
     "error: --data.batch_sise: PretrainDataModule has no such option (did you mean 'batch_size'?)"),
    (["--model.lr", "abc"], "error: --model.lr: Expected a <class 'float'>. Got value: abc"),
    (["--trainer.max_epochs", "x"], "error: --trainer.max_epochs: expected int or null, got x"),
    # argparse would have taken a prefix for the whole name and started a run
    (["--trainer.max_epoch", "4"], "error: unrecognized arguments: --trainer.max_epoch 4 "
                                   "(did you mean --trainer.max_epoch -> --trainer.max_epochs?)"),
    (["--trainer.max_epoch=4", "--trainer.qwerty", "1"],
     "error: unrecognized arguments: --trainer.max_epoch=4 --trainer.qwerty 1 "
     "(did you mean --trainer.max_epoch -> --trainer.max_epochs?)"),
])
def test_option_errors_are_two_lines_naming_the_option(args, message, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["albef-pl"])
    err = _cli_error(["fit", "--config", str(ROOT / "conf/demo.yaml"), *args], capsys)
    assert err.strip().splitlines() == [message, "(albef-pl fit --help lists every option)"]


def test_fresh_fit_into_a_folder_holding_a_run_says_how_to_continue(tmp_path, caplog):
    import types

    from albef_pl.cli import ALBEFCLI

    (tmp_path / "checkpoints").mkdir()
    trainer = types.SimpleNamespace(
        checkpoint_callback=types.SimpleNamespace(dirpath=str(tmp_path / "checkpoints")))

    def fake(ckpt_path):
        return types.SimpleNamespace(trainer=trainer, _sub_config=lambda: {"ckpt_path": ckpt_path})

    ALBEFCLI.warn_earlier_run(fake(None))
    assert "already holds last.ckpt" not in caplog.text
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    ALBEFCLI.warn_earlier_run(fake("last"))  # continuing: nothing to say
    assert "already holds last.ckpt" not in caplog.text
    ALBEFCLI.warn_earlier_run(fake(None))
    assert f"{tmp_path / 'checkpoints'} already holds last.ckpt" in caplog.text
    assert "add --ckpt_path last" in caplog.text


MONITORED = [c for c in CONFIGS if "monitor:" in (ROOT / c).read_text()]


@pytest.mark.parametrize("config", MONITORED)
def test_last_checkpoint_is_the_newest_epoch_when_the_metric_stops_improving(config, tmp_path):
    """Lightning rewrites a monitored callback's last.ckpt only when the metric improves, so a
    crashed run would resume from its best epoch; every config with a monitored metric also
    keeps the newest epoch as last.ckpt."""
    import importlib

    import lightning as L
    import yaml

    callbacks = []
    for spec in yaml.safe_load((ROOT / config).read_text())["trainer"]["callbacks"]:
        module, _, name = spec["class_path"].rpartition(".")
        if name != "ModelCheckpoint":
            continue
        args = dict(spec.get("init_args") or {}, dirpath=str(tmp_path))
        callbacks.append(getattr(importlib.import_module(module), name)(**args))
    monitored = [cb for cb in callbacks if cb.monitor]
    assert len(monitored) == 1 and len(callbacks) == 2
    metric, mode = monitored[0].monitor, monitored[0].mode

    class Worsening(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            value = float(self.current_epoch) * (1.0 if mode == "min" else -1.0)
            self.log(metric, value)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2)
    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, callbacks=callbacks,
              enable_progress_bar=False, enable_model_summary=False).fit(Worsening(), data, data)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["epoch"] == 2  # the newest, not the best (epoch 0)
    assert torch.load(monitored[0].best_model_path, weights_only=False)["epoch"] == 0
