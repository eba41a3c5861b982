"""Command line: a generic LightningCLI over any LightningModule and LightningDataModule.

``lightning``, ``albef-pl`` and ``python -m albef_pl`` are the same program. In subclass mode
a YAML ``class_path`` may name any task or data module, including a user's own subclass.
"""

from __future__ import annotations

import logging
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from albef_pl.errors import DataError


#: Model options of evaluation and output that a ``--ckpt_path`` run takes from the config and
#: the command line. LightningCLI otherwise replaces every model option with the value saved
#: in the checkpoint, so ``--model.result_dir`` or ``--model.k_test`` at test time were
#: silently ignored (and results written over the training run's).
RUNTIME_MODEL_OPTIONS: tuple[str, ...] = (
    "result_dir", "predict_dir", "k_test", "gradcam_mode", "block_num", "num_examples",
)


def _model_args(cfg):
    model = cfg.get("model") if cfg is not None and hasattr(cfg, "get") else None
    return model.get("init_args") if model is not None and hasattr(model, "get") else None


def _short_union_error(message: str) -> str:
    """jsonargparse reports a constructor's error inside "Does not validate against any of the
    Union subtypes", one line per subtype and the whole namespace; keep the constructor's."""
    if "Does not validate against any of the Union subtypes" not in message:
        return message
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("- ") and not line.startswith("- Expected a <class 'NoneType'>"):
            return line[2:]
    return message


def _short_parse_error(message: str) -> str:
    """jsonargparse's report on an option of a class (tried against every union member), cut
    to the option and the reason, with a suggestion for an unknown name:
    "--model.lrr: PretrainTask has no such option (did you mean 'lr'?)"."""
    import difflib
    import importlib
    import inspect
    import re

    keys: list[str] = []
    class_path = None
    plain = re.match(r'Parser key "([^"]+)":\s*\n\s*Does not validate against any of the Union'
                     r" subtypes", message)
    if plain and "class_path" not in message:  # e.g. int | None
        kinds = [k.replace("NoneType", "null") for k in re.findall(
            r"- Expected a <class '([^']+)'>", message)]
        given = re.search(r"Given value: (.*)", message)
        return (f"--{plain.group(1)}: expected {' or '.join(kinds) or 'another type'}, got "
                f"{given.group(1).strip() if given else 'something else'}")
    for raw in message.splitlines():
        line = raw.strip()
        if m := re.fullmatch(r'Parser key "([^"]+)":', line):
            keys.append(m.group(1))
        elif m := re.fullmatch(r"- Problem with given class_path '([^']+)':", line):
            class_path = m.group(1)
        elif line.startswith(("Does not validate", "Subtypes:", "Errors:")) or not line:
            continue
        else:
            break
    else:
        return message
    if not keys or class_path is None:
        return message
    name = class_path.rsplit(".", 1)[-1]
    unknown = re.fullmatch(r"Option '([^']+)' is not accepted", line)
    if not unknown:
        return f"--{'.'.join(keys)}: {line}"
    hint = ""
    try:
        module, _, cls = class_path.rpartition(".")
        params = {p for klass in getattr(importlib.import_module(module), cls).__mro__
                  if "__init__" in vars(klass)
                  for p in inspect.signature(vars(klass)["__init__"]).parameters}
        close = difflib.get_close_matches(unknown.group(1), sorted(params - {"self"}), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
    except (ImportError, AttributeError, TypeError, ValueError):
        pass
    return f"--{'.'.join([*keys, unknown.group(1)])}: {name} has no such option{hint}"


class ALBEFArgumentParser(LightningArgumentParser):
    """Errors as two lines (the error and where the options are listed) instead of a usage
    block of fifty lines above jsonargparse's report on every union member."""

    def error(self, message: str, ex: Exception | None = None):
        from jsonargparse._common import debug_mode_active

        if not self.exit_on_error or debug_mode_active():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {_short_parse_error(message)}{_suggest(message, parser)}\n"
                         f"({prog} --help lists every option)\n")
        raise SystemExit(2)


def _last_checkpoints(cfg: Any) -> list[Path]:
    """The ``last*.ckpt`` files in the dirpaths of the config's ModelCheckpoint callbacks,
    where Lightning looks for ``--ckpt_path last`` (callbacks without a dirpath, which write
    under the logger's version folder, are not searched)."""
    trainer = cfg.get("trainer") if hasattr(cfg, "get") else None
    callbacks = trainer.get("callbacks") if trainer is not None and hasattr(trainer, "get") else None
    found: list[Path] = []
    for cb in callbacks if isinstance(callbacks, list) else []:
        if not hasattr(cb, "get") or not str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
            continue
        init = cb.get("init_args")
        dirpath = init.get("dirpath") if init is not None and hasattr(init, "get") else None
        if dirpath:
            found += sorted(Path(dirpath).glob("last*.ckpt"))
    return found


def _suggest(message: str, parser: Any) -> str:
    """' (did you mean --trainer.max_epochs?)' for a misspelt option argparse did not know."""
    import difflib

    if not message.startswith("unrecognized arguments:"):
        return ""
    known = [o for o in getattr(parser, "_option_string_actions", {}) if o.startswith("--")]
    hints = []
    for given in (w.split("=", 1)[0] for w in message.split()[2:] if w.startswith("--")):
        close = difflib.get_close_matches(given, known, n=1, cutoff=0.8)
        if close:
            hints.append(f"{given} -> {close[0]}")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


class ALBEFCLI(LightningCLI):
    """LightningCLI with the project's defaults (config saved next to the logs)."""

    @staticmethod
    def fail(message: str) -> None:
        """End the program on a problem the message fully names: one line, exit status 2."""
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)

    def _sub_config(self):
        """The options of the running subcommand (the whole config when there is none)."""
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def _parse_ckpt_path(self) -> None:
        # NOTE: overrides a private LightningCLI method: it has no public hook between merging
        # the checkpoint's hyper-parameters into the config and instantiating the classes.
        cfg = self._sub_config()
        value = cfg.get("ckpt_path")
        if value == "last":
            # Lightning takes the newest last*.ckpt of the ModelCheckpoint folders: give it
            # the checks an explicit path gets (a broken, empty or other task's file would
            # end in a traceback or resume the wrong model).
            candidates = _last_checkpoints(cfg)
            dangling = [p for p in candidates if not p.exists()]
            if dangling:
                self.fail(f"--ckpt_path last: {dangling[0]} is a link to a missing file "
                          f"({os.readlink(dangling[0])}); remove it, or give --ckpt_path "
                          "the checkpoint file to resume from.")
            found = [p for p in candidates if p.exists()]
            if found:
                value = str(max(found, key=lambda p: p.stat().st_mtime))
        if value is not None and value not in ("last", "best", "hpc", "registry"):
            # Lightning unpickles the file next; one that is not a checkpoint of this task
            # would end in a raw unpickling traceback or fail on the first batch.
            try:
                state = check_lightning_checkpoint(value)
                check_same_task(value, state, cfg.get("model"))
            except (OSError, ValueError) as err:
                how = " (the newest last*.ckpt, which --ckpt_path last resumes)" if (
                    cfg.get("ckpt_path") == "last") else ""
                self.fail(f"{err}{how}")
        args = _model_args(cfg)
        kept = {k: args[k] for k in RUNTIME_MODEL_OPTIONS if args is not None and k in args}
        super()._parse_ckpt_path()
        args = _model_args(self._sub_config())
        for key, value in kept.items():
            if args is not None and key in args:
                args[key] = value

    def before_fit(self) -> None:
        self.warn_earlier_run()

    def warn_earlier_run(self) -> None:
        """Say so when a fresh ``fit`` (no --ckpt_path) writes into a checkpoint folder that
        already holds a run: Lightning then saves ``last-v1.ckpt`` beside the old
        ``last.ckpt`` and ``--ckpt_path last`` takes the newer one, which is easy to miss."""
        if self._sub_config().get("ckpt_path"):
            return
        dirpath = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        if dirpath and (Path(dirpath) / "last.ckpt").is_file():
            logging.getLogger(__name__).warning(
                "%s already holds last.ckpt of an earlier run. This fit starts from scratch "
                "and saves beside it (last-v1.ckpt, ...). To continue the earlier run add "
                "--ckpt_path last; to start clean, remove the folder or pick another with "
                "--trainer.default_root_dir / the ModelCheckpoint dirpath.", dirpath)

    def before_instantiate_classes(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.check_init_checkpoint()
        self.check_untrained_evaluation()
        self.check_data_first()

    def check_untrained_evaluation(self) -> None:
        """Warn when validate/test/predict would evaluate weights that were never trained
        (neither --ckpt_path nor model.init_checkpoint): a forgotten --ckpt_path otherwise
        writes predictions of a random model without a word."""
        if self.subcommand not in ("validate", "test", "predict"):
            return
        cfg = self._sub_config()
        args = _model_args(cfg)
        if cfg.get("ckpt_path") or (args is not None and args.get("init_checkpoint")):
            return
        logging.getLogger(__name__).warning(
            "%s without --ckpt_path or model.init_checkpoint: the model's weights are its "
            "initial ones (untrained heads). Give --ckpt_path <run>/checkpoints/last.ckpt.",
            self.subcommand)

    def check_init_checkpoint(self) -> None:
        """A missing ``model.init_checkpoint`` in one line (a common first mistake: fine-tuning
        before pre-training), instead of jsonargparse's report on every union member."""
        cfg = self._sub_config()
        args = _model_args(cfg)
        path = args.get("init_checkpoint") if args is not None and hasattr(args, "get") else None
        ckpt = cfg.get("ckpt_path")
        restores = ckpt and (Path(str(ckpt)).is_file()
                             or (ckpt == "last"
                                 and any(p.exists() for p in _last_checkpoints(cfg))))
        if restores and args is not None and hasattr(args, "get"):
            # --ckpt_path restores every weight: starting weights (a checkpoint, BERT/ViT
            # files) would only be loaded and overwritten (and need not exist any more).
            if "init_checkpoint" in args:
                args["init_checkpoint"] = None
            if "init_weights" in args:
                args["init_weights"] = False
            return
        if path and not Path(path).is_file():
            self.fail(
                f"model.init_checkpoint: no file at {path}. Train or convert one first (e.g. "
                "`make pretrain-sample` for the COCO-sample recipes, or `albef-pl-convert "
                "ALBEF.pth ...`), or set --model.init_checkpoint null."
            )

    def check_data_first(self) -> None:
        """Build the project's data module once before anything else.

        LightningCLI builds the model first, which loads BERT and ViT weights; our data
        modules check their shard lists, files and tokenizer in the constructor, so building
        a throwaway copy first makes a wrong data path fail in seconds, before that work.
        """
        import importlib

        from jsonargparse import Namespace

        data = self._sub_config().get("data")
        if not isinstance(data, Namespace) or not str(data.get("class_path", "")).startswith(
            "data_modules."
        ):
            return
        module, _, name = str(data.class_path).rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        args = data.get("init_args")
        kwargs = args.as_dict() if isinstance(args, Namespace) else dict(args or {})
        try:
            cls(**kwargs)
        except (OSError, ValueError, TypeError) as err:
            self.fail(f"data ({data.class_path}): {err}")

    def instantiate_classes(self) -> None:
        # Our constructors check their options and files and raise FileNotFoundError or
        # ValueError naming the option; show those as one line, not a traceback.
        try:
            super().instantiate_classes()
        except (FileNotFoundError, ValueError) as err:
            self.fail(_short_union_error(str(err)))


def check_lightning_checkpoint(path: str) -> dict:
    """Raise ``ValueError`` naming ``path`` unless it is a checkpoint Lightning can resume;
    return its contents (memory-mapped).

    Reads the file lazily (memory-mapped), so a large checkpoint costs little here.
    """
    import torch

    file = Path(path)
    if file.is_dir():
        raise ValueError(f"--ckpt_path {path}: is a directory; give a .ckpt file in it "
                         "(e.g. last.ckpt), or `last` to take the run's newest")
    if not file.is_file():
        raise FileNotFoundError(f"--ckpt_path {path}: no such file")
    if not zipfile.is_zipfile(file):
        raise ValueError(f"--ckpt_path {path}: not a PyTorch checkpoint (not a torch.save zip "
                         "file). Give a .ckpt written by a run of this project.")
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"--ckpt_path {path}: cannot be read as a checkpoint ({err})") from err
    if not isinstance(state, dict) or "state_dict" not in state:
        keys = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        hint = ("It looks like an official ALBEF checkpoint: convert it first with "
                "`albef-pl-convert` (see README, 'Official checkpoints'), or pass it as "
                "--model.init_checkpoint to start a run from its weights."
                if isinstance(state, dict) and "model" in state else
                "Give a .ckpt written by a run of this project.")
        raise ValueError(f"--ckpt_path {path}: not a Lightning checkpoint (no 'state_dict'; "
                         f"found {keys}). {hint}")
    return state


def check_same_task(path: str, state: dict, model_config) -> None:
    """Refuse a checkpoint of one task given to a config of another.

    LightningCLI would take the checkpoint's class over the config's and then fail on the
    first batch of the other task's data. Starting a task from another one's weights is what
    ``--model.init_checkpoint`` is for.
    """
    saved = (state.get("hyper_parameters") or {}).get("_class_path")
    wanted = model_config.get("class_path") if model_config is not None else None
    if saved and wanted and saved.rsplit(".", 1)[-1] != str(wanted).rsplit(".", 1)[-1]:
        raise ValueError(
            f"--ckpt_path {path}: written by {saved}, but the config runs {wanted}. "
            "--ckpt_path resumes or evaluates the same task: give a checkpoint of a "
            f"{str(wanted).rsplit('.', 1)[-1]} run. To start a fine-tune from pre-training "
            f"weights, use --model.init_checkpoint {path} instead."
        )


def _program_name() -> str:
    """``albef-pl`` or ``lightning`` as invoked; ``python -m albef_pl`` for the module."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "albef-pl"
    return "python -m albef_pl" if name in ("__main__.py", "-m", "-c", "") else name


def run_cli(args: list[str] | None = None) -> ALBEFCLI:
    """Run the CLI on ``args`` (``sys.argv`` when None) and return it (trainer, model, data)."""
    return ALBEFCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # An option is its full name: argparse would take --trainer.max_epoch for max_epochs.
        parser_kwargs={"allow_abbrev": False, "prog": _program_name()},
        parser_class=ALBEFArgumentParser,
        args=args,
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning`` / ``albef-pl``: ``fit``, ``validate``, ``test``, ``predict``.

    A :class:`~albef_pl.errors.DataError` (a data file or entry found unusable once the run
    has started, e.g. while a data module reads its json at set-up) ends the program with its
    message on one line and exit status 2, like the option errors found before the run.
    """
    try:
        run_cli(args)
    except DataError as err:
        if os.environ.get("ALBEF_PL_TRACEBACK"):
            raise
        print(f"error: {err}\n(set ALBEF_PL_TRACEBACK=1 to see where it was raised)",
              file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as err:
        # A --ckpt_path whose tensors do not fit the model the options built (a size given
        # on the command line overrides the checkpoint's): torch lists every tensor.
        text = str(err)
        if not text.startswith("Error(s) in loading state_dict") or os.environ.get(
                "ALBEF_PL_TRACEBACK"):
            raise
        first = next((line.strip() for line in text.splitlines()[1:] if line.strip()), "")
        print(f"error: the checkpoint's weights do not fit the model built from the options "
              f"({first} ...). With --ckpt_path the architecture comes from the checkpoint: "
              "drop the --model size options given with it.\n"
              "(set ALBEF_PL_TRACEBACK=1 to see every tensor)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
