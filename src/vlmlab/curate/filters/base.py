"""The Filter contract and its registry: adding a content filter is one file in this package
(or a module named in $VLMLAB_CURATE_FILTERS) plus its settings under `filters:` in
conf/curate/default.yaml."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vlmlab.curate.sample import Sample
from vlmlab.registry import Registry

ENV_MODULES = "VLMLAB_CURATE_FILTERS"


@dataclass(frozen=True)
class Verdict:
    """Why an entry is rejected: the reason (the filter's name) and what showed it."""

    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


class NotJudged(Exception):
    """The filter cannot judge this entry (e.g. no reference captions): it is reported, kept."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class Filter:
    """A content filter. Subclasses set `name` (the config key and the rejection reason) and
    take their settings as keyword arguments (checked against `__init__` at composition)."""

    name: ClassVar[str] = ""

    def check(self, sample: Sample) -> Verdict | None:
        raise NotImplementedError

    def verdict(self, **evidence: Any) -> Verdict:
        return Verdict(self.name, evidence)


def setting_names(cls: type[Filter]) -> set[str]:
    """The settings a filter accepts: its `__init__` keyword arguments."""
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind is p.KEYWORD_ONLY}


FILTERS: Registry[type[Filter]] = Registry(
    "filter", "vlmlab.curate.filters", ENV_MODULES, key="filters"
)
