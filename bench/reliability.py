"""Reliability and security report: faults, bad input, load and access, each with its figures.

    python bench/reliability.py --quick          # a smoke run (a minute or two on 2 cores)
    python bench/reliability.py                  # moderate counts
    python bench/reliability.py --kills 5 --fuzz 500 --voters 24 --ui-users 8 --only faults,load

Faults: real worker processes (teacher training, distillation) are killed with SIGKILL at random
points and resumed, N times each; after every kill the run's row must say what happened and from
which step a resume continues, no referenced file may be torn, and the final LoRA must equal an
uninterrupted run with the same seed. A "UI" process that launched runs is killed with its whole
process group: the runs must survive and a restarted studio (the real ``app.py`` here) must show
them. A full disk and an unwritable data folder must give the curator a clear error and leave
nothing half-stored.
Bad input: hypothesis fuzzes pair-set zips, LoRA files, settings and the HTTP inputs of the voter
pages; each input must be accepted or refused with a clear error, never crash, never half-import.
Load: voters and studio-page users on loopback in bounded loops; every vote stored exactly once and
the SQLite file intact (``PRAGMA integrity_check``).
Access: the studio refuses to serve off loopback without auth and answers nothing without the token,
voter links reach only their own pages, file routes refuse path traversal, the blind study names no
system.

The check functions return a ``Check`` (figures and problems); tests/test_reliability_*.py call the
same functions with small counts and assert there are no problems.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):  # the tests' shared toy builders (studio_fixtures, toy_jobs)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

TOY_JOBS = "tests.toy_jobs"  # toy job kinds the workers import (STUDIO_EXTRA_JOB_MODULES)
TOY = "eval:toy-count"


# ------------------------------------------------------------------------------------------------
# figures


@dataclass
class Check:
    """One check's figures (name -> value, in print order) and the problems it found."""

    section: str
    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    skipped: str = ""  # why the check could not run here (e.g. no tmpfs mount without root)

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, text: str) -> None:
        self.problems.append(text)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def print_table(checks: list[Check], out: Any = sys.stdout) -> None:
    """One line per figure: section, check, figure, value; then each check's verdict."""
    rows = [("section", "check", "figure", "value")]
    for c in checks:
        if c.skipped:
            rows.append((c.section, c.name, "skipped", c.skipped))
        for k, v in c.figures.items():
            rows.append((c.section, c.name, k, _fmt(v)))
        rows.append((c.section, c.name, "verdict", "ok" if c.ok else f"{len(c.problems)} PROBLEM(S)"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, r in enumerate(rows):
        print("  ".join(x.ljust(w) for x, w in zip(r[:3], widths)) + "  " + r[3], file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 12, file=out)
    for c in checks:
        for p in c.problems[:10]:
            print(f"PROBLEM [{c.section}/{c.name}] {p}", file=out)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds of latencies in seconds."""
    if not values:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50_ms": qs[49] * 1e3, "p95_ms": qs[94] * 1e3, "p99_ms": qs[98] * 1e3}


# ------------------------------------------------------------------------------------------------
# small shared pieces


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120.0, headers: dict[str, str] | None = None) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5, headers=headers).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return False


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def blob_files(studio: Any) -> set[Path]:
    """Every stored blob (staging files excluded)."""
    root = studio.blobs.root
    if not root.is_dir():
        return set()
    return {p for p in root.glob("??/??/*") if p.is_file()}


def staging_files(studio: Any) -> list[Path]:
    """Temporary files the blob store left behind (a write killed or failed half-way)."""
    root = studio.blobs.root
    if not root.is_dir():
        return []
    return [p for p in root.rglob(".tmp*") if p.is_file()]


def table_counts(studio: Any) -> dict[str, int]:
    from sqlalchemy import func, select

    from storage import Effect, LoraFile, Pair, Vote

    with studio.session() as s:
        return {
            m.__tablename__: s.scalar(select(func.count()).select_from(m))
            for m in (Effect, Pair, LoraFile, Vote)
        }


def integrity(studio: Any) -> str:
    """SQLite's own verdict on the database file ("ok" when intact)."""
    path = studio.config.data_dir / "studio.db"
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
        return ";".join(r[0] for r in conn.execute("PRAGMA integrity_check"))


# ------------------------------------------------------------------------------------------------
# Faults: kill -9 and resume


TEACHER_TRAIN = dict(
    rank=4, alpha=4.0, steps=60, batch=2, checkpoint_every=5, sample_every=0, keep_checkpoints=2
)
DISTILL_STEPS = 12  # long enough that a kill lands inside the run on a fast machine


def fault_studio(root: Path) -> Any:
    """A studio on a random SMALL backbone with two effects that have pairs, teachers and prompts."""
    from studio_fixtures import small_studio
    from test_distill_service import _add_effect  # the distillation tests' effect builder

    studio = small_studio(root / "data", root)
    _add_effect(studio, root, "warm", 1)
    _add_effect(studio, root, "frame", 2)
    return studio


def distill_overrides() -> dict[str, Any]:
    from test_distill_service import FAST

    # two micro-batches: steps slow enough to be caught mid-run (the tiny preset takes one)
    return {**FAST, "steps": DISTILL_STEPS, "checkpoint_every": 2, "micro_batches": 2}


def _row(studio: Any, run_id: int) -> Any:
    from studio_fixtures import run_row

    return run_row(studio, run_id)


def wait_run(studio: Any, run_id: int, until: Callable[[Any], bool], timeout: float = 180.0) -> Any:
    from studio_fixtures import wait_run as wait

    return wait(studio, run_id, until, timeout)


def torn_files(studio: Any, run_id: int) -> list[str]:
    """Files of the run that are referenced (or look final) but are not whole."""
    from safetensors import safe_open
    from sqlalchemy import select

    from distill.checkpointing import COMPLETE, STEP_PREFIX
    from storage import Checkpoint, LoraFile
    from studio import runs

    bad = []
    with studio.session() as s:
        ckpts = s.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id)).all()
        loras = s.scalars(select(LoraFile).where(LoraFile.run_id == run_id)).all()
    data = studio.config.data_dir.resolve()
    for c in ckpts:
        p = Path(c.path) if Path(c.path).is_absolute() else data / c.path
        if not p.exists():
            continue  # pruned: last_checkpoint skips it
        if p.is_dir():
            if not (p / COMPLETE).exists():
                bad.append(f"checkpoint row {c.id} points at an incomplete folder {p}")
        elif c.sha256 and sha256_file(p) != c.sha256:
            bad.append(f"checkpoint row {c.id}: {p} does not match its sha256")
    ckdir = runs.run_dir(studio, run_id) / "checkpoints"
    for p in ckdir.glob(STEP_PREFIX + "*") if ckdir.is_dir() else []:
        if p.is_dir() and not p.name.endswith((".tmp", ".old")):
            if not (p / COMPLETE).exists():
                bad.append(f"{p} is a checkpoint folder without its COMPLETE mark")
                continue
            try:
                with safe_open(p / "state.safetensors", "pt") as f:
                    for k in f.keys():
                        f.get_tensor(k)
            except Exception as e:
                bad.append(f"{p}: state.safetensors unreadable ({e})")
    for lora in loras:
        p = studio.blobs.root / lora.path
        if not p.is_file() or sha256_file(p) != lora.sha256 or p.stat().st_size != lora.bytes:
            bad.append(f"LoRA file row {lora.id}: {p} is missing or not whole")
    return bad


def _resume_steps_in_log(studio: Any, run_id: int) -> list[int | None]:
    """Per worker start of the run (in order): the checkpoint step it resumed from, or None."""
    from studio import runs

    text = runs.log_path(studio, run_id).read_text(errors="replace")
    out: list[int | None] = []
    for m in re.finditer(
        rf"worker: run {run_id} \([^)]*\) on \S+, rank 0(, resuming from step (\d+))?", text
    ):
        out.append(int(m.group(2)) if m.group(2) else None)
    return out


@dataclass
class KillResult:
    check: Check
    run_id: int


def kill_and_resume(
    studio: Any, run_id: int, kills: int, rng: random.Random, total: int, check: Check, timeout: float = 240.0
) -> None:
    """Kill the run's worker with SIGKILL ``kills`` times at random steps, checking and resuming each time."""
    from storage import RunStatus
    from studio import runs

    expected: list[int | None] = [None]  # the first start resumes from nothing
    done = truthful = late = 0
    for _ in range(kills):
        start = expected[-1] or 0
        target = rng.randint(start + 1, max(start + 1, int(total * 0.8)))

        def reached(r: Any, t: int = target, starts: int = len(expected)) -> bool:
            # a step past the resume point, reported by the worker start we are waiting for
            return r.status.finished or (
                r.status == RunStatus.RUNNING
                and r.step >= t
                and len(_resume_steps_in_log(studio, run_id)) >= starts
            )

        run = wait_run(studio, run_id, reached, timeout)
        if run.status.finished:
            late += 1
            break
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere inside the step (or a checkpoint write)
        try:
            os.kill(run.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30
        while run_id not in runs.reconcile(studio, run_id) and time.monotonic() < deadline:
            if _row(studio, run_id).status.finished:
                break
            time.sleep(0.05)
        row = _row(studio, run_id)
        if row.status == RunStatus.SUCCEEDED:  # it finished before the signal landed
            late += 1
            break
        done += 1
        ck = runs.last_checkpoint(studio, run_id)
        want = f"resume to continue from step {ck.step}" if ck else "resume to start again from the beginning"
        if row.status == RunStatus.FAILED and row.error and want in row.error:
            truthful += 1
        else:
            check.fail(
                f"after kill {done} the row says {row.status.value}: {row.error!r} (expected '{want}')"
            )
        for problem in torn_files(studio, run_id):
            check.fail(f"after kill {done}: {problem}")
        runs.resume(studio, run_id)
        shown = _row(studio, run_id).step
        if shown != (ck.step if ck else 0):  # the relaunched row must not show the lost steps
            check.fail(
                f"after resume the row shows step {shown}, the run continues from {ck.step if ck else 0}"
            )
        expected.append(ck.step if ck else None)
    final = wait_run(studio, run_id, lambda r: r.status.finished, timeout)
    if final.status != RunStatus.SUCCEEDED:
        check.fail(f"the run ended {final.status.value}: {final.error}")
    seen = _resume_steps_in_log(studio, run_id)
    resumed_right = sum(1 for a, b in zip(seen[1:], expected[1:]) if a == b)
    if seen != expected:
        check.fail(f"worker starts resumed from {seen}, the last checkpoints were {expected}")
    steps = [s for s, _ in runs.metric_series(studio, run_id, "loss")]
    if steps != list(range(1, total + 1)) or len(_loss_rows(studio, run_id)) != total:
        check.fail(
            f"the loss curve has steps {steps[:5]}... ({len(_loss_rows(studio, run_id))} rows for {total} steps)"
        )
    for problem in torn_files(studio, run_id):
        check.fail(f"at the end: {problem}")
    check.figures.update(
        {
            "kills": done,
            "kills that came too late (run done)": late,
            "rows truthful after kill": f"{truthful}/{done}",
            "resumed from the last checkpoint": f"{resumed_right}/{done}",
            "torn files found": sum(
                "torn" in p or "not whole" in p or "incomplete" in p for p in check.problems
            ),
            "stray staging files": len(staging_files(studio)),
        }
    )


def _loss_rows(studio: Any, run_id: int) -> list[int]:
    from sqlalchemy import select

    from storage import RunMetric

    with studio.session() as s:
        return list(
            s.scalars(select(RunMetric.step).where(RunMetric.run_id == run_id, RunMetric.name == "loss"))
        )


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def teacher_kills(root: Path, kills: int = 2, seed: int = 0, tol: float = 1e-4) -> Check:
    """Kill -9 a teacher training ``kills`` times; the final teacher equals an uninterrupted one."""
    from distill.backbones import adapters
    from distill.lora_training import LoraTrainConfig, train_lora
    from storage import LoraFile
    from studio import teachers_service

    check = Check("faults", "kill -9 teacher training")
    studio = fault_studio(root)
    cfg = LoraTrainConfig.for_backbone("tiny", **TEACHER_TRAIN)
    t0 = time.perf_counter()
    rid = teachers_service.submit_training(studio, "warm", cfg)
    kill_and_resume(studio, rid, kills, random.Random(seed), cfg.steps, check)
    with studio.session() as s:
        lora = s.query(LoraFile).filter(LoraFile.run_id == rid).order_by(LoraFile.id.desc()).first()
    if lora is None:
        check.fail("the run registered no teacher LoRA")
        return check
    killed, _ = adapters.read_lora_file(studio.blobs.root / lora.path)
    # the same training, uninterrupted, in this process
    bb = teachers_service.open_backbone(studio)
    pairs, _ = teachers_service.training_pairs(studio, "warm")
    train_lora(bb, "t", pairs, cfg)
    ref_path = adapters.save_lora(bb.transformer, "t", root / "reference.safetensors")
    ref, _ = adapters.read_lora_file(ref_path)
    diff = _max_diff(killed, ref)
    check.figures["final LoRA max |diff| vs uninterrupted"] = diff
    check.figures["seconds"] = round(time.perf_counter() - t0, 1)
    if not diff <= tol:
        check.fail(f"the resumed teacher differs from an uninterrupted one by {diff} (tolerance {tol})")
    return check


def distill_kills(root: Path, kills: int = 2, seed: int = 1, tol: float = 1e-4) -> Check:
    """Kill -9 a distillation ``kills`` times; the final student equals an uninterrupted one."""
    from distill.config import DistillConfig
    from distill.export import student_init
    from distill.trainer import STUDENT, adapter_params
    from studio import distill_service, runs

    check = Check("faults", "kill -9 distillation")
    studio = fault_studio(root)
    t0 = time.perf_counter()
    rid = distill_service.start_distillation(studio, ["warm", "frame"], distill_overrides())
    with studio.session() as s:  # the tiny preset's coarse stage runs first
        total = DistillConfig.from_dict(runs.job_config(s.get(runs.Run, rid))["distill"]).total_steps
    kill_and_resume(studio, rid, kills, random.Random(seed), total, check)
    lora = distill_service.student_lora(studio, rid)
    if lora is None:
        check.fail("the run registered no student LoRA")
        return check
    killed = student_init(studio.blobs.root / lora.path)
    with studio.session() as s:
        config = runs.job_config(s.get(runs.Run, rid))
    prep = distill_service.prepare(studio, config, root / "reference-run")
    prep.distiller.train()
    ref = {k: p.detach() for k, p in adapter_params(prep.backbone.transformer, STUDENT).items()}
    diff = _max_diff(killed, ref)
    check.figures["final student max |diff| vs uninterrupted"] = diff
    check.figures["seconds"] = round(time.perf_counter() - t0, 1)
    if not diff <= tol:
        check.fail(f"the resumed student differs from an uninterrupted one by {diff} (tolerance {tol})")
    return check


UI_STANDIN = """
import sys, time
from pathlib import Path
from studio import runs
from studio.config import StudioConfig
from studio.context import Studio
studio = Studio.open(StudioConfig(data_dir=Path(sys.argv[1])))
ids = [runs.submit(studio, sys.argv[2], {"n": int(sys.argv[3]), "sleep": 0.05, "every": 5, "device": f"ui-{i}"})
       for i in range(int(sys.argv[4]))]
print(" ".join(map(str, ids)), flush=True)
time.sleep(600)
"""


def ui_kill(root: Path, n_runs: int = 2, steps: int = 60, restart_app: bool = False) -> Check:
    """A UI process launches runs and is killed with its process group; the runs go on and a restarted
    studio shows them (``restart_app``: the real app.py, else the same re-attach call in this process)."""
    from storage import RunStatus
    from studio import runs
    from studio.config import StudioConfig
    from studio.context import Studio
    from studio.ui import runs_view  # imports gradio (seconds): before the runs start, not while they go

    check = Check("faults", "kill -9 the UI while runs go")
    data = root / "ui-data"
    env = {**os.environ, runs.EXTRA_JOB_MODULES_ENV: TOY_JOBS, "PYTHONPATH": str(ROOT)}
    ui = subprocess.Popen(
        [sys.executable, "-c", UI_STANDIN, str(data), TOY, str(steps), str(n_runs)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which we kill whole (like closing a terminal)
    )
    ids = [int(x) for x in ui.stdout.readline().split()]
    os.environ[runs.EXTRA_JOB_MODULES_ENV] = TOY_JOBS
    studio = Studio.open(StudioConfig(data_dir=data))
    for rid in ids:
        wait_run(studio, rid, lambda r: r.status == RunStatus.RUNNING and r.step >= 2, 120)
    os.killpg(ui.pid, signal.SIGKILL)
    ui.wait()
    time.sleep(0.5)
    alive = [rid for rid in ids if runs.worker_alive(_row(studio, rid))]
    check.figures["runs launched by the UI"] = len(ids)
    check.figures["workers alive after the UI was killed"] = len(alive)
    if len(alive) != len(ids):
        check.fail(f"runs {sorted(set(ids) - set(alive))} died with the UI")
    if restart_app:
        shown = _app_py_reattaches(data, ids, env)
    else:
        active = {v.id for v in runs_view.reattach(studio)}
        note = runs_view.active_runs_markdown(studio)
        shown = [rid for rid in ids if rid in active and f"#{rid} " in note]
    check.figures["runs shown by the restarted UI"] = len(shown)
    if len(shown) != len(ids):
        check.fail(f"the restarted UI shows {shown} of {ids}")
    ends = [wait_run(studio, rid, lambda r: r.status.finished, 180) for rid in ids]
    finished = sum(r.status == RunStatus.SUCCEEDED and r.step == steps for r in ends)
    check.figures["runs that finished"] = f"{finished}/{len(ids)}"
    if finished != len(ids):
        check.fail(f"runs ended {[(r.id, r.status.value, r.error) for r in ends]}")
    return check


def _app_py_reattaches(data: Path, ids: list[int], env: dict[str, str]) -> list[int]:
    port = free_port()
    log = data / "app.log"
    with open(log, "w") as out:
        app = subprocess.Popen(
            [sys.executable, "app.py", "--data-dir", str(data), "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        up = wait_http(f"http://127.0.0.1:{port}/", 180)
        text = log.read_text()
        return [rid for rid in ids if up and f"re-attached to run {rid} " in text]
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        app.wait(timeout=30)


# -- disk full, unwritable data folder --------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str = "8m", readonly: bool = False) -> Iterator[bool]:
    """A real tmpfs of ``size`` mounted at ``path`` (root only); yields False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Fill the filesystem of ``folder`` until about ``leave`` bytes are free."""
    filler = folder / "filler.bin"
    with open(filler, "wb") as fh:
        try:
            while True:
                free = shutil.disk_usage(folder).free
                if free <= leave:
                    break
                fh.write(b"\0" * max(4096, min(1 << 20, free - leave)))
                fh.flush()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return filler


def _pair_zip(path: Path, n: int, seed: int = 0, size: int = 48) -> Path:
    import numpy as np
    from studio_fixtures import png_bytes

    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            img = rng.random((size, size, 3))  # noise: PNGs that do not compress
            zf.writestr(f"p{i}_source.png", png_bytes(img))
            zf.writestr(f"p{i}_target.png", png_bytes(1 - img))
    return path


def disk_full(root: Path, simulate: bool | None = None) -> Check:
    """Pair-set import and a training run on a full disk: a clear error and nothing half-stored.

    On a real 8 MB tmpfs where this process may mount one (root), else with ENOSPC injected into the
    blob store's writes (``simulate``; the run part needs the real disk)."""
    from storage import BlobStoreError
    from studio import library
    from studio.config import StudioConfig
    from studio.context import Studio

    check = Check("faults", "disk full")
    disk = root / "small-disk"
    with small_disk(disk) if not simulate else contextlib.nullcontext(False) as mounted:
        if simulate is False and not mounted:
            check.skipped = "cannot mount a tmpfs here (needs root)"
            return check
        studio = Studio.open(StudioConfig(data_dir=disk / "data"))
        library.import_pairset(studio, "first", _pair_zip(root / "first.zip", 2, seed=9))
        before, blobs_before = table_counts(studio), blob_files(studio)
        big = _pair_zip(root / "big.zip", 12, seed=1)
        check.figures["disk"] = "tmpfs 8 MB" if mounted else "ENOSPC injected"
        with _full(disk, mounted) as _:
            try:
                library.import_pairset(studio, "big", big)
                check.fail("an import onto a full disk succeeded")
            except BlobStoreError as e:
                msg = str(e)
                check.figures["import error"] = msg[:70] + "..."
                if "is full" not in msg or "Free some space" not in msg:
                    check.fail(f"the import error does not say the disk is full: {msg}")
            except Exception as e:  # anything else is not a curator's message
                check.fail(f"the import raised {type(e).__name__}: {e}")
        after, blobs_after = table_counts(studio), blob_files(studio)
        left = len(blobs_after - blobs_before)
        check.figures["rows added by the failed import"] = sum(after.values()) - sum(before.values())
        check.figures["blobs left by the failed import"] = left
        check.figures["staging files left"] = len(staging_files(studio))
        if after != before or left or staging_files(studio):
            check.fail(
                f"the failed import left rows {before} -> {after}, {left} blobs, {staging_files(studio)}"
            )
        try:  # space again: the same import now works
            res = library.import_pairset(studio, "big", big)
            check.figures["import after freeing space"] = f"{res.pairs} pairs"
        except Exception as e:
            check.fail(f"the import still fails after space was freed: {e}")
        if mounted:
            _run_on_full_disk(root, disk, check)
    return check


@contextlib.contextmanager
def _full(disk: Path, mounted: bool, leave: int = 300_000) -> Iterator[None]:
    """The disk full (``leave`` bytes free: a few pairs fit, the rest do not) until the block ends."""
    if mounted:
        filler = fill_disk(disk, leave)
        try:
            yield
        finally:
            filler.unlink()
        return
    from storage import blobs

    real, calls = blobs.os.fsync, [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] > 6:  # the first few blobs fit
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    blobs.os.fsync = fsync
    try:
        yield
    finally:
        blobs.os.fsync = real


def _run_on_full_disk(root: Path, disk: Path, check: Check) -> None:
    """A teacher training whose checkpoints no longer fit: it fails, and its row says the disk is full."""
    from studio_fixtures import add_toy_effect, small_studio

    from distill.lora_training import LoraTrainConfig
    from storage import RunStatus
    from studio import runs, teachers_service

    studio = small_studio(disk / "run-data", root)  # weights outside the small disk, data on it
    add_toy_effect(studio, root, "warm", 3, teacher_std=None)
    cfg = LoraTrainConfig.for_backbone("tiny", **{**TEACHER_TRAIN, "steps": 200, "checkpoint_every": 2})
    rid = teachers_service.submit_training(studio, "warm", cfg)
    wait_run(studio, rid, lambda r: r.status == RunStatus.RUNNING and r.step >= 3, 120)
    filler = fill_disk(disk, leave=64_000)
    try:
        wait_run(studio, rid, lambda r: r.status.finished or not runs.worker_alive(r), 120)
        runs.reconcile(studio, rid)
        run = _row(studio, rid)
        error = run.error or ""
        check.figures["run on a full disk"] = run.status.value
        check.figures["run error"] = next((x for x in error.splitlines() if "full" in x), error)[:70] + "..."
        if run.status != RunStatus.FAILED or "disk" not in error or "is full" not in error:
            check.fail(f"a run on a full disk ended {run.status.value} with {error!r}")
        ck = runs.last_checkpoint(studio, rid)
        for problem in torn_files(studio, rid):
            check.fail(problem)
    finally:
        filler.unlink()
    if ck is not None:  # space again: it resumes from its last whole checkpoint
        runs.resume(studio, rid)
        run = wait_run(studio, rid, lambda r: r.status.finished, 180)
        check.figures["resumed after freeing space"] = f"{run.status.value} from step {ck.step}"
        if run.status != RunStatus.SUCCEEDED:
            check.fail(f"the resumed run ended {run.status.value}: {run.error}")


def unwritable_data_dir(root: Path) -> Check:
    """Opening the studio on a data folder it cannot write: a clear error, from the CLI without a traceback."""
    from studio.config import StudioConfig
    from studio.context import Studio

    check = Check("faults", "unwritable data folder")
    a_file = root / "not-a-folder"
    a_file.write_text("x")
    cases: dict[str, Path] = {"path through a file": a_file / "data"}
    ro = root / "read-only"
    stack = contextlib.ExitStack()
    with stack:
        if os.geteuid() != 0:
            ro.mkdir()
            ro.chmod(0o500)
            stack.callback(ro.chmod, 0o700)
            cases["read-only folder"] = ro / "data"
        elif stack.enter_context(small_disk(ro, "1m", readonly=True)):
            cases["read-only filesystem"] = ro
        for what, path in cases.items():
            try:
                Studio.open(StudioConfig(data_dir=path))
                check.fail(f"{what}: the studio opened on {path}")
                continue
            except OSError as e:
                msg = str(e)
            except Exception as e:
                check.fail(f"{what}: {type(e).__name__} is not a curator's error: {e}")
                continue
            if "STUDIO_DATA_DIR" not in msg or str(path) not in msg:
                check.fail(f"{what}: the message does not say which folder or what to do: {msg}")
            r = subprocess.run(
                [sys.executable, "-m", "studio", "--data-dir", str(path), "effects", "list"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if r.returncode != 2 or "Traceback" in r.stderr or "STUDIO_DATA_DIR" not in r.stderr:
                check.fail(f"{what}: the CLI answered {r.returncode}: {r.stderr[-300:]}")
        check.figures["cases"] = len(cases)
        check.figures["clear errors"] = f"{len(cases) - len(check.problems)}/{len(cases)}"
        if len(cases) == 1:
            check.skipped = "read-only case needs non-root or a tmpfs mount"
    return check


# ------------------------------------------------------------------------------------------------
# Bad input: hypothesis fuzzing


def _hypothesis_run(examples: int, seed: int, strategy: Any, body: Callable[[Any], None]) -> None:
    """Run ``body`` on ``examples`` drawn inputs (seeded; no example database, no deadline).

    ``body`` records what it finds instead of raising, so one run reports every failure kind."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    run = settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )(given(strategy)(body))
    hseed(seed)(run)()


class FuzzTally:
    """Counts of one fuzz target: tried, accepted, refused with a clear error, failures found."""

    def __init__(self, check: Check, target: str) -> None:
        self.check, self.target = check, target
        self.tried = self.accepted = self.refused = 0
        self.failures: list[str] = []

    def failure(self, text: str) -> None:
        if len(self.failures) < 20:
            self.check.fail(f"{self.target}: {text}")
        self.failures.append(text)

    def report(self) -> None:
        self.check.figures[f"{self.target}: tried / accepted / refused clearly / failures"] = (
            f"{self.tried} / {self.accepted} / {self.refused} / {len(self.failures)}"
        )


def _png(size: int, seed: int) -> bytes:
    import numpy as np
    from studio_fixtures import png_bytes

    return png_bytes(np.random.default_rng(seed).random((size, size, 3)))


def pairset_strategy() -> Any:
    from hypothesis import strategies as st

    names = st.sampled_from(
        ["a_source.png", "a_target.png", "b.png", "b_target.png", "source/c.png", "target/c.png",
         "control/d.jpg", "targets/d.png", "a_target.txt", "../evil_source.png", "/abs_target.png",
         "__MACOSX/._a_source.png", "x" * 300 + "_source.png", "top/e_before.png", "top/e_after.png",
         "f.webp", "f_result.webp", "g_input.bmp", "g_output.bmp", "notes.md", "dir/", "ü_source.png"]
    ) | st.text(min_size=1, max_size=30)  # fmt: skip
    content = st.one_of(
        st.builds(_png, st.sampled_from([8, 32, 40, 64]), st.integers(0, 50)),
        st.builds(lambda n, s: _png(40, s)[:n], st.integers(0, 300), st.integers(0, 50)),  # truncated
        st.binary(max_size=400),
        st.text(max_size=200).map(str.encode),
    )
    valid = [("a_source.png", _png(40, 1)), ("a_target.png", _png(40, 2))]
    entries = st.tuples(st.booleans(), st.lists(st.tuples(names, content), max_size=12)).map(
        lambda t: (valid if t[0] else []) + t[1]  # half the cases start from a valid pair
    )
    return st.tuples(
        st.sampled_from(["zip", "zip", "folder", "garbage"]),
        entries,
        st.sampled_from(["fx", "Bad Name", "", "a" * 70, "ok-name_2"]),
    )


def fuzz_pairsets(root: Path, examples: int = 60, seed: int = 0) -> FuzzTally:
    """Random archives and folders through ``library.import_pairset``: a clear error or a whole import."""
    from storage import BlobStoreError
    from studio import library
    from studio.config import StudioConfig
    from studio.context import Studio
    from studio.library import LibraryError
    from studio.pairsets import PairSetError

    studio = Studio.open(StudioConfig(data_dir=root / "fuzz-pairs"))
    tally = FuzzTally(Check("bad input", "fuzz"), "pair-set import")
    counter = [0]

    def body(case: tuple[str, list[tuple[str, bytes]], str]) -> None:
        kind, entries, name = case
        counter[0] += 1
        where = root / f"case-{counter[0]}"
        where.mkdir()
        if kind == "garbage":
            path = where / "set.zip"
            path.write_bytes(b"PK\x03\x04" + b"".join(c for _, c in entries)[:2000])
        elif kind == "zip":
            path = where / "set.zip"
            with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # duplicate names are part of the fuzz
                for n, c in entries:
                    zf.writestr(n, c)
        else:
            path = where / "set"
            path.mkdir()
            for n, c in entries:
                rel = Path(n.replace("\0", "_").lstrip("/").replace("..", "__"))
                if not rel.name or rel.name.endswith("/"):
                    continue
                try:
                    (path / rel).parent.mkdir(parents=True, exist_ok=True)
                    (path / rel).write_bytes(c)
                except OSError:
                    continue  # a name this filesystem cannot hold
        effect = f"{name}{counter[0]}" if name in ("fx", "ok-name_2") else name
        before, blobs = table_counts(studio), blob_files(studio)
        tally.tried += 1
        try:
            res = library.import_pairset(studio, effect, path)
        except (PairSetError, LibraryError) as e:
            tally.refused += 1
            if not str(e).strip() or "Traceback" in str(e):
                tally.failure(f"an empty or technical message: {e!r}")
            if table_counts(studio) != before or blob_files(studio) != blobs:
                tally.failure(f"a refused import left rows or files behind ({str(e)[:80]})")
        except BlobStoreError as e:
            tally.failure(f"the blob store failed on a healthy disk: {e}")
        except Exception as e:
            tally.failure(f"crash {type(e).__name__}: {str(e)[:120]} on {kind} {[n for n, _ in entries][:4]}")
        else:
            tally.accepted += 1
            added = table_counts(studio)["pairs"] - before["pairs"]
            if added != res.pairs or res.pairs < 1:
                tally.failure(f"an accepted import says {res.pairs} pairs but stored {added}")
        finally:
            shutil.rmtree(where, ignore_errors=True)

    _hypothesis_run(examples, seed, pairset_strategy(), body)
    tally.report()
    return tally


class _Trap:
    """Unpickling this creates a marker file: proof that a pickle was loaded (it must never be)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def lora_strategy() -> Any:
    from hypothesis import strategies as st

    return st.tuples(
        st.sampled_from(["truncate", "flip", "header", "shapes", "pickle", "torch-save", "garbage", "dtype"]),
        st.integers(0, 2**31),
        st.sampled_from([".safetensors", ".safetensors", ".pt", ".bin"]),
    )


def fuzz_lora(root: Path, examples: int = 60, seed: int = 0) -> FuzzTally:
    """Damaged, reshaped and pickled LoRA files through ``teachers_service.import_teacher``."""
    import pickle
    import struct

    import torch
    from safetensors.torch import load_file, save
    from studio_fixtures import SMALL, scene_pairs, toy_lora_file

    from distill.backbones.tiny import TinyEditor
    from studio import library, teachers_service
    from studio.config import StudioConfig
    from studio.context import Studio
    from studio.teachers_service import TeacherError

    studio = Studio.open(StudioConfig(data_dir=root / "fuzz-lora"))
    library.import_pairset(studio, "fx", scene_pairs(root / "fx-pairs", 1), teacher_prompt="Do fx.")
    backbone = TinyEditor.random(SMALL, seed=0)
    good_path = toy_lora_file(root / "good.safetensors", seed=3)
    good = good_path.read_bytes()
    tensors = load_file(str(good_path))
    marker = root / "PICKLE-WAS-LOADED"
    tally = FuzzTally(Check("bad input", "fuzz"), "LoRA import")
    counter = [0]

    def body(case: tuple[str, int, str]) -> None:
        kind, n, suffix = case
        rng = random.Random(n)
        counter[0] += 1
        path = root / f"lora-{counter[0]}{suffix}"
        if kind == "truncate":
            data = good[: rng.randrange(len(good))]
        elif kind == "flip":
            b = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(min(len(b), 8 + struct.unpack("<Q", good[:8])[0] + 64))
                b[i] = rng.randrange(256)
            data = bytes(b)
        elif kind == "header":
            header = rng.choice([b"{}", b"[1,2]", b'{"a":{"dtype":"F32","shape":[99999999999],"data_offsets":[0,4]}}',
                                 b"not json", b'{"__metadata__":{"x":1}}', b"\xff\xfe"])  # fmt: skip
            length = rng.choice([len(header), 2**63, 0, len(header) + 7])
            data = struct.pack("<Q", length % 2**64) + header + b"\0" * rng.randint(0, 64)
        elif kind == "shapes":
            out = {}
            for k, v in tensors.items():
                shape = list(v.shape)
                if rng.random() < 0.5:
                    shape[rng.randrange(len(shape))] = rng.randint(1, 9)
                out[k] = torch.randn(shape)
            data = save(out)
        elif kind == "dtype":
            data = save(
                {
                    k: (v * 1e38).to(torch.float16) if rng.random() < 0.5 else v.to(torch.int8)
                    for k, v in tensors.items()
                }
            )
        elif kind == "pickle":
            data = pickle.dumps({"state_dict": _Trap(marker)})
        elif kind == "torch-save":
            buf = io.BytesIO()
            torch.save({"trap": _Trap(marker)}, buf)
            data = buf.getvalue()
        else:
            data = rng.randbytes(rng.randint(0, 300))
        path.write_bytes(data)
        before, blobs = table_counts(studio), blob_files(studio)
        tally.tried += 1
        try:
            teachers_service.import_teacher(studio, "fx", path, backbone=backbone)
        except TeacherError as e:
            tally.refused += 1
            if table_counts(studio) != before or blob_files(studio) != blobs:
                tally.failure(f"a refused {kind} file left rows or files behind")
            if kind in ("pickle", "torch-save") and "pickle" not in str(e).lower():
                tally.failure(f"a {kind} file was refused without saying pickles are refused: {e}")
        except Exception as e:
            tally.failure(f"crash on a {kind} file: {type(e).__name__}: {str(e)[:120]}")
        else:
            tally.accepted += 1
            if kind in ("pickle", "torch-save", "garbage", "header"):
                tally.failure(f"a {kind} file was imported as a teacher")
        finally:
            path.unlink(missing_ok=True)
        if marker.exists():
            tally.failure(f"a pickle was loaded (from a {kind} file named *{suffix})")
            marker.unlink()

    _hypothesis_run(examples, seed, lora_strategy(), body)
    tally.report()
    return tally


def settings_strategy() -> Any:
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(10**12), 10**12)
        | st.floats(allow_nan=True)
        | st.text(max_size=12)
    )
    values = st.recursive(
        scalars,
        lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=8), v, max_size=3),
        max_leaves=6,
    )
    keys = st.sampled_from(
        ["steps", "batch", "rank", "lr", "p_switch", "tau_max", "tau_min", "critic_updates", "student_steps",
         "student_lora", "fake_lora", "seed", "checkpoint_every", "caption_dropout", "alpha", "warmup_steps",
         "target_steps", "resolution", "nonsense"]
    ) | st.text(max_size=10)  # fmt: skip
    extra = st.dictionaries(keys, values, max_size=4).map(json.dumps) | st.text(max_size=60)
    return st.tuples(extra, st.sampled_from(["teacher", "distill", "auth-file"]))


def fuzz_settings(root: Path, examples: int = 100, seed: int = 0) -> FuzzTally:
    """The curator's settings boxes (teacher and distillation "more settings" JSON) and auth files:
    a clear SettingsError/DistillError/AccessError, or settings a run can actually use."""
    from distill.config import DistillConfig
    from distill.lora_training import LoraTrainConfig
    from studio import distill_service
    from studio.config import StudioConfig
    from studio.context import Studio
    from studio.distill_service import DistillError
    from studio.ui import access, teachers_tab
    from studio.ui.runs_view import SettingsError, parse_extra

    studio = Studio.open(StudioConfig(data_dir=root / "fuzz-settings"))
    tally = FuzzTally(Check("bad input", "fuzz"), "settings and config files")

    def usable(cfg: Any, where: str = "") -> str | None:
        """Why a config that was accepted would still break a run (a wrong type or range), or None."""
        import dataclasses

        defaults = type(cfg)()
        for f in dataclasses.fields(cfg):
            v, want = getattr(cfg, f.name), getattr(defaults, f.name)
            if dataclasses.is_dataclass(want):
                why = usable(v, f"{f.name}.") if dataclasses.is_dataclass(v) else f"{f.name}={v!r}"
                if why:
                    return why
                continue
            if want is None or isinstance(want, tuple):
                continue
            ok = isinstance(v, type(want)) or (isinstance(want, float) and isinstance(v, int))
            if isinstance(v, bool) and not isinstance(want, bool):
                ok = False
            if isinstance(v, float) and v != v:
                ok = False
            if ok and f.name in ("steps", "batch", "rank", "critic_updates", "student_steps") and v < 1:
                ok = False
            if not ok:
                return f"{where}{f.name}={v!r}"
        return None

    def body(case: tuple[str, str]) -> None:
        text, target = case
        tally.tried += 1
        try:
            if target == "teacher":
                cfg = teachers_tab.train_config(studio, 4, 10, 1e-3, text)
                assert isinstance(cfg, LoraTrainConfig)
            elif target == "distill":
                cfg = distill_service._config("tiny", None, parse_extra(text))
                assert isinstance(cfg, DistillConfig)
            else:
                f = root / "users.txt"
                f.write_text(text)
                access.resolve_access("0.0.0.0", auth_file=f, env={})
                cfg = None
        except (SettingsError, DistillError, access.AccessError) as e:
            tally.refused += 1
            if not str(e).strip():
                tally.failure(f"{target}: an empty message for {text!r}")
        except Exception as e:
            tally.failure(f"{target}: crash {type(e).__name__}: {str(e)[:100]} on {text[:60]!r}")
        else:
            tally.accepted += 1
            why = usable(cfg) if cfg is not None else None
            if why:
                tally.failure(f"{target}: accepted a setting no run can use ({why}) from {text[:60]!r}")

    _hypothesis_run(examples, seed, settings_strategy(), body)
    tally.report()
    return tally


def api_strategy() -> Any:
    from hypothesis import strategies as st

    token = st.sampled_from(["GOOD", "GOOD", "OTHER"]) | st.text(max_size=40)
    item = st.sampled_from(
        ["ITEM", "ITEM", "OTHER_ITEM", "0", "-1", "1e3", "99999999999999999999"]
    ) | st.text(max_size=8)
    full = st.just({"quality": "KEY_A", "consistency": "KEY_B", "style": "KEY_A"})
    form = full | st.dictionaries(
        st.sampled_from(["quality", "consistency", "style", "x"]) | st.text(max_size=6),
        st.sampled_from(["KEY_A", "KEY_B", "KEY_OTHER"]) | st.text(max_size=30),
        max_size=5,
    )
    return st.tuples(
        st.sampled_from(["page", "post", "post", "img", "raw"]), token, item, form, st.binary(max_size=300)
    )


def fuzz_api(root: Path, examples: int = 100, seed: int = 0) -> FuzzTally:
    """Voter-page HTTP inputs (tokens, item ids, form fields, raw bodies): never a 5xx, a vote stored
    only on a 303, never twice."""
    from sqlalchemy import func, select
    from starlette.testclient import TestClient
    from test_study import handmade_study, item_ids, key_of

    from storage import Vote
    from studio import study_service as ss
    from studio.config import StudioConfig
    from studio.context import Studio
    from studio.study_pages import create_app

    studio = Studio.open(StudioConfig(data_dir=root / "fuzz-api"))
    sid, other = handmade_study(studio, n_items=50), handmade_study(studio, n_items=2, name="other")
    [(_, good)] = ss.add_voters(studio, sid, ["ann"])
    [(_, stranger)] = ss.add_voters(studio, other, ["olga"])
    items, other_items = item_ids(studio, sid), item_ids(studio, other)
    client = TestClient(create_app(studio), raise_server_exceptions=False, follow_redirects=False)
    tally = FuzzTally(Check("bad input", "fuzz"), "voter API inputs")

    def votes() -> int:
        with studio.session() as s:
            return s.scalar(select(func.count()).select_from(Vote))

    def body(case: tuple[str, str, str, dict[str, str], bytes]) -> None:
        kind, token, item, form, raw = case
        token = {"GOOD": good, "OTHER": stranger}.get(token, token)
        current = ss.voter_page(studio, good).item_id if not ss.voter_page(studio, good).done else items[-1]
        item = {"ITEM": str(current), "OTHER_ITEM": str(other_items[0])}.get(item, item)
        keys = {
            "KEY_A": key_of(studio, current, "Alpha"),
            "KEY_B": key_of(studio, current, "Bravo"),
            "KEY_OTHER": key_of(studio, other_items[0], "Alpha"),
        }
        form = {k: keys.get(v, v) for k, v in form.items()}
        from urllib.parse import quote

        t, i = quote(token, safe=""), quote(item, safe="")
        before = votes()
        tally.tried += 1
        try:
            if kind == "page":
                r = client.get(f"/vote/{t}")
            elif kind == "img":
                r = client.get(f"/vote/{t}/img/{i}")
            elif kind == "raw":
                r = client.post(
                    f"/vote/{t}/item/{i}",
                    content=raw,
                    headers={"content-type": "application/x-www-form-urlencoded"},
                )
            else:
                r = client.post(f"/vote/{t}/item/{i}", data=form)
        except Exception as e:
            tally.failure(f"the client failed: {type(e).__name__}: {e}")
            return
        added = votes() - before
        if r.status_code >= 500:
            tally.failure(f"{kind} answered {r.status_code} for token {token[:12]!r} item {item!r}")
        elif r.status_code in (200, 303):
            tally.accepted += 1
        else:
            tally.refused += 1
        if added and not (r.status_code == 303 and token == good and kind in ("post", "raw")):
            tally.failure(f"{added} votes stored by a {kind} that answered {r.status_code}")
        if r.status_code == 303 and kind in ("post", "raw") and added != 3:
            tally.failure(f"an accepted answer stored {added} votes, not 3")

    _hypothesis_run(examples, seed, api_strategy(), body)
    with studio.session() as s:
        rows = s.execute(select(Vote.voter_id, Vote.item_id, Vote.question)).all()
    if len(rows) != len(set(rows)):
        tally.failure("a vote was stored twice")
    tally.check.figures["voter API: votes stored"] = len(rows)
    tally.report()
    return tally


def fuzz_all(root: Path, examples: int = 60, seed: int = 0) -> Check:
    check = Check("bad input", "fuzz (hypothesis)")
    t0 = time.perf_counter()
    for fn, n in (
        (fuzz_pairsets, examples),
        (fuzz_lora, examples),
        (fuzz_settings, 2 * examples),
        (fuzz_api, 2 * examples),
    ):
        tally = fn(root, n, seed)
        check.figures.update(tally.check.figures)
        check.problems += tally.check.problems
    check.figures["seconds"] = round(time.perf_counter() - t0, 1)
    return check


# ------------------------------------------------------------------------------------------------
# Load: voters and studio-page users on loopback


def _launch_ui(studio: Any) -> tuple[Any, str]:
    """The studio page (every tab) served on a loopback port from this process."""
    from studio.ui.app import build_app

    app = build_app(studio)
    port = free_port()
    app.queue(default_concurrency_limit=4).launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        show_error=False,
        ssr_mode=False,
        quiet=True,
    )
    return app, f"http://127.0.0.1:{port}"


def load(
    root: Path, voters: int = 8, items: int = 5, ui_users: int = 3, ui_rounds: int = 4, seconds: float = 120.0
) -> Check:
    """Voters (each posting every item, one answer sent twice at once) and studio-page users at the
    same time; bounded loops that stop by themselves (or after ``seconds``)."""
    import httpx
    from sqlalchemy import select
    from test_study import handmade_study

    from storage import Vote
    from studio import study_service as ss
    from studio.config import StudioConfig
    from studio.context import Studio
    from studio.serve import ServerThread
    from studio.study_pages import create_app

    check = Check("load", f"{voters} voters + {ui_users} studio users")
    studio = Studio.open(StudioConfig(data_dir=root / "load-data"))
    sid = handmade_study(studio, n_items=items)
    links = ss.add_voters(studio, sid, [f"voter{i}" for i in range(voters)])
    radio = re.compile(r"name='(quality|consistency|style)' value='([^']+)'")
    action = re.compile(r"action='/vote/[^/]+/item/(\d+)'")
    vote_lat: list[float] = []
    ui_lat: list[float] = []
    codes: dict[int, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def timed(client: Any, method: str, url: str, into: list[float], **kw: Any) -> Any:
        t = time.perf_counter()
        r = client.request(method, url, timeout=60, **kw)
        with lock:
            into.append(time.perf_counter() - t)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
        return r

    def voter(i: int, token: str, base: str) -> None:
        with httpx.Client(base_url=base) as c:
            for k in range(items):
                if time.monotonic() > deadline:
                    return
                page = timed(c, "GET", f"/vote/{token}", vote_lat)
                m = action.search(page.text)
                if page.status_code != 200 or not m:
                    errors.append(f"voter {i} item {k}: {page.status_code}")
                    return
                for src in re.findall(r"src='([^']+)'", page.text)[:2]:
                    timed(c, "GET", src, vote_lat)
                form: dict[str, str] = {}
                for q, v in radio.findall(page.text):
                    form.setdefault(q, v)
                url = f"/vote/{token}/item/{m.group(1)}"
                if k == 1:  # a double click: the same answer twice at once
                    with ThreadPoolExecutor(2) as twin:
                        rs = list(
                            twin.map(lambda _, u=url, f=form: timed(c, "POST", u, vote_lat, data=f), range(2))
                        )
                    if sorted(r.status_code for r in rs) != [303, 409]:
                        errors.append(f"voter {i}: a double submit answered {[r.status_code for r in rs]}")
                else:
                    r = timed(c, "POST", url, vote_lat, data=form)
                    if r.status_code != 303:
                        errors.append(f"voter {i} item {k}: POST answered {r.status_code}")

    def ui_user(base: str) -> None:
        with httpx.Client(base_url=base) as c:
            for _ in range(ui_rounds):
                if time.monotonic() > deadline:
                    return
                for path in ("/", "/config", "/gradio_api/info"):
                    r = timed(c, "GET", path, ui_lat)
                    if r.status_code != 200:
                        errors.append(f"studio page {path}: {r.status_code}")

    app, ui_url = _launch_ui(studio) if ui_users else (None, "")
    t0 = time.perf_counter()
    try:
        with ServerThread(create_app(studio)) as srv, ThreadPoolExecutor(voters + ui_users) as pool:
            futures = [pool.submit(voter, i, t, srv.url) for i, (_, t) in enumerate(links)]
            futures += [pool.submit(ui_user, ui_url) for _ in range(ui_users)]
            for f in futures:
                try:
                    f.result(timeout=seconds + 60)
                except Exception as e:
                    errors.append(f"a client failed: {type(e).__name__}: {e}")
    finally:
        if app is not None:
            app.close()
    wall = time.perf_counter() - t0
    with studio.session() as s:
        rows = s.execute(select(Vote.voter_id, Vote.item_id, Vote.question)).all()
    want = voters * items * 3
    lost, doubled = want - len(set(rows)), len(rows) - len(set(rows))
    verdict = integrity(studio)
    served = len(vote_lat) + len(ui_lat)
    check.figures.update(
        {
            "requests served": served,
            "requests/s": served / wall if wall else 0.0,
            "5xx answers": sum(n for c, n in codes.items() if c >= 500),
            **{f"voter {k}": v for k, v in percentiles(vote_lat).items()},
            **{f"studio page {k}": v for k, v in percentiles(ui_lat).items()},
            "votes expected / stored": f"{want} / {len(rows)}",
            "lost votes": lost,
            "doubled votes": doubled,
            "sqlite integrity_check": verdict,
            "seconds": round(wall, 1),
        }
    )
    for e in errors[:10]:
        check.fail(e)
    if lost or doubled:
        check.fail(f"{lost} votes lost, {doubled} doubled")
    if verdict != "ok":
        check.fail(f"integrity_check: {verdict}")
    return check


# ------------------------------------------------------------------------------------------------
# Access


TOKEN = "reliability-token-0123456789"
SECRET_MARKERS = (b"SQLite format 3", b"root:x:0:0", b"[tool.ruff]")


def traversal_paths(data_dir: Path) -> list[str]:
    """Ways to ask a file route for the studio database, /etc/passwd or the repo's own files."""
    db = (data_dir / "studio.db").resolve()
    paths = []
    for prefix in (
        "/gradio_api/file=",
        "/file=",
        "/gradio_api/static/",
        "/static/",
        "/assets/",
        "/gradio_api/upload?path=",
    ):
        for target in (str(db), "/etc/passwd", "../../../../etc/passwd", "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
                       "%2e%2e/%2e%2e/%2e%2e/etc/passwd", f"{ROOT}/pyproject.toml", "....//....//etc/passwd",
                       str(db).replace("/", "%2F")):  # fmt: skip
            paths.append(prefix + target)
    return paths


def leaks(body: bytes) -> bool:
    return any(m in body for m in SECRET_MARKERS)


def access(root: Path, launch_app: bool = True) -> Check:
    """The studio off loopback (app.py with a token), voter links, file routes, blind study pages."""
    from starlette.testclient import TestClient
    from test_study import SYSTEMS, handmade_study

    from studio import study_service as ss
    from studio.config import StudioConfig
    from studio.context import Studio
    from studio.study_pages import create_app

    check = Check("access", "auth, tokens, traversal, blinding")
    data = root / "access-data"
    studio = Studio.open(StudioConfig(data_dir=data))
    sid, other = handmade_study(studio, n_items=6), handmade_study(studio, n_items=2, name="other")
    [(_, ann), (_, bob)] = ss.add_voters(studio, sid, ["ann", "bob"])
    [(_, olga)] = ss.add_voters(studio, other, ["olga"])

    # 1. the studio: refused off loopback without auth; with a token nothing answers without it
    if launch_app:
        r = subprocess.run(
            [sys.executable, "app.py", "--host", "0.0.0.0", "--data-dir", str(root / "never")],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        refused = r.returncode == 2 and "Refusing to serve" in r.stderr and not (root / "never").exists()
        check.figures["app.py on 0.0.0.0 without auth refused"] = refused
        if not refused:
            check.fail(f"app.py on 0.0.0.0 without auth: {r.returncode} {r.stderr[-200:]}")
        port = free_port()
        log = open(root / "app.log", "w")
        app = subprocess.Popen(
            [sys.executable, "app.py", "--host", "0.0.0.0", "--token", TOKEN, "--data-dir", str(data), "--port", str(port)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            if not wait_http(base + "/", 240):
                check.fail(f"app.py did not start: {(root / 'app.log').read_text()[-500:]}")
            else:
                _studio_routes(check, base, data, (ann, olga))
        finally:
            os.killpg(app.pid, signal.SIGTERM)
            app.wait(timeout=30)
            log.close()

    # 2. voter links reach only their own study's pages and images; traversal in the image route
    c = TestClient(create_app(studio), follow_redirects=False)
    page = c.get(f"/vote/{ann}").text
    imgs = re.findall(r"src='([^']+)'", page)
    names = [s.rsplit("/", 1)[1] for s in imgs]
    crossed = sum(c.get(f"/vote/{tok}/img/{n}").status_code == 200 for tok in (bob, olga) for n in names)
    own = sum(c.get(s).status_code == 200 for s in imgs)
    probes = [f"/vote/{ann}/img/{p}" for p in ("..%2F..%2Fstudio.db", "../../studio.db", "%2e%2e%2fstudio.db",
              str((data / 'studio.db').resolve()).replace('/', '%2F'))]  # fmt: skip
    probes += [f"/vote/{p}" for p in ("..%2F..%2Fstudio.db", "../studio.db")] + [
        "/",
        "/docs",
        "/openapi.json",
        "/studio",
    ]
    answered = [p for p in probes if c.get(p).status_code == 200 or leaks(c.get(p).content)]
    check.figures["voter images: own served / other voters' served"] = f"{own}/{len(imgs)} / {crossed}"
    check.figures["voter routes probed with traversal or outside /vote"] = len(probes)
    check.figures["of them answered"] = len(answered)
    if own != len(imgs) or crossed:
        check.fail(f"voter images: {own}/{len(imgs)} own served, {crossed} served to other voters")
    if answered:
        check.fail(f"voter routes answered {answered}")

    # 3. blinding: pages, form values, image names and image bytes name no system; letters are shuffled
    words = [w.lower() for w in SYSTEMS]
    found = []
    first_letter = set()
    with studio.session() as s:
        from sqlalchemy import select

        from storage import StudyItem

        shas = {cd["sha"] for it in s.scalars(select(StudyItem)) for cd in it.candidates.values()}
    for _ in range(6):
        page = c.get(f"/vote/{ann}").text
        if "answered all" in page:
            break
        low = page.lower()
        found += [w for w in words + ["system", "slot"] if w in low]
        found += [sha[:12] for sha in shas if sha[:12] in page]
        for src in re.findall(r"src='([^']+)'", page):
            body = c.get(src).content
            found += [w for w in words if w.encode() in body.lower()]
        item = re.search(r"action='/vote/[^/]+/item/(\d+)'", page).group(1)
        with studio.session() as s:
            row = s.get(StudyItem, int(item))
            first_letter.add(row.candidates[ss.ordered_candidates(row)[0][1]]["system"])
        form = {}
        for q, v in re.findall(r"name='(quality|consistency|style)' value='([^']+)'", page):
            form.setdefault(q, v)
        c.post(f"/vote/{ann}/item/{item}", data=form)
    check.figures["system names or blob ids found in voter pages and images"] = len(found)
    check.figures["distinct systems shown as 'A' over 6 items"] = len(first_letter)
    if found:
        check.fail(f"the blind pages leak {sorted(set(found))}")
    if len(first_letter) < 2:
        check.fail("the same system is always shown first")
    return check


def _studio_routes(check: Check, base: str, data: Path, voter_tokens: tuple[str, ...]) -> None:
    import httpx

    routes = [
        "/",
        "/config",
        "/gradio_api/info",
        "/gradio_api/queue/status",
        f"/gradio_api/file={data / 'studio.db'}",
    ]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base, timeout=60) as c:
        open_without = [p for p in routes if c.get(p).status_code == 200]
        wrong = [
            p
            for p in routes
            for tok in voter_tokens
            if c.get(p, headers={"Authorization": f"Bearer {tok}"}).status_code == 200
        ]
        with_token = c.get("/", headers=auth).status_code
        posted = c.post("/gradio_api/upload", files={"files": ("x.png", b"x")}).status_code
        check.figures["studio routes answering without the token"] = f"{len(open_without)}/{len(routes)}"
        check.figures["studio routes answering to a voter's token"] = len(wrong)
        check.figures["studio page with the token"] = with_token
        check.figures["upload without the token"] = posted
        if open_without or wrong or with_token != 200 or posted < 400:
            check.fail(
                f"studio access: open {open_without}, voter token {wrong}, token {with_token}, upload {posted}"
            )
        probes = traversal_paths(data)
        answered = []
        for p in probes:
            r = c.get(p, headers=auth)
            if leaks(r.content) or (
                r.status_code == 200
                and "file" in p
                and len(r.content) > 0
                and "text/html" not in r.headers.get("content-type", "")
            ):
                answered.append(f"{p} -> {r.status_code}")
        check.figures["file-route traversal probes (with the token)"] = len(probes)
        check.figures["of them served a file"] = len(answered)
        if answered:
            check.fail(f"file routes served {answered[:5]}")


# ------------------------------------------------------------------------------------------------


SECTIONS = ("faults", "fuzz", "load", "access")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument("--kills", type=int, default=None, help="kill -9 per run kind (default 4; quick 1)")
    p.add_argument("--fuzz", type=int, default=None, help="examples per fuzz target (default 200; quick 30)")
    p.add_argument("--voters", type=int, default=None, help="concurrent voters (default 24; quick 6)")
    p.add_argument(
        "--ui-users", type=int, default=None, help="concurrent studio-page users (default 6; quick 2)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = p.parse_args(argv)
    q = args.quick
    kills = args.kills if args.kills is not None else (1 if q else 4)
    fuzz = args.fuzz if args.fuzz is not None else (30 if q else 200)
    voters = args.voters if args.voters is not None else (6 if q else 24)
    ui_users = args.ui_users if args.ui_users is not None else (2 if q else 6)
    only = {s.strip() for s in args.only.split(",")}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    checks: list[Check] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="studio-reliability-") as tmp:
        root = Path(tmp)

        def run(name: str, fn: Callable[[Path], Check]) -> None:
            folder = root / name
            folder.mkdir()
            print(f"... {name}", file=sys.stderr, flush=True)
            try:
                checks.append(fn(folder))
            except Exception as e:  # a check that cannot finish is a problem, and the others still run
                c = Check(name.split("-")[0], name)
                c.fail(f"the check itself failed: {type(e).__name__}: {e}")
                checks.append(c)

        if "faults" in only:
            run("faults-teacher", lambda r: teacher_kills(r, kills, args.seed))
            run("faults-distill", lambda r: distill_kills(r, kills, args.seed + 1))
            run("faults-ui", lambda r: ui_kill(r, n_runs=2, steps=800, restart_app=True))
            run("faults-disk", disk_full)
            run("faults-datadir", unwritable_data_dir)
        if "fuzz" in only:
            run("fuzz", lambda r: fuzz_all(r, fuzz, args.seed))
        if "load" in only:
            run(
                "load",
                lambda r: load(
                    r, voters=voters, items=5 if q else 10, ui_users=ui_users, ui_rounds=3 if q else 10
                ),
            )
        if "access" in only:
            run("access", access)
    print()
    print_table(checks)
    bad = sum(not c.ok for c in checks)
    print(
        f"\n{len(checks)} checks, {bad} with problems, {time.perf_counter() - t0:.0f} s "
        f"(kills {kills}, fuzz {fuzz} per target, voters {voters}, studio users {ui_users})"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
