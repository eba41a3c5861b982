"""Pre-training data: image-caption pairs streamed from WebDataset shards.

Batches are dicts of plain tensors::

    image           float32 (B, 3, S, S), normalised with CLIP's mean and std
    input_ids       int64 (B, L), "[CLS] w1 .. wn [PAD] .." (ALBEF layout, see albef_pl.text)
    attention_mask  int64 (B, L)
    image_id        int64 (B,), only when the shards record image ids (-1 where missing)

Every rank yields exactly ``num_train_samples // (world_size * batch_size)`` training
batches per epoch, so ranks stay in step and ``len(trainer.train_dataloader)`` is known.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from albef_pl.errors import DataError
from albef_pl.text import CaptionTokenizer
from albef_pl.transforms import eval_transform, pretrain_transform
from data_modules.shards import (
    SKIP_REASONS,
    EpochLoader,
    ShardStream,
    expand_shards,
    is_url,
    read_shard_sizes,
    read_shard_sizes_and_files,
)

_logger = logging.getLogger(__name__)

__all__ = ["PretrainDataModule", "SkippedSamplesLogger"]


def _as_specs(spec: str | list[str] | None) -> list[str]:
    """One string per source, as given."""
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else [str(s) for s in spec]


def _as_sources(spec: str | list[str] | None) -> list[list[str]]:
    """A string is one source; each item of a list is one source (mixed by weight)."""
    specs = _as_specs(spec)
    sources = [expand_shards(s) for s in specs]
    for spec, shards in zip(specs, sources, strict=True):
        missing = [s for s in shards if not is_url(s) and not Path(s).is_file()]
        if not shards:
            raise FileNotFoundError(f"shards {spec!r}: no .tar files found there")
        if missing:
            raise FileNotFoundError(
                f"shards {spec!r}: {len(missing)} of {len(shards)} local files missing, "
                f"e.g. {missing[0]}"
            )
    return sources


class PretrainDataModule(L.LightningDataModule):
    """WebDataset image-caption shards for ALBEF pre-training.

    Args:
        train_shards: Training shards: a directory of ``.tar`` files (img2dataset output
            works as is), a brace pattern or URL, or a list of these, one per source.
        train_weights: Sampling weight per training source. Default: proportional to the
            sources' sizes when they are known, else equal.
        num_train_samples: Samples per epoch over all ranks. Default: the total of the
            sizes files next to the shards (``sizes.json`` or img2dataset ``*_stats.json``).
        val_shards: Validation shards (same forms, all read once per validation).
        num_val_samples: Validation samples over all ranks. Default: from the sizes files.
        test_shards: Shards for ``test`` (read once, as validation). Default: the validation
            shards.
        num_test_samples: Test samples over all ranks. Default: from the sizes files.
        batch_size: Batch size per rank.
        num_workers: Dataloader workers per rank.
        image_size: Side length of the square images.
        tokenizer: Tokenizer directory or hub name (``None``: the offline MiniLM package).
        max_length: Text length in tokens including ``[CLS]`` (25 in the paper).
        max_words: Words kept by caption cleaning.
        append_sep: End captions with ``[SEP]`` (stock BERT) instead of ALBEF's layout.
        shuffle_buffer: Samples held per worker for shuffling.
        seed: Base seed of shard draws, shuffling and caption choice.
        augment: Random crop, flip and RandomAugment for training (else a plain resize).
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        train_weights: list[float] | None = None,
        num_train_samples: int | None = None,
        val_shards: str | list[str] | None = None,
        num_val_samples: int | None = None,
        test_shards: str | list[str] | None = None,
        num_test_samples: int | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        image_size: int = 256,
        tokenizer: str | None = None,
        max_length: int = 25,
        max_words: int = 30,
        append_sep: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 42,
        augment: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("image_size", image_size),
                            ("num_train_samples", num_train_samples),
                            ("num_val_samples", num_val_samples),
                            ("num_test_samples", num_test_samples), ("max_words", max_words)):
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if max_length < 2:
            raise ValueError(f"data.max_length must be >= 2 ([CLS] and a word), got {max_length}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.train_shards = train_shards
        self.train_weights = train_weights
        self.num_train_samples = num_train_samples
        self.val_shards = val_shards
        self.num_val_samples = num_val_samples
        self.test_shards = test_shards
        self.num_test_samples = num_test_samples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.max_words = max_words
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.augment = augment
        # NOTE: ALBEF's layout (no trailing [SEP]) is the default because the official
        # checkpoints were trained on it; stock BERT's layout is one flag away.
        self.tokenizer = CaptionTokenizer(tokenizer, max_length, append_sep, padding="longest")
        # Fail before any model is built: shard lists that name missing files, and a
        # tokenizer that cannot be loaded, are reported now rather than at the first batch.
        for name, spec in (("train_shards", train_shards), ("val_shards", val_shards),
                           ("test_shards", test_shards)):
            try:
                _as_sources(spec)
            except (FileNotFoundError, ValueError) as err:
                raise FileNotFoundError(
                    f"data.{name}: {err}. Give a directory of .tar shards, a brace pattern "
                    "or a URL. `albef-pl-shards` writes shards; for the shipped configs, "
                    "`make shards-demo` (conf/demo.yaml) or `make shards-sample` "
                    "(conf/pretrain_coco_sample.yaml)."
                ) from err
        try:
            self.tokenizer.tokenizer
        except (OSError, ValueError) as err:
            raise ValueError(
                f"data.tokenizer: cannot load a tokenizer from {tokenizer!r} ({err}). Give a "
                "local directory with vocab.txt, a hub name with network access, or null "
                "for the offline MiniLM package."
            ) from err
        self._world: tuple[int, int] | None = None
        self._loaders: dict[str, EpochLoader] = {}
        self._epochs: dict[str, int] = {}
        self._train_batch = 0  # a restored position inside the training epoch

    # -- distributed layout

    def set_world(self, rank: int, world_size: int) -> None:
        """Fix this process's rank and the world size (outside Lightning: notebooks, tests).

        Args:
            rank: Global rank of this process.
            world_size: Number of data-parallel processes.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self._world = (rank, world_size)

    def world(self) -> tuple[int, int]:
        """(rank, world size): set explicitly, else from the trainer, else torch.distributed."""
        if self._world is not None:
            return self._world
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    # -- loaders

    def train_dataloader(self) -> EpochLoader:
        """Resampled, infinite per worker, cut into a fixed number of batches per epoch."""
        sources = _as_sources(self.train_shards)
        if not sources:
            raise ValueError("train_shards is not set")
        sizes = [read_shard_sizes(s) for s in sources]
        total = self._total("train", sizes, self.num_train_samples)
        weights = self.train_weights
        if weights is None and all(sizes):
            weights = [float(sum(s.values())) for s in sizes]
        rank, world_size = self.world()
        num_batches = total // (world_size * self.batch_size)
        if num_batches == 0:
            raise ValueError(
                f"{total} training samples make no full batch of {self.batch_size} "
                f"on each of {world_size} ranks"
            )

        stream = ShardStream(
            sources,
            batch_size=self.batch_size,
            transform=pretrain_transform(self.image_size, augment=self.augment, normalize=False),
            tokenizer=self.tokenizer,
            resampled=True,
            weights=weights,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            max_words=self.max_words,
            name="train",
            shard_sizes={k: v for s in sizes if s for k, v in s.items()},
            source_names=_as_specs(self.train_shards),
        )
        _logger.info(
            "train: %d sources, %d shards, %d samples per epoch -> %d batches of %d per rank "
            "(%d ranks)",
            len(sources),
            sum(len(s) for s in sources),
            total,
            num_batches,
            self.batch_size,
            world_size,
        )
        return self._register("train", stream, num_batches)

    def val_dataloader(self) -> EpochLoader | list[Any]:
        """Each validation shard read once (split by rank, then worker), full batches only."""
        return self._eval_loader("val", self.val_shards, self.num_val_samples)

    def test_dataloader(self) -> EpochLoader | list[Any]:
        """``test_shards`` (else the validation shards) read once, as validation."""
        if self.test_shards is None:
            return self._eval_loader("test", self.val_shards, self.num_val_samples)
        return self._eval_loader("test", self.test_shards, self.num_test_samples)

    def _eval_loader(
        self, split: str, spec: str | list[str] | None, given: int | None
    ) -> EpochLoader | list[Any]:
        sources = _as_sources(spec)
        if not sources:
            return []
        shards = [s for source in sources for s in source]
        found = read_shard_sizes_and_files(shards)
        sizes, size_files = found if found is not None else (None, None)
        total = self._total(split, [sizes], given)
        rank, world_size = self.world()
        num_batches = total // (world_size * self.batch_size)
        if sizes is not None:
            # Shards go round-robin to ranks: no rank may be asked for more than it holds.
            per_rank = [sum(sizes[s] for s in shards[r::world_size]) for r in range(world_size)]
            num_batches = min(num_batches, min(per_rank) // self.batch_size)
        if num_batches == 0:
            _logger.warning(
                "%s: %d samples in %d shards give no full batch of %d on every one of %d "
                "ranks; this evaluation is skipped",
                split,
                total,
                len(shards),
                self.batch_size,
                world_size,
            )
            return []

        stream = ShardStream(
            [shards],
            batch_size=self.batch_size,
            transform=eval_transform(self.image_size, normalize=False),
            tokenizer=self.tokenizer,
            resampled=False,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            shuffle_buffer=0,
            max_words=self.max_words,
            name=split,
            shard_sizes=sizes,
            size_files=size_files,
        )
        return self._register(split, stream, num_batches)

    def _total(self, split: str, sizes: list[dict[str, int] | None], given: int | None) -> int:
        if given is not None:
            return given
        if not all(sizes):
            raise DataError(
                f"{split}: the number of samples is unknown (no sizes.json or *_stats.json "
                f"next to every shard); set num_{split}_samples"
            )
        return sum(sum(s.values()) for s in sizes if s)

    def _register(self, split: str, stream: ShardStream, num_batches: int) -> EpochLoader:
        loader = EpochLoader(
            stream,
            num_batches,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        previous = self._loaders.get(split)
        if previous is not None:  # a reload keeps the epoch count and the skip totals
            loader.epoch, loader.totals = previous.epoch, previous.totals
        else:
            loader.epoch = self._epochs.get(split, 0)
            if split == "train" and self._train_batch:
                loader.resume_at(loader.epoch, self._train_batch)
                self._train_batch = 0
        self._loaders[split] = loader
        return loader

    # -- reporting and state

    def skipped_counts(self, split: str = "train") -> dict[str, int]:
        """Samples (and shards) skipped so far in this process, by reason.

        Every reason of :data:`data_modules.shards.SKIP_REASONS` is present (zero when none),
        so all ranks report the same keys; add the ranks' values for the global count.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            ``{reason: count}``.
        """
        loader = self._loaders.get(split)
        if loader is None:
            return {reason: 0 for reason in SKIP_REASONS}
        return loader.skipped_counts()

    def take_pass_tally(self, split: str) -> tuple[int, int]:
        """(samples in batches, samples and shards skipped) of this process's last ``split``
        pass when it ran short of batches, else (0, 0); read once (see
        :meth:`albef_pl.tasks.ALBEFTask.check_evaluation_data`)."""
        loader = self._loaders.get(split)
        tally = loader.short_pass if loader is not None else None
        if loader is not None:
            loader.short_pass = None
        return tally or (0, 0)

    def check_pass(self, split: str, decoded: int, dropped: int) -> None:
        """Raise :class:`DataError` when a ``split`` pass (all processes together) formed
        not one batch although it read data: every sample or shard was skipped, and the run
        would go on with no metric (a monitored checkpoint would stop on a missing key)."""
        if dropped and not decoded:
            option = "test_shards" if split == "test" and self.test_shards else "val_shards"
            message = (
                f"{split}: not one batch could be formed from {getattr(self, option)}: "
                f"{dropped} samples or shards were skipped (see the skip warnings above: "
                "unreadable shards, images that do not decode, captions missing). Replace "
                f"the shards or point data.{option} elsewhere."
            )
            trainer = getattr(self, "trainer", None)
            fitting = getattr(getattr(trainer, "state", None), "fn", None) == "fit"
            if fitting:  # the training epoch is sound: keep its checkpoint, say it loudly
                _logger.warning("%s Training goes on without validation metrics.", message)
                return
            raise DataError(message)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called for each batch training takes (Lightning fetches one ahead): what a
        # mid-epoch checkpoint must remember as the position in the epoch.
        trainer = getattr(self, "trainer", None)
        loader = self._loaders.get("train")
        if trainer is not None and trainer.training and loader is not None:
            loader.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The epoch counters and the position inside the training epoch in progress, so a
        resumed run draws exactly what the uninterrupted run would have drawn."""
        epochs = dict(self._epochs)
        epochs.update({split: loader.epoch for split, loader in self._loaders.items()})
        state: dict[str, Any] = {"epochs": epochs, "train_batch": 0}
        if "train" in self._loaders:
            epochs["train"], state["train_batch"] = self._loaders["train"].position()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (a checkpoint without a position, from an
        older version, resumes at the start of its next epoch)."""
        self._epochs = dict(state_dict.get("epochs", {}))
        self._train_batch = int(state_dict.get("train_batch", 0))
        for split, loader in self._loaders.items():
            loader.epoch = self._epochs.get(split, loader.epoch)
        if "train" in self._loaders and self._train_batch:
            self._loaders["train"].resume_at(self._epochs["train"], self._train_batch)
            self._train_batch = 0


class SkippedSamplesLogger(L.Callback):
    """Logs the skipped-sample counts as ``{train,val,test}/skipped_<reason>`` at epoch ends.

    Values are this rank's running totals, summed over ranks by Lightning (every rank logs
    every reason, so the collective calls match). Works with any datamodule that has a
    ``skipped_counts(split)`` method.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    @staticmethod
    def _log(trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        counts = getattr(trainer.datamodule, "skipped_counts", None)
        if counts is None:
            return
        values = {f"{split}/skipped_{k}": float(v) for k, v in counts(split).items()}
        pl_module.log_dict(values, reduce_fx="sum", sync_dist=True, on_epoch=True)
