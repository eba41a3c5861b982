"""Pictures people would rather look at than read: loss curves."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

_logger = logging.getLogger(__name__)


class LossCurvePlotter(Callback):
    """Collects ``train/loss*`` step values and writes ``loss_curves.png`` after every epoch.

    Args:
        keys: metric names to plot (``<key>_step`` values are read when Lightning adds them).
        filename: file written into the run's log directory (or ``default_root_dir``).
    """

    def __init__(
        self,
        keys: tuple[str, ...] = ("train/loss_itc", "train/loss_itm", "train/loss_mlm", "train/loss"),
        filename: str = "loss_curves.png",
    ) -> None:
        self.keys = tuple(keys)
        self.filename = filename
        self.history: dict[str, list[tuple[int, float]]] = {k: [] for k in self.keys}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        for key in self.keys:
            value = metrics.get(f"{key}_step", metrics.get(key))
            if value is not None:
                self.history[key].append((trainer.global_step, float(value)))

    def output_path(self, trainer: L.Trainer) -> Path:
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root) / self.filename

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero and any(self.history.values()):
            path = self.plot(self.output_path(trainer))
            _logger.info("loss curves written to %s", path)

    def plot(self, path: Path) -> Path:
        """Write the collected curves to ``path`` as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for key, points in self.history.items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=key.split("/")[-1])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title("training losses")
        ax.grid(alpha=0.3)
        ax.legend()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.update(state_dict.get("history", {}))
