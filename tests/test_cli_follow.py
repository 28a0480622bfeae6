"""The commands' --wait: follow_run prints each change of a run once and ends with the run's outcome."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from studio import runs
from studio.commands import follow


def _view(status: str, step: int, loss: float | None = None, eta_s: float | None = None, error: str = ""):
    finished = status in ("succeeded", "failed", "stopped")
    metrics = {} if loss is None else {"loss": loss}
    return SimpleNamespace(
        status=status, step=step, total=4, eta_s=eta_s, metrics=metrics, error=error, finished=finished
    )


@pytest.fixture()
def script(monkeypatch: pytest.MonkeyPatch):
    """run_status answers from a list of views, one per call; sleeping is free."""
    views: list[SimpleNamespace] = []
    calls: list[int] = []

    def run_status(studio, run_id, log_lines=40):
        calls.append(run_id)
        return views[min(len(calls), len(views)) - 1]

    monkeypatch.setattr(runs, "run_status", run_status)
    monkeypatch.setattr(follow.time, "sleep", lambda s: None)
    return views, calls


def test_follow_prints_changes_once_and_succeeds(script, capsys) -> None:
    views, calls = script
    views += [
        _view("queued", 0),
        _view("running", 1, 0.5, eta_s=75),
        _view("running", 1, 0.5, eta_s=75),  # nothing new: no line
        _view("running", 3, 0.25, eta_s=4000),
        _view("succeeded", 4, 0.125, eta_s=0),
    ]
    assert follow.follow_run(None, 7, poll_s=0) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "run 7: queued 0/4 eta -",
        "run 7: running 1/4 eta 1m15s loss 0.5000",
        "run 7: running 3/4 eta 1h06m loss 0.2500",
        "run 7: succeeded 4/4 eta 0m00s loss 0.1250",
    ]
    assert out.err == "" and calls == [7] * 5


def test_follow_reports_a_failed_run(script, capsys) -> None:
    views, _ = script
    views += [_view("running", 2, 0.5), _view("failed", 2, error="out of memory")]
    assert follow.follow_run(None, 3, poll_s=0) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == ["run 3: running 2/4 eta - loss 0.5000", "run 3: failed 2/4 eta -"]
    assert out.err.strip() == "run 3 failed: out of memory"


def test_eta_text() -> None:
    assert [follow.eta_text(s) for s in (None, 0, 59.9, 61, 3599, 3600, 7325)] == [
        "-",
        "0m00s",
        "0m59s",
        "1m01s",
        "59m59s",
        "1h00m",
        "2h02m",
    ]
