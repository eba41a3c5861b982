"""Command line: a generic LightningCLI over any LightningModule and LightningDataModule.

``lightning``, ``albef-pl`` and ``python -m albef_pl`` are the same program. In subclass mode
a YAML ``class_path`` may name any task or data module, including a user's own subclass.
"""

from __future__ import annotations

import logging
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI


class ALBEFCLI(LightningCLI):
    """LightningCLI with the project's defaults (config saved next to the logs)."""

    def before_instantiate_classes(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


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
