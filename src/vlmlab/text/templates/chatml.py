"""ChatML as Qwen2 Instruct uses it (`chatml`), Qwen/Qwen2-7B-Instruct and Qwen2-0.5B-Instruct.

Source: the `chat_template` of those repos' tokenizer_config.json: a default system message
`'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n'`, then per message
`'<|im_start|>' + role + '\\n' + content + '<|im_end|>' + '\\n'`, generation prompt
`'<|im_start|>assistant\\n'`. Qwen2 tokenizers have no BOS.
"""

from __future__ import annotations

from vlmlab.text.templates.base import DataText, Segment, Template, Turn, register


@register
class ChatMLTemplate(Template):
    name = "chatml"
    adds_bos = False
    system = "You are a helpful assistant."
    eot = "<|im_end|>"

    def render(self, turns: list[Turn]) -> list[Segment]:
        segments: list[Segment] = [(f"<|im_start|>system\n{self.system}{self.eot}\n", False)]
        for turn in turns:
            text = DataText(turn.text)
            if turn.role == "human":
                cue = f"{self.eot}\n<|im_start|>assistant\n"
                segments += [("<|im_start|>user\n", False), (text, False), (cue, False)]
            else:
                segments += [(text, True), (self.eot, True), ("\n", False)]
        return segments
