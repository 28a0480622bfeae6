"""Faults, with real worker processes: kill -9 of a teacher training and of a distillation at random
points (each resume continues from the last checkpoint, the row tells the truth, no file is torn, the
result equals an uninterrupted run), the UI killed with its process group while runs go, a full disk
and an unwritable data folder. The drivers are bench/reliability.py's, with small counts."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from bench import reliability as rel
from studio import runs
from studio.worker import curator_error


@pytest.fixture(autouse=True)
def _toy_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runs.EXTRA_JOB_MODULES_ENV, rel.TOY_JOBS)


def _ok(check: rel.Check) -> rel.Check:
    assert check.ok, "\n".join(check.problems)
    return check


def test_kill_9_teacher_training_resumes_to_the_same_teacher(tmp_path: Path) -> None:
    check = _ok(rel.teacher_kills(tmp_path, kills=1, seed=3))
    assert check.figures["kills"] == 1 and check.figures["resumed from the last checkpoint"] == "1/1"
    assert check.figures["final LoRA max |diff| vs uninterrupted"] <= 1e-4


def test_kill_9_distillation_resumes_to_the_same_student(tmp_path: Path) -> None:
    check = _ok(rel.distill_kills(tmp_path, kills=1, seed=5))
    assert check.figures["kills"] == 1 and check.figures["rows truthful after kill"] == "1/1"
    assert check.figures["final student max |diff| vs uninterrupted"] <= 1e-4


def test_runs_survive_the_ui_and_a_restarted_ui_shows_them(tmp_path: Path) -> None:
    check = _ok(rel.ui_kill(tmp_path, n_runs=2, steps=120))
    assert check.figures["workers alive after the UI was killed"] == 2
    assert check.figures["runs shown by the restarted UI"] == 2


def test_a_full_disk_stores_nothing_half_and_says_so(tmp_path: Path) -> None:
    check = _ok(rel.disk_full(tmp_path, simulate=True))  # ENOSPC after a few blobs, on any machine
    assert check.figures["blobs left by the failed import"] == 0
    assert check.figures["rows added by the failed import"] == 0


def test_a_run_that_hits_a_full_disk_says_what_to_do(tmp_path: Path) -> None:
    log = tmp_path / "runs" / "1" / "worker.log"
    for e in (
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
            '"No space left on device" })'
        ),  # fmt: skip
        RuntimeError("(sqlite3.OperationalError) database or disk is full"),
    ):
        text = curator_error(e, log, tmp_path)
        assert f"The disk holding the studio data folder ({tmp_path}) is full" in text
        assert "resume the run" in text and str(log) in text
    assert "disk" not in curator_error(ValueError("bad value"), log, tmp_path)


def test_an_unwritable_data_folder_is_a_clear_error(tmp_path: Path) -> None:
    check = _ok(rel.unwritable_data_dir(tmp_path))
    assert check.figures["cases"] >= 1
