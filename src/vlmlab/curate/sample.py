"""What the filters see of an entry: its turns, replies and references, parsed once."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from vlmlab.text import IMAGE_TOKEN

_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_text(text: str) -> str:
    """NFKC, lower case, `<image>` and punctuation dropped, spaces collapsed: what 'the same text'
    means for exact duplicates and phrase matching."""
    text = unicodedata.normalize("NFKC", text).replace(IMAGE_TOKEN, " ").lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


@dataclass(frozen=True)
class Turn:
    role: str  # the raw `from` value
    text: str  # the raw `value`


@dataclass
class Sample:
    """An entry as the filters read it. `key` orders entries: duplicates keep the smallest."""

    index: int
    line: int
    entry: dict[str, Any]
    turns: list[Turn] = field(default_factory=list)
    structure_error: str = ""  # conversations missing or not a list of {from, value} objects

    @property
    def id(self) -> str:
        return str(self.entry.get("id", ""))

    @property
    def image(self) -> str | None:
        image = self.entry.get("image")
        return str(image) if image else None

    @property
    def replies(self) -> list[str]:
        """The assistant turns (`gpt`), where generic answers, refusals and objects live."""
        return [t.text for t in self.turns if t.role == "gpt"]

    @property
    def references(self) -> list[str] | None:
        """Reference captions and box labels (COCO style), or None when the entry has none."""
        found: list[str] = []
        captions = self.entry.get("captions")
        if isinstance(captions, str):
            found.append(captions)
        elif isinstance(captions, list):
            found += [str(c) for c in captions]
        for box in self.entry.get("boxes") or []:
            if isinstance(box, dict):
                label = box.get("label", box.get("category", box.get("name")))
                if label:
                    found.append(str(label))
        return found or None

    def text_hash(self) -> str:
        """Hash of the normalised conversation with roles: the text half of an exact duplicate."""
        joined = "\n".join(f"{t.role}:{normalize_text(t.text)}" for t in self.turns)
        return hashlib.sha256(joined.encode()).hexdigest()[:32]

    def key(self) -> tuple[str, str]:
        """(id, text hash): order-free, so the representative kept does not depend on order."""
        return (self.id, self.text_hash())


def parse_sample(index: int, line: int, entry: dict[str, Any]) -> Sample:
    """A Sample; a malformed `conversations` becomes `structure_error`, judged by the format filter."""
    sample = Sample(index, line, entry)
    turns = entry.get("conversations")
    if not isinstance(turns, list):
        sample.structure_error = "conversations is missing or not a list"
        return sample
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            sample.structure_error = f"turn {i} is not an object with a string `value`"
            return sample
        sample.turns.append(Turn(str(turn.get("from", "")), turn["value"]))
    return sample
