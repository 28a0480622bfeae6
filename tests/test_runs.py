"""The run launcher: real worker processes running the toy job of tests/toy_jobs.py.

End to end: submit -> succeeded with curves and checkpoints; stop (DB request and SIGTERM) ->
stopped with a checkpoint, resume continues from it; kill -9 -> reconcile marks the run failed
with a resumable message, resume continues from the last checkpoint; an exception -> failed
with its message; runs on one device are served one at a time in creation order. In process:
the DbReporter's throttling, ETA, checkpoints and samples; reconcile's liveness rules; the CLI.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import event, func, select
from studio_fixtures import run_row, wait_run

from storage import Checkpoint, Run, RunMetric, RunStatus, utcnow
from studio import runs
from studio.cli import main
from studio.config import StudioConfig
from studio.context import Studio

TOY = "eval:toy-count"  # registered by tests/toy_jobs.py, which the workers import


@pytest.fixture()
def studio(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Studio:
    monkeypatch.setenv(runs.EXTRA_JOB_MODULES_ENV, "tests.toy_jobs")
    return Studio.open(StudioConfig(data_dir=data_dir))


def _wait_finished(studio: Studio, run_id: int, timeout: float = 60.0) -> Run:
    return wait_run(studio, run_id, lambda r: r.status.finished, timeout, "a final status")


def _assert_nothing_active(studio: Studio) -> None:
    with studio.session() as s:
        active = s.scalars(select(Run).where(Run.status.in_(runs.ACTIVE))).all()
    assert active == [], "a worker left an active row behind"


def _losses(studio: Studio, run_id: int) -> list[int]:
    """Steps of every stored 'loss' row, duplicates included."""
    with studio.session() as s:
        return list(
            s.scalars(
                select(RunMetric.step)
                .where(RunMetric.run_id == run_id, RunMetric.name == "loss")
                .order_by(RunMetric.step)
            )
        )


def _toy(n: int, device: str, **extra) -> dict:
    return {"n": n, "device": device, **extra}


# -- end to end, with worker processes -------------------------------------------------------


def test_submit_succeeds_with_curves_checkpoints_and_samples(studio: Studio) -> None:
    rid = runs.submit(studio, TOY, _toy(30, "d", sleep=0.02, every=10, samples_at=5), name="toy")
    run = _wait_finished(studio, rid)
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert (run.step, run.total_steps, run.progress) == (30, 30, 1.0)
    assert run.started_at <= run.finished_at and run.error is None
    assert run.metrics["last_step"] == 30 and run.metrics["resumed_from"] == 0
    assert run.metrics["loss"] == pytest.approx(1 / 30)
    # every step's metrics reached the DB, each once
    assert runs.metric_series(studio, rid, "loss") == [(i, pytest.approx(1 / i)) for i in range(1, 31)]
    assert _losses(studio, rid) == list(range(1, 31))
    assert [p[1] for p in runs.metric_series(studio, rid, "twice")] == [2.0 * i for i in range(1, 31)]
    # checkpoints: relative paths, real hashes
    with studio.session() as s:
        ckpts = s.scalars(select(Checkpoint).where(Checkpoint.run_id == rid).order_by(Checkpoint.step)).all()
    assert [c.step for c in ckpts] == [10, 20, 30]
    assert ckpts[0].path == f"runs/{rid}/checkpoints/step-000010.json"
    file = studio.config.data_dir / ckpts[0].path
    assert ckpts[0].sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert ckpts[0].bytes == file.stat().st_size
    # the sample grid is a PNG in the blob store
    grid = Image.open(io.BytesIO(studio.blobs.read_bytes(run.metrics["samples_sha"], "png")))
    assert grid.size == (8, 8) and run.metrics["samples_step"] == 5
    view = runs.run_status(studio, rid)
    assert view.status == "succeeded" and view.kind == TOY and view.checkpoint.step == 30
    assert "_job" not in view.config and view.config["n"] == 30
    assert f"run {rid} ended: succeeded" in view.log_tail
    assert [v.id for v in runs.list_runs(studio, kind="eval")] == [rid]
    assert runs.list_runs(studio, kind="teacher") == []
    with pytest.raises(runs.RunError, match="already finished"):
        runs.resume(studio, rid)
    _assert_nothing_active(studio)


def test_stop_and_sigterm_checkpoint_then_resume_continues(studio: Studio) -> None:
    a = runs.submit(studio, TOY, _toy(150, "a", sleep=0.02, every=50))
    b = runs.submit(studio, TOY, _toy(150, "b", sleep=0.02, every=50))
    wait_run(studio, a, lambda r: r.status == RunStatus.RUNNING and r.step >= 3, what="running")
    # STOPPED when its worker checkpoints and stops before the request re-reads the row (a loaded machine)
    assert runs.request_stop(studio, a) in (RunStatus.STOPPING, RunStatus.STOPPED)
    run_b = wait_run(studio, b, lambda r: r.status == RunStatus.RUNNING and r.step >= 3, what="running")
    os.kill(run_b.pid, signal.SIGTERM)

    for rid in (a, b):
        run = _wait_finished(studio, rid)
        assert run.status == RunStatus.STOPPED, run.error
        ckpt = runs.last_checkpoint(studio, rid)
        assert 3 <= ckpt.step < 150 and ckpt.step == run.step == run.metrics["last_step"]
    assert "SIGTERM" in runs.log_tail(studio, b)

    stopped_at = runs.last_checkpoint(studio, a).step
    runs.resume(studio, a)
    run = _wait_finished(studio, a)
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert run.metrics["resumed_from"] == stopped_at > 0
    assert _losses(studio, a) == list(range(1, 151))  # no gap, no step twice
    _assert_nothing_active(studio)


def test_kill_9_is_noticed_and_resume_uses_the_last_checkpoint(studio: Studio) -> None:
    rid = runs.submit(studio, TOY, _toy(100, "d", sleep=0.01, every=30, hang_at=70))
    run = wait_run(studio, rid, lambda r: r.step == 70, what="step 70")
    os.kill(run.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not runs.reconcile(studio) and time.monotonic() < deadline:
        time.sleep(0.05)
    run = run_row(studio, rid)
    assert run.status == RunStatus.FAILED
    assert "disappeared" in run.error and "resume to continue from step 60" in run.error
    assert max(_losses(studio, rid)) == 70  # points past the checkpoint, redone after resume

    runs.resume(studio, rid)
    run = _wait_finished(studio, rid)
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert run.metrics["resumed_from"] == 60
    assert _losses(studio, rid) == list(range(1, 101))
    _assert_nothing_active(studio)


def test_failures_are_recorded_and_a_run_gets_one_worker(studio: Studio) -> None:
    bad = runs.submit(studio, TOY, _toy(10, "a", sleep=0.01, fail_at=3))
    # A second worker for a run that already has one (two clicks) leaves it alone.
    taken = runs.create_run(studio, TOY, _toy(20, "c", sleep=0.01))
    lock = runs.lock_path(studio.config.data_dir, f"run-{taken}", prefix="")
    lock.parent.mkdir(parents=True, exist_ok=True)
    held = open(lock, "a+")
    fcntl.flock(held, fcntl.LOCK_EX)  # as the first worker does
    cmd = [sys.executable, "-m", "studio.worker", str(taken), "--data-dir", str(studio.config.data_dir)]
    second = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    run = _wait_finished(studio, bad)
    assert run.status == RunStatus.FAILED
    assert run.error.startswith("ValueError: toy failure at step 3")
    assert "worker.log" in run.error
    assert "Traceback" in runs.log_tail(studio, bad) and "toy failure" in runs.log_tail(studio, bad)
    assert _losses(studio, bad) == [1, 2]  # the curve up to the failure is kept

    assert second.wait(timeout=30) == 1 and "already has a worker" in second.stderr.read()
    held.close()
    run = run_row(studio, taken)
    assert (run.status, run.pid, run.started_at) == (RunStatus.QUEUED, None, None)
    assert runs.request_stop(studio, taken) == RunStatus.STOPPED
    _assert_nothing_active(studio)


def test_one_run_per_device_in_creation_order(studio: Studio, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    first = runs.submit(studio, TOY, _toy(10, "gpu", sleep=0.01, gate=str(gate)))
    second, third, fourth = (runs.create_run(studio, TOY, _toy(5, "gpu", sleep=0.01)) for _ in range(3))
    for rid in (fourth, third, second):  # launched newest first: still served oldest first
        runs.launch(studio, rid)
    with pytest.raises(runs.RunError, match="already has a worker"):
        runs.launch(studio, first)
    wait_run(studio, first, lambda r: r.status == RunStatus.RUNNING, what="running")
    run = wait_run(studio, second, lambda r: r.metrics.get("waiting_for") == f"run {first}", what="waiting")
    assert run.status == RunStatus.QUEUED and runs.run_status(studio, second).waiting_for == f"run {first}"
    wait_run(studio, third, lambda r: "waiting_for" in r.metrics, what="waiting")
    wait_run(studio, fourth, lambda r: "waiting_for" in r.metrics, what="waiting")
    assert runs.request_stop(studio, fourth) == RunStatus.STOPPING  # stop it while it waits
    gate.touch()

    done = [_wait_finished(studio, rid) for rid in (first, second, third, fourth)]
    assert [r.status for r in done] == [RunStatus.SUCCEEDED] * 3 + [RunStatus.STOPPED]
    spans = [(r.metrics["t_start"], r.metrics["t_end"]) for r in done[:3]]
    assert spans[0][1] <= spans[1][0] and spans[1][1] <= spans[2][0], spans  # never overlapping
    assert done[3].started_at is None and done[3].metrics == {}  # never ran; queue note cleared
    _assert_nothing_active(studio)


# -- in process ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_reporter_throttles_writes_but_keeps_every_point(studio: Studio) -> None:
    rid = runs.create_run(studio, TOY, _toy(200, "d"))
    updates = []
    event.listen(
        studio.engine,
        "before_cursor_execute",
        lambda conn, cur, stmt, *a: updates.append(stmt) if stmt.startswith("UPDATE runs") else None,
    )
    clock = FakeClock()
    rep = runs.DbReporter(studio, rid, clock=clock)
    for step in range(1, 101):  # 100 steps/s for one second: one write (the first)
        clock.t = (step - 1) * 0.01
        rep.progress(step, 200, {"loss": 1.0 / step})
    assert len(updates) == 1 and run_row(studio, rid).step == 1
    assert len(_losses(studio, rid)) == 1
    rep.close()
    run = run_row(studio, rid)
    assert (run.step, run.total_steps, run.progress) == (100, 200, 0.5)
    assert run.metrics["eta_s"] == pytest.approx(1.0, abs=0.02)  # 100 steps left at 100 steps/s
    assert _losses(studio, rid) == list(range(1, 101))
    for step in range(101, 201):
        clock.t = 1.5 + (step - 101) * 0.001
        rep.progress(step, 200, {"loss": 1.0 / step})
    run = run_row(studio, rid)  # the last step is always written
    assert (run.step, run.progress) == (200, 1.0) and _losses(studio, rid) == list(range(1, 201))


def test_eta_counts_what_the_trainer_says_the_remaining_steps_cost(studio: Studio) -> None:
    rid = runs.create_run(studio, TOY, _toy(200, "d"))
    clock = FakeClock()
    rep = runs.DbReporter(studio, rid, clock=clock)
    for step in range(1, 101):  # cheap steps (a coarse stage) at 100 steps/s; the rest cost 3x as much
        clock.t = (step - 1) * 0.01
        rep.progress(step, 200, {"ta_fm": 0.1, "eta_factor": 3.0})
    rep.flush()
    run = run_row(studio, rid)
    assert run.metrics["eta_s"] == pytest.approx(3.0, abs=0.06) and "eta_factor" not in run.metrics
    clock.t += 0.01
    rep.progress(101, 200, {"loss": 1.0})  # a step without the hint: the recent rate alone
    rep.flush()
    assert run_row(studio, rid).metrics["eta_s"] == pytest.approx(0.99, abs=0.03)
    with studio.session() as s:
        assert "eta_factor" not in set(s.scalars(select(RunMetric.name).where(RunMetric.run_id == rid)))
    rep.close()


def test_reporter_checkpoints_samples_and_stop_requests(studio: Studio) -> None:
    rid = runs.create_run(studio, TOY, _toy(10, "d"))
    rep = runs.DbReporter(studio, rid, poll_interval_s=0.0)
    rdir = runs.run_dir(studio, rid)
    (rdir / "ck").mkdir()
    (rdir / "ck" / "a.bin").write_bytes(b"x" * 10)
    (rdir / "ck" / "b.bin").write_bytes(b"y" * 5)
    rep.checkpoint(4, rdir / "ck")
    ckpt = runs.last_checkpoint(studio, rid)
    assert (ckpt.step, ckpt.bytes, ckpt.sha256) == (4, 15, None)
    assert ckpt.path == (rdir / "ck").resolve()
    rep.samples(4, Image.new("RGB", (4, 4), "red"))
    assert studio.blobs.exists(run_row(studio, rid).metrics["samples_sha"], "png")

    assert not rep.should_stop()
    with studio.session() as s:
        s.get(Run, rid).status = RunStatus.RUNNING
    assert runs.request_stop(studio, rid) == RunStatus.STOPPING
    assert rep.should_stop()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_reconcile_liveness_rules(studio: Studio) -> None:
    me, now = socket.gethostname(), utcnow()
    cases = {  # name: (pid, host, heartbeat, should be marked failed)
        "dead pid": (_dead_pid(), me, now, True),
        "pid is not a worker": (os.getpid(), me, now, True),
        "other host, stale": (1, "elsewhere", now - timedelta(minutes=5), True),
        "other host, fresh": (1, "elsewhere", now, False),
    }
    ids = {}
    for name, (pid, host, beat, _) in cases.items():
        ids[name] = rid = runs.create_run(studio, TOY, _toy(10, "d"), name=name)
        with studio.session() as s:
            run = s.get(Run, rid)
            run.status, run.pid, run.host, run.heartbeat_at = RunStatus.RUNNING, pid, host, beat
    never_launched = runs.create_run(studio, TOY, _toy(10, "d"))
    ckpt = runs.run_dir(studio, ids["dead pid"]) / "c.json"
    ckpt.write_text("{}")
    runs.DbReporter(studio, ids["dead pid"]).checkpoint(7, ckpt)

    dead = runs.reconcile(studio)
    assert sorted(dead) == sorted(ids[n] for n, c in cases.items() if c[3])
    assert "resume to continue from step 7" in run_row(studio, ids["dead pid"]).error
    assert "from the beginning" in run_row(studio, ids["pid is not a worker"]).error
    assert run_row(studio, ids["other host, fresh"]).status == RunStatus.RUNNING
    assert run_row(studio, never_launched).status == RunStatus.QUEUED
    assert runs.reconcile(studio) == []  # idempotent


def test_kinds_are_checked(studio: Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs, "JOB_MODULES", ["studio.no_such_jobs"])  # the real ones load torch: slow
    assert runs.find_job(TOY).__module__ == "tests.toy_jobs"  # imported from $STUDIO_EXTRA_JOB_MODULES
    with pytest.raises(ValueError, match="must start with one of"):
        runs.register_kind("train-everything", lambda ctx: None)
    with pytest.raises(ValueError, match="registered twice"):
        runs.register_kind(TOY, lambda ctx: None)  # tests/toy_jobs.py holds it
    with pytest.raises(runs.RunError, match="no job for runs of kind 'distill:nope'"):
        runs.find_job("distill:nope")


def _cli(*argv: str, capsys) -> tuple[int, str]:
    code = main(list(argv))  # opens the studio from $STUDIO_DATA_DIR, as a terminal would
    out = capsys.readouterr()
    return code, out.out + out.err


def test_cli(studio: Studio, capsys) -> None:
    rid = runs.create_run(studio, TOY, _toy(10, "d"), name="my toy")
    code, out = _cli("runs", "list", capsys=capsys)
    assert code == 0 and f"{rid}\t{TOY}\tqueued" in out and "my toy" in out
    code, out = _cli("runs", "show", str(rid), capsys=capsys)
    assert code == 0 and "status:     queued" in out and '"n": 10' in out
    assert _cli("runs", "stop", str(rid), capsys=capsys) == (0, f"run {rid}: stopped\n")  # never launched
    assert run_row(studio, rid).status == RunStatus.STOPPED
    assert "has no log yet" in _cli("runs", "logs", str(rid), capsys=capsys)[1]
    assert _cli("runs", "show", "999", capsys=capsys) == (2, "error: There is no run 999.\n")
    with studio.session() as s:
        assert s.scalar(select(func.count()).select_from(Run)) == 1


def test_a_just_launched_worker_is_not_taken_for_dead(studio: Studio) -> None:
    """Between fork and exec the child still shows its parent's command line: a queued run whose
    live pid does not look like a worker yet is left alone during the start-up grace period."""
    me = socket.gethostname()
    fresh = runs.create_run(studio, TOY, _toy(10, "d"), name="fresh")
    stale = runs.create_run(studio, TOY, _toy(10, "d"), name="stale")
    for rid, beat in ((fresh, utcnow()), (stale, utcnow() - timedelta(seconds=runs.STARTUP_GRACE_S + 5))):
        with studio.session() as s:
            run = s.get(Run, rid)
            run.pid, run.host, run.heartbeat_at = os.getpid(), me, beat  # alive, but not a worker
    assert runs.reconcile(studio) == [stale]
    assert run_row(studio, fresh).status == RunStatus.QUEUED


def test_gpu_count_imports_torch_only_where_a_gpu_driver_is(monkeypatch) -> None:
    import glob

    import torch

    monkeypatch.setattr(runs, "_gpu_count", None)
    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("torch asked without a GPU driver"))
    assert runs.gpu_count() == 0

    monkeypatch.setattr(runs, "_gpu_count", None)
    monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert runs.gpu_count() == 3


def test_a_queued_worker_waits_without_torch() -> None:
    """A run queued behind another holds a worker; without a GPU that worker must not load torch (~0.5 GB
    each: fifty queued teacher trainings would hold 27 GB)."""
    import glob

    if any(glob.glob(p) for p in runs.GPU_DEVICE_FILES):
        pytest.skip("a GPU driver is present: counting its devices needs torch")
    probe = "import sys; from studio import runs, worker; runs.run_devices({}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
