"""``python -m studio.worker RUN_ID --data-dir D [--db-url U]``: run one run's job to the end.

``studio.runs.launch`` starts this detached; it can also be run by hand. It:
1. claims the run (pid, host) and starts a heartbeat thread;
2. waits, status "queued", for its device lock (``<data>/locks/device-<cpu|cuda:N>.lock``, an
   fcntl lock the kernel drops if the worker dies) and for every older queued run on that device,
   so runs are served in creation order and two clicks never train on one device at once;
3. marks the run "running", imports the job modules, calls the job with a ``RunContext``;
4. writes "succeeded", "stopped" (a stop was requested and the job returned early) or "failed"
   (exception type and message for the curator; the traceback goes to ``worker.log``).
Whatever happens short of SIGKILL, the row does not stay "running"; after SIGKILL,
``studio.runs.reconcile`` notices the dead pid. SIGTERM and SIGINT are stop requests.

Multi-GPU: when ``config["num_processes"] > 1`` and more than one GPU is visible, this process
keeps the lifecycle and the locks of every GPU it uses and runs the job under
``accelerate launch --num_processes N -m studio.worker RUN_ID --rank-child``. Every rank runs the
job; only rank 0 writes to the DB (its reporter; the others only poll for stop requests) and
leaves its outcome in ``result.json`` for this process to record. Jobs must agree on stopping
across ranks themselves (e.g. ``accelerator.set_trigger()``/``check_trigger()``). This path is not
covered by the CPU tests.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from storage import Run, RunStatus, utcnow
from storage.blobs import DISK_FULL_ERRNOS

from .config import StudioConfig
from .context import Studio
from .runs import (
    ACTIVE,
    HEARTBEAT_S,
    DbReporter,
    RunContext,
    RunError,
    drop_metrics_after,
    find_job,
    job_config,
    job_kind,
    last_checkpoint,
    lock_path,
    log_path,
    process_count,
    run_devices,
    run_dir,
    worker_alive,
)

QUEUE_POLL_S = 0.5
RESULT_NAME = "result.json"
# Extra words for errors a curator can act on, by exception class name.
HINTS = {
    "OutOfMemoryError": "The GPU ran out of memory: lower the batch size or image size, or use a bigger GPU.",
    "MemoryError": "The computer ran out of memory: lower the batch size or image size.",
}


@dataclass
class Outcome:
    status: RunStatus
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# Disk trouble, whoever raised it (Python, safetensors' Rust writer, SQLite): by errno or by message.
READ_ONLY = (errno.EROFS,)
DISK_FULL_WORDS = ("no space left on device", "database or disk is full", "disk quota exceeded")
READ_ONLY_WORDS = ("read-only file system", "attempt to write a readonly database")


def _disk_hint(e: BaseException, data_dir: Path | None) -> str | None:
    where = f" ({data_dir})" if data_dir else ""
    seen: set[int] = set()
    chain: BaseException | None = e
    while chain is not None and id(chain) not in seen:  # the exception and its causes
        seen.add(id(chain))
        code, words = getattr(chain, "errno", None), str(chain).lower()
        if code in DISK_FULL_ERRNOS or any(w in words for w in DISK_FULL_WORDS):
            return (
                f"The disk holding the studio data folder{where} is full. Free some space (for example "
                "delete old runs and checkpoints), then resume the run: it continues from its last checkpoint."
            )
        if code in READ_ONLY or any(w in words for w in READ_ONLY_WORDS):
            return (
                f"The studio cannot write to its data folder{where}. Make it writable for the user "
                "running the studio, then resume the run."
            )
        chain = chain.__cause__ or chain.__context__
    return None


def curator_error(e: BaseException, log: Path, data_dir: Path | None = None) -> str:
    """What went wrong, in words a curator can act on, and where the details are."""
    text = f"{type(e).__name__}: {str(e).strip() or '(no message)'}"
    hint = HINTS.get(type(e).__name__) or _disk_hint(e, data_dir)
    if hint:
        text += f"\n{hint}"
    return f"{text}\nDetails are in the run log ({log})."


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    if v is None or isinstance(v, str | bool | int):
        return v
    try:
        f = float(v)  # floats, numpy scalars, 0-d tensors
    except (TypeError, ValueError):
        return str(v)
    return f if f == f and abs(f) != float("inf") else None


class DeviceLocks:
    """Exclusive fcntl locks on one or more devices, taken all or none (in sorted order).

    The kernel drops them when the process dies, so a killed worker never blocks the queue.
    """

    def __init__(self, data_dir: Path, devices: list[str], run_id: int, prefix: str = "device-"):
        self.paths = [lock_path(data_dir, d, prefix) for d in sorted(set(devices))]
        self.run_id = run_id
        self._files: list[Any] = []

    def try_acquire(self) -> bool:
        self.paths[0].parent.mkdir(parents=True, exist_ok=True)
        for p in self.paths:
            fh = open(p, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                self.release()
                return False
            self._files.append(fh)
        for fh in self._files:  # who holds it, for the "waiting for" note of the others
            fh.seek(0)
            fh.truncate()
            fh.write(f"run {self.run_id}\n")
            fh.flush()
        return True

    def holder(self) -> str | None:
        for p in self.paths:
            try:
                text = p.read_text().strip()
            except OSError:
                continue
            if text:
                return text
        return None

    def release(self) -> None:
        for fh in self._files:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        self._files = []


class Worker:
    def __init__(self, studio: Studio, run_id: int):
        self.studio, self.run_id = studio, run_id
        self.pid, self.host = os.getpid(), socket.gethostname()
        self.stop_event = threading.Event()
        self._beat_stop = threading.Event()
        self._child: subprocess.Popen | None = None
        self._done = False
        self.log = log_path(studio, run_id)

    # -- signals and heartbeat -------------------------------------------------------------------
    def install_signals(self) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            print(f"worker: got {signal.Signals(signum).name}, stopping after a checkpoint", flush=True)
            self.stop_event.set()
            if self._child is not None and self._child.poll() is None:
                self._child.send_signal(signum)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _heartbeat(self) -> None:
        while not self._beat_stop.wait(HEARTBEAT_S):
            try:
                with self.studio.session() as s:
                    s.execute(
                        update(Run)
                        .where(Run.id == self.run_id, Run.pid == self.pid)
                        .values(heartbeat_at=utcnow())
                    )
            except Exception as e:  # the next beat retries; the job's own writes surface real trouble
                print(f"worker: heartbeat failed: {e}", file=sys.stderr, flush=True)

    # -- the lifecycle ---------------------------------------------------------------------------
    def serve(self) -> int:
        self.install_signals()
        with self.studio.session() as s:
            run = s.get(Run, self.run_id)
        if run is None:
            print(f"worker: there is no run {self.run_id}", file=sys.stderr)
            return 2
        if run.status == RunStatus.STOPPING:  # stopped before it started
            self._final(Outcome(RunStatus.STOPPED), only_if=RunStatus.STOPPING)
            return 0
        if run.status != RunStatus.QUEUED:
            print(f"worker: run {self.run_id} is {run.status.value}; nothing to do", file=sys.stderr)
            return 1
        # One worker per run, even if it was launched twice (two clicks on "resume").
        own = DeviceLocks(self.studio.config.data_dir, [f"run-{self.run_id}"], self.run_id, prefix="")
        if not own.try_acquire():
            print(f"worker: run {self.run_id} already has a worker; leaving it alone", file=sys.stderr)
            return 1
        with self.studio.session() as s:
            s.execute(
                update(Run)
                .where(Run.id == self.run_id, Run.status == RunStatus.QUEUED)
                .values(pid=self.pid, host=self.host, heartbeat_at=utcnow())
            )
        beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        beat.start()
        try:
            config = job_config(run)
            devices = run_devices(config)
            locks = self._wait_for_devices(devices)
            if locks is None:
                self._final(Outcome(RunStatus.STOPPED))
                return 0
            try:
                if not self._mark_running():
                    self._final(Outcome(RunStatus.STOPPED))
                    return 0
                n = process_count(config)
                outcome = self._run_distributed(n) if n > 1 else self.execute(devices[0], rank=0)
                self._final(outcome)
            finally:
                locks.release()
            return 1 if outcome.status == RunStatus.FAILED else 0
        except BaseException as e:
            traceback.print_exc()
            self._final(
                Outcome(RunStatus.FAILED, error=curator_error(e, self.log, self.studio.config.data_dir))
            )
            return 1
        finally:
            self._beat_stop.set()
            own.release()
            if not self._done:  # e.g. the DB went away mid-write: never leave the row active
                with self.studio.session() as s:
                    s.execute(
                        update(Run)
                        .where(Run.id == self.run_id, Run.pid == self.pid, Run.status.in_(ACTIVE))
                        .values(
                            status=RunStatus.FAILED,
                            error="The worker stopped unexpectedly; resume to continue.",
                            finished_at=utcnow(),
                        )
                    )

    def _status(self) -> RunStatus | None:
        with self.studio.session() as s:
            return s.scalar(select(Run.status).where(Run.id == self.run_id))

    def _older_waiting(self, devices: list[str]) -> int | None:
        """The oldest earlier-created run still queued for one of `devices` with a live worker."""
        with self.studio.session() as s:
            older = s.scalars(
                select(Run)
                .where(
                    Run.id < self.run_id,
                    Run.status == RunStatus.QUEUED,
                    Run.pid.is_not(None),
                    Run.host == self.host,
                )
                .order_by(Run.id)
            ).all()
        for r in older:
            if set(run_devices(job_config(r))) & set(devices) and worker_alive(r):
                return r.id
        return None

    def _wait_for_devices(self, devices: list[str]) -> DeviceLocks | None:
        """The device locks, once free and no older run waits for them; None if stopped meanwhile."""
        locks = DeviceLocks(self.studio.config.data_dir, devices, self.run_id)
        noted = None
        while True:
            if self.stop_event.is_set() or self._status() != RunStatus.QUEUED:
                return None
            older = self._older_waiting(devices)
            if older is None and locks.try_acquire():
                return locks
            waiting_for = f"run {older}" if older is not None else (locks.holder() or "another run")
            if waiting_for != noted:
                print(f"worker: {', '.join(devices)} busy, waiting for {waiting_for}", flush=True)
                with self.studio.session() as s:
                    run = s.get(Run, self.run_id)
                    run.metrics = {**(run.metrics or {}), "waiting_for": waiting_for}
                noted = waiting_for
            self.stop_event.wait(QUEUE_POLL_S)

    def _mark_running(self) -> bool:
        with self.studio.session() as s:
            metrics = s.scalar(select(Run.metrics).where(Run.id == self.run_id)) or {}
            res = s.execute(
                update(Run)
                .where(Run.id == self.run_id, Run.status == RunStatus.QUEUED)
                .values(
                    status=RunStatus.RUNNING,
                    pid=self.pid,
                    host=self.host,
                    started_at=utcnow(),
                    heartbeat_at=utcnow(),
                    finished_at=None,
                    error=None,
                    metrics={k: v for k, v in metrics.items() if k != "waiting_for"},
                )
            )
        return bool(res.rowcount)

    def execute(self, device: str, rank: int) -> Outcome:
        """Run the job in this process and say how it ended (the caller records it)."""
        write = rank == 0
        reporter: DbReporter | None = None
        try:
            with self.studio.session() as s:
                run = s.get(Run, self.run_id)
            kind = job_kind(run)
            job = find_job(kind)
            ckpt = last_checkpoint(self.studio, self.run_id)
            if write:  # steps after the checkpoint (all, without one) are redone: forget their points
                drop_metrics_after(self.studio, self.run_id, ckpt.step if ckpt else 0)
            reporter = DbReporter(self.studio, self.run_id, stop_event=self.stop_event, write=write)
            ctx = RunContext(
                studio=self.studio,
                run_id=self.run_id,
                config=job_config(run),
                run_dir=run_dir(self.studio, self.run_id),
                reporter=reporter,
                resume_from=ckpt.path if ckpt else None,
                device=device,
                rank=rank,
            )
            where = f", resuming from step {ckpt.step} ({ckpt.path})" if ckpt else ""
            print(f"worker: run {self.run_id} ({kind}) on {device}, rank {rank}{where}", flush=True)
            result = job(ctx) or {}
            reporter.close()
        except Exception as e:
            traceback.print_exc()
            metrics = {}
            if reporter is not None:
                try:
                    reporter.close()  # keep the curve up to the failure
                except Exception:
                    traceback.print_exc()
                metrics = reporter.metrics
            return Outcome(RunStatus.FAILED, metrics, curator_error(e, self.log, self.studio.config.data_dir))
        completed = reporter.total > 0 and reporter.step >= reporter.total
        stopped = not completed and (self.stop_event.is_set() or self._status() == RunStatus.STOPPING)
        metrics = {**reporter.metrics, **_json_safe(dict(result))}
        metrics.pop("eta_s", None)
        print(f"worker: run {self.run_id} {'stopped' if stopped else 'finished'}: {metrics}", flush=True)
        return Outcome(RunStatus.STOPPED if stopped else RunStatus.SUCCEEDED, metrics)

    def _run_distributed(self, n: int) -> Outcome:
        result = run_dir(self.studio, self.run_id) / RESULT_NAME
        result.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n)]
        cmd += ["-m", "studio.worker", str(self.run_id), "--rank-child"]
        cmd += ["--data-dir", str(self.studio.config.data_dir)]
        if self.studio.config.db_url:
            cmd += ["--db-url", self.studio.config.db_url]
        print(f"worker: {' '.join(cmd)}", flush=True)
        self._child = subprocess.Popen(cmd)  # same stdout/stderr: the run log
        code = self._child.wait()
        if not result.is_file():
            return Outcome(
                RunStatus.FAILED,
                error=f"The training processes exited (code {code}) without a result; see {self.log}.",
            )
        data = json.loads(result.read_text())
        return Outcome(RunStatus(data["status"]), data.get("metrics") or {}, data.get("error"))

    def rank_child(self) -> int:
        """One accelerate rank: run the job; rank 0 leaves the outcome for the parent worker."""
        self.install_signals()
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        outcome = self.execute(f"cuda:{local}", rank=rank)
        if rank == 0:
            out = run_dir(self.studio, self.run_id) / RESULT_NAME
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(_json_safe(outcome.__dict__)))
            os.replace(tmp, out)
        return 1 if outcome.status == RunStatus.FAILED else 0

    def _final(self, outcome: Outcome, only_if: RunStatus | None = None) -> None:
        q = update(Run).where(Run.id == self.run_id)
        if only_if is not None:
            q = q.where(Run.status == only_if)
        values: dict[str, Any] = {
            "status": outcome.status,
            "error": outcome.error,
            "finished_at": utcnow(),
            "heartbeat_at": utcnow(),
        }
        metrics = outcome.metrics
        if not metrics:  # e.g. stopped while queued: keep what was there, minus the queue note
            with self.studio.session() as s:
                metrics = s.scalar(select(Run.metrics).where(Run.id == self.run_id)) or {}
        values["metrics"] = {k: v for k, v in metrics.items() if k != "waiting_for"}
        if outcome.status == RunStatus.SUCCEEDED:
            values["progress"] = 1.0
        with self.studio.session() as s:
            s.execute(q.values(**values))
        self._done = True
        print(f"worker: run {self.run_id} ended: {outcome.status.value}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studio.worker", description="run one studio run")
    p.add_argument("run_id", type=int)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--db-url", default=None)
    p.add_argument("--rank-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        studio = Studio.open(StudioConfig(data_dir=args.data_dir, db_url=args.db_url))
    except (RunError, RuntimeError, OSError) as e:
        print(f"worker: cannot open the studio: {e}", file=sys.stderr)
        return 2
    worker = Worker(studio, args.run_id)
    return worker.rank_child() if args.rank_child else worker.serve()


if __name__ == "__main__":
    sys.exit(main())
