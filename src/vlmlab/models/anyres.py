"""AnyRes (LLaVA-NeXT) tiling: an image becomes an overview tile plus a grid of encoder-sized
tiles, and their features become one 2D token grid with a learned newline after every row.

Why its own module: the image side (tiles) runs in DataLoader workers, the feature side (pack)
in the model, and the token count both agree on is what `<image>` expands to; one file keeps the
three from drifting apart. It needs PIL and torch only and imports `vlmlab.visual` alone.

Two references disagree in details, so each is a named mode:
- `transformers` (default; HF export and eval must match it): `LlavaNextImageProcessorPil`
  and `LlavaNextModel.pack_image_features` (transformers 5.23). Pinpoints are (height, width),
  ties between equally good resolutions go to the first listed (336x336 -> 1 row, 2 columns),
  alpha is composited on white, unpad rounds `round(x, 7)` before truncating.
- `llava`: llava-torch's `process_anyres_image`, `get_anyres_image_grid_shape` (llava/mm_utils.py)
  and `unpad_image` + the `spatial_unpad` merge (llava/model/llava_arch.py, lines 100-128 and
  164-198). Pinpoints are (width, height) (336x336 -> 2 rows, 1 column), `convert('RGB')`,
  unpad truncates without rounding.
Both resize with bicubic keeping the aspect (ceil of the scaled short side), paste centred on
black, cut tiles row-major and prepend the whole image resized to one tile (the overview).

Image sizes here are PIL's (width, height), as everywhere in vlmlab (`visual.ImageSize`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

# The encoder's own lookup-table normalisation (bit-identical to transformers' rescale +
# normalize), applied to all tiles of an image at once: one float allocation, about 3x faster
# than normalising tile by tile and stacking.
from vlmlab.models.image_transform import normalize_planes
from vlmlab.visual import ImageSize, ImageTokens

AnyResMode = Literal["transformers", "llava"]
MODES: tuple[str, ...] = ("transformers", "llava")

# LLaVA-1.6 (LLaVA-NeXT) at 336 px; also `LlavaNextConfig()`'s default.
LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
)

_RANGE = re.compile(r"\((\d+)x(\d+)\)")


class UnusableImageError(ValueError):
    """An image AnyRes cannot turn into tokens; the data pipeline counts it as a skip.

    Raised before any work, from the image size alone, so a worker can skip a sample instead of
    crashing mid-epoch on a degenerate grid (zero rows or columns after unpad).
    """


def parse_grid_pinpoints(
    spec: str | Sequence[Sequence[int]], tile_size: int, max_tiles: int | None = None
) -> tuple[tuple[int, int], ...]:
    """Pinpoints from a list of pairs or LLaVA-OneVision's range form `"(1x1),...,(3x3)"`.

    The range form (LLaVA-NeXT `llava/mm_utils.py`, OneVision) spans every (i, j) from the first
    to the last pair, i outer, each multiplied by the tile size: `(1x1),...,(2x2)` at 336 gives
    336x336, 336x672, 672x336, 672x672. Pairs keep the order they are given in; which side is the
    height depends on the mode (see the module docstring), exactly as in the references.
    `max_tiles` (vlmlab's, no reference has it) drops pinpoints with more tiles, which bounds
    the encoder's work per image: `(1x1),...,(6x6)` with max_tiles=9 keeps 3x3 but not 2x5.
    """
    if isinstance(spec, str):
        matches = _RANGE.findall(spec)
        if not matches:
            raise ValueError(
                f"encoder.anyres.grid_pinpoints: {spec!r} is neither a list of [a, b] pairs nor "
                "a range like '(1x1),...,(3x3)'"
            )
        (a0, b0), (a1, b1) = map(int, matches[0]), map(int, matches[-1])
        pairs = [
            (i * tile_size, j * tile_size) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)
        ]
    else:
        pairs = []
        for item in spec:
            if len(item) != 2:
                raise ValueError(
                    f"encoder.anyres.grid_pinpoints: every entry is a pair, got {list(item)!r}"
                )
            pairs.append((int(item[0]), int(item[1])))
    if not pairs:
        raise ValueError("encoder.anyres.grid_pinpoints is empty: give at least one resolution")
    for a, b in pairs:
        if a < tile_size or b < tile_size or a % tile_size or b % tile_size:
            raise ValueError(
                f"encoder.anyres.grid_pinpoints: {a}x{b} is not a multiple of the tile size "
                f"{tile_size} (tiles are cut at the encoder's resolution)"
            )
    if max_tiles is not None:
        kept = [(a, b) for a, b in pairs if (a // tile_size) * (b // tile_size) <= max_tiles]
        if not kept:
            raise ValueError(
                f"encoder.anyres.max_tiles={max_tiles} leaves none of grid_pinpoints "
                f"{pairs}: raise it or add a smaller pinpoint"
            )
        pairs = kept
    return tuple(pairs)


def select_best_resolution(
    image_size: ImageSize, pinpoints: Sequence[tuple[int, int]], mode: AnyResMode
) -> ImageSize:
    """The pinpoint with the most image pixels kept (no upscaling credit), then the least waste.

    Returns (width, height). The same loop in both references; only how a pair is read differs,
    which decides ties (the first listed wins) and so the grid of square and tiny images.
    """
    width, height = image_size
    best: ImageSize | None = None
    max_effective, min_wasted = 0, math.inf
    for a, b in pinpoints:
        pw, ph = (b, a) if mode == "transformers" else (a, b)
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pw * ph - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best = effective, wasted, (pw, ph)
    if best is None:  # only when every candidate keeps 0 pixels: a 0-sized image
        raise UnusableImageError(f"image of size {image_size} keeps no pixels at any pinpoint")
    return best


def resized_size(image_size: ImageSize, target: ImageSize) -> ImageSize:
    """(width, height) the image is resized to inside `target`, keeping its aspect (ceil)."""
    width, height = image_size
    tw, th = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return tw, min(math.ceil(height * scale_w), th)
    return min(math.ceil(width * scale_h), tw), th


def tile_grid(
    image_size: ImageSize, pinpoints: Sequence[tuple[int, int]], tile_size: int, mode: AnyResMode
) -> tuple[int, int]:
    """(rows, cols) of full-resolution tiles for an image of this size."""
    width, height = select_best_resolution(image_size, pinpoints, mode)
    return height // tile_size, width // tile_size


def unpad_slices(
    grid_hw: tuple[int, int], image_size: ImageSize, mode: AnyResMode
) -> tuple[slice, slice]:
    """Rows and columns of a (H, W) feature grid that hold the image, not the black padding.

    Both references compute the scaled side and cut `(current - new) // 2` from each end, so an
    odd difference keeps one padded row; llava truncates the scaled side, transformers first
    rounds it to 7 decimals (so 24 * 100 / 100 stays 24 despite float error).
    """
    cur_h, cur_w = grid_hw
    width, height = image_size
    if width / height > cur_w / cur_h:
        scaled = height * (cur_w / width)
        new_h = int(round(scaled, 7)) if mode == "transformers" else int(scaled)
        pad = (cur_h - new_h) // 2
        return slice(pad, cur_h - pad), slice(0, cur_w)
    scaled = width * (cur_h / height)
    new_w = int(round(scaled, 7)) if mode == "transformers" else int(scaled)
    pad = (cur_w - new_w) // 2
    return slice(0, cur_h), slice(pad, cur_w - pad)


def _slice_len(s: slice, n: int) -> int:
    return len(range(*s.indices(n)))


def pooled_shape(
    height: int, width: int, side: int, pool_budget_tiles: int | None
) -> tuple[int, int]:
    """LLaVA-OneVision's `anyres_max_N`: shrink the unpadded grid when it holds more than about N
    tiles' worth of features (ratio > 1.1), keeping its aspect; the shape it is resized to."""
    if pool_budget_tiles is None:
        return height, width
    ratio = math.sqrt(height * width / (pool_budget_tiles * side**2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


@dataclass(frozen=True)
class AnyResTokens:
    """`ImageTokenCounter` for AnyRes: tokens per image size, computed without pixels.

    `side` is the feature grid side of one tile (CLIP-L/14 at 336: 24), so a tile gives side**2
    tokens. The count is the overview (side**2) plus the unpadded grid with one newline per row;
    `grid` is the (rows, cols) of tiles. A picklable value, so it travels into loader workers.
    """

    pinpoints: tuple[tuple[int, int], ...]
    tile_size: int
    side: int
    mode: AnyResMode = "transformers"
    newline: bool = True  # False: unpad without newlines (transformers' image_newline=None)
    pool_budget_tiles: int | None = None  # OneVision's anyres_max_N; None: off (LLaVA-NeXT)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"encoder.anyres.mode must be one of {MODES}, got {self.mode!r}")
        if self.side < 1 or self.tile_size < 1:
            raise ValueError("encoder.anyres: tile_size and side must be positive")
        if self.pool_budget_tiles is not None and self.pool_budget_tiles < 1:
            raise ValueError(
                f"encoder.anyres.pool_budget_tiles must be >= 1, got {self.pool_budget_tiles}"
            )

    def layout(self, image_size: ImageSize) -> tuple[tuple[int, int], tuple[int, int]]:
        """((rows, cols) of tiles, (height, width) of the merged feature grid before newlines).

        Raises UnusableImageError for an image with fewer pixels than one encoder patch (every
        feature would be interpolation; 13x17 is still tiled, 10x10 is not) or one so elongated
        that the unpadded grid has no row or column left (e.g. a 100:1 panorama at LLaVA-1.6
        pinpoints): the references would emit an empty or newline-only image there.
        """
        width, height = image_size
        patch = self.tile_size // self.side
        if width < 1 or height < 1 or width * height < patch * patch:
            raise UnusableImageError(
                f"image {width}x{height} is smaller than one encoder patch ({patch}x{patch} px)"
            )
        rows, cols = tile_grid(image_size, self.pinpoints, self.tile_size, self.mode)
        grid_hw = (rows * self.side, cols * self.side)
        rs, cs = unpad_slices(grid_hw, image_size, self.mode)
        h, w = _slice_len(rs, grid_hw[0]), _slice_len(cs, grid_hw[1])
        h, w = pooled_shape(h, w, self.side, self.pool_budget_tiles)
        if h < 1 or w < 1:
            raise UnusableImageError(
                f"image {width}x{height} (aspect {max(width, height) / min(width, height):.0f}:1) "
                f"leaves a {h}x{w} feature grid at grid_pinpoints {list(self.pinpoints)}: too "
                "elongated; crop it or add a longer pinpoint"
            )
        return (rows, cols), (h, w)

    def __call__(self, image_size: ImageSize | None = None) -> ImageTokens:
        if image_size is None:
            raise ValueError("AnyRes token counts depend on the image size: pass (width, height)")
        grid, (h, w) = self.layout(image_size)
        return ImageTokens(self.side**2 + h * (w + int(self.newline)), grid=grid)

    @property
    def max_count(self) -> int:
        """The largest count any image can give: unpad only removes whole rows or columns of the
        largest grid, so every reachable (h, w) is enumerated (about 0.2 ms; with pooling the
        count is not monotone in the image size, so no single image size gives the answer)."""
        best = 0
        for a, b in self.pinpoints:
            ph, pw = (a, b) if self.mode == "transformers" else (b, a)
            full_h, full_w = ph // self.tile_size * self.side, pw // self.tile_size * self.side
            shapes = [(full_h, w) for w in range(1, full_w + 1)]
            shapes += [(h, full_w) for h in range(1, full_h + 1)]
            for h, w in shapes:
                h, w = pooled_shape(h, w, self.side, self.pool_budget_tiles)
                best = max(best, h * (w + int(self.newline)))
        return self.side**2 + best

    @property
    def fixed_count(self) -> int | None:
        return None


def to_rgb(image: Image.Image, mode: AnyResMode) -> Image.Image:
    """RGB as each reference makes it: transformers composites transparency on white (its
    `convert_to_rgb`), LLaVA's loader calls `convert('RGB')` (alpha dropped)."""
    if mode == "transformers" and (
        "A" in image.getbands() or image.info.get("transparency") is not None
    ):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def prepare_image(image: Image.Image, orient: bool = True) -> Image.Image:
    """The decode step before tiling (and before counting: the count must use this size).

    EXIF orientation is applied (a phone photo tagged "rotate 90" is tiled as it is seen, and its
    width and height swap), 16-bit greyscale keeps its top 8 bits (PIL's own conversion clips
    everything above 255 to white), and modes PIL cannot map to RGB are refused. The references
    do none of this; on 8-bit images without an orientation tag it is the identity.
    `orient=False` (the pad path, which keeps LLaVA-1.5's pixels) skips the orientation step.
    """
    if orient:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image).astype(np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise UnusableImageError(f"{image.mode} image with values outside 0..65535")
        return Image.fromarray((arr >> 8).astype(np.uint8), mode="L")
    if image.mode == "F":
        raise UnusableImageError("floating-point images (mode F) have no defined RGB mapping")
    return image


@dataclass(frozen=True)
class AnyResImages:
    """The image side: a PIL image -> (1 + rows * cols, 3, tile, tile) normalised tiles,
    the overview first, then the tiles row by row. Normalisation is the encoder's own
    (`ImageTransform.normalize`'s table, bit-identical to transformers' rescale + normalize)."""

    pinpoints: tuple[tuple[int, int], ...]
    tile_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: AnyResMode = "transformers"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"encoder.anyres.mode must be one of {MODES}, got {self.mode!r}")

    def geometry(self, image: Image.Image) -> list[Image.Image]:
        """The pixel-moving part: overview + tiles as RGB images of tile x tile."""
        image = to_rgb(image, self.mode)
        target = select_best_resolution(image.size, self.pinpoints, self.mode)
        resized = image.resize(resized_size(image.size, target), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", target, (0, 0, 0))
        canvas.paste(resized, ((target[0] - resized.width) // 2, (target[1] - resized.height) // 2))
        s = self.tile_size
        tiles = [
            canvas.crop((x, y, x + s, y + s))
            for y in range(0, target[1], s)
            for x in range(0, target[0], s)
        ]
        overview = image.resize((s, s), Image.Resampling.BICUBIC)
        return [overview, *tiles]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        planes = np.stack([np.asarray(tile) for tile in self.geometry(image)])
        return normalize_planes(planes.transpose(0, 3, 1, 2), self.mean, self.std)


def pack_tile_features(
    features: torch.Tensor,
    image_size: ImageSize,
    counter: AnyResTokens,
    image_newline: torch.Tensor | None,
) -> torch.Tensor:
    """(1 + rows * cols, side**2, D) tile features of one image -> (count, D) LLM embeddings.

    The tiles' features are laid into one (rows * side, cols * side) grid (tile (r, c) at block
    (r, c), row-major inside a tile), the padding rows/columns are cut (`spatial_unpad`), the
    grid is optionally pooled (`pool_budget_tiles`), `image_newline` is appended after every row, and
    the overview's tokens go first: transformers' `pack_image_features` and LLaVA's
    `spatial_unpad` merge, token for token. `count` equals `counter(image_size).count`.
    """
    (rows, cols), (h, w) = counter.layout(image_size)
    side = counter.side
    if features.shape[0] != 1 + rows * cols or features.shape[1] != side * side:
        raise ValueError(
            f"image {image_size} expects {1 + rows * cols} tiles of {side * side} features "
            f"(grid {rows}x{cols}), got {tuple(features.shape[:2])}"
        )
    dim = features.shape[-1]
    grid = features[1:].view(rows, cols, side, side, dim).permute(4, 0, 2, 1, 3)
    grid = grid.reshape(dim, rows * side, cols * side)
    rs, cs = unpad_slices((rows * side, cols * side), image_size, counter.mode)
    grid = grid[:, rs, cs]
    if (h, w) != tuple(grid.shape[1:]):  # pool_budget_tiles pooling (LLaVA-OneVision anyres_max_N)
        grid = F.interpolate(grid[None], [h, w], mode="bilinear")[0]
    if counter.newline:
        if image_newline is None:
            raise ValueError("the counter appends image_newline: pass the parameter")
        nl = image_newline.to(grid.dtype)[:, None, None].expand(dim, h, 1)
        grid = torch.cat((grid, nl), dim=-1)
    return torch.cat((features[0], grid.flatten(1, 2).transpose(0, 1)), dim=0)


__all__ = [
    "LLAVA_NEXT_PINPOINTS",
    "MODES",
    "AnyResImages",
    "AnyResMode",
    "AnyResTokens",
    "UnusableImageError",
    "pack_tile_features",
    "parse_grid_pinpoints",
    "pooled_shape",
    "prepare_image",
    "resized_size",
    "select_best_resolution",
    "tile_grid",
    "to_rgb",
    "unpad_slices",
]
