"""Hallucinated objects: a COCO category named in a reply but in none of the entry's reference
captions or box labels (the CHAIR idea). Words map to categories through a synonym list
(conf/curate/lexicon/coco_objects.txt); the longest phrase wins ("teddy bear" is not a bear);
a mention right after a negation ("no dog", "without a car") does not count. An entry without
references cannot be judged: it is reported (`no_references`) and kept."""

from __future__ import annotations

import re

from vlmlab.curate.filters.base import FILTERS, Filter, NotJudged, Verdict
from vlmlab.curate.lexicon import read_lines
from vlmlab.curate.sample import Sample

_WORD = re.compile(r"[a-z]+")
_NEGATIONS = frozenset(["no", "not", "without", "nor", "neither", "never", "none"])


def _plurals(words: tuple[str, ...]) -> list[tuple[str, ...]]:
    last = words[-1]
    forms = {last, last + "s", last + "es"}
    if last.endswith("y"):
        forms.add(last[:-1] + "ies")
    return [(*words[:-1], f) for f in forms]


class Vocabulary:
    """Phrase (tuple of words) -> category, from `category: synonym, ...` lines."""

    def __init__(self, lines: list[str]) -> None:
        self.phrases: dict[tuple[str, ...], str] = {}
        for line in lines:
            category, _, synonyms = line.partition(":")
            for synonym in [category, *synonyms.split(",")]:
                words = tuple(_WORD.findall(synonym.lower()))
                if words:
                    for form in _plurals(words):
                        self.phrases.setdefault(form, category.strip())
        self.longest = max((len(p) for p in self.phrases), default=1)

    def mentions(self, text: str) -> set[str]:
        """Categories the text names, negated mentions left out."""
        words = _WORD.findall(text.lower())
        found: set[str] = set()
        i = 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                category = self.phrases.get(tuple(words[i : i + n]))
                if category is not None:
                    before = words[max(0, i - 3) : i]
                    if not _NEGATIONS.intersection(before):
                        found.add(category)
                    i += n
                    break
            else:
                i += 1
        return found


@FILTERS.register
class HallucinationFilter(Filter):
    name = "hallucination"

    def __init__(
        self,
        *,
        vocabulary: str = "lexicon/coco_objects.txt",
        max_hallucinated: int = 0,
        report_unreferenced: bool = True,
    ) -> None:
        self.vocabulary = Vocabulary(read_lines(vocabulary, "filters.hallucination.vocabulary"))
        self.max_hallucinated = max_hallucinated
        self.report_unreferenced = report_unreferenced

    def check(self, sample: Sample) -> Verdict | None:
        references = sample.references
        if references is None:
            if not self.report_unreferenced:  # mixes where most entries have no captions
                return None
            raise NotJudged("no_references", "no `captions` or `boxes` to check objects against")
        present: set[str] = set()
        for ref in references:
            present |= self.vocabulary.mentions(ref)
            label = ref.strip().lower()
            if label in self.vocabulary.phrases.values():  # a box label that is a category name
                present.add(label)
        named: set[str] = set()
        for reply in sample.replies:
            named |= self.vocabulary.mentions(reply)
        extra = sorted(named - present)
        if len(extra) > self.max_hallucinated:
            return self.verdict(objects=extra, references=sorted(present))
        return None
