"""The run launcher: background jobs (training, distillation, evaluation) as separate processes.

A run is a row in the ``runs`` table plus a folder ``<data>/runs/<id>/`` (job outputs,
``worker.log``). ``submit`` creates the row and starts ``python -m studio.worker`` detached from
the caller, so the UI never trains in its own process and a UI restart leaves runs going.
The worker waits for the run's device (one run per device, in creation order), runs the job
function registered for the run's kind, and reports through ``DbReporter``. ``reconcile``
notices workers that died (kill -9, OOM killer, reboot); ``resume`` restarts a stopped or dead
run from its last checkpoint.

Status flow: queued -> running -> succeeded | stopped | failed; ``request_stop`` sets
"stopping", which the job sees through ``reporter.should_stop()``. ``RunStatus`` has no
"interrupted": a run whose worker disappeared is "failed" with an error that says so.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import io
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from sqlalchemy import delete, insert, select, update

from storage import Checkpoint, Run, RunKind, RunMetric, RunStatus, utcnow

if TYPE_CHECKING:
    from .context import Studio

# Modules that register job kinds when imported (see `register_kind`), tried in order until the
# run's kind is registered; a missing one is skipped.
JOB_MODULES = ["studio.jobs"]
# Comma-separated extra job modules the worker also imports (tests use it for toy jobs).
STARTUP_GRACE_S = 60  # a just-launched worker may not show its own command line yet
EXTRA_JOB_MODULES_ENV = "STUDIO_EXTRA_JOB_MODULES"
# A job variant ("eval:toy-count") is stored as its base kind plus this config key.
JOB_KEY = "_job"
LOG_NAME = "worker.log"
FLUSH_INTERVAL_S = 1.0  # progress rows reach the DB at most this often (and on the last step)
STOP_POLL_S = 1.0  # should_stop() reads the DB at most this often
HEARTBEAT_S = 10.0  # the worker touches heartbeat_at this often, even inside a long step
STALE_HEARTBEAT_S = 60.0  # a run on another host with an older heartbeat counts as dead
ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.STOPPING)
REPO_ROOT = Path(__file__).resolve().parent.parent


class RunError(RuntimeError):
    """A run cannot be created, launched, stopped or resumed; the message says why."""


# -- job kinds --------------------------------------------------------------------------------


@dataclass
class RunContext:
    """What a job function gets: its run, its config, where to write, how to report."""

    studio: Studio
    run_id: int
    config: dict[str, Any]
    run_dir: Path  # <data>/runs/<id>: checkpoints and other job outputs go here
    reporter: DbReporter
    resume_from: Path | None  # the last complete checkpoint (file or folder) of this run, if any
    device: str = "cpu"  # "cpu" or "cuda:N"; the worker holds this device's lock
    rank: int = 0  # process index under `accelerate launch`; only rank 0 writes to the DB


JobFn = Callable[[RunContext], "dict[str, Any] | None"]
_JOBS: dict[str, JobFn] = {}


def register_kind(kind: str, fn: JobFn) -> JobFn:
    """Make `fn` the job for runs of `kind`: a RunKind value ("distill") or a variant ("eval:fid").

    `fn(ctx)` trains or evaluates, calls `ctx.reporter` as it goes, checkpoints and returns when
    `ctx.reporter.should_stop()`, resumes from `ctx.resume_from`, and returns final metrics.
    """
    base = kind.split(":", 1)[0]
    if base not in {k.value for k in RunKind}:
        raise ValueError(f"run kind {kind!r} must start with one of {[k.value for k in RunKind]}")
    old = _JOBS.get(kind)
    if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
        raise ValueError(f"run kind {kind!r} is registered twice ({old.__module__} and {fn.__module__})")
    _JOBS[kind] = fn
    return fn


def registered_kinds() -> list[str]:
    return sorted(_JOBS)


def job_modules() -> list[str]:
    extra = os.environ.get(EXTRA_JOB_MODULES_ENV, "")
    return [m.strip() for m in extra.split(",") if m.strip()] + JOB_MODULES


def find_job(kind: str) -> JobFn:
    """The job registered for `kind`, importing job modules until one registers it."""
    for module in [None, *job_modules()]:
        if module is not None:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:
                # Only the job module itself may be missing; a missing dependency is a real error.
                if not (e.name == module or module.startswith(f"{e.name}.")):
                    raise
        if kind in _JOBS:
            return _JOBS[kind]
    raise RunError(
        f"This studio has no job for runs of kind '{kind}' (looked in {', '.join(job_modules())}). "
        "The studio version that created the run may be newer; update the studio, or start a new run."
    )


def job_kind(run: Run) -> str:
    """The registered job name of a run: its kind, or the variant stored in its config."""
    return str((run.config or {}).get(JOB_KEY) or run.kind.value)


def job_config(run: Run) -> dict[str, Any]:
    """The config the job sees (without launcher bookkeeping)."""
    return {k: v for k, v in (run.config or {}).items() if k != JOB_KEY}


# -- devices ------------------------------------------------------------------------------------

_gpu_count: int | None = None
# Device files of a GPU driver torch.cuda can use (NVIDIA, ROCm, WSL2). Without any there is no GPU to
# count, and importing torch to say so would cost every queued worker ~0.5 GB while it waits.
GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def gpu_count() -> int:
    """Visible CUDA devices (torch is imported only when a run's device must be guessed and a GPU
    driver's device files exist)."""
    global _gpu_count
    if _gpu_count is None:
        if not any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES):
            _gpu_count = 0
        else:
            import torch

            _gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return _gpu_count


def process_count(config: dict[str, Any]) -> int:
    """Processes to launch: config["num_processes"], when that many GPUs (>1) are visible."""
    n = int(config.get("num_processes", 1) or 1)
    return min(n, gpu_count()) if n > 1 and gpu_count() > 1 else 1


def run_devices(config: dict[str, Any]) -> list[str]:
    """The devices a run occupies: config["device"] (default cuda:0 or cpu), or each GPU it spans."""
    n = process_count(config)
    if n > 1:
        return [f"cuda:{i}" for i in range(n)]
    return [str(config.get("device") or ("cuda:0" if gpu_count() else "cpu"))]


def lock_path(data_dir: Path, name: str, prefix: str = "device-") -> Path:
    return Path(data_dir) / "locks" / f"{prefix}{name}.lock"


# -- creating, launching, stopping, resuming ----------------------------------------------------


def run_dir(studio: Studio, run_id: int) -> Path:
    return studio.config.runs_dir / str(run_id)


def create_run(
    studio: Studio,
    kind: str,
    config: dict[str, Any],
    name: str = "",
    effect_id: int | None = None,
    parent_run_id: int | None = None,
) -> int:
    """A queued run row (and its folder); `launch` starts it."""
    base = kind.split(":", 1)[0]
    try:
        run_kind = RunKind(base)
    except ValueError:
        raise RunError(f"Unknown run kind '{kind}'; use one of {[k.value for k in RunKind]}.") from None
    cfg = dict(config)
    if kind != base:
        cfg[JOB_KEY] = kind
    with studio.session() as s:
        run = Run(
            kind=run_kind,
            name=name,
            config=cfg,
            status=RunStatus.QUEUED,
            effect_id=effect_id,
            parent_run_id=parent_run_id,
        )
        s.add(run)
        s.flush()
        run_id = run.id
    run_dir(studio, run_id).mkdir(parents=True, exist_ok=True)
    return run_id


# Workers started by this process, so exited ones are reaped (not left as zombies that look alive).
_CHILDREN: dict[int, subprocess.Popen] = {}


def launch(studio: Studio, run_id: int) -> int:
    """Start the worker of a queued run as a detached process; returns its pid."""
    with studio.session() as s:
        run = _get(s, run_id)
    status = run.status
    if status in ACTIVE and worker_alive(run):
        raise RunError(f"Run {run_id} already has a worker (process {run.pid}); it is {status.value}.")
    if status != RunStatus.QUEUED:
        raise RunError(f"Run {run_id} is {status.value}; only queued runs can be launched (use resume).")
    rdir = run_dir(studio, run_id)
    rdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "studio.worker", str(run_id), "--data-dir", str(_abs(studio))]
    if studio.config.db_url:
        cmd += ["--db-url", studio.config.db_url]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")  # the log shows progress as it happens
    with open(rdir / LOG_NAME, "ab") as log:
        log.write(f"=== {utcnow().isoformat(timespec='seconds')} launching run {run_id}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=rdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the UI's terminal and its Ctrl-C
                close_fds=True,
            )
        except OSError as e:
            _finish(studio, run_id, RunStatus.FAILED, error=f"Could not start the worker process: {e}")
            raise RunError(f"Could not start the worker for run {run_id}: {e}") from e
    _CHILDREN[proc.pid] = proc
    with studio.session() as s:
        s.execute(
            update(Run)
            .where(Run.id == run_id, Run.status == RunStatus.QUEUED)
            .values(pid=proc.pid, host=socket.gethostname(), heartbeat_at=utcnow())
        )
    return proc.pid


def submit(
    studio: Studio,
    kind: str,
    config: dict[str, Any],
    name: str = "",
    effect_id: int | None = None,
    parent_run_id: int | None = None,
) -> int:
    """Create a run and launch its worker; returns the run id."""
    run_id = create_run(studio, kind, config, name=name, effect_id=effect_id, parent_run_id=parent_run_id)
    launch(studio, run_id)
    return run_id


def request_stop(studio: Studio, run_id: int) -> RunStatus:
    """Ask a run to stop (it checkpoints first); returns its status after the request."""
    reconcile(studio, run_id)
    with studio.session() as s:
        run = _get(s, run_id)
    status = run.status
    if status in (RunStatus.RUNNING, RunStatus.STOPPING):
        _set_status_if(studio, run_id, status, RunStatus.STOPPING)
    elif status == RunStatus.QUEUED:
        if worker_alive(run):
            _set_status_if(studio, run_id, status, RunStatus.STOPPING)  # its worker is waiting
        else:  # never launched: nothing to tell
            _finish(studio, run_id, RunStatus.STOPPED, only_if=RunStatus.QUEUED)
    with studio.session() as s:
        return _get(s, run_id).status


def resume(studio: Studio, run_id: int) -> int:
    """Relaunch a stopped, failed or orphaned queued run; its job resumes from the last checkpoint."""
    reconcile(studio, run_id)
    with studio.session() as s:
        run = _get(s, run_id)
    status = run.status
    if status == RunStatus.SUCCEEDED:
        raise RunError(f"Run {run_id} already finished. To train it further, start an extend run from it.")
    if status in (RunStatus.RUNNING, RunStatus.STOPPING) or (
        status == RunStatus.QUEUED and worker_alive(run)
    ):
        raise RunError(f"Run {run_id} is still {status.value}; stop it first.")
    # The row shows where the resumed run really stands: its last checkpoint (steps past it are redone).
    ckpt = last_checkpoint(studio, run_id)
    step = ckpt.step if ckpt else 0
    progress = min(1.0, step / run.total_steps) if run.total_steps else 0.0
    with studio.session() as s:
        s.execute(
            update(Run)
            .where(Run.id == run_id, Run.status == status)
            .values(
                status=RunStatus.QUEUED, error=None, finished_at=None, pid=None, step=step, progress=progress
            )
        )
    return launch(studio, run_id)


# -- liveness -----------------------------------------------------------------------------------


def _reap() -> None:
    """Collect exited workers this process started (they would linger as zombies)."""
    for pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            del _CHILDREN[pid]


def _pid_alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:  # ours and exited (poll reaps it)
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to another user
    return True


def _pid_running(pid: int) -> bool:
    """Alive and not a zombie."""
    if not _pid_alive(pid):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return not Path("/proc").is_dir()
    return state not in ("Z", "X")


def _local_worker_alive(pid: int, run_id: int) -> bool:
    """Is `pid` the live worker of `run_id` on this host? (Zombies and reused pids are not.)"""
    if not _pid_alive(pid):
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():  # not Linux: trust kill(0)
        return True
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        args = (proc / "cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False  # gone while we looked
    if state in ("Z", "X"):
        return False
    return b"studio.worker" in args and str(run_id).encode() in args


def worker_alive(run: Run) -> bool:
    """Does the run have a live worker? By pid on this host, by heartbeat age elsewhere."""
    if run.pid is None:
        return False
    if run.host in (None, socket.gethostname()):
        if _local_worker_alive(run.pid, run.id):
            return True
        # Just launched: between fork and exec the child still shows its parent's command line, and
        # on a loaded machine that lasts seconds. launch() stamps heartbeat_at; trust a live,
        # non-zombie pid for a short grace period after it.
        beat = run.heartbeat_at
        return (
            run.status == RunStatus.QUEUED
            and beat is not None
            and utcnow() - beat < timedelta(seconds=STARTUP_GRACE_S)
            and _pid_running(run.pid)
        )
    beat = run.heartbeat_at
    return beat is not None and utcnow() - beat < timedelta(seconds=STALE_HEARTBEAT_S)


def reconcile(studio: Studio, run_id: int | None = None) -> list[int]:
    """Mark runs whose worker disappeared as failed (resumable); returns their ids.

    Runs on this host are checked by pid; runs on other hosts by heartbeat age. Active runs
    whose worker lives are left alone: they are independent processes the UI re-attaches to.
    """
    _reap()
    now = utcnow()
    q = select(Run).where(Run.status.in_(ACTIVE), Run.pid.is_not(None))
    if run_id is not None:
        q = q.where(Run.id == run_id)
    with studio.session() as s:
        runs = s.scalars(q).all()
    dead = []
    for run in runs:
        if worker_alive(run):
            continue
        rid, status, pid = run.id, run.status, run.pid
        ckpt = last_checkpoint(studio, rid)
        if status == RunStatus.QUEUED:
            msg = "The worker process disappeared before the run started; resume to start it."
        elif ckpt is not None:
            msg = (
                "The worker process disappeared (killed or crashed); "
                f"resume to continue from step {ckpt.step}."
            )
        else:
            msg = (
                "The worker process disappeared (killed or crashed) before its first checkpoint; "
                "resume to start again from the beginning."
            )
        # Only if nothing changed since we looked: a worker that just finished wrote its own status.
        with studio.session() as s:
            res = s.execute(
                update(Run)
                .where(Run.id == rid, Run.status == status, Run.pid == pid)
                .values(status=RunStatus.FAILED, error=msg, finished_at=now)
            )
        if res.rowcount:
            dead.append(rid)
    return dead


# -- reporting ----------------------------------------------------------------------------------


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class DbReporter:
    """`distill.callbacks.Reporter` that writes a run's progress, curves and checkpoints to the DB.

    Every step's metrics become RunMetric rows, buffered and written together at most every
    `flush_interval_s` (and on the last step, a checkpoint, samples and `close`), so nothing is
    lost and the DB sees about one transaction a second. `write=False` (accelerate ranks > 0)
    only answers `should_stop`.
    """

    def __init__(
        self,
        studio: Studio,
        run_id: int,
        *,
        stop_event: threading.Event | None = None,
        write: bool = True,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        poll_interval_s: float = STOP_POLL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.studio, self.run_id, self.write = studio, run_id, write
        self.stop_event = stop_event or threading.Event()
        self.flush_interval_s, self.poll_interval_s, self.clock = flush_interval_s, poll_interval_s, clock
        self._pending: list[dict[str, Any]] = []
        self._rate: deque[tuple[float, int]] = deque(maxlen=50)
        self._step = self._total = 0
        self._dirty = False
        self._eta_factor = 1.0
        self._last_flush = self._last_poll = -math.inf
        self._stop_seen = False
        with studio.session() as s:
            run = _get(s, run_id)
            self._step, self._total = run.step, run.total_steps
            # Keep what the UI showed (samples, last losses) across a resume; drop queue notes.
            self._metrics = {k: v for k, v in (run.metrics or {}).items() if k != "waiting_for"}

    @property
    def step(self) -> int:
        return self._step

    @property
    def total(self) -> int:
        return self._total

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self._metrics)

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if not self.write:
            return
        now = self.clock()
        self._step, self._total = int(step), int(total)
        self._rate.append((now, self._step))
        # a trainer whose remaining steps cost more than its recent ones says how much (a coarse stage)
        metrics = dict(metrics)
        self._eta_factor = float(metrics.pop("eta_factor", 1.0))
        for name, value in metrics.items():
            f = _as_float(value)
            if f is not None:
                self._pending.append({"run_id": self.run_id, "step": self._step, "name": name, "value": f})
            self._metrics[name] = value if isinstance(value, str) else f
        eta = self.eta_s()
        self._metrics["eta_s"] = None if eta is None else round(eta, 1)
        self._dirty = True
        if now - self._last_flush >= self.flush_interval_s or (total and step >= total):
            self.flush()

    def eta_s(self) -> float | None:
        """Seconds left at the recent step rate (last ~50 progress calls)."""
        if len(self._rate) < 2 or not self._total:
            return None
        (t0, s0), (t1, s1) = self._rate[0], self._rate[-1]
        if t1 <= t0 or s1 <= s0:
            return None
        return max(0, self._total - s1) * (t1 - t0) / (s1 - s0) * self._eta_factor

    def flush(self) -> None:
        """Write the latest state and every buffered metric row."""
        if not self.write or not (self._dirty or self._pending):
            return
        values: dict[str, Any] = {
            "step": self._step,
            "total_steps": self._total,
            "metrics": dict(self._metrics),
            "heartbeat_at": utcnow(),
        }
        if self._total:
            values["progress"] = min(1.0, max(0.0, self._step / self._total))
        with self.studio.session() as s:
            s.execute(update(Run).where(Run.id == self.run_id).values(**values))
            if self._pending:
                s.execute(insert(RunMetric), self._pending)
        self._pending = []
        self._dirty = False
        self._last_flush = self.clock()

    def checkpoint(self, step: int, path: Path) -> None:
        if not self.write:
            return
        self.flush()  # the curve up to the checkpoint is on disk before the checkpoint counts
        path = Path(path).resolve()
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file()]
            size, sha = sum(p.stat().st_size for p in files), None
        else:
            size, sha = path.stat().st_size, _sha256_file(path)
        data_dir = _abs(self.studio)
        rel = str(path.relative_to(data_dir)) if path.is_relative_to(data_dir) else str(path)
        with self.studio.session() as s:
            s.add(Checkpoint(run_id=self.run_id, step=int(step), path=rel, sha256=sha, bytes=size))

    def samples(self, step: int, grid: Image.Image) -> None:
        if not self.write:
            return
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        ref = self.studio.blobs.put_bytes(buf.getvalue(), "png")
        self._metrics["samples_sha"] = ref.sha256
        self._metrics["samples_step"] = int(step)
        self._dirty = True
        self.flush()

    def should_stop(self) -> bool:
        if self._stop_seen or self.stop_event.is_set():
            self._stop_seen = True
            return True
        now = self.clock()
        if now - self._last_poll >= self.poll_interval_s:
            self._last_poll = now
            with self.studio.session() as s:
                status = s.scalar(select(Run.status).where(Run.id == self.run_id))
            self._stop_seen = status == RunStatus.STOPPING
        return self._stop_seen

    def close(self) -> None:
        self.flush()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- reading runs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointView:
    step: int
    path: Path  # absolute
    bytes: int
    sha256: str | None
    created_at: datetime


@dataclass(frozen=True)
class RunView:
    """A run as the UI and CLI show it."""

    id: int
    kind: str  # the job kind, e.g. "distill" or a variant "eval:fid"
    name: str
    status: str
    progress: float  # 0..1
    step: int
    total: int
    eta_s: float | None
    metrics: dict[str, Any]
    error: str | None
    checkpoint: CheckpointView | None  # the last one
    log_tail: str
    config: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    pid: int | None
    host: str | None
    effect_id: int | None
    parent_run_id: int | None
    run_dir: Path = field(default_factory=Path)

    @property
    def finished(self) -> bool:
        return RunStatus(self.status).finished

    @property
    def waiting_for(self) -> str | None:
        """While queued behind another run: which one (e.g. "run 12")."""
        return self.metrics.get("waiting_for") if self.status == RunStatus.QUEUED else None


def _checkpoint_view(studio: Studio, c: Checkpoint) -> CheckpointView:
    p = Path(c.path)
    return CheckpointView(c.step, p if p.is_absolute() else _abs(studio) / p, c.bytes, c.sha256, c.created_at)


def last_checkpoint(studio: Studio, run_id: int) -> CheckpointView | None:
    """The newest checkpoint of a run that still exists on disk."""
    with studio.session() as s:
        rows = s.scalars(
            select(Checkpoint)
            .where(Checkpoint.run_id == run_id)
            .order_by(Checkpoint.step.desc(), Checkpoint.id.desc())
        ).all()
    for c in rows:
        view = _checkpoint_view(studio, c)
        if view.path.exists():
            return view
    return None


def _view(studio: Studio, run: Run, ckpt: CheckpointView | None, log: str) -> RunView:
    metrics = dict(run.metrics or {})
    eta = metrics.get("eta_s") if run.status in (RunStatus.RUNNING, RunStatus.STOPPING) else None
    return RunView(
        id=run.id,
        kind=job_kind(run),
        name=run.name,
        status=run.status.value,
        progress=run.progress,
        step=run.step,
        total=run.total_steps,
        eta_s=eta,
        metrics=metrics,
        error=run.error,
        checkpoint=ckpt,
        log_tail=log,
        config=job_config(run),
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        pid=run.pid,
        host=run.host,
        effect_id=run.effect_id,
        parent_run_id=run.parent_run_id,
        run_dir=run_dir(studio, run.id),
    )


def run_status(studio: Studio, run_id: int, log_lines: int = 40) -> RunView:
    """One run, with its last checkpoint and the tail of its log (dead workers noticed first)."""
    reconcile(studio, run_id)
    with studio.session() as s:
        run = _get(s, run_id)
    return _view(studio, run, last_checkpoint(studio, run_id), log_tail(studio, run_id, log_lines))


def list_runs(studio: Studio, kind: str | None = None) -> list[RunView]:
    """Runs, newest first (without log tails); `kind` filters by RunKind ("eval" includes variants)."""
    reconcile(studio)
    q = select(Run).order_by(Run.id.desc())
    if kind is not None:
        q = q.where(Run.kind == RunKind(kind.split(":", 1)[0]))
    with studio.session() as s:
        runs = s.scalars(q).all()
        ckpts: dict[int, Checkpoint] = {}
        for c in s.scalars(select(Checkpoint).order_by(Checkpoint.step, Checkpoint.id)):
            ckpts[c.run_id] = c
    views = [
        _view(studio, r, _checkpoint_view(studio, ckpts[r.id]) if r.id in ckpts else None, "") for r in runs
    ]
    return [v for v in views if kind is None or ":" not in kind or v.kind == kind]


def metric_series(studio: Studio, run_id: int, name: str) -> list[tuple[int, float]]:
    """(step, value) points of one metric, in step order (the latest value where a step repeats)."""
    with studio.session() as s:
        rows = s.execute(
            select(RunMetric.step, RunMetric.value)
            .where(RunMetric.run_id == run_id, RunMetric.name == name)
            .order_by(RunMetric.step, RunMetric.id)
        ).all()
    series: dict[int, float] = {}
    for step, value in rows:
        series[step] = value
    return list(series.items())


def log_path(studio: Studio, run_id: int) -> Path:
    return run_dir(studio, run_id) / LOG_NAME


def log_tail(studio: Studio, run_id: int, lines: int = 40) -> str:
    """The last `lines` lines of the run's worker log ("" if there is none yet)."""
    try:
        with open(log_path(studio, run_id), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def drop_metrics_after(studio: Studio, run_id: int, step: int) -> None:
    """Forget curve points past `step` (a resumed run redoes those steps)."""
    with studio.session() as s:
        s.execute(delete(RunMetric).where(RunMetric.run_id == run_id, RunMetric.step > step))


# -- small helpers ------------------------------------------------------------------------------


def _abs(studio: Studio) -> Path:
    return Path(studio.config.data_dir).expanduser().resolve()


def _get(s: Any, run_id: int) -> Run:
    run = s.get(Run, run_id)
    if run is None:
        raise RunError(f"There is no run {run_id}.")
    return run


def _set_status_if(studio: Studio, run_id: int, old: RunStatus, new: RunStatus) -> bool:
    with studio.session() as s:
        res = s.execute(update(Run).where(Run.id == run_id, Run.status == old).values(status=new))
    return bool(res.rowcount)


def _finish(
    studio: Studio,
    run_id: int,
    status: RunStatus,
    *,
    error: str | None = None,
    metrics: dict[str, Any] | None = None,
    only_if: RunStatus | None = None,
    **values: Any,
) -> bool:
    """Write a final status (conditionally on the current one with `only_if`)."""
    q = update(Run).where(Run.id == run_id)
    if only_if is not None:
        q = q.where(Run.status == only_if)
    values.update(status=status, error=error, finished_at=utcnow(), heartbeat_at=utcnow())
    if metrics is not None:
        values["metrics"] = metrics
    with studio.session() as s:
        res = s.execute(q.values(**values))
    return bool(res.rowcount)
