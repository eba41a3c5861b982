"""Image transforms of ALBEF: random resized crop, flip, a colour-safe RandAugment, CLIP stats.

The pre-training and fine-tuning transforms follow the reference recipe: RandomResizedCrop
(bicubic), horizontal flip, :class:`RandomAugment` restricted to ten operations that leave
colours alone (captions name colours), ``ToTensor`` and normalisation with CLIP's mean and
standard deviation. The evaluation transform resizes to a square.

Both the crop and the resize accept a PIL image that has been opened but not decoded yet.
For JPEG files they can then ask the decoder for a 1/2, 1/4 or 1/8 scale image (PIL's
``Image.draft``) whenever the region that will be kept still has at least the output
resolution at that scale, so the model sees the same content, resampled differently.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms as T

_logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "RANDOM_AUGMENT_OPS",
    "RandomAugment",
    "RandomResizedCropRGB",
    "ResizeRGB",
    "eval_transform",
    "finetune_transform",
    "grounding_transform",
    "normalize_images",
    "pretrain_transform",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# The reference's operation set: no Color, Contrast, Solarize, Posterize or Cutout.
RANDOM_AUGMENT_OPS: tuple[str, ...] = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
_MAX_LEVEL = 10.0
_SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})

# NOTE: reduced-size JPEG decoding is on by default because it measured faster where it
# applies and costs nothing where it does not (benchmarks/bench_data.py, one process, 256 px):
# photos re-encoded at web size (1280x960) went from 57 to 84 images/s with 80% decoded
# at 1/2 scale; COCO's 640x480 photos cropped to 256 px can rarely shrink (1% of draws),
# so they decode at full size and run at the same speed (94 vs 96 images/s). It changes
# only the resampling path: the same region reaches the model at the same resolution.
DEFAULT_REDUCED_DECODE = True


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """A 16-bit ("I;16*") or 32-bit integer ("I") grayscale image scaled to mode "L".

    PIL's ``convert`` clips such values to 255 instead of scaling them, which turns almost
    every pixel of a 16-bit PNG white. "I;16" values are divided by 256. "I" (what older
    PIL versions and some TIFFs give for 16-bit files) is scaled the same way when its
    values lie in 0..65535, else stretched linearly from its own min..max to 0..255.
    """
    values = np.asarray(img)
    if img.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        low, high = int(values.min()), int(values.max())
        scaled = (values.astype(np.float64) - low) * (255.0 / max(high - low, 1))
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    return Image.fromarray((values.astype(np.int64) >> 8).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "I" or img.mode.startswith("I;16"):
        img = _to_8bit_gray(img)
    return img.convert("RGB")


def _reduce_decode(img: Image.Image, min_width: float, min_height: float) -> float:
    """Ask a not-yet-decoded JPEG for the smallest DCT scale that keeps the given size.

    Returns:
        The factor from original to decoded pixel coordinates (1, 1/2, 1/4 or 1/8).
    """
    width, height = img.size
    request = (max(1, math.ceil(min_width)), max(1, math.ceil(min_height)))
    if img.format != "JPEG" or request[0] * 2 > width or request[1] * 2 > height:
        return 1.0
    result = img.draft("RGB", request)
    if result is None:
        return 1.0
    _, box = result
    return box[2] / width


class RandomResizedCropRGB:
    """RandomResizedCrop (bicubic) to an RGB square, optionally with reduced JPEG decoding.

    The crop box is drawn exactly as ``torchvision.transforms.RandomResizedCrop`` draws it,
    in the coordinates of the full image. With ``reduced_decode`` a JPEG that is still
    undecoded is decoded at the smallest of 1/8, 1/4, 1/2 scale at which the box keeps at
    least ``size`` pixels in both directions; the box is then mapped to that scale.

    Args:
        size: Output side length.
        scale: Range of the crop area relative to the image area.
        ratio: Range of the crop aspect ratio.
        reduced_decode: Allow reduced-size JPEG decoding.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        reduced_decode: bool = DEFAULT_REDUCED_DECODE,
    ) -> None:
        self.size = size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.reduced_decode = reduced_decode
        self.num_reduced = 0  # images decoded at reduced size in this process (for benchmarks)

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, height, width = T.RandomResizedCrop.get_params(
            img, list(self.scale), list(self.ratio)
        )

        # The crop must keep `size` pixels per side, so the image may shrink by size / crop.
        factor = 1.0
        if self.reduced_decode:
            full_w, full_h = img.size
            factor = _reduce_decode(img, full_w * self.size / width, full_h * self.size / height)
            self.num_reduced += factor < 1.0

        box = (left * factor, top * factor, (left + width) * factor, (top + height) * factor)
        img = _to_rgb(img)
        return img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, "
            f"ratio={tuple(round(r, 4) for r in self.ratio)}, "
            f"reduced_decode={self.reduced_decode})"
        )


class ResizeRGB:
    """Resize (bicubic, aspect ratio not kept) to an RGB square, optionally decoding reduced.

    Args:
        size: Output side length.
        reduced_decode: Allow reduced-size JPEG decoding when the image is at least twice
            ``size`` in both directions.
    """

    def __init__(self, size: int, reduced_decode: bool = DEFAULT_REDUCED_DECODE) -> None:
        self.size = size
        self.reduced_decode = reduced_decode
        self.num_reduced = 0

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.reduced_decode:
            self.num_reduced += _reduce_decode(img, self.size, self.size) < 1.0
        img = _to_rgb(img)
        return img.resize((self.size, self.size), Image.Resampling.BICUBIC)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, reduced_decode={self.reduced_decode})"


class RandomAugment:
    """RandAugment restricted to ALBEF's ten colour-preserving operations.

    Each call draws ``num_ops`` operations uniformly with replacement; each is then applied
    with probability ``prob`` at the fixed ``magnitude`` (out of 10): Brightness and
    Sharpness enhance by ``magnitude / 10 * 1.8 + 0.1`` (1.36 at 7, always brighter or
    sharper), shears are ``±magnitude / 10 * 0.3``, translations ``±magnitude`` pixels
    (absolute, whatever the image size), rotations ``±magnitude / 10 * 30`` degrees;
    geometric operations fill uncovered pixels with grey ``fill``. Randomness comes from
    torch's generator, so ``torch.manual_seed`` (and dataloader worker seeding) apply.

    Args:
        num_ops: Operations drawn per image.
        magnitude: Strength level, 0 to 10.
        ops: Operation names, a subset of :data:`RANDOM_AUGMENT_OPS` (default: all ten).
        prob: Probability of applying each drawn operation.
        fill: Grey level for pixels uncovered by geometric operations.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 7,
        ops: Sequence[str] | None = None,
        prob: float = 0.5,
        fill: int = 128,
    ) -> None:
        ops = tuple(ops) if ops is not None else RANDOM_AUGMENT_OPS
        unknown = sorted(set(ops) - set(RANDOM_AUGMENT_OPS))
        if unknown:
            raise ValueError(
                f"unknown RandomAugment ops {unknown}; choose from {RANDOM_AUGMENT_OPS}"
            )
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.ops = ops
        self.prob = prob
        self.fill = fill

    def op_magnitude(self, name: str) -> float:
        """The unsigned strength of an operation at this magnitude (0 for parameter-free ops).

        Args:
            name: Operation name.

        Returns:
            Enhance factor, shear factor, pixels or degrees, depending on the operation.
        """
        level = self.magnitude / _MAX_LEVEL
        if name in ("Brightness", "Sharpness"):
            return level * 1.8 + 0.1
        if name in ("ShearX", "ShearY"):
            return level * 0.3
        if name in ("TranslateX", "TranslateY"):
            return level * 10.0
        if name == "Rotate":
            return level * 30.0
        return 0.0

    def apply_op(self, img: Image.Image, name: str, sign: float = 1.0) -> Image.Image:
        """Apply one operation deterministically.

        Args:
            img: An RGB (or L) PIL image.
            name: Operation name.
            sign: +1 or -1, the direction of geometric operations (ignored by the others).

        Returns:
            The transformed image (same size and mode).
        """
        # Enhance factors are never mirrored: the reference only brightens and sharpens.
        value = self.op_magnitude(name) * (sign if name in _SIGNED_OPS else 1.0)
        fill = (self.fill,) * len(img.getbands())
        affine = {"resample": Image.Resampling.BILINEAR, "fillcolor": fill}
        if name == "Identity":
            return img
        if name == "AutoContrast":
            return ImageOps.autocontrast(img)
        if name == "Equalize":
            return ImageOps.equalize(img)
        if name == "Brightness":
            return ImageEnhance.Brightness(img).enhance(value)
        if name == "Sharpness":
            return ImageEnhance.Sharpness(img).enhance(value)
        if name == "ShearX":
            return img.transform(img.size, Image.Transform.AFFINE, (1, value, 0, 0, 1, 0), **affine)
        if name == "ShearY":
            return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, value, 1, 0), **affine)
        if name == "TranslateX":
            return img.transform(img.size, Image.Transform.AFFINE, (1, 0, value, 0, 1, 0), **affine)
        if name == "TranslateY":
            return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, value), **affine)
        if name == "Rotate":
            return img.rotate(value, **affine)
        raise ValueError(f"unknown RandomAugment op {name!r}")

    def __call__(self, img: Image.Image) -> Image.Image:
        picks = torch.randint(len(self.ops), (self.num_ops,)).tolist()
        for index in picks:
            if torch.rand(()).item() >= self.prob:
                continue
            sign = 1.0 if torch.rand(()).item() < 0.5 else -1.0
            img = self.apply_op(img, self.ops[index], sign)
        return img

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, "
            f"prob={self.prob}, ops={list(self.ops)})"
        )


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) to CLIP-normalised float32, as ToTensor + Normalize.

    The arithmetic is the same, in the same order (divide by 255, subtract the mean, divide
    by the std), so the result equals the per-image transform bit for bit; on a whole batch
    it is one vectorised pass instead of many small ones.

    Args:
        images: uint8 tensor with channels third from last.

    Returns:
        float32 tensor of the same shape.
    """
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return images.to(torch.float32).div(255).sub(mean).div(std)


def _to_tensor(normalize: bool) -> list[Callable]:
    if normalize:
        return [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return [T.PILToTensor()]  # uint8; normalise later, e.g. per batch with normalize_images


def pretrain_transform(
    image_size: int = 256,
    augment: bool = True,
    reduced_decode: bool = DEFAULT_REDUCED_DECODE,
    normalize: bool = True,
) -> T.Compose:
    """The pre-training transform: crop (scale 0.2-1), flip, RandomAugment(2, 7), normalise.

    Args:
        image_size: Output side length.
        augment: Include the crop, flip and RandomAugment; ``False`` gives the eval resize.
        reduced_decode: Allow reduced-size JPEG decoding.
        normalize: End with ToTensor + Normalize (float32); ``False`` ends with a uint8
            tensor for :func:`normalize_images`.

    Returns:
        A callable from a PIL image (decoded or not) to a tensor (3, S, S).
    """
    if not augment:
        return eval_transform(image_size, reduced_decode=reduced_decode, normalize=normalize)
    return _augmenting_transform(image_size, 0.2, reduced_decode, normalize)


def _augmenting_transform(
    image_size: int, min_scale: float, reduced_decode: bool, normalize: bool
) -> T.Compose:
    """Crop (area ``min_scale``-1), horizontal flip, RandomAugment(2, 7), to tensor."""
    return T.Compose(
        [
            RandomResizedCropRGB(image_size, scale=(min_scale, 1.0), reduced_decode=reduced_decode),
            T.RandomHorizontalFlip(),
            RandomAugment(2, 7),
            *_to_tensor(normalize),
        ]
    )


def finetune_transform(
    image_size: int = 384,
    reduced_decode: bool = DEFAULT_REDUCED_DECODE,
    normalize: bool = True,
) -> T.Compose:
    """The fine-tuning transform: as pre-training with crop scale 0.5-1 at 384 px.

    Args:
        image_size: Output side length.
        reduced_decode: Allow reduced-size JPEG decoding.
        normalize: End with ToTensor + Normalize (float32), else with a uint8 tensor.

    Returns:
        A callable from a PIL image (decoded or not) to a tensor (3, S, S).
    """
    return _augmenting_transform(image_size, 0.5, reduced_decode, normalize)


def eval_transform(
    image_size: int,
    reduced_decode: bool = DEFAULT_REDUCED_DECODE,
    normalize: bool = True,
) -> T.Compose:
    """The evaluation transform: bicubic resize to (S, S), normalise; deterministic.

    Args:
        image_size: Output side length.
        reduced_decode: Allow reduced-size JPEG decoding.
        normalize: End with ToTensor + Normalize (float32), else with a uint8 tensor.

    Returns:
        A callable from a PIL image (decoded or not) to a tensor (3, S, S).
    """
    return T.Compose([ResizeRGB(image_size, reduced_decode=reduced_decode), *_to_tensor(normalize)])


def grounding_transform(
    image_size: int = 384,
    hflip: bool = True,
    reduced_decode: bool = DEFAULT_REDUCED_DECODE,
    normalize: bool = True,
) -> T.Compose:
    """The grounding fine-tuning transform: resize to (S, S) without cropping (the referred
    object must stay in the picture), horizontal flip, RandomAugment(2, 7), normalise.

    Args:
        image_size: Output side length.
        hflip: Include the random horizontal flip (the original does, although expressions
            may say "left" or "right").
        reduced_decode: Allow reduced-size JPEG decoding.
        normalize: End with ToTensor + Normalize (float32), else with a uint8 tensor.

    Returns:
        A callable from a PIL image (decoded or not) to a tensor (3, S, S).
    """
    flip = [T.RandomHorizontalFlip()] if hflip else []
    return T.Compose([ResizeRGB(image_size, reduced_decode=reduced_decode), *flip,
                      RandomAugment(2, 7), *_to_tensor(normalize)])
