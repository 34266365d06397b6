"""Captions and boxes per image, from COCO files or a JSONL, with bad inputs reported by line.

JSONL: one object per line, `{"id", "image", "captions": [...], "boxes": [[category, x, y, w, h]
or {"category", "bbox": [x, y, w, h]}], "width", "height"}` (boxes in pixels, COCO's xywh; the
size is read from the image when absent). COCO: a captions JSON (`images`, `annotations` with
`caption`) and, optionally, an instances JSON (`annotations` with `bbox`, `category_id`;
`categories`). A source that cannot be used (bad JSON, missing or unreadable image, no captions)
is reported with its line (COCO: its position in `images`) and reason; the others go on.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmlab.curate.records import read_records


@dataclass(frozen=True)
class Box:
    category: str
    x: float  # pixels, top-left corner
    y: float
    w: float
    h: float


@dataclass
class Source:
    """One image with its references: what a prompt is built from."""

    index: int
    line: int
    id: str
    image: str
    captions: list[str]
    boxes: list[Box] = field(default_factory=list)
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class BadInput:
    index: int
    line: int
    id: str
    reason: str  # bad_json, not_an_object, missing_image, corrupt_image, no_captions, bad_box
    detail: str

    def row(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "line": self.line,
            "id": self.id,
            "reason": self.reason,
            "detail": self.detail,
        }


def _box(raw: Any) -> Box:
    if isinstance(raw, dict):
        category = raw.get("category", raw.get("label", raw.get("name")))
        x, y, w, h = raw["bbox"]
    else:
        category, x, y, w, h = raw
    return Box(str(category), float(x), float(y), float(w), float(h))


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:  # reads the header only
        return image.size


def _finish(source: Source, root: Path) -> Source | BadInput:
    """Check the image and the captions; fill the size from the image when the input lacks it."""
    bad = BadInput(source.index, source.line, source.id, "", "")
    if not source.captions:
        return BadInput(**{**bad.__dict__, "reason": "no_captions", "detail": "no captions"})
    path = root / source.image
    if not path.is_file():
        return BadInput(**{**bad.__dict__, "reason": "missing_image", "detail": str(path)})
    if not (source.width and source.height):
        try:
            source.width, source.height = _image_size(path)
        except Exception as err:  # PIL raises several kinds for a broken file
            detail = f"{path}: {err}"
            return BadInput(**{**bad.__dict__, "reason": "corrupt_image", "detail": detail})
    return source


def read_jsonl(path: Path, root: Path) -> Iterator[Source | BadInput]:
    """Sources from a JSONL (or a JSON array) of per-image objects."""
    for record in read_records(path):
        if record.entry is None:
            reason, _, detail = record.error.partition(": ")
            yield BadInput(record.index, record.line, "", reason, detail)
            continue
        entry = record.entry
        id_ = str(entry.get("id", record.index))
        captions = entry.get("captions") or []
        if isinstance(captions, str):
            captions = [captions]
        try:
            boxes = [_box(b) for b in entry.get("boxes") or []]
        except (KeyError, TypeError, ValueError) as err:
            yield BadInput(
                record.index, record.line, id_, "bad_box", f"{type(err).__name__}: {err}"
            )
            continue
        source = Source(
            record.index,
            record.line,
            id_,
            str(entry.get("image", "")),
            [str(c) for c in captions],
            boxes,
            int(entry.get("width") or 0),
            int(entry.get("height") or 0),
        )
        yield _finish(source, root)


def read_coco(captions: Path, instances: Path | None, root: Path) -> Iterator[Source | BadInput]:
    """Sources from COCO's captions (and instances) files; `line` is the image's position."""
    caps = json.loads(captions.read_text(encoding="utf-8"))
    by_image: dict[int, list[str]] = defaultdict(list)
    for ann in caps.get("annotations", []):
        by_image[ann["image_id"]].append(str(ann["caption"]).strip())
    boxes: dict[int, list[Box]] = defaultdict(list)
    if instances is not None:
        inst = json.loads(instances.read_text(encoding="utf-8"))
        names = {c["id"]: c["name"] for c in inst.get("categories", [])}
        for ann in inst.get("annotations", []):
            x, y, w, h = ann["bbox"]
            name = names.get(ann["category_id"], str(ann["category_id"]))
            boxes[ann["image_id"]].append(Box(name, x, y, w, h))
    for index, image in enumerate(caps.get("images", [])):
        source = Source(
            index,
            index + 1,
            str(image["id"]),
            str(image["file_name"]),
            by_image.get(image["id"], []),
            boxes.get(image["id"], []),
            int(image.get("width") or 0),
            int(image.get("height") or 0),
        )
        yield _finish(source, root)


def read_sources(data: Path, instances: Path | None, root: Path) -> Iterator[Source | BadInput]:
    """COCO when `instances` is given or the file is one JSON object, else JSONL/array."""
    with open(data, encoding="utf-8") as handle:
        head = handle.read(4096).lstrip(" \t\r\n\ufeff")
    if instances is not None or (head.startswith("{") and '"images"' in head):
        return read_coco(data, instances, root)
    return read_jsonl(data, root)
