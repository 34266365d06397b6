"""Mistral Instruct v0.1/v0.2 (`mistral`): `[INST] q [/INST] a</s> [INST] q2 [/INST] a2</s>`.

Source: mistral_common's InstructTokenizerV1 (Mistral's reference: BOS, then each user turn
`[INST] q [/INST]` and each reply `a` + EOS, every piece SentencePiece-encoded on its own, so
each starts with the dummy-prefix space), equal to the repo's Jinja
`bos_token + (' [INST] ' + q + ' [/INST]' | ' ' + a + eos_token)*`. The space after `<s>` in
that Jinja text is the SentencePiece dummy prefix, which the tokenizer adds itself at the start
of the text; so the text here starts at `[INST]` and the tokenizer adds BOS.
"""

from __future__ import annotations

from vlmlab.text.templates.base import DataText, Segment, Template, Turn, register


@register
class MistralTemplate(Template):
    name = "mistral"
    uses_eos = True
    eos = "</s>"

    def __init__(self, eos: str | None = None) -> None:
        super().__init__(eos)
        self.eot = self.eos  # a reply ends with the tokenizer's EOS

    def render(self, turns: list[Turn]) -> list[Segment]:
        segments: list[Segment] = []
        for i, turn in enumerate(turns):
            text = DataText(turn.text)
            if turn.role == "human":
                opener = (" " if i else "") + "[INST] "
                segments += [(opener, False), (text, False), (" [/INST]", False)]
            else:
                segments += [(" ", True), (text, True), (self.eos, True)]
        return segments
