"""Chat templates: one `Template` per file of this package, chosen by `llm.template`.

Built in: plain, vicuna_v1, llama3, chatml, mistral, phi3. A module named in
`$VLMLAB_TEMPLATES` adds more (see `base`); `available_templates()` lists them all.
"""

from __future__ import annotations

from vlmlab.text.templates.base import (
    ENV_MODULES,
    IMAGE_PLACEMENTS,
    SPECIAL_TEXT_POLICIES,
    DataText,
    Segment,
    Template,
    Turn,
    available_templates,
    check_prompt_turns,
    discover,
    get_template,
    register,
)

__all__ = [
    "ENV_MODULES",
    "IMAGE_PLACEMENTS",
    "SPECIAL_TEXT_POLICIES",
    "DataText",
    "Segment",
    "Template",
    "Turn",
    "available_templates",
    "check_prompt_turns",
    "discover",
    "get_template",
    "register",
]
