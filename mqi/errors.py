"""Errors a user or operator can act on; each message names the problem and what to do."""


class MqiError(Exception):
    """Base for errors shown to users as one clear line (no traceback)."""


class ConfigError(MqiError):
    """The settings are invalid; `problems` lists every one found, `source` where they are
    (the settings file, the environment) when that is not the settings file alone."""

    def __init__(self, problems: list[str], *, source: str | None = None):
        self.problems = problems
        self.source = source
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
