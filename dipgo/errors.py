"""The error types whose message is meant for the user, on the ground floor.

Every floor raises them (the model registry, the adapters, the plan builders, the config
composer), and the CLI and the sweep runner catch them to print one sentence and exit 2. They
live here, importing nothing of dipgo, so that catching them never pulls an upper floor in.
"""

from __future__ import annotations

from collections.abc import Sequence


class ConfigError(ValueError):
    """A config that cannot be composed or validated; the message is one sentence for the user."""


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model it is applied to."""


class UnsupportedModelError(ValueError):
    """The model (or its data) is not one that the requested gate kind knows how to gate."""


class ModelLoadError(ValueError):
    """A model name, path or hub id that cannot be loaded; the message is one sentence."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user (one sentence, exit 2)."""
    return (ConfigError, ModelLoadError, PlanError, UnsupportedModelError, FileNotFoundError)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (a missing file named by its path)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename:
        text = f"no such file or folder: {exc.filename}"
    return " ".join(text.split())


def one_of(key: str, value: object, accepted: Sequence[object]) -> None:
    """Refuse ``key=value`` with a :class:`ConfigError` unless ``value`` is one of ``accepted``."""
    if value not in accepted:
        raise ConfigError(f"{key}={value!r} is not supported; accepted: {', '.join(map(str, accepted))}")
