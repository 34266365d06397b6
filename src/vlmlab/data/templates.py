"""Chat templates render a conversation into text segments, each marked as target or not.

Rendering to (text, is_target) segments keeps masking correct by construction: the whole
string is tokenised once and a token is a target exactly when it overlaps a target segment.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from vlmlab.errors import ConfigError

IMAGE_PLACEHOLDER = "<image>"

Segment = tuple[str, bool]  # (text, is_target)


@dataclass(frozen=True)
class Turn:
    role: str  # "human" | "gpt"
    text: str


class Template(ABC):
    """Base: `render` returns segments for training; `prompt` returns the text to generate from."""

    name: str = ""
    adds_bos: bool = True
    eot: str = ""  # the text that ends an assistant reply
    # Tokenise the text between `<image>` tags piece by piece, as LLaVA's training code does
    # (`tokenizer_image_token`), instead of the whole string at once as HF processors do.
    image_pieces: bool = False

    @abstractmethod
    def render(self, turns: list[Turn]) -> list[Segment]:
        """Segments (text, is_target) of a whole conversation."""

    def prompt(self, turns: list[Turn]) -> str:
        """Text for generation: all turns, the last being a human turn, then the assistant cue."""
        _check_prompt_turns(turns)
        return "".join(text for text, _ in self.render(turns))

    @property
    def stop(self) -> str:
        """Text that ends an assistant reply."""
        return self.eot


def _check_prompt_turns(turns: list[Turn]) -> None:
    if not turns or turns[-1].role != "human":
        raise ValueError("a generation prompt needs turns that end with a human turn")


class PlainTemplate(Template):
    """LLaVA stage 1 (`plain`): the image followed by its caption; no system prompt, no roles."""

    name = "plain"
    sep = "\n"
    image_pieces = True

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
    image_pieces = True
    system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    roles = {"human": "USER", "gpt": "ASSISTANT"}

    def __init__(self, eos: str = "</s>") -> None:
        self.eos = self.eot = eos

    def render(self, turns: list[Turn]) -> list[Segment]:
        segments: list[Segment] = [(self.system + " ", False)]
        for turn in turns:
            if turn.role == "human":
                segments.append((f"USER: {turn.text} ASSISTANT:", False))
            else:
                segments.append((f" {turn.text}{self.eos}", True))
        return segments


class Llama3Template(Template):
    """Llama-3 Instruct (`llama3`), meta-llama/Meta-Llama-3-8B-Instruct.

    Source: the `chat_template` of that repo's tokenizer_config.json: bos_token, then per message
    `'<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + content | trim + '<|eot_id|>'`,
    generation prompt `'<|start_header_id|>assistant<|end_header_id|>\\n\\n'`; no default system
    prompt. `<|begin_of_text|>` is the tokenizer's BOS, added by its post-processor (`adds_bos`).
    """

    name = "llama3"
    eot = "<|eot_id|>"

    @staticmethod
    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def render(self, turns: list[Turn]) -> list[Segment]:
        segments: list[Segment] = []
        for turn in turns:
            text = turn.text.strip()  # Jinja `| trim`
            if turn.role == "human":
                user = self.header("user") + text + self.eot + self.header("assistant")
                segments.append((user, False))
            else:
                segments.append((text + self.eot, True))
        return segments


class ChatMLTemplate(Template):
    """ChatML as Qwen2 Instruct uses it (`chatml`), Qwen/Qwen2-7B-Instruct and Qwen2-0.5B-Instruct.

    Source: the `chat_template` of those repos' tokenizer_config.json: a default system message
    `'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n'`, then per message
    `'<|im_start|>' + role + '\\n' + content + '<|im_end|>' + '\\n'`, generation prompt
    `'<|im_start|>assistant\\n'`. Qwen2 tokenizers have no BOS.
    """

    name = "chatml"
    adds_bos = False
    system = "You are a helpful assistant."
    eot = "<|im_end|>"

    def render(self, turns: list[Turn]) -> list[Segment]:
        segments: list[Segment] = [(f"<|im_start|>system\n{self.system}{self.eot}\n", False)]
        for turn in turns:
            if turn.role == "human":
                user = f"<|im_start|>user\n{turn.text}{self.eot}\n<|im_start|>assistant\n"
                segments.append((user, False))
            else:
                segments += [(turn.text + self.eot, True), ("\n", False)]
        return segments


class MistralTemplate(Template):
    """Mistral Instruct v0.1/v0.2 (`mistral`): `[INST] q [/INST] a</s> [INST] q2 [/INST] a2</s>`.

    Source: mistral_common's InstructTokenizerV1 (Mistral's reference: BOS, then each user turn
    `[INST] q [/INST]` and each reply `a` + EOS, every piece SentencePiece-encoded on its own, so
    each starts with the dummy-prefix space), equal to the repo's Jinja
    `bos_token + (' [INST] ' + q + ' [/INST]' | ' ' + a + eos_token)*`. The space after `<s>` in
    that Jinja text is the SentencePiece dummy prefix, which the tokenizer adds itself at the start
    of the text; so the text here starts at `[INST]` and the tokenizer adds BOS.
    """

    name = "mistral"

    def __init__(self, eos: str = "</s>") -> None:
        self.eos = self.eot = eos

    def render(self, turns: list[Turn]) -> list[Segment]:
        segments: list[Segment] = []
        for i, turn in enumerate(turns):
            if turn.role == "human":
                segments.append(((" " if i else "") + f"[INST] {turn.text} [/INST]", False))
            else:
                segments.append((f" {turn.text}{self.eos}", True))
        return segments


class Phi3Template(Template):
    """Phi-3 (`phi3`), microsoft/Phi-3-mini-4k-instruct.

    Source: the `chat_template` of that repo's tokenizer_config.json: per message
    `'<|user|>\\n' + content + '<|end|>\\n'` / `'<|assistant|>\\n' + content + '<|end|>\\n'`, then
    `'<|assistant|>\\n'` as the generation prompt, else `eos_token` (`<|endoftext|>`) after the last
    message. No BOS: the template has none and the tokenizer's `add_bos_token` is false.
    """

    name = "phi3"
    adds_bos = False
    eot = "<|end|>"

    def __init__(self, eos: str = "<|endoftext|>") -> None:
        self.eos = eos

    def _turns(self, turns: list[Turn]) -> list[Segment]:
        segments: list[Segment] = []
        for turn in turns:
            if turn.role == "human":
                segments.append((f"<|user|>\n{turn.text}{self.eot}\n<|assistant|>\n", False))
            else:
                segments += [(turn.text + self.eot, True), ("\n", False)]
        return segments

    def render(self, turns: list[Turn]) -> list[Segment]:
        return [*self._turns(turns), (self.eos, False)]

    def prompt(self, turns: list[Turn]) -> str:
        _check_prompt_turns(turns)
        return "".join(text for text, _ in self._turns(turns))

    @property
    def stop(self) -> str:
        return self.eot


_TEMPLATES: dict[str, type[Template]] = {
    cls.name: cls
    for cls in (
        PlainTemplate,
        VicunaV1Template,
        Llama3Template,
        ChatMLTemplate,
        MistralTemplate,
        Phi3Template,
    )
}
_TAKES_EOS = (VicunaV1Template, MistralTemplate, Phi3Template)


def get_template(name: str, eos_token: str | None = None) -> Template:
    """Template by name (`stage.template`); `eos_token` is the tokenizer's, for templates that
    write it (vicuna_v1, mistral: the end of a reply; phi3: the end of the conversation)."""
    if name not in _TEMPLATES:
        raise ConfigError(
            "stage.template", f"unknown template {name!r}.", f"use one of {sorted(_TEMPLATES)}."
        )
    cls = _TEMPLATES[name]
    if eos_token and issubclass(cls, _TAKES_EOS):
        return cls(eos=eos_token)  # type: ignore[call-arg]
    return cls()
