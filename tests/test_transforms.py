"""Image transforms: the reference op set and magnitudes, invariants, reduced JPEG decoding."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from shard_helpers import SHARED

from albef_pl.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    RANDOM_AUGMENT_OPS,
    RandomAugment,
    RandomResizedCropRGB,
    ResizeRGB,
    eval_transform,
    finetune_transform,
    normalize_images,
    pretrain_transform,
)

GOLDEN = SHARED / "golden"


def jpeg(img: Image.Image, quality: int = 92) -> Image.Image:
    """Encode and reopen lazily, as the data pipeline does."""
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def gradient_image(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            np.full((height, width, 1), 90.0),
        ],
        axis=2,
    )
    return Image.fromarray(rgb.astype(np.uint8))


def test_op_set_and_magnitudes_match_the_reference() -> None:
    assert RANDOM_AUGMENT_OPS == (
        "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
        "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
    )  # fmt: skip
    ra = RandomAugment()
    assert (ra.num_ops, ra.magnitude, ra.prob, ra.fill) == (2, 7, 0.5, 128)
    assert ra.op_magnitude("Brightness") == pytest.approx(1.36)
    assert ra.op_magnitude("Sharpness") == pytest.approx(1.36)
    assert ra.op_magnitude("ShearX") == pytest.approx(0.21)
    assert ra.op_magnitude("TranslateY") == pytest.approx(7.0)
    assert ra.op_magnitude("Rotate") == pytest.approx(21.0)
    with pytest.raises(ValueError):
        RandomAugment(ops=["Color"])


@pytest.mark.parametrize("op", RANDOM_AUGMENT_OPS)
def test_no_op_changes_hue(op: str) -> None:
    """On a solid red image every pixel stays red (scaled at most) or becomes the grey fill."""
    ra = RandomAugment()
    img = Image.new("RGB", (32, 32), (200, 30, 30))
    for sign in (1.0, -1.0):
        out = np.asarray(ra.apply_op(img, op, sign)).astype(int)
        assert out.shape == (32, 32, 3)
        assert (out[..., 1] == out[..., 2]).all()  # green == blue: no tint
        red = out[..., 0] > out[..., 1]
        grey = (out[..., 0] == 128) & (out[..., 1] == 128)
        assert (red | grey).all()
        if op not in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
            assert red.all()
        if op == "Brightness":
            assert out[0, 0].tolist() == [255, 40, 40]  # x1.36 (clipped, truncated), both signs


def test_translate_moves_by_seven_pixels_and_fills_grey() -> None:
    ra = RandomAugment()
    arr = np.zeros((16, 32, 3), np.uint8)
    arr[:, 20] = 255
    out = np.asarray(ra.apply_op(Image.fromarray(arr), "TranslateX", 1.0))
    assert out[0, 13].tolist() == [255, 255, 255] and out[0, 20].tolist() == [0, 0, 0]
    assert (out[:, -7:] == 128).all()
    out = np.asarray(ra.apply_op(Image.fromarray(arr), "TranslateX", -1.0))
    assert out[0, 27].tolist() == [255, 255, 255] and (out[:, :7] == 128).all()


def test_random_augment_draws_follow_torch_seed() -> None:
    img = gradient_image(48, 40)
    ra = RandomAugment()
    torch.manual_seed(3)
    first = [np.asarray(ra(img)) for _ in range(8)]
    torch.manual_seed(3)
    second = [np.asarray(ra(img)) for _ in range(8)]
    assert all((a == b).all() for a, b in zip(first, second, strict=True))
    assert any((a != np.asarray(img)).any() for a in first)  # something was applied
    assert all(a.shape == (40, 48, 3) for a in first)
    # Only identity ops, always applied: the image is untouched.
    assert (np.asarray(RandomAugment(ops=["Identity"], prob=1.0)(img)) == np.asarray(img)).all()


def test_train_transforms_output_and_normalisation() -> None:
    img = gradient_image(80, 60)
    for tf, size in ((pretrain_transform(32), 32), (finetune_transform(24), 24)):
        out = tf(img)
        assert out.shape == (3, size, size) and out.dtype == torch.float32
    black = eval_transform(8)(Image.new("RGB", (20, 10), (0, 0, 0)))
    expected = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    assert torch.allclose(black[:, 0, 0], expected)
    crop = pretrain_transform(32).transforms[0]
    assert isinstance(crop, RandomResizedCropRGB) and crop.scale == (0.2, 1.0)
    assert finetune_transform().transforms[0].scale == (0.5, 1.0)
    assert pretrain_transform(32, augment=False)(img).equal(eval_transform(32)(img))


def test_eval_transform_is_deterministic_and_converts_modes() -> None:
    img = gradient_image(50, 30)
    tf = eval_transform(16)
    assert tf(img).equal(tf(img))
    assert tf(img.convert("L")).shape == (3, 16, 16)
    assert tf(img.convert("RGBA")).shape == (3, 16, 16)



def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.array(
        [[0, 255, 256, 4660], [32768, 65280, 65535, 1000],
         [512, 767, 768, 30000], [9, 99, 999, 9999]],
        dtype=np.uint16,
    )
    expected = (values // 256).astype(np.uint8)  # e.g. 65535 -> 255, 32768 -> 128, 4660 -> 18
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")  # a 16-bit grayscale PNG
    png = Image.open(io.BytesIO(buffer.getvalue()))  # lazily, as the data pipeline opens it
    assert png.mode == "I;16"

    # Same size: the resize copies the pixels, so the tensor holds the scaled values.
    out = eval_transform(4, normalize=False)(png)
    assert out.dtype == torch.uint8 and out.shape == (3, 4, 4)
    for channel in out:
        assert channel.numpy().tolist() == expected.tolist()

    # Mode "I" within 0..65535 is scaled the same way.
    as_i = Image.fromarray(values.astype(np.int32))
    assert as_i.mode == "I"
    assert np.asarray(ResizeRGB(4)(as_i))[..., 1].tolist() == expected.tolist()

    # Mode "I" outside 0..65535 is stretched from its own range: (v + 1000) * 255 / 100000.
    wide = Image.fromarray(np.array([[-1000, 0], [99000, 49000]], dtype=np.int32))
    assert np.asarray(ResizeRGB(2)(wide))[..., 2].tolist() == [[0, 3], [255, 128]]


def test_reduced_decode_only_changes_resampling() -> None:
    big = gradient_image(1024, 768)

    # Eval resize: 1024x768 -> 128 decodes at 1/4 (256x192), still >= 128 on both sides.
    full, reduced = ResizeRGB(128, reduced_decode=False), ResizeRGB(128, reduced_decode=True)
    a = np.asarray(full(jpeg(big))).astype(float)
    b = np.asarray(reduced(jpeg(big))).astype(float)
    assert (reduced.num_reduced, full.num_reduced) == (1, 0)
    assert np.abs(a - b).mean() < 1.5 and np.abs(a - b).max() < 12

    # Random crop: the same box (same torch seed) in full and reduced coordinates.
    for seed in range(5):
        crops = []
        for flag in (False, True):
            torch.manual_seed(seed)
            crops.append(np.asarray(RandomResizedCropRGB(96, reduced_decode=flag)(jpeg(big))))
        assert np.abs(crops[0].astype(float) - crops[1]).mean() < 2.0

    # Too small to shrink (or already decoded, or not a JPEG): nothing changes.
    small = ResizeRGB(256, reduced_decode=True)
    small(jpeg(gradient_image(400, 300)))
    loaded = jpeg(big)
    loaded.load()
    small_big = ResizeRGB(64, reduced_decode=True)
    small_big(loaded)
    small_big(big)
    assert small.num_reduced == 0 and small_big.num_reduced == 0


@pytest.mark.skipif(
    not (GOLDEN / "albef_tiny_io.json").is_file(), reason=f"no golden files in {GOLDEN}"
)
def test_eval_transform_matches_the_official_test_transform() -> None:
    from safetensors.torch import load_file

    inputs = json.loads((GOLDEN / "albef_tiny_io.json").read_text())["inputs"]
    expected = load_file(str(GOLDEN / "albef_tiny_io.safetensors"))["image"]
    root = SHARED / "data" / "coco_sample"
    tf = eval_transform(32, reduced_decode=False)
    images = torch.stack([tf(Image.open(root / f)) for f in inputs["image_files"]])
    assert torch.equal(images, expected)
    # With reduced decoding (1/8 scale here) only the resampling differs.
    tf = eval_transform(32, reduced_decode=True)
    images = torch.stack([tf(Image.open(root / f)) for f in inputs["image_files"]])
    assert (images - expected).abs().mean() < 0.06


def test_batch_normalisation_equals_the_per_image_transform() -> None:
    img = gradient_image(40, 30)
    per_image = eval_transform(16)(img)
    raw = eval_transform(16, normalize=False)(img)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 16, 16)
    assert torch.equal(normalize_images(raw[None])[0], per_image)
    torch.manual_seed(1)
    a = pretrain_transform(16)(img)
    torch.manual_seed(1)
    b = normalize_images(pretrain_transform(16, normalize=False)(img))
    assert torch.equal(a, b)
