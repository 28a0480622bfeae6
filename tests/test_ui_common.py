"""studio.ui.common: a failed tab action becomes a message (curator text as is, bugs logged), never a traceback."""

from __future__ import annotations

import logging

from studio.ui.common import error_view, guarded

log = logging.getLogger("test_ui_common")


class CuratorError(ValueError):
    pass


def _fail(e: Exception):
    def action():
        raise e

    return action


def test_guarded_passes_results_and_turns_errors_into_messages(caplog) -> None:
    shown: list[str] = []

    def show(message: str) -> str:
        shown.append(message)
        return "error view"

    assert guarded(lambda: "view", show, (CuratorError,), log, "Tab action") == "view" and shown == []
    assert guarded(
        _fail(CuratorError("No effect called 'x'.")), show, (CuratorError,), log, "Tab action"
    ) == ("error view")
    assert shown == ["No effect called 'x'."] and caplog.text == ""  # curator errors are not bugs

    assert guarded(_fail(KeyError("disk on fire")), show, (CuratorError,), log, "Tab action") == "error view"
    assert shown[-1] == "Something unexpected went wrong (KeyError); the details are in the studio's log."
    assert "Tab action failed" in caplog.text and "disk on fire" in caplog.text


def test_error_view_falls_back_when_the_store_cannot_be_read(caplog) -> None:
    assert error_view(lambda: "full", lambda: "bare", log, "could not re-read") == "full"
    assert caplog.text == ""
    assert error_view(_fail(OSError("gone")), lambda: "bare", log, "could not re-read") == "bare"
    assert "could not re-read" in caplog.text and "gone" in caplog.text
