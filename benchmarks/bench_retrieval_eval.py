"""Retrieval evaluation cost: two-stage re-ranking against exhaustive ITM scoring.

For test sets of 30, 60 and 120 real COCO images with five captions each (the first N
images of ``../shared/data/coco_sample/coco_val2017_sample_karpathy.json``; no image is
repeated), measures on this machine:

- embedding: every image and caption through the unimodal encoders, once per set (shared
  by both methods);
- ranking: ``two_stage`` (ITC top ``k_test`` in each direction, ITM on those pairs only, as
  :class:`~albef_pl.tasks.retrieval.RetrievalTask` does) and ``exhaustive`` (ITM on all
  N_i x N_t pairs), both with the same fusion batch, in the same run;
- R@K of both (equal when ``k_test`` covers the set);
- memory: the growth of the process's peak resident set size (``ru_maxrss``) while
  ranking, above the peak reached by loading the model and the embeddings. Each
  measurement runs in a fresh process, so the peaks do not carry over; ``tracemalloc``
  would not see tensor memory, which torch allocates outside Python's allocator.

The model has the sizes of ``conf/finetune/retrieval_coco_sample.yaml`` (ViT 192 px, 4
blocks of width 192; MiniLM split 3 text + 3 fusion layers), with random ViT weights:
costs do not depend on the weights. Times are wall-clock seconds (and, robust to other
load on a shared machine, the process's CPU seconds), the best of ``--repeats`` runs.

Usage::

    python benchmarks/bench_retrieval_eval.py --out bench_results/retrieval_eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COCO_SAMPLE = ROOT.parent / "shared" / "data" / "coco_sample"
KARPATHY = COCO_SAMPLE / "coco_val2017_sample_karpathy.json"
_logger = logging.getLogger("bench_retrieval_eval")

IMAGE_SIZE = 192
MODES = ("two_stage", "exhaustive")


def build_model():
    """The sample config's backbone, seeded so every process builds the same weights."""
    from albef_pl.models import ALBEF, TextConfig, VisionConfig

    torch.manual_seed(0)
    vision = VisionConfig(model_name="vit_base_patch16_224", img_size=IMAGE_SIZE, patch_size=16,
                          embed_dim=192, depth=4, num_heads=3)
    text = TextConfig(pretrained="offline-minilm", num_text_layers=3)
    return ALBEF(vision, text, embed_dim=256).eval()


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# Child processes
def child_embed(n: int, out: Path, batch: int) -> dict:
    """Embed the first ``n`` images and their captions; save what ranking needs."""
    from albef_pl.text import CaptionTokenizer
    from albef_pl.transforms import eval_transform
    from data_modules.retrieval import RetrievalEvalStream, read_retrieval_json

    entries = read_retrieval_json(KARPATHY)[:n]
    captions = [c for e in entries for c in e.captions]
    txt2img = [i for i, e in enumerate(entries) for _ in e.captions]
    stream = RetrievalEvalStream(
        [str(COCO_SAMPLE / e.image) for e in entries], captions, txt2img,
        eval_transform(IMAGE_SIZE), CaptionTokenizer(max_length=30, padding="max_length"),
        image_batch_size=batch, text_batch_size=160,
    )
    model = build_model()
    image_embeds, text_embeds, masks = [], [], []
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for b in stream:  # image batches first, then caption batches, in index order
            if "image" in b:
                image_embeds.append(model.encode_image(b["image"]))
            else:
                text_embeds.append(model.encode_text(b["input_ids"], b["attention_mask"]))
                masks.append(b["attention_mask"])
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    torch.save({"image_embeds": torch.cat(image_embeds), "text_embeds": torch.cat(text_embeds),
                "text_mask": torch.cat(masks), "txt2img": txt2img}, out)
    return {"embed_seconds": seconds, "embed_cpu_seconds": cpu, "num_images": len(entries),
            "num_texts": len(captions)}


def child_rank(mode: str, embeds: Path, k_test: int, fusion_batch: int, repeats: int) -> dict:
    """Rank a saved set with one method; time, peak-memory growth and R@K."""
    from albef_pl.metrics import retrieval_recall
    from albef_pl.rerank import exhaustive_itm_scores, two_stage_scores

    model = build_model()
    data = torch.load(embeds)
    ie, te, mask = data["image_embeds"], data["text_embeds"], data["text_mask"]
    txt2img = data["txt2img"]
    img2txt = [[j for j, i in enumerate(txt2img) if i == k] for k in range(ie.shape[0])]
    with torch.no_grad():
        fi, ft = model.image_feature(ie), model.text_feature(te)

    before = _maxrss_mib()
    times, cpu_times, pairs = [], [], 0
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            if mode == "two_stage":
                s = two_stage_scores(model, fi, ft, ie, torch.arange(ie.shape[0]), te, mask,
                                     k_test=k_test, fusion_batch_size=fusion_batch)
                i2t, t2i, pairs = s.i2t, s.t2i, s.num_fusion_pairs
            else:
                i2t = exhaustive_itm_scores(model, ie, te, mask, fusion_batch_size=fusion_batch)
                t2i, pairs = i2t.T.contiguous(), i2t.numel()
        metrics = retrieval_recall(i2t, t2i, img2txt, txt2img)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    return {"rank_seconds": min(times), "rank_cpu_seconds": min(cpu_times), "fusion_pairs": pairs,
            "peak_rss_growth_mib": _maxrss_mib() - before, "peak_rss_mib": _maxrss_mib(),
            "r_mean": metrics["r_mean"], "txt_r1": metrics["txt_r1"], "img_r1": metrics["img_r1"]}


# ---------------------------------------------------------------------------------------------
# Parent
def _run_child(args: list[str], threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", *args, "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "retrieval_eval.json")
    p.add_argument("--sizes", type=int, nargs="+", default=[30, 60, 120])
    p.add_argument("--k-test", type=int, default=16, help="two-stage candidates per query")
    p.add_argument("--fusion-batch", type=int, default=64)
    p.add_argument("--image-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (1: a busy 2-core machine otherwise stalls)")
    p.add_argument("--quick", action="store_true", help="sizes 30 and 60, one repeat")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.child:
        kind, *rest = args.child
        if kind == "embed":
            result = child_embed(int(rest[0]), Path(rest[1]), args.image_batch)
        else:
            result = child_rank(kind, Path(rest[0]), args.k_test, args.fusion_batch, args.repeats)
        print(json.dumps(result))
        return 0

    if not KARPATHY.is_file():
        print(f"COCO sample not found at {COCO_SAMPLE}; nothing to measure", file=sys.stderr)
        return 1
    sizes = [30, 60] if args.quick else args.sizes
    repeats = 1 if args.quick else args.repeats
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"embeds_{n}.pt"
            embed = _run_child(["embed", str(n), str(path), "--image-batch",
                                str(args.image_batch)], args.threads)
            for mode in MODES:
                rank = _run_child([mode, str(path), "--k-test", str(args.k_test),
                                   "--fusion-batch", str(args.fusion_batch),
                                   "--repeats", str(repeats)], args.threads)
                row = {"images": embed["num_images"], "captions": embed["num_texts"],
                       "mode": mode, "embed_seconds": embed["embed_seconds"],
                       "embed_cpu_seconds": embed["embed_cpu_seconds"], **rank}
                row["eval_seconds"] = row["embed_seconds"] + row["rank_seconds"]
                row["eval_cpu_seconds"] = row["embed_cpu_seconds"] + row["rank_cpu_seconds"]
                rows.append(row)
                _print_row(row)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"k_test": args.k_test, "fusion_batch": args.fusion_batch,
                "image_size": IMAGE_SIZE, "threads": args.threads, "repeats": repeats,
                "memory": "growth of ru_maxrss (peak RSS) while ranking, fresh process each",
                "machine": platform.platform(), "cpus": torch.get_num_threads(),
                "torch": torch.__version__}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    print(f"\nwritten to {args.out}")
    return 0


_HEADER = False


def _print_row(row: dict) -> None:
    global _HEADER
    if not _HEADER:
        print(f"{'images':>6} {'captions':>8} {'mode':>10} {'pairs':>7} {'embed s':>8} "
              f"{'rank s':>7} {'eval s':>7} {'eval cpu s':>10} {'peak RSS +MiB':>13} "
              f"{'r_mean':>7}")
        _HEADER = True
    print(f"{row['images']:>6} {row['captions']:>8} {row['mode']:>10} {row['fusion_pairs']:>7} "
          f"{row['embed_seconds']:>8.2f} {row['rank_seconds']:>7.2f} {row['eval_seconds']:>7.2f} "
          f"{row['eval_cpu_seconds']:>10.2f} {row['peak_rss_growth_mib']:>13.1f} "
          f"{row['r_mean']:>7.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
