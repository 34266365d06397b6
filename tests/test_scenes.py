"""The synthetic scenes world (data=scenes) and the resolution task (data=scenes_hires).

Answers are checked against the drawn pixels, not against the generator's own strings: a
small pixel reader below finds the objects in each PNG (connected regions off the background),
names their colour (nearest palette colour), shape (fill ratio and widest row) and grid cell,
and every benchmark answer must agree with what it reads.
"""

from __future__ import annotations

import json
import re
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlmlab.data.scenes import COLOURS, SHAPES, ScenesSpec, generate
from vlmlab.eval import scorers
from vlmlab.eval.benchmarks import (
    SYNTHETIC,
    is_synthetic,
    synthetic_for_shapes,
    synthetic_names,
    write_synthetic,
)
from vlmlab.eval.runner import prediction_row, read_benchmark, summarize
from vlmlab.eval.scene_benchmarks import SCENES, SCENES_HIRES

SPEC = ScenesSpec(num_images=60, num_heldout=48, seed=1)
HIRES = ScenesSpec(num_images=4, num_heldout=40, image_size=512, seed=2, resolution_task=True)
CELLS = {  # the test's own names of the 3x3 grid (row, column)
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "centre",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
MEAN = (0.48145466, 0.4578275, 0.40821073)  # the tiny encoder's (CLIP) normalisation
STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- pixel reader


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected regions of a boolean mask, as (N, 2) arrays of (y, x)."""
    seen = np.zeros_like(mask)
    regions = []
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(np.array(pixels))
    return regions


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of integer points (Andrew's monotone chain, shoelace)."""
    pts = sorted({(int(x), int(y)) for x, y in points})

    def half(seq: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for p in seq:
            while (
                len(out) >= 2
                and (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])
                <= 0
            ):
                out.pop()
            out.append(p)
        return out[:-1]

    hull = half(pts) + half(pts[::-1])
    return 0.5 * abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(hull, hull[1:] + hull[:1])))


def _shape(pixels: np.ndarray) -> str:
    """square: fills its box; circle: pi/4 of it; star: concave (area / convex hull); triangle
    and diamond: half the box, widest at the bottom or in the middle."""
    ys, xs = pixels[:, 0], pixels[:, 1]
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(pixels) / (height * width)
    corners = np.concatenate([pixels + offset for offset in ([0, 0], [0, 1], [1, 0], [1, 1])])
    if fill > 0.9:
        return "square"
    if fill > 0.65:
        return "circle"
    if len(pixels) / _hull_area(corners) < 0.74:
        return "star"
    rows = Counter(ys.tolist())
    widest = max(rows, key=lambda y: (rows[y], y))
    return "triangle" if widest - ys.min() > 0.75 * (height - 1) else "diamond"


def read_scene(path: Path) -> list[dict[str, Any]]:
    """The objects drawn in a PNG: colour, shape, cell, box (x0, y0, x1, y1), centre."""
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    height, width, _ = image.shape
    background = np.median(image.reshape(-1, 3), axis=0)
    mask = np.abs(image - background).max(axis=-1) > 60
    palette = np.array(list(COLOURS.values()))
    found = []
    for pixels in _regions(mask):
        if len(pixels) < 6:
            continue
        mean = image[pixels[:, 0], pixels[:, 1]].mean(axis=0)
        distances = np.linalg.norm(palette - mean, axis=1)
        assert distances.min() < 40, (path, mean)  # every region is one palette colour
        cy, cx = pixels.mean(axis=0)
        found.append(
            {
                "colour": list(COLOURS)[int(distances.argmin())],
                "shape": _shape(pixels),
                "cell": CELLS[(int(cy // (height / 3)), int(cx // (width / 3)))],
                "box": (
                    pixels[:, 1].min(),
                    pixels[:, 0].min(),
                    pixels[:, 1].max(),
                    pixels[:, 0].max(),
                ),
                "size_px": int(np.ptp(pixels, axis=0).max()) + 1,
            }
        )
    return found


def _name(obj: dict[str, Any]) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _parse(pattern: str, text: str) -> tuple[str, ...]:
    match = re.search(pattern, text)
    assert match is not None, (pattern, text)
    return match.groups()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("scenes")
    paths = generate(SPEC, root)
    bench = write_synthetic(root, root / "bench")
    heldout = json.loads(paths["heldout"].read_text())
    drawn = {r["image"]: read_scene(root / "images" / r["image"]) for r in heldout}
    return {"root": root, "paths": paths, "bench": bench, "heldout": heldout, "drawn": drawn}


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _drawn(scenes: dict[str, Any], row: dict[str, Any]) -> list[dict[str, Any]]:
    return scenes["drawn"][Path(row["image"]).name]


# ----------------------------------------------------------------------------- determinism


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_spec_same_bytes_and_fingerprint(tmp_path: Path) -> None:
    spec = ScenesSpec(num_images=12, num_heldout=6, seed=5)
    generate(spec, tmp_path / "a")
    generate(ScenesSpec(num_images=12, num_heldout=6, seed=5), tmp_path / "b")
    generate(ScenesSpec(num_images=12, num_heldout=6, seed=6), tmp_path / "c")
    first, second, other = (_files(tmp_path / d) for d in "abc")
    assert first == second and len(first) == 18 + 5  # 18 PNGs, 4 JSON sets, world.json
    assert spec.fingerprint() == ScenesSpec(num_images=12, num_heldout=6, seed=5).fingerprint()
    assert first["instruct.json"] != other["instruct.json"]
    assert sum(first[n] != other[n] for n in first if n.startswith("images/")) > 12
    fingerprints = {
        s.fingerprint()
        for s in (spec, ScenesSpec(12, 6, seed=6), ScenesSpec(12, 6, seed=5, resolution_task=True))
    }
    assert len(fingerprints) == 3


# ----------------------------------------------------------------------------- the world


def test_records_match_the_drawn_pixels(scenes: dict[str, Any]) -> None:
    """The stored objects are what the PNG shows: colour, shape, cell and box."""
    shapes_seen: Counter[str] = Counter()
    for record in scenes["heldout"]:
        drawn = {o["cell"]: o for o in _drawn(scenes, record)}
        assert len(drawn) == len(record["objects"])
        for obj in record["objects"]:
            seen = drawn[obj["position"]]
            assert (seen["colour"], seen["shape"]) == (obj["colour"], obj["shape"]), record["id"]
            x0, y0, x1, y1 = obj["box"]  # drawn inside it; only a star's lower points fall short
            sx0, sy0, sx1, sy1 = seen["box"]
            assert x0 - 1.5 <= sx0 and y0 - 1.5 <= sy0 and sx1 <= x1 + 1.5 and sy1 <= y1 + 1.5
            if obj["shape"] != "star":
                assert np.allclose(seen["box"], obj["box"], atol=1.5), (seen["box"], obj["box"])
            shapes_seen[seen["shape"]] += 1
    assert set(shapes_seen) == set(SHAPES)


def test_counts_cover_one_to_six_and_match_the_pixels(scenes: dict[str, Any]) -> None:
    rows = _rows(scenes["bench"]["scenes_count"])
    counts: Counter[int] = Counter()
    for row in rows:
        assert set(row["answers"]) == {str(len(_drawn(scenes, row)))}
        counts[len(_drawn(scenes, row))] += 1
    assert counts == dict.fromkeys(range(1, 7), 8)  # 48 held-out scenes, balanced
    train = Counter(
        r["conversations"][1]["value"].split()[0]
        for r in json.loads(scenes["paths"]["align"].read_text())
    )
    assert train == dict.fromkeys(["one", "two", "three", "four", "five", "six"], 10)


def test_colour_shape_position_answers_follow_the_geometry(scenes: dict[str, Any]) -> None:
    for name, key in (("scenes_colour", "colour"), ("scenes_shape", "shape")):
        rows = _rows(scenes["bench"][name])
        assert len(rows) == 48
        for row in rows:
            (cell,) = _parse(r"(?:in|at|on) the ([a-z ]+)\?$", row["question"])
            (obj,) = [o for o in _drawn(scenes, row) if o["cell"] == cell]
            assert row["answer"] == obj[key], (name, row)
    for row in _rows(scenes["bench"]["scenes_position"]):
        (name,) = _parse(r"^Where is the (\w+ \w+)\?$", row["question"])
        (obj,) = [o for o in _drawn(scenes, row) if _name(o) == name]
        assert row["answers"][0] == obj["cell"]


def test_relations_follow_the_geometry(scenes: dict[str, Any]) -> None:
    """yes exactly when the pixel boxes are apart in that direction; half the answers are yes."""
    pattern = r"^Is the (\w+ \w+) (to the left of|to the right of|above|below) the (\w+ \w+)\?$"
    rows = _rows(scenes["bench"]["scenes_relation"])
    kinds: Counter[str] = Counter()
    for row in rows:
        a_name, relation, b_name = _parse(pattern, row["question"])
        drawn = {_name(o): o for o in _drawn(scenes, row)}
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = drawn[a_name]["box"], drawn[b_name]["box"]
        holds = {
            "to the left of": ax1 < bx0,
            "to the right of": bx1 < ax0,
            "above": ay1 < by0,
            "below": by1 < ay0,
        }[relation]
        assert row["answer"] == ("yes" if holds else "no"), row
        kinds[relation] += 1
    answers = Counter(r["answer"] for r in rows)
    assert answers["yes"] == answers["no"] == 40  # the 40 scenes with two objects or more
    assert len(kinds) == 4


def test_pope_is_balanced_and_its_negatives_follow_the_paper(scenes: dict[str, Any]) -> None:
    """random / popular / adversarial: absent objects by chance, by training frequency, by
    co-occurrence with the image's objects (frequencies re-counted here from the training PNGs)."""
    root = scenes["root"]
    frequency: Counter[str] = Counter()
    cooccurrence: dict[str, Counter[str]] = {}
    for record in json.loads(scenes["paths"]["align"].read_text()):
        names = [_name(o) for o in read_scene(root / "images" / record["image"])]
        frequency.update(names)
        for n in names:
            cooccurrence.setdefault(n, Counter()).update(m for m in names if m != n)
    world = json.loads((root / "world.json").read_text())
    assert world["frequency"] == dict(frequency)
    everything = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    shared_colour = {}
    negatives_by = {}
    for strategy in ("random", "popular", "adversarial"):
        rows = _rows(scenes["bench"][f"scenes_pope_{strategy}"])
        by_image: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_image.setdefault(row["image"], []).append(row)
        assert len(by_image) == 48
        shared, negatives = [], []
        for image, group in by_image.items():
            present = {_name(o) for o in scenes["drawn"][Path(image).name]}
            asked: dict[str, list[str]] = {"yes": [], "no": []}
            for row in group:
                asked[row["answer"]] += _parse(r"^Is there a (\w+ \w+) in", row["question"])
            assert len(asked["yes"]) == len(asked["no"]) == min(3, len(present))
            assert set(asked["yes"]) <= present and not set(asked["no"]) & present
            absent = [n for n in everything if n not in present]
            if strategy == "popular":
                top = sorted(absent, key=lambda n: (-frequency[n], n))[: len(asked["no"])]
                assert asked["no"] == top
            if strategy == "adversarial":
                score = {n: sum(cooccurrence.get(p, Counter())[n] for p in present) for n in absent}
                worst_chosen = min(score[n] for n in asked["no"])
                assert all(score[n] <= worst_chosen for n in absent if n not in asked["no"])
            colours = {p.split()[0] for p in present}
            shared += [n.split()[0] in colours for n in asked["no"]]
            negatives.append(tuple(asked["no"]))
        shared_colour[strategy] = np.mean(shared)
        negatives_by[strategy] = negatives
        assert Counter(r["answer"] for r in rows)["yes"] == len(rows) // 2
    assert len({tuple(v) for v in negatives_by.values()}) == 3  # three different benchmarks
    # co-occurrence makes adversarial negatives look like the scene (its palette)
    assert shared_colour["adversarial"] > shared_colour["random"] + 0.2, shared_colour


# ----------------------------------------------------------------------------- scoring


def _score(path: Path, answer: Callable[[Any], str]) -> dict[str, float]:
    """The runner's own scoring path (read, queries, score, summarize) with given answers."""
    items, rejected = read_benchmark(path)
    assert rejected == []
    rows = []
    for item in items:
        for query in scorers.get_scorer(item.type).queries(item, False, False):
            rows.append(prediction_row(query, answer(query)))
    return summarize(rows, items, circular=False)


def _constant(answer: str) -> Callable[[Any], str]:
    return lambda query: answer


def _gold(query: Any) -> str:
    if query.options:
        return "ABCD"[query.answer_index]
    return query.item.answers[0]


@pytest.mark.parametrize("name", list(SCENES))
def test_oracle_scores_one_and_constants_score_chance(scenes: dict[str, Any], name: str) -> None:
    path = scenes["bench"][name]
    assert _score(path, _gold)["accuracy"] == 1.0
    items, _ = read_benchmark(path)
    golds = Counter("ABCD"[i.answer_index] if i.type == "mc" else i.answers[0] for i in items)
    for constant, n in golds.most_common(2):
        accuracy = _score(path, _constant(str(constant)))["accuracy"]
        assert accuracy == pytest.approx(n / len(items))
    best = golds.most_common(1)[0][1] / len(items)
    chance = 0.5 if items[0].type == "pope" else 0.35
    assert best <= chance, (
        name,
        golds,
    )  # no constant answer does well: the benchmark is not trivial


def test_scenes_folders_give_scenes_benchmarks(scenes: dict[str, Any], tmp_path: Path) -> None:
    assert synthetic_names(scenes["root"]) == list(SCENES)
    assert all(is_synthetic(n) for n in [*SCENES, *SCENES_HIRES, *SYNTHETIC])
    assert not is_synthetic("bench.jsonl")
    # beside the data (what the end-of-stage evaluation reads): relative image paths resolve
    files = synthetic_for_shapes(scenes["root"])
    assert list(files) == list(SCENES)
    for path in files.values():
        items, rejected = read_benchmark(path)
        assert rejected == [] and items and all(i.image is not None for i in items)


# ----------------------------------------------------------------------------- resolution task


def _object_signal(
    image: Image.Image, box: list[float], colour: str, scale: float, offset: tuple[float, float]
) -> tuple[float, str]:
    """How much of the object's colour its most object-like pixel holds (0: background, 1: the
    object), and that pixel's nearest colour among the palette and the local background."""
    pixels = np.asarray(image).astype(float)
    x0, y0, x1, y1 = (v * scale + offset[i % 2] for i, v in enumerate(box))
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, max(2, int(np.ceil((x1 - x0) / 2)) + 1)
    near = pixels[
        max(0, int(cy) - r) : int(cy) + r + 1, max(0, int(cx) - r) : int(cx) + r + 1
    ].reshape(-1, 3)
    top, left = max(0, int(cy) - r - 4), max(0, int(cx) - r - 4)
    window = pixels[top : int(cy) + r + 5, left : int(cx) + r + 5]
    yy, xx = np.mgrid[top : top + window.shape[0], left : left + window.shape[1]]
    outside = (np.abs(yy - cy) > r + 1) | (np.abs(xx - cx) > r + 1)  # a ring around the box
    background = np.median(window[outside], axis=0)
    direction = np.array(COLOURS[colour], float) - background
    share = (near - background) @ direction / (direction @ direction)
    best = near[int(share.argmax())]
    candidates = np.vstack([np.array(list(COLOURS.values()), float), background])
    nearest = [*COLOURS, "background"][int(np.linalg.norm(candidates - best, axis=1).argmin())]
    return float(share.max()), nearest


def test_resolution_task_needs_resolution(tmp_path: Path) -> None:
    """Small objects: there at full size and after AnyRes tiling at a 64 px encoder, gone after
    LLaVA's pad-resize to 64 px; large ones (the control) survive both."""
    from vlmlab.models.anyres import (
        AnyResImages,
        parse_grid_pinpoints,
        resized_size,
        select_best_resolution,
    )
    from vlmlab.models.image_transform import ImageTransform

    paths = generate(HIRES, tmp_path)
    records = json.loads(paths["heldout"].read_text())
    pad = ImageTransform(size=64, mean=MEAN, std=STD, aspect="pad")
    pinpoints = parse_grid_pinpoints("(1x1),...,(4x4)", 64)
    anyres = AnyResImages(pinpoints, 64, MEAN, STD)
    sizes: Counter[tuple[int, int]] = Counter()
    signal: dict[tuple[str, str], list[tuple[float, bool]]] = {}
    for record in records:
        image = Image.open(tmp_path / "images" / record["image"]).convert("RGB")
        width, height = image.size
        sizes[(width, height)] += 1
        scale = 64 / max(width, height)
        views = {
            "full": (image, 1.0, (0.0, 0.0)),
            "pad64": (
                pad.geometry(image),
                scale,
                ((64 - width * scale) / 2, (64 - height * scale) / 2),
            ),
        }
        target = select_best_resolution(image.size, pinpoints, "transformers")
        inner = resized_size(image.size, target)
        canvas = Image.new("RGB", target)
        tiles = iter(anyres.geometry(image)[1:])
        for y in range(0, target[1], 64):
            for x in range(0, target[0], 64):
                canvas.paste(next(tiles), (x, y))
        views["anyres"] = (
            canvas,
            inner[0] / width,
            ((target[0] - inner[0]) // 2, (target[1] - inner[1]) // 2),
        )
        for obj in record["objects"]:
            for view, (picture, s, offset) in views.items():
                kept, nearest = _object_signal(picture, obj["box"], obj["colour"], s, offset)
                signal.setdefault((obj["size"], view), []).append((kept, nearest == obj["colour"]))
    assert set(sizes) == {(512, 256), (256, 512), (384, 192), (192, 384)}
    share = {k: float(np.median([s for s, _ in v])) for k, v in signal.items()}
    named = {k: float(np.mean([ok for _, ok in v])) for k, v in signal.items()}
    assert len(signal[("small", "full")]) >= 40
    assert named[("small", "full")] == 1.0 and share[("small", "full")] > 0.9
    assert named[("small", "anyres")] >= 0.95, named
    assert named[("small", "pad64")] <= 0.2 and share[("small", "pad64")] < 0.4, (named, share)
    assert named[("large", "pad64")] >= 0.95 and named[("large", "full")] == 1.0
    # the held-out question asks about a small object by its cell
    for record in records:
        target = record["objects"][record["target"]]
        assert target["size"] == "small" and record["answer"] == target["colour"]
        assert record["question"].startswith("What colour is the small shape")


# ----------------------------------------------------------------------------- shards + loader


@pytest.mark.parametrize("data", ["tiny_scenes", "tiny_scenes_hires"])
def test_shards_build_and_load_through_the_datamodule(
    compose_cfg: Callable[..., Any], data: str
) -> None:
    """The real source, shards and DataModule with the tiny model: every sample loads, none is
    skipped (over-length, no labels), and the synthetic benchmarks sit beside the data."""
    from vlmlab.data.build import build_datamodule
    from vlmlab.data.prepare import resolve_dataset
    from vlmlab.data.tokenize import TextEncoder
    from vlmlab.models import build_vlm
    from vlmlab.schema import DataConfig, typed

    cfg = compose_cfg(f"data={data}", "stage=2", tiny_data=False)
    model, tokenizer = build_vlm(cfg.encoder, cfg.connector, cfg.llm)
    data_cfg = typed(cfg.data, DataConfig)
    for dataset in ("align", "instruct", "text"):
        template = "plain" if dataset == "align" else str(cfg.stage.template)
        encoder = TextEncoder.for_model(model, tokenizer, template, data_cfg.max_length)
        resolved = resolve_dataset(data_cfg, dataset)
        module = build_datamodule(data_cfg, resolved, encoder, model.image_processor, seed=0)
        ids: list[str] = []
        skipped: Counter[str] = Counter()
        trained = 0
        for batch in module.train_dataloader():
            ids += batch["ids"]
            skipped.update(batch["skipped"])
            trained += int((batch["labels"] != -100).sum())
        assert skipped == Counter(), (dataset, skipped)
        assert len(ids) == len(set(ids)) == int(cfg.data.generator.num_images)
        assert trained > 0
    root = resolved["synthetic_root"]
    kind = "scenes_hires" if "hires" in data else "scenes"
    assert (
        root.name.startswith(f"{kind}-")
        and json.loads((root / "world.json").read_text())["kind"] == kind
    )
    assert list(synthetic_for_shapes(root)) == list(SCENES_HIRES if "hires" in data else SCENES)


def test_a_training_stage_scores_every_scenes_benchmark(tmp_path: Path) -> None:
    """`data=tiny_scenes eval=scenes`: the end-of-stage eval finds the scenes benchmarks by name
    (not as file paths) and logs each one's metric to MLflow."""
    from mlflow.tracking import MlflowClient

    from vlmlab.config import compose
    from vlmlab.train import train

    cfg = compose(
        [
            f"paths.root={tmp_path}",
            f"data.root={tmp_path / 'data'}",
            "data=tiny_scenes",
            "eval=scenes",
            "stage=1",
            "stage.evaluate=true",
            "trainer.max_steps=2",
        ]
    )
    train(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id])
    for name in cfg.eval.benchmarks:
        assert any(key.startswith(f"eval/{name}/") for key in run.data.metrics), (
            name,
            run.data.metrics.keys(),
        )
