"""Llama-3 Instruct (`llama3`), meta-llama/Meta-Llama-3-8B-Instruct.

Source: the `chat_template` of that repo's tokenizer_config.json: bos_token, then per message
`'<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + content | trim + '<|eot_id|>'`,
generation prompt `'<|start_header_id|>assistant<|end_header_id|>\\n\\n'`; no default system
prompt. `<|begin_of_text|>` is the tokenizer's BOS, added by its post-processor (`adds_bos`).
"""

from __future__ import annotations

from vlmlab.text.templates.base import DataText, Segment, Template, Turn, register


@register
class Llama3Template(Template):
    name = "llama3"
    eot = "<|eot_id|>"

    @staticmethod
    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def render(self, turns: list[Turn]) -> list[Segment]:
        segments: list[Segment] = []
        for turn in turns:
            text = DataText(turn.text.strip())  # Jinja `| trim`
            if turn.role == "human":
                cue = self.eot + self.header("assistant")
                segments += [(self.header("user"), False), (text, False), (cue, False)]
            else:
                segments += [(text, True), (self.eot, True)]
        return segments
