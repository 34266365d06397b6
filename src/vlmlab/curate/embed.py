"""Image embeddings from the configured vision encoder (the same preset and builder training
uses): mean-pooled features of its selected layer, L2-normalised, so a dot product is a cosine."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from vlmlab.models import instantiate
from vlmlab.models.contracts import VisionEncoder
from vlmlab.models.image_transform import ImageTransform, normalize_planes

log = logging.getLogger(__name__)


def build_image_encoder(encoder: dict[str, Any]) -> VisionEncoder:
    """The encoder preset built by `vlmlab.models.encoder.build_encoder`, in eval mode."""
    module = instantiate(encoder)
    assert isinstance(module, torch.nn.Module)
    module.eval()
    return cast(VisionEncoder, module)


def _pixels(path: Path, transform: Any) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(transform.geometry(image))


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.inference_mode()
def embed_images(
    paths: Sequence[Path], encoder: VisionEncoder, batch_size: int = 64, workers: int = 0
) -> torch.Tensor:
    """(N, D) float32 unit vectors, row i for paths[i]. Batches follow the order given (the caller
    sorts by key), so the numbers do not depend on the input order or the worker count."""
    transform = encoder.image_transform
    assert isinstance(transform, ImageTransform)  # geometry + normalize, split for the threads
    dim = int(encoder.hidden_size)
    out = torch.empty(len(paths), dim, dtype=torch.float32)
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    try:
        done = 0
        for batch in _batches(paths, batch_size):
            if pool is not None:
                arrays = list(pool.map(lambda p: _pixels(p, transform), batch))
            else:
                arrays = [_pixels(p, transform) for p in batch]
            planes = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))
            pixel_values = normalize_planes(planes, transform.mean, transform.std)
            features = encoder(pixel_values).float().mean(dim=1)  # (B, N, D) -> (B, D)
            out[done : done + len(batch)] = torch.nn.functional.normalize(features, dim=-1)
            done += len(batch)
    finally:
        if pool is not None:
            pool.shutdown()
    return out
