"""prompts generate / show / set / matrix: trigger words and student prompts (AOP) from the terminal."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from .. import library
from .. import prompts_service as ps
from ..context import Studio


def register(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("prompts", help="trigger words and student prompts of the effects")
    psub = pr.add_subparsers(dest="prompts_command", required=True, metavar="ACTION")

    p = psub.add_parser(
        "generate",
        help="draw missing trigger words, then write student prompts (VLM if configured, else offline)",
        description=(
            "Draws a trigger word for every effect without one, checks all triggers in the text encoder, "
            "then writes student prompts. The writer: an OpenAI-compatible VLM when STUDIO_VLM_BASE_URL and "
            "STUDIO_VLM_MODEL are set (key in STUDIO_VLM_API_KEY), a local VLM folder in STUDIO_VLM_LOCAL_DIR, "
            "else the offline describer. Prompts a curator edited are kept unless --overwrite-edits."
        ),
    )
    p.add_argument(
        "effects", nargs="*", metavar="EFFECT", help="effects to write (default: those without one)"
    )
    p.add_argument(
        "--all", action="store_true", help="rewrite every effect's prompt (curator edits still kept)"
    )
    p.add_argument("--overwrite-edits", action="store_true", help="also replace prompts a curator edited")
    p.add_argument(
        "--seed", type=int, default=None, help="which training pairs are sampled (default: random)"
    )
    p.add_argument("--threshold", type=float, default=ps.DEFAULT_THRESHOLD, help="trigger similarity limit")
    p.set_defaults(handler=cmd_generate)

    p = psub.add_parser("show", help="teacher prompt, trigger and student prompt (with sources)")
    p.add_argument("effect", nargs="?", help="one effect (default: all)")
    p.set_defaults(handler=cmd_show)

    p = psub.add_parser("set", help="set an effect's student prompt, trigger word or teacher prompt")
    p.add_argument("effect")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--student", help="the student prompt (kept from then on: marked as edited by you)")
    what.add_argument("--trigger", help="the trigger word, e.g. '<warm_film_Xy59Q9a>'")
    what.add_argument("--teacher", help="the teacher prompt (the instruction the effect's LoRA uses)")
    p.add_argument("--threshold", type=float, default=ps.DEFAULT_THRESHOLD, help="trigger similarity limit")
    p.set_defaults(handler=cmd_set)

    p = psub.add_parser("matrix", help="the trigger words' similarity in the text encoder")
    p.add_argument("--check", action="store_true", help="measure again now (draws missing triggers too)")
    p.add_argument(
        "--threshold", type=float, default=ps.DEFAULT_THRESHOLD, help="similarity limit for --check"
    )
    p.set_defaults(handler=cmd_matrix)


def _note_encoder(studio: Studio) -> None:
    """Load the (cached) text encoder now, and say so when it is not a trained one."""
    _, encoder = ps.open_embedder(studio)
    if "randomly initialised" in encoder:
        print(f"note: trigger words are measured with the {encoder}.", file=sys.stderr)


def _assign(studio: Studio, threshold: float) -> ps.TriggerAssignment:
    missing = [r.effect for r in ps.prompt_rows(studio) if not r.trigger]
    _note_encoder(studio)
    result = ps.assign_triggers(studio, threshold=threshold)
    for name in missing:
        print(f"trigger of {name}: {result.triggers[name]}")
    print(result.report())
    return result


def cmd_generate(args: argparse.Namespace, studio: Studio) -> int:
    if not ps.prompt_rows(studio):
        print("No effects yet: import a pair set first (`python -m studio import ...`).")
        return 0
    if any(not r.trigger for r in ps.prompt_rows(studio)):
        _assign(studio, args.threshold)
    config = ps.writer_config_from_env()
    print(f"student prompts by {ps.describe_writer(config)}")
    with tqdm(total=len(args.effects or ps.prompt_rows(studio)), unit="effect", file=sys.stderr) as bar:

        def progress(done: int, total: int, what: str) -> None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(what, refresh=True)

        results = ps.generate_student_prompts(
            studio,
            args.effects or None,
            config,
            overwrite_curator_edits=args.overwrite_edits,
            progress=progress,
            only_missing=not args.effects and not args.all,
            seed=args.seed,
        )
    for r in results:
        if r.status == "written":
            print(f"{r.effect}: {r.text}  [{r.source}]")
        elif r.status == "skipped":
            print(f"{r.effect}: skipped: {r.message}")
        elif r.message:
            print(f"{r.effect}: kept ({r.message})")
    written = sum(r.status == "written" for r in results)
    print(f"{written} student prompt{'s' if written != 1 else ''} written")
    return 0


def _when(row: ps.PromptRow) -> str:
    return row.student_updated_at.strftime("%Y-%m-%d %H:%M UTC") if row.student_updated_at else "-"


def cmd_show(args: argparse.Namespace, studio: Studio) -> int:
    rows = ps.prompt_rows(studio, [args.effect] if args.effect else None)
    if not rows:
        print("No effects yet.")
    for i, r in enumerate(rows):
        if i:
            print()
        edited = ", edited by a curator" if r.student_edited_by_curator else ""
        print(f"{r.effect}  ({r.pairs} pairs)")
        print(f"  teacher prompt: {r.teacher_prompt or '-'}  [{r.teacher_source or '-'}]")
        print(f"  trigger:        {r.trigger or '-'}  [{r.trigger_source or '-'}]")
        print(f"  student prompt: {r.student_prompt or '-'}  [{r.student_source or '-'}{edited}, {_when(r)}]")
        if r.condition:
            print(f"  student condition: {r.condition}")
    return 0


def cmd_set(args: argparse.Namespace, studio: Studio) -> int:
    if args.student is not None:
        ps.set_student_prompt(studio, args.effect, args.student)
        print(f"student prompt of '{args.effect}' set (kept when prompts are generated again)")
    elif args.teacher is not None:
        library.set_teacher_prompt(studio, args.effect, args.teacher)
        print(f"teacher prompt of '{args.effect}' set")
    else:
        trigger = ps.check_trigger_format(args.trigger)
        _note_encoder(studio)
        check = ps.set_trigger(studio, args.effect, trigger, threshold=args.threshold)
        print(f"trigger of '{args.effect}' set to {check.triggers[args.effect]}")
        print(check.report())
    return 0


def print_matrix(stored: ps.StoredMatrix) -> None:
    n = len(stored.names)
    print(f"trigger similarity (centred cosine) in the {stored.encoder}, checked {stored.checked_at}")
    width = max((len(nm) for nm in stored.names), default=4) + 4
    print(" " * width + "".join(f"{j + 1:>7}" for j in range(n)))
    for i, name in enumerate(stored.names):
        cells = "".join(f"{'-':>7}" if i == j else f"{stored.matrix[i, j]:>7.2f}" for j in range(n))
        print(f"{i + 1:>3} {name:<{width - 4}}" + cells)
    worst = stored.max_offdiag
    if worst is None:
        print("fewer than two triggers: nothing to compare")
        return
    verdict = "PASS" if stored.ok else "FAIL"
    print(f"max off-diagonal {worst:.2f} (limit {stored.threshold:.2f}): {verdict}")
    for a, b, c in stored.failing_pairs():
        print(f"  too similar: {a} {stored.triggers[a]} and {b} {stored.triggers[b]} ({c:.2f})")


def cmd_matrix(args: argparse.Namespace, studio: Studio) -> int:
    if args.check:
        _assign(studio, args.threshold)
    stored = ps.stored_matrix(studio)
    if stored is None:
        print("The trigger words were never checked: run `python -m studio prompts matrix --check`.")
        return 0
    print_matrix(stored)
    if not stored.is_current(ps.prompt_rows(studio)):
        print(
            "note: triggers changed since this check; `python -m studio prompts matrix --check` measures again"
        )
    return 0
