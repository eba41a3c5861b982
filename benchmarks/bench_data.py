"""Data throughput: decode + augment per image, full vs reduced JPEG decode, and the loader.

Measures, on the real COCO JPEGs of ``../shared/data/coco_sample``:

1. decode + transform in one process with one torch thread (what one dataloader worker
   does), at ``--image-size`` (256 by default), with full and with reduced-size JPEG
   decoding, interleaved in the same run: the pre-training transform and the evaluation
   transform on the photos as they are (mostly 640x480), and the pre-training transform on
   the same photos re-encoded at twice the size (1280x960, like raw web images);
2. the whole pre-training loader (shards written from ``albef_train.json``, tar reading,
   shuffling, decode, augment, tokenization, collation) with 0, 1 and 2 workers.

Usage::

    python benchmarks/bench_data.py --out bench_results/data.json [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from albef_pl.transforms import eval_transform, pretrain_transform

ROOT = Path(__file__).resolve().parents[1]
COCO_SAMPLE = ROOT.parent / "shared" / "data" / "coco_sample"
_logger = logging.getLogger("bench_data")


def _upscaled(blobs: list[bytes], factor: int = 2) -> list[bytes]:
    out = []
    for blob in blobs:
        img = Image.open(io.BytesIO(blob)).convert("RGB")
        img = img.resize((img.width * factor, img.height * factor), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _one_pass(blobs: list[bytes], transform: Callable) -> float:
    start = time.perf_counter()
    for blob in blobs:
        transform(Image.open(io.BytesIO(blob)))
    return len(blobs) / (time.perf_counter() - start)


def bench_transforms(blobs: list[bytes], image_size: int, repeats: int) -> list[dict]:
    """Images per second of decode + transform, full vs reduced decode, interleaved."""
    big = _upscaled(blobs)
    scenarios = [
        ("pretrain", "coco as is", blobs, pretrain_transform),
        ("eval", "coco as is", blobs, lambda s, reduced_decode: eval_transform(s, reduced_decode)),
        ("pretrain", "coco x2 (web size)", big, pretrain_transform),
    ]
    rows = []
    for name, source, data, factory in scenarios:
        rates: dict[bool, list[float]] = {False: [], True: []}
        transforms = {flag: factory(image_size, reduced_decode=flag) for flag in rates}
        for flag in rates:  # warm-up pass (file cache, allocator)
            _one_pass(data[:16], transforms[flag])
        for _ in range(repeats):
            for flag in (False, True):
                torch.manual_seed(0)
                rates[flag].append(_one_pass(data, transforms[flag]))
        first = transforms[True].transforms[0]
        reduced_share = first.num_reduced / (repeats * len(data) + 16)
        sizes = Image.open(io.BytesIO(data[0])).size
        for flag in (False, True):
            rows.append(
                {
                    "transform": name,
                    "source": f"{source}, e.g. {sizes[0]}x{sizes[1]}",
                    "decode": "reduced" if flag else "full",
                    "images_per_s": statistics.median(rates[flag]),
                    "runs": [round(r, 1) for r in rates[flag]],
                    "share_decoded_reduced": reduced_share if flag else 0.0,
                }
            )
    return rows


def _albef_pairs(images: Path) -> tuple[list[dict], Path]:
    """The sample's real captions when benchmarking its images, else placeholder captions."""
    train_json = COCO_SAMPLE / "albef_train.json"
    if train_json.is_file() and images.resolve() == (COCO_SAMPLE / "images").resolve():
        return json.loads(train_json.read_text()), COCO_SAMPLE  # paths are "images/..."
    files = sorted(p.name for p in images.glob("*.jpg"))
    pairs = [{"image": f, "caption": f"a photo {i}", "image_id": i} for i, f in enumerate(files)]
    return pairs, images


def bench_loader(
    images: Path, image_size: int, batch_size: int, batches: int, workers: list[int]
) -> list[dict]:
    """Images per second of the whole pre-training loader, after its first batch."""
    from data_modules import PretrainDataModule
    from data_modules.shard_writer import samples_from_albef_json, write_shards

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        entries, root = _albef_pairs(images)
        pairs = Path(tmp) / "pairs.json"
        pairs.write_text(json.dumps(entries))
        result = write_shards(
            samples_from_albef_json([pairs], root), Path(tmp) / "shards", samples_per_shard=32
        )
        for num_workers in workers:
            dm = PretrainDataModule(
                train_shards=str(Path(tmp) / "shards"),
                num_train_samples=batch_size * (batches + 1),
                batch_size=batch_size,
                num_workers=num_workers,
                image_size=image_size,
                shuffle_buffer=64,
            )
            loader = dm.train_dataloader()
            start = time.perf_counter()
            iterator = iter(loader)
            next(iterator)
            first = time.perf_counter() - start
            start = time.perf_counter()
            count = sum(len(batch["image"]) for batch in iterator)
            rate = count / (time.perf_counter() - start)
            rows.append(
                {
                    "num_workers": num_workers,
                    "images_per_s": rate,
                    "first_batch_s": first,
                    "images": count,
                    "samples_in_shards": result.total,
                }
            )
    return rows


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=COCO_SAMPLE / "images")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loader-batches", type=int, default=12)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="one repeat, fewer batches")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.repeats, args.loader_batches = 1, 4

    files = sorted(args.images.glob("*.jpg"))
    if not files:
        _logger.error("no JPEG files in %s (the COCO sample lives in ../shared/data)", args.images)
        return 1
    blobs = [f.read_bytes() for f in files]

    main_threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    torch.set_num_threads(1)  # as inside a dataloader worker
    transform_rows = bench_transforms(blobs, args.image_size, args.repeats)
    torch.set_num_threads(main_threads)  # the loader's main process runs as a user's would
    workers = [int(w) for w in args.workers.split(",")]
    loader_rows = bench_loader(
        args.images, args.image_size, args.batch_size, args.loader_batches, workers
    )

    print(
        f"decode + augment, one process, one torch thread, {args.image_size} px, "
        f"{len(blobs)} COCO JPEGs x {args.repeats} (median images/s)"
    )
    print(_table(
        ["transform", "source", "decode", "images/s", "decoded reduced"],
        [[r["transform"], r["source"], r["decode"], f"{r['images_per_s']:.0f}",
          f"{100 * r['share_decoded_reduced']:.0f}%"] for r in transform_rows],
    ))  # fmt: skip
    print()
    print(
        f"whole pre-training loader, batch {args.batch_size}, {args.image_size} px, "
        f"{os.cpu_count()} CPUs, {main_threads} torch threads in the main process, "
        f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(_table(
        ["workers", "images/s", "first batch (s)"],
        [[str(r["num_workers"]), f"{r['images_per_s']:.0f}", f"{r['first_batch_s']:.2f}"]
         for r in loader_rows],
    ))  # fmt: skip

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "image_size": args.image_size,
            "images": len(blobs),
            "repeats": args.repeats,
            "decode_augment": transform_rows,
            "loader": loader_rows,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "pillow": Image.__version__,
                "main_process_torch_threads": main_threads,
                # Other processes compete for the CPUs: read the numbers with this in mind.
                "load_average_1min": [load_before, os.getloadavg()[0]],
            },
        }
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
