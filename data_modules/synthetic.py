"""Synthetic captioned shapes, written as shards: data for demos and tests without downloads.

Each image shows one or two coloured shapes (circle, square or triangle; small or large)
on a light background, and its caption says exactly what is shown, for example
``a small red circle left of a large blue square`` or ``a large green triangle at the
top``. Every word is in the bert-base-uncased vocabulary. Run::

    python -m data_modules.synthetic --out data/demo --num-train 2000 --num-val 200

to get ``data/demo/shards`` and ``data/demo/val_shards``, each with a ``sizes.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

_logger = logging.getLogger(__name__)

__all__ = ["COLORS", "SHAPES", "Scene", "draw_scene", "main", "random_scene", "write_split"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.11, "large": 0.2}  # radius as a fraction of the side
# Where a lone shape sits, and how a second shape relates to the first.
PLACES: dict[str, tuple[float, float]] = {
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
}
RELATIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left of": ((0.25, 0.5), (0.75, 0.5)),
    "right of": ((0.75, 0.5), (0.25, 0.5)),
    "above": ((0.5, 0.25), (0.5, 0.75)),
    "below": ((0.5, 0.75), (0.5, 0.25)),
}


@dataclass(frozen=True)
class Shape:
    """One drawn shape: kind, colour name, size name and centre (fractions of the side)."""

    kind: str
    color: str
    size: str
    center: tuple[float, float]

    def phrase(self) -> str:
        """``a small red circle``."""
        return f"a {self.size} {self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """Shapes to draw and the caption that describes them."""

    shapes: tuple[Shape, ...]
    caption: str


def random_scene(rng: random.Random, jitter: float = 0.06) -> Scene:
    """Draw a random scene of one or two shapes with its exact caption.

    Args:
        rng: Random generator.
        jitter: Random shift of each centre, as a fraction of the side.

    Returns:
        The scene.
    """

    def shape(center: tuple[float, float], avoid: Shape | None = None) -> Shape:
        while True:
            moved = (
                center[0] + rng.uniform(-jitter, jitter),
                center[1] + rng.uniform(-jitter, jitter),
            )
            new = Shape(
                rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)), moved
            )
            # Two identical shapes would make "a red circle left of a red circle" ambiguous.
            if avoid is None or (new.kind, new.color, new.size) != (
                avoid.kind,
                avoid.color,
                avoid.size,
            ):
                return new

    if rng.random() < 0.35:
        place = rng.choice(list(PLACES))
        only = shape(PLACES[place])
        return Scene((only,), f"{only.phrase()} {place}")

    relation = rng.choice(list(RELATIONS))
    first_at, second_at = RELATIONS[relation]
    first = shape(first_at)
    second = shape(second_at, avoid=first)
    return Scene((first, second), f"{first.phrase()} {relation} {second.phrase()}")


def draw_scene(scene: Scene, image_size: int = 64, background: int = 235) -> Image.Image:
    """Render a scene as an RGB image.

    Args:
        scene: What to draw.
        image_size: Side length in pixels.
        background: Grey level of the background.

    Returns:
        The image.
    """
    img = Image.new("RGB", (image_size, image_size), (background,) * 3)
    draw = ImageDraw.Draw(img)
    for shape in scene.shapes:
        cx, cy = shape.center[0] * image_size, shape.center[1] * image_size
        r = SIZES[shape.size] * image_size
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.kind == "square":
            side = r * 0.9  # the same area impression as the circle
            draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return img


def _encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpg":
        img.save(buffer, format="JPEG", quality=90)
    else:
        img.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_split(
    out: str | Path,
    num_samples: int,
    seed: int,
    image_size: int = 64,
    samples_per_shard: int = 500,
    image_format: str = "png",
) -> dict[str, int]:
    """Write one split of synthetic scenes as shards plus ``sizes.json``.

    Args:
        out: Output directory.
        num_samples: Number of images.
        seed: Seed of the scene draws (the same seed gives the same shards).
        image_size: Side length in pixels.
        samples_per_shard: Samples per tar file.
        image_format: ``"png"`` (exact colours) or ``"jpg"``.

    Returns:
        Samples per shard file name.
    """
    if image_format not in ("png", "jpg"):
        raise ValueError("image_format must be 'png' or 'jpg'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes: dict[str, int] = {}
    for start in range(0, num_samples, samples_per_shard):
        name = f"synthetic-{start // samples_per_shard:06d}.tar"
        count = min(samples_per_shard, num_samples - start)
        tmp = out / (name + ".tmp")
        with open(tmp, "wb") as stream:
            with wds.TarWriter(
                stream, encoder=False, mtime=0.0, user="albef", group="albef"
            ) as tar:
                for index in range(start, start + count):
                    scene = random_scene(rng)
                    meta = {
                        "caption": scene.caption,
                        "image_id": index,
                        "shapes": [[s.kind, s.color, s.size] for s in scene.shapes],
                    }
                    tar.write(
                        {
                            "__key__": f"{index:09d}",
                            image_format: _encode(draw_scene(scene, image_size), image_format),
                            "json": json.dumps(meta).encode("utf-8"),
                        }
                    )
        os.replace(tmp, out / name)
        sizes[name] = count
    (out / "sizes.json").write_text(json.dumps({**sizes, "total": num_samples}, indent=1) + "\n")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write ``<out>/shards`` (train) and ``<out>/val_shards``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--format", choices=("png", "jpg"), default="png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    for split, count, seed in (
        ("shards", args.num_train, args.seed),
        ("val_shards", args.num_val, args.seed + 1_000_003),
    ):
        if count <= 0:
            continue
        sizes = write_split(
            args.out / split, count, seed, args.image_size, args.samples_per_shard, args.format
        )
        _logger.info("wrote %d samples in %d shards to %s", count, len(sizes), args.out / split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
