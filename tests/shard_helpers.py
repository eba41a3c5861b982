"""Tiny images and tar shards written in tmp_path for the data tests."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

SHARED = Path(__file__).parents[1].parent / "shared"
COCO_SAMPLE = SHARED / "data" / "coco_sample"


def image_bytes(
    color: tuple[int, int, int] = (200, 30, 30), size: int = 24, fmt: str = "PNG"
) -> bytes:
    """A solid-colour image encoded as PNG or JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_jpeg(size: int = 64) -> bytes:
    """A JPEG with its second half cut off (PIL raises 'image file is truncated')."""
    buffer = io.BytesIO()
    img = Image.effect_noise((size, size), 64).convert("RGB")
    img.save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    """Write the members in the given order (which may be deliberately wrong)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(
    key: str,
    caption: str | list[str],
    image_id: int | None = None,
    color: tuple[int, int, int] = (200, 30, 30),
) -> list[tuple[str, bytes]]:
    """An image plus a json caption member (a list stays a list)."""
    meta: dict = {"captions" if isinstance(caption, list) else "caption": caption}
    if image_id is not None:
        meta["image_id"] = image_id
    return [(f"{key}.png", image_bytes(color)), (f"{key}.json", json.dumps(meta).encode())]


def write_good_shards(
    directory: Path,
    counts: Sequence[int],
    prefix: str = "shard",
    sizes_file: bool = True,
    first_id: int = 0,
) -> list[Path]:
    """Shards of valid samples with consecutive image ids, plus sizes.json."""
    paths, next_id, sizes = [], first_id, {}
    for index, count in enumerate(counts):
        members = []
        for _ in range(count):
            color = (next_id % 256, 100, 200)
            members += sample_members(f"{next_id:06d}", f"a photo number {next_id}", next_id, color)
            next_id += 1
        path = write_tar(directory / f"{prefix}-{index:06d}.tar", members)
        paths.append(path)
        sizes[path.name] = count
    if sizes_file:
        (directory / "sizes.json").write_text(json.dumps({**sizes, "total": sum(counts)}))
    return paths
