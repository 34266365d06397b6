"""Phi-3 (`phi3`), microsoft/Phi-3-mini-4k-instruct.

Source: the `chat_template` of that repo's tokenizer_config.json: per message
`'<|user|>\\n' + content + '<|end|>\\n'` / `'<|assistant|>\\n' + content + '<|end|>\\n'`, then
`'<|assistant|>\\n'` as the generation prompt, else `eos_token` (`<|endoftext|>`) after the last
message. No BOS: the template has none and the tokenizer's `add_bos_token` is false.
"""

from __future__ import annotations

from vlmlab.text.templates.base import (
    DataText,
    Segment,
    Template,
    Turn,
    check_prompt_turns,
    register,
)


@register
class Phi3Template(Template):
    name = "phi3"
    adds_bos = False
    uses_eos = True
    eos = "<|endoftext|>"  # ends the conversation, not a reply
    eot = "<|end|>"

    def _turns(self, turns: list[Turn]) -> list[Segment]:
        segments: list[Segment] = []
        for turn in turns:
            text = DataText(turn.text)
            if turn.role == "human":
                cue = f"{self.eot}\n<|assistant|>\n"
                segments += [("<|user|>\n", False), (text, False), (cue, False)]
            else:
                segments += [(text, True), (self.eot, True), ("\n", False)]
        return segments

    def render(self, turns: list[Turn]) -> list[Segment]:
        return [*self._turns(turns), (self.eos, False)]

    def prompt_segments(self, turns: list[Turn]) -> list[Segment]:
        check_prompt_turns(turns)
        return self._turns(turns)
