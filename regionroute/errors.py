"""User-facing errors and the one-line reporting used by every stage.

A :class:`UserError` is a problem with the user's input (params, data files, CLI
arguments). Stages print it as one line and exit non-zero, without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

__all__ = ["ConfigError", "DataError", "UserError", "exit_on_user_error"]


class UserError(Exception):
    """An error caused by the user's input; its message is the whole report."""


class ConfigError(UserError, ValueError):
    """A params.yaml key is missing, unknown, mistyped or out of range."""


class DataError(UserError, ValueError):
    """A data file (annotations, image, mask, manifest) is missing or invalid."""


F = TypeVar("F", bound=Callable[..., int])


def exit_on_user_error(fn: F) -> F:
    """Wrap a stage ``main``: a :class:`UserError` becomes ``error: <msg>`` and exit code 2."""

    @wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> int:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
