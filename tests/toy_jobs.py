"""Toy job kinds for tests/test_runs.py, imported by workers via STUDIO_EXTRA_JOB_MODULES.

"eval:toy-count" counts to config["n"], sleeping config["sleep"] s a step, with a JSON checkpoint
(written atomically) every config["every"] steps and when stopped; it resumes from its checkpoint
and returns when it started and ended (wall clock), so tests can check runs never overlap.
Test hooks: "fail_at" raises at that step, "samples_at" reports a sample grid, "hang_at" blocks
(on a fresh start only) after that step's progress reached the DB, for a deterministic kill -9;
"gate" (a path) holds step 1 until that file exists.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from PIL import Image

from studio.runs import RunContext, register_kind

TOY = "eval:toy-count"


def _save(ctx: RunContext, step: int) -> None:
    d = ctx.run_dir / "checkpoints"
    d.mkdir(exist_ok=True)
    path = d / f"step-{step:06d}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, path)
    ctx.reporter.checkpoint(step, path)


def count(ctx: RunContext) -> dict:
    t_start = time.time()
    cfg = ctx.config
    n, every, sleep = int(cfg["n"]), int(cfg.get("every", 5)), float(cfg.get("sleep", 0.01))
    start = json.loads(Path(ctx.resume_from).read_text())["step"] if ctx.resume_from else 0
    step = start
    for step in range(start + 1, n + 1):
        if step == cfg.get("fail_at"):
            raise ValueError(f"toy failure at step {step}")
        while step == 1 and cfg.get("gate") and not Path(cfg["gate"]).exists():
            time.sleep(0.02)  # held until the test opens the gate
        time.sleep(sleep)
        ctx.reporter.progress(step, n, {"loss": 1.0 / step, "twice": 2.0 * step})
        if step == cfg.get("samples_at"):
            ctx.reporter.samples(step, Image.new("RGB", (8, 8), (step % 256, 0, 0)))
        if step == cfg.get("hang_at") and ctx.resume_from is None:
            ctx.reporter.flush()  # the test sees this step, then kills the worker here
            time.sleep(60)
        stop = ctx.reporter.should_stop()
        if step % every == 0 or step == n or stop:
            _save(ctx, step)
        if stop:
            break
    return {"t_start": t_start, "t_end": time.time(), "resumed_from": start, "last_step": step}


register_kind(TOY, count)
