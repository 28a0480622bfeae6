"""What the tabs share: a failed action shows a message in the tab's error box, never a traceback.

Curator errors (the tab's ``CURATOR_ERRORS``) carry text written for curators and are shown as they
are; anything else is a bug: a plain note for the page, the traceback for the studio's log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

V = TypeVar("V")


def unexpected_message(e: BaseException) -> str:
    return f"Something unexpected went wrong ({type(e).__name__}); the details are in the studio's log."


def guarded(
    action: Callable[[], V],
    show_error: Callable[[str], V],
    curator_errors: tuple[type[Exception], ...],
    log: logging.Logger,
    what: str,
) -> V:
    """``action()``; if it raises, ``show_error(message)`` (a bug's traceback is logged as "``what`` failed")."""
    try:
        return action()
    except curator_errors as e:
        return show_error(str(e))
    except Exception as e:
        log.exception("%s failed", what)
        return show_error(unexpected_message(e))


def error_view(render: Callable[[], V], fallback: Callable[[], V], log: logging.Logger, what: str) -> V:
    """``render()``: the view re-read with the error in it; if even that fails (the store cannot be read),
    ``fallback()``, a view with the message alone, and the traceback logged as "``what``"."""
    try:
        return render()
    except Exception:
        log.exception("%s", what)
        return fallback()
