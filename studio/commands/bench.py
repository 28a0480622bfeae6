"""bench write / import / contact-sheet: EffectBench-mini on disk and in the studio."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from ..context import Studio


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="EffectBench-mini: write it, import it, look at it")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="ACTION")
    p = bsub.add_parser(
        "write", help="write the bench as pair sets (20 pairs per effect, 100 test sources per category)"
    )
    p.add_argument("--out", type=Path, default=None, help="default: <data-dir>/effectbench")
    p.set_defaults(handler=cmd_write)
    p = bsub.add_parser(
        "import", help="import the bench's effects into the studio (writes the bench first if needed)"
    )
    p.add_argument("--dir", type=Path, default=None, help="default: <data-dir>/effectbench")
    p.add_argument("--effects", nargs="*", default=None, help="only these effects (default: all)")
    p.set_defaults(handler=cmd_import)
    p = bsub.add_parser("contact-sheet", help="a PNG with every effect applied to one source")
    p.add_argument("--out", type=Path, default=Path("contact_sheet.png"))
    p.add_argument("--category", choices=["animal", "portrait"], default="animal")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_contact_sheet)


def _bar(desc: str):
    bar = tqdm(desc=desc, unit="effect")

    def update(i: int, n: int, what: str = "") -> None:
        bar.total = n
        bar.n = i
        bar.set_postfix_str(what)
        bar.refresh()

    return bar, update


def cmd_write(args: argparse.Namespace, studio: Studio) -> None:
    from .. import bench_service

    bar, update = _bar("writing EffectBench-mini")
    out = bench_service.write(studio, args.out, progress=update)
    bar.close()
    print(f"bench written to {out}")


def cmd_import(args: argparse.Namespace, studio: Studio) -> None:
    from .. import bench_service

    bar, update = _bar("importing EffectBench-mini")
    done = bench_service.import_bench(studio, args.dir, effects=args.effects, progress=update)
    bar.close()
    print(f"imported {len(done)} effects")


def cmd_contact_sheet(args: argparse.Namespace, studio: Studio) -> None:
    from distill.effectbench.contact_sheet import write_contact_sheet
    from distill.effectbench.scenes import make_scene

    write_contact_sheet(args.out, scene=make_scene(args.category, args.seed))
    print(f"contact sheet written to {args.out}")
