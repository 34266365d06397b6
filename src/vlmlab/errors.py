"""One exception type for bad configuration, so the CLI can print it without a traceback."""


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the key and says how to fix it."""

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key = key
        message = f"{key}: {problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)
