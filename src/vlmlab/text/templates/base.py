"""Chat templates render a conversation into text segments, each marked as target or not.

Rendering to (text, is_target) segments keeps masking correct by construction: the whole
string is tokenised once and a token is a target exactly when it overlaps a target segment.
A segment whose text is a `DataText` came from the conversation (a dataset, a chat user): the
encoder never lets it become a control token (`</s>`, `<|im_end|>` ...), see
`vlmlab.data.tokenize`. Every built-in template puts each turn's text in a segment of its own.

Registry: a template is one `Template` subclass decorated with `@register`, in one file.
`discover()` imports every module of `vlmlab.text.templates` (pkgutil), then the modules named
in the environment variable `VLMLAB_TEMPLATES` (comma-separated, importable from `sys.path`),
so a template from outside the package needs no edit here; `llm.template` names it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from vlmlab.errors import ConfigError
from vlmlab.registry import Registry

ENV_MODULES = "VLMLAB_TEMPLATES"

Segment = tuple[str, bool]  # (text, is_target); the text is a DataText where it is data


class DataText(str):
    """Text from the conversation, not from the template: tokenised as text, never as the
    tokenizer's control tokens. A `str`, so code that joins segments needs no change."""

    __slots__ = ()


# How `<image>` tags are placed before rendering (`TextEncoder`, `data.image_placement`):
# `front`: LLaVA's `preprocess_multimodal` (every message holding the tag: tags removed, text
# stripped, `<image>\n` in front); `as_is`: the tag stays where the text puts it (HF processors).
IMAGE_PLACEMENTS = ("front", "as_is")
# What a sample whose text holds a control token's text gets (`data.special_text`):
# `reject`: skipped and counted (`special_token_text`); `as_text`: tokenised as plain text.
SPECIAL_TEXT_POLICIES = ("reject", "as_text")


@dataclass(frozen=True)
class Turn:
    role: str  # "human" | "gpt"
    text: str


class Template(ABC):
    """Base: `render` returns segments for training; `prompt` returns the text to generate from.

    A template that writes the tokenizer's end-of-sequence text sets `uses_eos` and a default
    `eos`; `get_template(name, eos_token)` then passes the tokenizer's own.
    """

    name: ClassVar[str] = ""
    adds_bos: ClassVar[bool] = True
    uses_eos: ClassVar[bool] = False
    # Tokenise the text between `<image>` tags piece by piece, as LLaVA's training code does
    # (`tokenizer_image_token`), instead of the whole string at once as HF processors do.
    image_pieces: ClassVar[bool] = False
    # Defaults of `data.image_placement` / `data.special_text` for this template (see above):
    # LLaVA's templates reproduce LLaVA's dataset, the others the HF processors' placement.
    image_placement: ClassVar[str] = "as_is"
    special_text: ClassVar[str] = "as_text"
    eos: str = ""  # the tokenizer's end-of-sequence text, where the template writes it
    eot: str = ""  # the text that ends an assistant reply

    def __init__(self, eos: str | None = None) -> None:
        if eos and self.uses_eos:
            self.eos = eos

    @abstractmethod
    def render(self, turns: list[Turn]) -> list[Segment]:
        """Segments (text, is_target) of a whole conversation."""

    def prompt_segments(self, turns: list[Turn]) -> list[Segment]:
        """Segments for generation: all turns, the last being a human turn, then the assistant
        cue (none is a target)."""
        check_prompt_turns(turns)
        return self.render(turns)

    def prompt(self, turns: list[Turn]) -> str:
        """Text for generation (`prompt_segments` joined)."""
        return "".join(text for text, _ in self.prompt_segments(turns))

    @property
    def stop(self) -> str:
        """Text that ends an assistant reply."""
        return self.eot


def check_prompt_turns(turns: list[Turn]) -> None:
    """A generation prompt ends with the human turn the model answers."""
    if not turns or turns[-1].role != "human":
        raise ValueError("a generation prompt needs turns that end with a human turn")


T = TypeVar("T", bound=type[Template])

TEMPLATES: Registry[type[Template]] = Registry(
    "template", "vlmlab.text.templates", ENV_MODULES, key="llm.template"
)


def register(cls: T) -> T:
    """Register a template class under its `name` (a class decorator).

    Explicit, not on subclassing: a test's throw-away subclass stays out of the registry.
    """
    TEMPLATES.register(cls)
    return cls


def discover() -> dict[str, type[Template]]:
    """Import every template module (this package, then $VLMLAB_TEMPLATES); the registry."""
    return TEMPLATES.discover()


def available_templates() -> list[str]:
    """The names `llm.template` / `stage.template` accept, after discovery, sorted."""
    return list(discover())


def get_template(name: str, eos_token: str | None = None, key: str = "stage.template") -> Template:
    """Template by name; `eos_token` is the tokenizer's, for templates that write it (vicuna_v1,
    mistral: the end of a reply; phi3: the end of the conversation). `key` names the config key
    in the error for an unknown name."""
    registry = discover()
    if name not in registry:
        hint = TEMPLATES.closest(name)
        raise ConfigError(key, f"unknown template {name!r}.", f"{hint}use one of {list(registry)}.")
    return registry[name](eos=eos_token)
