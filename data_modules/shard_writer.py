"""Write image-caption pairs as WebDataset shards (the ``albef-pl-shards`` command).

Inputs: ALBEF-style json files (``[{"image", "caption": str | [str], "image_id"?}]``), COCO
captions json (``captions_*.json``), or a folder of images with same-stem ``.txt`` files
(one caption per line). Entries of the same image become one sample whose ``json`` member
holds the list of captions (the data modules draw one per use).

Output, in ``--out``: ``<prefix>-000000.tar``, ... with members ``<key>.<jpg|png|webp>``
(the original bytes, never re-encoded) and ``<key>.json`` (``captions``, ``image``,
``image_id``); ``sizes.json`` (``{shard name: samples, "total": n}``); ``skipped.json`` (each
image left out, with the reason); ``manifest.json`` (a fingerprint of the input).

Keys are the sample's index among the input images sorted by path, so they do not depend
on the order of the input files. Tar headers carry fixed times and owners, so the same
input always gives byte-identical shards; a re-run whose input fingerprint matches the
manifest writes nothing, and any other run rewrites the whole set and removes stale shards.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

_logger = logging.getLogger(__name__)

__all__ = [
    "InputError",
    "WriterSample",
    "WriteResult",
    "check_image",
    "main",
    "samples_from_albef_json",
    "samples_from_coco",
    "samples_from_folder",
    "write_shards",
]

_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_MANIFEST_VERSION = 1


@dataclass
class WriterSample:
    """One image and all its captions.

    Attributes:
        image: Path of the image file.
        captions: Captions in input order.
        image_id: Identifier from the input, when it has one.
    """

    image: Path
    captions: list[str] = field(default_factory=list)
    image_id: Any = None


@dataclass
class WriteResult:
    """What a writer run did.

    Attributes:
        sizes: Samples per shard file name.
        skipped: ``{"image", "reason"}`` for each image left out (input entries the reader
            left out, such as COCO annotations of unknown images, have their own fields).
        up_to_date: True when nothing was written because the output matched the input.
    """

    sizes: dict[str, int]
    skipped: list[dict[str, Any]]
    up_to_date: bool = False

    @property
    def total(self) -> int:
        """Samples written."""
        return sum(self.sizes.values())


# ---------------------------------------------------------------------------------------
# input readers

_ALBEF_LAYOUT = 'a json list of {"image": relative path, "caption": string or list of strings}'
_COCO_LAYOUT = (
    'a COCO captions object: {"images": [{"id", "file_name"}], '
    '"annotations": [{"image_id", "caption"}]}'
)


#: Skipped images named one by one in the log; every one is listed in ``skipped.json``.
NAMED_SKIPS = 20


class InputError(ValueError):
    """An input file that cannot be used; the message names the file, entry and layout."""


def _short(obj: Any, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_json(path: str | Path, layout: str) -> Any:
    """Parse a json file, or raise :class:`InputError` with the file, line and layout."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text (byte {err.start}); expected {layout}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path}: not valid json at line {err.lineno}, column {err.colno} ({err.msg}); "
            f"expected {layout}"
        ) from err


def _group(entries: Iterable[tuple[Path, list[str], Any]]) -> list[WriterSample]:
    by_image: dict[Path, WriterSample] = {}
    for image, captions, image_id in entries:
        sample = by_image.setdefault(image, WriterSample(image))
        sample.captions.extend(captions)
        if sample.image_id is None:
            sample.image_id = image_id
    return list(by_image.values())


def _as_list(caption: Any) -> list[str]:
    if isinstance(caption, str):
        return [caption]
    if isinstance(caption, list):
        return [c for c in caption if isinstance(c, str)]
    return []


def samples_from_albef_json(
    paths: Sequence[str | Path], image_root: str | Path
) -> list[WriterSample]:
    """Read ALBEF-style json lists: ``{"image": relative path, "caption": str | [str]}``.

    Args:
        paths: Json files.
        image_root: Directory the image paths are relative to (absolute paths stay).

    Returns:
        One sample per distinct image, captions of all its entries gathered.

    Raises:
        InputError: A file that does not parse or is not laid out as above.
    """
    root = Path(image_root)
    entries = []
    for path in paths:
        data = _load_json(path, _ALBEF_LAYOUT)
        if not isinstance(data, list):
            raise InputError(f"{path}: expected {_ALBEF_LAYOUT}; got a json {type(data).__name__}")
        for index, entry in enumerate(data):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise InputError(
                    f"{path}: entry {index} has no \"image\" path string: {_short(entry)}; "
                    f"expected {_ALBEF_LAYOUT}"
                )
            image = root / entry["image"]
            entries.append((image, _as_list(entry.get("caption")), entry.get("image_id")))
    return _group(entries)


def samples_from_coco(
    path: str | Path, image_root: str | Path, skipped: list[dict[str, Any]] | None = None
) -> list[WriterSample]:
    """Read a COCO captions file (``images`` with ``file_name``, ``annotations``).

    An image whose ``id`` repeats an earlier image's is left out (its annotations go to the
    first image with that id), and an annotation whose ``image_id`` is not among the images
    is left out; both are appended to ``skipped`` with the reason and logged.

    Args:
        path: ``captions_*.json``.
        image_root: Directory holding the ``file_name`` images.
        skipped: Receives one record per entry left out (pass it on to
            :func:`write_shards` as ``input_skipped`` so that ``skipped.json`` lists them).

    Returns:
        One sample per listed image (captions of all its annotations gathered).

    Raises:
        InputError: A file that does not parse or is not laid out as above.
    """
    data = _load_json(path, _COCO_LAYOUT)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        got = f"an object with keys {sorted(data)[:5]}" if isinstance(data, dict) else (
            f"a json {type(data).__name__}"
        )
        raise InputError(f"{path}: expected {_COCO_LAYOUT}; got {got}")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise InputError(f"{path}: \"annotations\" is not a list; expected {_COCO_LAYOUT}")

    left_out: list[dict[str, Any]] = []
    files: dict[Any, Path] = {}
    for index, img in enumerate(data["images"]):
        if not (isinstance(img, dict) and "id" in img and isinstance(img.get("file_name"), str)):
            raise InputError(
                f"{path}: images[{index}] needs \"id\" and a \"file_name\" string: "
                f"{_short(img)}; expected {_COCO_LAYOUT}"
            )
        image_id = img["id"]
        if image_id in files:
            left_out.append(
                {
                    "image": img["file_name"],
                    "image_id": _json_id(image_id),
                    "reason": f"duplicate image id: images[{index}] repeats the id of "
                    f"{files[image_id].name}, which gets the annotations",
                }
            )
            continue
        files[image_id] = Path(image_root) / img["file_name"]

    entries = [(files[i], [], i) for i in files]
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise InputError(
                f"{path}: annotations[{index}] has no \"image_id\": {_short(ann)}; "
                f"expected {_COCO_LAYOUT}"
            )
        if ann["image_id"] not in files:
            left_out.append(
                {
                    "annotation": ann.get("id", index),
                    "image_id": _json_id(ann["image_id"]),
                    "reason": f"image_id not in images: annotations[{index}]",
                }
            )
            continue
        entries.append((files[ann["image_id"]], _as_list(ann.get("caption")), ann["image_id"]))

    if left_out:
        reasons = collections.Counter(r["reason"].split(":")[0] for r in left_out)
        _logger.warning(
            "%s: left out %d entries %s, e.g. %s", path, len(left_out), dict(reasons), left_out[0]
        )
    if skipped is not None:
        skipped.extend(left_out)
    return _group(entries)


def samples_from_folder(folder: str | Path) -> list[WriterSample]:
    """Read images with a same-stem ``.txt`` file beside them (one caption per line).

    Args:
        folder: Directory searched recursively.

    Returns:
        One sample per image (an image without a ``.txt`` gets no captions and is skipped).
    """
    samples = []
    for image in sorted(Path(folder).rglob("*")):
        if image.suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        text = image.with_suffix(".txt")
        try:
            lines = text.read_text(encoding="utf-8").splitlines() if text.is_file() else []
        except UnicodeDecodeError as err:
            raise InputError(
                f"{text} is not UTF-8 text (byte {err.start}); expected one caption per line"
            ) from err
        samples.append(WriterSample(image, [line.strip() for line in lines if line.strip()]))
    return samples


# ---------------------------------------------------------------------------------------
# checking and writing


def check_image(path: str | Path) -> tuple[str | None, str | None]:
    """Check that an image file decodes and is stored in a format the loaders read.

    Runs PIL's ``verify`` and then a reduced-size full decode, which also catches
    truncated JPEG data that ``verify`` lets through.

    Args:
        path: Image file.

    Returns:
        (file extension to store it under, None) or (None, reason).
    """
    try:
        with Image.open(path) as img:
            fmt = img.format
            img.verify()
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except FileNotFoundError:
        return None, "file not found"
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        return None, f"does not decode: {err!r}"
    if fmt not in _FORMAT_EXT:
        return None, f"unsupported format {fmt} (the loaders read JPEG, PNG and WebP)"
    return _FORMAT_EXT[fmt], None


def _fingerprint(
    samples: list[WriterSample],
    samples_per_shard: int,
    prefix: str,
    input_skipped: Sequence[dict[str, Any]] = (),
) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([_MANIFEST_VERSION, samples_per_shard, prefix]).encode())
    if input_skipped:  # only then, so that earlier outputs stay up to date
        digest.update(json.dumps(list(input_skipped), ensure_ascii=False, default=str).encode())
    for s in samples:
        try:
            stat = s.image.stat()
            file_id = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            file_id = None
        record = [str(s.image), s.captions, str(s.image_id), file_id]
        digest.update(json.dumps(record, ensure_ascii=False).encode())
    return digest.hexdigest()


def _relative(image: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return image.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return image.as_posix()


def _json_id(image_id: Any) -> Any:
    return image_id if isinstance(image_id, (int, str)) or image_id is None else str(image_id)


def _up_to_date(out: Path, fingerprint: str) -> WriteResult | None:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        sizes = json.loads((out / "sizes.json").read_text())
        skipped = json.loads((out / "skipped.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    shards = {k: v for k, v in sizes.items() if k.endswith(".tar")}
    if manifest.get("fingerprint") != fingerprint or not all((out / k).is_file() for k in shards):
        return None
    return WriteResult(shards, skipped, up_to_date=True)


def write_shards(
    samples: list[WriterSample],
    out: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    image_root: str | Path | None = None,
    workers: int = 1,
    force: bool = False,
    input_skipped: Sequence[dict[str, Any]] = (),
) -> WriteResult:
    """Check the images and write the samples as shards with sizes and skipped lists.

    Args:
        samples: Samples from one of the readers.
        out: Output directory (created).
        samples_per_shard: Samples per tar file.
        prefix: Shard file name prefix.
        image_root: Stored image paths are made relative to it.
        workers: Processes used to check images.
        force: Rewrite even if the manifest says the output is up to date.
        input_skipped: Entries the reader left out (e.g. COCO annotations of unknown
            images), listed first in ``skipped.json`` and counted in the manifest.

    Returns:
        The shard sizes and the skipped images.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = sorted(samples, key=lambda s: str(s.image))
    fingerprint = _fingerprint(samples, samples_per_shard, prefix, input_skipped)
    if not force and (done := _up_to_date(out, fingerprint)) is not None:
        _logger.info("%s is up to date (%d samples); nothing written", out, done.total)
        return done

    # Check every image (in parallel if asked); keys are indices in the sorted list.
    paths = [s.image for s in samples]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            checks = list(pool.map(check_image, paths, chunksize=64))
    else:
        checks = [check_image(p) for p in paths]

    skipped: list[dict[str, Any]] = [dict(record) for record in input_skipped]
    kept: list[tuple[int, WriterSample, str]] = []
    root = Path(image_root) if image_root is not None else None
    for index, (sample, (ext, reason)) in enumerate(zip(samples, checks)):
        captions = [c for c in sample.captions if c.strip()]
        if reason is None and not captions:
            reason = "no caption"
        if reason is not None:
            skipped.append({"image": _relative(sample.image, root), "reason": reason})
            if len(skipped) <= NAMED_SKIPS:
                _logger.warning("skipping %s: %s", sample.image, reason)
            elif len(skipped) == NAMED_SKIPS + 1:
                _logger.warning("more images skipped; all are listed in %s",
                                out / "skipped.json")
            continue
        sample.captions = captions
        kept.append((index, sample, ext))

    existing = sorted(out.glob(f"{prefix}-*.tar"))
    if not kept and existing:
        # Nothing readable (often a wrong --image-root): never replace good shards by nothing.
        raise InputError(
            f"no readable image among {len(samples)} inputs, so the {len(existing)} existing "
            f"shards in {out} were left untouched; check --image-root ({image_root})"
        )
    sizes: dict[str, int] = {}
    for start in range(0, len(kept), samples_per_shard):
        name = f"{prefix}-{start // samples_per_shard:06d}.tar"
        chunk = kept[start : start + samples_per_shard]
        _write_tar(out / name, chunk, root)
        sizes[name] = len(chunk)

    for stale in sorted(out.glob(f"{prefix}-*.tar")):
        if stale.name not in sizes:
            _logger.info("removing stale shard %s", stale)
            stale.unlink()
    _write_json(out / "sizes.json", {**sizes, "total": sum(sizes.values())})
    _write_json(out / "skipped.json", skipped)
    reasons = collections.Counter(s["reason"].split(":")[0] for s in skipped)
    _write_json(
        out / "manifest.json",
        {
            "fingerprint": fingerprint,
            "samples_per_shard": samples_per_shard,
            "prefix": prefix,
            "samples": sum(sizes.values()),
            "skipped": dict(reasons),
        },
    )
    _logger.info(
        "wrote %d samples in %d shards to %s; skipped %d images or entries %s",
        sum(sizes.values()),
        len(sizes),
        out,
        len(skipped),
        dict(reasons),
    )
    return WriteResult(sizes, skipped)


def _write_tar(path: Path, chunk: list[tuple[int, WriterSample, str]], root: Path | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        # Fixed mtime and owner: the same input gives byte-identical tar files.
        with wds.TarWriter(stream, encoder=False, mtime=0.0, user="albef", group="albef") as tar:
            for index, sample, ext in chunk:
                meta = {
                    "captions": sample.captions,
                    "image": _relative(sample.image, root),
                    "image_id": _json_id(sample.image_id),
                }
                tar.write(
                    {
                        "__key__": f"{index:09d}",
                        ext: sample.image.read_bytes(),
                        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                    }
                )
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="albef-pl-shards",
        description="Write image-caption pairs as WebDataset shards (original image bytes).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--json", nargs="+", type=Path, help="ALBEF-style json file(s)")
    source.add_argument("--coco-captions", type=Path, help="COCO captions_*.json")
    source.add_argument("--folder", type=Path, help="folder of images with same-stem .txt")
    parser.add_argument("--image-root", type=Path, help="directory image paths are relative to")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument("--workers", type=int, default=1, help="processes checking images")
    parser.add_argument("--force", action="store_true", help="rewrite even if up to date")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``albef-pl-shards``.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        Process exit status (0 on success, even with skipped images; 1 when nothing was
        written; 2 for an input file that cannot be used, with a one-line error).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    input_skipped: list[dict[str, Any]] = []
    try:
        if args.json:
            root = args.image_root if args.image_root is not None else Path(".")
            samples = samples_from_albef_json(args.json, root)
        elif args.coco_captions:
            if args.image_root is None:
                parser.error("--coco-captions needs --image-root")
            root = args.image_root
            samples = samples_from_coco(args.coco_captions, root, skipped=input_skipped)
        else:
            root = args.folder
            samples = samples_from_folder(args.folder)
    except InputError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2

    try:
        result = write_shards(
            samples,
            args.out,
            samples_per_shard=args.samples_per_shard,
            prefix=args.prefix,
            image_root=root,
            workers=args.workers,
            force=args.force,
            input_skipped=input_skipped,
        )
    except InputError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if result.total == 0:
        _logger.error(
            "no sample written to %s: every image was missing or unreadable (see %s). Image "
            "paths are resolved against --image-root (here %s); pass the folder the json's "
            "paths are relative to.", args.out, Path(args.out) / "skipped.json", Path(root).resolve()
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
