"""Logging setup: one line per message, and third-party noise that says nothing about the run removed."""

from __future__ import annotations

import logging
import warnings

_NOISE = ("💡 Tip:",)
_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(str(record.msg).startswith(prefix) for prefix in _NOISE)


def setup_logging(level: int = logging.INFO) -> None:
    """Idempotent: configure the root logger if nobody has, and route Lightning through it."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=_FORMAT)
    lightning = logging.getLogger("lightning")
    for handler in list(lightning.handlers):  # `import lightning` adds its own console handler
        lightning.removeHandler(handler)
    for (
        handler
    ) in root.handlers:  # logger filters miss records of child loggers; handler filters don't
        if not any(isinstance(f, _DropNoise) for f in handler.filters):
            handler.addFilter(_DropNoise())
    # A frozen encoder is in eval mode on purpose (VisionLanguageModel.train keeps it there).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
