"""Pictures people would rather look at than read: loss curves, retrieval examples,
grounding heat maps."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

_logger = logging.getLogger(__name__)


class LossCurvePlotter(Callback):
    """Collects ``train/loss*`` step values and writes ``loss_curves.png`` after every epoch.

    When the output is not a terminal (a batch job writing to a file, where progress bars
    stay silent), it also logs a line with the step and these losses every
    ``text_progress_every`` optimizer steps. After every validation pass it logs one line
    with the ``val/`` metrics (skip counts only when not zero), so a fine-tune's accuracy per
    epoch is in the log, not only in ``metrics.csv``.

    Args:
        keys: metric names to plot (``<key>_step`` values are read when Lightning adds them).
        filename: file written into the run's log directory (or ``default_root_dir``).
        text_progress_every: steps between progress lines when not on a terminal; 0: never.
    """

    def __init__(
        self,
        keys: tuple[str, ...] = ("train/loss_itc", "train/loss_itm", "train/loss_mlm", "train/loss"),
        filename: str = "loss_curves.png",
        text_progress_every: int = 25,
    ) -> None:
        self.keys = tuple(keys)
        self.filename = filename
        self.text_progress_every = text_progress_every
        self.history: dict[str, list[tuple[int, float]]] = {k: [] for k in self.keys}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        latest = {}
        for key in self.keys:
            value = metrics.get(f"{key}_step", metrics.get(key))
            if value is not None:
                self.history[key].append((trainer.global_step, float(value)))
                latest[key.split("/")[-1]] = float(value)
        every = self.text_progress_every
        step = trainer.global_step
        if (every and latest and step % every == 0 and trainer.is_global_zero
                and not sys.stderr.isatty()):
            total = trainer.estimated_stepping_batches
            losses = "  ".join(f"{k} {v:.3f}" for k, v in latest.items())
            _logger.info("step %d/%s (epoch %d): %s", step,
                         int(total) if math.isfinite(total) else "?", trainer.current_epoch, losses)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        line = validation_summary(trainer.callback_metrics)
        if line:
            _logger.info("%s %s", _validation_label(trainer), line)

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


def _validation_label(trainer: L.Trainer) -> str:
    """``"epoch N validation:"`` while fitting, ``"validation:"`` for ``validate``."""
    fitting = getattr(getattr(trainer, "state", None), "fn", None) == "fit"
    return f"epoch {trainer.current_epoch} validation:" if fitting else "validation:"


def validation_summary(metrics: dict[str, Any]) -> str:
    """``"acc 0.9375  loss 0.2104"`` from the ``val/`` metrics (epoch values; skip counts
    only when not zero)."""
    parts = []
    for key in sorted(metrics):
        if not key.startswith("val/") or key.endswith("_step"):
            continue
        value = float(metrics[key])
        name = key.removeprefix("val/").removesuffix("_epoch")
        if name.startswith("skipped_") and value == 0:
            continue
        parts.append(f"{name} {value:.4g}")
    return "  ".join(parts)


class RetrievalExamplesPlotter(Callback):
    """Shows what contrastive alignment has learned, after every validation epoch.

    Takes the first validation batch (images with their captions), ranks the batch's captions
    for each of the first ``num_images`` images by the student's ITC similarity, and writes
    ``retrieval_examples.png`` (each image beside its top ``top_k`` captions; captions of the
    same image, by ``image_id`` when the batch has one, in green, others in red) into the run's log directory. It also logs one line with
    the epoch's in-batch image-to-text top-1 accuracy and ITM balanced accuracy next to their
    chance levels, when the task logs them (``PretrainTask`` does).

    Batches without ``image``, ``input_ids`` and ``attention_mask`` (for example the
    image-only and caption-only batches of retrieval evaluation) are ignored.

    Args:
        num_images: images shown.
        top_k: captions listed per image.
        filename: file written into the log directory (overwritten every epoch).
    """

    KEYS = ("image", "input_ids", "attention_mask")

    def __init__(self, num_images: int = 6, top_k: int = 3,
                 filename: str = "retrieval_examples.png") -> None:
        if num_images < 1 or top_k < 1:
            raise ValueError(f"num_images and top_k must be >= 1, got {num_images}, {top_k}")
        self.num_images = num_images
        self.top_k = top_k
        self.filename = filename
        self._batch: dict[str, Any] | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self._batch = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        if self._batch is None and isinstance(batch, dict) and all(k in batch for k in self.KEYS):
            self._batch = {k: batch[k].detach() for k in (*self.KEYS, "image_id") if k in batch}

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._batch is None:
            return
        batch_size = int(self._batch["image"].shape[0])
        path, _ = self.plot(pl_module, self._batch, _tokenizer(trainer),
                            Path(trainer.log_dir or trainer.default_root_dir) / self.filename,
                            trainer.current_epoch)
        metrics = trainer.callback_metrics
        parts = [_validation_label(trainer)]
        if "val/itc_acc_i2t" in metrics:
            parts.append(f"in-batch image->text top-1 {100 * float(metrics['val/itc_acc_i2t']):.1f}% "
                         f"(chance {100 / batch_size:.1f}%);")
        if "val/itm_acc" in metrics:
            parts.append(f"ITM balanced accuracy {100 * float(metrics['val/itm_acc']):.1f}% "
                         "(chance 50%);")
        parts.append(f"examples: {path}")
        _logger.info(" ".join(parts))

    @torch.no_grad()
    def plot(self, pl_module, batch: dict[str, torch.Tensor], tokenizer, path: Path,
             epoch: int) -> tuple[Path, int]:
        """Rank the batch's captions for its first images and write the PNG to ``path``.

        Returns the path and how many of the shown images rank their own caption first.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from albef_pl.transforms import CLIP_MEAN, CLIP_STD

        was_training = pl_module.training
        pl_module.eval()
        try:
            f = pl_module.model.features(batch["image"], batch["input_ids"], batch["attention_mask"])
            sim = (f.image_feat.float() @ f.text_feat.float().T).cpu()
        finally:
            pl_module.train(was_training)
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
        captions = [tokenizer.decode(ids[i][mask[i].bool()], skip_special_tokens=True)
                    for i in range(len(ids))]
        image_id = batch.get("image_id")

        def own(j: int, row: int) -> bool:  # caption j describes image `row`
            if image_id is not None:
                return bool(image_id[j] == image_id[row])
            return captions[j] == captions[row]

        n = min(self.num_images, len(captions))
        k = min(self.top_k, len(captions))
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        fig, axes = plt.subplots(n, 2, figsize=(9, 1.6 * n), dpi=100,
                                 gridspec_kw={"width_ratios": [1, 4]}, squeeze=False)
        hits = 0
        for row in range(n):
            image = (batch["image"][row].float().cpu() * std + mean).clamp(0, 1)
            axes[row, 0].imshow(image.permute(1, 2, 0).numpy())
            axes[row, 0].axis("off")
            ranked = sim[row].topk(k).indices.tolist()
            hits += own(ranked[0], row)
            ax = axes[row, 1]
            ax.axis("off")
            for rank, j in enumerate(ranked):
                ax.text(0.0, 0.85 - 0.3 * rank, f"{rank + 1}. {captions[j]}  ({float(sim[row, j]):.2f})",
                        color="green" if own(j, row) else "firebrick", fontsize=9, transform=ax.transAxes,
                        va="center")
        fig.suptitle(f"epoch {epoch}: top-{k} of {len(captions)} captions by ITC "
                     f"(green: the image's own); top-1 right for {hits}/{n}", fontsize=10)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path, hits



class GroundingExamplesPlotter(Callback):
    """Writes ``grounding_examples.png`` after every validation of a grounding task.

    One row per expression kept by :class:`albef_pl.tasks.grounding.GroundingTask` (its
    ``grounding_examples``, the first ``num_examples`` of the validation set): the image,
    then the Grad-CAM heat map over it, both with the ground-truth box in green and the
    chosen proposal in red, titled with the expression and the IoU.

    Args:
        filename: file written into the run's log directory (overwritten every epoch).
    """

    def __init__(self, filename: str = "grounding_examples.png") -> None:
        self.filename = filename

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        examples = getattr(pl_module, "grounding_examples", None)
        if trainer.sanity_checking or not trainer.is_global_zero or not examples:
            return
        path = plot_grounding_examples(
            examples, Path(trainer.log_dir or trainer.default_root_dir) / self.filename,
            title=f"epoch {trainer.current_epoch}: green = ground truth, red = chosen box",
        )
        _logger.info("grounding heat maps written to %s", path)


def plot_grounding_examples(examples: list, path: Path, title: str = "") -> Path:
    """Draw grounding examples (objects with ``image_path``, ``text``, ``cam`` (h, w),
    ``bbox`` and ``chosen`` [x, y, w, h], ``iou``, ``width``, ``height``) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    from albef_pl.grounding import upsample_map

    fig, axes = plt.subplots(len(examples), 2, figsize=(7, 3.2 * len(examples)), dpi=90,
                             squeeze=False)
    for row, ex in enumerate(examples):
        try:
            with Image.open(ex.image_path) as img:
                picture = img.convert("RGB").resize((ex.width, ex.height))
        except OSError:
            picture = Image.new("RGB", (ex.width, ex.height), "gray")
        heat = upsample_map(ex.cam, ex.width, ex.height)
        heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
        for col, ax in enumerate(axes[row]):
            ax.imshow(picture)
            if col == 1:
                ax.imshow(heat.numpy(), cmap="jet", alpha=0.5)
            for box, colour in ((ex.bbox, "lime"), (ex.chosen, "red")):
                ax.add_patch(Rectangle((box[0], box[1]), box[2], box[3], fill=False,
                                       edgecolor=colour, linewidth=2))
            ax.axis("off")
        axes[row, 0].set_title(f'"{ex.text}"', fontsize=9)
        axes[row, 1].set_title(f"Grad-CAM; IoU {ex.iou:.2f}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

def _tokenizer(trainer: L.Trainer):
    """The data module's Hugging Face tokenizer, or the offline default."""
    caption_tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
    inner = getattr(caption_tokenizer, "tokenizer", None)
    if inner is not None:
        return inner
    from albef_pl.text import build_tokenizer

    return build_tokenizer(None)
