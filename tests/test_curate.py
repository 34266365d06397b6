"""`vlmlab curate` on a generated set with planted defects: precision and recall per reason,
every exact duplicate caught, the same result whatever the order or worker count, bad input
reported with its line while nothing else is lost; the pieces (streaming reader, Hamming index,
blocked similarity search, filter registry) against brute force."""

from __future__ import annotations

import json
import random
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.curate.cli import main as curate_main
from vlmlab.curate.filters import FILTERS
from vlmlab.curate.images import centre_crop
from vlmlab.curate.lsh import HammingIndex
from vlmlab.curate.pipeline import curate
from vlmlab.curate.records import read_records
from vlmlab.curate.settings import compose_curate
from vlmlab.curate.similarity import similar_pairs
from vlmlab.data.synthetic_llava import make_image
from vlmlab.errors import ConfigError

OBJECTS = [
    "dog",
    "cat",
    "car",
    "bench",
    "bicycle",
    "umbrella",
    "bus",
    "horse",
    "chair",
    "cup",
    "clock",
    "bird",
    "boat",
    "train",
    "kite",
    "pizza",
    "laptop",
    "book",
    "vase",
    "sheep",
]
QUESTIONS = [
    "<image>\nWhat objects are in the picture?",
    "Describe the scene briefly.\n<image>",
    "<image>\nWhat do you notice first?",
    "<image>\nWhere are the objects placed?",
]
REPLIES = [
    "The {a} is on the left and the {b} is on the right side of the photo.",
    "I can see a {a} close to a {b}; the {a} looks larger than the {b}.",
    "A {a} stands in front of a {b} under bright daylight.",
    "Yes, there is a {b} just behind the {a}.",
    "A small {a} waits beside a {b} on a quiet street corner.",
]
GENERIC = [
    "This picture shows a scene with various things in it.",
    "It is a beautiful picture.",
    "There are many things in the image.",
    "The image contains various objects and interesting details.",
    "This is a photo.",
    "It looks like a typical scene, nothing special.",
    "The photo shows some things in a setting.",
    "An image of something.",
]
META = [
    "As an AI language model, I cannot see the image, but a {a} is likely there.",
    "I'm sorry, but I can't determine the colour of the {a} from this image.",
    "I am unable to view images; please describe it.",
    "As an AI, I don't have the ability to see pictures.",
    "Sorry, I cannot help with that request.",
    "I cannot see the image clearly, but the {a} seems near the {b}.",
    "Unfortunately, I can't provide details about that.",
    "My training data does not include this kind of picture.",
]
LANGUAGE = [  # other scripts and other Latin-script languages
    "一只狗坐在长椅旁边，旁边有一辆自行车，天气很好。",  # noqa: RUF001
    "Der Hund sitzt neben der Bank und schaut auf die Straße hinaus, ganz ruhig.",
    "Собака сидит на скамейке рядом с велосипедом и смотрит на улицу.",  # noqa: RUF001
    "Le chien est assis près du banc et regarde tranquillement la rue devant lui.",
]
# Which pipeline reasons a planted label is caught by.
CAUGHT_BY = {
    "generic": {"generic"},
    "meta": {"meta"},
    "format": {"format"},
    "hallucination": {"hallucination"},
    "language": {"language"},
    "exact_duplicate": {"exact_duplicate"},
    "image_duplicate": {"near_duplicate_image", "semantic_duplicate"},
}
REASON_LABEL = {r: label for label, rs in CAUGHT_BY.items() for r in rs}


def _turns(*values: str) -> list[dict[str, str]]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def _jpeg(image: Image.Image, path: Path, quality: int = 90) -> None:
    image.convert("RGB").save(path, "JPEG", quality=quality)


def build_planted(root: Path, seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """A LLaVA set (images under root/img) with defects planted; truth: id -> label ('clean')."""
    rng = random.Random(seed)
    img = root / "img"
    img.mkdir(parents=True)
    entries: list[dict[str, Any]] = []
    truth: dict[str, str] = {}
    originals: list[tuple[dict[str, Any], Image.Image]] = []
    counter = iter(range(10_000))

    def add(
        label: str,
        prefix: str,
        objects: tuple[str, str],
        conversations: Any,
        image: Image.Image | None = None,
        image_name: str | None = None,
    ) -> dict[str, Any]:
        n = next(counter)
        entry: dict[str, Any] = {"id": f"{prefix}{n:04d}"}
        if image is not None or image_name:
            if image_name is None:
                image_name = f"{n:04d}.jpg"
                _jpeg(image, img / image_name)  # type: ignore[arg-type]
            entry["image"] = image_name
        a, b = objects
        entry["captions"] = [f"A {a} next to a {b}.", f"There is a {a} and a {b} in the scene."]
        entry["conversations"] = conversations
        entries.append(entry)
        truth[entry["id"]] = label
        return entry

    def objects() -> tuple[str, str]:
        a, b = rng.sample(OBJECTS, 2)
        return a, b

    def picture() -> Image.Image:
        return make_image(rng, 160, 128)

    for _ in range(60):  # clean, one image each, some with two rounds
        a, b = objects()
        reply = rng.choice(REPLIES).format(a=a, b=b)
        values = [rng.choice(QUESTIONS), reply]
        if rng.random() < 0.3:
            values += ["How many objects are there?", f"There are two: one {a} and one {b}."]
        image = picture()
        originals.append((add("clean", "c", (a, b), _turns(*values), image), image))
    for i in range(6):  # clean text-only
        add(
            "clean",
            "t",
            ("dog", "cat"),
            _turns(f"Name a pet, number {i}.", "A dog is a common pet."),
        )
    for text in GENERIC:
        add("generic", "g", objects(), _turns(rng.choice(QUESTIONS), text), picture())
    for text in META:
        a, b = objects()
        add("meta", "m", (a, b), _turns(rng.choice(QUESTIONS), text.format(a=a, b=b)), picture())
    for text in LANGUAGE:
        add("language", "l", ("dog", "bench"), _turns(rng.choice(QUESTIONS), text), picture())
    a, b = "dog", "bench"
    good = f"The {a} is resting next to the {b} in the sun."
    broken = [
        [{"from": "gpt", "value": good}, {"from": "human", "value": "<image>\nWhat is this?"}],
        _turns("<image>\nWhat is this?", "Describe more.", good)
        and [
            {"from": "human", "value": "<image>\nHi"},
            {"from": "human", "value": "What?"},
            {"from": "gpt", "value": good},
        ],
        _turns("<image>\nWhat is this?", good, "And now?"),
        _turns("<image>\nWhat is this?", "   "),
        _turns("What is this?", good),  # <image> missing
        _turns("<image>\n<image>\nWhat is this?", good),  # <image> twice
        _turns("<image>\nWhat is this?", f"The {a} is standing right next to the"),
        _turns("<image>\nWhat is this?", f"There is a {a}, a {b},"),
        _turns("<image>\nList them.", f"Here they are:\n```\n- {a}\n- {b}\n"),
        _turns("<image>\nWhat is this?", f"The {a} is next to the {b}.</s>"),
        [{"from": "human", "value": "<image>\nWhat?"}, {"from": "assistant", "value": good}],
    ]
    for conversations in broken:
        add("format", "f", (a, b), conversations, picture())
    for _ in range(8):  # hallucinated: the reply names an object the captions do not
        a, b = objects()
        extra = rng.choice([o for o in OBJECTS if o not in (a, b)])
        reply = f"A {a} sits near a {b}, and a {extra} is in the background."
        add("hallucination", "h", (a, b), _turns(rng.choice(QUESTIONS), reply), picture())
    for i, (source, _) in enumerate(originals[:8]):  # exact duplicates, some via a copied file
        copy = json.loads(json.dumps(source))
        for turn in copy["conversations"]:
            if i % 2:  # case and spacing differ, the text does not
                upper = turn["value"].replace("<image>", "\0").upper().replace("\0", "<image>")
                turn["value"] = "  " + upper.replace(" ", "  ") + " "
        name = source["image"]
        if i % 3 == 0:
            name = f"copy_{i}.jpg"
            shutil.copy(img / source["image"], img / name)
        a, b = source["captions"][0][2:-1].split(" next to a ")
        add("exact_duplicate", "x", (a, b), copy["conversations"], image_name=name)
    edits = [
        ("reencoded", lambda im: im, 45),
        ("cropped", lambda im: centre_crop(im, 0.88), 90),
        ("resized", lambda im: im.resize((80, 64), Image.Resampling.BILINEAR), 90),
    ]
    for i, (source, image) in enumerate(originals[8:20]):  # near-duplicate images, new text
        kind, edit, quality = edits[i % 3]
        a, b = source["captions"][0][2:-1].split(" next to a ")
        name = f"{kind}_{i}.jpg"
        _jpeg(edit(image), img / name, quality)
        reply = f"Here a {a} and a {b} share the frame, seen from a little distance."
        add("image_duplicate", "y", (a, b), _turns(rng.choice(QUESTIONS), reply), image_name=name)
    return entries, truth


def scores(out: Path, truth: dict[str, str]) -> dict[str, tuple[float, float, int, int]]:
    """label -> (precision, recall, flagged, planted); an entry counts for every reason it got."""
    rows = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {row["id"]: set(row["reasons"]) for row in rows}
    result = {}
    for label, caught_by in CAUGHT_BY.items():
        flagged = [i for i, rs in reasons.items() if rs & caught_by]
        planted = [i for i, t in truth.items() if t == label]
        true_pos = sum(truth[i] == label for i in flagged)
        precision = true_pos / len(flagged) if flagged else 1.0
        recall = sum(1 for i in planted if reasons.get(i, set()) & caught_by) / len(planted)
        result[label] = (precision, recall, len(flagged), len(planted))
    return result


@pytest.fixture(scope="module")
def planted(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[dict[str, Any]], dict[str, str]]:
    root = tmp_path_factory.mktemp("planted")
    entries, truth = build_planted(root)
    (root / "data.json").write_text(json.dumps(entries, indent=1))
    return root, entries, truth


def test_planted_defects_precision_and_recall(planted: Any, tmp_path: Path) -> None:
    root, _, truth = planted
    result = curate(compose_curate([], "tiny"), root / "data.json", root / "img", tmp_path)
    table = scores(tmp_path, truth)
    print("\nreason              precision  recall  flagged  planted")
    for label, (p, r, flagged, n) in table.items():
        print(f"{label:<20}{p:>9.2f}{r:>8.2f}{flagged:>9}{n:>9}")
    floors = {"exact_duplicate": (1.0, 1.0)}  # every planted exact duplicate, nothing else
    for label, (p, r, _, _) in table.items():
        want_p, want_r = floors.get(label, (0.9, 0.85))
        assert p >= want_p and r >= want_r, (label, table[label])
    clean = [i for i, t in truth.items() if t == "clean"]
    kept = {e["id"] for e in json.loads((tmp_path / "kept.json").read_text())}
    assert sum(i in kept for i in clean) >= 0.95 * len(clean)
    assert result.summary["kept"] == len(kept)
    # evidence: the phrase, the kept duplicate's id, the similarity or bit distance
    rows = {
        r["id"]: r for r in map(json.loads, (tmp_path / "rejected.jsonl").read_text().splitlines())
    }
    dup = next(r for r in rows.values() if r["reason"] == "exact_duplicate")
    assert truth[dup["evidence"]["exact_duplicate"]["duplicate_of"]] == "clean"
    near = next(r for r in rows.values() if r["reason"] == "near_duplicate_image")
    assert 0 <= near["evidence"]["near_duplicate_image"]["hamming"] <= 8
    assert "phrase" in next(r for r in rows.values() if r["reason"] == "meta")["evidence"]["meta"]
    report = (tmp_path / "report.md").read_text()
    assert "| exact_duplicate | 8 |" in report and "Nearest-neighbour cosine" in report
    assert Image.open(tmp_path / "report.png").size[0] > 100
    # the kept entries are what `vlmlab shards` takes: it rejects none of them
    from vlmlab.data.convert import main as shards_main

    assert (
        shards_main(
            [
                str(tmp_path / "kept.json"),
                "--image-root",
                str(root / "img"),
                "--out",
                str(tmp_path / "shards"),
            ]
        )
        == 0
    )
    assert (tmp_path / "shards" / "rejected.jsonl").read_text() == ""


def _decisions(out: Path) -> tuple[set[str], set[tuple[str, str, str]]]:
    kept = {e["id"] for e in json.loads((out / "kept.json").read_text())}
    rejected = set()
    for row in map(json.loads, (out / "rejected.jsonl").read_text().splitlines()):
        evidence = row["evidence"][row["reason"]]
        rejected.add((row["id"], row["reason"], str(evidence.get("duplicate_of", ""))))
    return kept, rejected


def test_same_result_whatever_the_order_or_workers(planted: Any, tmp_path: Path) -> None:
    root, entries, _ = planted
    reference = tmp_path / "a"
    curate(compose_curate([], "tiny"), root / "data.json", root / "img", reference)
    shuffled = list(entries)
    random.Random(7).shuffle(shuffled)
    data = tmp_path / "shuffled.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in shuffled))
    other = tmp_path / "b"
    curate(
        compose_curate(
            ["workers=3", "dedup.semantic.batch_size=7", "dedup.semantic.block=16"], "tiny"
        ),
        data,
        root / "img",
        other,
    )
    kept_a, rejected_a = _decisions(reference)
    kept_b, rejected_b = _decisions(other)
    assert kept_a == kept_b
    assert rejected_a == rejected_b
    assert any(r[1] == "exact_duplicate" for r in rejected_a)


def test_bad_input_is_reported_with_its_line_and_nothing_else_is_lost(tmp_path: Path) -> None:
    rng = random.Random(3)
    (tmp_path / "img").mkdir()
    good = []
    for i in range(5):
        _jpeg(make_image(rng, 96, 80), tmp_path / "img" / f"{i}.jpg")
        good.append(
            {
                "id": f"ok{i}",
                "image": f"{i}.jpg",
                "captions": ["A dog on a bench."],
                "conversations": _turns(
                    "<image>\nWhat is here?", f"A dog lies on a bench, photo {i}."
                ),
            }
        )
    no_refs = {
        "id": "norefs",
        "image": "4.jpg",
        "conversations": _turns("<image>\nAnd here?", "A cat sleeps on the sofa by the window."),
    }
    missing = {
        "id": "missing",
        "image": "nowhere.jpg",
        "captions": ["A dog."],
        "conversations": _turns("<image>\nWhat?", "A dog."),
    }
    lines = [
        json.dumps(good[0]),
        json.dumps(good[1]),
        "{this is not json",
        json.dumps(missing),
        json.dumps(good[2]),
        "",
        json.dumps(no_refs),
        json.dumps(good[3]),
        "[1, 2]",
        json.dumps(good[4]),
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = curate_main(
        [
            str(data),
            "--image-root",
            str(tmp_path / "img"),
            "--out",
            str(out),
            "--preset",
            "tiny",
            "dedup.semantic.enabled=false",
        ]
    )
    assert code == 0
    bad = [json.loads(line) for line in (out / "bad_input.jsonl").read_text().splitlines()]
    assert [(b["line"], b["reason"], b["kept"]) for b in bad] == [
        (3, "bad_json", False),
        (4, "missing_image", False),
        (7, "no_references", True),
        (9, "not_an_object", False),
    ]
    assert "nowhere.jpg" in bad[1]["detail"]
    kept = [e["id"] for e in json.loads((out / "kept.json").read_text())]
    assert kept == ["ok0", "ok1", "ok2", "norefs", "ok3", "ok4"]
    assert (out / "rejected.jsonl").read_text() == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["entries"] == 9 and summary["bad_input_dropped"] == 3


def test_the_array_reader_streams_across_chunk_boundaries(tmp_path: Path) -> None:
    values: list[Any] = [
        {"id": i, "text": "x" * (i * 7 % 23), "n": [i, -i, 1.5]} for i in range(40)
    ]
    values[5] = 12345  # a number cut by a chunk boundary must not decode short
    path = tmp_path / "a.json"
    path.write_text("[\n" + ",\n".join(json.dumps(v) for v in values) + "\n]\n")
    for chunk in (3, 7, 64, 1 << 20):
        records = list(read_records(path, chunk=chunk))
        assert [r.entry if r.entry is not None else 12345 for r in records] == values
        assert [r.line for r in records] == list(range(2, 42))
        assert records[5].error.startswith("not_an_object")
    path.write_text('[{"id": 1}, {"id": 2} {"id": 3}]')
    with pytest.raises(ConfigError, match=r"line 1: not a JSON array \(expected ','"):
        list(read_records(path, chunk=4))


def test_hamming_index_finds_exactly_the_brute_force_pairs() -> None:
    rng = np.random.default_rng(0)
    hashes = [int(x) for x in rng.integers(0, 2**63, size=300, dtype=np.int64)]
    for i in range(60):  # near copies at 0-10 bits
        flips = rng.choice(64, size=int(rng.integers(0, 11)), replace=False)
        hashes.append(hashes[i] ^ sum(1 << int(b) for b in flips))
    index = HammingIndex(hashes, bands=4)
    for max_distance in (3, 8):
        for h in hashes[:120]:
            brute = [
                (j, (h ^ x).bit_count())
                for j, x in enumerate(hashes)
                if (h ^ x).bit_count() <= max_distance
            ]
            assert index.query(h, max_distance) == brute


def test_blocked_similarity_equals_all_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    near = torch.nn.functional.normalize(
        base[:20] + 0.05 * torch.randn(20, 16, generator=g), dim=-1
    )
    vectors = torch.cat([base, near])
    full = vectors @ vectors.T
    expected = {(i, j) for i in range(70) for j in range(i + 1, 70) if full[i, j] >= 0.95}
    pairs, nearest = similar_pairs(vectors, 0.95, block=16, use_faiss=False)
    assert {(i, j) for i, j, _ in pairs} == expected and len(expected) >= 20
    full.fill_diagonal_(-2)
    assert np.allclose(nearest, full.max(dim=1).values.numpy(), atol=1e-6)


def test_every_registered_filter_has_settings_and_switches_off() -> None:
    registered = FILTERS.discover()
    cfg = compose_curate([], "tiny")
    assert set(registered) == set(cfg.filters), (
        "each filter needs an entry in conf/curate/default.yaml"
    )
    from vlmlab.curate.pipeline import build_filters

    for name in registered:
        off = compose_curate([f"filters.{name}.enabled=false"], "tiny")
        assert name not in [f.name for f in build_filters(off)]
    with pytest.raises(
        ConfigError, match=r"filters.generic.simlarity: unknown key \(did you mean 'similarity'"
    ):
        compose_curate(["+filters.generic.simlarity=0.5"], "tiny")


def test_a_new_filter_is_one_module_and_one_config_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shouting_filter.py").write_text(
        textwrap.dedent("""
        from vlmlab.curate.filters.base import FILTERS, Filter

        @FILTERS.register
        class Shouting(Filter):
            name = "shouting"

            def __init__(self, *, share: float = 0.5) -> None:
                self.share = share

            def check(self, sample):
                letters = [c for r in sample.replies for c in r if c.isalpha()]
                upper = sum(c.isupper() for c in letters) / max(1, len(letters))
                return self.verdict(upper=upper) if upper > self.share else None
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("VLMLAB_CURATE_FILTERS", "shouting_filter")
    data = tmp_path / "d.jsonl"
    rows = [
        {"id": "a", "conversations": _turns("Hi", "HELLO THERE, FRIEND.")},
        {"id": "b", "conversations": _turns("Hi", "Hello there, friend.")},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_curate(["+filters.shouting.enabled=true", "dedup.semantic.enabled=false"], "tiny")
    curate(cfg, data, None, tmp_path / "out")
    rejected = [
        json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()
    ]
    assert [(r["id"], r["reason"]) for r in rejected] == [("a", "shouting")]
    sys.modules.pop("shouting_filter", None)


def test_semantic_stage_alone_finds_resized_and_reencoded_copies(
    planted: Any, tmp_path: Path
) -> None:
    """With perceptual hashing off, the encoder embeddings (tiny random-init tower, threshold
    0.99) still find the resized and re-encoded copies; crops need a trained encoder."""
    root, _, truth = planted
    curate(
        compose_curate(["dedup.image.enabled=false"], "tiny"),
        root / "data.json",
        root / "img",
        tmp_path,
    )
    precision, recall, flagged, _ = scores(tmp_path, truth)["image_duplicate"]
    rows = [json.loads(x) for x in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    semantic = [r for r in rows if r["reason"] == "semantic_duplicate"]
    assert precision == 1.0 and recall >= 0.6 and len(semantic) == flagged
    assert all(r["evidence"]["semantic_duplicate"]["similarity"] >= 0.99 for r in semantic)


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "curate").glob("*.yaml"))
)
def test_every_curate_preset_composes_and_validates(preset: str) -> None:
    cfg = compose_curate(["encoder.pretrained=false"], preset)  # no weights: nothing downloads
    assert cfg.filters and cfg.dedup.semantic.threshold > 0
    with pytest.raises(ConfigError, match=r"dedup.image.band: unknown key \(did you mean 'bands'"):
        compose_curate(["+dedup.image.band=2"], preset)


def test_report_png_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmlab.curate.report import draw_png

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails: PIL draws the bars
    nearest = np.array([0.5, 0.9, 0.99, -1.0], dtype=np.float32)
    draw_png(tmp_path / "r.png", {"kept": 10, "meta": 3}, nearest, 0.95, 10)
    image = Image.open(tmp_path / "r.png")
    assert image.size == (800, 300) and len(image.getcolors(1 << 16) or []) > 2
