"""Visual tokens as data: how many LLM embeddings each image becomes, and how they are laid out.

The vision side (encoder + connector, composed in the VLM) owns the answer; the text side asks
it for every image, so `<image>` expands to exactly as many slots as the model fills. Today's
fixed-size encoders are the case where every image gives the same count (`FixedImageTokens`);
AnyRes tiling (a count that depends on the image's size), packed rows and cached features plug
in behind the same `ImageTokenCounter` without touching data code.

Why a module of its own: `models` and `data` both use it and neither may import the other, and
a counter travels into DataLoader workers, so it is a small picklable value. It imports nothing
from vlmlab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

ImageSize = tuple[int, int]  # (width, height) of the image as decoded, PIL's `Image.size`


@dataclass(frozen=True)
class ImageTokens:
    """What one image becomes for the LLM: `count` embeddings, in one contiguous run.

    `grid` is the (rows, cols) tile layout when the vision side tiles the image (AnyRes); None
    for a single tile.
    """

    count: int
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"an image gives at least 1 token, got count={self.count!r}")
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 1):
            raise ValueError(f"grid must be (rows, cols) >= 1, got {self.grid!r}")


@runtime_checkable
class ImageTokenCounter(Protocol):
    """The vision side's answer to "how many tokens does this image give?", picklable.

    `image_size` is the decoded image's (width, height); a counter whose answer does not depend
    on it accepts None. `max_count` bounds every answer (the planner's worst case, truncation
    checks); `fixed_count` is the count every image gives, or None when it varies (HF Llava's
    `image_seq_length` exists only for the fixed case).
    """

    def __call__(self, image_size: ImageSize | None = None) -> ImageTokens: ...

    @property
    def max_count(self) -> int: ...

    @property
    def fixed_count(self) -> int | None: ...


@dataclass(frozen=True)
class FixedImageTokens:
    """Every image gives `count` tokens: an encoder at one resolution and a connector that maps
    N features to a fixed M (LLaVA-1.5's CLIP-L/14-336 + MLP: 576)."""

    count: int

    def __post_init__(self) -> None:
        ImageTokens(self.count)  # the same validation

    def __call__(self, image_size: ImageSize | None = None) -> ImageTokens:
        return ImageTokens(self.count)

    @property
    def max_count(self) -> int:
        return self.count

    @property
    def fixed_count(self) -> int | None:
        return self.count


__all__ = ["FixedImageTokens", "ImageSize", "ImageTokenCounter", "ImageTokens"]
