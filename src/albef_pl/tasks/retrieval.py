"""Image-text retrieval: fine-tuning with ITC + ITM and ALBEF's two-stage evaluation.

Training is the pre-training objective without MLM: ITC whose positives are every caption
of the same image (batch and id queue), and ITM with hard negatives that never pick a
caption of the same image. Validation, test and predict embed every image and caption
once, then rank with :func:`albef_pl.rerank.two_stage_scores`: ITC top ``k_test`` in each
direction, re-ranked by the ITM match logit.
"""

from __future__ import annotations

import json
import logging
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from albef_pl.metrics import chance_recall, retrieval_recall
from albef_pl.momentum import concat_all_gather
from albef_pl.rerank import RetrievalScores, two_stage_scores
from albef_pl.tasks.base import ALBEFTask

_logger = logging.getLogger(__name__)

__all__ = ["RetrievalTask"]


@dataclass
class _EvalBuffer:
    """What the evaluation steps of one epoch embedded on this process."""

    image_embeds: list[torch.Tensor] = field(default_factory=list)
    image_feat: list[torch.Tensor] = field(default_factory=list)
    image_index: list[torch.Tensor] = field(default_factory=list)
    image_valid: list[torch.Tensor] = field(default_factory=list)
    image_path: dict[int, str] = field(default_factory=dict)
    text_embeds: list[torch.Tensor] = field(default_factory=list)
    text_mask: list[torch.Tensor] = field(default_factory=list)
    text_feat: list[torch.Tensor] = field(default_factory=list)
    text_index: list[torch.Tensor] = field(default_factory=list)
    text_image_index: list[torch.Tensor] = field(default_factory=list)
    caption: dict[int, str] = field(default_factory=dict)
    num_images: int = 0
    num_texts: int = 0
    started: float = field(default_factory=time.perf_counter)


# The tensor lists of _EvalBuffer, in the order the gathers read them.
_EVAL_TENSORS = ("image_embeds", "image_feat", "image_index", "image_valid", "text_embeds",
                 "text_mask", "text_feat", "text_index", "text_image_index")


@dataclass
class _EvalSet:
    """The evaluation set after gathering, restricted to usable samples.

    Attributes:
        image_feat: (N_i, E) every kept image's feature.
        text_feat: (N_t, E) every kept caption's feature.
        text_embeds: (N_t, L, D) text-encoder states.
        text_mask: (N_t, L) attention masks.
        local_embeds: (n, N, Dv) tokens of the kept images embedded on this process.
        local_ids: (n,) their rows in ``image_feat``.
        img2txt: captions of each kept image.
        txt2img: image of each kept caption.
        image_ids: original index (in the data set) of each kept image.
        text_ids: original index of each kept caption.
    """

    image_feat: torch.Tensor
    text_feat: torch.Tensor
    text_embeds: torch.Tensor
    text_mask: torch.Tensor
    local_embeds: torch.Tensor
    local_ids: torch.Tensor
    img2txt: list[list[int]]
    txt2img: list[int]
    image_ids: torch.Tensor
    text_ids: torch.Tensor


class RetrievalTask(ALBEFTask):
    """ALBEF image-text retrieval: ``loss = ITC + ITM``, R@K by two-stage ranking.

    Args:
        k_test: ITC candidates re-ranked by ITM per query (256 COCO, 128 Flickr30K).
        rerank: re-rank with ITM; ``False`` ranks by ITC similarity alone (no fusion).
        score_with_itc: score = ITM logit + ITC similarity (as LAVIS); the original uses the
            ITM logit alone.
        fusion_batch_size: (image, text) pairs per fusion pass during evaluation.
        eval_chunk_size: query rows per block of similarities during evaluation.
        predict_top_k: captions per image and images per caption written by ``predict``.
        predict_dir: folder for ``predict``'s ``retrieval_predictions.json`` and
            ``retrieval_top5.png``; default ``<log dir>/predictions``.
        predict_grid_captions: captions shown in the PNG grid.
        lr: peak learning rate (1e-5 in the paper's retrieval fine-tunes).
        min_lr: final learning rate.
        warmup_lr: learning rate at step 0 (equal to ``lr`` in the original: no warm-up).
        warmup_steps: warm-up optimizer steps.
        queue_size: ITC queue length (65536 in the paper).
        **kwargs: see :class:`ALBEFTask`.
    """

    # NOTE: the original clamps the temperature only in pre-training, not in retrieval.
    clamp_temp = False
    queue_with_idx = True

    def __init__(
        self,
        *args: Any,
        k_test: int = 256,
        rerank: bool = True,
        score_with_itc: bool = False,
        fusion_batch_size: int = 128,
        eval_chunk_size: int = 1024,
        predict_top_k: int = 10,
        predict_dir: str | None = None,
        predict_grid_captions: int = 4,
        lr: float = 1e-5,
        min_lr: float = 1e-6,
        warmup_lr: float = 1e-5,
        warmup_steps: int = 100,
        queue_size: int = 65536,
        **kwargs: Any,
    ) -> None:
        for name, value in (("k_test", k_test), ("fusion_batch_size", fusion_batch_size),
                            ("eval_chunk_size", eval_chunk_size), ("predict_top_k", predict_top_k)):
            if value < 1:
                raise ValueError(f"model.{name} must be at least 1, got {value}")
        super().__init__(
            *args, lr=lr, min_lr=min_lr, warmup_lr=warmup_lr, warmup_steps=warmup_steps,
            queue_size=queue_size, **kwargs,
        )
        self.save_hyperparameters(
            "k_test", "rerank", "score_with_itc", "fusion_batch_size", "eval_chunk_size",
            "predict_top_k", "predict_dir", "predict_grid_captions",
        )
        self._eval = _EvalBuffer()

    def configure_heads(self) -> None:
        # NOTE: retrieval trains no MLM; the head is removed (as the original's retrieval
        # model has none) so that DDP finds no parameter without a gradient. An
        # ``init_checkpoint`` (official or ours, e.g. from pre-training at 256 px) is loaded by
        # the base task through albef_pl.convert, which resizes the position embeddings to
        # this model's resolution, fills the id queue with -100 and drops the MLM head.
        self.model.mlm_head = None

    # ---- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if "image" not in batch:  # every image of the batch was unreadable (already warned)
            return None
        if "idx" not in batch:
            raise KeyError(
                f"RetrievalTask needs training batches with 'idx' (the image index of each "
                f"caption, for ITC positives); this batch has {sorted(batch)}. Use "
                "data_modules.retrieval.RetrievalDataModule, or a data module that adds it."
            )
        image, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        out = self.contrastive_and_matching(image, ids, mask, idx=batch["idx"], update_queue=True)
        loss = out["loss_itc"] + out["loss_itm"]

        b = image.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=b)
        self.log("train/loss_itc", out["loss_itc"], on_step=True, on_epoch=True, batch_size=b)
        self.log("train/loss_itm", out["loss_itm"], on_step=True, on_epoch=True, batch_size=b)
        self.log_common("train", b)
        return loss

    # ---- evaluation: embed in the steps, rank at the end of the epoch
    @torch.no_grad()
    def embed_batch(self, batch: dict[str, Any]) -> None:
        """Embed one evaluation batch (images or captions) into this epoch's buffer."""
        buf = self._eval
        buf.num_images, buf.num_texts = int(batch["num_images"]), int(batch["num_texts"])
        if "image" in batch:
            embeds = self.model.encode_image(batch["image"])  # (B, N, Dv)
            buf.image_embeds.append(embeds)
            buf.image_feat.append(self.model.image_feature(embeds).float())
            buf.image_index.append(batch["image_index"])
            buf.image_valid.append(batch["image_valid"])
            buf.image_path.update(
                zip(batch["image_index"].tolist(), batch["image_path"], strict=True)
            )
        else:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            embeds = self.model.encode_text(ids, mask)  # (T, L, D)
            buf.text_embeds.append(embeds)
            buf.text_mask.append(mask)
            buf.text_feat.append(self.model.text_feature(embeds, mask).float())
            buf.text_index.append(batch["text_index"])
            buf.text_image_index.append(batch["text_image_index"])
            buf.caption.update(zip(batch["text_index"].tolist(), batch["caption"], strict=True))

    def _reset_eval(self) -> None:
        self._eval = _EvalBuffer()

    def on_validation_epoch_start(self) -> None:
        self._reset_eval()

    def on_test_epoch_start(self) -> None:
        self._reset_eval()

    def on_predict_epoch_start(self) -> None:
        self._reset_eval()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.embed_batch(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.embed_batch(batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.embed_batch(batch)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking:  # a partial set: nothing meaningful to rank
            self._reset_eval()
            return
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._evaluate("test")

    def on_predict_epoch_end(self) -> None:
        self._evaluate("predict")

    def _evaluate(self, stage: str) -> None:
        started = self._eval.started
        strings = {"image_path": self._eval.image_path, "caption": self._eval.caption}
        data = self._gather(stage)
        self._reset_eval()
        if data is None:
            return
        t0 = time.perf_counter()
        with torch.no_grad(), self.trainer.precision_plugin.forward_context():
            scores = self.rank(data)
        metrics = retrieval_recall(scores.i2t, scores.t2i, data.img2txt, data.txt2img)
        rank_seconds = time.perf_counter() - t0
        if stage == "predict":
            self._write_predictions(data, scores, metrics, strings)
            return
        # Every process holds the same scores; sync_dist averages equal values (and keeps
        # the monitored metric on every rank for ModelCheckpoint).
        logged = {f"{stage}/{name}": value for name, value in metrics.items() if name != "r_mean"}
        logged[f"{stage}/num_images"] = float(len(data.image_ids))
        logged[f"{stage}/num_texts"] = float(len(data.text_ids))
        logged[f"{stage}/rank_seconds"] = rank_seconds
        logged[f"{stage}/eval_seconds"] = time.perf_counter() - started
        self.log_dict(logged, sync_dist=True)
        self.log(f"{stage}/r_mean", metrics["r_mean"], prog_bar=True, sync_dist=True)
        chance = chance_recall(data.img2txt, len(data.text_ids))
        _logger.info("%s: %s (chance: txt_r1 %.2f, img_r1 %.2f, r_mean %.2f)", stage,
                     ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()),
                     chance["txt_r1"], chance["img_r1"], chance["r_mean"])

    def rank(self, data: _EvalSet) -> RetrievalScores:
        """Score matrices of the gathered set (two-stage, or ITC alone without ``rerank``)."""
        h = self.hparams
        return two_stage_scores(
            self.model, data.image_feat, data.text_feat, data.local_embeds, data.local_ids,
            data.text_embeds, data.text_mask, k_test=h.k_test, rerank=h.rerank,
            add_itc=h.score_with_itc, fusion_batch_size=h.fusion_batch_size,
            chunk_size=h.eval_chunk_size,
        )

    # ---- gathering the embedded set from every process
    def _fill_empty_shares(self, buf: _EvalBuffer) -> bool:
        """Give this process's empty lists a zero-row tensor shaped as another process's.

        A set with fewer image (or caption) batches than processes leaves some processes
        without images or captions; the gathers need every process's trailing shapes and
        dtypes, which only the processes that embedded some know. Returns ``False`` when no
        process embedded an image or no process a caption (then nothing can be ranked).
        """
        def template(items: list[torch.Tensor]) -> tuple[tuple[int, ...], torch.dtype] | None:
            return (tuple(items[0].shape[1:]), items[0].dtype) if items else None

        mine = {name: template(getattr(buf, name)) for name in _EVAL_TENSORS}
        mine["sizes"] = (buf.num_images, buf.num_texts)
        parts: list[dict[str, Any]] = [{} for _ in range(self.trainer.world_size)]
        dist.all_gather_object(parts, mine)
        buf.num_images = max(p["sizes"][0] for p in parts)
        buf.num_texts = max(p["sizes"][1] for p in parts)
        for name in _EVAL_TENSORS:
            known = [p[name] for p in parts if p[name] is not None]
            if not known:
                return False
            if not getattr(buf, name):
                shape, dtype = known[0]
                getattr(buf, name).append(torch.zeros((0, *shape), dtype=dtype,
                                                      device=self.device))
        return True

    def _gather(self, stage: str) -> _EvalSet | None:
        buf = self._eval
        if self.trainer.world_size > 1:  # every process takes part in the same collectives
            usable = self._fill_empty_shares(buf)
        else:
            usable = bool(buf.image_feat and buf.text_feat)
        if not usable:
            _logger.warning("%s: no images or no captions embedded; nothing to rank", stage)
            return None

        # Everything but the local image tokens goes to every process, in data-set order.
        n_i, n_t = buf.num_images, buf.num_texts
        local_index = torch.cat(buf.image_index).to(self.device)
        image_index = concat_all_gather(local_index)
        image_feat = _in_set_order(image_index, torch.cat(buf.image_feat), n_i)
        valid = torch.cat(buf.image_valid).to(self.device).long()  # collectives and bool disagree
        image_ok = _in_set_order(image_index, valid, n_i).bool()

        text_index = concat_all_gather(torch.cat(buf.text_index).to(self.device))
        text_feat = _in_set_order(text_index, torch.cat(buf.text_feat), n_t)
        text_embeds = _in_set_order(text_index, torch.cat(buf.text_embeds), n_t)
        text_mask = _in_set_order(text_index, torch.cat(buf.text_mask), n_t)
        txt2img = torch.cat(buf.text_image_index).to(self.device)
        txt2img = _in_set_order(text_index, txt2img, n_t, fill=-1)

        # Keep captions that were embedded and whose image decoded; images with a caption.
        text_ok = (txt2img >= 0) & image_ok[txt2img.clamp_min(0)]
        image_ok &= torch.zeros_like(image_ok).index_fill_(0, txt2img[text_ok], True)
        self._report_dropped(stage, n_i, n_t, image_ok, text_ok)
        keep_i, keep_t = torch.nonzero(image_ok)[:, 0], torch.nonzero(text_ok)[:, 0]
        new_row = torch.full((n_i,), -1, dtype=torch.long, device=self.device)
        new_row[keep_i] = torch.arange(len(keep_i), device=self.device)

        local_keep = image_ok[local_index]
        compact_txt2img = new_row[txt2img[keep_t]].tolist()
        img2txt: list[list[int]] = [[] for _ in range(len(keep_i))]
        for j, i in enumerate(compact_txt2img):
            img2txt[i].append(j)
        return _EvalSet(
            image_feat=image_feat[keep_i],
            text_feat=text_feat[keep_t],
            text_embeds=text_embeds[keep_t],
            text_mask=text_mask[keep_t],
            local_embeds=torch.cat(buf.image_embeds)[local_keep],
            local_ids=new_row[local_index[local_keep]],
            img2txt=img2txt,
            txt2img=compact_txt2img,
            image_ids=keep_i.cpu(),
            text_ids=keep_t.cpu(),
        )

    def _report_dropped(self, stage, n_i, n_t, image_ok, text_ok) -> None:
        lost_i, lost_t = n_i - int(image_ok.sum()), n_t - int(text_ok.sum())
        if lost_i or lost_t:
            _logger.warning(
                "%s: ranking %d of %d images and %d of %d captions; the rest were unreadable "
                "images, their captions, or never embedded (limit_%s_batches?)",
                stage, n_i - lost_i, n_i, n_t - lost_t, n_t, stage,
            )

    # ---- predict: JSON of top matches and a PNG grid
    def _all_strings(self, local: dict[int, str]) -> dict[int, str]:
        if self.trainer.world_size == 1:
            return local
        parts: list[dict[int, str]] = [{} for _ in range(self.trainer.world_size)]
        dist.all_gather_object(parts, local)
        return {k: v for p in parts for k, v in p.items()}

    def _predict_dir(self) -> Path:
        if self.hparams.predict_dir:
            return Path(self.hparams.predict_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions"

    def _write_predictions(
        self,
        data: _EvalSet,
        scores: RetrievalScores,
        metrics: dict[str, float],
        strings: dict[str, dict[int, str]],
    ) -> None:
        paths = self._all_strings(strings["image_path"])
        captions = self._all_strings(strings["caption"])
        if not self.trainer.is_global_zero:
            return
        h = self.hparams
        image_path = [paths[int(i)] for i in data.image_ids]
        caption = [captions[int(j)] for j in data.text_ids]
        k_t, k_i = min(h.predict_top_k, len(caption)), min(h.predict_top_k, len(image_path))
        top_t = scores.i2t.topk(k_t, dim=1)
        top_i = scores.t2i.topk(k_i, dim=1)

        def ranked(top, row: int, names: list[str], key: str, is_correct) -> list[dict]:
            pairs = zip(top.indices[row].tolist(), top.values[row].tolist(), strict=True)
            return [{key: names[c], "score": round(v, 4), "correct": is_correct(c)}
                    for c, v in pairs]

        images_out = [
            {"image": image_path[i],
             "captions": [caption[j] for j in data.img2txt[i]],
             "top_captions": ranked(top_t, i, caption, "caption",
                                    lambda j, i=i: data.txt2img[j] == i)}
            for i in range(len(image_path))
        ]
        captions_out = [
            {"caption": caption[j],
             "image": image_path[data.txt2img[j]],
             "top_images": ranked(top_i, j, image_path, "image",
                                  lambda i, j=j: data.txt2img[j] == i)}
            for j in range(len(caption))
        ]
        out_dir = self._predict_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        settings = {"k_test": h.k_test, "rerank": h.rerank, "score_with_itc": h.score_with_itc}
        with open(out_dir / "retrieval_predictions.json", "w") as f:
            json.dump({"settings": settings, "metrics": metrics, "images": images_out,
                       "captions": captions_out}, f, indent=1)
        shown = [data.img2txt[i][0] for i in range(len(image_path)) if data.img2txt[i]]
        save_top_images_grid(out_dir / "retrieval_top5.png", captions_out,
                              shown[: h.predict_grid_captions])
        _logger.info("predictions written to %s", out_dir)


def _in_set_order(
    index: torch.Tensor, local: torch.Tensor, size: int, fill: float = 0
) -> torch.Tensor:
    """Rows from every process, (size, ...) in data-set order; rows nobody had get ``fill``.

    ``index`` is the already gathered data-set index of the gathered rows.
    """
    out = local.new_full((size, *local.shape[1:]), fill)
    out[index] = concat_all_gather(local)
    return out


def save_top_images_grid(path: Path, captions: list[dict], rows: list[int], top: int = 5) -> None:
    """A PNG with one row per caption: the caption, then its ``top`` images, best first.

    Correct images get a green frame, others red; each image is titled with its score.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    if not rows:
        return
    fig = Figure(figsize=(2.2 * (top + 1), 2.3 * len(rows)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), top + 1, squeeze=False)
    for r, j in enumerate(rows):
        entry = captions[j]
        axes[r][0].axis("off")
        axes[r][0].text(0, 0.5, textwrap.fill(entry["caption"], 28), va="center", fontsize=8)
        for c in range(top):
            ax = axes[r][c + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(entry["top_images"]):
                ax.axis("off")
                continue
            hit = entry["top_images"][c]
            try:
                with Image.open(hit["image"]) as img:
                    img.thumbnail((256, 256))
                    ax.imshow(img.convert("RGB"))
            except OSError:
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
            colour = "tab:green" if hit["correct"] else "tab:red"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            ax.set_title(f"{hit['score']:.3f}", fontsize=8)
    fig.suptitle(f"each caption's top {top} images, best first; green frame: the caption's "
                 "own image; number: ITM match logit (ITC similarity where not re-ranked; "
                 "-100: outside the ITC shortlist)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
