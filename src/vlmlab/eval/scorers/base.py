"""The scorer contract and its registry: a benchmark row's `type` names one `Scorer` subclass.

A scorer is one class in one file. Subclassing `Scorer` with a `name` registers it; `discover()`
imports every module of this package (pkgutil), then the user modules named in
`EXTRA_MODULES` or in the environment variable `VLMLAB_SCORERS` (comma-separated module names,
importable from `sys.path`), so a scorer outside the package needs no edit here:

    # my_lab/scorers/anls.py                      # VLMLAB_SCORERS=my_lab.scorers.anls vlmlab eval ...
    class ANLSScorer(Scorer):
        name = "anls"
        example = {"question": "Title?", "answer": "LLaVA"}
        example_right, example_wrong = "llava", "BLIP"
        def score(self, query, prediction): ...
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from vlmlab.errors import ConfigError

log = logging.getLogger(__name__)

ENV_MODULES = "VLMLAB_SCORERS"
EXTRA_MODULES: list[str] = []  # user scorer modules, imported by discover() (append to extend)
DEFAULT_TYPE = "exact"  # a row without `type`
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MC_PROMPT = "Answer with the option's letter from the given choices directly."


class RowError(ValueError):
    """A benchmark row that cannot be scored; the message is the reason reported for its line."""


@dataclass
class Item:
    """A validated benchmark row; `row` keeps the raw JSON for fields only one scorer reads."""

    id: str
    line: int
    question: str
    type: str
    answers: list[str]
    image: Path | None = None
    options: list[str] = field(default_factory=list)
    answer_index: int = -1  # mc: the correct option
    row: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Query:
    """One prompt sent to the model: an item, possibly with its options rotated (circular)."""

    item: Item
    text: str
    options: list[str]
    answer_index: int
    rotation: int = 0


Row = dict[str, Any]  # one line of predictions.jsonl: id, prediction, answers, score, type, ...


class Scorer:
    """One benchmark `type`: row checks, prompt, per-answer score and the summary metrics.

    Subclasses set `name` (the row `type`) and `example` (a valid row without `id`, with a
    right and a wrong prediction): tests run every registered scorer on its example.
    """

    name: ClassVar[str] = ""
    prompt: ClassVar[str | None] = None  # appended to the question with --short-answer-prompt
    example: ClassVar[dict[str, Any]] = {}
    example_right: ClassVar[str] = ""
    example_wrong: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            register(cls)

    def validate(self, item: Item) -> None:
        """Checks beyond question/answer/image; raise RowError, or fill fields from `item.row`."""

    def queries(self, item: Item, short_answer_prompt: bool, circular: bool) -> list[Query]:
        """The prompts for one item (one, unless a scorer asks several ways, like circular mc)."""
        text = item.question
        if short_answer_prompt and self.prompt:
            text += "\n" + self.prompt
        return [Query(item, text, [], -1)]

    def score(self, query: Query, prediction: str) -> float:
        """The score of one prediction, in [0, 1]."""
        raise NotImplementedError

    def item_score(self, scores: list[float]) -> float:
        """One item's score from its queries' scores (circular mc: all right)."""
        return scores[0]

    def metrics(self, rows: list[Row], *, mixed: bool, circular: bool) -> dict[str, float]:
        """Summary metrics beyond `accuracy` from this type's rows; `mixed`: other types present."""
        return {}


_REGISTRY: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Register a scorer class under its `name` (a class decorator; subclassing already does it).

    Re-importing the same module replaces its class; another class under a taken name is refused.
    """
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} has no `name` (the benchmark row `type` it scores)")
    old = _REGISTRY.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ConfigError(
            "type",
            f"two scorers for type {cls.name!r}: {old.__module__}.{old.__qualname__} and "
            f"{cls.__module__}.{cls.__qualname__}.",
            "give the new scorer another `name`.",
        )
    _REGISTRY[cls.name] = cls
    return cls


def discover() -> dict[str, type[Scorer]]:
    """Import every scorer module (this package, EXTRA_MODULES, $VLMLAB_SCORERS); the registry."""
    package = importlib.import_module(__package__ or "vlmlab.eval.scorers")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{package.__name__}.{info.name}")
    env = [m.strip() for m in os.environ.get(ENV_MODULES, "").split(",") if m.strip()]
    for module in [*EXTRA_MODULES, *env]:
        try:
            importlib.import_module(module)
        except ImportError as err:
            key = ENV_MODULES if module in env else "scorers.EXTRA_MODULES"
            raise ConfigError(
                key,
                f"scorer module {module!r} cannot be imported: {err}.",
                "name a module importable from sys.path (PYTHONPATH) that defines a Scorer.",
            ) from err
    return dict(sorted(_REGISTRY.items()))


def registered() -> list[str]:
    """The benchmark row types that have a scorer, after discovery, sorted."""
    return list(discover())


def get_scorer(name: str, registry: dict[str, type[Scorer]] | None = None) -> Scorer:
    """The scorer of a row type; a RowError listing the registered types for an unknown one."""
    registry = registry if registry is not None else discover()
    if name not in registry:
        raise RowError(f"type {name!r} is not one of {', '.join(registry)}")
    return registry[name]()
