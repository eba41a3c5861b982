"""Command line: a generic LightningCLI over any LightningModule and LightningDataModule.

``lightning``, ``albef-pl`` and ``python -m albef_pl`` are the same program. In subclass mode
a YAML ``class_path`` may name any task or data module, including a user's own subclass.
"""

from __future__ import annotations

import logging
import sys
import zipfile
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI


class ALBEFCLI(LightningCLI):
    """LightningCLI with the project's defaults (config saved next to the logs)."""

    def before_instantiate_classes(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.check_data_first()

    def check_data_first(self) -> None:
        """Build the project's data module once before anything else.

        LightningCLI builds the model first, which loads BERT and ViT weights; our data
        modules check their shard lists, files and tokenizer in the constructor, so building
        a throwaway copy first makes a wrong data path fail in seconds, before that work.
        """
        import importlib

        from jsonargparse import Namespace

        cfg = self.config[self.subcommand] if self.subcommand else self.config
        data = cfg.get("data")
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
            self.parser.error(f"data ({data.class_path}): {err}")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI unpickles --ckpt_path right after parsing (for its hyper-parameters);
        # a file that is not a checkpoint would end in a raw unpickling traceback there.
        subcommand = self.config.get("subcommand")
        if subcommand:
            value = self.config[subcommand].get("ckpt_path")
            if value is not None and value not in ("last", "best", "hpc", "registry"):
                try:
                    check_lightning_checkpoint(value)
                except (OSError, ValueError) as err:
                    parser.error(str(err))  # usage line, the message, exit status 2


def check_lightning_checkpoint(path: str) -> None:
    """Raise ``ValueError`` naming ``path`` unless it is a checkpoint Lightning can resume.

    Reads the file lazily (memory-mapped), so a large checkpoint costs little here.
    """
    import torch

    file = Path(path)
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


def run_cli(args: list[str] | None = None) -> ALBEFCLI:
    """Run the CLI on ``args`` (``sys.argv`` when None) and return it (trainer, model, data)."""
    return ALBEFCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning`` / ``albef-pl``: ``fit``, ``validate``, ``test``, ``predict``."""
    run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
