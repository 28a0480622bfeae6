"""init, import, effects list/show/rename/prompt/drop-pair/delete."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import library
from ..context import Studio


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create the data folder and database")
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("import", help="import a pair set (folder or .zip) as an effect")
    p.add_argument(
        "path", type=Path, help="folder or .zip: name pairs, source/+target/, or ai-toolkit control/+targets/"
    )
    p.add_argument("--name", required=True, help="effect name (lowercase, digits, - or _)")
    p.add_argument("--prompt", default="", help="the teacher prompt (the instruction the effect LoRA uses)")
    p.add_argument("--display-name", default=None)
    p.add_argument("--category", choices=["animal", "portrait", "mixed"], default=None)
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser(
        "import-bank",
        help="import a whole LoRA bank: a folder with one sub-folder per effect",
        description="Each effect sub-folder holds pairs/ (or pairs.zip), prompt.txt (the teacher prompt) and, "
        "optionally, the effect's existing LoRA (.safetensors), which becomes its teacher. Folders with a "
        "problem are skipped with the reason; the others are imported; effects already there are left alone.",
    )
    p.add_argument("folder", type=Path)
    p.set_defaults(handler=cmd_import_bank)

    eff = sub.add_parser("effects", help="list, show, rename, prompt or delete effects")
    esub = eff.add_subparsers(dest="effects_command", required=True, metavar="ACTION")
    p = esub.add_parser("list", help="one effect a line")
    p.set_defaults(handler=cmd_list)
    p = esub.add_parser("show", help="an effect's pairs and prompts")
    p.add_argument("name")
    p.set_defaults(handler=cmd_show)
    p = esub.add_parser("rename", help="rename an effect")
    p.add_argument("name")
    p.add_argument("new_name")
    p.set_defaults(handler=cmd_rename)
    p = esub.add_parser("prompt", help="set an effect's teacher prompt")
    p.add_argument("name")
    p.add_argument("prompt")
    p.set_defaults(handler=cmd_prompt)
    p = esub.add_parser("drop-pair", help="exclude a bad pair from training (--undo to restore)")
    p.add_argument("name")
    p.add_argument("pair_id", type=int)
    p.add_argument("--undo", action="store_true")
    p.set_defaults(handler=cmd_drop_pair)
    p = esub.add_parser("delete", help="delete an effect and its pairs")
    p.add_argument("name")
    p.set_defaults(handler=cmd_delete)


def cmd_init(args: argparse.Namespace, studio: Studio) -> None:
    print(
        f"studio data in {studio.config.data_dir.resolve()} (database {studio.engine.url.render_as_string()})"
    )


def cmd_import(args: argparse.Namespace, studio: Studio) -> None:
    res = library.import_pairset(
        studio,
        args.name,
        args.path,
        teacher_prompt=args.prompt,
        display_name=args.display_name,
        category=args.category,
    )
    for w in res.warnings:
        print(f"warning: {w}")
    print(f"imported {res.pairs} pairs into effect '{res.name}'")


def cmd_import_bank(args: argparse.Namespace, studio: Studio) -> int:
    from tqdm import tqdm

    from ..bank import import_bank

    with tqdm(unit="effect", desc="importing") as bar:

        def on_effect(i: int, n: int, name: str) -> None:
            bar.total = n
            bar.n = i
            bar.set_postfix_str(name)
            bar.refresh()

        result = import_bank(studio, args.folder, on_effect)
        bar.n = bar.total or 0
        bar.refresh()
    print(
        f"imported {len(result.imported)} effect{'s' if len(result.imported) != 1 else ''}"
        f" ({len(result.teachers)} with their LoRA as teacher)"
        + (f": {', '.join(result.imported)}" if result.imported else "")
    )
    for name, note in result.notes:
        print(f"note: {name}: {note}")
    for folder, why in result.skipped:
        print(f"skipped {folder}/: {why}")
    return 1 if result.skipped else 0


def cmd_list(args: argparse.Namespace, studio: Studio) -> None:
    for e in library.list_effects(studio):
        trig = e.trigger or "-"
        print(f"{e.name}\t{e.pairs} pairs\t{trig}\t{e.teacher_prompt}")


def cmd_show(args: argparse.Namespace, studio: Studio) -> None:
    e = library.get_effect(studio, args.name)
    print(f"name:           {e.name}\ndisplay name:   {e.display_name}\ncategory:       {e.category or '-'}")
    print(f"pairs:          {e.pairs} (+{e.excluded} excluded)\nteacher prompt: {e.teacher_prompt}")
    print(f"trigger:        {e.trigger or '-'}\nstudent prompt: {e.student_prompt or '-'}")
    for p in library.effect_pairs(studio, args.name, include_excluded=True):
        flag = " (excluded)" if p.excluded else ""
        print(f"  pair #{p.id}: {p.original_name or p.source_sha[:12]} {p.width}x{p.height}{flag}")


def cmd_rename(args: argparse.Namespace, studio: Studio) -> None:
    library.rename_effect(studio, args.name, args.new_name)
    print(f"renamed '{args.name}' to '{args.new_name}'")


def cmd_prompt(args: argparse.Namespace, studio: Studio) -> None:
    library.set_teacher_prompt(studio, args.name, args.prompt)
    print(f"teacher prompt of '{args.name}' set")


def cmd_drop_pair(args: argparse.Namespace, studio: Studio) -> None:
    library.set_pair_excluded(studio, args.name, args.pair_id, not args.undo)
    print(f"pair #{args.pair_id} of '{args.name}' {'restored' if args.undo else 'excluded'}")


def cmd_delete(args: argparse.Namespace, studio: Studio) -> None:
    library.delete_effect(studio, args.name)
    print(f"deleted effect '{args.name}'")
