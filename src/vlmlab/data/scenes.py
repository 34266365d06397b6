"""Synthetic scenes: 1-6 shapes per image, with colours, sizes, positions and relations.

Why beside `shapes.py`: one shape per image makes counting, object probing and relations
trivial, so the toy studies could not tell arms apart. Here every image is a 3x3 grid of cells
with at most one object per cell (a position is a cell, so "in the top left" and "to the left
of" follow from the geometry without ambiguity), the object count is balanced over 1-6, and
colours and shapes have a skewed prior plus a per-scene palette, so POPE's `popular` and
`adversarial` negatives differ from `random` ones, as they do on COCO.

`resolution_task` (data=scenes_hires) draws large non-square images (2:1 and 1:2, two sizes)
with a few px small objects on a mottled background, asked about by position: LLaVA's pad-resize
to the encoder's size blends them into the background, AnyRes tiles keep them.

Everything is deterministic from the spec (`ScenesSpec.fingerprint` names the folder); the
outputs are real LLaVA JSON + PNG files turned into WebDataset shards like the shapes data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlmlab.data.prepare import ResolvedDataset, build_synthetic, mixture_sources
from vlmlab.data.shapes import add_training_records, write_png, write_sets
from vlmlab.errors import ConfigError
from vlmlab.schema import DataConfig

log = logging.getLogger(__name__)

# Well separated under the +-12 per-channel jitter; the prior is skewed on purpose (see above).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 135, 20),
    "black": (35, 35, 35),
}
COLOUR_PRIOR = (0.24, 0.2, 0.16, 0.13, 0.11, 0.09, 0.07)
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SHAPE_PRIOR = (0.3, 0.25, 0.2, 0.15, 0.1)
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PALETTE_SHARE = 0.75  # objects that take a colour of the scene's two-colour palette
JITTER = 12  # per-channel colour jitter of an object's fill


def position_name(row: int, column: int) -> str:
    """The name of a grid cell: "top left", "top", "centre", "right" ..."""
    if row == 1 and column == 1:
        return "centre"
    if row == 1:
        return COLUMNS[column]
    if column == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLUMNS[column]}"


POSITIONS = tuple(position_name(r, c) for r in range(3) for c in range(3))


def where(position: str) -> str:
    """The phrase for a cell: "in the top left", "at the top", "on the left", "in the centre"."""
    if position in ("top", "bottom"):
        return f"at the {position}"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"in the {position}"


CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in the picture?",
    "Give a short caption.",
)
COLOUR_QUESTIONS = (
    "What colour is the shape {where}?",
    "Which colour does the object {where} have?",
)
SHAPE_QUESTIONS = ("What shape is {where}?", "Which shape is {where}?")
SIZE_QUESTIONS = ("Is the {name} small or large?", "What size is the {name}?")
COUNT_QUESTIONS = ("How many shapes are in the image?", "How many objects are there?")
POSITION_QUESTIONS = ("Where is the {name}?", "In which part of the image is the {name}?")
EXIST_QUESTIONS = ("Is there a {name} in the image?", "Does the image contain a {name}?")
RELATION_QUESTIONS = {
    "left": "Is the {a} to the left of the {b}?",
    "right": "Is the {a} to the right of the {b}?",
    "above": "Is the {a} above the {b}?",
    "below": "Is the {a} below the {b}?",
}
SIZED_COLOUR_QUESTION = "What colour is the {size} shape {where}?"  # the resolution task


@dataclass(frozen=True)
class ScenesSpec:
    """Generator knobs; a different spec writes to a different folder (see `fingerprint`).

    `image_size` is the side of the square images, or the long side of the resolution task's.
    """

    num_images: int = 2000
    num_heldout: int = 200
    image_size: int = 96
    seed: int = 0
    max_objects: int = 6
    resolution_task: bool = False

    @property
    def kind(self) -> str:
        return "scenes_hires" if self.resolution_task else "scenes"

    def fingerprint(self) -> str:
        payload = json.dumps({"kind": self.kind, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]

    def image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) choices: one square size, or 2:1 and 1:2 at two sizes (hires)."""
        side = self.image_size
        if not self.resolution_task:
            return [(side, side)]
        small = side * 3 // 4
        return [(side, side // 2), (side // 2, side), (small, small // 2), (small // 2, small)]


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; `radius` is half its bounding box side, centre in image pixels."""

    colour: str
    shape: str
    size: str
    row: int
    column: int
    cx: float
    cy: float
    radius: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def position(self) -> str:
        return position_name(self.row, self.column)

    def record(self) -> dict[str, Any]:
        """JSON form: the facts, and the box (x0, y0, x1, y1) it was drawn in."""
        r = self.radius
        return {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "position": self.position,
            "row": self.row,
            "column": self.column,
            "box": [
                round(self.cx - r, 2),
                round(self.cy - r, 2),
                round(self.cx + r, 2),
                round(self.cy + r, 2),
            ],
        }


@dataclass
class Scene:
    width: int
    height: int
    objects: list[SceneObject] = field(default_factory=list)

    def by_position(self) -> list[SceneObject]:
        """Objects in reading order (row by row): how captions list them."""
        return sorted(self.objects, key=lambda o: (o.row, o.column))


def left_of(a: SceneObject, b: SceneObject) -> bool:
    """a lies wholly left of b (cells never overlap, so this is a column comparison)."""
    return a.column < b.column


def above(a: SceneObject, b: SceneObject) -> bool:
    return a.row < b.row


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill: tuple[int, int, int]) -> None:
    cx, cy, r = obj.cx, obj.cy, obj.radius
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # star: five points, inner radius r / 2
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.5 * r)
        draw.polygon(
            [(cx + q * np.cos(a), cy - q * np.sin(a)) for a, q in zip(angles, radii)], fill=fill
        )


def _background(rng: np.random.Generator, width: int, height: int, mottled: bool) -> np.ndarray:
    """A light noisy background; `mottled` (the resolution task) is a smooth +-14 level tint
    field instead, so a small object blended into one low-res pixel looks like the
    background's own variation rather than a dot."""
    base = rng.integers(200, 241, size=3).astype(np.float64)
    # no per-pixel noise under the mottle: it would make each large PNG ~180 KB instead of ~20
    pixels = base + (0.0 if mottled else rng.normal(0, 5, size=(height, width, 3)))
    if mottled:
        coarse = rng.uniform(-14, 14, size=(4, 6, 3))
        field_ = np.stack(
            [
                np.asarray(
                    Image.fromarray(coarse[..., c].astype(np.float32), "F").resize(
                        (width, height), Image.Resampling.BILINEAR
                    )
                )
                for c in range(3)
            ],
            axis=-1,
        )
        pixels = pixels + field_
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _pick(
    rng: np.random.Generator, names: tuple[str, ...] | list[str], prior: tuple[float, ...]
) -> str:
    return str(names[int(rng.choice(len(names), p=np.asarray(prior) / sum(prior)))])


def sample_scene(rng: np.random.Generator, spec: ScenesSpec, count: int) -> Scene:
    """`count` objects in distinct cells with distinct (colour, shape); sizes and jitter random."""
    sizes = spec.image_sizes()
    width, height = sizes[int(rng.integers(len(sizes)))]
    cells = rng.choice(9, size=count, replace=False)
    palette = list(rng.choice(list(COLOURS), size=2, replace=False, p=np.asarray(COLOUR_PRIOR)))
    cell_w, cell_h = width / 3, height / 3
    base = min(cell_w, cell_h)
    scene = Scene(width, height)
    taken: set[tuple[str, str]] = set()
    for index, cell in enumerate(int(c) for c in cells):
        for _ in range(100):  # distinct (colour, shape) in a scene: every name is a referent
            if rng.random() < PALETTE_SHARE:
                colour = str(palette[int(rng.integers(2))])
            else:
                colour = _pick(rng, list(COLOURS), COLOUR_PRIOR)
            shape = _pick(rng, SHAPES, SHAPE_PRIOR)
            if (colour, shape) not in taken:
                break
        else:  # practically never (35 names, at most 9 objects): the first free name
            colour, shape = next((c, s) for c in COLOURS for s in SHAPES if (c, s) not in taken)
        taken.add((colour, shape))
        if spec.resolution_task:  # one small and one large at least; small is a few px
            size = "small" if index == 0 else "large" if index == 1 else str(rng.choice(SIZES))
            radius = (
                float(rng.uniform(2.0, 2.8))
                if size == "small"
                else base * float(rng.uniform(0.25, 0.35))
            )
        else:
            size = "small" if rng.random() < 0.35 else "large"
            radius = base * float(
                rng.uniform(0.13, 0.18) if size == "small" else rng.uniform(0.28, 0.36)
            )
        row, column = divmod(cell, 3)
        slack_x, slack_y = max(0.0, cell_w / 2 - radius - 2), max(0.0, cell_h / 2 - radius - 2)
        cx = (column + 0.5) * cell_w + float(rng.uniform(-0.6, 0.6)) * slack_x
        cy = (row + 0.5) * cell_h + float(rng.uniform(-0.6, 0.6)) * slack_y
        scene.objects.append(SceneObject(colour, shape, size, row, column, cx, cy, radius))
    return scene


def draw_scene(rng: np.random.Generator, scene: Scene, mottled: bool = False) -> Image.Image:
    """The scene as an RGB image: crisp (not antialiased) shapes, each fill jittered +-12."""
    image = Image.fromarray(_background(rng, scene.width, scene.height, mottled), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        jitter = rng.integers(-JITTER, JITTER + 1, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[obj.colour], jitter))
        _draw_object(draw, obj, fill)  # type: ignore[arg-type]
    return image


# ----------------------------------------------------------------------------- text


def caption(scene: Scene) -> str:
    """e.g. "two shapes: a large red circle in the top left and a small blue star at the bottom."."""
    objects = scene.by_position()
    parts = [f"a {o.size} {o.colour} {o.shape} {where(o.position)}" for o in objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    noun = "shape" if len(objects) == 1 else "shapes"
    return f"{NUMBERS[len(objects)]} {noun}: {listed}."


def absent_names(scene: Scene) -> list[str]:
    present = {o.name for o in scene.objects}
    return [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]


def relation_pair(
    rng: np.random.Generator, scene: Scene
) -> tuple[SceneObject, SceneObject, str] | None:
    """Two objects and a relation that holds (a <relation> b), or None for a one-object scene."""
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a is not b]
    rng.shuffle(pairs)  # type: ignore[arg-type]
    for a, b in pairs:
        holds = [
            name
            for name, ok in (
                ("left", left_of(a, b)),
                ("right", left_of(b, a)),
                ("above", above(a, b)),
                ("below", above(b, a)),
            )
            if ok
        ]
        if holds:
            return a, b, str(rng.choice(holds))
    return None


def mc_question(question: str, options: list[str]) -> str:
    """A multiple-choice question as `vlmlab eval`'s mc scorer writes it (options lettered)."""
    return "\n".join([question, *(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))])


def _options(rng: np.random.Generator, truth: str, pool: list[str] | tuple[str, ...]) -> list[str]:
    others = [str(x) for x in rng.permutation([p for p in pool if p != truth])[:3]]
    options = [*others]
    options.insert(int(rng.integers(0, len(others) + 1)), truth)
    return options


def _instruction_turns(
    rng: np.random.Generator, scene: Scene, resolution_task: bool = False
) -> list[tuple[str, str]]:
    """1-3 QA turns drawn from every question type the benchmarks ask."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    place = where(obj.position)
    absent = absent_names(scene)
    exists = bool(rng.random() < 0.5)
    probe = obj.name if exists else str(rng.choice(absent))
    pool: list[tuple[str, str]] = [
        (str(rng.choice(COLOUR_QUESTIONS)).format(where=place), obj.colour),
        (str(rng.choice(SHAPE_QUESTIONS)).format(where=place), obj.shape),
        (str(rng.choice(SIZE_QUESTIONS)).format(name=obj.name), obj.size),
        (str(rng.choice(COUNT_QUESTIONS)), str(len(scene.objects))),
        (str(rng.choice(POSITION_QUESTIONS)).format(name=obj.name), obj.position),
        (str(rng.choice(EXIST_QUESTIONS)).format(name=probe), "yes" if exists else "no"),
    ]
    sized = (SIZED_COLOUR_QUESTION.format(size=obj.size, where=place), obj.colour)
    if not resolution_task:
        pool.append(sized)
    options = _options(rng, obj.position, POSITIONS)
    pool.append(
        (
            mc_question(str(rng.choice(POSITION_QUESTIONS)).format(name=obj.name), options),
            "ABCD"[options.index(obj.position)],
        )
    )
    pair = relation_pair(rng, scene)
    if pair is not None:
        a, b, relation = pair
        if rng.random() < 0.5:
            pool.append((RELATION_QUESTIONS[relation].format(a=a.name, b=b.name), "yes"))
        else:  # the converse relation does not hold for the swapped pair
            pool.append((RELATION_QUESTIONS[relation].format(a=b.name, b=a.name), "no"))
    order = rng.permutation(len(pool))
    turns = [pool[i] for i in order[: int(rng.integers(1, 4))]]
    # the resolution task: every conversation asks one object's colour by size and position
    return [sized, *turns[:2]] if resolution_task else turns


def heldout_question(
    rng: np.random.Generator, scene: Scene, resolution_task: bool
) -> tuple[str, str, int]:
    """The held-out question (what the training-time sample answers show): an object's colour by
    position; in the resolution task always a small object's. Returns (question, answer, index)."""
    candidates = [
        i for i, o in enumerate(scene.objects) if o.size == "small" or not resolution_task
    ]
    index = int(candidates[int(rng.integers(len(candidates)))])
    obj = scene.objects[index]
    if resolution_task:
        return (
            SIZED_COLOUR_QUESTION.format(size="small", where=where(obj.position)),
            obj.colour,
            index,
        )
    return COLOUR_QUESTIONS[0].format(where=where(obj.position)), obj.colour, index


def balanced_counts(rng: np.random.Generator, n: int, low: int, high: int) -> list[int]:
    """n object counts covering low..high equally (up to n mod the range), in random order."""
    values = np.resize(np.arange(low, high + 1), n)
    return [int(v) for v in rng.permutation(values)]


def generate(spec: ScenesSpec, out_dir: Path) -> dict[str, Path]:
    """Write images, LLaVA JSON (align, instruct, text, heldout) and world.json under `out_dir`.

    world.json holds the spec and the training split's object frequencies and co-occurrences:
    POPE's `popular` and `adversarial` negatives are drawn from them, as the paper draws them
    from the training annotations.
    """
    if not 1 <= spec.max_objects <= 9:
        raise ConfigError(
            "data.generator.max_objects", f"got {spec.max_objects}.", "use 1 to 9 (a 3x3 grid)."
        )
    rng = np.random.default_rng(spec.seed)
    low = 2 if spec.resolution_task else 1
    counts = balanced_counts(rng, spec.num_images, low, spec.max_objects)
    counts += balanced_counts(rng, spec.num_heldout, low, spec.max_objects)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[dict[str, Any]]] = {"align": [], "instruct": [], "text": [], "heldout": []}
    frequency: Counter[str] = Counter()
    cooccurrence: dict[str, Counter[str]] = {}
    for index, count in enumerate(counts):
        scene = sample_scene(rng, spec, count)
        image = draw_scene(rng, scene, mottled=spec.resolution_task)
        name = f"scene{index:06d}.png"
        write_png(image, image_dir / name)
        if index >= spec.num_images:
            question, answer, target = heldout_question(rng, scene, spec.resolution_task)
            sets["heldout"].append(
                {
                    "id": f"heldout{index:06d}",
                    "image": name,
                    "question": question,
                    "answer": answer,
                    "target": target,
                    "width": scene.width,
                    "height": scene.height,
                    "objects": [o.record() for o in scene.objects],
                }
            )
            continue
        for obj in scene.objects:
            frequency[obj.name] += 1
            row = cooccurrence.setdefault(obj.name, Counter())
            row.update(o.name for o in scene.objects if o is not obj)
        caption_turn = (str(rng.choice(CAPTION_PROMPTS)), caption(scene))
        turns = _instruction_turns(rng, scene, spec.resolution_task)
        add_training_records(sets, index, name, caption_turn, turns)
    paths = write_sets(sets, out_dir)
    world = {
        "kind": spec.kind,
        "spec": asdict(spec),
        "frequency": dict(sorted(frequency.items())),
        "cooccurrence": {k: dict(sorted(v.items())) for k, v in sorted(cooccurrence.items())},
    }
    paths["world"] = out_dir / "world.json"
    paths["world"].write_text(json.dumps(world, indent=1))
    log.info(
        "%s: wrote %d images and %s under %s",
        spec.kind,
        len(counts),
        {k: len(v) for k, v in sets.items()},
        out_dir,
    )
    return paths


# ----------------------------------------------------------------------------- data source

SCENE_SETS = ("align", "instruct", "text")


class ScenesSource:
    """`data=scenes`: the synthetic scenes (`data.generator`), generated on first use."""

    resolution_task = False

    def __init__(self, data_cfg: DataConfig) -> None:
        self.cfg = data_cfg

    def spec(self) -> ScenesSpec:
        if self.cfg.generator is None:
            raise ConfigError(
                "data.generator",
                "is missing.",
                "give the synthetic set's sizes (see conf/data/scenes.yaml).",
            )
        return ScenesSpec(**asdict(self.cfg.generator), resolution_task=self.resolution_task)

    def root(self) -> Path:
        spec = self.spec()
        return Path(self.cfg.root).resolve() / f"{spec.kind}-{spec.fingerprint()}"

    def set_dir(self, name: str, key: str) -> Path:
        sets = self.cfg.sets or {}
        if name not in sets:
            raise ConfigError(
                key,
                f"{name!r} is not a set of data={self.cfg.name}.",
                f"use one of {sorted(sets)}.",
            )
        return self.root() / "shards" / str(sets[name])

    def resolve(self, dataset: str) -> ResolvedDataset:
        sources = mixture_sources(self.cfg, dataset, self)
        root = self.root()
        return {
            "shard_dir": None if sources is not None else self.set_dir(dataset, "stage.dataset"),
            "sources": sources,
            "heldout": root / "heldout.json",
            "image_root": root / "images",
            "prepare": self.ensure,
            "synthetic_root": root,
        }

    def ensure(self) -> Path:
        """Generate images, JSON and shards once per spec; safe to call concurrently."""
        spec = self.spec()
        return build_synthetic(
            self.root(),
            lambda tmp: generate(spec, tmp),
            SCENE_SETS,
            int(self.cfg.samples_per_shard),
        )


class HiresScenesSource(ScenesSource):
    """`data=scenes_hires`: the resolution task (large non-square images, small objects)."""

    resolution_task = True
