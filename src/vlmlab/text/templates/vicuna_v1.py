"""LLaVA-1.5 stage 2 (`vicuna_v1`): `SYSTEM USER: q ASSISTANT: a</s>USER: ...`."""

from __future__ import annotations

from vlmlab.text.templates.base import DataText, Segment, Template, Turn, register


@register
class VicunaV1Template(Template):
    name = "vicuna_v1"
    image_pieces = True
    image_placement = "front"  # LLaVA's preprocess_multimodal
    special_text = "reject"  # LLaVA trains nothing on most such samples (see README)
    uses_eos = True
    eos = "</s>"
    system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )

    def __init__(self, eos: str | None = None) -> None:
        super().__init__(eos)
        self.eot = self.eos  # a reply ends with the tokenizer's EOS

    def render(self, turns: list[Turn]) -> list[Segment]:
        segments: list[Segment] = [(self.system + " ", False)]
        for turn in turns:
            if turn.role == "human":
                segments += [
                    ("USER: ", False),
                    (DataText(turn.text), False),
                    (" ASSISTANT:", False),
                ]
            else:
                segments += [(" ", True), (DataText(turn.text), True), (self.eos, True)]
        return segments
