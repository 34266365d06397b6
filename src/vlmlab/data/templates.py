"""Chat templates render a conversation into text segments, each marked as target or not.

Rendering to (text, is_target) segments keeps masking correct by construction: the whole
string is tokenised once and a token is a target exactly when it overlaps a target segment.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmlab.errors import ConfigError

IMAGE_PLACEHOLDER = "<image>"

Segment = tuple[str, bool]  # (text, is_target)


@dataclass(frozen=True)
class Turn:
    role: str  # "human" | "gpt"
    text: str


class Template:
    """Base: `render` returns segments for training; `prompt` returns the text to generate from."""

    name: str = ""
    adds_bos: bool = True

    def render(self, turns: list[Turn]) -> list[Segment]:
        raise NotImplementedError

    def prompt(self, turns: list[Turn]) -> str:
        """Text for generation: all turns, the last being a human turn, then the assistant cue."""
        raise NotImplementedError

    @property
    def stop(self) -> str:
        """Text that ends an assistant reply."""
        raise NotImplementedError


class PlainTemplate(Template):
    """LLaVA stage 1 (`plain`): the image followed by its caption; no system prompt, no roles."""

    name = "plain"
    sep = "\n"

    def render(self, turns: list[Turn]) -> list[Segment]:
        if len(turns) != 2 or turns[0].role != "human" or turns[1].role != "gpt":
            raise ValueError("plain template needs exactly one human turn and one gpt turn")
        # LLaVA's preprocess_plain keeps only the image of the human turn; the caption is the target.
        prefix = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in turns[0].text else ""
        return [(prefix, False), (turns[1].text + self.sep, True)]

    def prompt(self, turns: list[Turn]) -> str:
        return IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in turns[0].text else ""

    @property
    def stop(self) -> str:
        return self.sep


class VicunaV1Template(Template):
    """LLaVA-1.5 stage 2 (`vicuna_v1`): `SYSTEM USER: q ASSISTANT: a</s>USER: ...`."""

    name = "vicuna_v1"
    system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    roles = {"human": "USER", "gpt": "ASSISTANT"}

    def __init__(self, eos: str = "</s>") -> None:
        self.eos = eos

    def render(self, turns: list[Turn]) -> list[Segment]:
        segments: list[Segment] = [(self.system + " ", False)]
        for turn in turns:
            if turn.role == "human":
                segments.append((f"USER: {turn.text} ASSISTANT:", False))
            else:
                segments.append((f" {turn.text}{self.eos}", True))
        return segments

    def prompt(self, turns: list[Turn]) -> str:
        return "".join(text for text, _ in self.render(turns))

    @property
    def stop(self) -> str:
        return self.eos


_TEMPLATES: dict[str, type[Template]] = {"plain": PlainTemplate, "vicuna_v1": VicunaV1Template}


def get_template(name: str, eos_token: str | None = None) -> Template:
    """Template by name; `key` in errors is the config key that selected it."""
    if name not in _TEMPLATES:
        raise ConfigError(
            "stage.template", f"unknown template {name!r}.", f"use one of {sorted(_TEMPLATES)}."
        )
    cls = _TEMPLATES[name]
    if cls is VicunaV1Template and eos_token:
        return VicunaV1Template(eos=eos_token)
    return cls()
