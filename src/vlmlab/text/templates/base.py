"""Chat templates render a conversation into text segments, each marked as target or not.

Rendering to (text, is_target) segments keeps masking correct by construction: the whole
string is tokenised once and a token is a target exactly when it overlaps a target segment.

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

Segment = tuple[str, bool]  # (text, is_target)


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
    eos: str = ""  # the tokenizer's end-of-sequence text, where the template writes it
    eot: str = ""  # the text that ends an assistant reply

    def __init__(self, eos: str | None = None) -> None:
        if eos and self.uses_eos:
            self.eos = eos

    @abstractmethod
    def render(self, turns: list[Turn]) -> list[Segment]:
        """Segments (text, is_target) of a whole conversation."""

    def prompt(self, turns: list[Turn]) -> str:
        """Text for generation: all turns, the last being a human turn, then the assistant cue."""
        check_prompt_turns(turns)
        return "".join(text for text, _ in self.render(turns))

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
