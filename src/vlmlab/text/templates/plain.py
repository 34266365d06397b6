"""LLaVA stage 1 (`plain`): the image followed by its caption; no system prompt, no roles."""

from __future__ import annotations

from vlmlab.text import IMAGE_PLACEHOLDER
from vlmlab.text.templates.base import (
    DataText,
    Segment,
    Template,
    Turn,
    check_prompt_turns,
    register,
)


@register
class PlainTemplate(Template):
    name = "plain"
    sep = "\n"
    image_pieces = True
    image_placement = "front"  # LLaVA's preprocess_multimodal
    special_text = "reject"  # LLaVA trains nothing on most such samples (see README)

    def render(self, turns: list[Turn]) -> list[Segment]:
        if len(turns) != 2 or turns[0].role != "human" or turns[1].role != "gpt":
            raise ValueError("plain template needs exactly one human turn and one gpt turn")
        # LLaVA's preprocess_plain keeps only the image of the human turn; the caption is the target.
        prefix = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in turns[0].text else ""
        return [(prefix, False), (DataText(turns[1].text), True), (self.sep, True)]

    def prompt_segments(self, turns: list[Turn]) -> list[Segment]:
        check_prompt_turns(turns)
        return [(IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in turns[0].text else "", False)]

    @property
    def stop(self) -> str:
        return self.sep
