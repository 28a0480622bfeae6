"""runs list / show / stop / resume / logs: background runs from a terminal."""

from __future__ import annotations

import argparse
import json
from datetime import datetime

from .. import runs
from ..context import Studio
from .follow import eta_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="background runs: list, show, stop, resume, logs")
    rsub = p.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    p = rsub.add_parser("list", help="one run a line, newest first")
    p.add_argument("--kind", default=None, help="only runs of this kind (teacher, distill, eval, ...)")
    p.set_defaults(handler=cmd_list)
    p = rsub.add_parser("show", help="a run's status, metrics, error, last checkpoint and log tail")
    p.add_argument("run_id", type=int)
    p.set_defaults(handler=cmd_show)
    p = rsub.add_parser("stop", help="ask a run to stop (it writes a checkpoint first)")
    p.add_argument("run_id", type=int)
    p.set_defaults(handler=cmd_stop)
    p = rsub.add_parser("resume", help="restart a stopped or failed run from its last checkpoint")
    p.add_argument("run_id", type=int)
    p.set_defaults(handler=cmd_resume)
    p = rsub.add_parser("logs", help="the end of a run's log")
    p.add_argument("run_id", type=int)
    p.add_argument("-n", "--lines", type=int, default=50)
    p.set_defaults(handler=cmd_logs)


def _when(t: datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _state(v: runs.RunView) -> str:
    if v.waiting_for:
        return f"queued (waiting for {v.waiting_for})"
    return v.status


def cmd_list(args: argparse.Namespace, studio: Studio) -> None:
    views = runs.list_runs(studio, kind=args.kind)
    if not views:
        print("no runs")
    for v in views:
        steps = f"{v.step}/{v.total}" if v.total else "-"
        print(
            f"{v.id}\t{v.kind}\t{_state(v)}\t{v.progress:.0%}\t{steps}\teta {eta_text(v.eta_s)}\t{v.name or '-'}"
        )


def cmd_show(args: argparse.Namespace, studio: Studio) -> None:
    v = runs.run_status(studio, args.run_id, log_lines=15)
    print(f"run:        {v.id} {v.name}".rstrip())
    print(f"kind:       {v.kind}\nstatus:     {_state(v)}")
    print(f"progress:   {v.progress:.1%} (step {v.step} of {v.total or '?'}), eta {eta_text(v.eta_s)}")
    print(f"created:    {_when(v.created_at)}\nstarted:    {_when(v.started_at)}")
    print(f"finished:   {_when(v.finished_at)}\nworker:     {v.pid or '-'} on {v.host or '-'}")
    if v.checkpoint:
        c = v.checkpoint
        print(f"checkpoint: step {c.step}, {c.path} ({c.bytes / 1e6:.1f} MB)")
    if v.metrics:
        print(f"metrics:    {json.dumps(v.metrics, sort_keys=True)}")
    print(f"config:     {json.dumps(v.config, sort_keys=True)}")
    if v.error:
        print(f"error:      {v.error}")
    if v.log_tail:
        print(f"--- log ({runs.log_path(studio, v.id)}) ---\n{v.log_tail}")


def cmd_stop(args: argparse.Namespace, studio: Studio) -> None:
    status = runs.request_stop(studio, args.run_id)
    if status == "stopping":
        print(f"run {args.run_id}: stop requested; it saves a checkpoint and stops within seconds")
    else:
        print(f"run {args.run_id}: {status}")


def cmd_resume(args: argparse.Namespace, studio: Studio) -> None:
    pid = runs.resume(studio, args.run_id)
    ckpt = runs.last_checkpoint(studio, args.run_id)
    where = f"from step {ckpt.step}" if ckpt else "from the beginning"
    print(f"run {args.run_id} resumed {where} (worker process {pid})")


def cmd_logs(args: argparse.Namespace, studio: Studio) -> None:
    text = runs.log_tail(studio, args.run_id, args.lines)
    print(text or f"run {args.run_id} has no log yet ({runs.log_path(studio, args.run_id)})")
