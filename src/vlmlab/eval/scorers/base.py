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

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from vlmlab.errors import ConfigError
from vlmlab.registry import Registry

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
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}  # setting -> its values, first = default
    example: ClassVar[dict[str, Any]] = {}
    example_right: ClassVar[str] = ""
    example_wrong: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            register(cls)

    def __init__(self, **settings: str) -> None:
        """`settings` pick among `choices` (e.g. vqa `mode`); a missing one takes its default."""
        for key, value in settings.items():
            if key not in self.choices:
                raise ValueError(
                    f"{self.name} has no setting {key!r} (it has: {sorted(self.choices)})"
                )
            if value not in self.choices[key]:
                raise ValueError(
                    f"{self.name}.{key} is {value!r}, not one of {', '.join(self.choices[key])}"
                )
        self.settings = {key: settings.get(key, values[0]) for key, values in self.choices.items()}

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


SCORERS: Registry[type[Scorer]] = Registry("scorer", "vlmlab.eval.scorers", ENV_MODULES, key="type")


def register(cls: type[Scorer]) -> type[Scorer]:
    """Register a scorer class under its `name` (subclassing already does it)."""
    return SCORERS.register(cls)


def discover() -> dict[str, type[Scorer]]:
    """Import every scorer module (this package, EXTRA_MODULES, $VLMLAB_SCORERS); the registry."""
    return SCORERS.discover(EXTRA_MODULES, extra_key="scorers.EXTRA_MODULES")


def registered() -> list[str]:
    """The benchmark row types that have a scorer, after discovery, sorted."""
    return list(discover())


Settings = dict[str, dict[str, str]]  # {row type: {setting: value}}, e.g. {"vqa": {"mode": ...}}


def get_scorer(
    name: str, registry: dict[str, type[Scorer]] | None = None, settings: Settings | None = None
) -> Scorer:
    """The scorer of a row type with its `settings`; a RowError listing the types for an unknown one."""
    registry = registry if registry is not None else discover()
    if name not in registry:
        raise RowError(f"type {name!r} is not one of {', '.join(registry)}")
    return registry[name](**(settings or {}).get(name, {}))


def resolve_settings(settings: Settings | None, key: str = "eval.scoring") -> Settings:
    """Every registered scorer's settings, defaults filled in: what a summary records.

    Why: a score means little without the rule that produced it (VQAv2's modes differ on the
    same answers), so the summary and the MLflow run carry the resolved values, not just the
    overrides. An unknown type, setting or value is a ConfigError naming `key`.
    """
    registry = discover()
    given = dict(settings or {})
    for kind in given:
        if kind not in registry:
            raise ConfigError(
                f"{key}.{kind}", f"no scorer type {kind!r}.", f"use one of {', '.join(registry)}."
            )
    resolved: Settings = {}
    for kind, cls in registry.items():
        if not cls.choices and not given.get(kind):
            continue
        try:
            resolved[kind] = cls(
                **{k: str(v) for k, v in dict(given.get(kind) or {}).items()}
            ).settings
        except ValueError as err:
            raise ConfigError(f"{key}.{kind}", str(err), "see the scorer table in README.") from err
    return resolved
