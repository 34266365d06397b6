"""Registries: named classes of one kind, found by importing modules rather than kept in lists.

A registry imports every module of its package (pkgutil), then the modules named in an
environment variable (comma-separated, importable from `sys.path`), so a new entry is one file
here or one module of the user's, with no edit elsewhere. Scorers and chat templates use it.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
from collections.abc import Iterable
from typing import Generic, TypeVar

from vlmlab.errors import ConfigError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes of one kind by their `name` attribute.

    `kind` names the kind in messages ("template"); `key` is the config key the name is the
    value of (named in duplicate-name errors); `env` the variable that names outside modules.
    """

    def __init__(self, kind: str, package: str, env: str, key: str) -> None:
        self.kind, self.package, self.env, self.key = kind, package, env, key
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Add a class under its `name` (usable as a class decorator).

        Re-importing the same module replaces its class; another class under a taken name is
        refused.
        """
        name = getattr(cls, "name", "")
        if not name:
            raise TypeError(f"{cls.__qualname__} has no `name` (the value of {self.key})")
        old = self._classes.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise ConfigError(
                self.key,
                f"two {self.kind}s named {name!r}: {old.__module__}.{old.__qualname__} and "
                f"{cls.__module__}.{cls.__qualname__}.",
                f"give the new {self.kind} another `name`.",
            )
        self._classes[name] = cls
        return cls

    def discover(self, extra: Iterable[str] = (), extra_key: str = "") -> dict[str, T]:
        """Import the package's modules, then `extra` and $env modules; every class, by name."""
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_") and info.name != "base":
                importlib.import_module(f"{package.__name__}.{info.name}")
        env = [m.strip() for m in os.environ.get(self.env, "").split(",") if m.strip()]
        for module in [*extra, *env]:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ConfigError(
                    self.env if module in env else extra_key or self.env,
                    f"{self.kind} module {module!r} cannot be imported: {err}.",
                    f"name a module importable from sys.path (PYTHONPATH) that defines a "
                    f"{self.kind}.",
                ) from err
        return dict(sorted(self._classes.items()))

    def closest(self, name: str) -> str:
        """'did you mean ...? ' for an unknown name, or ''."""
        close = difflib.get_close_matches(str(name), list(self._classes), n=1)
        return f"did you mean {close[0]!r}? " if close else ""
