"""The shard writer (albef-pl-shards) and the synthetic shapes generator."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from shard_helpers import COCO_SAMPLE, image_bytes, truncated_jpeg

from data_modules import synthetic
from data_modules.shard_writer import (
    check_image,
    main,
    samples_from_coco,
    samples_from_folder,
)


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def tar_json(path: Path) -> dict[str, dict]:
    with tarfile.open(path) as tar:
        return {
            m.name.split(".")[0]: json.loads(tar.extractfile(m).read())
            for m in tar.getmembers()
            if m.name.endswith(".json")
        }


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture
def albef_input(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "images"
    root.mkdir()
    for i in range(5):
        (root / f"img{i}.jpg").write_bytes(image_bytes((40 * i, 10, 10), fmt="JPEG"))
    (root / "pic.png").write_bytes(image_bytes(fmt="PNG"))
    (root / "mislabelled.jpg").write_bytes(image_bytes(fmt="PNG"))  # PNG bytes, .jpg name
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "truncated.jpg").write_bytes(truncated_jpeg())
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    (root / "anim.gif").write_bytes(buffer.getvalue())

    entries = [
        {"image": f"img{i}.jpg", "caption": f"caption {i}a", "image_id": i} for i in range(5)
    ]
    entries += [{"image": "img0.jpg", "caption": "caption 0b", "image_id": 0}]  # same image
    entries += [{"image": "pic.png", "caption": ["list one", "list two"]}]
    entries += [{"image": "mislabelled.jpg", "caption": "a png really"}]
    entries += [
        {"image": "corrupt.jpg", "caption": "x"},
        {"image": "truncated.jpg", "caption": "y"},
    ]
    entries += [{"image": "anim.gif", "caption": "z"}, {"image": "missing.jpg", "caption": "w"}]
    entries += [{"image": "img4.jpg", "caption": "   "}]  # blank captions are dropped
    path = tmp_path / "train.json"
    path.write_text(json.dumps(entries))
    return path, root


def run_writer(albef_input: tuple[Path, Path], out: Path, *extra: str) -> int:
    path, root = albef_input
    args = ["--json", str(path), "--image-root", str(root), "--out", str(out)]
    return main([*args, "--samples-per-shard", "3", *extra])


def test_writer_groups_captions_sizes_match_and_skips_are_listed(albef_input, tmp_path) -> None:
    out = tmp_path / "shards"
    assert run_writer(albef_input, out) == 0

    sizes = json.loads((out / "sizes.json").read_text())
    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for shard in shards:
        assert sizes[shard.name] == len(tar_members(shard)) // 2
    assert sizes["total"] == 7 == sum(v for k, v in sizes.items() if k.endswith(".tar"))

    skipped = {s["image"]: s["reason"] for s in json.loads((out / "skipped.json").read_text())}
    assert set(skipped) == {"anim.gif", "corrupt.jpg", "missing.jpg", "truncated.jpg"}
    assert skipped["missing.jpg"] == "file not found"
    assert skipped["anim.gif"].startswith("unsupported format GIF")
    assert "truncated" in skipped["truncated.jpg"]

    # Keys are indices of the images sorted by path; bytes are stored as they are.
    meta = {k: v for shard in shards for k, v in tar_json(shard).items()}
    by_image = {m["image"]: (k, m) for k, m in meta.items()}
    assert by_image["img0.jpg"][1]["captions"] == ["caption 0a", "caption 0b"]
    assert by_image["img0.jpg"][1]["image_id"] == 0
    assert by_image["pic.png"][1]["captions"] == ["list one", "list two"]
    assert by_image["img4.jpg"][1]["captions"] == ["caption 4a"]
    # Sorted paths: anim.gif, corrupt.jpg, img0.jpg, ..., img4.jpg, mislabelled.jpg, ...
    assert by_image["img0.jpg"][0] == "000000002"
    members = [n for s in shards for n in tar_members(s)]
    assert "000000007.png" in members  # mislabelled.jpg holds PNG bytes: stored as png
    with tarfile.open(shards[0]) as tar:
        stored = tar.extractfile(f"{by_image['img0.jpg'][0]}.jpg").read()
    assert stored == (albef_input[1] / "img0.jpg").read_bytes()


def test_second_run_adds_nothing_and_rewrites_identically(albef_input, tmp_path, caplog) -> None:
    out = tmp_path / "shards"
    run_writer(albef_input, out)
    before = digests(out)
    with caplog.at_level(logging.INFO, logger="data_modules"):
        assert run_writer(albef_input, out) == 0
    assert "up to date" in caplog.text
    assert digests(out) == before
    assert run_writer(albef_input, out, "--force") == 0  # a real rewrite: same bytes
    assert digests(out) == before

    # Fewer samples per shard then more: stale shards disappear, nothing is duplicated.
    run_writer(albef_input, out, "--samples-per-shard", "2")
    run_writer(albef_input, out, "--samples-per-shard", "100")
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]
    assert len(tar_members(out / "shard-000000.tar")) == 14


def test_coco_and_folder_inputs(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    root.mkdir()
    for i in (1, 2):
        (root / f"{i:012d}.jpg").write_bytes(image_bytes(fmt="JPEG"))
    coco = {
        "images": [
            {"id": 1, "file_name": f"{1:012d}.jpg"},
            {"id": 2, "file_name": f"{2:012d}.jpg"},
        ],
        "annotations": [
            {"image_id": 2, "id": 10, "caption": "two a"},
            {"image_id": 1, "id": 11, "caption": "one a"},
            {"image_id": 2, "id": 12, "caption": "two b"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    samples = {s.image.name: s for s in samples_from_coco(tmp_path / "captions.json", root)}
    assert samples[f"{2:012d}.jpg"].captions == ["two a", "two b"]
    assert samples[f"{1:012d}.jpg"].image_id == 1

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_bytes())
    (folder / "a.txt").write_text("first line\n\nsecond line\n")
    (folder / "b.webp").write_bytes(image_bytes(fmt="WEBP"))
    (folder / "b.txt").write_text("a webp image")
    (folder / "c.jpg").write_bytes(image_bytes(fmt="JPEG"))  # no caption file
    found = {s.image.name: s.captions for s in samples_from_folder(folder)}
    assert found == {
        "a.png": ["first line", "second line"],
        "b.webp": ["a webp image"],
        "c.jpg": [],
    }
    assert main(["--folder", str(folder), "--out", str(tmp_path / "out")]) == 0
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert skipped == [{"image": "c.jpg", "reason": "no caption"}]
    assert check_image(folder / "b.webp") == ("webp", None)


@pytest.mark.skipif(not COCO_SAMPLE.is_dir(), reason=f"COCO sample not found at {COCO_SAMPLE}")
def test_coco_captions_file_of_the_sample(tmp_path: Path) -> None:
    samples = samples_from_coco(
        COCO_SAMPLE / "captions_val2017_subset.json", COCO_SAMPLE / "images"
    )
    assert len(samples) == 134 and all(len(s.captions) >= 5 for s in samples)


def test_synthetic_shapes_are_fast_exact_and_deterministic(tmp_path: Path) -> None:
    assert (
        synthetic.main(
            [
                "--out",
                str(tmp_path / "a"),
                "--num-train",
                "300",
                "--num-val",
                "40",
                "--samples-per-shard",
                "128",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    sizes = json.loads((tmp_path / "a" / "shards" / "sizes.json").read_text())
    assert sizes == {
        "synthetic-000000.tar": 128,
        "synthetic-000001.tar": 128,
        "synthetic-000002.tar": 44,
        "total": 300,
    }
    assert json.loads((tmp_path / "a" / "val_shards" / "sizes.json").read_text())["total"] == 40
    synthetic.write_split(tmp_path / "b", 300, seed=5, samples_per_shard=128)
    assert digests(tmp_path / "a" / "shards") == digests(tmp_path / "b")

    # The caption says what is drawn: check the colour at each shape's centre.
    import random

    rng = random.Random(0)
    for _ in range(50):
        scene = synthetic.random_scene(rng)
        img = synthetic.draw_scene(scene, 64)
        words = scene.caption.split()
        for shape in scene.shapes:
            assert shape.kind in words and shape.color in words and shape.size in words
            x, y = (int(c * 64) for c in shape.center)
            assert img.getpixel((x, y)) == synthetic.COLORS[shape.color]
        if len(scene.shapes) == 2:
            a, b = scene.shapes
            relation = " ".join(words[4:-4])  # "a small red circle <relation> a large ..."
            dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
            expected = {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}
            assert expected[relation]


def test_wrong_image_root_never_replaces_good_shards(tmp_path, capsys):
    import json

    import pytest
    from PIL import Image

    from data_modules.shard_writer import InputError, samples_from_albef_json, write_shards

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img/a.png")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "img/a.png", "caption": "a red square"}]))
    out = tmp_path / "shards"
    write_shards(samples_from_albef_json([ann], tmp_path), out, samples_per_shard=4)
    before = sorted(p.name for p in out.glob("*.tar"))
    with pytest.raises(InputError, match="left untouched"):
        write_shards(samples_from_albef_json([ann], tmp_path / "wrong"), out,
                     samples_per_shard=4, image_root=tmp_path / "wrong")
    assert sorted(p.name for p in out.glob("*.tar")) == before
    # The command says it in one line (exit 2), not a traceback.
    args = ["--json", str(ann), "--image-root", str(tmp_path / "wrong"), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("albef-pl-shards: error: no readable image among 1 inputs")
    assert sorted(p.name for p in out.glob("*.tar")) == before


def test_skipped_images_beyond_the_first_twenty_are_listed_not_logged(tmp_path, caplog):
    import json

    from data_modules.shard_writer import NAMED_SKIPS, samples_from_albef_json, write_shards

    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": f"gone{k}.png", "caption": "x"} for k in range(30)]))
    write_shards(samples_from_albef_json([ann], tmp_path), tmp_path / "out", samples_per_shard=4,
                 image_root=tmp_path)
    named = [r for r in caplog.records if r.getMessage().startswith("skipping ")]
    assert len(named) == NAMED_SKIPS == 20
    assert "more images skipped; all are listed in" in caplog.text
    listed = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert len(listed if isinstance(listed, list) else listed["skipped"]) == 30


def test_malformed_input_files_exit_with_one_line_errors(tmp_path: Path, capsys) -> None:
    def run(flag: str, content: str | None, name: str = "input.json") -> str:
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        args = [flag, str(path), "--image-root", str(tmp_path), "--out", str(tmp_path / "out")]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err
        assert err.startswith("albef-pl-shards: error: ") and str(path) in err
        return err

    albef = 'a json list of {"image": relative path, "caption": string or list of strings}'
    err = run("--json", '[\n {"image": "a.jpg", "caption": "x"},\n {"image": }\n]')
    assert "not valid json at line 3, column 12" in err and err.endswith(f"expected {albef}")
    assert "got a json dict" in run("--json", '{"image": "a.jpg"}')
    err = run("--json", json.dumps([{"image": "a.jpg", "caption": "x"}, {"caption": "no image"}]))
    assert "entry 1 has no \"image\" path string: {'caption': 'no image'}" in err
    assert "cannot read" in run("--json", None, name="missing.json")
    (tmp_path / "latin1.json").write_bytes('[{"image": "é"}]'.encode("latin-1"))
    assert "is not UTF-8 text (byte 12)" in run("--json", None, name="latin1.json")

    coco = "a COCO captions object"
    err = run("--coco-captions", "[1, 2]")
    assert f"expected {coco}" in err and err.endswith("got a json list")
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2}]
    err = run("--coco-captions", json.dumps({"images": images}))
    assert "images[1] needs \"id\" and a \"file_name\" string: {'id': 2}" in err
    bad_ann = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"caption": "x"}]}
    err = run("--coco-captions", json.dumps(bad_ann))
    assert "annotations[0] has no \"image_id\": {'caption': 'x'}" in err
    assert "not valid json at line 1, column 2" in run("--coco-captions", "{oops")


def test_coco_unknown_image_ids_and_duplicate_ids_are_recorded(tmp_path: Path, caplog) -> None:
    root = tmp_path / "coco"
    root.mkdir()
    for name in ("one.jpg", "two.jpg", "two_again.jpg"):
        (root / name).write_bytes(image_bytes(fmt="JPEG"))
    coco = {
        "images": [
            {"id": 1, "file_name": "one.jpg"},
            {"id": 2, "file_name": "two.jpg"},
            {"id": 2, "file_name": "two_again.jpg"},  # the id of two.jpg again
        ],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "one"},
            {"image_id": 2, "id": 11, "caption": "two"},
            {"image_id": 3, "id": 12, "caption": "no such image"},
            {"image_id": 9, "id": 13, "caption": "nor this one"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    args = ["--coco-captions", str(tmp_path / "captions.json"), "--image-root", str(root)]
    with caplog.at_level(logging.WARNING, logger="data_modules"):
        assert main([*args, "--out", str(out)]) == 0
    assert json.loads((out / "sizes.json").read_text())["total"] == 2
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped == [
        {
            "image": "two_again.jpg",
            "image_id": 2,
            "reason": "duplicate image id: images[2] repeats the id of two.jpg, which gets "
            "the annotations",
        },
        {"annotation": 12, "image_id": 3, "reason": "image_id not in images: annotations[2]"},
        {"annotation": 13, "image_id": 9, "reason": "image_id not in images: annotations[3]"},
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"duplicate image id": 1, "image_id not in images": 2}
    assert "captions.json: left out 3 entries" in caplog.text
    captions = {m["image"]: m["captions"] for m in tar_json(out / "shard-000000.tar").values()}
    assert captions == {"one.jpg": ["one"], "two.jpg": ["two"]}

    # The same input again is up to date; an input change only in left-out entries is not.
    with caplog.at_level(logging.INFO, logger="data_modules"):
        assert main([*args, "--out", str(out)]) == 0
    assert "is up to date" in caplog.text
    caplog.clear()
    coco["annotations"].pop()
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    with caplog.at_level(logging.INFO, logger="data_modules"):
        assert main([*args, "--out", str(out)]) == 0
    assert "is up to date" not in caplog.text
    assert len(json.loads((out / "skipped.json").read_text())) == 2
