"""study create / list / show / voters / link / open / close / results / serve: blind user studies.

    python -m studio study create --name N --effects A B --systems Base Base+Lightning FM+Lightning Ours \\
        --items 20 [--sources IMG... | --bench-sources 10] [--student ID|FILE --lightning ID|FILE --fm ID|FILE]
    python -m studio study voters ID --add alice bob [--url http://HOST:PORT]   (prints each link once)
    python -m studio study results ID [--csv FILE] [--chart FILE]
    python -m studio study serve [--host 127.0.0.1 --port 8189]                (the voter pages only)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..context import Studio
from .follow import follow_run

DEFAULT_URL = "http://127.0.0.1:8189"


def register(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("study", help="blind side-by-side user studies: create, voters, results, serve")
    ssub = st.add_subparsers(dest="study_command", required=True, metavar="ACTION")

    p = ssub.add_parser("create", help="create a study and queue the run that generates its images")
    p.add_argument("--name", required=True)
    p.add_argument("--effects", nargs="+", required=True, metavar="EFFECT")
    p.add_argument(
        "--systems",
        nargs="+",
        default=["Base", "Base+Lightning", "FM+Lightning", "Ours"],
        metavar="SYSTEM",
        help="Base, Base+Lightning, FM+Lightning, Ours, lora:ID or a .safetensors file; LABEL=... names one",
    )
    p.add_argument("--items", type=int, default=20, help="number of items (source x effect) to vote on")
    p.add_argument("--seed", type=int, default=0)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--sources", nargs="+", type=Path, metavar="IMAGE", help="source images to edit")
    src.add_argument("--bench-sources", type=int, default=None, help="this many EffectBench-mini test images")
    p.add_argument("--student", default=None, help="Ours: a student LoRA id or file (default: the newest)")
    p.add_argument("--lightning", default=None, help="the Lightning LoRA: id or file (default: the newest)")
    p.add_argument(
        "--fm", default=None, help="the FM all-in-1 LoRA: id or file (default: the newest baseline)"
    )
    p.add_argument("--base-steps", type=int, default=40)
    p.add_argument("--base-cfg", type=float, default=4.0)
    p.add_argument("--fast-steps", type=int, default=8, help="steps of the Lightning systems")
    p.add_argument("--backbone", default=None, help="tiny or qwen-image-edit (default: tiny)")
    p.add_argument("--model-path", default=None)
    p.add_argument("--wait", action="store_true", help="follow the generation run until it ends")
    p.set_defaults(handler=cmd_create)

    p = ssub.add_parser("list", help="every study")
    p.set_defaults(handler=cmd_list)

    p = ssub.add_parser("show", help="a study: generation progress, voters and their progress")
    p.add_argument("study_id", type=int)
    p.set_defaults(handler=cmd_show)

    p = ssub.add_parser("voters", help="add voters (prints their links) or list voter progress")
    p.add_argument("study_id", type=int)
    p.add_argument("--add", nargs="+", default=None, metavar="NAME")
    p.add_argument("--url", default=DEFAULT_URL, help="where voters reach `study serve` (for the links)")
    p.set_defaults(handler=cmd_voters)

    p = ssub.add_parser("link", help="a new link for a voter who lost theirs (the old one stops working)")
    p.add_argument("voter_id", type=int)
    p.add_argument("--url", default=DEFAULT_URL)
    p.set_defaults(handler=cmd_link)

    for action, help_ in (("open", "reopen a closed study for voting"), ("close", "stop accepting votes")):
        p = ssub.add_parser(action, help=help_)
        p.add_argument("study_id", type=int)
        p.set_defaults(handler=cmd_open if action == "open" else cmd_close)

    p = ssub.add_parser("results", help="preference share per system and criterion, with 95%% CIs")
    p.add_argument("study_id", type=int)
    p.add_argument("--csv", type=Path, default=None, help="also write the table as CSV")
    p.add_argument("--chart", type=Path, default=None, help="also write a Fig. 16-style chart (PNG)")
    p.set_defaults(handler=cmd_results)

    p = ssub.add_parser("serve", help="serve the voter pages (nothing else of the studio)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8189)
    p.set_defaults(handler=cmd_serve)


def cmd_create(args: argparse.Namespace, studio: Studio) -> int:
    from .. import study_service as ss

    sources: list[str] | int | None = args.bench_sources
    if args.sources:
        sources = ss.store_source_images(studio, args.sources)
    study_id = ss.create_study(
        studio,
        args.name,
        args.effects,
        sources,
        args.systems,
        args.items,
        args.seed,
        student=args.student,
        lightning=args.lightning,
        fm=args.fm,
        base_steps=args.base_steps,
        base_cfg=args.base_cfg,
        fast_steps=args.fast_steps,
    )
    info = ss.get_study(studio, study_id)
    print(
        f"study {study_id}: {info.planned_items} items x {len(info.systems)} systems ({', '.join(info.systems)})"
    )
    print(f"generating the images in run {info.run_id} (`python -m studio runs show {info.run_id}`)")
    if args.wait and info.run_id is not None:
        if follow_run(studio, info.run_id):
            return 1
        print(f"study {study_id} is open; add voters: python -m studio study voters {study_id} --add NAME...")
    return 0


def cmd_list(args: argparse.Namespace, studio: Studio) -> int:
    from .. import study_service as ss

    studies = ss.list_studies(studio)
    if not studies:
        print("no studies")
    for s in studies:
        print(
            f"{s.id}\t{s.status}\t{s.items}/{s.planned_items} items\t{s.voters} voters\t{s.votes} votes\t"
            f"{s.name}\t{', '.join(s.systems)}"
        )
    return 0


def _print_progress(studio: Studio, study_id: int) -> None:
    from .. import study_service as ss

    rows = ss.voter_progress(studio, study_id)
    if not rows:
        print("no voters yet")
    for v in rows:
        last = v.last_vote_at.astimezone().strftime("%Y-%m-%d %H:%M") if v.last_vote_at else "-"
        print(f"voter {v.voter_id}\t{v.name}\t{v.answered}/{v.items} items\t{v.votes} votes\tlast {last}")


def cmd_show(args: argparse.Namespace, studio: Studio) -> int:
    from .. import study_service as ss

    s = ss.get_study(studio, args.study_id)
    print(f"study {s.id}: {s.name} ({s.status})")
    print(f"effects: {', '.join(s.effects)}")
    print(f"systems: {', '.join(s.systems)}")
    print(f"items: {s.items} of {s.planned_items}; voters: {s.voters}; votes: {s.votes}")
    run = ss.generation_run(studio, s.id)
    if run is not None:
        print(
            f"generation: run {run.id} {run.status} {run.progress:.0%}"
            + (f" — {run.error}" if run.error else "")
        )
    _print_progress(studio, s.id)
    return 0


def cmd_voters(args: argparse.Namespace, studio: Studio) -> int:
    from .. import study_service as ss

    if args.add:
        for name, token in ss.add_voters(studio, args.study_id, args.add):
            print(f"{name}\t{ss.voter_url(args.url, token)}")
        print(
            "(each link is shown only now; keep it. `study link VOTER_ID` makes a new one.)", file=sys.stderr
        )
        return 0
    _print_progress(studio, args.study_id)
    return 0


def cmd_link(args: argparse.Namespace, studio: Studio) -> int:
    from .. import study_service as ss

    print(ss.voter_url(args.url, ss.reissue_link(studio, args.voter_id)))
    return 0


def cmd_open(args: argparse.Namespace, studio: Studio) -> int:
    from .. import study_service as ss

    print(f"study {args.study_id} is {ss.set_open(studio, args.study_id, True)}")
    return 0


def cmd_close(args: argparse.Namespace, studio: Studio) -> int:
    from .. import study_service as ss

    print(f"study {args.study_id} is {ss.set_open(studio, args.study_id, False)}")
    return 0


def cmd_results(args: argparse.Namespace, studio: Studio) -> int:
    from .. import study_service as ss

    res = ss.results(studio, args.study_id)
    print(f"study {res.study_id}: {res.name} — {res.voters} voters, {res.items} items")
    for q in ss.QUESTIONS:
        rows = [r for r in res.rows if r.criterion == q.value]
        total = rows[0].total if rows else 0
        print(f"{ss.QUESTION_TEXT[q][0]} ({total} votes)")
        for r in rows:
            print(
                f"  {r.system:<20} {r.votes:>5}  {100 * r.share:5.1f}%  [{100 * r.ci_low:5.1f}%, {100 * r.ci_high:5.1f}%]"
            )
    if args.csv is not None:
        args.csv.write_text(ss.results_csv(studio, args.study_id, res))
        print(f"wrote {args.csv}")
    if args.chart is not None:
        args.chart.write_bytes(ss.results_chart_png(studio, args.study_id, res))
        print(f"wrote {args.chart}")
    return 0


def cmd_serve(args: argparse.Namespace, studio: Studio) -> int:
    from ..study_pages import serve_voting
    from ..ui.access import is_loopback

    if not is_loopback(args.host):
        print(
            f"serving the voter pages on {args.host}: voters reach only their own link's items; put it behind "
            "HTTPS (a reverse proxy) so links are not sent in clear text.",
            file=sys.stderr,
        )
    print(f"voter pages on http://{args.host}:{args.port}/vote/<token>", flush=True)
    serve_voting(studio, args.host, args.port)
    return 0
