"""Errors that mean "the input is wrong", shown to a user as one line, not a traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class DataError(ValueError):
    """A data file, entry or option cannot be used; the message names it and says what to do.

    The command line prints it as one line and exits with status 2 (set ``ALBEF_PL_TRACEBACK=1``
    to see where it was raised). It is a ``ValueError``, so code that catches those still does.
    """


def data_errors(what: str) -> Callable[[F], F]:
    """Decorate a data module method (``setup``) so that the ``ValueError`` or ``OSError`` its
    file checks raise reach the user as a :class:`DataError` prefixed with ``what``."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except DataError:
                raise
            except (ValueError, OSError) as err:
                raise DataError(f"{what.format(cls=type(self).__name__)}: {err}") from err

        return inner  # type: ignore[return-value]

    return wrap


__all__ = ["DataError", "data_errors"]
