"""The image transform an encoder owns: the data pipeline receives it, it never imports models.

Reproduces the transformers image processors exactly (max abs diff 0 against the PIL backend,
`CLIPImageProcessorPil` / `SiglipImageProcessorPil`, the processors LLaVA was trained with; the
default torchvision backend resamples slightly differently): CLIP resizes the shortest edge
(bicubic) and centre-crops with floor offsets; SigLIP resizes to size x size, no crop. LLaVA's
`pad` aspect mode first expands the image to a square filled with the mean colour (its
`expand2square`), so no part of a wide image is cropped away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class ImageTransform:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shortest_edge"  # "shortest_edge" (then centre crop) | "exact"
    aspect: str = "pad"  # "pad" (LLaVA expand-to-square) | "resize" | "crop"
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resize not in ("shortest_edge", "exact"):
            raise ValueError(
                f"encoder.transform.resize must be shortest_edge|exact, got {self.resize!r}"
            )
        if self.aspect not in ("pad", "resize", "crop"):
            raise ValueError(
                f"encoder.transform.aspect must be pad|resize|crop, got {self.aspect!r}"
            )
        if self.resample not in _RESAMPLE:
            raise ValueError(f"encoder.transform.resample must be one of {sorted(_RESAMPLE)}")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, size, size) float tensor, normalised."""
        return self.normalize(self.geometry(image))

    def geometry(self, image: Image.Image) -> Image.Image:
        """The pixel-moving part (RGB, pad, resize, crop): an RGB image of size x size.

        Applying the transform to its own output changes nothing here, which lets `vlmlab shards
        --presize` store this result and the loader skip the work with identical pixel values.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.aspect == "pad":
            image = expand_to_square(image, tuple(int(m * 255) for m in self.mean))
        if self.resize == "exact" or self.aspect == "resize":
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), _RESAMPLE[self.resample])
        else:
            image = _resize_shortest_edge(image, self.size, _RESAMPLE[self.resample])
            image = _center_crop(image, self.size)
        return image

    def normalize(self, image: Image.Image) -> torch.Tensor:
        """RGB uint8 -> (3, H, W) float32 via a per-channel lookup table: the same float32
        arithmetic as `(x / 255 - mean) / std` (bit-identical), about 3x faster."""
        planes = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))
        return normalize_planes(planes, self.mean, self.std)


_CHANNEL_OFFSETS = np.array([0, 256, 512], dtype=np.uint16)[:, None, None]


def normalize_planes(
    planes: np.ndarray, mean: Sequence[float], std: Sequence[float], shared: bool = False
) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 `(x / 255 - mean) / std`, bit-identical, by table lookup
    (one lookup for a whole stack of images, e.g. AnyRes tiles or a batch).

    `shared`: the result is written straight into shared memory. In a DataLoader worker a
    tensor crosses to the main process through shared memory; one made elsewhere is copied
    there first (a second pass over 4 bytes per pixel, about as slow as the lookup)."""
    table = _normalize_table(tuple(mean), tuple(std))
    index = planes + _CHANNEL_OFFSETS
    if not shared:
        return torch.from_numpy(table[index])
    storage = torch.UntypedStorage._new_shared(index.size * 4)  # type: ignore[attr-defined]
    out = torch.empty(0, dtype=torch.float32).set_(storage).view(index.shape)
    np.take(table, index, out=out.numpy())
    return out


def to_planes(images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
    """What a transform's `geometry` returns -> uint8 (3, H, W), or (K, 3, H, W) for a list of
    equal-size images (AnyRes tiles). The loader's workers send these, a quarter of the float
    bytes, and normalise a whole batch at once (`normalize_planes`): the same values."""
    if isinstance(images, Image.Image):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(2, 0, 1)))
    stacked = np.stack([np.asarray(image) for image in images])
    return torch.from_numpy(np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)))


@lru_cache(maxsize=16)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3 * 256,) float32: the normalised value of every uint8 level, channel by channel."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return ((levels[None, :] - m) / s).astype(np.float32).reshape(-1)


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA's `pad` mode: centre the image on a square canvas of the mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _resize_shortest_edge(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize(new_size, resample)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left = (width - size) // 2  # floor, as transformers' center_crop (torchvision rounds)
    top = (height - size) // 2
    return image.crop((left, top, left + size, top + size))
