"""Grounding evaluation cost: box scoring against the Grad-CAM pass it follows.

``GroundingTask.ground`` scores each expression's proposals one at a time on the CPU
(:func:`albef_pl.grounding.best_box`: bicubic upsampling of the (h, w) map to the image's
size, a summed-area table, one lookup per box, and the inclusive IoU with the ground
truth). This measures, on this machine:

- ``box``: milliseconds per expression of that scoring, for a 24 x 24 map (384 px, 16 px
  patches, the paper's setting) upsampled to COCO-size images (640 x 480 and 640 x 640),
  with 10, 30 and 100 proposals (RefCOCO+ detections per image are in the tens);
- ``gradcam``: milliseconds per expression of the Grad-CAM pass itself (unimodal encoders
  without gradient, fusion forward and backward to the ITM cross-attention of block 8), for
  the paper's model (ViT-B/16 at 384 px, BERT-base 6 + 6, random weights: cost does not
  depend on them) at batch 8 and text length 30 — or for the sample recipe's small model
  with ``--small``;
- the ratio, and the box scoring's total over RefCOCO+'s evaluation splits (val 10,758,
  testA 5,726, testB 4,889 expressions).

Times are the median of ``--repeats`` runs, in wall-clock and in process CPU seconds (the
latter robust to other load on a shared machine).

Usage::

    python benchmarks/bench_grounding_boxes.py --out bench_results/grounding_boxes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from albef_pl.grounding import best_box, box_iou_inclusive, gradcam
from albef_pl.models import ALBEF, TextConfig, VisionConfig

REFCOCO_PLUS_EVAL_EXPRESSIONS = 10_758 + 5_726 + 4_889


def _timed(fn, repeats: int) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def _proposals(k: int, width: int, height: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(k, 2, generator=gen) * torch.tensor([width * 0.8, height * 0.8])
    wh = 10 + torch.rand(k, 2, generator=gen) * torch.tensor([width * 0.5, height * 0.5])
    return torch.cat([xy, wh], dim=1)


def bench_boxes(repeats: int, per_call: int = 20) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for width, height in ((640, 480), (640, 640)):
        for k in (10, 30, 100):
            cams = torch.rand(per_call, 24, 24, generator=gen)
            boxes = [_proposals(k, width, height, gen) for _ in range(per_call)]
            gt = _proposals(1, width, height, gen)

            def run() -> None:
                for cam, props in zip(cams, boxes):
                    i, _ = best_box(cam, props, width, height)
                    box_iou_inclusive(props, gt)[i].item()

            t = _timed(run, repeats)
            rows.append({"image": f"{width}x{height}", "proposals": k,
                         "wall_ms": 1e3 * t["wall_s"] / per_call,
                         "cpu_ms": 1e3 * t["cpu_s"] / per_call})
    return rows


def bench_gradcam(repeats: int, small: bool, batch: int = 8, length: int = 30) -> dict:
    if small:  # conf/finetune/grounding_sample.yaml's sizes (MiniLM's shape, random weights)
        vision = VisionConfig(img_size=160, patch_size=16, embed_dim=192, depth=4, num_heads=3)
        text = TextConfig(pretrained=None, hidden_size=384, num_hidden_layers=6,
                          num_attention_heads=12, intermediate_size=1536, num_text_layers=3)
        block, name = 4, "sample (ViT 160 px width 192, MiniLM-shaped 3 + 3)"
    else:
        vision, text = VisionConfig(img_size=384), TextConfig(pretrained=None)
        block, name = 8, "paper (ViT-B/16 384 px, BERT-base 6 + 6)"
    torch.manual_seed(0)
    model = ALBEF(vision=vision, text=text, init_weights=False).eval()
    image = torch.randn(batch, 3, vision.img_size, vision.img_size)
    ids = torch.randint(1000, 2000, (batch, length))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    # block_num counts BERT layers over text then fusion (8: the third fusion layer of 6 + 6,
    # the original's setting; 4: the second of the sample's 3 + 3).
    t = _timed(lambda: gradcam(model, image, ids, mask, "itm", block), repeats)
    return {"model": name, "batch": batch, "length": length,
            "wall_ms": 1e3 * t["wall_s"] / batch, "cpu_ms": 1e3 * t["cpu_s"] / batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small", action="store_true",
                   help="Grad-CAM of the sample recipe's model instead of the paper's")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)

    boxes = bench_boxes(args.repeats)
    cam = bench_gradcam(max(2, args.repeats // 2), args.small)
    print(f"Grad-CAM pass, {cam['model']}, batch {cam['batch']}: "
          f"{cam['wall_ms']:.1f} ms wall / {cam['cpu_ms']:.1f} ms CPU per expression")
    print(f"{'image':>9} {'proposals':>9} {'box ms':>8} {'CPU ms':>8} {'of Grad-CAM':>12} "
          f"{'RefCOCO+ eval s':>16}")
    for r in boxes:
        r["share_of_gradcam"] = r["cpu_ms"] / cam["cpu_ms"]
        r["refcoco_plus_eval_s"] = r["cpu_ms"] * REFCOCO_PLUS_EVAL_EXPRESSIONS / 1e3
        print(f"{r['image']:>9} {r['proposals']:>9} {r['wall_ms']:8.2f} {r['cpu_ms']:8.2f} "
              f"{100 * r['share_of_gradcam']:11.1f}% {r['refcoco_plus_eval_s']:16.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"gradcam": cam, "boxes": boxes}, indent=2))


if __name__ == "__main__":
    main()
