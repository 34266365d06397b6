"""Per-image keys: the content hash (exact duplicates) and a 64-bit perceptual hash (near
duplicates), computed once per distinct image file, in worker processes when asked.

pHash: grey 32x32, 2-D DCT, the 8x8 lowest frequencies less the DC term against their median.
It survives re-encoding and resizing, which change the low frequencies little, but not crops
(a 6 % crop per side moves 6-18 of 64 bits). So each image is also hashed at centred crops
(`dedup.image.crops`, e.g. 0.9 and 0.8 of each side) and an image's full hash is compared with
the others' crop hashes: a centred crop of 5-10 % per side then lands within 0-8 bits. Crops off
centre are left to the semantic stage.
dHash: grey 9x8, one bit per horizontal gradient sign (cheaper, more collisions).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

HASH_KINDS = ("phash", "dhash")


@dataclass(frozen=True)
class ImageKeys:
    """What the duplicate stages need of one image file; `error` set when it cannot be read."""

    path: str  # as the entry names it
    sha256: str = ""
    phash: int = 0
    crop_hashes: tuple[int, ...] = ()  # one per `crops` scale
    error: str = ""


@lru_cache(maxsize=1)
def _dct_matrix(n: int = 32) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


def _bits(mask: np.ndarray) -> int:
    return int.from_bytes(np.packbits(mask.astype(np.uint8).ravel()).tobytes(), "big")


def perceptual_hash(image: Image.Image, kind: str = "phash") -> int:
    """A 64-bit perceptual hash of the image (see the module docstring)."""
    grey = image.convert("L")
    if kind == "dhash":
        pixels = np.asarray(grey.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.float32)
        return _bits(pixels[:, 1:] > pixels[:, :-1])
    pixels = np.asarray(grey.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    dct = _dct_matrix() @ pixels @ _dct_matrix().T
    low = dct[:8, :8].ravel()
    return _bits(low > np.median(low[1:]))


def centre_crop(image: Image.Image, scale: float) -> Image.Image:
    """The centred part of the image, `scale` of each side."""
    w, h = image.size
    dw, dh = (w - w * scale) / 2, (h - h * scale) / 2
    return image.crop((round(dw), round(dh), round(w - dw), round(h - dh)))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def image_keys(
    path: str, root: str, kind: str = "phash", crops: tuple[float, ...] = ()
) -> ImageKeys:
    """Hashes of `root/path`; an unreadable file gives `error`, never an exception."""
    file = Path(root) / path
    try:
        data = file.read_bytes()
    except OSError as err:
        return ImageKeys(path, error=f"missing_image: {err.strerror or err}")
    try:
        with Image.open(file) as image:
            image.load()
            phash = perceptual_hash(image, kind)
            crop_hashes = tuple(perceptual_hash(centre_crop(image, s), kind) for s in crops)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        return ImageKeys(path, error=f"corrupt_image: {err}")
    return ImageKeys(path, hashlib.sha256(data).hexdigest(), phash, crop_hashes)
